#!/usr/bin/env bash
# The README's first command: set-up, build, and process the bundled fixture model with its
# bundled calibration data. Prints where the output model went.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DOPQ_BUILD_TESTS=OFF >/dev/null
cmake --build build -j"${OPQ_JOBS:-2}"
model=fixtures/models/vit_tiny_op17.onnx
out=build/vit_tiny_op17.out.onnx
build/onnx-ptq inspect "$model"
build/onnx-ptq "$model" "$out" --method none --force
echo "quickstart: wrote $out"
