#!/usr/bin/env bash
# One call on a lent GPU machine (no package registry there): look at what the
# machine has, take the carried binaries or build them there, run the GPU
# tests, then the same tests under compute-sanitizer. Logs go to $OUT (or
# build/gpu-logs).
# Usage: bash bench/gpu/check.sh [gtest filter]
#   (carry build/gpu-bundle/bin from bench/gpu/bundle.sh, and build/third_party)
set -uo pipefail
OUT=${OUT:-build/gpu-logs}; mkdir -p "$OUT"
FILTER=${1:-CudaOps*}
BUILD=build/gpu
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
nvcc --version | tail -1; g++ --version | head -1
python3 -c "import torch; print('torch', torch.__version__)"
NV=$(python3 -c "import nvidia; print(nvidia.__path__[0])" 2>/dev/null); echo "pip nvidia: $NV"; ls "$NV" 2>/dev/null | tr '\n' ' '; echo
for lib in libcublas.so libcublasLt.so libnccl.so; do
  echo "$lib: $(find /usr/local/cuda* "$NV" -name "$lib*" 2>/dev/null | head -3 | tr '\n' ' ')"; done
echo "nccl.h: $(find /usr/local/cuda* "$NV" /usr/include -name nccl.h 2>/dev/null | head -2 | tr '\n' ' ')"
echo "mpicxx: $(command -v mpicxx || echo none); compute-sanitizer: $(command -v compute-sanitizer || echo none)"

echo "== binaries"
source bench/gpu/binaries.sh; gpu_binaries "$OUT" || exit 1
ldd $BUILD/prism_tests | grep -E "cublas|nccl|cudart|not found"

echo "== GPU tests ($FILTER)"
$BUILD/prism_tests --gtest_filter="$FILTER" > "$OUT/tests.log" 2>&1; echo "rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED|OK) |Failure|cuda-vs-cpu.*(gradients|weights|loss)|on the GPU" "$OUT/tests.log" | tail -60
# The sanitizers run the small-shape tests (SAN_FILTER); cuBLAS's own GEMM
# kernels (nvjet) are left out of racecheck, which flags their warp-specialized
# shared-memory pipelines.
SAN_FILTER=${SAN_FILTER:-$FILTER}
for tool in memcheck racecheck; do
  echo "== compute-sanitizer $tool ($SAN_FILTER)"
  extra=""; [ $tool = racecheck ] && extra="--kernel-name-exclude kns=nvjet"
  timeout ${SAN_TIMEOUT:-110} compute-sanitizer --tool $tool $extra --error-exitcode 9 $BUILD/prism_tests \
    --gtest_filter="$SAN_FILTER" > "$OUT/sanitizer-$tool.log" 2>&1; echo "rc $?"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$OUT/sanitizer-$tool.log" | tail -4
done
