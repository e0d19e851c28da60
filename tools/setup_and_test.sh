#!/usr/bin/env bash
# From a fresh checkout: create .venv, install torch and the build and test tools, build and install
# liif_cuda, build the C++ tests with CMake, and run the whole test suite. CI runs exactly this
# (.ci/run). Re-running reuses .venv and the build folders.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # the CPU build of torch that lies on this machine's disk

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC" numpy ninja pybind11 setuptools wheel \
  pytest hypothesis

echo "== building liif_cuda"
.venv/bin/python -m pip install --quiet --no-build-isolation .
.venv/bin/python -P -c "import liif_cuda, torch; print('liif_cuda', liif_cuda.__version__, 'torch', torch.__version__, liif_cuda.build_info())"

echo "== C++ tests (CMake)"
mkdir -p build
cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja" \
  -DCMAKE_PREFIX_PATH="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  > build/cmake-configure.log 2>&1 || { cat build/cmake-configure.log; exit 1; }
cmake --build build/cmake -j2
ctest --test-dir build/cmake --output-on-failure

echo "== Python tests"
.venv/bin/pytest -ra tests
