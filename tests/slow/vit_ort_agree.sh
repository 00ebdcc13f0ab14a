#!/bin/sh
# vit_ort_agree.sh: onnx-ptq's executor agrees with ONNX Runtime on ViT-S/16 (random weights),
# batch 1 and 8: max |ours - ORT| <= 1e-4 * max |ORT logits|. Slow (model generation with torch):
# meant for CTest with LABELS slow.
#
#   tests/slow/vit_ort_agree.sh ONNX_PTQ_BINARY [WORK_DIR]
set -eu
OPQ=$1
WORK=${2:-${TMPDIR:-/tmp}/opq-vit-agree}
SRC=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$WORK"
MODEL=$WORK/vit_s16.onnx
[ -f "$MODEL" ] || /usr/bin/python3 "$SRC/tools/scripts/make_vit_s16.py" "$MODEL"
status=0
for b in 1 8; do
    /usr/bin/python3 -c "
import numpy as np
np.random.seed($b)
np.save('$WORK/x$b.npy', np.random.randn($b, 3, 224, 224).astype(np.float32))"
    "$OPQ" run --threads 2 "$MODEL" --input "input=$WORK/x$b.npy" --output-dir "$WORK/ours$b"
    node "$SRC/tools/ort/run.js" "$MODEL" --input "input=$WORK/x$b.npy" --output-dir "$WORK/ort$b" \
        --threads 2 >/dev/null
    /usr/bin/python3 -c "
import sys
import numpy as np
a = np.load('$WORK/ours$b/logits.npy')
r = np.load('$WORK/ort$b/logits.npy')
assert a.shape == r.shape, (a.shape, r.shape)
scale = float(np.abs(r).max())
diff = float(np.abs(a - r).max())
ok = scale > 0 and diff <= 1e-4 * scale
print(f'batch $b: max abs diff {diff:.3g}, logits scale {scale:.3g}, '
      f'relative {diff / max(scale, 1e-30):.3g} -> {\"ok\" if ok else \"FAIL\"}')
sys.exit(0 if ok else 1)" || status=1
done
exit $status
