"""The public fused query: a drop-in replacement for LIIF's `query_rgb`."""

import torch

from ._mlp import mlp_parameters
from ._validation import SUPPORTED_DTYPES, check_query_args

_COMPUTED_IN_FLOAT32 = (torch.float16, torch.bfloat16)


def _check_floating(t, name):
    if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
        kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating-point tensor, got {kind}")


def query(feat, coords, cells, imnet, *, local_ensemble=True, feat_unfold=True, cell_decode=True):
    """LIIF's `query_rgb` as one fused operator: (B, Q, out_dim) predictions for query points.

    Args:
        feat: (B, C, H, W) feature map of the encoder.
        coords: (B, Q, 2) query coordinates in [-1, 1], (y, x) order, as `make_coord` makes them.
            Coordinates outside [-1, 1] behave as in the reference: sampling is clamped to the map,
            the relative coordinate is not. A query with a NaN or infinite coordinate returns NaN in
            every channel (the reference's result) and never reads outside the map.
        cells: (B, Q, 2) size of an output pixel, (2 / H_out, 2 / W_out); may be None when
            `cell_decode` is False.
        imnet: the MLP: an `nn.Sequential` of Linear/ReLU, a module with such a `.layers`
            (LIIF's `MLP`, mmediting's `MLPRefiner`), or a sequence of (weight, bias) pairs.
        local_ensemble, feat_unfold, cell_decode: LIIF's three flags (all True in published models).

    Devices: CPU tensors run the CPU kernel, CUDA tensors the CUDA kernel (when liif_cuda was built
    with it, see `liif_cuda.build_info()`), on the tensors' device and the current stream.

    Dtypes: float32 and float64 are computed in their own precision. float16 and bfloat16 inputs are
    computed in float32 and the result is returned in the input dtype. All tensors, MLP parameters
    included, must share one dtype and device.

    Autograd: gradients flow to feat, coords, cells and every MLP weight and bias. The backward pass
    recomputes the forward in chunks (see liif_cuda/_backward.py for its memory cost); double
    backward is not supported.
    """
    weights, biases = mlp_parameters(imnet)
    _check_floating(feat, "feat")
    _check_floating(coords, "coords")
    if cell_decode:
        _check_floating(cells, "cells")
    else:
        cells = None
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check_floating(w, f"imnet layer {i} weight")
        _check_floating(b, f"imnet layer {i} bias")

    dtype = feat.dtype
    if dtype in _COMPUTED_IN_FLOAT32:
        def up(t):
            if t.dtype != dtype:
                raise ValueError(f"all inputs must share feat's dtype {dtype}, got {t.dtype}")
            return t.float()
        feat, coords = up(feat), up(coords)
        cells = None if cells is None else up(cells)
        weights = [up(w) for w in weights]
        biases = [up(b) for b in biases]
    elif dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"feat must be float32, float64, float16 or bfloat16, got {dtype}")

    check_query_args(feat, coords, cells, weights, biases, feat_unfold, cell_decode)
    out = torch.ops.liif_cuda.query(feat, coords, cells, weights, biases,
                                    local_ensemble, feat_unfold, cell_decode)
    return out.to(dtype)
