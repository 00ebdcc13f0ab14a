#!/bin/sh
# check_proto_isolation.sh [REPO_ROOT]: fails (exit 1) if the protobuf-c generated header
# "onnx.pb-c.h" or a generated "Onnx__" type appears in any file under src/ passes/ tools/ tests/
# other than src/onnx_io.c (the only translation unit allowed to see protobuf, STYLE 8.8) and
# this script. Registered as a CTest.
set -eu
root=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
cd "$root"
dirs=""
for d in src passes tools tests; do
    [ -d "$d" ] && dirs="$dirs $d"
done
[ -n "$dirs" ] || { echo "check_proto_isolation: no source folders under $root" >&2; exit 2; }
# -I skips binary files; node_modules (the ORT harness) is third-party.
hits=$(grep -rIlE 'onnx\.pb-c\.h|Onnx__' --exclude-dir=node_modules $dirs |
       grep -vxE 'src/onnx_io\.c|tools/scripts/check_proto_isolation\.sh' || true)
if [ -n "$hits" ]; then
    echo "check_proto_isolation: protobuf-c types used outside src/onnx_io.c:" >&2
    echo "$hits" | sed 's/^/  /' >&2
    exit 1
fi
echo "check_proto_isolation: ok (only src/onnx_io.c sees onnx.pb-c.h)"
