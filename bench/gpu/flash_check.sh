#!/usr/bin/env bash
# The fused attention kernels on a lent GPU machine, in one call under 8
# minutes: the binaries (carried or built), the GPU tests (CudaFlash*: every
# flash op against the CPU reference; CudaOps.*Attention: the fp32 ones),
# compute-sanitizer memcheck
# and racecheck on the small-shape flash tests, then `prism bench attention`
# with the reference (the fused fp32 kernels of attention.cu) and the flash
# kernels at JUMP-CP P=16, P=8 and So2Sat. Each part has its own timeout, and
# no part may run past the overall deadline (BUDGET seconds from the start).
# Logs go to $OUT (or build/gpu-logs).
# Usage: bash bench/gpu/flash_check.sh
#   (carry build/gpu-bundle/bin from bench/gpu/bundle.sh, and build/third_party)
#   ITERS=10 WARMUP=2 BUDGET=470 SAN_FILTER='CudaFlash.DenseSmall:CudaFlash.RoutedSmall' ITEM_TILES='4 15'
set -uo pipefail
OUT=${OUT:-build/gpu-logs}; mkdir -p "$OUT"
BUILD=build/gpu
ITERS=${ITERS:-10}; WARMUP=${WARMUP:-2}
BUDGET=${BUDGET:-470}
SAN_FILTER=${SAN_FILTER:-CudaFlash.DenseSmall:CudaFlash.RoutedSmall:CudaFlash.RejectsOtherHeadDims}
start=$(date +%s)
# limit CAP: the part's own cap, cut to what is left of the budget (at least 1 s)
limit() { local left=$(( BUDGET - ($(date +%s) - start) )); [ "$left" -lt 1 ] && left=1
          [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
stamp() { echo "== $1 (t=$(( $(date +%s) - start )) s)"; }

stamp machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
nvcc --version | tail -1

stamp binaries
source bench/gpu/binaries.sh; gpu_binaries "$OUT" || exit 1
echo "ready at t=$(( $(date +%s) - start )) s"
# registers and spills of the attention kernels (flash and fused fp32) as these binaries hold them
cuobjdump --dump-resource-usage $BUILD/prism_tests 2>/dev/null | grep -E "Function|REG" | paste - - \
  | grep -E "_ZN5prism5(flash|fused)" | sed 's/_ZN5prism5\(flash\|fused\)//; s/  */ /g' > "$OUT/flash-resources.txt"
cat "$OUT/flash-resources.txt"

stamp "GPU tests (CudaFlash*, CudaOps.*Attention: the fused fp32 kernels)"
timeout "$(limit 120)" $BUILD/prism_tests --gtest_filter='CudaFlash*:CudaOps.*Attention' > "$OUT/tests.log" 2>&1; echo "rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED|OK) |Failure|cuda-vs-cpu" "$OUT/tests.log" | tail -80

for tool in memcheck racecheck; do
  stamp "compute-sanitizer $tool ($SAN_FILTER)"
  extra=""; cap=50; [ $tool = racecheck ] && { extra="--kernel-name-exclude kns=nvjet"; cap=70; }
  timeout "$(limit $cap)" compute-sanitizer --tool $tool $extra --error-exitcode 9 $BUILD/prism_tests \
    --gtest_filter="$SAN_FILTER" > "$OUT/sanitizer-$tool.log" 2>&1; echo "rc $? (124: timed out)"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid|PASSED|FAILED" "$OUT/sanitizer-$tool.log" | head -8
done

# fp32 (reference kernels) then the bf16 mode (flash kernels) at each shape; the same default batch for both
bench() {  # name, cap, config args...
  local name=$1 cap=$2; shift 2
  for impl in reference bf16; do
    stamp "bench attention $name --impl $impl"
    timeout "$(limit $cap)" $BUILD/prism bench attention "$@" --impl $impl --iters $ITERS --warmup $WARMUP \
      > "$OUT/bench-$name-$impl.txt" 2>&1; echo "rc $?"
    grep -vE '^\{' "$OUT/bench-$name-$impl.txt" | tail -7
  done
}
bench jumpcp-p16 25 --config configs/jumpcp_chvit.json
bench jumpcp-p8 30 --config configs/jumpcp_chvit.json --set model.patch=8
bench so2sat 15 --config configs/so2sat_chvit.json
# The routed kernels' item size (kMaxItemTiles = 8 above) against 4 and 15, moevit k=2 at P=16, if time is left.
for tiles in ${ITEM_TILES:-4 15}; do
  stamp "bench attention jumpcp-p16 --k 2, PRISM_ROUTED_ITEM_TILES=$tiles"
  PRISM_ROUTED_ITEM_TILES=$tiles timeout "$(limit 15)" $BUILD/prism bench attention --config configs/jumpcp_chvit.json \
    --k 2 --impl bf16 --iters $ITERS --warmup $WARMUP > "$OUT/bench-jumpcp-p16-items$tiles.txt" 2>&1; echo "rc $?"
  grep -vE '^\{' "$OUT/bench-jumpcp-p16-items$tiles.txt" | tail -4
done
stamp done
