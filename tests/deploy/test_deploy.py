"""deploy/ checked as far as this machine can (no Docker engine, no cluster): the Helm chart lints and renders,
every manifest passes Kubernetes' schemas (kubernetes-validate), its config TOML is what `loraplex serve`
accepts; the Dockerfiles install through scripts/setup.sh as a non-root user and run commands the real CLI
parses; the compose file passes the compose-spec parser and its references resolve. Images are not built and
nothing is deployed here: the README says so."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from ..debian_packages import debian_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "loraplex"
KUBERNETES_VERSION = "1.30.0"
VALUE_SETS = {
    "defaults": {},
    "tls-auth-monitoring": {
        "tls": {"enabled": True, "secretName": "loraplex-tls", "requireClientCert": True},
        "auth": {"adminTokens": ["admin-secret"], "generationTokens": ["gen-1", "gen-2"]},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
        "autoscaling": {"enabled": True, "maxReplicas": 3},
        "modelVolume": {"enabled": True, "claimName": "models"},
        "model": {"path": "/models/llama-3.1-8b", "quantization": "nf4"},
        "serve": {"max-loras": 16, "max-num-seqs": 128, "grace-seconds": 20.0, "strict-base": True},
    },
    "cpu-ephemeral": {"gpu": {"enabled": False}, "persistence": {"enabled": False}, "http": {"enabled": False},
                      "auth": {"existingSecret": "my-tokens"}},
    "many-replicas": {"replicaCount": 3, "persistence": {"enabled": False}, "proxy": {"enabled": True},
                      "sharedRegistry": {"enabled": True, "url": "postgresql://loraplex:pw@db:5432/loraplex",
                                         "adapterVolume": {"claimName": "adapters"}}},
}


def helm() -> str:
    found = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
    assert found, "helm not found: it comes with the dev extra (helm-binary)"
    return found


def render(values: dict, tmp_path: Path) -> list[dict]:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = subprocess.run([helm(), "template", "lp", str(CHART), "-f", str(values_file)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    """The server's own objects by kind (the proxy's and the headless Service: `proxy_docs`)."""
    return {doc["kind"]: doc for doc in docs if not doc["metadata"]["name"].endswith(("-proxy", "-headless"))}


def proxy_docs(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs if doc["metadata"]["name"].endswith("-proxy")}


def serve_args(argv: list[str]) -> argparse.Namespace:
    """The real `loraplex` parser and settings layers (flag > env > config file > default) over argv."""
    from loraplex.server.cli import build_parser
    from loraplex.server.settings import read_config_file

    args = build_parser().parse_args(argv)
    args._layers.resolve(args, read_config_file(args.config), environ={})
    return args


def test_chart_lints():
    done = subprocess.run([helm(), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_manifests_pass_kubernetes_schemas(name, tmp_path):
    import kubernetes_validate

    docs = render(VALUE_SETS[name], tmp_path)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):  # a CRD: no schema in Kubernetes' own set
            endpoint = doc["spec"]["endpoints"][0]
            assert doc["kind"] == "ServiceMonitor" and endpoint["port"] == "metrics"
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    kinds = sorted(doc["kind"] for doc in docs)
    expected = {"defaults": ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"],
                "tls-auth-monitoring": ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                                        "Secret", "Service", "ServiceMonitor"],
                "cpu-ephemeral": ["ConfigMap", "Deployment", "Service"],
                "many-replicas": ["ConfigMap", "ConfigMap", "Deployment", "Deployment", "Secret", "Service", "Service",
                                  "Service"]}[name]
    assert kinds == expected


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_config_is_what_loraplex_serve_accepts(name, tmp_path):
    docs = by_kind(render(VALUE_SETS[name], tmp_path))
    config = tmp_path / "loraplex.toml"
    config.write_text(docs["ConfigMap"]["data"]["loraplex.toml"])
    tomllib.loads(config.read_text())
    args = serve_args(["--config", str(config), "serve"])
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (args.host, args.port, args.metrics_port, args.health_port) == (
        "0.0.0.0", ports["grpc"], ports["metrics"], ports["health"])
    assert args.state_dir.startswith(mounts["state"]) and args.cache_dir.startswith(mounts["state"])
    assert {"name": "LORAPLEX_CONFIG", "value": f"{mounts['config']}/loraplex.toml"} in container["env"]
    values = VALUE_SETS[name]
    if values.get("http", {}).get("enabled", True):
        assert args.http_port == ports["http"]
    else:
        assert args.http_port is None and "http" not in ports
    if name == "tls-auth-monitoring":
        assert (args.tls_cert, args.tls_key, args.tls_ca) == tuple(
            f"{mounts['tls']}/{f}" for f in ("tls.crt", "tls.key", "ca.crt"))
        assert args.admin_token_file == f"{mounts['tokens']}/admin.tokens"
        assert args.generation_token_file == f"{mounts['tokens']}/generation.tokens"
        secret = docs["Secret"]["stringData"]
        assert secret["admin.tokens"].split() == ["admin-secret"]
        assert secret["generation.tokens"].split() == ["gen-1", "gen-2"]
        assert (args.max_loras, args.max_num_seqs, args.grace_seconds, args.strict_base) == (16, 128, 20.0, True)
        assert args.model == "/models/llama-3.1-8b" and args.model.startswith(mounts["model"])
        assert docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"] == (
            "loraplex_queue_depth")
    if name == "cpu-ephemeral":
        assert args.device == "cpu" and args.admin_token_file.startswith(mounts["tokens"])
        assert {"name": "tokens", "secret": {"secretName": "my-tokens"}} in pod["volumes"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_probes_resources_and_security(name, tmp_path):
    docs = by_kind(render(VALUE_SETS[name], tmp_path))
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    tls = VALUE_SETS[name].get("tls", {}).get("enabled", False)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # gRPC probes are plaintext only
        assert container[probe]["grpc"]["port"] == ports["health" if tls else "grpc"]
    gpu = VALUE_SETS[name].get("gpu", {}).get("enabled", True)
    assert ("nvidia.com/gpu" in container["resources"].get("limits", {})) == gpu
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert pod["terminationGracePeriodSeconds"] > 30  # beyond the server's default drain (grace-seconds 30)


def test_shared_registry_reaches_every_replica_s_settings(tmp_path):
    docs = render(VALUE_SETS["many-replicas"], tmp_path)
    server = by_kind(docs)
    config = tmp_path / "loraplex.toml"
    config.write_text(server["ConfigMap"]["data"]["loraplex.toml"])
    pod = server["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    secret_ref = env["LORAPLEX_REGISTRY_URL"]["valueFrom"]["secretKeyRef"]
    assert secret_ref == {"name": server["Secret"]["metadata"]["name"], "key": "url"}
    url = server["Secret"]["stringData"]["url"]
    from loraplex.server.cli import build_parser
    from loraplex.server.service.serve_cmd import configs_from_args
    from loraplex.server.settings import read_config_file

    args = build_parser().parse_args(["--config", str(config), "serve"])
    args._layers.resolve(args, read_config_file(args.config), environ={"LORAPLEX_REGISTRY_URL": url})
    service, _ = configs_from_args(args)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert service.registry_url == url and service.shared_adapter_dir == mounts["shared-adapters"]
    assert {"name": "shared-adapters", "persistentVolumeClaim": {"claimName": "adapters"}} in pod["volumes"]
    assert server["Deployment"]["spec"]["replicas"] == 3


def test_proxy_hashes_on_the_adapter_header_over_the_replicas(tmp_path):
    """The chart's nginx.conf, checked by Debian's nginx -t (1.22: without 1.27.3's `resolve` and `http2 on`,
    which are rewritten to what 1.22 accepts; the hash, grpc_pass and retry lines are checked as they are)."""
    docs = render(VALUE_SETS["many-replicas"], tmp_path)
    proxy = proxy_docs(docs)
    headless = next(d for d in docs if d["metadata"]["name"].endswith("-headless"))
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == by_kind(docs)["Service"]["spec"]["selector"]
    text = proxy["ConfigMap"]["data"]["nginx.conf"]
    assert text.count("hash $http_x_loraplex_adapter consistent;") == 2 and "grpc_pass grpc://loraplex_grpc;" in text
    assert f"server {headless['metadata']['name']}.default.svc.cluster.local:50051 resolve" in text
    nginx = debian_binary("nginx", "nginx", fallback="/usr/sbin/nginx")
    old = re.sub(r"server \S+:(\d+) resolve", r"server 127.0.0.1:\1", text).replace("zone ", "# zone ")
    old = re.sub(r"listen (\d+);\n(\s+)http2 on;", r"listen 127.0.0.1:\1 http2;", old)
    old = old.replace("listen 8000;", "listen 127.0.0.1:8000;").replace("resolver ", "# resolver ")
    (tmp_path / "nginx.conf").write_text(old)
    done = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pod = proxy["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"][-1] == "/etc/loraplex-proxy/nginx.conf"
    assert pod["securityContext"]["runAsNonRoot"]


def test_envoy_config_routes_by_the_adapter_header():
    """deploy/envoy/envoy.yaml as far as this machine can check it (no Envoy binary in Debian or PyPI):
    ring hash on x-loraplex-adapter, gRPC health checks, retries on UNAVAILABLE to another host."""
    config = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    cluster = config["static_resources"]["clusters"][0]
    assert route["hash_policy"] == [{"header": {"header_name": "x-loraplex-adapter"}}]
    assert "unavailable" in route["retry_policy"]["retry_on"].split(",")
    assert route["retry_policy"]["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert cluster["lb_policy"] == "RING_HASH" and route["cluster"] == cluster["name"]
    assert "grpc_health_check" in cluster["health_checks"][0]


@pytest.mark.parametrize("values, named", [
    ({"tls": {"enabled": True}}, "tls.secretName is required"),
    ({"sharedRegistry": {"enabled": True, "adapterVolume": {"claimName": "a"}}}, "sharedRegistry.url (or"),
    ({"sharedRegistry": {"enabled": True, "existingSecret": "db"}}, "sharedRegistry.adapterVolume.claimName is")])
def test_missing_required_values_are_named(tmp_path, values, named):
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = subprocess.run([helm(), "template", "lp", str(CHART), "-f", str(values_file)], capture_output=True,
                          text=True)
    assert done.returncode != 0 and named in done.stderr


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = path.read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def exec_form(arguments: str) -> list[str]:
    return yaml.safe_load(arguments)  # a JSON array is YAML too


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_install_with_the_setup_script_as_a_non_root_user(dockerfile):
    rows = dockerfile_instructions(DEPLOY / "docker" / dockerfile)
    kinds = [kind for kind, _ in rows]
    setup = [i for i, (kind, args) in enumerate(rows) if kind == "RUN" and "bash scripts/setup.sh" in args]
    assert len(setup) == 1, "the image installs through scripts/setup.sh, as the README does"
    user = [i for i, (kind, args) in enumerate(rows) if kind == "USER"]
    assert user and user[-1] < setup[0] and rows[user[-1]][1] not in ("root", "0")
    assert ("VOLUME", "/var/lib/loraplex") in rows and "HEALTHCHECK" in kinds
    health = exec_form(rows[kinds.index("HEALTHCHECK")][1].split("CMD", 1)[1])
    entrypoint = exec_form(rows[kinds.index("ENTRYPOINT")][1])
    command = exec_form(rows[kinds.index("CMD")][1])
    assert entrypoint == ["loraplex"] and health[0] == "loraplex"
    serve = serve_args(command)  # the real parser accepts the image's command
    check = serve_args(health[1:])
    assert serve.health_port == int(check.server.rsplit(":", 1)[1])
    assert serve.state_dir.startswith("/var/lib/loraplex")
    env = " ".join(args for kind, args in rows if kind == "RUN" and "setup.sh" in args)
    assert "LORAPLEX_TORCH=" + ("cuda" if dockerfile == "Dockerfile" else "cpu") in env


def test_compose_file_parses_and_its_references_resolve():
    from compose_spec import PyCompose

    text = (DEPLOY / "compose.yaml").read_text()
    PyCompose.from_yaml(text)  # the compose specification's types and keys
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert set(services) == {"loraplex", "prometheus", "grafana"}
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            assert dep in services, (name, dep)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
    server = services["loraplex"]
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    args = serve_args(server["command"])
    published = {int(p.split(":")[1]) for p in server["ports"]}
    assert {args.port, args.http_port} <= published
    # Prometheus runs in the server's network namespace: the shipped config's 127.0.0.1 target is the server
    assert services["prometheus"]["network_mode"] == "service:loraplex" and 9090 in published
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == [f"127.0.0.1:{args.metrics_port}"]
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://loraplex:9090"
    board = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "loraplex.yml").read_text())
    mounted = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert f"{board['providers'][0]['options']['path']}/loraplex.json" in mounted


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)


def test_shared_registry_with_versions_in_s3_mounts_no_volume(tmp_path):
    values = {"replicaCount": 2, "sharedRegistry": {"enabled": True, "url": "postgresql://lp@db/lp",
                                                    "s3": "s3://adapters/loraplex"}}
    server = by_kind(render(values, tmp_path))
    config = tomllib.loads(server["ConfigMap"]["data"]["loraplex.toml"])
    assert config["serve"]["shared-adapter-dir"] == "s3://adapters/loraplex"
    assert "shared-adapters" not in {v["name"] for v in server["Deployment"]["spec"]["template"]["spec"]["volumes"]}
