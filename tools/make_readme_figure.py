"""Make docs/quickstart.png, the README's picture: scikit-image's sample photo `chelsea` downscaled by 4
(Pillow bicubic), upscaled back by 4 with bicubic and with LIIF (the official EDSR-baseline-LIIF
weights, liif_cuda.upscale), and the same crop (the cat's left eye) of the input (nearest-neighbour
enlarged), bicubic, LIIF and the original, side by side. Prints the whole image's PSNR of each.

    .venv/bin/python -P tools/make_readme_figure.py [--device cpu|cuda] [--out FILE]

It writes build/quickstart.png, so that trying it leaves the checkout as it was (a different torch
or CPU may change a few pixels by one level); `--out docs/quickstart.png` replaces the README's.
"""

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw
from skimage import data
from skimage.metrics import peak_signal_noise_ratio

import liif_cuda
from liif_cuda.upscaling import default_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 4
CROP = (124, 68, 96)  # x, y and side in original pixels (multiples of SCALE): the left eye
ZOOM = 2  # each panel shows the crop enlarged twice: 192x192
LABEL_HEIGHT = 16
GAP = 4


def panel(image, box, zoom, label):
    """The crop `box` of `image` enlarged by `zoom` (nearest neighbour), with `label` underneath."""
    crop = image.crop(box)
    crop = crop.resize((crop.width * zoom, crop.height * zoom), Image.NEAREST)
    out = Image.new("RGB", (crop.width, crop.height + LABEL_HEIGHT), "white")
    out.paste(crop, (0, 0))
    ImageDraw.Draw(out).text((3, crop.height + 2), label, fill="black")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "quickstart.png"),
                        help="default: build/quickstart.png (docs/quickstart.png is the README's)")
    args = parser.parse_args()

    photo = Image.fromarray(data.chelsea())  # 451x300
    # Crop to a multiple of the scale, so that LR pixels map onto whole blocks of original pixels.
    original = photo.crop((0, 0, photo.width // SCALE * SCALE, photo.height // SCALE * SCALE))
    lr = original.resize((original.width // SCALE, original.height // SCALE), Image.BICUBIC)
    bicubic = lr.resize(original.size, Image.BICUBIC)
    model = liif_cuda.load_model("edsr-baseline-liif", device=args.device or default_device())
    liif = liif_cuda.upscale(lr, size=original.size, model=model)

    reference = np.asarray(original)
    psnr = {name: peak_signal_noise_ratio(reference, np.asarray(image), data_range=255)
            for name, image in (("bicubic", bicubic), ("LIIF", liif))}
    x, y, side = CROP
    hr_box = (x, y, x + side, y + side)
    lr_box = tuple(v // SCALE for v in hr_box)
    panels = [
        panel(lr, lr_box, ZOOM * SCALE, f"input {lr.width}x{lr.height}"),
        panel(bicubic, hr_box, ZOOM, f"bicubic x{SCALE}, {psnr['bicubic']:.2f} dB"),
        panel(liif, hr_box, ZOOM, f"LIIF x{SCALE}, {psnr['LIIF']:.2f} dB"),
        panel(original, hr_box, ZOOM, f"original {original.width}x{original.height}"),
    ]
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    figure = Image.new("RGB", (width, panels[0].height), "white")
    for i, p in enumerate(panels):
        figure.paste(p, (i * (p.width + GAP), 0))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    figure.save(args.out, optimize=True)
    print(f"{os.path.relpath(args.out)}: {figure.width}x{figure.height}, "
          f"{os.path.getsize(args.out) / 1024:.0f} KiB")
    print(f"{original.width}x{original.height} -> {lr.width}x{lr.height} -> "
          f"{original.width}x{original.height}, PSNR against the original: "
          f"bicubic {psnr['bicubic']:.2f} dB, LIIF {psnr['LIIF']:.2f} dB")


if __name__ == "__main__":
    main()
