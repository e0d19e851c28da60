#!/usr/bin/env bash
# From a fresh checkout: create .venv, install torch and the build and test tools, build and install
# liif_cuda (with its CUDA kernels when the CUDA toolkit is found, GPU or not), build the C++ tests
# with CMake, and run the whole test suite. CI runs exactly this (.ci/run). Re-running reuses .venv
# and the build folders.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# The CUDA build of torch (on this machine's disk), so that the CUDA kernels are compiled even
# without a GPU; TORCH_SPEC=torch==2.13.0 gives the CPU build and a CPU-only extension.
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC" numpy ninja pybind11 setuptools wheel \
  pytest hypothesis

echo "== building liif_cuda"
mkdir -p build
# The full log (nvcc's ptxas report of every kernel: registers, shared memory, spills) is kept in
# build/pip-install.log; a compile error, a warning in our sources or a register spill fails here.
if ! .venv/bin/python -m pip install -v --no-build-isolation . > build/pip-install.log 2>&1; then
  tail -n 60 build/pip-install.log
  exit 1
fi
echo "ptxas report:"
grep -E "ptxas (info|warning|error) *: (Compiling entry|Used)" build/pip-install.log \
  | sed -E 's/^ *//' || echo "  (no CUDA kernels compiled)"
.venv/bin/python -P -c "import liif_cuda, torch; print('liif_cuda', liif_cuda.__version__, 'torch', torch.__version__, liif_cuda.build_info())"

echo "== C++ tests (CMake)"
cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja" \
  -DPython3_EXECUTABLE="$PWD/.venv/bin/python" \
  > build/cmake-configure.log 2>&1 || { cat build/cmake-configure.log; exit 1; }
cmake --build build/cmake -j2
ctest --test-dir build/cmake --output-on-failure

echo "== Python tests"
.venv/bin/pytest -ra tests
