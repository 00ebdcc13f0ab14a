#!/usr/bin/env bash
# The README's second command: set-up, build with warnings as errors, run the whole test suite,
# then build again under AddressSanitizer + UndefinedBehaviorSanitizer and run it again, then fuzz
# the model loader for 30 s. Exits non-zero on the first failure. .ci/run runs exactly this.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
jobs=${OPQ_JOBS:-2}

bash scripts/setup.sh

# Fixture data (calibration and test sets) is generated from Debian's dataset, never committed.
if [ -f tools/scripts/make_data.py ]; then
  /usr/bin/python3 tools/scripts/make_data.py --out-dir "$here/.data" >/dev/null
fi

echo "== build (warnings are errors)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOPQ_WERROR=ON >/dev/null
cmake --build build -j"$jobs"
echo "== tests"
ctest --test-dir build -j"$jobs" --output-on-failure

echo "== build with -fsanitize=address,undefined"
cmake -S . -B build-san -DCMAKE_BUILD_TYPE=Debug -DOPQ_WERROR=ON \
      -DOPQ_SANITIZE="address;undefined" >/dev/null
cmake --build build-san -j"$jobs"
echo "== tests under sanitizers"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-san -j"$jobs" -LE slow --output-on-failure

if [ -f tools/scripts/fuzz_loader.sh ]; then
  echo "== fuzz the loader (30 s)"
  bash tools/scripts/fuzz_loader.sh 30
fi
echo "== all tests passed"
