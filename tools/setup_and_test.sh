#!/usr/bin/env bash
# From a fresh checkout: set up .venv and build liif_cuda (tools/setup_env.sh), build the C++ tests
# with CMake, and run the whole test suite. CI runs exactly this (.ci/run). LIIF_CUDA_TORCH=cpu (see
# setup_env.sh) sets up the CPU build of torch and a CPU-only extension instead of the CUDA ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh

echo "== C++ tests (CMake)"
cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja" \
  -DPython3_EXECUTABLE="$PWD/.venv/bin/python" \
  > build/cmake-configure.log 2>&1 || { cat build/cmake-configure.log; exit 1; }
cmake --build build/cmake -j2
(cd build/cmake && ctest --output-on-failure)  # not ctest --test-dir: CMake 3.20+, we need 3.18

echo "== Python tests"
.venv/bin/pytest -ra tests
