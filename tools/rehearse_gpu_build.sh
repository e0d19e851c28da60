#!/usr/bin/env bash
# Before a GPU run, on this machine: build liif_cuda as benchmarks/gpu_check.sh builds it on the lent
# GPU (one architecture, --no-build-isolation), but against the torch release the GPU machine has
# (2.11.0, CUDA 13.0: docs/gpu.md) and with warnings as errors, then run the test suite's quick part
# (-m "not slow") with it. A C++ API or Python API of a newer torch that the GPU machine's torch lacks
# then fails here, not in the lease. Not part of CI (it installs a second torch, about 5 GB).
#
#   bash tools/rehearse_gpu_build.sh                 # torch 2.11.0, architecture 9.0a (H100 / H200)
#   TORCH_VERSION=2.11.0 ARCH=8.0 bash tools/rehearse_gpu_build.sh
#
# The environment is build/rehearsal-venv (kept between runs), the build a clone of HEAD in
# build/rehearsal-src; logs in build/rehearsal-*.log. Needs the CUDA toolkit (CUDA_HOME, default
# /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
ARCH=${ARCH:-9.0a}
VENV=$ROOT/build/rehearsal-venv
SRC=$ROOT/build/rehearsal-src
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# Before installing torch (about 5 GB): the build needs nvcc.
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "rehearse_gpu_build.sh: error: no CUDA toolkit: $CUDA_HOME/bin/nvcc not found (set CUDA_HOME)" >&2
  exit 2
fi
mkdir -p build
START=$SECONDS

phase() { printf '[%4d s] %s\n' $((SECONDS - START)) "$*"; }

run() {  # a command into its log; on failure the log's end, and stop
  local log=$1; shift
  if ! "$@" > "$log" 2>&1; then
    echo "rehearse_gpu_build.sh: error: failed: $*; the end of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  run build/rehearsal-venv.log "${PYTHON:-python3}" -m venv "$VENV"
fi
run build/rehearsal-venv.log "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" \
  "setuptools>=77" wheel ninja numpy pybind11 pillow tqdm pyyaml pytest hypothesis scikit-image
phase "$("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

rm -rf "$SRC"
git clone -q "$ROOT" "$SRC"
phase "building $(git -C "$SRC" log --oneline -1 | cut -c1-60) for $ARCH, warnings as errors"
(cd "$SRC" && TORCH_CUDA_ARCH_LIST=$ARCH LIIF_CUDA_BUILD=1 LIIF_WERROR=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  run "$ROOT/build/rehearsal-build.log" "$VENV/bin/python" -m pip install -v --no-build-isolation \
  --no-deps .)
phase "built; running the quick tests (log: build/rehearsal-tests.log)"
# The shared data beside this checkout (tests/conftest.py), not beside the clone.
export LIIF_SHARED_DIR=${LIIF_SHARED_DIR:-$(dirname "$ROOT")/shared}
(cd "$SRC" && run "$ROOT/build/rehearsal-tests.log" "$VENV/bin/python" -P -m pytest -q \
  -p no:cacheprovider -m "not slow" tests)
phase "$(tail -n 1 build/rehearsal-tests.log)"
