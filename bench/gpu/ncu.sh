#!/usr/bin/env bash
# Nsight Compute summary of the attention kernels (issue 5 asks for achieved
# occupancy, tensor pipe utilisation and DRAM throughput of the dense and the
# routed kernel) on a lent GPU machine. Runs `prism bench attention` for one
# shape under ncu with a few iterations, profiles each attention kernel's
# launches of the timed iterations, and prints one line per kernel.
# Usage: bash bench/gpu/ncu.sh [--impl bf16|reference] [prism bench attention args...]
#   default: --impl bf16 --config configs/jumpcp_chvit.json --k 2 (the flash kernels)
#   Needs a build at build/gpu (bench/gpu/check.sh or flash_check.sh makes it).
#   ncu gets --clock-control none (the device notes: leave the clocks alone).
#   CSV and the summary go to $OUT (or build/gpu-logs).
set -uo pipefail
OUT=${OUT:-build/gpu-logs}; mkdir -p "$OUT"
BUILD=build/gpu
ARGS=("$@"); [ ${#ARGS[@]} -eq 0 ] && ARGS=(--impl bf16 --config configs/jumpcp_chvit.json --k 2)
[ -x $BUILD/prism ] || { echo "no $BUILD/prism: build first (bench/gpu/check.sh)"; exit 1; }
command -v ncu > /dev/null || { echo "ncu is not on the PATH"; exit 1; }

# The bench runs chvit (dense) and moevit at each --k: each kernel launches
# (warmup + iters) times per variant; 40 launches cover every attention kernel of
# the dense run and of the routed run at one k (the table lists each launch).
SECTIONS="--section SpeedOfLight --section Occupancy --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats"
METRICS=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
run_ncu() {  # extra ncu args...
  timeout 500 ncu --clock-control none --kernel-name regex:'flash_|fused_|cls_' --launch-count 40 \
    $SECTIONS "$@" --csv --page details \
    $BUILD/prism bench attention "${ARGS[@]}" --iters 2 --warmup 1 > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
}
run_ncu --metrics $METRICS; rc=$?
if [ $rc -ne 0 ] && grep -qi "metric" "$OUT/ncu.err"; then
  echo "ncu refused $METRICS; the tensor pipe figure comes from ComputeWorkloadAnalysis alone"
  run_ncu; rc=$?
fi
echo "ncu rc $rc"; tail -3 "$OUT/ncu.err"

python3 - "$OUT/ncu.csv" <<'EOF' | tee "$OUT/ncu-summary.txt"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5]
if not rows: sys.exit("no ncu rows (see ncu.err)")
head = rows[0]; idx = {n: i for i, n in enumerate(head)}
want = collections.OrderedDict([
    ("Duration", "time"), ("Achieved Occupancy", "occupancy %"), ("Theoretical Occupancy", "theoretical %"),
    ("DRAM Throughput", "DRAM % of peak"), ("Compute (SM) Throughput", "SM % of peak"),
    ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active", "tensor pipe %"),
    ("Registers Per Thread", "regs"), ("Dynamic Shared Memory Per Block", "dyn smem")])
per = collections.OrderedDict()
for r in rows[1:]:
    name = r[idx["Kernel Name"]].split("(")[0].replace("void ", "").replace("prism::", "")
    key = (r[idx["ID"]], name)
    m = r[idx["Metric Name"]]
    if m in want: per.setdefault(key, {})[want[m]] = r[idx["Metric Value"]] + " " + r[idx["Metric Unit"]]
cols = list(want.values())
print("| launch | kernel | " + " | ".join(cols) + " |")
print("|" + " --- |" * (len(cols) + 2))
for (i, name), v in per.items():
    print(f"| {i} | {name} | " + " | ".join(v.get(c, "-").strip() for c in cols) + " |")
EOF
