#!/usr/bin/env bash
# A whole GPU lease in two calls, what the open issues need most first. A
# lease is 15 minutes of device time with the machine's start (a minute or
# two), so the two calls get about 6.5 minutes each (BUDGET), run back to back
# while the machine is warm:
#   bash bench/gpu/packed.sh lease.sh check   issue 4 (and 6's world of one):
#       every GPU test (Cuda*, Bench*, Nccl*), training on the GPU beside the
#       CPU's committed results (bench/gpu/train_check.sh gpu), then
#       compute-sanitizer memcheck and racecheck on small-shape tests
#   bash bench/gpu/packed.sh lease.sh bench   issue 5: prism bench attention at
#       the three shapes, prism bench step on four configs, and the PyTorch peer
#       of both, each part cut to what is left of BUDGET
# BUDGET (seconds) must fit the device time left: status's budget_left_s, less
# the machine's start for the first call and a minute for the transfers. Under
# packed.sh the logs are packed after every part, so a call cut off early
# still brings back what it did.
# Here, before the lease: bash bench/gpu/bundle.sh (the binaries, so no call
# spends a minute building), then carry build/gpu-bundle/bin and
# build/third_party. Logs go to $OUT; packed.sh packs them into one file.
# The scripts beside this one go deeper into each part in later leases.
set -uo pipefail
PHASE=${1:-}
OUT=${OUT:-build/gpu-logs}; mkdir -p "$OUT"
BUDGET=${BUDGET:-390}; START=$(date +%s)
B=build/gpu
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
part() {  # NAME CAP COMMAND...: COMMAND under min(CAP, what is left), its output in $OUT/NAME.txt
  local name=$1 cap=$2; shift 2
  local l; l=$(left); [ "$l" -lt 15 ] && { echo "== $name: skipped (budget)"; return; }
  [ "$l" -lt "$cap" ] && cap=$l
  echo "== $name (t=$(( $(date +%s) - START )) s, cap ${cap} s)"
  timeout "$cap" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  grep -v $'\r' "$OUT/$name.txt" | grep -vE '^\{|^bench step: ' | grep -E "${KEEP:-.}" | tail -n "${TAIL:-12}"
  echo "rc $rc$([ $rc = 124 ] && echo ' (timed out)')$([ $rc = 127 ] && echo " ($1: not found)")"
  [ -n "${PACK:-}" ] && tar czf "$PACK" -C "$(dirname "$OUT")" "$(basename "$OUT")"
}

case $PHASE in
check|bench) ;;
*) echo "usage: bash bench/gpu/lease.sh check|bench"; exit 2 ;;
esac
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
nvcc --version | grep -o "release [0-9.]*"; python3 -c "import torch; print('torch', torch.__version__)"
source bench/gpu/binaries.sh; gpu_binaries "$OUT" || exit 1

if [ "$PHASE" = check ]; then
  TESTS_KEEP="^\[ +(FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|on the GPU|\[ nccl \]"
  KEEP="$TESTS_KEEP|cuda-vs-cpu.*(gradients|weights|loss)" TAIL=60 part tests 200 $B/prism_tests --gtest_filter='Cuda*:Bench*:Nccl*'
  TAIL=20 part training 90 env OUT="$OUT" bash bench/gpu/train_check.sh gpu
  # The new kernels at small shapes (flash, routed plan), and a whole model's
  # kernels (two short training runs); cuBLAS's nvjet kernels are left out of
  # racecheck, which flags their warp-specialized shared-memory pipelines.
  SAN='CudaFlash.DenseSmall:CudaFlash.RoutedSmall:CudaModel.TwoRuns*'
  KEEP="ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid|PASSED|FAILED" TAIL=8 \
    part memcheck 80 compute-sanitizer --tool memcheck --error-exitcode 9 $B/prism_tests --gtest_filter="$SAN"
  KEEP="ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid|PASSED|FAILED" TAIL=8 \
    part racecheck 90 compute-sanitizer --tool racecheck --kernel-name-exclude kns=nvjet --error-exitcode 9 \
    $B/prism_tests --gtest_filter="${SAN%:*}"
else
  A="--iters 20 --warmup 3"
  TAIL=14 part prism-attn-jumpcp-p16 35 $B/prism bench attention --config configs/jumpcp_chvit.json $A
  TAIL=14 part prism-attn-jumpcp-p8 45 $B/prism bench attention --config configs/jumpcp_chvit.json \
    --set model.patch=8 $A
  TAIL=14 part prism-attn-so2sat 25 $B/prism bench attention --config configs/so2sat_chvit.json $A
  for c in so2sat_chvit so2sat_moevit_k2 jumpcp_chvit jumpcp_moevit_k2; do
    case $c in so2sat*) b=256;; *) b=32;; esac
    TAIL=3 part prism-step-$c 25 $B/prism bench step --config configs/$c.json --device cuda --batch $b \
      --iters 8 --warmup 2
  done
  for c in jumpcp_moevit_k2 jumpcp_chvit so2sat_moevit_k2 so2sat_chvit; do
    case $c in so2sat*) b=256;; *) b=32;; esac
    TAIL=4 part torch-step-$c 30 python3 bench/torch_peer.py --mode step --dtype bf16 --config configs/$c.json \
      --batch $b --iters 8 --warmup 2
  done
  TAIL=30 part torch-attn-jumpcp-p16 60 python3 bench/torch_peer.py --mode attention --dtype bf16 \
    --impl padded,naive --config configs/jumpcp_chvit.json $A
  echo "== JSON lines"; cat "$OUT"/prism-step-*.txt | grep '^{'
fi
echo "== $PHASE done in $(( $(date +%s) - START )) s"
