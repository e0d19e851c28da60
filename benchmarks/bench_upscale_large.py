"""A very large upscale on the CPU: time and peak memory of liif_cuda.upscale.

Default: a 4608x3456 (width x height) photo-like image (scikit-image's astronaut, resized with Pillow
bicubic) to 9216x6912 with the official EDSR-baseline-LIIF weights, float32, on the CPU. Peak memory is
the process's peak resident set (VmHWM) minus its resident set before the call. The original code needs
the unfolded features of every query batch and the whole feature map's activations at once and runs out
of memory there even on a 32 GB GPU; here the encoder runs in tiles and the queries in chunks.
Writes benchmarks/results/upscale_large_<date>.json.

    python benchmarks/bench_upscale_large.py                  # about an hour on 2 cores
    python benchmarks/bench_upscale_large.py --width 1152 --height 864
"""

import argparse
import os
import sys
import time

import numpy as np
from PIL import Image

import liif_cuda

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under python -P
from results_file import (cpu_machine_info, process_status_kib,  # noqa: E402
                          reset_peak_resident_set, result_header, write_results)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--height", type=int, default=3456)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--model", default="edsr-baseline-liif")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from skimage import data
    image = Image.fromarray(data.astronaut()).resize((args.width, args.height), Image.BICUBIC)
    model = liif_cuda.load_model(args.model)
    reset_peak_resident_set()
    before = process_status_kib("VmRSS")
    start = time.perf_counter()
    result = liif_cuda.upscale(np.asarray(image), scale=args.scale, model=model, device="cpu",
                               progress=True)
    seconds = time.perf_counter() - start
    peak = process_status_kib("VmHWM") - before
    out_h, out_w = result.shape[:2]
    print(f"{args.width}x{args.height} -> {out_w}x{out_h}: {seconds / 60:.1f} min, peak memory "
          f"+{peak / 2**20:.2f} GiB over {before / 2**20:.2f} GiB before the call")
    record = {
        **result_header("bench_upscale_large (CPU, float32, official EDSR-baseline-LIIF)",
                        __file__, sys.argv[1:]),
        "input_wh": [args.width, args.height], "output_wh": [out_w, out_h],
        "seconds": seconds, "peak_rss_increase_bytes": peak * 1024,
        "rss_before_bytes": before * 1024,
        "output_mean": float(result.mean()),
        "machine": cpu_machine_info(),
    }
    # Through results_file: a second run of the day gets _run2 instead of overwriting the first.
    write_results(record, "upscale_large", args.out)


if __name__ == "__main__":
    main()
