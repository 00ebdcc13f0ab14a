#!/bin/sh
# bench_io.sh [BUILD_DIR] [MODEL.onnx]: load+save benchmark of libopq against Python's onnx.
#
# Times opq_model_load + opq_model_save of a ViT-S/16 file (made by
# tools/scripts/make_vit_s16.py if MODEL is not given) and, in the same run, onnx.load +
# onnx.save of the same file with Debian's /usr/bin/python3 (timed inside Python, so the
# interpreter start-up and `import onnx` are not counted against it). Each side runs
# $REPEAT times (default 3) and the best time counts; each side's peak RSS is its whole
# process's (getrusage maxrss) and is compared with the file size.
# Targets: time ratio opq/python <= 1.0, opq peak RSS <= 2.5 x file size.
# Needs opq-io-bench from tools/bench/CMakeLists.txt (BUILD_DIR default: ./build).
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
model=${2:-}
repeat=${REPEAT:-3}
py=/usr/bin/python3
bench="$build/tools/bench/opq-io-bench"
[ -x "$bench" ] || bench="$build/opq-io-bench"
[ -x "$bench" ] || { echo "bench_io: opq-io-bench not found under $build" >&2; exit 2; }
work=$(mktemp -d "${TMPDIR:-/tmp}/opq-bench-io.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -z "$model" ]; then
    model="$work/vit_s16.onnx"
    "$py" "$root/tools/scripts/make_vit_s16.py" "$model" 2>/dev/null
fi
size=$(stat -c %s "$model")

opq_out=$("$bench" "$model" "$work/opq_out.onnx" --repeat "$repeat")
opq_t=$(echo "$opq_out" | awk '/^total/ {print $2}')
opq_rss=$(echo "$opq_out" | awk '/^total/ {print $4}')

py_out=$("$py" - "$model" "$work/py_out.onnx" "$repeat" <<'PYEOF'
import resource, sys, time
import onnx
src, dst, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
best = None
for _ in range(repeat):
    t0 = time.perf_counter()
    m = onnx.load(src)
    onnx.save(m, dst)
    t = time.perf_counter() - t0
    del m
    best = t if best is None else min(best, t)
print(f"total {best:.4f} peak_rss_kb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")
PYEOF
)
py_t=$(echo "$py_out" | awk '/^total/ {print $2}')
py_rss=$(echo "$py_out" | awk '/^total/ {print $4}')

# Both outputs must describe the same model: re-check ours with onnx.checker.
"$py" -c "import onnx,sys; onnx.checker.check_model(onnx.load(sys.argv[1]))" "$work/opq_out.onnx"

awk -v s="$size" -v ot="$opq_t" -v orss="$opq_rss" -v pt="$py_t" -v prss="$py_rss" 'BEGIN {
    printf "model: %.1f MB\n", s / 1048576
    printf "opq    load+save: %.3f s  peak RSS %.1f MB (%.2fx file)\n", ot, orss / 1024, orss * 1024 / s
    printf "python load+save: %.3f s  peak RSS %.1f MB (%.2fx file)\n", pt, prss / 1024, prss * 1024 / s
    r = ot / pt
    m = orss * 1024 / s
    printf "time ratio opq/python: %.2f (target <= 1.0)  %s\n", r, r <= 1.0 ? "PASS" : "FAIL"
    printf "opq RSS / file size:   %.2f (target <= 2.5)  %s\n", m, m <= 2.5 ? "PASS" : "FAIL"
    exit (r <= 1.0 && m <= 2.5) ? 0 : 1
}'
