#!/usr/bin/env bash
# Round trip of the oracle's file format: make_case.py writes a case, the
# oracle must PASS on it, and must FAIL (exit 1) once one expected tensor is
# corrupted. Covers all archs, a channel subset, k = 1, 2, C, both combine
# rules, both aux losses and a non-zero z-loss.
# Usage: tests/oracle/roundtrip.sh   (from the repository root or anywhere)
set -u
here="$(cd "$(dirname "$0")" && pwd)"
py=/usr/bin/python3
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fails=0
n=0

run_case() {  # $1 = label, rest = make_case.py options
    local label="$1"; shift
    n=$((n + 1))
    local dir="$tmp/case$n"
    "$py" "$here/make_case.py" "$dir" "$@" >/dev/null || { echo "FAIL make_case $label"; fails=$((fails + 1)); return; }
    local out rc
    out="$("$py" "$here/torch_oracle.py" "$dir")"; rc=$?
    if [ $rc -ne 0 ]; then echo "FAIL (should pass) $label: $(tail -1 <<<"$out")"; fails=$((fails + 1)); fi
    "$py" "$here/make_case.py" "$dir" "$@" --corrupt "${CORRUPT:-grad.blocks.0.attn.proj.weight}" >/dev/null
    local out2 rc2
    out2="$("$py" "$here/torch_oracle.py" "$dir")"; rc2=$?
    if [ $rc2 -ne 1 ]; then echo "FAIL (should fail) $label: $(tail -1 <<<"$out2")"; fails=$((fails + 1)); fi
    echo "$label | clean: $(tail -1 <<<"$out") | corrupt: $(tail -1 <<<"$out2")"
}

run_case "vit all"                 --arch vit
run_case "vit S=0,2,3"             --arch vit --subset 0,2,3
run_case "chvit all"               --arch chvit
run_case "chvit S=1,3"             --arch chvit --subset 1,3
run_case "moevit k=1 softmax switch"           --arch moevit --top-k 1 --combine softmax --aux switch
run_case "moevit k=2 renorm importance z"      --arch moevit --top-k 2 --combine renorm --aux importance --z-loss-coef 1e-2
run_case "moevit k=C softmax switch z S=0,2,3" --arch moevit --top-k 4 --combine softmax --aux switch --z-loss-coef 1e-2 --subset 0,2,3
run_case "moevit k=1 renorm importance S=1,2"  --arch moevit --top-k 1 --combine renorm --aux importance --subset 1,2
run_case "moevit k=2 softmax none S=3"         --arch moevit --top-k 2 --combine softmax --aux none --subset 3
CORRUPT=grad.blocks.1.attn.router.weight \
run_case "moevit k=2 renorm switch z, corrupt router"  --arch moevit --top-k 2 --combine renorm --aux switch --z-loss-coef 1e-3 --subset 0,1,3
CORRUPT=aux_loss \
run_case "moevit k=1 softmax importance, corrupt aux_loss" --arch moevit --top-k 1 --aux importance
CORRUPT=logits \
run_case "chvit, corrupt logits"   --arch chvit --subset 0,2

# Structural failures: a missing and an extra expected tensor.
"$py" "$here/make_case.py" "$tmp/s" --arch moevit >/dev/null
"$py" -c "
import sys; sys.path.insert(0, '$here')
import torch_oracle as o
d = '$tmp/s'
e, _ = o.read_safetensors(d + '/expected.safetensors')
del e['grad.head.bias']
e['grad.bogus'] = e['loss']
o.write_safetensors(d + '/expected.safetensors', e)
"
out="$("$py" "$here/torch_oracle.py" "$tmp/s")"; rc=$?
if [ $rc -ne 1 ] || ! grep -q "grad.head.bias MISSING" <<<"$out" || ! grep -q "grad.bogus EXTRA" <<<"$out"; then
    echo "FAIL (missing/extra tensors not reported)"; fails=$((fails + 1))
fi
echo "missing+extra | $(grep -E 'MISSING|EXTRA' <<<"$out" | tr '\n' ' ')| $(tail -1 <<<"$out")"

if [ $fails -eq 0 ]; then echo "roundtrip: PASS"; exit 0; fi
echo "roundtrip: FAIL ($fails)"; exit 1
