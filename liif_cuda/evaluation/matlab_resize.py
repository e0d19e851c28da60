"""MATLAB-compatible bicubic `imresize` (antialiased when shrinking), in float64 with numpy.

As MATLAB: cubic kernel with a = -0.5, kernel widened by 1/scale when shrinking (antialiasing),
symmetric padding at the borders, one dimension at a time in order of increasing scale, output size
ceil(size * scale); uint8 input gives uint8 output, float input float output. A uint8 image is
rounded (half away from zero) and clipped to uint8 after each dimension's pass, as MATLAB's
resizing of one dimension returns its input's class: rounding once at the end instead differs from
MATLAB's output by 1 in 14% of the values of a 512x512 -> 123x234 RGB resize (the MATLAB-made
test images of the fatheral/matlab_imresize project; this module matches all of them).
"""

import math

import numpy as np


def _cubic(x):
    ax = np.abs(x)
    ax2, ax3 = ax ** 2, ax ** 3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _contributions(in_len, out_len, scale, antialias=True):
    """(indices (out_len, P) into the input, weights (out_len, P))."""
    width = 4.0
    if scale < 1 and antialias:
        def kernel(x):
            return scale * _cubic(scale * x)
        width = width / scale
    else:
        kernel = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)            # input position (1-based) of each output
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]    # 1-based
    weights = kernel(u[:, None] - idx)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    idx = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(weights != 0, axis=0)
    return idx[:, keep], weights[:, keep]


def _resize_axis(img, axis, out_len, scale):
    idx, weights = _contributions(img.shape[axis], out_len, scale)
    moved = np.moveaxis(img, axis, 0)                  # (in_len, ...)
    gathered = moved[idx]                              # (out_len, P, ...)
    w = weights.reshape(weights.shape + (1,) * (moved.ndim - 1))
    return np.moveaxis((gathered * w).sum(axis=1), 0, axis)


def imresize(img, scale=None, output_shape=None):
    """MATLAB `imresize(img, scale, 'bicubic')` of an (H, W) or (H, W, C) array.

    `scale` is a number or (scale_h, scale_w); `output_shape` (H, W) instead gives the size (the
    scales are then out / in, as MATLAB derives them)."""
    img = np.asarray(img)
    in_h, in_w = img.shape[:2]
    if output_shape is not None:
        out_h, out_w = output_shape
        scales = (out_h / in_h, out_w / in_w)
    else:
        scales = (scale, scale) if np.isscalar(scale) else tuple(scale)
        out_h, out_w = math.ceil(in_h * scales[0]), math.ceil(in_w * scales[1])
    is_uint8 = img.dtype == np.uint8
    out = img.astype(np.float64)
    order = sorted(range(2), key=lambda d: scales[d])  # MATLAB: increasing scale, stable
    for d in order:
        out = _resize_axis(out, d, (out_h, out_w)[d], scales[d])
        if is_uint8:  # each pass's result is uint8, as MATLAB's
            out = np.clip(np.floor(out + 0.5), 0, 255)
    return out.astype(np.uint8) if is_uint8 else out
