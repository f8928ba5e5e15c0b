#!/usr/bin/env bash
# On the GPU machine: GPU tests (CHECK_TESTS, pytest args) and, with CHECK_SERVE set, `loraplex bench serve` on
# the 8B shape (CHECK_SERVE: extra args). Logs and the bench JSON go to $OUT; each part is time-boxed.
source scripts/device_env.sh
export TRITON_CACHE_DIR=/tmp/triton_cache
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
if [ -n "$CHECK_TESTS" ]; then
  # eval: CHECK_TESTS may quote its own arguments (-k 'not embedded')
  eval timeout ${CHECK_TESTS_S:-200} python3 -m pytest -m gpu -q -p no:cacheprovider $CHECK_TESTS > "$OUT/gpu_tests.log" 2>&1
  echo "rc=$? gpu tests"; grep -E "passed|failed|error|Error|FAIL" "$OUT/gpu_tests.log" | tail -15
fi
if [ -n "$CHECK_SERVE" ]; then
  timeout ${CHECK_SERVE_S:-300} python3 -m loraplex.server.cli bench serve --out "$OUT" $CHECK_SERVE > "$OUT/serve.log" 2>&1
  echo "rc=$? serve"; grep -v -i warn "$OUT/serve.log" | tail -30 | cut -c1-200
fi
