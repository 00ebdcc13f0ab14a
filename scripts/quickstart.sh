#!/usr/bin/env bash
# The README's first command: set-up, build, then quantize the bundled fixture model
# (fixtures/models/vit_tiny_op17.onnx) with its calibration data (1024 Fashion-MNIST training
# images written from Debian's dataset-fashion-mnist package by tools/scripts/make_data.py),
# and evaluate the float and the quantized models on the 10,000 test images, in our executor and
# in ONNX Runtime.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DOPQ_BUILD_TESTS=OFF >/dev/null
cmake --build build -j"${OPQ_JOBS:-2}"
/usr/bin/python3 tools/scripts/make_data.py --out-dir .data >/dev/null
model=fixtures/models/vit_tiny_op17.onnx
data=(--data .data/test_x.npy --labels .data/test_y.npy)
build/onnx-ptq inspect "$model"
echo "== FP32: our executor, then ONNX Runtime"
build/onnx-ptq eval "$model" "${data[@]}"
node tools/ort/eval.js "$model" "${data[@]}"
for bits in 8 4; do
  out=build/vit_tiny_op17.w${bits}a${bits}.onnx
  echo "== W${bits}A${bits}: quantize, then evaluate in our executor and in ONNX Runtime"
  build/onnx-ptq "$model" "$out" --force --calib .data/calib_x.npy --wbits "$bits" \
      --abits "$bits" --report "build/report.w${bits}a${bits}.json"
  build/onnx-ptq eval "$out" "${data[@]}"
  node tools/ort/eval.js "$out" "${data[@]}"
done
echo "quickstart: wrote build/vit_tiny_op17.w8a8.onnx and build/vit_tiny_op17.w4a4.onnx"
