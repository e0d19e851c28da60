"""evaluate(): PSNR / SSIM of a model on image folders at several scales, under a published protocol."""

import json
import math
import os
import sys
import time

import numpy as np
import torch

from .._files import wider_than_8_bits, write_atomically
from .matlab_resize import imresize
from .protocols import (PROTOCOLS, check_image_size, check_lr_size, check_protocol_options,
                        find_lr_file, finish_prediction, make_sample, score)

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


def list_images(folder):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data folder {folder} does not exist")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"data folder {folder} holds no images")
    return [os.path.join(folder, f) for f in files]


def image_size(path):
    """(h, w) of an image file, from its header. An image of more than 8 bits per channel (16-bit
    PNG; Pillow's I and F modes) is refused (ValueError): the protocols score 8-bit RGB, and
    Pillow would clip 16-bit grayscale to 255 and drop 16-bit colour's low byte. A file that Pillow
    cannot identify (empty, truncated, another format under .png) is a ValueError naming it."""
    from PIL import Image, UnidentifiedImageError
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"{path} cannot be read as an image (Pillow cannot identify its "
                         f"format)") from None
    with im:
        if wider_than_8_bits(im, path):
            raise ValueError(f"{path} is a 16-bit (or wider) image, which 8-bit scoring would clip "
                             f"or truncate; convert it to 8 bits")
        return im.size[1], im.size[0]


def check_sizes(files, scales, protocol, crop=None, div2k=False, lr_dir=None):
    """Every image of `files` ({dataset: paths}) at every scale can be scored (from the sizes in the
    files' headers, before any work); raises protocols.ImageTooSmall for the first that cannot.
    With `lr_dir`, every LR file is found and its size checked too (FileNotFoundError,
    protocols.LRFileMismatch)."""
    for paths in files.values():
        for path in paths:
            h, w = image_size(path)
            for scale in scales:
                check_image_size(path, h, w, scale, protocol, crop, div2k)
                if lr_dir is not None:
                    lr_path = find_lr_file(lr_dir, os.path.basename(path), scale)
                    check_lr_size(lr_path, *image_size(lr_path), path, h, w, scale, protocol)


def finite_or_none(value):
    """`value` with every infinite or NaN float made None (JSON null): JSON has no Infinity, and a
    PSNR is infinite when a prediction equals its ground truth."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(path, results, protocol="mmedit", resize="pillow", crop=None, div2k=False,
                  lr_dir=None, precision="fp32", encoder_precision="fp32", ran_float32=(),
                  overwrite=True):
    """Writes evaluate()'s `results` with the settings that produced them as JSON to `path`, through
    a temporary file in the same folder renamed over it (never a partial file). With
    `overwrite=False` a file that exists at the time of the rename is left as it is
    (FileExistsError). Standard JSON: an infinite PSNR (a prediction equal to its ground truth) is
    written as null, as is an SSIM the protocol does not compute. `precision` and
    `encoder_precision` are those asked for; `ran_float32` names those of them ("precision",
    "encoder_precision") that were computed in float32 instead (on a CPU without bf16 kernels or
    bf16 convolutions: liif-cuda eval's notices)."""
    record = {"protocol": protocol, "resize": resize, "crop": crop, "div2k": div2k,
              "lr_dir": lr_dir, "precision": precision,
              "encoder_precision": encoder_precision, "ran_float32": sorted(ran_float32),
              "results": finite_or_none(results)}

    def refuse_existing():
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{path} exists")
    write_atomically(path, lambda f: json.dump(record, f, indent=1, allow_nan=False), binary=False,
                     before_replace=refuse_existing)


def bicubic_upscale(lr, out_h, out_w):
    """The classic bicubic baseline: MATLAB imresize of the 8-bit LR, rounded to 8 bits."""
    return imresize(lr, output_shape=(out_h, out_w)).astype(np.float64) / 255


def predict(model, lr, out_h, out_w, device, precision, encoder_precision="fp32"):
    """(out_h, out_w, 3) float prediction in [0, 1] (before the protocol's rounding)."""
    if isinstance(model, str):  # "bicubic"; names and paths are loaded by evaluate()
        return bicubic_upscale(lr, out_h, out_w)
    if not isinstance(model, torch.nn.Module):
        return np.asarray(model(lr, out_h, out_w), dtype=np.float64)
    from ..upscaling import upscale
    out = upscale(lr.astype(np.float32) / 255, size=(out_w, out_h), model=model, device=device,
                  precision=precision, encoder_precision=encoder_precision)
    return out.astype(np.float64)


def evaluate(model, data, scales, protocol="mmedit", lr_dir=None, resize="pillow", crop=None,
             div2k=False, device=None, precision="fp32", json_path=None, progress=True,
             encoder_precision="fp32"):
    """Scores `model` on every image of every folder in `data` at every scale. `model`: a LIIF
    model, a name or path for load_model, "bicubic", or any function (lr uint8 (h, w, 3), out_h,
    out_w) -> (out_h, out_w, 3) float prediction in [0, 1]. `precision` and `encoder_precision`
    are upscale()'s. `progress`: True, a progress bar over the images; "lines", a line on stderr
    as each dataset's scale is done (for logs, where a bar would leave fragments); False, nothing.
    Returns {dataset: {scale: {"psnr",
    "ssim", "images"}}} with per-image values; writes it as JSON to `json_path` if given
    (write_results). Before any work (and before loading a named model) every image's size is
    checked at every scale: an image whose LR image would be empty, or whose ground truth has no
    pixels left after the border is removed (fewer than SSIM's 11x11 where SSIM is computed),
    raises protocols.ImageTooSmall, a ValueError naming the image, its size and the setting; with
    `lr_dir`, an LR file missing (protocols.LRFileMissing, a FileNotFoundError) or of another size
    (protocols.LRFileMismatch) is found then too. `crop` applies under mmedit and mmagic only,
    `div2k` under paper only; given under another protocol they are refused
    (protocols.OptionIgnored) rather than ignored."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if resize not in ("pillow", "matlab"):
        raise ValueError(f"resize must be 'pillow' or 'matlab', got {resize!r}")
    data = [data] if isinstance(data, str) else list(data)
    if lr_dir is not None and len(data) != 1:
        raise ValueError("lr_dir goes with exactly one data folder")
    scales = [float(s) for s in scales]
    if any(not s > 0 for s in scales):
        raise ValueError(f"scales must be > 0, got {scales}")
    if crop is not None and not crop >= 0:
        raise ValueError(f"crop must be >= 0, got {crop}")
    lines = isinstance(progress, str) and progress == "lines"
    if not lines and progress not in (True, False):
        raise ValueError(f"progress must be True, False or 'lines', got {progress!r}")
    check_protocol_options(protocol, crop, div2k)
    names = [os.path.basename(os.path.normpath(d)) for d in data]
    for name in names:
        if names.count(name) > 1:  # the results are keyed by name: one would replace the other
            twice = [d for d, n in zip(data, names) if n == name]
            raise ValueError(f"data folders {' and '.join(twice)} are both named {name}, which "
                             f"names their results; rename or link one")
    files = {name: list_images(d) for name, d in zip(names, data)}
    check_sizes(files, scales, protocol, crop, div2k, lr_dir)
    if isinstance(model, str) and model != "bicubic":
        from ..load import load_model
        from ..upscaling import default_device
        device = device or default_device()
        model = load_model(model, device=device)
    bar = None
    if progress and not lines:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(v) for v in files.values()) * len(scales), unit="img",
                   desc="evaluate")
    results = {}
    try:
        for dataset, paths in files.items():
            results[dataset] = {}
            for scale in scales:
                images = []
                start = time.perf_counter()
                for path in paths:
                    sample = make_sample(path, scale, protocol, resize, lr_dir)
                    out_h, out_w = sample.gt.shape[:2]
                    pred = predict(model, sample.lr, out_h, out_w, device, precision,
                                   encoder_precision)
                    values = score(finish_prediction(pred, protocol), sample.gt, scale, protocol,
                                   crop, div2k, sample.gray)
                    images.append({"image": sample.name, **values})
                    if bar is not None:
                        bar.update(1)
                ssims = [i["ssim"] for i in images if i["ssim"] is not None]
                results[dataset][f"{scale:g}"] = {
                    "psnr": float(np.mean([i["psnr"] for i in images])),
                    "ssim": float(np.mean(ssims)) if ssims else None,
                    "images": images,
                }
                if lines:
                    print(f"evaluate: {dataset} x{scale:g}: {len(images)} images, PSNR "
                          f"{results[dataset][f'{scale:g}']['psnr']:.4f} dB, "
                          f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    finally:
        if bar is not None:
            bar.close()
    if json_path:
        ran_float32 = []  # only a model (which predict() hands to upscale) has precisions
        if isinstance(model, torch.nn.Module):
            from ..upscaling import float32_fallbacks, parameters_device
            device_type = torch.device(device or parameters_device(model)).type  # as upscale()
            ran_float32 = float32_fallbacks(precision, encoder_precision, device_type)
        write_results(json_path, results, protocol=protocol, resize=resize, crop=crop, div2k=div2k,
                      lr_dir=lr_dir, precision=precision, encoder_precision=encoder_precision,
                      ran_float32=ran_float32)
    return results


def format_table(results):
    """The model card's layout: one row per scale, PSNR / SSIM per dataset, four decimals."""
    datasets = list(results)
    scales = list(next(iter(results.values())))
    header = "| scale | " + " | ".join(f"{d} PSNR / SSIM" for d in datasets) + " |"
    lines = [header, "|" + "---|" * (len(datasets) + 1)]
    for s in scales:
        cells = []
        for d in datasets:
            r = results[d][s]
            ssim = f"{r['ssim']:.4f}" if r["ssim"] is not None else "-"
            cells.append(f"{r['psnr']:.4f} / {ssim}")
        lines.append(f"| x{s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["evaluate", "format_table", "write_results"]
