"""Image quality metrics as the LIIF evaluations compute them (spec section 6), on 8-bit-range values.

- `psnr_rgb`: mmediting's PSNR over all channels, `crop` pixels removed from each side.
- `ssim_mmedit`: mmediting's SSIM: float64, 11x11 Gaussian window (sigma 1.5, outer product of 1-D
  kernels), valid filtering, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, mean of the map per channel,
  averaged over the channels scored. `first_channel_only=True` reproduces mmediting 0.x: its crop
  `img[c:-c, c:-c, None]` makes HxWx3 into HxWx1x3, so with crop > 0 only channel 0 is scored, and that
  is Blue because mmediting scored BGR images; pass the images in RGB and the channel is chosen here.
- `psnr_y`: the original paper's PSNR of the Y difference `diff * (65.738, 129.057, 25.064) / 256`,
  summed over channels, `shave` pixels removed, on [0, 1] values.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


SSIM_WINDOW = 11  # the side of SSIM's Gaussian window: SSIM needs images at least this large


def _crop(img, crop):
    if crop < 0:
        raise ValueError(f"crop must be >= 0, got {crop}")
    out = img[crop:-crop, crop:-crop] if crop > 0 else img
    if out.shape[0] < 1 or out.shape[1] < 1:
        raise ValueError(f"removing a {crop}-pixel border from a {img.shape[1]}x{img.shape[0]} "
                         f"image leaves no pixels to score")
    return out


def psnr_rgb(pred, gt, crop=0):
    """PSNR in dB of two (H, W, C) arrays in [0, 255]."""
    a = _crop(np.asarray(pred, dtype=np.float64), crop)
    b = _crop(np.asarray(gt, dtype=np.float64), crop)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 20 * math.log10(255.0 / math.sqrt(mse))


def _gaussian_window():
    x = np.arange(SSIM_WINDOW, dtype=np.float64) - SSIM_WINDOW // 2
    k = np.exp(-(x ** 2) / (2 * 1.5 ** 2))
    k /= k.sum()
    return np.outer(k, k)


def _ssim_channel(a, b):
    """SSIM of two (H, W) float64 planes in [0, 255]."""
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got "
                         f"{a.shape[1]}x{a.shape[0]}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    window = torch.from_numpy(_gaussian_window()).view(1, 1, SSIM_WINDOW, SSIM_WINDOW)

    def filt(x):
        return F.conv2d(torch.from_numpy(x).view(1, 1, *x.shape), window)[0, 0].numpy()

    mu1, mu2 = filt(a), filt(b)
    s11 = filt(a * a) - mu1 ** 2
    s22 = filt(b * b) - mu2 ** 2
    s12 = filt(a * b) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2))
    return float(ssim_map.mean())


def ssim_mmedit(pred, gt, crop=0, first_channel_only=False, bgr_first=True):
    """SSIM of two (H, W, C) RGB arrays in [0, 255] as mmediting computes it (see module doc).

    With `first_channel_only` (mmediting 0.x with crop > 0) only the first channel of the BGR image
    (Blue; Red if `bgr_first` is False) is scored."""
    a = _crop(np.asarray(pred, dtype=np.float64), crop)
    b = _crop(np.asarray(gt, dtype=np.float64), crop)
    if a.ndim == 2:
        a, b = a[:, :, None], b[:, :, None]
    if first_channel_only and crop > 0:
        channel = a.shape[2] - 1 if bgr_first else 0
        return _ssim_channel(a[:, :, channel].copy(), b[:, :, channel].copy())
    return float(np.mean([_ssim_channel(a[:, :, i].copy(), b[:, :, i].copy())
                          for i in range(a.shape[2])]))


def psnr_y(pred, gt, shave=0):
    """The paper's PSNR of the Y difference of two (H, W, 3) RGB arrays in [0, 1]."""
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(gt, dtype=np.float64)
    y = (diff * np.array([65.738, 129.057, 25.064]) / 256).sum(axis=2)
    y = _crop(y, shave)
    mse = np.mean(y ** 2)
    return float("inf") if mse == 0 else -10 * math.log10(mse)
