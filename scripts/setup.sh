#!/usr/bin/env bash
# Installs everything onnx-ptq needs on Debian 12, idempotently: the Debian packages (build,
# tests, fixtures) and onnxruntime-node into tools/ort/node_modules (ignored by git).
# Fast when everything is present: it asks dpkg first and runs apt-get only for what is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

pkgs=(
  build-essential cmake pkg-config git
  libprotobuf-c-dev protobuf-c-compiler libonnx-dev
  libopenblas-dev libcmocka-dev libstb-dev zlib1g-dev
  libonnx-testdata
  clang libclang-rt-14-dev
  python3 python3-numpy python3-torch python3-torchvision python3-onnx
  dataset-fashion-mnist
  nodejs npm
)

missing=()
for p in "${pkgs[@]}"; do
  st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  case "$st" in *"install ok installed"*) ;; *) missing+=("$p") ;; esac
done
# nodejs from another source may provide npm itself
if [ ${#missing[@]} -gt 0 ] && command -v npm >/dev/null 2>&1; then
  tmp=(); for p in "${missing[@]}"; do [ "$p" = npm ] || [ "$p" = nodejs ] || tmp+=("$p"); done
  missing=("${tmp[@]+"${tmp[@]}"}")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# onnxruntime-node: the package's install script reaches a blocked host, and the CPU binaries
# ship inside the npm package, so --ignore-scripts is both necessary and sufficient.
ort="$here/tools/ort"
if [ ! -f "$ort/node_modules/onnxruntime-node/package.json" ]; then
  echo "setup: npm install onnxruntime-node" >&2
  (cd "$ort" && npm install --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
fi
echo "setup: ok" >&2
