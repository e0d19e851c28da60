#!/usr/bin/env bash
# Run 7's follow-up (not committed): the saved-map crash's toolchain, a rebuild with the system
# compiler, then Nsight Compute on the multicast and plain wgmma kernels.
set -uo pipefail
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
R=$OUT; PY=python3; L=$R/probe.log
export TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
{
echo "== env"; env | grep -E '^(CC|CXX|CUDAHOSTCXX|LDSHARED|CFLAGS|LDFLAGS|LD_LIBRARY_PATH|PATH)=' 
for c in /opt/gcc/bin/g++ /usr/bin/g++ g++; do echo "$c: $($c --version 2>&1 | head -1)"; done
ls /opt/gcc/lib64 /opt/gcc/lib 2>&1 | grep -E "stdc|:" | head -20
$PY -c "import sysconfig as s; print('CXX', s.get_config_var('CXX')); print('LDSHARED', s.get_config_var('LDSHARED'))"
echo "== build (as gpu_check)"; } >> $L 2>&1
timeout 200 env LIIF_WERROR=0 LIIF_CUDA_BUILD=1 $PY -m pip install --no-build-isolation --no-deps --no-index . > $R/build_a.log 2>&1; echo "build rc=$?" >> $L
so=$($PY -c "import liif_cuda._C as c; print(c.__file__)" 2>>$L)
{ echo "so=$so"; ldd "$so" | grep -E "stdc|gcc_s"; echo "defined locale/ostream dyn symbols: $(nm -D --defined-only "$so" | grep -cE 'St6locale|_M_insert|codecvt|ios_base')";
  nm -D --defined-only "$so" | grep -E 'St6locale|_M_insertIl|ios_base4Init' | head -5
  readelf -d "$so" | grep NEEDED; } >> $L 2>&1
timeout 60 $PY -P -m pytest -q -p no:cacheprovider tests/test_query_saved_map.py -k bad_first_layer >> $L 2>&1; echo "test rc=$?" >> $L
echo "== rebuild with /usr/bin/g++" >> $L
rm -rf build
timeout 200 env CC=/usr/bin/gcc CXX=/usr/bin/g++ LIIF_WERROR=0 LIIF_CUDA_BUILD=1 $PY -m pip install --no-build-isolation --no-deps --no-index . > $R/build_b.log 2>&1; echo "build rc=$?" >> $L
{ ldd "$so" | grep -E "stdc|gcc_s"; echo "defined locale/ostream dyn symbols: $(nm -D --defined-only "$so" | grep -cE 'St6locale|_M_insert|codecvt|ios_base')"; } >> $L 2>&1
timeout 90 $PY -P -m pytest -q -p no:cacheprovider tests/test_query_saved_map.py >> $L 2>&1; echo "saved_map file rc=$?" >> $L
for p in bf16-wgmma_mc bf16-wgmma; do
  echo "== ncu $p" >> $R/ncu.log
  timeout 80 ncu --clock-control none -k regex:liif_query -c 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section SourceCounters --section InstructionStats \
    $PY benchmarks/gpu_paths.py $p --no-profile --repeats 0 >> $R/ncu.log 2>&1; echo "ncu $p rc=$?" >> $L
done
echo done >> $L
