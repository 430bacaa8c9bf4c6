#!/usr/bin/env bash
# The GPU ranks (engine/nccl.h) on a lent GPU machine, in one call: build with
# NCCL, run the NCCL tests and the CUDA load-balance tests, then train the
# full-size So2Sat MoE-ViT for a few steps on every GPU with train.overlap_comm
# on and off and print the step phases (what overlap hides needs two GPUs or
# more: with one rank the all-reduce is a copy). Logs go to $OUT.
# Usage: bash bench/gpu/nccl_check.sh [gtest filter]
#   (carry build/gpu-bundle/bin from bench/gpu/bundle.sh, and build/third_party)
set -uo pipefail
OUT=${OUT:-build/gpu-logs}; mkdir -p "$OUT"
FILTER=${1:-Nccl*:CudaOps.AuxStats*:CudaOps.AuxAndZLoss:CudaModel*}
BUILD=build/gpu
source bench/gpu/binaries.sh; gpu_libs
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "== machine"; nvidia-smi -L
echo "NCCL_HOME: ${NCCL_DIR:-none}; mpicxx: $(command -v mpicxx || echo none); mpirun: $(command -v mpirun || echo none)"

echo "== binaries"
# The carried binaries have no MPI: where this machine has mpicxx, build here so mpirun runs the NCCL path.
command -v mpicxx > /dev/null && export PRISM_GPU_BUILD=1
gpu_binaries "$OUT" || exit 1
ldd $BUILD/prism | grep -q nccl && echo "built with NCCL" || echo "built WITHOUT NCCL"
ldd $BUILD/prism | grep -E "nccl|libmpi|not found"

echo "== tests ($FILTER)"
$BUILD/prism_tests --gtest_filter="$FILTER" > "$OUT/nccl-tests.log" 2>&1; echo "rc $?"
grep -E "^\[ +(FAILED|PASSED|SKIPPED|OK) |Failure|\[ nccl \]|aux_stats|all ranks|dead rank" "$OUT/nccl-tests.log" | tail -80

command -v mpirun > /dev/null || { echo "== no mpirun: the step-phase runs need it"; exit 0; }
echo "== step phases: So2Sat moevit k=2 (ViT-S, batch 256, bf16), 60 steps on every GPU, overlap on and off"
GPUS=$(nvidia-smi -L | wc -l)
D=$BUILD/nccl-data
[ -d $D ] || $BUILD/prism synth --preset so2sat --out $D --count 16384 --seed 1 > /dev/null
for overlap in true false; do
  rm -rf $D/run-$overlap  # prism train refuses an --out that holds a run
  timeout 300 mpirun --oversubscribe -np $GPUS $BUILD/prism train --config configs/so2sat_moevit_k2.json \
    --device cuda --set data.train="$D/train-*.shard" --set data.val= --set train.steps=60 --set train.epochs=0 \
    --set train.warmup_steps=5 --set train.log_every=20 --set train.overlap_comm=$overlap --out $D/run-$overlap \
    > "$OUT/nccl-step-overlap-$overlap.log" 2>&1; echo "overlap_comm=$overlap: rc $?"
  grep -E "^comm:|step phases|identical|\"ranks\"" "$OUT/nccl-step-overlap-$overlap.log"
done
