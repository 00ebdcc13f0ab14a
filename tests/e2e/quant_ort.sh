#!/usr/bin/env bash
# quant_ort.sh BIN CASE: quantizes a trained fixture and checks the result in ONNX Runtime
# (onnxruntime-node, tools/ort) on the Fashion-MNIST test set written by make_data.py.
#   w8a8      top-1 within 0.3 pt of FP32 in ORT; our executor's top-1 within 0.1 pt of ORT's
#   low_bits  W4A4 runs in ORT and stays within 6 pt of FP32 (a regression guard; the measured
#             figures are in the README), and the opset-13 (Clip emulation) output agrees too
#   trt       --target trt output passes the rule checker (inside onnx-ptq), loads and runs in
#             ORT within 0.3 pt of FP32
#   determinism  the same inputs and --seed give byte-identical models
#   opset21   --opset 21 --wbits 4 --abits 4 on an opset-17 and an opset-13 fixture (whose
#             ReduceMeans the upgrade converts): opset 21, INT4/UINT4 weights, no Clip emulation;
#             runs in ORT, and our executor's top-1 is within 0.1 pt of ORT's
# Exit 77 (skip) when node, the harness or the data set is missing.
set -u
BIN=${1:?usage: quant_ort.sh BIN CASE}
CASE=${2:?usage: quant_ort.sh BIN CASE}
SRC=${OPQ_SOURCE_DIR:?OPQ_SOURCE_DIR must point at the source tree}
DATA=${OPQ_DATA_DIR:-$SRC/.data}
M=$SRC/fixtures/models
WORK=$(mktemp -d "${TMPDIR:-/tmp}/opq-qort.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL [$CASE]: $*" >&2; exit 1; }
command -v node >/dev/null || { echo "skip: node missing" >&2; exit 77; }
[ -d "$SRC/tools/ort/node_modules/onnxruntime-node" ] || { echo "skip: onnxruntime-node missing" >&2; exit 77; }
if [ ! -f "$DATA/test_x.npy" ]; then
    /usr/bin/python3 "$SRC/tools/scripts/make_data.py" --out-dir "$DATA" >/dev/null 2>&1 ||
        { echo "skip: could not write the data set" >&2; exit 77; }
fi
ort_top1() { node "$SRC/tools/ort/eval.js" "$1" --data "$DATA/test_x.npy" --labels "$DATA/test_y.npy" | awk '/^top1:/ {print $2}'; }
our_top1() { "$BIN" eval "$1" --data "$DATA/test_x.npy" --labels "$DATA/test_y.npy" 2>/dev/null | awk '/^top1:/ {print $2}'; }
# within A B PT: |A - B| * 100 <= PT
within() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { d = (a - b) * 100; if (d < 0) d = -d; exit !(d <= t) }'; }
quant() { "$BIN" "$M/$1" "$WORK/$2" --force -q --calib "$DATA/calib_x.npy" --calib-count 256 "${@:3}" || fail "onnx-ptq failed on $1"; }

case $CASE in
w8a8)
    for f in vit_tiny_op17 tv_vit_op13 vit_tiny_outlier_op17; do
        fp=$(ort_top1 "$M/$f.onnx")
        quant $f.onnx q.onnx
        q=$(ort_top1 "$WORK/q.onnx")
        [ -n "$q" ] || fail "ORT did not run the quantized $f"
        within "$fp" "$q" 0.3 || fail "$f W8A8 top-1 $q vs FP32 $fp (more than 0.3 pt)"
        ours=$(our_top1 "$WORK/q.onnx")
        within "$q" "$ours" 0.1 || fail "$f: our executor $ours vs ORT $q on the same model"
    done ;;
low_bits)
    for f in vit_tiny_op17 vit_tiny_op13; do
        fp=$(ort_top1 "$M/$f.onnx")
        quant $f.onnx q4.onnx --wbits 4 --abits 4
        q=$(ort_top1 "$WORK/q4.onnx")
        [ -n "$q" ] || fail "ORT did not run the W4A4 $f"
        within "$fp" "$q" 6 || fail "$f W4A4 top-1 $q vs FP32 $fp"
        ours=$(our_top1 "$WORK/q4.onnx")
        within "$q" "$ours" 0.1 || fail "$f W4A4: our executor $ours vs ORT $q"
    done ;;
trt)
    fp=$(ort_top1 "$M/vit_tiny_op17.onnx")
    quant vit_tiny_op17.onnx t.onnx --target trt
    q=$(ort_top1 "$WORK/t.onnx")
    within "$fp" "$q" 0.3 || fail "trt W8A8 top-1 $q vs FP32 $fp"
    /usr/bin/python3 - "$WORK/t.onnx" <<'PYEOF' || fail "trt output breaks a TensorRT rule"
import sys, onnx, numpy as np
from onnx import numpy_helper as nh
m = onnx.load(sys.argv[1])
init = {i.name: nh.to_array(i) for i in m.graph.initializer}
for n in m.graph.node:
    if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
        zp = init.get(n.input[2]) if len(n.input) > 2 else None
        assert zp is None or (zp.dtype == np.int8 and not zp.any()), n.name
        if n.op_type == "QuantizeLinear":
            assert init[n.input[1]].size == 1, n.name
        elif n.input[0] in init:
            assert init[n.input[0]].min() >= -127, n.name
PYEOF
    ;;
determinism)
    quant vit_tiny_op13.onnx a.onnx --wbits 4 --abits 4 --seed 3
    quant vit_tiny_op13.onnx b.onnx --wbits 4 --abits 4 --seed 3
    cmp -s "$WORK/a.onnx" "$WORK/b.onnx" || fail "two runs with the same seed differ"
    quant vit_tiny_op13.onnx c.onnx --wbits 4 --abits 4 --seed 3 --threads 2
    cmp -s "$WORK/a.onnx" "$WORK/c.onnx" || fail "--threads 2 changed the output"
    ;;
opset21)
    for f in vit_tiny_op17 swin_tiny_op13; do
        "$BIN" "$M/$f.onnx" "$WORK/o21.onnx" --force -q --calib "$DATA/calib_x.npy" \
            --calib-count 64 --opset 21 --wbits 4 --abits 4 ||
            fail "onnx-ptq --opset 21 failed on $f"
        /usr/bin/python3 - "$WORK/o21.onnx" <<'PYEOF' || fail "$f: the --opset 21 output is not INT4"
import sys, onnx
m = onnx.load(sys.argv[1])
assert m.ir_version >= 10, m.ir_version
assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [21], m.opset_import
init = {i.name: i.data_type for i in m.graph.initializer}
w4 = [n.input[0] for n in m.graph.node
      if n.op_type == "DequantizeLinear" and init.get(n.input[0]) in (21, 22)]
assert w4, "no INT4/UINT4 weight initializer feeds a DequantizeLinear"
assert not any(n.op_type == "Clip" for n in m.graph.node), "Clip emulation left at opset 21"
assert not any(n.op_type == "ReduceMean" and any(a.name == "axes" for a in n.attribute)
               for n in m.graph.node), "ReduceMean still has an axes attribute"
PYEOF
        q=$(ort_top1 "$WORK/o21.onnx")
        [ -n "$q" ] || fail "ORT did not run the opset-21 W4A4 $f"
        ours=$(our_top1 "$WORK/o21.onnx")
        within "$q" "$ours" 0.1 || fail "$f opset-21 W4A4: our executor $ours vs ORT $q"
    done ;;
*) fail "unknown case" ;;
esac
echo "ok [$CASE]"
