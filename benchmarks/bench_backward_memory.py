"""Forward + backward of the query as in training: peak memory, fused op vs reference.

Published MLP (580-256x4-3), a 64x64 float32 feature map and a 256x256 query grid (65,536 queries),
loss = sum of squares, gradients for the feature map and every MLP parameter. The reference runs its
`query_rgb` unchunked, as the original training does. Each variant runs in a fresh process, as a
training step after the first: the same forward + backward once, then the measured one. The peak is the
rise of the resident set (VmHWM) over the resident set before the measured forward pass. No time is
reported: the probe's fixed malloc mmap threshold (results_file.run_memory_probe) makes every large
buffer fresh pages, which slows both variants; bench_backward.py times forward + backward. Results go to
benchmarks/results/cpu_backward_memory_<date>.json (or --out) with the machine and versions.

    python benchmarks/bench_backward_memory.py
"""

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference, and results_file beside this script (also under python -P).
sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "benchmarks")]

import liif_reference as ref  # noqa: E402

import liif_cuda  # noqa: E402
from results_file import (cpu_machine_info, peak_rise_bytes, result_header,  # noqa: E402
                          run_memory_probe, write_results)


def probe(variant):
    torch.manual_seed(0)
    mlp = ref.MLP(580, 3, [256] * 4)
    feat = torch.randn(1, 64, 64, 64, requires_grad=True)
    coord = ref.make_coord((256, 256)).unsqueeze(0)
    cell = ref.make_cell(coord, (256, 256))
    query = liif_cuda.query if variant == "fused" else ref.query_rgb

    def step():
        feat.grad = None
        mlp.zero_grad(set_to_none=True)
        query(feat, coord, cell, mlp).square().sum().backward()

    # The gradients are dropped before each pass, as an optimizer's zero_grad does.
    print(json.dumps({"peak_memory_bytes": peak_rise_bytes(step)}))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        probe(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    variants = {}
    for variant in ("reference", "fused"):
        # Each in a fresh process, so that one's peak is not the other's.
        variants[variant] = json.loads(run_memory_probe(__file__, "--probe", variant))
        print(f"{variant:>9}: forward + backward raises peak memory by "
              f"{variants[variant]['peak_memory_bytes'] / 2**20:7.1f} MiB")
    result = {
        **result_header("bench_backward_memory (CPU, forward + backward as in training, 64x64 map, "
                        "65,536 queries)", __file__, sys.argv[1:]),
        "machine": cpu_machine_info(),
        "variants": variants,
    }
    write_results(result, "cpu_backward_memory", args.out)


if __name__ == "__main__":
    main()
