"""upscale(): super-resolve an image to any scale or size with a LIIF model, in bounded memory.

The features are computed in overlapping tiles of the LR image and the queries in chunks:
  - each tile of `tile` x `tile` LR pixels is encoded with a margin of the encoder's receptive radius
    (+2 cells for the query's neighbours and 3x3 unfold), so its features equal the whole image's;
  - the output pixels whose centre falls in the tile are decoded from the tile's features, their
    coordinates mapped into the tile's feature crop (the same point, rounded once to float32), in
    chunks of at most `chunk` queries.
An image no larger than one tile is encoded whole and queried with the reference's own coordinates.
Memory beyond the input and output images is one tile's encoder activations and one chunk's query.
"""

from __future__ import annotations

import functools
import numbers
import operator
import os
from typing import Optional, Tuple, TypeVar, Union

import numpy as np
import PIL.Image
import torch

from ._query import PRECISIONS, query
from .images import from_tensor, resize_alpha, to_tensor
from .load import DEFAULT_MODEL, check_device, load_model

# Queries per fused-op call: each call computes its first-layer map over the tile's whole feature
# crop again (a 3x3 convolution, 576 -> 256 per LR cell), so few large calls; a call holds about 60
# bytes per query (coordinates, prediction), 60 MiB at this size.
DEFAULT_CHUNK = 1 << 20
MARGIN = 2                  # feature cells a query reads beyond its own: ensemble neighbour + unfold


def pixel_centres(n):
    """make_coord's centres of n pixels over [-1, 1], in float32, computed as the original does."""
    r = 1.0 / n
    return (-1 + r) + (2 * r) * torch.arange(n).float()


def _whole(value):
    """An int from an integer or a float with no fraction (60.0: a computed size); TypeError or
    ValueError otherwise."""
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return operator.index(value)


def proportional(side, along, across):
    """round(side * across / along), halves up, at least 1 (integers: exact at any size): the other
    side of an output `side` pixels along an image `along` x `across`."""
    return max(1, (2 * side * across + along) // (2 * along))


def fit_size(size, in_w, in_h):
    """The output (w, h) of a size (w, h) for an in_w x in_h image: a side given as None keeps the
    aspect ratio."""
    w, h = size
    if h is None:
        h = proportional(w, in_w, in_h)
    elif w is None:
        w = proportional(h, in_h, in_w)
    return w, h


def keeps_aspect(w, h, in_w, in_h):
    """Whether w x h is in_w x in_h scaled, up to the rounding of one side."""
    return h == proportional(w, in_w, in_h) or w == proportional(h, in_h, in_w)


def check_tiling(tile, chunk):
    """`tile` (None: the encoder's default) and `chunk` must be whole numbers >= 1: a tile of 0 or
    less would leave output pixels unwritten."""
    for name, value, optional in (("tile", tile, True), ("chunk", chunk, False)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1"
                             f"{' or None' if optional else ''}, got {value!r}")


def output_size(in_h, in_w, scale=None, size=None):
    """(out_h, out_w) from a scale (a number, or (scale_y, scale_x)) or a size (width, height), one
    side of which may be None to keep the aspect ratio."""
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale and size")
    if size is not None:
        try:
            out_w, out_h = (None if v is None else _whole(v) for v in size)
            if out_w is None and out_h is None:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"size must be (width, height) in whole pixels, one of them may be "
                             f"None, got {size!r}") from None
        if (out_w is not None and out_w < 1) or (out_h is not None and out_h < 1):
            raise ValueError(f"size must be positive, got {size!r}")
        out_w, out_h = fit_size((out_w, out_h), in_w, in_h)
        return out_h, out_w
    pair = (scale, scale) if isinstance(scale, numbers.Real) else scale
    if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
        raise ValueError(f"scale must be a number > 0 or a pair (scale_y, scale_x), got {scale!r}")
    for s in pair:
        if not (isinstance(s, numbers.Real) and not isinstance(s, bool) and 0 < s < float("inf")):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    sy, sx = pair
    out_h, out_w = round(in_h * sy), round(in_w * sx)
    if out_h < 1 or out_w < 1:  # it used to become 1 pixel without a word
        raise ValueError(f"scale {scale!r} makes the {in_w}x{in_h} image {out_w}x{out_h}; the "
                         f"output needs at least one pixel each way")
    return out_h, out_w


@functools.lru_cache(maxsize=4)
def _cached_model(name, device):
    return load_model(name, device=device)


def default_device():
    from . import build_info
    return "cuda" if build_info()["cuda"] and torch.cuda.is_available() else "cpu"


def _tiles(n, tile):
    return [(start, min(n, start + tile)) for start in range(0, n, tile)]


def _owned(n_out, n_in, start, stop):
    """Output indices whose pixel centre lies in LR cells [start, stop): floor((2i+1) n_in / 2 n_out)."""
    idx = torch.arange(n_out)
    cell = torch.div((2 * idx + 1) * n_in, 2 * n_out, rounding_mode="floor")
    return idx[(cell >= start) & (cell < stop)]


def _to_crop(centres, n, start, stop):
    """Global coordinates -> coordinates in the feature crop [start, stop) of n cells, and the factor
    that scales cells. The identity (exactly) for the whole axis.

    Each point keeps its offset from the centre of the cell it lies in, as the kernel computes both
    (make_coord's centres in float32), scaled to the crop: an offset of exactly 0 stays 0. It must:
    on the far border both ensemble neighbours clamp to the last cell, each blend area there is
    |offset_y * offset_x| + 1e-9, and a point on that cell's centre (scales 1, 3, 5, ...) takes its
    value from the float32 rounding of an offset near 0 (0 or one step: 2/255 apart with the
    official weights). Mapped as exact points instead, a crop rounds them unlike the whole image."""
    if start == 0 and stop == n:
        return centres, 1.0
    crop = stop - start
    cell = ((centres.double() + 1) * (n / 2)).floor().long().clamp_(start, stop - 1)
    offset = centres.double() - pixel_centres(n)[cell].double()   # exact: float32 - float32
    mapped = pixel_centres(crop)[cell - start].double() + offset * (n / crop)
    return mapped.float(), n / crop


# The encoder's arithmetic: float32, or torch.autocast in a reduced dtype (its features are then
# rounded to that dtype before the query).
ENCODER_PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_encoder_precision(encoder_precision, device):
    if encoder_precision not in ENCODER_PRECISIONS:
        raise ValueError(f"encoder_precision must be one of {ENCODER_PRECISIONS}, "
                         f"got {encoder_precision!r}")
    if encoder_precision == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("encoder_precision='fp16' needs a CUDA device (on the CPU use 'bf16')")


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_convolutions():
    """Whether torch convolves bf16 on this CPU with oneDNN's bf16 kernels (AVX512BW/VL/DQ, AMX or
    AVX-NE-CONVERT). Elsewhere autocast's bf16 convolutions take torch's plain loops: the encoder
    of the quick start's upscale took 5.3x float32's time, a training step of the recipe 7.9x, on a
    2-core AVX2-only AMD EPYC (docs/cpu_bf16.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check: autocast as asked
        return True


def encoder_runs_in(encoder_precision, device_type):
    """The precision the encoder runs in for `encoder_precision` on a device type: bf16 runs
    float32 on a CPU without bf16 convolutions (cpu_has_bf16_convolutions), as the query's bf16
    does on a CPU without AVX512-BF16."""
    if encoder_precision == "bf16" and device_type == "cpu" and not cpu_has_bf16_convolutions():
        return "fp32"
    return encoder_precision


def parameters_device(model):
    """The device of a model's parameters: the CPU for a model without any."""
    params = next(model.parameters(), None)
    return params.device if params is not None else torch.device("cpu")


def float32_fallbacks(precision, encoder_precision, device_type):
    """Which of the reduced precisions asked for compute float32 on a device type instead: a list
    of "precision" (the query's: tf32 and fp16 on any CPU, bf16 on a CPU without AVX512-BF16) and
    "encoder_precision" (bf16 on a CPU without bf16 convolutions, encoder_runs_in)."""
    if device_type != "cpu":
        return []
    fallbacks = []
    if precision in ("tf32", "fp16"):
        fallbacks.append("precision")
    elif precision == "bf16":
        from . import build_info
        if not build_info()["cpu_bf16"]:
            fallbacks.append("precision")
    if encoder_precision == "bf16" and encoder_runs_in("bf16", "cpu") == "fp32":
        fallbacks.append("encoder_precision")
    return fallbacks


def run_encoder(encoder, inp, encoder_precision):
    if inp.device.type == "cpu":
        # oneDNN's convolutions run about 1.4x faster (float32) and 1.5x (bf16) on channels-last
        # input (EDSR-baseline on 451x300, 2 cores); the result differs by float32 rounding only.
        inp = inp.contiguous(memory_format=torch.channels_last)
    if encoder_runs_in(encoder_precision, inp.device.type) == "fp32":
        return encoder(inp)
    with torch.autocast(inp.device.type, dtype=_AUTOCAST_DTYPES[encoder_precision]):
        return encoder(inp).float()


@torch.no_grad()
def super_resolve(model, img, out_h, out_w, tile=None, chunk=DEFAULT_CHUNK, progress=None,
                  precision="fp32", encoder_precision="fp32"):
    """(1, 3, H, W) image in [0, 1] on the model's device -> (1, 3, out_h, out_w) on the CPU, float32.
    `precision` is the query's (liif_cuda.query), `encoder_precision` the encoder's (float32, or
    autocast in bf16 / fp16)."""
    _, _, H, W = img.shape
    device = img.device
    encoder = model.encoder
    radius = getattr(encoder, "receptive_radius", None)
    if radius is None:
        raise ValueError("the model's encoder has no receptive_radius: it cannot be tiled")
    check_tiling(tile, chunk)
    tile = tile if tile is not None else getattr(encoder, "default_tile", 512)
    inp = model.normalise(img)
    out = torch.empty(out_h, out_w, 3)
    centres_y, centres_x = pixel_centres(out_h), pixel_centres(out_w)
    flags = dict(local_ensemble=model.local_ensemble, feat_unfold=model.feat_unfold,
                 cell_decode=model.cell_decode, precision=precision)
    for y0, y1 in _tiles(H, tile):
        rows = _owned(out_h, H, y0, y1)
        fy0, fy1 = max(0, y0 - MARGIN), min(H, y1 + MARGIN)      # feature crop
        ey0, ey1 = max(0, fy0 - radius), min(H, fy1 + radius)    # encoder input
        cy, cell_fy = _to_crop(centres_y[rows], H, fy0, fy1)
        for x0, x1 in _tiles(W, tile):
            cols = _owned(out_w, W, x0, x1)
            if len(rows) == 0 or len(cols) == 0:
                continue
            fx0, fx1 = max(0, x0 - MARGIN), min(W, x1 + MARGIN)
            ex0, ex1 = max(0, fx0 - radius), min(W, fx1 + radius)
            feat = run_encoder(encoder, inp[:, :, ey0:ey1, ex0:ex1], encoder_precision)
            feat = feat[:, :, fy0 - ey0:fy1 - ey0, fx0 - ex0:fx1 - ex0].contiguous()
            cx, cell_fx = _to_crop(centres_x[cols], W, fx0, fx1)
            # make_cell's 2 / out_h in float32; the factor is exactly 1 for an untiled axis.
            cell = torch.tensor([2 / out_h * cell_fy, 2 / out_w * cell_fx], dtype=torch.float32)
            rows_per_chunk = max(1, chunk // len(cols))
            for r0 in range(0, len(rows), rows_per_chunk):
                ys = cy[r0:r0 + rows_per_chunk]
                coord = torch.stack(torch.meshgrid(ys, cx, indexing="ij"), -1).view(1, -1, 2)
                cells = cell.view(1, 1, 2).expand(1, coord.shape[1], 2)
                pred = query(feat, coord.to(device), cells.to(device), model.imnet, **flags)
                pred = model.denormalise(pred).clamp_(0, 1).view(len(ys), len(cols), 3)
                out[rows[r0:r0 + len(ys)].unsqueeze(1), cols.unsqueeze(0)] = pred.float().cpu()
                if progress is not None:
                    progress.update(coord.shape[1])
    return out.permute(2, 0, 1).unsqueeze(0)


# upscale's image: it returns the same kind.
ImageT = TypeVar("ImageT", PIL.Image.Image, np.ndarray, torch.Tensor)
Scale = Union[float, Tuple[float, float]]
Size = Tuple[Optional[int], Optional[int]]


def upscale(image: ImageT, scale: Optional[Scale] = None, size: Optional[Size] = None,
            model: Union[torch.nn.Module, str, os.PathLike, None] = None,
            device: Union[str, torch.device, None] = None, precision: str = "fp32", *,
            encoder_precision: str = "fp32", tile: Optional[int] = None, chunk: int = DEFAULT_CHUNK,
            progress: bool = False) -> ImageT:
    """Super-resolves `image` with a LIIF model; returns the same kind of image.

    Args:
        image: numpy array (H, W) or (H, W, C) (uint8, uint16 or float in [0, 1]), PIL image, or tensor
            (C, H, W) / (1, C, H, W) in [0, 1]. Grayscale and alpha: see liif_cuda.images.
        scale: output / input size, any number > 0 (non-integer too), or (scale_y, scale_x).
        size: (width, height) of the output instead of a scale; a side given as None keeps the
            aspect ratio ((1920, None): 1920 pixels wide). Both given, the image is stretched to
            them whatever its aspect ratio.
        model: a LIIF model, a checkpoint path or a pretrained name (default "edsr-baseline-liif";
            names and paths are loaded once per process and device).
        device: "cpu", "cuda" or "cuda:N" (default: the model's device, else CUDA when
            available). A model object on another device is moved there (nn.Module.to, in place).
        precision: the query's arithmetic, "fp32" (exact), "tf32", "bf16" or "fp16" (CUDA tensor
            cores; "bf16" also on CPUs with AVX512-BF16; float32 elsewhere, see liif_cuda.query).
        encoder_precision: the encoder's, "fp32" (default) or, through torch.autocast, "bf16"
            (CUDA, and CPUs whose torch convolves bf16 natively: AVX512 or AMX; float32 on other
            CPUs, where it would be several times slower) or "fp16" (CUDA); its features are
            rounded to that dtype.
        tile: LR tile size for the encoder, >= 1 (default: the encoder's `default_tile`).
        chunk: queries per fused-operator call, >= 1.
        progress: show a tqdm progress bar over the output pixels.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_tiling(tile, chunk)
    if device is not None:
        device = str(check_device(device))
    rgb, alpha, kind = to_tensor(image)
    _, _, H, W = rgb.shape
    out_h, out_w = output_size(H, W, scale, size)
    if model is None or isinstance(model, str):
        device = str(device or default_device())
        model = _cached_model(model or DEFAULT_MODEL, device)
    else:
        on = parameters_device(model)
        if device is not None and torch.device(device) != on:
            model = model.to(device)
        device = device or on
    check_encoder_precision(encoder_precision, device)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=out_h * out_w, unit="px", unit_scale=True, desc="upscale")
    try:
        result = super_resolve(model, rgb.to(device), out_h, out_w, tile, chunk, bar, precision,
                               encoder_precision)
    finally:
        if bar is not None:
            bar.close()
    if alpha is not None:
        alpha = resize_alpha(alpha, out_h, out_w)
    return from_tensor(result, alpha, kind)
