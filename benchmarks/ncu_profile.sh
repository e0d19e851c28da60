#!/usr/bin/env bash
# One Nsight Compute profile of a kernel path (gpu_check.sh's ncu steps): one launch of the kernel
# at gpu_paths.py's default size, then what the report says about where its warps wait: ncu's
# sections, the stall reasons (cycles per issued instruction), and the CUDA source lines and SASS
# instructions with the most stall samples (SourceCounters; the build has -lineinfo).
#
#   bash benchmarks/ncu_profile.sh PATH_NAME    # PATH_NAME: a gpu_paths.py path, e.g. bf16-wgmma_mc
# Environment: PYTHON (default python3).
set -uo pipefail
PYTHON=${PYTHON:-python3}
path=${1:?usage: bash benchmarks/ncu_profile.sh PATH_NAME}
cd "$(dirname "$0")/.."
folder=$(mktemp -d "${TMPDIR:-/tmp}/liif_ncu.XXXXXX") || exit 1
trap 'rm -rf "$folder"' EXIT  # the report is large, and read here only
report=$folder/report
ncu --clock-control none -k regex:liif_query -c 1 --import-source yes -f -o "$report" \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
  --section SourceCounters --section InstructionStats \
  "$PYTHON" benchmarks/gpu_paths.py "$path" --no-profile --repeats 0 || exit $?
[ -f "$report.ncu-rep" ] || { echo "ncu wrote no report"; exit 0; }  # (a fake ncu in the tests)
ncu -i "$report.ncu-rep" --page details
echo "== stall reasons, cycles per issued instruction (ncu --page raw)"
ncu -i "$report.ncu-rep" --page raw --csv | "$PYTHON" benchmarks/ncu_stalls.py raw
echo "== CUDA source lines with the most stall samples (ncu --page source)"
ncu -i "$report.ncu-rep" --page source --csv --print-source cuda | "$PYTHON" benchmarks/ncu_stalls.py source
echo "== SASS instructions with the most stall samples"
ncu -i "$report.ncu-rep" --page source --csv --print-source sass | "$PYTHON" benchmarks/ncu_stalls.py source
exit 0
