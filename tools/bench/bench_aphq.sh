#!/bin/bash
# bench_aphq.sh: block-reconstruction speed on the ViT-S/16 benchmark model (random weights,
# 224x224x3, 1000 classes, tools/scripts/make_vit_s16.py), 2 threads.
#   bench_aphq.sh iter ONNX_PTQ [OUT_DIR]     a few training iterations per unit at batch 32:
#       each unit's iteration time as a multiple of its float forward on the same batch, both
#       timed inside the same run (the engine logs them); MSE loss, so no APH pass is timed.
#   bench_aphq.sh budget ONNX_PTQ [OUT_DIR]   the whole quantization with --time-budget 30 on
#       128 random calibration images (W4A4 --method aphq): wall time, phases, peak RSS.
# Environment: METHOD (default aphq), EXTRA (more onnx-ptq options).
set -euo pipefail
mode=${1:?usage: bench_aphq.sh iter|budget ONNX_PTQ [OUT_DIR]}
bin=${2:?usage: bench_aphq.sh iter|budget ONNX_PTQ [OUT_DIR]}
out=${3:-/tmp/bench_aphq}
src=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$out"
model="$out/vit_s16.onnx"
[ -f "$model" ] || /usr/bin/python3 "$src/tools/scripts/make_vit_s16.py" "$model" >/dev/null
method=${METHOD:-aphq}
case "$mode" in
iter)
    # shellcheck disable=SC2086
    "$bin" "$model" "$out/vit_s16_iter.onnx" --force --method "$method" --calib random \
        --calib-count 64 --holdout 0 --wbits 4 --abits 4 --recon-iters 4 --recon-batch 32 \
        --recon-loss mse --threads 2 ${EXTRA:-} 2>"$out/iter.log"
    grep "reconstruct " "$out/iter.log" | grep -v "/4 (" |
        sed -E 's/.*reconstruct ([a-z]+ ?[0-9]*) .*iteration ([0-9.]+) ms = ([0-9.]+)x forward.*/\1: iteration \2 ms = \3x its forward/'
    ;;
budget)
    # shellcheck disable=SC2086
    /usr/bin/time -v "$bin" "$model" "$out/vit_s16_budget.onnx" --force --method "$method" \
        --calib random --calib-count 160 --holdout 32 --wbits 4 --abits 4 --time-budget 30 \
        --threads 2 ${EXTRA:-} 2>"$out/budget.log"
    grep -E "phase|APH|reconstruct [a-z]+ ?[0-9]* +[0-9]+ iters|Elapsed|Maximum resident" \
        "$out/budget.log"
    ;;
*)
    echo "bench_aphq.sh: unknown mode '$mode'" >&2
    exit 2
    ;;
esac
