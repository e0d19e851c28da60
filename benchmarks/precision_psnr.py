"""What the reduced precisions cost on a published metric, predicted on the CPU: the official
EDSR-baseline-LIIF weights on Set5 under the mmedit protocol at x2, x4 and x12, decoded by the
reference query (python/liif_reference.py) whose MLP rounds exactly where liif_cuda's tensor-core
kernel rounds (python/liif_rounding_model.py, with the first-layer map exact, as the host harness
computes it; a GPU may compute that map in TF32), against the same with no rounding. Issue 4 asks
each path to stay within 0.005 dB of float32; tests/test_query_cuda_precision.py checks the kernel
itself on a GPU. Writes benchmarks/results/precision_psnr_<date>.json.

    python benchmarks/precision_psnr.py --data ../shared/data \
        --weights ../shared/weights/edsr-baseline-liif.pth
"""

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference, and results_file beside this script (also under python -P).
sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "benchmarks")]

import liif_reference_models as reference_models  # noqa: E402
from liif_rounding_model import KernelRounding  # noqa: E402

from liif_cuda.evaluation import evaluate  # noqa: E402
from results_file import write_results  # noqa: E402

PRECISIONS = ["fp32", "tf32", "bf16", "fp16"]
SCALES = [2, 4, 12]


def reference_predictor(model, imnet):
    """evaluate()'s model: the reference upscaling with `imnet` as the decoding MLP."""
    def predict(lr, out_h, out_w):
        model.imnet = imnet
        img = torch.from_numpy(lr.astype(np.float32) / 255).permute(2, 0, 1)[None]
        pred = reference_models.upscale_reference(model, img, out_h, out_w)
        return pred[0].permute(1, 2, 0).double().numpy()
    return predict


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    parser.add_argument("--weights", default=os.path.join(os.path.dirname(ROOT), "shared", "weights",
                                                          "edsr-baseline-liif.pth"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = reference_models.load_original(args.weights)
    exact_imnet = model.imnet
    data = os.path.join(args.data, "Set5")
    psnr = {}
    start = time.time()
    for precision in PRECISIONS:
        imnet = exact_imnet if precision == "fp32" else KernelRounding(exact_imnet, precision)
        results = evaluate(reference_predictor(model, imnet), data, SCALES, protocol="mmedit",
                           progress=False)
        psnr[precision] = {s: v["psnr"] for s, v in results["Set5"].items()}
        print(precision, {s: f"{v:.4f}" for s, v in psnr[precision].items()},
              f"{time.time() - start:.0f} s", flush=True)
    difference = {p: {s: psnr[p][s] - psnr["fp32"][s] for s in psnr[p]} for p in PRECISIONS[1:]}
    print("difference to fp32 (dB):")
    for p, d in difference.items():
        print(f"  {p}: " + ", ".join(f"x{s} {v:+.4f}" for s, v in d.items()))
    result = {
        "benchmark": "precision_psnr (Set5, mmedit protocol, official weights, reference query with "
                     "the tensor-core kernel's rounding model)",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "threads": torch.get_num_threads()},
        "psnr": psnr, "difference_db": difference,
    }
    write_results(result, "precision_psnr", args.out)


if __name__ == "__main__":
    main()
