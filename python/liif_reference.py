"""Plain PyTorch restatement of the original LIIF query (Chen et al., CVPR 2021).

This module is the test oracle and the benchmark baseline of liif_cuda. It follows the original code
(`models/liif.py`, `models/mlp.py`, `utils.make_coord`, `test.batched_predict`) statement for statement;
only the model object is replaced by plain functions. Two changes, both needed to run at all:
- the original moves the LR centre grid to `.cuda()`; here it is built on `feat`'s device,
- the original always builds that grid in float32, which `grid_sample` rejects for float64 features;
  here it is built in float64 for them (float32 otherwise, as the original: under autocast, features
  in bf16 or fp16 still meet a float32 grid).

Do not optimise this file: its value is that it is obviously the reference.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EVAL_BSIZE = 30000  # queries per chunk in the original evaluation (`eval_bsize`)


def make_coord(shape, ranges=None, flatten=True, dtype=torch.float32, device=None):
    """Coordinates of pixel centres; the last dimension is (y, x) for a 2-D shape."""
    coord_seqs = []
    for i, n in enumerate(shape):
        if ranges is None:
            v0, v1 = -1, 1
        else:
            v0, v1 = ranges[i]
        r = (v1 - v0) / (2 * n)
        seq = v0 + r + (2 * r) * torch.arange(n, device=device).to(dtype)
        coord_seqs.append(seq)
    ret = torch.stack(torch.meshgrid(*coord_seqs, indexing="ij"), dim=-1)
    if flatten:
        ret = ret.view(-1, ret.shape[-1])
    return ret


def make_cell(coord, out_shape):
    """The cell tensor the original code feeds with `coord`: the size of one output pixel in [-1, 1]."""
    cell = torch.ones_like(coord)
    cell[..., 0] *= 2 / out_shape[0]
    cell[..., 1] *= 2 / out_shape[1]
    return cell


class MLP(nn.Module):
    """The original `models/mlp.py`: Linear/ReLU layers in an `nn.Sequential` named `layers`."""

    def __init__(self, in_dim, out_dim, hidden_list):
        super().__init__()
        layers = []
        lastv = in_dim
        for hidden in hidden_list:
            layers.append(nn.Linear(lastv, hidden))
            layers.append(nn.ReLU())
            lastv = hidden
        layers.append(nn.Linear(lastv, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        shape = x.shape[:-1]
        x = self.layers(x.view(-1, x.shape[-1]))
        return x.view(*shape, -1)


def imnet_in_dim(channels, feat_unfold=True, cell_decode=True):
    """Width of the MLP input for a feature map with `channels` channels."""
    return channels * (9 if feat_unfold else 1) + 2 + (2 if cell_decode else 0)


def query_rgb(feat, coord, cell, imnet, local_ensemble=True, feat_unfold=True, cell_decode=True):
    """The original `LIIF.query_rgb` with the feature map passed in: (B, C, H, W) -> (B, Q, out_dim)."""
    if feat_unfold:
        feat = F.unfold(feat, 3, padding=1).view(
            feat.shape[0], feat.shape[1] * 9, feat.shape[2], feat.shape[3])

    if local_ensemble:
        vx_lst = [-1, 1]
        vy_lst = [-1, 1]
        eps_shift = 1e-6
    else:
        vx_lst, vy_lst, eps_shift = [0], [0], 0

    # field radius (global: [-1, 1])
    rx = 2 / feat.shape[-2] / 2
    ry = 2 / feat.shape[-1] / 2

    grid_dtype = torch.float64 if feat.dtype == torch.float64 else torch.float32
    feat_coord = make_coord(feat.shape[-2:], flatten=False, dtype=grid_dtype, device=feat.device) \
        .permute(2, 0, 1) \
        .unsqueeze(0).expand(feat.shape[0], 2, *feat.shape[-2:])

    preds = []
    areas = []
    for vx in vx_lst:
        for vy in vy_lst:
            coord_ = coord.clone()
            coord_[:, :, 0] += vx * rx + eps_shift
            coord_[:, :, 1] += vy * ry + eps_shift
            coord_.clamp_(-1 + 1e-6, 1 - 1e-6)
            q_feat = F.grid_sample(
                feat, coord_.flip(-1).unsqueeze(1),
                mode='nearest', align_corners=False)[:, :, 0, :] \
                .permute(0, 2, 1)
            q_coord = F.grid_sample(
                feat_coord, coord_.flip(-1).unsqueeze(1),
                mode='nearest', align_corners=False)[:, :, 0, :] \
                .permute(0, 2, 1)
            rel_coord = coord - q_coord
            rel_coord[:, :, 0] *= feat.shape[-2]
            rel_coord[:, :, 1] *= feat.shape[-1]
            inp = torch.cat([q_feat, rel_coord], dim=-1)

            if cell_decode:
                rel_cell = cell.clone()
                rel_cell[:, :, 0] *= feat.shape[-2]
                rel_cell[:, :, 1] *= feat.shape[-1]
                inp = torch.cat([inp, rel_cell], dim=-1)

            bs, q = coord.shape[:2]
            pred = imnet(inp.view(bs * q, -1)).view(bs, q, -1)
            preds.append(pred)

            area = torch.abs(rel_coord[:, :, 0] * rel_coord[:, :, 1])
            areas.append(area + 1e-9)

    tot_area = torch.stack(areas).sum(dim=0)
    if local_ensemble:
        t = areas[0]; areas[0] = areas[3]; areas[3] = t
        t = areas[1]; areas[1] = areas[2]; areas[2] = t

    ret = 0
    for pred, area in zip(preds, areas):
        ret = ret + pred * (area / tot_area).unsqueeze(-1)
    return ret


def batched_query_rgb(feat, coord, cell, imnet, bsize=EVAL_BSIZE, **flags):
    """The original `batched_predict` loop: the query in chunks of `bsize` queries, concatenated."""
    n = coord.shape[1]
    ql = 0
    preds = []
    while ql < n:
        qr = min(ql + bsize, n)
        pred = query_rgb(feat, coord[:, ql: qr, :], cell[:, ql: qr, :], imnet, **flags)
        preds.append(pred)
        ql = qr
    return torch.cat(preds, dim=1)
