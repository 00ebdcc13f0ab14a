#!/bin/bash
# bench_erq.sh: ERQ measurements.
#   bench_erq.sh speed ONNX_PTQ [OUT_DIR]   ERQ (W4A4) on the ViT-S/16 benchmark model (random
#       weights, 224x224x3) with 32 random calibration images on 2 threads: wall time, time per
#       phase and peak RSS (from the report and /usr/bin/time).
#   bench_erq.sh table ONNX_PTQ [OUT_DIR]   top-1 in ONNX Runtime on the fixtures: FP32, the best
#       round-to-nearest setting (weights sym/asym x reparameterization auto/on, MSE activation
#       ranges) and the best ERQ setting (weights asym/sym), at W3A4, W4A4 and W5A5; writes
#       OUT_DIR/erq_table.md.
# Environment: CALIB_COUNT (default 512), FIXTURES (default: the op17 fixtures), DATA_DIR.
set -euo pipefail
mode=${1:?usage: bench_erq.sh speed|table ONNX_PTQ [OUT_DIR]}
bin=${2:?usage: bench_erq.sh speed|table ONNX_PTQ [OUT_DIR]}
out=${3:-/tmp/bench_erq}
src=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$out"
py=/usr/bin/python3

if [ "$mode" = speed ]; then
    model="$out/vit_s16.onnx"
    [ -f "$model" ] || $py "$src/tools/scripts/make_vit_s16.py" "$model" >/dev/null
    /usr/bin/time -v "$bin" "$model" "$out/vit_s16_erq.onnx" --force --method erq \
        --calib random --calib-count 32 --holdout 0 --wbits 4 --abits 4 --weight-scheme asym \
        --calibrator mse --threads 2 --report "$out/vit_s16_erq.json" 2>"$out/speed.log"
    grep -E "phase|erq: statistics|Elapsed|Maximum resident" "$out/speed.log"
    exit 0
fi

[ "$mode" = table ] || { echo "bench_erq.sh: unknown mode '$mode'" >&2; exit 2; }
data=${DATA_DIR:-$src/.data}
n=${CALIB_COUNT:-512}
fixtures=${FIXTURES:-"vit_tiny_op17 tv_vit_op17 vit_tiny_outlier_op17 swin_tiny_op17"}
top1() { (cd "$src" && node tools/ort/eval.js "$1" --data "$data/test_x.npy" \
                          --labels "$data/test_y.npy" | awk '/^top1/ {print $2}'); }
q() { # model out args...
    local m=$1 o=$2
    shift 2
    "$bin" "$src/fixtures/models/$m.onnx" "$o" --force -q --calib "$data/calib_x.npy" \
        --calib-count "$n" --calibrator mse "$@" 2>>"$out/table.log"
}
md="$out/erq_table.md"
{
    echo "| fixture | FP32 | W3A4 RTN | W3A4 ERQ | W4A4 RTN | W4A4 ERQ | W5A5 RTN | W5A5 ERQ |"
    echo "|---|---|---|---|---|---|---|---|"
} >"$md"
for f in $fixtures; do
    fp=$(top1 "$src/fixtures/models/$f.onnx")
    row="| $f | $fp"
    for wa in "3 4" "4 4" "5 5"; do
        set -- $wa
        best=0 bestcfg=""
        for ws in sym asym; do
            for rp in auto on; do
                q "$f" "$out/rtn.onnx" --wbits $1 --abits $2 --weight-scheme $ws --reparam $rp
                t=$(top1 "$out/rtn.onnx")
                echo "$f W$1A$2 rtn $ws reparam=$rp $t" >>"$out/table.log"
                if awk "BEGIN{exit !($t > $best)}"; then best=$t; bestcfg="$ws/$rp"; fi
            done
        done
        ebest=0 ecfg=""
        for ws in asym sym; do
            q "$f" "$out/erq.onnx" --method erq --wbits $1 --abits $2 --weight-scheme $ws
            e=$(top1 "$out/erq.onnx")
            echo "$f W$1A$2 erq $ws $e" >>"$out/table.log"
            if awk "BEGIN{exit !($e > $ebest)}"; then ebest=$e; ecfg=$ws; fi
        done
        row="$row | $best ($bestcfg) | $ebest ($ecfg)"
    done
    echo "$row |" >>"$md"
done
cat "$md"
