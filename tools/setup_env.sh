#!/usr/bin/env bash
# From a fresh checkout: create .venv, install torch with the build, runtime and test tools, and build
# and install liif_cuda. Used by tools/setup_and_test.sh (CI) and tools/quickstart.sh; re-running
# reuses .venv and build/.
#
#   LIIF_CUDA_TORCH=cuda (default)  the CUDA build of torch 2.14.1 (on this machine's disk), so that
#                                   the CUDA kernels are compiled when the CUDA toolkit is found
#                                   (CUDA_HOME, default /usr/local/cuda), GPU or not
#   LIIF_CUDA_TORCH=cpu             the CPU build of torch 2.13.0 (the local wheel cache) and the
#                                   CPU-only extension (LIIF_CUDA_BUILD=0): no CUDA toolkit needed
#   TORCH_SPEC=...                  overrides the torch requirement of either
# Unset, LIIF_CUDA_TORCH keeps the build of torch already in .venv (so that re-running, as
# quickstart.sh does, never swaps a CPU set-up for the CUDA one), else cuda.
#
# On screen: one line per phase with the time since the start; everything else goes to
# build/setup.log (the build's own output to build/pip-install.log).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${LIIF_CUDA_TORCH:-}" ] && [ -x .venv/bin/python ]; then
  LIIF_CUDA_TORCH=$(.venv/bin/python -c \
    'import torch; print("cpu" if torch.version.cuda is None else "cuda")' 2> /dev/null || true)
fi
LIIF_CUDA_TORCH=${LIIF_CUDA_TORCH:-cuda}
case "$LIIF_CUDA_TORCH" in
  cuda) DEFAULT_TORCH_SPEC=torch==2.14.1 ;;
  cpu)
    DEFAULT_TORCH_SPEC=torch==2.13.0+cpu
    export LIIF_CUDA_BUILD=${LIIF_CUDA_BUILD:-0} ;;
  *)
    echo "setup_env.sh: error: LIIF_CUDA_TORCH must be 'cuda' (the default) or 'cpu', got '$LIIF_CUDA_TORCH'" >&2
    exit 2 ;;
esac
TORCH_SPEC=${TORCH_SPEC:-$DEFAULT_TORCH_SPEC}

PYTHON=${PYTHON:-python3}
mkdir -p build
LOG=build/setup.log
BUILD_LOG=build/pip-install.log
PTXAS_REPORT=build/ptxas-report.log
: > "$LOG"
START=$SECONDS

phase() {  # one line on screen (and in the log) with the seconds since the start
  printf '[%4d s] %s\n' $((SECONDS - START)) "$*" | tee -a "$LOG"
}

run() {  # runs a command into the log; on failure shows the log's end and stops
  echo "+ $*" >> "$LOG"
  if ! "$@" >> "$LOG" 2>&1; then
    echo "setup_env.sh: error: failed after $((SECONDS - START)) s: $*; the end of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}

phase "setting up with LIIF_CUDA_TORCH=$LIIF_CUDA_TORCH ($TORCH_SPEC); full log: $LOG"
if [ "$LIIF_CUDA_TORCH" = cuda ] && [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

# A .venv without pip (its creation failed or was interrupted at ensurepip) is made again; pip is
# upgraded only in a new .venv (no index needed when re-running).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version > /dev/null 2>&1; then
  run "$PYTHON" -m venv --clear .venv
  run .venv/bin/python -m pip install --upgrade pip
fi
phase "venv ready (.venv, $(.venv/bin/python --version))"

run .venv/bin/python -m pip install "$TORCH_SPEC" numpy ninja pybind11 "setuptools>=77" wheel \
  Pillow tqdm PyYAML scikit-image pytest hypothesis
phase "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') installed, with the build and test tools"

# The build's full log (nvcc's ptxas report of every kernel: registers, shared memory, spills) is
# build/pip-install.log; a compile error, a warning in our sources or a register spill fails here.
phase "building liif_cuda (log: $BUILD_LOG)"
if ! .venv/bin/python -m pip install -v --no-build-isolation . > "$BUILD_LOG" 2>&1; then
  echo "setup_env.sh: error: building liif_cuda failed after $((SECONDS - START)) s; the end of $BUILD_LOG:" >&2
  tail -n 60 "$BUILD_LOG" >&2
  exit 1
fi

# What was built, from the installed extension itself (not from the log, which only shows what was
# recompiled this time).
# Run from / (not with -P, which Python < 3.11 lacks): the installed package, not ./liif_cuda. Only
# stdout is parsed (an import's warnings go to the log).
VENV_PYTHON=$PWD/.venv/bin/python ABS_LOG=$PWD/$LOG
echo "+ import liif_cuda (from /)" >> "$LOG"
INFO=$(cd / && "$VENV_PYTHON" -c \
  "import liif_cuda; b = liif_cuda.build_info(); print(int(b['cuda']), b['cuda_archs'] or '-')" \
  2>> "$ABS_LOG") || {
  echo "setup_env.sh: error: liif_cuda was built but does not import; the end of $LOG:" >&2
  tail -n 20 "$LOG" >&2; exit 1; }
read -r CUDA_BUILT CUDA_ARCHS <<< "$INFO"
PTXAS_RE='ptxas (info|warning|error) *: (Compiling entry|Used)'
if [ "$CUDA_BUILT" = 0 ]; then
  if [ "$LIIF_CUDA_TORCH" = cpu ]; then why="LIIF_CUDA_TORCH=cpu"; else why="no CUDA toolkit or LIIF_CUDA_BUILD=0, see $BUILD_LOG"; fi
  phase "liif_cuda built: CPU kernels only ($why)"
elif grep -qE "$PTXAS_RE" "$BUILD_LOG"; then
  grep -E "$PTXAS_RE" "$BUILD_LOG" | sed -E 's/^ *//' > "$PTXAS_REPORT"
  phase "liif_cuda built (CUDA kernels: $CUDA_ARCHS); nvcc's ptxas report in $PTXAS_REPORT"
  sed 's/^/  ptxas: /' "$PTXAS_REPORT"
else
  # Nothing was recompiled: the objects in build/ were up to date.
  if [ -s "$PTXAS_REPORT" ]; then last="the report of their last compile is in $PTXAS_REPORT"; else last="no report of their last compile was kept"; fi
  phase "liif_cuda built (CUDA kernels: $CUDA_ARCHS, up to date, not recompiled; $last)"
fi
phase "$(cd / && "$VENV_PYTHON" -c "import liif_cuda, torch; print('liif_cuda', liif_cuda.__version__, 'torch', torch.__version__, liif_cuda.build_info())")"
phase "ready: run .venv/bin/liif-cuda --help (or: source .venv/bin/activate; liif-cuda --help)"
