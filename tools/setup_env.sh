#!/usr/bin/env bash
# From a fresh checkout: create .venv, install torch with the build, runtime and test tools, and build
# and install liif_cuda (with its CUDA kernels when the CUDA toolkit is found, GPU or not).
# Used by tools/setup_and_test.sh (CI) and tools/quickstart.sh; re-running reuses .venv and build/.
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
  Pillow tqdm scikit-image pytest hypothesis

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

