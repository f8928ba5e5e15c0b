{{- define "loraplex.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "loraplex.authSecret" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else if or .Values.auth.adminTokens .Values.auth.generationTokens -}}
{{- printf "%s-tokens" (include "loraplex.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-state" (include "loraplex.fullname" .)) -}}
{{- end -}}

{{- define "loraplex.registrySecret" -}}
{{- .Values.sharedRegistry.existingSecret | default (printf "%s-registry" (include "loraplex.fullname" .)) -}}
{{- end -}}
