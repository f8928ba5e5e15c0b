#!/usr/bin/env bash
# On the GPU machine: the wide NF4 config sweep (benchmarks/nf4_sweep.py) and Nsight Compute on the committed
# configs of the gate/up projection at M=1 and M=32 (and SWEEP_NCU extra specs, ';'-separated). Logs to $OUT.
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
export TRITON_CACHE_DIR=/tmp/triton_cache
timeout ${SWEEP_LIMIT:-420} python3 benchmarks/nf4_sweep.py --out "$OUT" --ms ${SWEEP_MS:-1,8,32} \
  --shapes ${SWEEP_SHAPES:-gate_up,qkv,o,down} 2>&1 | tee "$OUT/sweep.log" | grep -v "^  "
echo "rc=$? sweep"
if [ -n "$LORA_SWEEP" ]; then
  timeout ${LORA_LIMIT:-150} python3 benchmarks/lora_device_check.py --pools r16 --sweep \
    --scenarios ${LORA_SCEN:-b1,b8_shared,b32_distinct} > "$OUT/lora_sweep.log" 2>&1
  echo "rc=$? lora sweep"; grep -v "^ *$" "$OUT/lora_sweep.log" | tail -60
fi
NCU_SPECS=${NCU_SPECS:-'gate_up:32:{"kernel":"gemm","block_m":32,"block_n":128,"block_k":128,"split_k":2,"swap_ab":true,"num_warps":4,"num_stages":3};gate_up:1:{"kernel":"gemv","block_m":1,"block_n":16,"block_k":512,"split_k":1,"num_warps":4,"num_stages":2}'}
i=0
IFS=';' read -ra specs <<< "$NCU_SPECS"
for spec in "${specs[@]}"; do
  i=$((i+1))
  timeout 120 ncu --clock-control none -k regex:'gemm_kernel|gemv_kernel' --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SchedulerStats --section ComputeWorkloadAnalysis \
    python3 benchmarks/nf4_sweep.py --ncu "$spec" > "$OUT/ncu_$i.txt" 2>&1
  echo "rc=$? ncu $i $spec"
  grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Issued Ipc|No Eligible|Stall|Dynamic Shared|Static Shared|Waves Per SM|Grid Size|L1/TEX Hit|L2 Hit|Warp Cycles Per Issued" "$OUT/ncu_$i.txt" | head -40
done
