#!/bin/sh
# fuzz_loader.sh [SECONDS]: builds the libFuzzer target tests/fuzz/fuzz_load with clang and
# -fsanitize=fuzzer,address,undefined in its own build folder ($OPQ_FUZZ_BUILD, default build-fuzz/
# in the checkout, so every clone has its own CMake cache), seeds a corpus with every
# libonnx-testdata model.onnx and fuzzes the ONNX loader for SECONDS (default 60) in one process
# (no fork/jobs mode). Crashes are written to $OPQ_FUZZ_BUILD/artifacts/; the exit status is
# libFuzzer's (0 = nothing found).
set -eu
secs=${1:-60}
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${OPQ_FUZZ_BUILD:-$root/build-fuzz}
testdata=${OPQ_TESTDATA_DIR:-/usr/share/libonnx-testdata/data}

cmake -S "$root" -B "$build" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DOPQ_FUZZ=ON -DOPQ_BUILD_TESTS=OFF -DOPQ_SANITIZE="address;undefined" >/dev/null
cmake --build "$build" -j2 --target fuzz_load

seeds="$build/seeds"
corpus="$build/corpus"
mkdir -p "$seeds" "$corpus" "$build/artifacts"
if [ -z "$(ls -A "$seeds")" ]; then
    i=0
    find "$testdata" -name model.onnx | sort | while read -r f; do
        i=$((i + 1))
        cp "$f" "$seeds/model_$i.onnx"
    done
fi
echo "fuzz_loader: $(ls "$seeds" | wc -l) seeds, $(ls "$corpus" | wc -l) corpus units, ${secs}s"
# New units go to the first folder; the seeds folder is only read.
exec "$build/tests/fuzz/fuzz_load" -max_total_time="$secs" -timeout=10 \
     -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
     -artifact_prefix="$build/artifacts/" "$corpus" "$seeds"
