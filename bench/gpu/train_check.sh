#!/usr/bin/env bash
# Training on the GPU against the CPU (issue 4: the tiny task and a
# So2Sat-shaped run train on CUDA to the accuracy they reach on the CPU).
#   bash bench/gpu/train_check.sh gpu   on a lent GPU machine: the tiny task as
#       `make run` trains it (moevit, then vit and chvit), and the So2Sat-shaped
#       runs below in fp32 and in bf16, each printed beside the CPU's result.
#   bash bench/gpu/train_check.sh cpu   here, off the lease: the So2Sat-shaped
#       runs on the CPU, whose logs go to bench/results/cpu-reference/ (about
#       30 and 60 minutes on one core; the CPU's results do not depend on the
#       thread count, so they are made once and committed).
# So2Sat-shaped: `prism synth --preset so2sat --count 16384 --seed 1`, MoE-ViT
# k=2 of depth 4, batch 128, 400 steps, the same seed on both devices, at
# D=96 with 4 heads (head dim 24: the fused fp32 attention kernels) and D=128
# with 2 heads (head dim 64: the flash kernels in the bf16 mode).
# Logs go to $OUT (or build/gpu-logs).
set -uo pipefail
MODE=${1:-gpu}
OUT=${OUT:-build/gpu-logs}; mkdir -p "$OUT"
REF=bench/results/cpu-reference
case $MODE in
  gpu) P=build/gpu/prism; D=build/gpu/data
       source bench/gpu/binaries.sh; gpu_binaries "$OUT" || exit 1 ;;
  cpu) P=build/prism; D=build/cpu-reference-data; mkdir -p $REF
       [ -x $P ] || { echo "no $P: make build first"; exit 1; } ;;
  *) echo "usage: bash bench/gpu/train_check.sh gpu|cpu"; exit 2 ;;
esac
so2sat_flags() {  # DIM HEADS
  echo "--config configs/so2sat_moevit_k2.json --set data.train=$D/so2sat/train-*.shard
    --set data.val=$D/so2sat/val-*.shard --set model.dim=$1 --set model.depth=4 --set model.heads=$2
    --set train.batch=128 --set train.steps=400 --set train.warmup_steps=40 --set train.epochs=0
    --set train.eval_every=0 --set data.augment=none"
}
SHAPES=${SHAPES:-"96:4 128:2"}  # DIM:HEADS of each So2Sat-shaped run
set -f  # the shard patterns in the flags are prism's to expand
[ -d $D/so2sat ] || $P synth --preset so2sat --out $D/so2sat --count 16384 --seed 1 > /dev/null || exit 1

if [ $MODE = cpu ]; then
  for s in $SHAPES; do
    echo "== So2Sat-shaped moevit D=${s%:*}, ${s#*:} heads, on the CPU"
    rm -rf $D/cpu-d${s%:*}  # prism train refuses an --out that holds a run
    $P train $(so2sat_flags ${s%:*} ${s#*:}) --device cpu --out $D/cpu-d${s%:*} > $REF/so2sat-d${s%:*}.log 2>&1
    echo "rc $?"; tail -n 1 $REF/so2sat-d${s%:*}.log
  done
  exit 0
fi

# result LOG: "val acc A, val loss L (S s)" from the run's last line (its JSON summary)
result() { python3 -c 'import json,sys
try: r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception: sys.exit("no result in " + sys.argv[1])
if r.get("val_accuracy") is None: sys.exit("no evaluation in " + sys.argv[1])
print("val acc %.4f, val loss %.5f (%.1f s)" % (r["val_accuracy"], r["val_loss"], r["seconds"]))' "$1"; }

$P synth --preset tiny --out $D/tiny --count 16384 --seed 1 > /dev/null
TINY="--set data.train=$D/tiny/train-*.shard --set data.val=$D/tiny/val-*.shard"
echo "== tiny moevit on the GPU (make run's config)"
rm -rf $D/tiny-gpu  # prism train refuses an --out that holds a run
$P train --config configs/synth_tiny_moevit.json --device cuda $TINY --out $D/tiny-gpu > "$OUT/tiny-gpu.log" 2>&1
echo "rc $?: $(result "$OUT/tiny-gpu.log")"
echo "eval on the GPU: $($P eval --checkpoint $D/tiny-gpu/model.safetensors --data "$D/tiny/val-*.shard" \
  --device cuda 2>&1 | tail -n 1)"
for arch in vit chvit; do
  $P train --config configs/synth_tiny_$arch.json --device cuda $TINY > "$OUT/tiny-gpu-$arch.log" 2>&1
  echo "$arch: rc $?: $(result "$OUT/tiny-gpu-$arch.log")"
done
for s in $SHAPES; do
  echo "== So2Sat-shaped moevit D=${s%:*}, ${s#*:} heads"
  echo "CPU (fp32, $REF/so2sat-d${s%:*}.log): $(result $REF/so2sat-d${s%:*}.log)"
  for precision in fp32 bf16; do
    log="$OUT/so2sat-d${s%:*}-gpu-$precision.log"
    rm -rf $D/gpu-d${s%:*}-$precision
    $P train $(so2sat_flags ${s%:*} ${s#*:}) --device cuda --set train.precision=$precision \
      --out $D/gpu-d${s%:*}-$precision > "$log" 2>&1
    echo "GPU $precision: rc $?: $(result "$log")"
  done
done
