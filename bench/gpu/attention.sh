#!/usr/bin/env bash
# `prism bench attention` and its PyTorch peer on a lent GPU machine, at the
# README's three shapes (JUMP-CP 224² C=8 P=16 and P=8, So2Sat 32² C=18 P=8),
# each side at its default batch (the same rule on both). Tables and JSON
# lines go to $OUT (or build/gpu-logs).
# Usage: bash bench/gpu/attention.sh [PART]...
#   (carry build/gpu-bundle/bin from bench/gpu/bundle.sh, and build/third_party)
#   parts: prism (binaries + prism bench attention), check (the peer against the
#   oracle), fp32, bf16 (the peer's attention mode), compile (bf16 with
#   torch.compile), step (the peer's training steps, bf16). Default: prism check.
#   FlexAttention compiles once per shape and k, so give each of fp32, bf16 and
#   compile a call of its own under a 10-minute limit. ITERS=50 WARMUP=10.
set -uo pipefail
OUT=${OUT:-build/gpu-logs}; mkdir -p "$OUT"
BUILD=build/gpu
ITERS=${ITERS:-50}; WARMUP=${WARMUP:-10}
PARTS=${*:-prism check}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__)"

for part in $PARTS; do
  case $part in
  prism)
    echo "== binaries"
    source bench/gpu/binaries.sh; gpu_binaries "$OUT" || exit 1
    echo "== prism bench attention"
    $BUILD/prism bench attention --config configs/jumpcp_chvit.json --iters $ITERS --warmup $WARMUP 2>&1 | tee "$OUT/prism-jumpcp-p16.txt"
    $BUILD/prism bench attention --config configs/jumpcp_chvit.json --set model.patch=8 --iters $ITERS --warmup $WARMUP 2>&1 | tee "$OUT/prism-jumpcp-p8.txt"
    $BUILD/prism bench attention --config configs/so2sat_chvit.json --iters $ITERS --warmup $WARMUP 2>&1 | tee "$OUT/prism-so2sat.txt"
    ;;
  check)
    echo "== torch_peer check (against tests/oracle/torch_oracle.py)"
    python3 bench/torch_peer.py --mode check 2>&1 | tee "$OUT/torch-check.txt"
    ;;
  fp32|bf16)
    echo "== torch_peer attention $part"
    python3 bench/torch_peer.py --mode attention --dtype $part --iters $ITERS --warmup $WARMUP 2>&1 | tee "$OUT/torch-attention-$part.txt"
    ;;
  compile)
    echo "== torch_peer attention bf16, torch.compile"
    python3 bench/torch_peer.py --mode attention --dtype bf16 --compile --iters $ITERS --warmup $WARMUP 2>&1 | tee "$OUT/torch-attention-bf16-compile.txt"
    ;;
  step)
    echo "== torch_peer step bf16"
    python3 bench/torch_peer.py --mode step --dtype bf16 --iters 20 --warmup 5 2>&1 | tee "$OUT/torch-step-bf16.txt"
    ;;
  *) echo "unknown part $part (prism, check, fp32, bf16, compile, step)"; exit 2 ;;
  esac
done
