"""Super-resolve a sample image shipped with scikit-image at a non-integer scale, and measure a round
trip: downscale by the same factor (Pillow bicubic), upscale back with LIIF and with bicubic, and
compare both with the original (PSNR, RGB, 8-bit).

    python -P tools/demo.py [--scale 2.5] [--device cpu|cuda] [--precision fp32|bf16|...]
                            [--encoder-precision fp32|bf16|fp16] [--out build/demo]
"""

import argparse
import os
import time

import numpy as np
from PIL import Image
from skimage import data
from skimage.metrics import peak_signal_noise_ratio

import liif_cuda
from liif_cuda.cli.common import CliError, check_precisions
from liif_cuda.upscaling import ENCODER_PRECISIONS, default_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=2.5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="fp32", choices=liif_cuda.PRECISIONS,
                        help="the query's arithmetic (liif_cuda.upscale)")
    parser.add_argument("--encoder-precision", default="fp32", choices=ENCODER_PRECISIONS,
                        help="the encoder's arithmetic (liif_cuda.upscale)")
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "demo"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    device = args.device or default_device()
    try:  # as liif-cuda upscale: a reduced precision that this CPU runs in float32 is said
        check_precisions(args, device)
    except CliError as exc:
        parser.error(str(exc))
    original = Image.fromarray(data.chelsea())  # 451x300, scikit-image's sample photo of a cat
    model = liif_cuda.load_model("edsr-baseline-liif", device=device)
    start = time.perf_counter()
    precisions = dict(precision=args.precision, encoder_precision=args.encoder_precision)
    result = liif_cuda.upscale(original, scale=args.scale, model=model, **precisions)
    seconds = time.perf_counter() - start
    # The precisions in the name: a bf16 run does not replace the float32 one's picture.
    tag = "".join(f"_{p}" for p in dict.fromkeys((args.precision, args.encoder_precision)) if p != "fp32")
    path = os.path.join(args.out, f"chelsea_x{args.scale:g}{tag}.png")
    result.save(path)
    print(f"output: {os.path.relpath(path)}")
    print(f"size:   {original.width}x{original.height} -> {result.width}x{result.height} "
          f"(x{args.scale:g}, {next(model.parameters()).device})")
    print(f"time:   {seconds:.1f} s")

    lr = original.resize((round(original.width / args.scale), round(original.height / args.scale)),
                         Image.BICUBIC)
    liif = liif_cuda.upscale(lr, size=original.size, model=model, **precisions)
    bicubic = lr.resize(original.size, Image.BICUBIC)
    reference = np.asarray(original)
    psnr_liif = peak_signal_noise_ratio(reference, np.asarray(liif), data_range=255)
    psnr_bicubic = peak_signal_noise_ratio(reference, np.asarray(bicubic), data_range=255)
    print(f"round trip {original.width}x{original.height} -> {lr.width}x{lr.height} -> "
          f"{original.width}x{original.height}, PSNR against the original: LIIF "
          f"{psnr_liif:.2f} dB, bicubic {psnr_bicubic:.2f} dB ({psnr_liif - psnr_bicubic:+.2f} dB)")


if __name__ == "__main__":
    main()
