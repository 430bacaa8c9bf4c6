#!/usr/bin/env bash
# Training on a lent GPU against the CPU (after bench/gpu/check.sh built
# build/gpu): the tiny task as `make run` does it, and a So2Sat-shaped
# synthetic set with a reduced ViT on both devices, same seed and steps.
set -uo pipefail
OUT=${OUT:-build/gpu-logs}; mkdir -p "$OUT"
P=build/gpu/prism; D=build/gpu/data
$P synth --preset tiny --out $D/tiny --count 16384 --seed 1 > /dev/null
$P synth --preset so2sat --out $D/so2sat --count 16384 --seed 1 > /dev/null
SO2SAT="--set data.train=$D/so2sat/train-*.shard --set data.val=$D/so2sat/val-*.shard --set model.dim=96
  --set model.depth=4 --set model.heads=4 --set train.batch=128 --set train.steps=${SO2SAT_STEPS:-400}
  --set train.warmup_steps=40 --set train.epochs=0 --set train.eval_every=0 --set data.augment=none"
# The CPU half runs beside the GPU work, on most of the machine's cores.
( OMP_NUM_THREADS=12 $P train --config configs/so2sat_moevit_k2.json --device cpu $SO2SAT --out $D/so2sat-cpu \
    > "$OUT/so2sat-cpu.log" 2>&1 ) &
cpu_job=$!
echo "== tiny moevit on the GPU (make run's config)"
$P train --config configs/synth_tiny_moevit.json --device cuda --set data.train="$D/tiny/train-*.shard" \
  --set data.val="$D/tiny/val-*.shard" --out $D/tiny-gpu 2>&1 | tee "$OUT/tiny-gpu.log" | grep -vE "^step|\r" | tail -6
$P eval --checkpoint $D/tiny-gpu/model.safetensors --data "$D/tiny/val-*.shard" --device cuda
for arch in vit chvit; do
  $P train --config configs/synth_tiny_$arch.json --device cuda --set data.train="$D/tiny/train-*.shard" \
    --set data.val="$D/tiny/val-*.shard" 2>&1 | tail -1
done
echo "== so2sat-shaped moevit (D=96, depth 4) on the GPU; the same on the CPU beside it"
$P train --config configs/so2sat_moevit_k2.json --device cuda $SO2SAT --out $D/so2sat-gpu 2>&1 \
  | tee "$OUT/so2sat-gpu.log" | tail -1
wait $cpu_job; tail -1 "$OUT/so2sat-cpu.log"
echo "== full-size configs, 30 steps each on the GPU (timing preview, fp32; So2Sat batch 256, JUMP-CP 32)"
for c in so2sat_chvit so2sat_moevit_k2 jumpcp_chvit jumpcp_moevit_k2; do
  case $c in so2sat*) batch=256;; *) batch=32;; esac
  case $c in so2sat*) data=$D/so2sat;; *) data=$D/jumpcp;; esac
  [ -d $D/jumpcp ] || $P synth --preset jumpcp --out $D/jumpcp --count 2048 --seed 1 > /dev/null
  $P train --config configs/$c.json --device cuda --set data.train="$data/train-*.shard" --set data.val= \
    --set train.steps=30 --set train.epochs=0 --set train.warmup_steps=5 --set train.batch=$batch 2>&1 | tail -1
done
