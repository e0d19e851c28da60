"""Accuracy of each precision of the CUDA query kernels, executed on the host by the execution
harness of tests/harness (no GPU needed): relative error against the float32 reference
(python/liif_reference.py) on random inputs of the published shape (C = 64, MLP 580-256x4-3, B = 2,
12x10 map, 120 queries per image, coordinates in [-1.1, 1.1]), for a few seeds. The harness rounds
operands exactly as the GPU does; only the float32 accumulation order differs. Writes
benchmarks/results/precision_errors_host_<date>.json.

    python benchmarks/precision_errors_host.py      # builds the harness on first use (~30 s)
"""

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, d) for d in ("python", "tests", "benchmarks")]

import liif_reference as ref  # noqa: E402
from cuda_harness import SHARED_SM90, run  # noqa: E402
from helpers import make_mlp, random_inputs  # noqa: E402

from results_file import write_results  # noqa: E402

PRECISIONS = ["fp32", "tf32", "bf16", "fp16"]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        feat, coords, cells = random_inputs(2, 64, 12, 10, 120, seed=seed, spread=1.1)
        mlp = make_mlp(580, [256] * 4, 3, torch.float32, seed=seed)
        with torch.no_grad():
            expected = ref.query_rgb(feat, coords, cells, mlp)
        errors = {}
        for precision in PRECISIONS:
            out, _ = run(feat, coords, cells, mlp, SHARED_SM90, precision=precision)
            errors[precision] = ((out - expected).norm() / expected.norm()).item()
        rows.append({"seed": seed, "relative_error": errors})
        print(f"seed {seed}: " + ", ".join(f"{p} {e:.2e}" for p, e in errors.items()), flush=True)
    write_results({
        "benchmark": "precision_errors_host (host harness, published shape, relative error vs the "
                     "float32 reference)",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
    }, "precision_errors_host", args.out)


if __name__ == "__main__":
    main()
