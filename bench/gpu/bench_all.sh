#!/usr/bin/env bash
# One call's worth of wall-clock numbers on a lent GPU: prism bench attention
# at the three shapes, prism bench step on four configs, and the PyTorch peer
# (bench/torch_peer.py) on the same shapes and batches. Each part has its own
# time limit and parts are skipped once BUDGET seconds have passed, so the
# call ends inside the device's 10-minute limit. Logs go to $OUT.
# Usage: bash bench/gpu/bench_all.sh
#   (carry build/gpu-bundle/bin from bench/gpu/bundle.sh, and build/third_party)
set -uo pipefail
OUT=${OUT:-build/gpu-logs}; mkdir -p "$OUT"
BUDGET=${BUDGET:-480}; START=$(date +%s)
P=build/gpu/prism
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
part() {  # part NAME LIMIT COMMAND...: runs COMMAND under min(LIMIT, time left), log in $OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  local l=$(left); [ "$l" -lt 20 ] && { echo "== $name: skipped (budget)"; return; }
  [ "$l" -lt "$limit" ] && limit=$l
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  grep -v $'\r' "$OUT/$name.txt" | grep -vE '^\{|^bench step: ' | tail -${TAIL:-12}; echo "rc $rc"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
source bench/gpu/binaries.sh; gpu_binaries "$OUT" || exit 1
A="--iters ${ITERS:-20} --warmup ${WARMUP:-3}"
part prism-attn-jumpcp-p16 100 $P bench attention --config configs/jumpcp_chvit.json $A
part prism-attn-jumpcp-p8 100 $P bench attention --config configs/jumpcp_chvit.json --set model.patch=8 $A
part prism-attn-so2sat 60 $P bench attention --config configs/so2sat_chvit.json $A
TAIL=3
# Stored pixels of the data sets' types through the model's input step, as
# prism train passes them on CUDA (data.device_input); before 2026-12-07 the
# step uploaded normalized float32 images.
for c in so2sat_chvit so2sat_moevit_k2 jumpcp_chvit jumpcp_moevit_k2; do
  case $c in so2sat*) b=256 px=float16;; *) b=32 px=uint8;; esac
  part prism-step-$c 60 $P bench step --config configs/$c.json --device cuda --batch $b --iters 8 --warmup 2 --pixels $px
done
TAIL=30
part torch-attn-bf16 120 python3 bench/torch_peer.py --mode attention --dtype bf16 --impl padded,naive $A
part torch-attn-fp32 90 python3 bench/torch_peer.py --mode attention --dtype fp32 --impl padded,naive $A
TAIL=4
for c in so2sat_chvit so2sat_moevit_k2 jumpcp_chvit jumpcp_moevit_k2; do
  case $c in so2sat*) b=256;; *) b=32;; esac
  part torch-step-$c 45 python3 bench/torch_peer.py --mode step --dtype bf16 --config configs/$c.json --batch $b --iters 8 --warmup 2
done
echo "== JSON lines"; cat "$OUT"/prism-step-*.txt | grep '^{' ; echo "total $(( $(date +%s) - START )) s"
