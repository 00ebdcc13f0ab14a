#!/bin/sh
# bench_quant.sh: time to calibrate and quantize ViT-S/16 with onnx-ptq against the time of one
# float forward pass over the same images in ONNX Runtime (onnxruntime-node), measured in the
# same invocation (the machine may be shared: only the ratio is meaningful). A benchmark, not a
# test. Target (issue 5): quantization time <= 1.5x the ORT forward time.
#
#   tools/bench/bench_quant.sh [--build DIR] [--model M.onnx] [--images 128] [--batch 16]
#                              [--threads 2] [--work DIR] [-- EXTRA onnx-ptq OPTIONS]
#
# The model comes from tools/scripts/make_vit_s16.py (random weights, cached in the work folder);
# the calibration set is seeded random images [N, 3, 224, 224] float32. onnx-ptq runs
#   onnx-ptq in.onnx out.onnx --calib X.npy --batch B --threads T -q --holdout 0 --report R.json
# (--holdout 0: no held-out evaluation, which would cost extra forwards). ORT runs the float model
# over the same images in batches of B (tools/ort/bench.js on one batch, median x N/B). Prints
# both wall times, their ratio, peak RSS of both, and the report's per-phase seconds.
set -eu

SRC=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-/tmp/build-exec}
MODEL=""
IMAGES=128
BATCH=16
THREADS=2
WORK=${TMPDIR:-/tmp}/opq-bench
while [ $# -gt 0 ]; do
    case "$1" in
    --build) BUILD=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --images) IMAGES=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "bench_quant.sh: unknown argument '$1'" >&2; exit 1 ;;
    esac
done
OPQ=$BUILD/onnx-ptq
[ -x "$OPQ" ] || { echo "bench_quant.sh: $OPQ not built (make -C $BUILD onnx-ptq)" >&2; exit 1; }
[ $((IMAGES % BATCH)) -eq 0 ] || { echo "bench_quant.sh: --images must be a multiple of --batch" >&2; exit 1; }
"$OPQ" --help 2>&1 | grep -q -- "--holdout" ||
    { echo "bench_quant.sh: $OPQ has no --holdout option" >&2; exit 1; }
mkdir -p "$WORK"
if [ -z "$MODEL" ]; then
    MODEL=$WORK/vit_s16.onnx
    [ -f "$MODEL" ] || /usr/bin/python3 "$SRC/tools/scripts/make_vit_s16.py" "$MODEL"
fi
CALIB=$WORK/calib_$IMAGES.npy
ONE=$WORK/calib_${IMAGES}_first$BATCH.npy
[ -f "$CALIB" ] && [ -f "$ONE" ] || /usr/bin/python3 -c "
import numpy as np
rng = np.random.default_rng(0)
x = rng.standard_normal(($IMAGES, 3, 224, 224), dtype=np.float32)
np.save('$CALIB', x)
np.save('$ONE', x[:$BATCH])"
OUT=$WORK/vit_s16_q.onnx
REPORT=$WORK/quant_report.json

# onnx-ptq: wall time and peak RSS of the whole quantization run
rm -f "$OUT"
/usr/bin/time -v -o "$WORK/quant_time.txt" "$OPQ" "$MODEL" "$OUT" --calib "$CALIB" \
    --batch "$BATCH" --threads "$THREADS" -q --holdout 0 --report "$REPORT" "$@" ||
    { cat "$WORK/quant_time.txt" >&2; exit 1; }
QWALL=$(grep "Elapsed (wall clock)" "$WORK/quant_time.txt" | awk '{print $NF}' |
    awk -F: '{ if (NF == 3) print ($1 * 3600 + $2 * 60 + $3); else print ($1 * 60 + $2) }')
QRSS=$(grep "Maximum resident set size" "$WORK/quant_time.txt" | awk '{print $NF}')

# ORT: forward over the same images, one batch at a time (median batch time x batches)
NB=$((IMAGES / BATCH))
/usr/bin/time -v -o "$WORK/ort_time.txt" node "$SRC/tools/ort/bench.js" "$MODEL" \
    --input "input=$ONE" --threads "$THREADS" --repeat "$NB" --warmup 1 >"$WORK/ort_out.txt" ||
    { cat "$WORK/ort_time.txt" >&2; exit 1; }
OMS=$(tail -n 1 "$WORK/ort_out.txt" | sed 's/.*"forward_ms_median": *\([0-9.]*\).*/\1/')
ORSS=$(grep "Maximum resident set size" "$WORK/ort_time.txt" | awk '{print $NF}')

echo "ViT-S/16, $IMAGES calibration images, batch $BATCH, $THREADS threads"
awk -v q="$QWALL" -v oms="$OMS" -v nb="$NB" -v qrss="$QRSS" -v orss="$ORSS" 'BEGIN {
    ort = oms * nb / 1000
    printf "onnx-ptq quantization: %8.2f s   peak RSS %7.1f MB\n", q, qrss / 1024
    printf "ORT forward (%d x %.1f ms): %8.2f s   peak RSS %7.1f MB\n", nb, oms, ort, orss / 1024
    printf "time ratio quantize/ORT-forward: %.3f (target <= 1.5)\n", q / ort
}'
# per-phase seconds from the report (names as the library records them)
if [ -f "$REPORT" ]; then
    echo "phases (from $REPORT):"
    /usr/bin/python3 -c "
import json, sys
r = json.load(open('$REPORT'))
for p in r.get('phases', []):
    print('  %-28s %8.2f s   peak RSS %7.1f MB' % (p['name'], p['seconds'], p.get('peak_rss_kb', 0) / 1024))
"
fi
