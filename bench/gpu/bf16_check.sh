#!/usr/bin/env bash
# The bf16 mode on a lent GPU: every GPU test (the op, model and bench tests),
# then prism bench step with the configs' own precision (bf16) on four
# configs, and the PyTorch peer's JUMP-CP P=16 attention rows. Parts are
# skipped once BUDGET seconds have passed. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-build/gpu-logs}; mkdir -p "$OUT"
BUDGET=${BUDGET:-270}; START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
P=build/gpu/prism
source bench/gpu/binaries.sh; gpu_binaries "$OUT" || exit 1
echo "== GPU tests"
timeout 150 build/gpu/prism_tests --gtest_filter='CudaOps*:CudaModel*:Bench*' > "$OUT/tests.log" 2>&1; echo "rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED) |Failure|Expected|bf16-vs-cpu|bf16 on the GPU|on the GPU:|which is" "$OUT/tests.log" | tail -40
echo "== prism bench step, bf16 matmuls"
for c in so2sat_chvit so2sat_moevit_k2 jumpcp_chvit jumpcp_moevit_k2; do
  [ "$(left)" -lt 25 ] && { echo "$c: skipped (budget)"; continue; }
  case $c in so2sat*) b=256;; *) b=32;; esac
  timeout 40 $P bench step --config configs/$c.json --device cuda --batch $b --iters 8 --warmup 2 2>&1 | grep '^{'
done
if [ "$(left)" -gt 30 ]; then
  echo "== torch_peer attention bf16, JUMP-CP P=16"
  timeout $(( $(left) - 5 )) python3 bench/torch_peer.py --mode attention --dtype bf16 --impl padded,naive \
    --config configs/jumpcp_chvit.json --iters 20 --warmup 3 2>&1 | grep -vE "^attention:" | tail -12
fi
echo "total $(( $(date +%s) - START )) s"
