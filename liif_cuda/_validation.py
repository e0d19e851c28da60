"""Argument checks of the fused query, raising ValueError that names the argument.

Used by the public wrapper and by the fake (meta) implementation, so eager calls and traced calls fail
the same way. csrc/liif_query_checks.h repeats them in C++ for direct calls of the raw operator.
"""

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _check_points(t, name, batch, feat):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 3 or t.shape[2] != 2:
        raise ValueError(f"{name} must be (B, Q, 2) with (y, x) in the last dimension, "
                         f"got shape {tuple(t.shape)}")
    if t.shape[0] != batch:
        raise ValueError(f"{name} has batch size {t.shape[0]} but feat has {batch}")
    _check_like(t, name, feat)


def _check_like(t, name, feat):
    if t.dtype != feat.dtype:
        raise ValueError(f"{name} must have feat's dtype {feat.dtype}, got {t.dtype}")
    if t.device != feat.device:
        raise ValueError(f"{name} must be on feat's device {feat.device}, got {t.device}")


def check_query_args(feat, coords, cells, weights, biases, feat_unfold, cell_decode):
    """Checks the operator's arguments; returns the output shape (B, Q, out_dim)."""
    if not isinstance(feat, torch.Tensor):
        raise ValueError(f"feat must be a tensor, got {type(feat).__name__}")
    if feat.dim() != 4:
        raise ValueError(f"feat must be (B, C, H, W), got shape {tuple(feat.shape)}")
    if feat.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"feat must be float32 or float64 (float16/bfloat16 are computed in "
                         f"float32 by liif_cuda.query), got {feat.dtype}")
    batch, channels, height, width = feat.shape
    if channels < 1 or height < 1 or width < 1:
        raise ValueError(f"feat must have C, H, W >= 1, got shape {tuple(feat.shape)}")
    _check_points(coords, "coords", batch, feat)
    if cell_decode:
        if cells is None:
            raise ValueError("cells is required when cell_decode=True")
        _check_points(cells, "cells", batch, feat)
        if cells.shape[1] != coords.shape[1]:
            raise ValueError(f"cells has {cells.shape[1]} queries but coords has {coords.shape[1]}")
    if len(weights) == 0:
        raise ValueError("imnet: the MLP needs at least one Linear layer")
    if len(weights) != len(biases):
        raise ValueError(f"imnet: got {len(weights)} weights but {len(biases)} biases")
    feat_dim = channels * (9 if feat_unfold else 1)
    expected_in = feat_dim + 2 + (2 if cell_decode else 0)
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2:
            raise ValueError(f"imnet: layer {i} weight must be (out, in), got shape {tuple(w.shape)}")
        if w.shape[1] != expected_in:
            if i == 0:
                raise ValueError(
                    f"imnet: the first layer takes {w.shape[1]} inputs, but feat with C={channels} "
                    f"and feat_unfold={feat_unfold}, cell_decode={cell_decode} gives {expected_in} "
                    f"(C*9 with feat_unfold or C, + 2 coordinates, + 2 with cell_decode)")
            raise ValueError(f"imnet: layer {i} takes {w.shape[1]} inputs but layer {i - 1} "
                             f"outputs {expected_in}")
        if w.shape[0] < 1:
            raise ValueError(f"imnet: layer {i} has no outputs")
        if b.dim() != 1 or b.shape[0] != w.shape[0]:
            raise ValueError(f"imnet: layer {i} bias must be ({w.shape[0]},), "
                             f"got shape {tuple(b.shape)}")
        _check_like(w, f"imnet layer {i} weight", feat)
        _check_like(b, f"imnet layer {i} bias", feat)
        expected_in = w.shape[0]
    return batch, coords.shape[1], weights[-1].shape[0]
