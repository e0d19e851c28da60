"""bf16 on the CPU for a user: the quick start's upscale (scikit-image's `chelsea`, 451x300, x2.5,
official EDSR-baseline-LIIF weights) and Set5 PSNR (mmedit protocol), each in three set-ups:
float32; the query in bf16 (precision="bf16"); the query and the encoder in bf16
(encoder_precision="bf16", CPU autocast). Times are medians of interleaved repeats after a warm-up,
with the time spent in the encoder; PSNR differences are against float32. Writes
benchmarks/results/cpu_bf16_<date>.json with the machine (CPU flags included: without AVX512-BF16
the query's "bf16" computes float32).

Run on an otherwise idle machine:

    python benchmarks/bench_cpu_bf16.py --weights ../shared/weights/edsr-baseline-liif.pth \
        --data ../shared/data
"""

import argparse
import os
import statistics
import sys
import time

from PIL import Image
from skimage import data as skimage_data

import liif_cuda
from liif_cuda import upscaling
from liif_cuda.evaluation import evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import ROOT, cpu_machine_info, result_header, write_results  # noqa: E402

SETUPS = {  # name: (query precision, encoder precision)
    "fp32": ("fp32", "fp32"),
    "query-bf16": ("bf16", "fp32"),
    "query+encoder-bf16": ("bf16", "bf16"),
}
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


class EncoderTimer:
    """Wraps liif_cuda.upscaling.run_encoder to add up the time upscale() spends in the encoder."""

    def __init__(self):
        self.seconds = 0.0
        self.run_encoder = upscaling.run_encoder

    def __call__(self, *args):
        t0 = time.perf_counter()
        out = self.run_encoder(*args)
        self.seconds += time.perf_counter() - t0
        return out


def time_upscale(model, repeats, scale=2.5):
    image = Image.fromarray(skimage_data.chelsea())
    times = {name: [] for name in SETUPS}
    encoder_times = {name: [] for name in SETUPS}
    timer = EncoderTimer()
    upscaling.run_encoder = timer
    try:
        for name, (precision, encoder_precision) in SETUPS.items():  # warm-up
            liif_cuda.upscale(image, scale=scale, model=model, precision=precision,
                              encoder_precision=encoder_precision)
        for _ in range(repeats):
            for name, (precision, encoder_precision) in SETUPS.items():
                timer.seconds = 0.0
                t0 = time.perf_counter()
                liif_cuda.upscale(image, scale=scale, model=model, precision=precision,
                                  encoder_precision=encoder_precision)
                times[name].append(time.perf_counter() - t0)
                encoder_times[name].append(timer.seconds)
    finally:
        upscaling.run_encoder = timer.run_encoder
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "image": "skimage chelsea 451x300", "scale": scale,
        "median_s": med, "times_s": times,
        "encoder_median_s": {k: statistics.median(v) for k, v in encoder_times.items()},
        "speedup_vs_fp32": {k: med["fp32"] / v for k, v in med.items()},
    }


def set5_psnr(model, data, scales):
    psnr, seconds = {}, {}
    for name, (precision, encoder_precision) in SETUPS.items():
        t0 = time.perf_counter()
        results = evaluate(model, os.path.join(data, "Set5"), scales, device="cpu",
                           precision=precision, encoder_precision=encoder_precision,
                           progress=False)
        seconds[name] = time.perf_counter() - t0
        psnr[name] = {s: v["psnr"] for s, v in results["Set5"].items()}
    delta = {name: {s: psnr[name][s] - psnr["fp32"][s] for s in psnr["fp32"]} for name in psnr}
    return {"protocol": "mmedit", "psnr": psnr, "delta_vs_fp32_db": delta, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=os.path.join(SHARED, "weights", "edsr-baseline-liif.pth"))
    parser.add_argument("--data", default=os.path.join(SHARED, "data"))
    parser.add_argument("--scales", default="2,3,4,6,12")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-psnr", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model = liif_cuda.load_model(args.weights, device="cpu")
    upscale = time_upscale(model, args.repeats)
    print("quick start upscale (chelsea x2.5): " + ", ".join(
        f"{k} {v:.2f} s ({upscale['speedup_vs_fp32'][k]:.2f}x, encoder "
        f"{upscale['encoder_median_s'][k]:.2f} s)" for k, v in upscale["median_s"].items()),
        flush=True)
    result = {
        **result_header("bench_cpu_bf16 (quick start upscale and Set5 PSNR, float32 vs bf16)",
                        __file__, sys.argv[1:]),
        "machine": cpu_machine_info(),
        "setups": {k: {"precision": p, "encoder_precision": e} for k, (p, e) in SETUPS.items()},
        "upscale": upscale,
    }
    if not args.skip_psnr:
        psnr = set5_psnr(model, args.data, [float(s) for s in args.scales.split(",")])
        for name, d in psnr["delta_vs_fp32_db"].items():
            print(f"Set5 PSNR, {name}: " + ", ".join(
                f"x{s} {psnr['psnr'][name][s]:.3f} ({v:+.4f} dB)" for s, v in d.items()),
                flush=True)
        result["set5"] = psnr
    write_results(result, "cpu_bf16", args.out)


if __name__ == "__main__":
    main()
