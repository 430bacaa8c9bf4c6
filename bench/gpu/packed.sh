#!/usr/bin/env bash
# Runs one of the bench/gpu scripts so that all of its logs come back from a
# device call: the device tool returns at most 8 files from $OUT, and the
# scripts write more. The logs go to build/gpu-logs/NAME and are packed into
# $OUT/NAME-logs.tar.gz at the end (also when the script failed).
# Usage: bash bench/gpu/packed.sh check.sh 'CudaOps*:CudaModel*'
#        bash bench/gpu/packed.sh flash_check.sh
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: bash bench/gpu/packed.sh SCRIPT.sh [ARGS...]"; exit 2; }
script=$1; shift
name=$(basename "$script" .sh)
DEST=${OUT:-build/gpu-out}
LOGS=build/gpu-logs/$name
rm -rf "$LOGS"; mkdir -p "$LOGS" "$DEST"
# PACK: where a script may refresh the pack as it goes (lease.sh does, after
# each part), so that a call cut off at the device's limit still returns logs.
export PACK="$DEST/$name-logs.tar.gz"
OUT=$LOGS bash "bench/gpu/$script" "$@"; rc=$?
tar czf "$PACK" -C build/gpu-logs "$name"
echo "packed $(ls "$LOGS" | wc -l) logs into $PACK (rc $rc)"
exit $rc
