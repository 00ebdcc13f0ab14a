#!/bin/sh
# bench_exec.sh: forward speed and peak memory of onnx-ptq's executor against ONNX Runtime
# (onnxruntime-node) on ViT-S/16, measured in the same invocation, plus GFLOP/s against the
# peak of the executor's GEMM (tools/bench/sgemm_peak.c). A benchmark, not a test.
#
#   tools/bench/bench_exec.sh [--build DIR] [--model M.onnx] [--batch 8] [--threads 2]
#                             [--repeat 10] [--work DIR]
#
# The model is generated once with tools/scripts/make_vit_s16.py (needs /usr/bin/python3 with
# torch) and cached in the work folder. Both engines run the same random input; each is run
# twice, interleaved, and the faster median counts (the machine may be shared). Peak RSS is
# GNU time's "Maximum resident set size" of the whole process (for ORT that includes node).
set -eu

SRC=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-/tmp/build-exec}
MODEL=""
BATCH=8
THREADS=2
REPEAT=10
WORK=${TMPDIR:-/tmp}/opq-bench
while [ $# -gt 0 ]; do
    case "$1" in
    --build) BUILD=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --repeat) REPEAT=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    *) echo "bench_exec.sh: unknown argument '$1'" >&2; exit 1 ;;
    esac
done
OPQ=$BUILD/onnx-ptq
[ -x "$OPQ" ] || { echo "bench_exec.sh: $OPQ not built (make -C $BUILD onnx-ptq)" >&2; exit 1; }
mkdir -p "$WORK"
if [ -z "$MODEL" ]; then
    MODEL=$WORK/vit_s16.onnx
    [ -f "$MODEL" ] || /usr/bin/python3 "$SRC/tools/scripts/make_vit_s16.py" "$MODEL"
fi
X=$WORK/x_b$BATCH.npy
[ -f "$X" ] || /usr/bin/python3 -c "
import numpy as np
np.random.seed(0)
np.save('$X', np.random.randn($BATCH, 3, 224, 224).astype(np.float32))"

# GEMM peak of the executor's own GEMM path (opq_sgemm_mt)
cc -O2 -I"$SRC/src" -o "$WORK/sgemm_peak" "$SRC/tools/bench/sgemm_peak.c" "$BUILD/libopq_core.a" \
    $(pkg-config --cflags --libs openblas) -lpthread -lm
PEAKS=$("$WORK/sgemm_peak" "$THREADS")
PEAK=$(echo "$PEAKS" | awk '{print $2}')
BLASPEAK=$(echo "$PEAKS" | awk '{print $3}')

# runs "$@" under GNU time; prints "<median_ms> <max_rss_kb>"
measure() {
    /usr/bin/time -v "$@" >"$WORK/out.txt" 2>"$WORK/err.txt" || {
        cat "$WORK/err.txt" >&2
        exit 1
    }
    ms=$(tail -n 1 "$WORK/out.txt" | sed 's/.*"forward_ms_median": *\([0-9.]*\).*/\1/')
    rss=$(grep "Maximum resident set size" "$WORK/err.txt" | awk '{print $NF}')
    echo "$ms $rss"
}

best() { # smaller of two numbers
    awk -v a="$1" -v b="$2" 'BEGIN { print (a < b) ? a : b }'
}

set -- $(measure "$OPQ" run --threads "$THREADS" "$MODEL" --input "input=$X" --repeat "$REPEAT")
O1=$1; ORSS=$2
set -- $(measure node "$SRC/tools/ort/bench.js" "$MODEL" --input "input=$X" \
    --threads "$THREADS" --repeat "$REPEAT")
R1=$1; RRSS=$2
set -- $(measure "$OPQ" run --threads "$THREADS" "$MODEL" --input "input=$X" --repeat "$REPEAT")
O2=$1
set -- $(measure node "$SRC/tools/ort/bench.js" "$MODEL" --input "input=$X" \
    --threads "$THREADS" --repeat "$REPEAT")
R2=$1
OURS=$(best "$O1" "$O2")
ORT=$(best "$R1" "$R2")

# ViT-S/16 multiply-adds per image: patch embedding + 12 x (qkv, QK^T, AV, proj, MLP) + head
awk -v ours="$OURS" -v ort="$ORT" -v b="$BATCH" -v peak="$PEAK" -v orss="$ORSS" -v rrss="$RRSS" \
    -v t="$THREADS" -v blas="$BLASPEAK" 'BEGIN {
    L = 197; E = 384; H = 6; D = 64; M = 1536
    macs = 196 * E * 768 + 12 * (L * E * 3 * E + 2 * H * L * L * D + L * E * E + 2 * L * E * M) \
           + E * 1000
    gflop = 2 * macs * b / 1e9
    printf "ViT-S/16 batch %d, %d threads: %.2f GFLOP per forward\n", b, t, gflop
    printf "GEMM peak (N=1536): executor %.1f GFLOP/s, OpenBLAS cblas_sgemm %.1f GFLOP/s\n", \
           peak, blas
    printf "onnx-ptq: %9.1f ms  %6.1f GFLOP/s  (%.0f%% of GEMM peak %.1f)  peak RSS %6.1f MB\n",
           ours, gflop / ours * 1e3, 100 * gflop / ours * 1e3 / peak, peak, orss / 1024
    printf "ORT     : %9.1f ms  %6.1f GFLOP/s  (%.0f%% of GEMM peak)        peak RSS %6.1f MB\n",
           ort, gflop / ort * 1e3, 100 * gflop / ort * 1e3 / peak, rrss / 1024
    printf "time ratio onnx-ptq/ORT: %.3f (target <= 1.25, goal 1.0); RSS ratio %.3f\n",
           ours / ort, orss / rrss
}'
