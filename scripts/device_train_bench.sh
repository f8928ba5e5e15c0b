#!/usr/bin/env bash
# On the GPU machine: `loraplex bench train` on the 8B shape (random weights), ours beside PEFT + TRL SFTTrainer,
# packed and full-row cases in ONE run (JSON to $OUT), then the GPU tests of the training speed-ups; a short
# table at the end. About 7-8 minutes on an H200 with the defaults (STEPS=8 measured + WARMUP=3 per side and case;
# each side also builds and quantizes the 8B model, ~30 s).
#
# Carry these pure-Python wheels in .whl/ (trl and liger-kernel are not on the GPU image; trl needs datasets,
# which needs dill and multiprocess; pyarrow, pandas, fsspec and xxhash are on the image):
#   pip download --no-deps -d .whl trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1
#   pip download --no-deps -d .whl --python-version 3.12 --only-binary=:all: multiprocess==0.70.19
# plus .whl/site (bitsandbytes, as for the other device scripts).
#
# Knobs (environment): STEPS, WARMUP, BATCH (rows of SEQ per step), SEQ, CKPT (ours: checkpoint only the first N
# layers; default all, like the peer), PEER_ATTN (TRL on packed rows, comma-separated: sdpa,flex_attention; the faster counts), LEVERS=1 (then ours again with Liger off
# and with sdpa attention, to attribute the gain; separate JSONs), BENCH_LIMIT (seconds).
source scripts/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
python3 -c "import trl, liger_kernel, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)" \
  || { echo "trl / liger-kernel / datasets missing: carry the wheels listed at the top of this script"; exit 1; }
BENCH=(python3 -c "import sys; from loraplex.server.cli import main; sys.exit(main(['bench', 'train'] + sys.argv[1:]))"
       --model benchmarks/shapes/llama-3.1-8b --seq-len "${SEQ:-1024}" --batch-size "${BATCH:-4}"
       --steps "${STEPS:-8}" --warmup-steps "${WARMUP:-3}" --num-examples 512 --out "$OUT")
CKPT_ARGS=()
if [ -n "$CKPT" ]; then CKPT_ARGS=(--checkpoint-layers "$CKPT"); fi
echo "== bench train: loraplex beside trl, packed and full rows"
timeout "${BENCH_LIMIT:-420}" "${BENCH[@]}" --impls loraplex,trl --peer-attention "${PEER_ATTN:-sdpa,flex_attention}" \
  "${CKPT_ARGS[@]}" 2>&1 | tee "$OUT/bench_train.log" | grep -E "^(packed|full|case|wrote)|Error|error" | tail -n 30
echo "rc=${PIPESTATUS[0]} bench_train"
if [ -n "$LEVERS" ]; then
  for lever in "--liger off" "--attention sdpa"; do
    echo "== ours with $lever (packed)"
    timeout 150 "${BENCH[@]}" --impls loraplex --cases packed $lever "${CKPT_ARGS[@]}" 2>&1 \
      | grep -E "^(packed|wrote)|Error" | tail -n 3
  done
fi
echo "== GPU tests of the training speed-ups"
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/training/test_speedups_gpu.py 2>&1 | tail -n 15
