"""Recompute-based backward of the fused query, as its own custom operator.

`liif_cuda::query_backward` recomputes the forward pass chunk by chunk with differentiable torch
operations and returns the gradients. Being an operator keeps its chunk loop out of traced graphs
(torch.compile, AOTAutograd), which only see its fake implementation.

Memory: the first-layer map P = conv(feat, W1's feature columns) and its gradient, each
B x width0 x H x W (the 3x3 convolution's own workspace comes on top), plus the autograd activations
of one chunk of `CHUNK_ROWS` queries (all batch elements together): about
CHUNK_ROWS x neighbours x (sum of layer widths) x 3 values. With the published model (width 256 x 4)
that is roughly 100 MB in float32, independent of the number of queries.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._geometry import neighbour_geometry

CHUNK_ROWS = 8192  # queries per recompute chunk, summed over the batch


def _decode(pmap, coords, cells, extra_weight, weights, biases, height, width, local_ensemble):
    """Forward of the query from the precomputed first-layer map pmap (B, H*W, width0)."""
    index, rel, blend = neighbour_geometry(coords, height, width, local_ensemble)
    batch = torch.arange(pmap.shape[0], device=pmap.device).view(-1, 1, 1)
    h = pmap[batch, index]  # (B, q, K, width0)
    extra = rel
    if cells is not None:
        scaled = torch.stack([cells[..., 0] * height, cells[..., 1] * width], dim=-1)
        extra = torch.cat([rel, scaled.unsqueeze(2).expand(-1, -1, rel.shape[2], -1)], dim=-1)
    h = h + F.linear(extra, extra_weight)
    for w, b in zip(weights, biases):
        h = F.linear(torch.relu(h), w, b)
    return (h * blend.unsqueeze(-1)).sum(dim=2)


@torch.library.custom_op("liif_cuda::query_backward", mutates_args=())
def query_backward(grad_out: Tensor, feat: Tensor, coords: Tensor, cells: Optional[Tensor],
                   weights: List[Tensor], biases: List[Tensor], local_ensemble: bool,
                   feat_unfold: bool, cell_decode: bool, needs_grad: List[bool]) -> List[Tensor]:
    """Gradients [feat, coords, cells, *weights, *biases]; an empty tensor where none was asked for.

    `needs_grad` has one flag per returned gradient. Queries whose coordinates are not finite (their
    output is NaN) contribute nothing to the other gradients; their own coordinate gradient is NaN.
    """
    num_layers = len(weights)
    B, C, H, W = feat.shape
    feat_dim = C * (9 if feat_unfold else 1)
    width0 = weights[0].shape[0]
    if not cell_decode:
        cells = None
    need_feat, need_coords, need_cells = needs_grad[:3]
    need_cells = need_cells and cells is not None

    def leaf(t, need):
        return t.detach().requires_grad_(need)

    def wanted(*tensors):
        return [t for t in tensors if t is not None and t.requires_grad]

    # Queries with non-finite coordinates are decoded at (0, 0) with a zero output gradient.
    valid = torch.isfinite(coords).all(dim=-1, keepdim=True)
    safe_coords = torch.where(valid, coords, torch.zeros_like(coords))
    safe_grad_out = torch.where(valid, grad_out, torch.zeros_like(grad_out))
    grad_coords = torch.zeros_like(coords) if need_coords else None
    grad_cells = torch.zeros_like(cells) if need_cells else None

    with torch.enable_grad():
        # Fresh leaves: .grad accumulates over the chunks and the first-layer map's backward.
        feat_l = leaf(feat, need_feat)
        w_l = [leaf(w, n) for w, n in zip(weights, needs_grad[3:3 + num_layers])]
        b_l = [leaf(b, n) for b, n in zip(biases, needs_grad[3 + num_layers:])]
        k = 3 if feat_unfold else 1
        conv_weight = w_l[0][:, :feat_dim].reshape(width0, C, k, k)
        pmap = F.conv2d(feat_l, conv_weight, b_l[0], padding=k // 2)  # (B, width0, H, W)
        pmap_l = leaf(pmap.permute(0, 2, 3, 1).reshape(B, H * W, width0), pmap.requires_grad)

        chunk = max(1, CHUNK_ROWS // max(B, 1))
        for start in range(0, coords.shape[1], chunk):
            stop = min(start + chunk, coords.shape[1])
            coords_c = leaf(safe_coords[:, start:stop], need_coords)
            cells_c = None if cells is None else leaf(cells[:, start:stop], need_cells)
            inputs = wanted(pmap_l, coords_c, cells_c, *w_l, *b_l[1:])
            if not inputs:
                break
            out = _decode(pmap_l, coords_c, cells_c, w_l[0][:, feat_dim:], w_l[1:], b_l[1:],
                          H, W, local_ensemble)
            torch.autograd.backward(out, safe_grad_out[:, start:stop], inputs=inputs)
            if need_coords:
                grad_coords[:, start:stop] = coords_c.grad
            if need_cells:
                grad_cells[:, start:stop] = cells_c.grad

        first_inputs = wanted(feat_l, w_l[0], b_l[0])
        if pmap_l.grad is not None and first_inputs:
            grad_map = pmap_l.grad.view(B, H, W, width0).permute(0, 3, 1, 2)
            torch.autograd.backward(pmap, grad_map, inputs=first_inputs)

    if grad_coords is not None:
        grad_coords = torch.where(valid, grad_coords, torch.full_like(grad_coords, float("nan")))

    def result(g, like, need):
        if not need:
            return like.new_empty(0)
        return g if g is not None else torch.zeros_like(like)

    likes = [feat, coords, cells if cells is not None else coords, *weights, *biases]
    grads = [feat_l.grad, grad_coords, grad_cells, *[w.grad for w in w_l], *[b.grad for b in b_l]]
    return [result(g, t, n) for g, t, n in zip(grads, likes, needs_grad)]


@query_backward.register_fake
def _(grad_out, feat, coords, cells, weights, biases, local_ensemble, feat_unfold, cell_decode,
      needs_grad):
    likes = [feat, coords, cells if cells is not None else coords, *weights, *biases]
    return [t.new_empty(t.shape) if need else t.new_empty(0) for t, need in zip(likes, needs_grad)]
