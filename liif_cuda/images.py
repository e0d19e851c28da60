"""Converting the image kinds `upscale` accepts (numpy arrays, PIL images, tensors) to and from the
(1, 3, H, W) float32 RGB tensor in [0, 1] the model takes, with the policy for grayscale and alpha.

Policy
  - Grayscale (numpy (H, W) or (H, W, 1), PIL "L"/"I;16", tensors with one channel) is replicated to
    RGB, as LIIF's loaders do (`.convert('RGB')`), and the RGB result is turned back into one channel
    with the ITU-R 601 luma weights that Pillow's convert("L") uses. A bilevel PIL image ("1") comes
    back as "L".
  - PIL palette ("P", "PA"), CMYK and YCbCr images come back as RGB (RGBA where they have
    transparency): a palette's indices, or another colour space, cannot be interpolated.
  - An alpha channel (RGBA / LA, 4 or 2 channels) is not seen by the model, which was trained on RGB:
    it is resized separately with Pillow-style bicubic interpolation and reattached.
  - uint8 stays uint8 and uint16 stays uint16 (rounded); float arrays and tensors are taken as values
    in [0, 1] and returned as float in [0, 1].
"""

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)


@dataclass
class ImageKind:
    """What came in, so that the result goes out the same way."""
    kind: str            # "numpy", "pil" or "tensor"
    dtype: object        # numpy dtype / torch dtype
    channels: int        # 1, 2, 3 or 4 as given
    squeeze: bool        # numpy (H, W) or tensor (C, H, W): no trailing / leading axis to restore
    pil_mode: str = ""
    device: object = None


def _max_value(dtype):
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype))


def _from_numpy(arr):
    arr = np.asarray(arr)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"image must be (H, W) or (H, W, C) with C in 1..4, got shape {arr.shape}")
    scale = _max_value(arr.dtype)
    if scale is None:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"image dtype must be uint8, uint16 or floating, got {arr.dtype}")
        scale = 1.0
    t = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32) / np.float32(scale))
    return t.permute(2, 0, 1), ImageKind("numpy", arr.dtype, arr.shape[2], squeeze)


def to_tensor(image):
    """(rgb (1, 3, H, W) float32 in [0, 1], alpha (1, 1, H, W) or None, ImageKind)."""
    if isinstance(image, (str, bytes, os.PathLike)):
        raise TypeError(f"image must be a numpy array, a PIL image or a tensor, got the path "
                        f"{image!r}: read it first (PIL.Image.open), or use `liif-cuda upscale`")
    if isinstance(image, torch.Tensor):
        t = image
        squeeze = t.dim() == 3
        if squeeze:
            t = t.unsqueeze(0)
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] not in (1, 2, 3, 4):
            raise ValueError(f"image tensor must be (C, H, W) or (1, C, H, W) with C in 1..4, got "
                             f"shape {tuple(image.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"image tensor must be floating point in [0, 1], got {t.dtype}")
        kind = ImageKind("tensor", image.dtype, t.shape[1], squeeze, device=image.device)
        chw = t[0].float()
    elif hasattr(image, "mode") and hasattr(image, "getbands"):  # a PIL image
        mode = image.mode
        if mode in ("I;16", "I;16B", "I;16L"):
            arr = np.asarray(image).astype(np.uint16)
        elif mode in ("L", "RGB", "RGBA", "LA"):
            arr = np.asarray(image)
        elif mode == "1":  # bilevel: upscaling makes grey levels, so it comes back as "L"
            return to_tensor(image.convert("L"))
        elif mode in ("P", "PA", "CMYK", "YCbCr"):
            # A palette's indices or another colour space mean nothing between pixels: RGB(A).
            converted = image.convert("RGBA" if "A" in mode or "transparency" in image.info else "RGB")
            return to_tensor(converted)
        else:
            raise ValueError(f"PIL image mode {mode!r} is not supported (use L, RGB, RGBA, LA or "
                             f"16-bit grayscale)")
        chw, kind = _from_numpy(arr)
        kind.kind, kind.pil_mode = "pil", mode
    else:
        chw, kind = _from_numpy(image)
    c, h, w = chw.shape
    if h == 0 or w == 0:
        raise ValueError(f"image is empty ({h}x{w} pixels)")
    is_float = kind.kind == "tensor" or _max_value(kind.dtype) is None
    if is_float and not bool(torch.isfinite(chw).all()):
        # One NaN would spread through the encoder's convolutions over the whole output.
        bad = int((~torch.isfinite(chw)).sum())
        raise ValueError(f"image has {bad} NaN or infinite value(s); a floating-point image must "
                         f"hold values in [0, 1]")
    peak = float(chw.max()) if is_float else 0.0
    if peak > 2:  # a float image (a tensor, or a numpy array that is not uint8 / uint16)
        warnings.warn(f"a floating-point image is taken as values in [0, 1], but this one goes up "
                      f"to {peak:g}: everything above 1 comes out white (an 8-bit image as float "
                      f"needs dividing by 255)", stacklevel=3)
    colour = chw[:c - 1] if c in (2, 4) else chw
    alpha = chw[c - 1:] if c in (2, 4) else None
    rgb = colour.expand(3, -1, -1) if colour.shape[0] == 1 else colour
    return (rgb.unsqueeze(0).contiguous(), None if alpha is None else alpha.unsqueeze(0), kind)


def resize_alpha(alpha, out_h, out_w):
    """Bicubic resize of an alpha plane (antialiased when shrinking), clamped to [0, 1]."""
    out = F.interpolate(alpha, size=(out_h, out_w), mode="bicubic", align_corners=False,
                        antialias=True)
    return out.clamp_(0, 1)


def from_tensor(rgb, alpha, kind):
    """The inverse of `to_tensor` for the upscaled (1, 3, h, w) RGB in [0, 1] (and alpha)."""
    planes = rgb[0]
    if kind.channels in (1, 2):
        planes = sum(w * planes[i] for i, w in enumerate(LUMA)).unsqueeze(0)
    if alpha is not None:
        planes = torch.cat([planes, alpha[0]], 0)
    if kind.kind == "tensor":
        out = planes.to(device=kind.device, dtype=kind.dtype)
        return out if kind.squeeze else out.unsqueeze(0)
    hwc = planes.permute(1, 2, 0).cpu().numpy()
    scale = _max_value(kind.dtype)
    if scale is not None:
        hwc = np.clip(np.rint(hwc * scale), 0, scale).astype(kind.dtype)
    else:
        hwc = hwc.astype(kind.dtype)
    if kind.squeeze or (kind.kind == "pil" and hwc.shape[2] == 1):
        hwc = hwc[:, :, 0]
    if kind.kind == "numpy":
        return hwc
    from PIL import Image
    if kind.pil_mode.startswith("I;16"):
        return Image.fromarray(hwc.astype(np.uint16))
    return Image.fromarray(hwc)
