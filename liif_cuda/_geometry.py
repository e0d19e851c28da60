"""The per-query geometry of csrc/liif_geometry.h, restated with torch operations.

Used by the recompute-based backward. Every operation is a separately rounded torch operation on the
coordinates' dtype with the same Python constants as the reference, and the cells are picked by
torch's own grid_sample, as the reference picks them, so they are the cells the kernels chose in the
forward pass (which follow grid_sample's rounding on each device).
"""

import torch
import torch.nn.functional as F

CLAMP_LO = -1 + 1e-6
CLAMP_HI = 1 - 1e-6
ENSEMBLE_EPS = 1e-6
AREA_EPS = 1e-9


def neighbour_shifts(height, width, local_ensemble):
    """(shift_y, shift_x) per neighbour, in the reference's order (coordinate 0 in the outer loop)."""
    if not local_ensemble:
        return [(0.0, 0.0)]
    ry = 2 / height / 2
    rx = 2 / width / 2
    return [(vy * ry + ENSEMBLE_EPS, vx * rx + ENSEMBLE_EPS) for vy in (-1, 1) for vx in (-1, 1)]


def _nearest_index(c, size):
    """The cell grid_sample(mode="nearest", align_corners=False) picks along an axis of `size` cells
    for coordinates c: sampled from a map that holds each cell's index (exact: size < 2^24), so that
    the rounding is torch's own on this device and dtype (a fused multiply-add or not)."""
    index_map = torch.arange(size, dtype=c.dtype, device=c.device).view(1, 1, 1, size)
    flat = c.reshape(-1)
    grid = torch.stack([flat, torch.zeros_like(flat)], dim=-1).view(1, 1, -1, 2)
    cell = F.grid_sample(index_map, grid, mode="nearest", align_corners=False)
    return cell.view(c.shape).long()


def neighbour_geometry(coords, height, width, local_ensemble):
    """For coords (B, Q, 2) with finite values: flat cell index iy*W+ix (B, Q, K), relative
    coordinates (B, Q, K, 2) scaled by (H, W), blend weights (B, Q, K) and the total area (B, Q, 1)
    the weights are divided by."""
    indices, rels, areas = [], [], []
    for shift_y, shift_x in neighbour_shifts(height, width, local_ensemble):
        sy = (coords[..., 0] + shift_y).clamp(CLAMP_LO, CLAMP_HI)
        sx = (coords[..., 1] + shift_x).clamp(CLAMP_LO, CLAMP_HI)
        iy = _nearest_index(sy, height)
        ix = _nearest_index(sx, width)
        centre_y = (-1 + 1 / height) + (2 / height) * iy.to(coords.dtype)
        centre_x = (-1 + 1 / width) + (2 / width) * ix.to(coords.dtype)
        rel_y = (coords[..., 0] - centre_y) * height
        rel_x = (coords[..., 1] - centre_x) * width
        indices.append(iy * width + ix)
        rels.append(torch.stack([rel_y, rel_x], dim=-1))
        areas.append((rel_y * rel_x).abs() + AREA_EPS)
    total = areas[0]
    for a in areas[1:]:
        total = total + a
    # Each prediction takes the area of the diagonally opposite neighbour (k <-> K-1-k).
    weights = torch.stack([a / total for a in reversed(areas)], dim=-1)
    return (torch.stack(indices, dim=-1), torch.stack(rels, dim=-2), weights,
            total.unsqueeze(-1))
