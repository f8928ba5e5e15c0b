#!/usr/bin/env bash
# On the GPU machine: every kernel family's device check (correctness against the twins, timings), NF4
# tuning (writes $OUT/<GPU>.json), then the kernels' GPU tests; logs to $OUT. Each part is time-boxed.
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? $name"; tail -n "${TAIL:-25}" "$OUT/$name.log"; }
TAIL=60 run nf4_check ${NF4_LIMIT:-300} python3 benchmarks/nf4_device_check.py --out "$OUT" --tune-budget-s ${TUNE_S:-70}
TAIL=60 run lora_check ${LORA_LIMIT:-150} python3 benchmarks/lora_device_check.py --groups
if [ -n "$ATTN" ]; then run attn_check 120 python3 benchmarks/attention_device_check.py --quick; fi
TAIL=15 run gpu_tests ${TESTS_LIMIT:-120} python3 -m pytest -m gpu -q -p no:cacheprovider tests/lora/test_gpu.py tests/attention/test_gpu.py tests/nf4/test_gpu.py
