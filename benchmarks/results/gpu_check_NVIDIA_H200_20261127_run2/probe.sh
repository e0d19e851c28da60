#!/usr/bin/env bash
# One-off probe (2026-11-27, after gpu_check run 5): racecheck on a bare bar.arrive -> bar.sync
# hand-over, and the native backtrace of the CPU test's segfault.
set -uo pipefail
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PIP_NO_INDEX=1
R=$1; mkdir -p "$R"
exec > >(tee -a "$R/probe.log") 2>&1
cd gpu_probe
nvcc -arch=sm_90 -o /tmp/race race.cu && for m in 0 1 2; do
  timeout 40 compute-sanitizer --tool racecheck /tmp/race $m 2>&1 | grep -E "mode|SUMMARY|Error: Race" | head -4
done
gcc -shared -fPIC -o /tmp/segv.so segv.c
cd ..
t0=$SECONDS
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 LIIF_WERROR=0 LIIF_CUDA_BUILD=1 timeout 120 python3 -m pip install -q \
  --no-build-isolation --no-deps --no-index . > "$R/build3.log" 2>&1; echo "build rc=$? $((SECONDS-t0)) s"
LD_PRELOAD=/tmp/segv.so timeout 60 python3 -P -m pytest -q -p no:cacheprovider -p no:faulthandler \
  tests/test_query_saved_map.py -k bad_first_layer > "$R/segv.log" 2>&1
echo "rc=$?"; grep -A40 "SIGSEGV" "$R/segv.log" | c++filt | cut -c 1-300 | head -45
grep -oE "^[^ (]+\(\+0x[0-9a-f]+\)" "$R/segv.log" | sed -E 's/\(\+/ /; s/\)$//' | while read -r lib off; do
  echo "$(basename "$lib") $off $(addr2line -f -C -e "$lib" "$off" 2>/dev/null | head -1 | cut -c 1-200)"; done | head -30
gcc --version | head -1; python3 -c "import numpy, torch; print(numpy.__version__, torch.__version__, torch.__config__.show())" | head -12
