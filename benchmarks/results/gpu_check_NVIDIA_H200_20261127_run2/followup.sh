#!/usr/bin/env bash
# One-off follow-up of gpu_check run 5 (2026-11-27): the CPU-test segfault, the CUDA tests after it,
# and the sanitizers the budget skipped.
set -uo pipefail
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
R=$1; mkdir -p "$R"; S=$R/followup.log
exec > >(tee -a "$S") 2>&1
lscpu | grep -E "Model name|Flags" | cut -c 1-2000 | tr ' ' '\n' | grep -E "Model|name|avx512_bf16|amx|^Xeon|EPYC" | tr '\n' ' '; echo
command -v gdb || echo "no gdb"
export TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
t0=$SECONDS
LIIF_WERROR=0 LIIF_CUDA_BUILD=1 timeout 200 python3 -m pip install -q --no-build-isolation --no-deps --no-index . > "$R/build2.log" 2>&1; echo "build rc=$? $((SECONDS-t0)) s"
T=tests/test_query_saved_map.py
echo "== the crashing test alone, one thread then default"
OMP_NUM_THREADS=1 timeout 60 python3 -P -X faulthandler -m pytest -q -p no:cacheprovider $T -k bad_first_layer 2>&1 | tail -n 5
timeout 60 python3 -P -X faulthandler -m pytest -q -p no:cacheprovider $T -k bad_first_layer 2>&1 | tail -n 5
echo "== the saved-map file alone"
HYPOTHESIS_PROFILE=gpu timeout 90 python3 -P -X faulthandler -m pytest -q -p no:cacheprovider $T 2>&1 | grep -vE "^\s+File|^Thread|^$" | tail -n 12
if command -v gdb > /dev/null; then
  echo "== gdb backtrace"
  timeout 90 gdb -q -batch -ex run -ex bt --args python3 -P -m pytest -q -p no:cacheprovider $T -k "bad_first_layer" 2>&1 | grep -E "^#|SIG" | head -n 40
fi
echo "== the CUDA tests, the crashing test left out ($((SECONDS-t0)) s)"
HYPOTHESIS_PROFILE=gpu timeout 150 python3 -P -m pytest -ra -q -p no:cacheprovider -k "not bad_first_layer" \
  tests/test_query_cuda.py tests/test_query_cuda_precision.py tests/test_query_borders.py \
  tests/test_train_cuda.py tests/test_query_backward_bf16.py tests/test_query_saved_map.py > "$R/pytest2.log" 2>&1
echo "rc=$?"; tail -n 15 "$R/pytest2.log"
SMALL="--small --device cuda --no-profile"
echo "== memcheck ($((SECONDS-t0)) s)"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 benchmarks/gpu_paths.py bf16-wgmma_ws bf16-wgmma bf16 fast-fp32 $SMALL > "$R/memcheck.log" 2>&1
echo "rc=$?"; tail -n 8 "$R/memcheck.log"
echo "== racecheck ($((SECONDS-t0)) s)"
timeout 100 compute-sanitizer --tool racecheck --error-exitcode 3 \
  python3 benchmarks/gpu_paths.py bf16-wgmma_ws bf16-wgmma bf16 $SMALL > "$R/racecheck.log" 2>&1
echo "rc=$?"; tail -n 8 "$R/racecheck.log"
echo "done $((SECONDS-t0)) s"
