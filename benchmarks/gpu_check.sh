#!/usr/bin/env bash
# On a GPU machine without network: build liif_cuda against the torch already installed, run the whole
# test suite (CUDA tests included) and the GPU benchmark, and leave the results in
# benchmarks/results/ (and in $OUT when set, as the device tool collects it).
#
#   bash benchmarks/gpu_check.sh            # PYTHON=python3 by default
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
LOGS=${OUT:-build}/gpu_check
mkdir -p "$LOGS" build
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOGS/nvidia-smi.txt"

echo "== build (no network: --no-build-isolation --no-deps)"
# Only this GPU's architecture: a quicker build, and what the tests run on.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c \
  'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
LIIF_CUDA_BUILD=1 "$PYTHON" -m pip install -v --no-build-isolation --no-deps . \
  > "$LOGS/pip-install.log" 2>&1 || { tail -n 80 "$LOGS/pip-install.log"; exit 1; }
grep -E "ptxas (info|warning|error) *: (Compiling entry|Used)" "$LOGS/pip-install.log" | sed -E 's/^ *//'
(cd /tmp && "$PYTHON" -c "import liif_cuda, torch; print(liif_cuda.build_info(), torch.__version__)")

echo "== tests"
status=0
# -P: import the installed liif_cuda, not the source folder (which has no compiled _C).
"$PYTHON" -P -m pytest -ra -p no:cacheprovider tests 2>&1 | tee "$LOGS/pytest.log" || status=$?

echo "== benchmark"
"$PYTHON" benchmarks/bench_gpu.py 2>&1 | tee "$LOGS/bench_gpu.log"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu_query_*.json "$OUT/" 2>/dev/null || true; fi
exit $status
