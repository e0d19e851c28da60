"""The evaluation protocols of LIIF's published tables (spec section 6): how the LR input and the ground
truth are made from an HR file, how the prediction is rounded, and how it is scored.

- "mmedit" (mmediting 0.x, the model card): GT = HR cropped top-left to a multiple of 12 (GTmod12), then
  to round(h_lr * s) x round(w_lr * s) with h_lr = floor(H / s + 1e-9); LR by Pillow bicubic of the 8-bit
  GT to h_lr x w_lr (H and W the image's after GTmod12, not the GT's); prediction clamped to [0, 1] and rounded to 8 bits; RGB PSNR and SSIM with `crop` pixels removed
  (default the scale), SSIM of the Blue channel only (mmediting 0.x's quirk, see metrics.py).
- "mmagic" (mmagic 1.x): as "mmedit" but the prediction is clamped to [0, 255] and not rounded, and SSIM
  averages the three channels.
- "paper" (the LIIF paper): GT = HR cropped by the same floor rule; LR by Pillow bicubic, or read from
  `lr_dir` (the MATLAB-bicubic LR files of the x2-x4 benchmark runs); prediction clamped to [0, 1];
  PSNR of the Y difference with shave = scale (RGB with shave = scale + 6 for DIV2K); no SSIM.
- "classic" (the bicubic rows of the SR literature, EDSR/RCAN-style MATLAB scoring): GT cropped to a
  multiple of the scale; PSNR of MATLAB's 8-bit Y channel (rgb2ycbcr on uint8: rounded), a grayscale
  file's own values taken as Y, shave = scale; no SSIM. Use it with `resize="matlab"` and the
  "bicubic" model for the classic rows.
`resize="matlab"` makes the LR with MATLAB's bicubic imresize instead of Pillow's.
`check_image_size` applies these rules to an image's size alone: it refuses (ImageTooSmall) an image
whose LR image would be empty or whose ground truth keeps no pixel after the border is removed (fewer
than SSIM's 11x11 where SSIM is computed), so that evaluate() can check every image before any work.
"""

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .matlab_resize import imresize
from .metrics import SSIM_WINDOW, psnr_rgb, psnr_y, ssim_mmedit

PROTOCOLS = ("mmedit", "mmagic", "paper", "classic")


@dataclass
class Sample:
    name: str
    lr: np.ndarray   # (h, w, 3) uint8
    gt: np.ndarray   # (H, W, 3) uint8; the output size
    gray: bool       # the file is single-channel (replicated to RGB here)


def read_rgb(path):
    """An image file as (H, W, 3) uint8, grayscale replicated, as LIIF's loaders (.convert('RGB'))."""
    return read_image(path)[0]


def read_image(path):
    """(the image as (H, W, 3) uint8 RGB, whether the file is grayscale)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), im.mode in ("L", "LA", "I", "I;16", "1")


def lr_shape(h, w, scale):
    return math.floor(h / scale + 1e-9), math.floor(w / scale + 1e-9)


def gt_shape(h, w, scale):
    """(H, W) of the ground truth cropped from an (h, w) image (after GTmod12 where the protocol has
    it): round(h_lr * s) x round(w_lr * s), never more than the image."""
    h_lr, w_lr = lr_shape(h, w, scale)
    return min(h, round(h_lr * scale)), min(w, round(w_lr * scale))


def crop_for_scale(hr, scale):
    gt_h, gt_w = gt_shape(*hr.shape[:2], scale)
    return hr[:gt_h, :gt_w]


def mod12_shape(h, w, protocol):
    """The image size after the protocol's GTmod12 crop (mmedit, mmagic), or as it is."""
    if protocol in ("mmedit", "mmagic"):
        return h - h % 12, w - w % 12
    return h, w


def downscale(gt, lr_size, resize="pillow"):
    """The LR image of the ground truth `gt`: (h_lr, w_lr) = `lr_size`, by Pillow's bicubic or
    MATLAB's imresize."""
    h_lr, w_lr = lr_size
    if resize == "matlab":
        return imresize(gt, output_shape=(h_lr, w_lr))
    return np.asarray(Image.fromarray(gt).resize((w_lr, h_lr), Image.BICUBIC))


class LRFileMissing(FileNotFoundError):
    """No LR file in `lr_dir` for an HR image at a scale."""


def find_lr_file(lr_dir, name, scale):
    stem = os.path.splitext(name)[0]
    s = f"{scale:g}"
    for folder in (os.path.join(lr_dir, f"X{s}"), os.path.join(lr_dir, f"x{s}"), lr_dir):
        for candidate in (f"{stem}x{s}", f"{stem}_x{s}", stem):
            for ext in (".png", ".bmp", ".jpg", ".tif"):
                path = os.path.join(folder, candidate + ext)
                if os.path.isfile(path):
                    return path
    raise LRFileMissing(f"no LR file for {name} at x{s} under {lr_dir} (tried X{s}/{stem}x{s}.png "
                        f"and similar)")


class LRFileMismatch(ValueError):
    """An LR file (from `lr_dir`) whose size is not the LR size of its HR image at that scale: made
    for another scale or another crop of the image, it would be scored against a ground truth it
    does not match."""


def check_lr_size(lr_path, lr_h, lr_w, name, h, w, scale, protocol):
    """Raises LRFileMismatch unless an (lr_h, lr_w) LR file fits the (h, w) HR image `name` at
    `scale` under `protocol`: floor(size / scale) of the image (after GTmod12 where the protocol
    has it), the size the HR image is cropped to match."""
    want_h, want_w = lr_shape(*mod12_shape(h, w, protocol), scale)
    if (lr_h, lr_w) != (want_h, want_w):
        raise LRFileMismatch(
            f"{lr_path} is {lr_w}x{lr_h}, but x{scale:g} of {name} ({w}x{h}) under the {protocol} "
            f"protocol needs a {want_w}x{want_h} LR image")


def make_sample(path, scale, protocol, resize="pillow", lr_dir=None):
    hr, gray = read_image(path)
    h12, w12 = mod12_shape(*hr.shape[:2], protocol)
    gt = crop_for_scale(hr[:h12, :w12], scale)  # GTmod12 first under mmedit and mmagic
    if lr_dir is not None:
        lr_path = find_lr_file(lr_dir, os.path.basename(path), scale)
        lr = read_rgb(lr_path)
        check_lr_size(lr_path, *lr.shape[:2], path, *hr.shape[:2], scale, protocol)
    else:
        # The LR size is the image's (after GTmod12), as the original code and mmediting take it:
        # floor(size / s) of the ground truth cropped to round(h_lr * s) can be a pixel less.
        lr = downscale(gt, lr_shape(h12, w12, scale), resize)
    return Sample(os.path.basename(path), lr, gt, gray)


def finish_prediction(pred, protocol):
    """(H, W, 3) float prediction in model range [0, 1] -> the values the protocol scores, 0..255."""
    pred = np.clip(pred, 0, 1) * 255
    return np.round(pred) if protocol in ("mmedit", "classic") else pred


def matlab_y(rgb255):
    """MATLAB rgb2ycbcr's Y of uint8 RGB values: 16 + (65.481 R + 128.553 G + 24.966 B) / 255,
    rounded as MATLAB returns uint8."""
    x = np.asarray(rgb255, dtype=np.float64)
    return np.round(16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255)


def scoring_border(scale, protocol, crop=None, div2k=False):
    """(pixels removed from each side of the prediction and the ground truth before scoring, whether
    SSIM is computed). `crop` counts only under mmedit and mmagic (default: the scale)."""
    if protocol == "classic":
        return math.ceil(scale), False
    if protocol == "paper":
        return math.ceil(scale) + (6 if div2k else 0), False
    return (math.ceil(scale) if crop is None else crop), True


class OptionIgnored(ValueError):
    """A setting given under a protocol that has no use for it (`option`: "crop" or "div2k")."""

    def __init__(self, option, detail):
        self.option, self.detail = option, detail
        super().__init__(f"{option} {detail}")


def check_protocol_options(protocol, crop=None, div2k=False):
    """Refuses `crop` and `div2k` under a protocol that would ignore them (OptionIgnored)."""
    if crop is not None and protocol not in ("mmedit", "mmagic"):
        border = "the scale + 6 with div2k, else the scale" if protocol == "paper" else "the scale"
        raise OptionIgnored("crop", f"applies under the mmedit and mmagic protocols only; the "
                                    f"{protocol} protocol removes its own border ({border})")
    if div2k and protocol != "paper":
        raise OptionIgnored("div2k", f"applies under the paper protocol only, not {protocol}")


class ImageTooSmall(ValueError):
    """An image that cannot be scored at a scale: its LR image would be empty, or the border removed
    before scoring leaves no pixels (or fewer than SSIM's window). `option` names the setting to
    change: "scale", "crop" (an explicit crop) or "protocol" (GTmod12 leaves nothing); `detail` says
    why, naming the image and its size."""

    def __init__(self, option, value, detail):
        self.option, self.value, self.detail = option, value, detail
        shown = f"{value:g}" if isinstance(value, float) else value
        super().__init__(f"{option} {shown}: {detail}")


def check_image_size(name, h, w, scale, protocol, crop=None, div2k=False):
    """Raises ImageTooSmall when an (h, w) image named `name` cannot be scored at `scale` under
    `protocol` (the rules of make_sample and score, from the size alone)."""
    h12, w12 = mod12_shape(h, w, protocol)
    if h12 < 1 or w12 < 1:
        raise ImageTooSmall("protocol", protocol, (
            f"{name} ({w}x{h}) is too small: the protocol crops it to a multiple of 12 pixels, "
            f"which leaves {w12}x{h12}"))
    h_lr, w_lr = lr_shape(h12, w12, scale)
    if h_lr < 1 or w_lr < 1:
        raise ImageTooSmall("scale", scale, (
            f"{name} ({w}x{h}) is too small for x{scale:g}: its LR image would be {w_lr}x{h_lr}"))
    gt_h, gt_w = gt_shape(h12, w12, scale)
    border, ssim = scoring_border(scale, protocol, crop, div2k)
    left_h, left_w = max(0, gt_h - 2 * border), max(0, gt_w - 2 * border)
    need = SSIM_WINDOW if ssim else 1
    if left_h >= need and left_w >= need:
        return
    explicit_crop = crop is not None and protocol in ("mmedit", "mmagic")
    what = ("the crop" if explicit_crop else
            "the scale + 6, div2k" if protocol == "paper" and div2k else "the scale")
    why = (f"removing a {border}-pixel border ({what}) from its {gt_w}x{gt_h} ground truth leaves "
           f"{left_w}x{left_h}" + (f", and SSIM needs at least {need}x{need}" if ssim and
                                   left_h and left_w else ""))
    if explicit_crop:
        raise ImageTooSmall("crop", crop, f"{name} ({w}x{h}) at x{scale:g}: {why}")
    raise ImageTooSmall("scale", scale, f"{name} ({w}x{h}) is too small for x{scale:g}: {why}")


def score(pred255, gt, scale, protocol, crop=None, div2k=False, gray=False):
    """{'psnr': ..., 'ssim': ... or None} of one image, values in [0, 255]."""
    gt = gt.astype(np.float64)
    border, _ = scoring_border(scale, protocol, crop, div2k)
    if protocol == "classic":
        if gray:
            a, b = pred255[..., :1], gt[..., :1]
        else:
            a, b = matlab_y(pred255)[..., None], matlab_y(gt)[..., None]
        return {"psnr": psnr_rgb(a, b, crop=border), "ssim": None}
    if protocol == "paper":
        if div2k:
            return {"psnr": psnr_rgb(pred255, gt, crop=border), "ssim": None}
        return {"psnr": psnr_y(pred255 / 255, gt / 255, shave=border), "ssim": None}
    return {"psnr": psnr_rgb(pred255, gt, border),
            "ssim": ssim_mmedit(pred255, gt, border, first_channel_only=protocol == "mmedit")}
