#!/usr/bin/env bash
# The check of a lent GPU (H100 / H200, no network, minutes counted): build liif_cuda for this GPU,
# check and time every kernel path in a short process of its own, run the GPU benchmark, then the
# CUDA test files, then (time permitting) compute-sanitizer and Nsight Compute on small cases and
# a profile of the training step.
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR            # on the GPU machine (RESULTS_DIR=$OUT there)
#   bash benchmarks/gpu_check.sh RESULTS_DIR --dry-run  # anywhere: the same steps on the CPU, no build
#
# Every step has its own timeout, writes its log into RESULTS_DIR as it runs (at most 8 files, no
# sub-folders, so the device tool brings all of them back) and never stops the others: a failed
# path is left out of the benchmark, a failed build ends the run, each CUDA test file runs in a
# process of its own (a crash loses that file only). A crash of a path or test process appends its
# native stack, resolved to source lines, to its log (benchmarks/native_backtrace.c). Optional
# steps are skipped when the time budget (GPU_CHECK_BUDGET_S, default 580 s) would be exceeded.
# Files:
#   summary.txt  environment, then one line per step (status, seconds), issue 14's targets met or
#                not (benchmarks/gpu_targets.py), then the verdict
#   build.log  paths.log  paths.jsonl  bench.log  gpu_query_<device>_<date>.json  pytest.log  tools.log
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_PATH_LIMIT_S (each path's
# limit, default 60 s), LIIF_SHARED_DIR (default ./shared if present: Set5 and the official weights
# for the slow PSNR tests).
set -uo pipefail
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RESULTS=${1:-${OUT:-}}
DRY_RUN=0
[ "${2:-}" = "--dry-run" ] && DRY_RUN=1
if [ -z "$RESULTS" ] || [[ "$RESULTS" == -* ]]; then
  echo "usage: bash benchmarks/gpu_check.sh RESULTS_DIR [--dry-run]" >&2
  exit 2
fi
# Without a usable RESULTS_DIR every log would go to / (RESULTS empty): stop here instead.
if ! mkdir -p -- "$RESULTS" || ! RESULTS=$(cd -- "$RESULTS" && pwd) || [ ! -w "$RESULTS" ]; then
  echo "gpu_check.sh: error: cannot write into the results folder '$RESULTS'" >&2
  exit 2
fi
# RESULTS_DIR is relative to where the script was started; the rest to the checkout.
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-580}
SUMMARY=$RESULTS/summary.txt
DEVICE=cuda
[ $DRY_RUN = 1 ] && DEVICE=cpu
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -z "${LIIF_SHARED_DIR:-}" ] && [ -d shared/weights ]; then
  export LIIF_SHARED_DIR=$PWD/shared
fi
# The test files with GPU cases (their other cases run in CI; every GPU case skips without a GPU;
# tests/test_gpu_check_script.py checks that none is missing).
CUDA_TESTS="tests/test_query_cuda.py tests/test_query_cuda_precision.py tests/test_query_borders.py \
  tests/test_train_cuda.py tests/test_query_backward_bf16.py tests/test_query_saved_map.py"

: > "$SUMMARY"
FAILED=()

note() { echo "$*" | tee -a "$SUMMARY"; }

# The crash handler preloaded into the path and test processes (where a C compiler is found; else
# LD_PRELOAD stays empty): NATIVE_BACKTRACE_FILE names the log it appends to.
# In a folder of its own under /tmp: LD_PRELOAD splits paths at spaces; concurrent checks differ.
BACKTRACE_LIB=""
BACKTRACE_DIR=$(mktemp -d /tmp/liif_backtrace.XXXXXX 2> /dev/null) || BACKTRACE_DIR=""
if [ -n "$BACKTRACE_DIR" ] && command -v gcc > /dev/null && gcc -O2 -shared -fPIC \
    -o "$BACKTRACE_DIR/native_backtrace.so" benchmarks/native_backtrace.c 2> /dev/null; then
  BACKTRACE_LIB=$BACKTRACE_DIR/native_backtrace.so
fi
# resolve_backtraces LOG: the unnamed frames of LOG's native backtraces, as function and source
# line (addr2line; liif_cuda is built with -g), appended to LOG when it has crashes not yet
# resolved (RESOLVED_CRASHES counts them per log: one step may hold several).
declare -A RESOLVED_CRASHES=()
resolve_backtraces() {
  local log=$1 frame lib offset crashes
  crashes=$(grep -c "^== end of native backtrace" "$log" 2> /dev/null)
  [ "${crashes:-0}" -gt "${RESOLVED_CRASHES[$log]:-0}" ] && command -v addr2line > /dev/null \
    || return 0
  RESOLVED_CRASHES[$log]=$crashes
  {
    echo "== native frames resolved (addr2line)"
    grep -oE "^[^ (]+\([^)]*\+0x[0-9a-f]+\)" "$log" | sort -u | while read -r frame; do
      lib=${frame%%(*}
      offset=${frame##*+}
      offset=${offset%)}
      [[ "$frame" == *"(+0x"* ]] || continue  # exported symbols are named already
      echo "$frame -> $(addr2line -f -C -i -e "$lib" "$offset" 2> /dev/null | paste -sd ' ' | cut -c 1-300)"
    done
  } >> "$log"
}

# step NAME TIMEOUT_S LOG required|optional COMMAND...: runs COMMAND with its output appended to
# LOG, records the outcome; an optional step is skipped when it could overrun the budget. Returns
# COMMAND's exit status, but 124 for every timeout (timeout's KILL after TERM exits 137 too), so
# that a 137 is a kill from elsewhere before the limit: the out-of-memory killer, not a hang.
step() {
  local name=$1 limit=$2 log=$3 kind=$4
  shift 4
  local left=$((BUDGET - SECONDS))
  if [ "$kind" = optional ] && [ "$left" -lt "$limit" ]; then
    note "$(printf '%-22s skipped (%d s left of the budget, needs %d)' "$name" "$left" "$limit")"
    return 0
  fi
  local t0=$SECONDS rc
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit} s)" >> "$log"
  timeout -k 5 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local status=ok
  if [ $rc = 137 ] && [ $((SECONDS - t0)) -ge "$limit" ]; then rc=124; fi
  if [ $rc = 124 ]; then status="TIMEOUT after ${limit} s"
  elif [ $rc = 137 ]; then status="KILLED (exit 137: out of memory?)"
  elif [ $rc != 0 ]; then status="FAIL (exit $rc)"; fi
  note "$(printf '%-22s %-24s %4d s' "$name" "$status" $((SECONDS - t0)))"
  if [ "$status" != ok ]; then
    FAILED+=("$name")
    tail -n 25 "$log" | sed 's/^/    | /'
  fi
  return $rc
}

# The commit can be stale where only the working tree was copied: the sources' hash identifies them.
SOURCES=$(find csrc liif_cuda python benchmarks tests setup.py -type f \( -name '*.py' -o -name '*.h' \
  -o -name '*.cuh' -o -name '*.cu' -o -name '*.cpp' -o -name '*.sh' \) -not -path '*/__pycache__/*' \
  | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c 1-12)
note "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$( \
  git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)'), sources $SOURCES $( \
  [ $DRY_RUN = 1 ] && echo 'DRY RUN')"
{
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
try:
    import setuptools
    print("setuptools", setuptools.__version__)
except ImportError:
    print("setuptools missing")
EOF
  command -v nvcc > /dev/null && nvcc --version | tail -n 2 | head -n 1
  [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && "$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1
  gcc --version | head -n 1
  echo "cpus $(nproc); shared data: ${LIIF_SHARED_DIR:-none}; budget ${BUDGET} s"
} 2>&1 | tee -a "$SUMMARY"

if [ $DRY_RUN = 0 ]; then
  # Only this GPU's architecture, whatever the image presets: a quick build, and what runs here.
  ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || {
    note "no CUDA GPU visible to torch"; exit 1; }
  # Hopper (9.0) builds its arch-specific target, the only one with the wgmma kernel.
  [ "$ARCH" = 9.0 ] && ARCH=9.0a
  export TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)}
  # The system's C and C++ compilers, not the image's CC / CXX. Runs 5 to 7 built with the image's
  # /opt/gcc/bin (a wrapper of GCC 13.3), which put libstdc++'s own code into _C.so (the crash's
  # stack ran std::ostream::_M_insert<long> inside _C.so): beside torch's shared libstdc++, the
  # first error message that formatted a number crashed (test_query_saved_map). Built by
  # /usr/bin/g++, that file passed (run 7's follow-up).
  if [ -x /usr/bin/gcc ] && [ -x /usr/bin/g++ ]; then
    [ -n "${CC:-}${CXX:-}" ] && note "compilers: /usr/bin/gcc and g++ instead of CC=${CC:-} CXX=${CXX:-}"
    export CC=/usr/bin/gcc CXX=/usr/bin/g++
  fi
  # LIIF_WERROR=0: an untried compiler's or header's warnings must not cost the lease (CI keeps
  # them errors); the log keeps every warning and ptxas's report.
  build_extension() {
    step "$1" 420 "$RESULTS/build.log" required env LIIF_WERROR=0 LIIF_CUDA_BUILD=1 \
      "$PYTHON" -m pip install -v --no-build-isolation --no-deps --no-index .
  }
  if ! build_extension build; then
    built=0
    if [ "$ARCH" = 9.0a ]; then
      # The wgmma kernel's target failed: the rest of the check still runs on plain sm_90 code
      # (the -wgmma paths then run the mma.sync kernel and say so).
      note "the 9.0a build failed (build.log); building 9.0 without the wgmma kernel"
      export TORCH_CUDA_ARCH_LIST=9.0
      build_extension "build 9.0" && built=1
    fi
    if [ $built = 0 ]; then
      note "verdict: the build failed (build.log); nothing else ran"
      exit 1
    fi
  fi
  grep -E "ptxas (info|warning|error) *: (Compiling entry|Used)" "$RESULTS/build.log" \
    | sed -E 's/^ *//' | tee -a "$SUMMARY"
  # libstdc++ linked into _C.so (the crash above) shows as its functions among _C.so's symbols.
  SO=$(cd /tmp && "$PYTHON" -c "import liif_cuda._C as c; print(c.__file__)" 2> /dev/null)
  if [ -n "$SO" ] && command -v nm > /dev/null; then
    note "libstdc++ functions defined in _C.so: $(nm -D --defined-only "$SO" | grep -cE \
      '_ZNSo9_M_insert|_ZNSt6locale') (0 expected: it uses torch's shared libstdc++)"
  fi
  note "$(grep -ciE "warning" "$RESULTS/build.log") lines with 'warning' in build.log"
fi
(cd /tmp && "$PYTHON" -c "import liif_cuda; print('liif_cuda', liif_cuda.__version__, liif_cuda.build_info())") \
  2>&1 | tee -a "$SUMMARY"

# One process per kernel path: a crash loses only that path. A kernel that hangs (its path timed
# out) is not run again: its other paths, its CUDA test cases (LIIF_GPU_CHECK_HUNG_KERNELS) and its
# ncu and sanitizer runs are skipped, so that a hang costs one path's limit, not the lease.
PATH_LIMIT=${GPU_CHECK_PATH_LIMIT_S:-60}  # run 4's paths took 4-12 s each
[ $DRY_RUN = 1 ] && PATH_LIMIT=${GPU_CHECK_PATH_LIMIT_S:-120}
HUNG_KERNELS=""
# kernel_of PATH: the tensor-core kernel a path asks for by its suffix (none: the default's).
kernel_of() {
  case $1 in *-wgmma_ws) echo wgmma_ws ;; *-wgmma_mc) echo wgmma_mc ;; *-wgmma_pp) echo wgmma_pp ;;
    *-wgmma) echo wgmma ;;
    *-mma16) echo mma16 ;;
    *-wmma) echo wmma ;; esac
}
hung() { local k; k=$(kernel_of "$1"); [ -n "$k" ] && [[ " $HUNG_KERNELS " == *" $k "* ]]; }
# running PATH...: those of the paths whose kernel has not hung.
running() { local p; for p in "$@"; do hung "$p" || printf '%s ' "$p"; done; }
VARIANTS=fused-fp32
# A list that cannot be made (gpu_paths.py failing to import) would leave every path unchecked.
if ! PATHS=$("$PYTHON" benchmarks/gpu_paths.py --list 2>> "$RESULTS/paths.log") || [ -z "$PATHS" ]; then
  note "$(printf '%-22s FAIL (gpu_paths.py --list: no paths, see paths.log)' "path list")"
  FAILED+=("path list")
  PATHS=""
fi
for p in $PATHS; do
  if hung "$p"; then
    note "$(printf '%-22s skipped (its kernel timed out on an earlier path)' "path $p")"
    continue
  fi
  step "path $p" "$PATH_LIMIT" "$RESULTS/paths.log" required env LD_PRELOAD="$BACKTRACE_LIB" \
    NATIVE_BACKTRACE_FILE="$RESULTS/paths.log" "$PYTHON" benchmarks/gpu_paths.py "$p" --device $DEVICE --json "$RESULTS/paths.jsonl"
  rc=$?
  resolve_backtraces "$RESULTS/paths.log"
  if [ $rc = 0 ]; then
    case $p in tf32|bf16|fp16|*-wmma|*-mma16|*-wgmma|*-wgmma_ws|*-wgmma_mc|*-wgmma_pp)
      VARIANTS="$VARIANTS,fused-$p" ;;
    esac
  elif [ $rc = 124 ]; then
    [ -n "$(kernel_of "$p")" ] && HUNG_KERNELS="$HUNG_KERNELS $(kernel_of "$p")"
  fi
  grep -E "^$p (ok|FAIL)" "$RESULTS/paths.log" | tail -n 1 | cut -c 1-400 | sed 's/^/    /'
done
export LIIF_GPU_CHECK_HUNG_KERNELS="${HUNG_KERNELS# }"
[ -n "$HUNG_KERNELS" ] && note "hung kernels (skipped from here on):$HUNG_KERNELS"

TAG=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_') if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
BENCH_JSON=$RESULTS/gpu_query_${TAG}_$(date -u +%Y%m%d).json
if [ $DRY_RUN = 1 ]; then
  step benchmark 120 "$RESULTS/bench.log" required "$PYTHON" benchmarks/bench_gpu.py --device cpu \
    --cases 16x12x2 --repeats 2 --variants "$VARIANTS,reference-autocast-fp16" --staged --probes --phase-clocks --skip-training \
    --out "$BENCH_JSON"
else
  # With a whole training step of the recipe (liif-cuda train's step against the reference
  # model's) in the same JSON, on Set5's images (at least 192x192) from the shared data.
  TRAIN_DATA=${LIIF_SHARED_DIR:-shared}/data/Set5
  TRAIN_ARGS=()
  [ -d "$TRAIN_DATA" ] && TRAIN_ARGS=(--train-data "$TRAIN_DATA")
  step benchmark 240 "$RESULTS/bench.log" required "$PYTHON" benchmarks/bench_gpu.py \
    --variants "$VARIANTS,reference-autocast-fp16" --staged --probes --phase-clocks --out "$BENCH_JSON" \
    ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
fi
# The first case's tables (the 1080p frame; bench.log has them all): times, then phase clocks.
sed -n '/^LR /,/^$/p' "$RESULTS/bench.log" | sed '/^$/q'
sed -n '/^phase clocks/,/^$/p' "$RESULTS/bench.log" | sed '/^$/q'

# One process per file (-P: the installed liif_cuda, not the source folder, which has no compiled
# _C): a crash loses that file's cases only (run 6: a CPU case crashed its whole process).
for f in $CUDA_TESTS; do
  HYPOTHESIS_PROFILE=gpu step "cuda tests $(basename "$f" .py)" 120 "$RESULTS/pytest.log" required \
    env LD_PRELOAD="$BACKTRACE_LIB" NATIVE_BACKTRACE_FILE="$RESULTS/pytest.log" \
    "$PYTHON" -P -m pytest -ra -q -p no:cacheprovider "$f"
  resolve_backtraces "$RESULTS/pytest.log"
  tail -n 40 "$RESULTS/pytest.log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -n 5 \
    | sed "s/^/    /"
done

if [ $DRY_RUN = 0 ]; then
  SMALL="--small --device cuda --no-profile"
  # compute-sanitizer on small problems first (no caching allocator, so that memcheck sees each
  # buffer; run 6's follow-up: memcheck 7 s for four kernels, racecheck about 30 s per kernel),
  # then Nsight Compute on one launch of each kernel at the default size (about 46k queries), with
  # the warp stall reasons and where in the source the warps stall (SourceCounters; -lineinfo).
  # racecheck_step PATH / ncu_step PATH: one kernel's racecheck (about 30-40 s in runs 6 and 7)
  # or Nsight Compute profile (with the stall reasons and the source lines and SASS instructions
  # where its warps wait: run 7's printed SourceCounters' totals only), each skipped without its
  # tool. Run 6: racecheck reported hazards in the warp-specialised kernel alone (its
  # predictions, written by the consumers, read by the producer's blend after a bar.arrive /
  # bar.sync hand-over; docs/gpu.md): if it fails there, it runs again with each hazard's threads
  # and addresses.
  RACECHECK_WS=0
  racecheck_step() {
    command -v compute-sanitizer > /dev/null || return 0
    # shellcheck disable=SC2086
    step "racecheck $1" 50 "$RESULTS/tools.log" optional compute-sanitizer --tool racecheck \
      --error-exitcode 3 "$PYTHON" benchmarks/gpu_paths.py $1 $SMALL
    [ $? = 3 ] && [ $1 = bf16-wgmma_ws ] && RACECHECK_WS=1
    return 0
  }
  ncu_step() {
    command -v ncu > /dev/null || return 0
    step "ncu $1" 60 "$RESULTS/tools.log" optional env PYTHON="$PYTHON" \
      bash benchmarks/ncu_profile.sh "$1"
  }
  if command -v compute-sanitizer > /dev/null; then
    # shellcheck disable=SC2086,SC2046
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "memcheck" 60 "$RESULTS/tools.log" optional \
      compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$PYTHON" benchmarks/gpu_paths.py $(running fast-fp32 generic-fp32 bf16-mma16 bf16-wgmma \
      bf16-wgmma_mc bf16-wgmma_pp bf16-wgmma_ws tf32-mma16 bf16-wmma) $SMALL
  fi
  # The default kernel (multicast wgmma) and its ping-pong schedule (the candidate to replace it)
  # first, their racechecks and then their profiles, so that a short budget still checks and reads
  # them; then the other kernels' racecheck, then their profiles.
  for p in $(running bf16-wgmma_mc bf16-wgmma_pp); do racecheck_step $p; done
  for p in $(running bf16-wgmma_mc); do ncu_step $p; done
  # Why the bf16 training step is slower than float32's (run 7: 53.7 against 57.2 it/s): its
  # phases and kernels beside two diagnostics (the encoder outside autocast; channels_last), about
  # a minute (docs/gpu.md). Its tables go to bench.log; its JSON, which repeats them, would be a
  # ninth file.
  if [ -d "$TRAIN_DATA" ]; then
    step "training profile" 90 "$RESULTS/bench.log" optional "$PYTHON" \
      benchmarks/profile_train_step.py --data "$TRAIN_DATA" --device cuda --variants \
      liif_cuda-fp32,liif_cuda-bf16,liif_cuda-bf16-query,liif_cuda-bf16-channels_last \
      --out "${TMPDIR:-/tmp}/profile_train_step.json"
  fi
  for p in $(running bf16-wgmma_pp); do ncu_step $p; done
  for p in $(running bf16-mma16 bf16-wgmma bf16-wgmma_ws); do racecheck_step $p; done
  if [ $RACECHECK_WS = 1 ]; then
    # shellcheck disable=SC2086
    step "racecheck hazards" 60 "$RESULTS/tools.log" optional compute-sanitizer --tool racecheck \
      --racecheck-report hazard --print-limit 24 --error-exitcode 3 \
      "$PYTHON" benchmarks/gpu_paths.py bf16-wgmma_ws $SMALL
    # Whether racecheck accepts a correct hand-over shaped like the kernel's (modes 0-4 should be
    # clean, mode 5 has no barrier and must be reported).
    step "racecheck probe" 60 "$RESULTS/tools.log" optional bash -c '
      probe=${TMPDIR:-/tmp}/racecheck_handover
      "${CUDA_HOME:+$CUDA_HOME/bin/}nvcc" -arch=sm_90 -o "$probe" benchmarks/racecheck_handover.cu \
        || exit 1
      for mode in 0 1 2 3 4 5; do
        compute-sanitizer --tool racecheck "$probe" $mode 2>&1 | grep -E "mode|RACECHECK SUMMARY"
      done'
  fi
  for p in $(running bf16-wgmma_ws bf16-wgmma bf16-mma16); do ncu_step $p; done
fi

# Issue 14's targets from the benchmark's JSON (informational: a target not met fails no step).
if [ -f "$BENCH_JSON" ]; then
  "$PYTHON" benchmarks/gpu_targets.py "$BENCH_JSON" $([ $DRY_RUN = 1 ] && echo --case 16x12x2) \
    2>&1 | tee -a "$SUMMARY"
fi

if [ ${#FAILED[@]} = 0 ]; then
  note "verdict: every step passed ($SECONDS s)"
  exit 0
fi
note "verdict: failed: ${FAILED[*]} ($SECONDS s)"
exit 1
