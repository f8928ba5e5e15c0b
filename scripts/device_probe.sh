#!/usr/bin/env bash
# On the GPU machine: a short NF4 sweep (PROBE_SHAPES/MS/STAGES), Nsight Compute with source-level and memory
# tables on one NF4 config (PROBE_NCU), and the decode / prefill profiles of the 8B shape. Logs to $OUT.
source scripts/device_env.sh
export TRITON_CACHE_DIR=/tmp/triton_cache
if [ -n "${PROBE_SHAPES}" ]; then
  timeout ${PROBE_SWEEP_S:-170} python3 benchmarks/nf4_sweep.py --out "$OUT" --ms ${PROBE_MS:-1,32} \
    --shapes $PROBE_SHAPES --stages ${PROBE_STAGES:-1,2} > "$OUT/sweep.log" 2>&1
  echo "rc=$? sweep"; grep -v "^  " "$OUT/sweep.log"
fi
if [ -n "${PROBE_NCU}" ]; then
  timeout ${PROBE_NCU_S:-100} ncu --clock-control none -k regex:'gemm_kernel|gemv_kernel|lut_kernel' --launch-skip 2 \
    --launch-count 1 --import-source no --section SpeedOfLight --section MemoryWorkloadAnalysis_Tables \
    --section SourceCounters --section InstructionStats --section WarpStateStats \
    python3 benchmarks/nf4_sweep.py --ncu "$PROBE_NCU" > "$OUT/ncu_detail.txt" 2>&1
  echo "rc=$? ncu"
  grep -i -E "conflict|wavefront|excessive|Shared|L1/TEX|Stall|uncoalesced|sectors|Duration|Executed Instructions|stall" "$OUT/ncu_detail.txt" | cut -c1-200 | head -60
fi
if [ -n "${PROBE_DECODE}" ]; then
  timeout ${PROBE_DECODE_S:-150} python3 benchmarks/profile_decode.py --batch 32 --modes distinct --profile \
    > "$OUT/profile_decode.log" 2>&1
  echo "rc=$? profile_decode"; grep -v "^\s*$" "$OUT/profile_decode.log" | grep -v -i warn | tail -52 | cut -c1-170
fi
if [ -n "${PROBE_TTFT}" ]; then
  timeout ${PROBE_TTFT_S:-120} python3 benchmarks/profile_decode.py --ttft --modes base > "$OUT/ttft.log" 2>&1
  echo "rc=$? ttft"; grep -v "^\s*$" "$OUT/ttft.log" | grep -v -i warn | tail -36 | cut -c1-170
fi
