#!/bin/sh
# erq_duq_ort.sh: a model written by `--method erq` (W4A4, dual uniform weights encoded as two
# DequantizeLinear + Add) runs in ONNX Runtime and agrees with onnx-ptq's executor on 32 test
# images: the encoding ERQ chose is what both runtimes compute. Exit 77 (skip) without node/ORT
# or the fixture data.
#
#   tests/e2e/erq_duq_ort.sh ONNX_PTQ_BINARY [WORK_DIR]
set -eu
OPQ=$1
WORK=${2:-${TMPDIR:-/tmp}/opq-erq-duq-ort}
SRC=$(cd "$(dirname "$0")/../.." && pwd)
PY=/usr/bin/python3
MODEL=$SRC/fixtures/models/vit_tiny_outlier_op17.onnx
DATA=$SRC/.data
command -v node >/dev/null 2>&1 || { echo "skip: no node" >&2; exit 77; }
[ -d "$SRC/tools/ort/node_modules/onnxruntime-node" ] || { echo "skip: no onnxruntime-node" >&2; exit 77; }
[ -f "$MODEL" ] && [ -f "$DATA/calib_x.npy" ] && [ -f "$DATA/test_x.npy" ] ||
    { echo "skip: fixture or data missing (tools/scripts/make_data.py)" >&2; exit 77; }
mkdir -p "$WORK"
"$OPQ" "$MODEL" "$WORK/erq.onnx" --force -q --method erq --calib "$DATA/calib_x.npy" \
    --calib-count 128 --holdout 0 --wbits 4 --abits 4 --weight-scheme asym --calibrator mse
# The DUQ structure is there: more weight DequantizeLinear nodes than linear layers, fed to Adds.
"$PY" - "$WORK/erq.onnx" <<'PYEOF'
import sys, onnx
m = onnx.load(sys.argv[1])
adds = [n for n in m.graph.node if n.op_type == "Add" and n.name.endswith("_DUQ_Add")]
assert adds, "no DUQ Add in the ERQ output"
prod = {o: n for n in m.graph.node for o in n.output}
for a in adds:
    assert all(prod[i].op_type == "DequantizeLinear" for i in a.input), a.name
print(f"{len(adds)} DUQ weights")
PYEOF
"$PY" -c "
import numpy as np
np.save('$WORK/x.npy', np.load('$DATA/test_x.npy')[:32].astype(np.float32))"
"$OPQ" run "$WORK/erq.onnx" --input "input=$WORK/x.npy" --output-dir "$WORK/ours" >/dev/null
node "$SRC/tools/ort/run.js" "$WORK/erq.onnx" --input "input=$WORK/x.npy" --output-dir "$WORK/ort" \
    >/dev/null
"$PY" - "$WORK" <<'PYEOF'
import glob, os, sys
import numpy as np
w = sys.argv[1]
names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(w, "ort", "*.npy")))
assert names, "ORT wrote no output"
for n in names:
    a = np.load(os.path.join(w, "ours", n))
    r = np.load(os.path.join(w, "ort", n))
    assert a.shape == r.shape, (n, a.shape, r.shape)
    scale = float(np.abs(r).max())
    diff = float(np.abs(a - r).max())
    agree = float((a.argmax(-1) == r.argmax(-1)).mean())
    print(f"{n}: max abs diff {diff:.3g} (scale {scale:.3g}), top-1 agreement {agree:.3f}")
    # Quantized graphs amplify float rounding differences at Q/DQ boundaries (a value on a
    # rounding tie may land one step apart), so the bound is on the logits scale.
    assert diff <= 2e-2 * scale and agree >= 0.96, n
PYEOF
