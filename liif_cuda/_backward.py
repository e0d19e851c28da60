"""The backward of the fused query: the operator liif_cuda::query_backward (schema in
csrc/liif_query_schema.cpp), its fake implementation, and the recompute backward in torch operations.

The operator is C++: the fused kernel on the CPU (csrc/cpu/liif_query_backward_cpu.cpp), kernels
around cuBLAS products on CUDA (csrc/cuda/liif_query_backward.h). `recompute_backward` below is the
same computation in torch operations, kept as the tests' second opinion and the benchmarks' former
CUDA backward: it recomputes the forward pass chunk by chunk and back-propagates through it by hand:
the MLP, the blend weights (areas of the opposite neighbours) and the relative coordinates, then the
first-layer map P = conv(feat, W1's feature columns) through the convolution's own gradient
functions.

Memory of the recompute backward: P and its gradient, each B x width0 x H x W (plus the convolution
gradients' workspace), and the temporaries of one chunk of queries (all batch elements together), at
most about `CHUNK_BYTES`, independent of the number of queries. On CUDA its per-cell accumulation
(index_add_) uses atomic adds unless torch.use_deterministic_algorithms(True) is on.
"""

import contextlib
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._geometry import neighbour_geometry

# Temporaries of one recompute chunk: few large chunks keep a GPU busy (chunks of 2048 queries made
# the training shape's forward + backward 3.3x slower than the reference's autograd on an H200),
# within a bounded memory.
CHUNK_BYTES = 512 * 2**20
MIN_CHUNK_QUERIES = 2048


def chunk_queries(batch, neighbours, widths, element_size):
    """Queries per batch element in one chunk: each (query, neighbour) row holds every layer's
    input, its gradient and a product in flight, about 3 x sum(widths) elements."""
    per_query = 3 * neighbours * sum(widths) * element_size
    total = max(MIN_CHUNK_QUERIES, CHUNK_BYTES // per_query)
    return max(1, total // max(batch, 1))


@contextlib.contextmanager
def _float32_convolutions(device):
    """cuDNN runs float32 convolutions on TF32 tensor cores by default (torch.backends.cudnn.allow_tf32),
    with a 1e-3 error; the gradients here stay in full float32, as the CUDA forward's map does."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def recompute_backward(grad_out: Tensor, feat: Tensor, coords: Tensor, cells: Optional[Tensor],
                       weights: List[Tensor], biases: List[Tensor], local_ensemble: bool,
                       feat_unfold: bool, cell_decode: bool,
                       needs_grad: List[bool]) -> List[Tensor]:
    """Gradients [feat, coords, cells, *weights, *biases]; an empty tensor where none was asked for.

    `needs_grad` has one flag per returned gradient. Queries whose coordinates are not finite (their
    output is NaN) contribute nothing to the other gradients; their own coordinate gradient is NaN.
    """
    with _float32_convolutions(feat.device):
        return _query_backward(grad_out, feat, coords, cells, weights, biases, local_ensemble,
                               feat_unfold, cell_decode, needs_grad)


def query_backward(grad_out, feat, coords, cells, weights, biases, local_ensemble, feat_unfold,
                   cell_decode, needs_grad, precision="fp32", first_layer_map=None):
    """The gradients of liif_cuda::query (see recompute_backward for their order); with the
    first-layer map that liif_cuda::query_saving_map returned for these inputs, if any."""
    return torch.ops.liif_cuda.query_backward(grad_out, feat, coords, cells, weights, biases,
                                              local_ensemble, feat_unfold, cell_decode, needs_grad,
                                              precision, first_layer_map)


def _query_backward(grad_out, feat, coords, cells, weights, biases, local_ensemble, feat_unfold,
                    cell_decode, needs_grad):
    L = len(weights)
    B, C, H, W = feat.shape
    feat_dim = C * (9 if feat_unfold else 1)
    width0 = weights[0].shape[0]
    cells = cells if cell_decode else None
    k = 3 if feat_unfold else 1
    conv_weight = weights[0][:, :feat_dim].reshape(width0, C, k, k)
    extra_weight = weights[0][:, feat_dim:]  # columns of rel_y, rel_x (, cell_y*H, cell_x*W)

    pmap = F.conv2d(feat, conv_weight, biases[0], padding=k // 2)  # (B, width0, H, W)
    pmap = pmap.permute(0, 2, 3, 1).reshape(B, H * W, width0)
    grad_pmap = pmap.new_zeros(pmap.shape)  # contiguous, whatever the layout of pmap
    grad_w = [torch.zeros_like(w) for w in weights]
    grad_b = [torch.zeros_like(b) for b in biases]
    grad_coords = torch.zeros_like(coords)
    grad_cells = torch.zeros_like(cells) if cells is not None else None

    # Queries with non-finite coordinates are decoded at (0, 0) with a zero output gradient.
    valid = torch.isfinite(coords).all(dim=-1, keepdim=True)
    coords = torch.where(valid, coords, torch.zeros_like(coords))
    grad_out = torch.where(valid, grad_out, torch.zeros_like(grad_out))
    batch_index = torch.arange(B, device=feat.device).view(-1, 1, 1)
    size = coords.new_tensor([H, W])

    chunk = chunk_queries(B, 4 if local_ensemble else 1, [w.shape[0] for w in weights],
                          feat.element_size())
    for start in range(0, coords.shape[1], chunk):
        stop = min(start + chunk, coords.shape[1])
        g = grad_out[:, start:stop]
        index, rel, blend, total = neighbour_geometry(coords[:, start:stop], H, W, local_ensemble)
        K = index.shape[-1]
        extra = rel
        if cells is not None:
            scaled = cells[:, start:stop] * size
            extra = torch.cat([rel, scaled.unsqueeze(2).expand(-1, -1, K, -1)], dim=-1)

        # Forward, keeping each layer's input.
        h = pmap[batch_index, index] + extra @ extra_weight.t()  # (B, q, K, width0)
        inputs = []
        for l in range(1, L):
            a = torch.relu(h)
            inputs.append(a)
            h = torch.addmm(biases[l], a.reshape(-1, a.shape[-1]), weights[l].t()).view(
                *a.shape[:-1], -1)
        pred = h  # (B, q, K, out_dim)

        # Blend: out = sum_k blend_k * pred_k.
        grad_h = g.unsqueeze(2) * blend.unsqueeze(-1)
        grad_blend = (g.unsqueeze(2) * pred).sum(-1)  # (B, q, K)
        for l in range(L - 1, 0, -1):
            a = inputs[l - 1]
            gh = grad_h.reshape(-1, grad_h.shape[-1])
            grad_w[l] += gh.t() @ a.reshape(-1, a.shape[-1])
            grad_b[l] += gh.sum(0)
            grad_h = (grad_h @ weights[l]) * (a > 0)

        # Layer 0: the gathered map rows and the coordinate (and cell) columns.
        flat_index = (index + batch_index * (H * W)).reshape(-1)
        grad_pmap.view(-1, width0).index_add_(0, flat_index, grad_h.reshape(-1, width0))
        grad_w[0][:, feat_dim:] += grad_h.reshape(-1, width0).t() @ extra.reshape(-1, extra.shape[-1])
        grad_extra = grad_h @ extra_weight  # (B, q, K, 2 or 4)
        if grad_cells is not None:
            grad_cells[:, start:stop] = grad_extra[..., 2:].sum(2) * size

        # Blend weights: blend_k = area_opp(k) / total, area_j = |rel_y_j * rel_x_j| + 1e-9.
        grad_area = (grad_blend.flip(-1) - (grad_blend * blend).sum(-1, keepdim=True)) / total
        prod = rel[..., 0] * rel[..., 1]
        grad_prod = grad_area * torch.sign(prod)
        grad_rel = grad_extra[..., :2] + grad_prod.unsqueeze(-1) * rel.flip(-1)
        grad_coords[:, start:stop] = grad_rel.sum(2) * size

    # Through the convolution that made the map.
    grad_map = grad_pmap.view(B, H, W, width0).permute(0, 3, 1, 2)
    grad_feat = None
    if needs_grad[0]:
        grad_feat = torch.nn.grad.conv2d_input(feat.shape, conv_weight, grad_map, padding=k // 2)
    if needs_grad[3]:
        grad_conv = torch.nn.grad.conv2d_weight(feat, conv_weight.shape, grad_map, padding=k // 2)
        grad_w[0][:, :feat_dim] = grad_conv.reshape(width0, feat_dim)
    grad_b[0] = grad_map.sum((0, 2, 3))
    grad_coords = torch.where(valid, grad_coords, torch.full_like(grad_coords, float("nan")))

    grads = [grad_feat, grad_coords, grad_cells, *grad_w, *grad_b]
    likes = [feat, coords, coords, *weights, *biases]
    return [gr if need and gr is not None else like.new_empty(0)
            for gr, like, need in zip(grads, likes, needs_grad)]


@torch.library.register_fake("liif_cuda::query_backward")
def _(grad_out, feat, coords, cells, weights, biases, local_ensemble, feat_unfold, cell_decode,
      needs_grad, precision="fp32", first_layer_map=None):
    likes = [feat, coords, cells if cells is not None else coords, *weights, *biases]
    return [t.new_empty(t.shape) if need else t.new_empty(0) for t, need in zip(likes, needs_grad)]


def _no_double_backward(ctx, *grads):
    raise RuntimeError("liif_cuda.query: double backward (gradients of gradients) is not supported")


def _no_context(ctx, inputs, output):
    pass


torch.library.register_autograd("liif_cuda::query_backward", _no_double_backward,
                                setup_context=_no_context)
