"""Fake (meta) and autograd registration of the C++ operators liif_cuda::query and
liif_cuda::query_saving_map (the same forward, also returning the first-layer map its backward
reuses)."""

import torch

from ._backward import query_backward
from ._validation import check_query_args


@torch.library.register_fake("liif_cuda::query")
def _query_fake(feat, coords, cells, weights, biases, local_ensemble, feat_unfold, cell_decode,
                precision="fp32", backward_precision="fp32"):
    shape = check_query_args(feat, coords, cells, weights, biases, feat_unfold, cell_decode)
    return feat.new_empty(shape)


def saves_first_layer_map(feat, coords, weights, local_ensemble, precision):
    """Whether query_saving_map returns a first-layer map (B, H, W, width0), as its kernels decide:
    where there is something to compute and more (query, neighbour) rows per image than LR cells
    (csrc/liif_query_checks.h's first_layer_map_pays_off), and on CUDA only where the map is the
    exact one (precision "fp32")."""
    B, _, H, W = feat.shape
    Q = coords.shape[1]
    if B * Q * weights[-1].shape[0] == 0 or Q * (4 if local_ensemble else 1) <= H * W:
        return False
    return feat.device.type != "cuda" or precision == "fp32"


@torch.library.register_fake("liif_cuda::query_saving_map")
def _query_saving_map_fake(feat, coords, cells, weights, biases, local_ensemble, feat_unfold,
                           cell_decode, precision="fp32", backward_precision="fp32"):
    shape = check_query_args(feat, coords, cells, weights, biases, feat_unfold, cell_decode)
    B, _, H, W = feat.shape
    if saves_first_layer_map(feat, coords, weights, local_ensemble, precision):
        first_layer_map = feat.new_empty((B, H, W, weights[0].shape[0]))
    else:
        first_layer_map = feat.new_empty((0,))
    return feat.new_empty(shape), first_layer_map


def _setup_context(ctx, inputs, output):
    feat, coords, cells, weights, biases, local_ensemble, feat_unfold, cell_decode = inputs[:8]
    ctx.num_layers = len(weights)
    ctx.flags = (local_ensemble, feat_unfold, cell_decode)
    ctx.has_cells = cells is not None
    # The dispatcher may leave out trailing arguments equal to their defaults (see _backward).
    ctx.backward_precision = inputs[9] if len(inputs) > 9 else "fp32"
    saved = [feat, coords, *weights, *biases]
    if cells is not None:
        saved.append(cells)
    # query_saving_map: its first-layer map, an output nobody differentiates. Undefined output
    # gradients stay None: autograd would otherwise make a map-sized tensor of zeros for the map's.
    ctx.has_map = isinstance(output, tuple)
    if ctx.has_map:
        ctx.mark_non_differentiable(output[1])
        saved.append(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_out, *unused_map_grad):
    # The gradients are those of the exact (float32 / float64) function, whatever the forward's
    # precision, unless backward_precision is "bf16": the backward operator recomputes the forward
    # in the inputs' dtype (as the bf16 forward does, for "bf16", whose gradient products between
    # hidden layers take bf16 operands), from the forward's first-layer map where it was saved.
    saved = ctx.saved_tensors
    n = ctx.num_layers
    feat, coords = saved[0], saved[1]
    weights, biases = list(saved[2:2 + n]), list(saved[2 + n:2 + 2 * n])
    cells = saved[2 + 2 * n] if ctx.has_cells else None
    first_layer_map = saved[-1] if ctx.has_map else None
    need_feat, need_coords, need_cells, need_w, need_b = ctx.needs_input_grad[:5]
    needs = [bool(need_feat), bool(need_coords), bool(need_cells) and cells is not None,
             *[bool(x) for x in need_w], *[bool(x) for x in need_b]]
    grads = []
    if grad_out is None:  # the output took no part in what is differentiated: no gradients
        needs = [False] * len(needs)
    else:
        grads = query_backward(grad_out.contiguous(), feat, coords, cells, weights, biases,
                               *ctx.flags, needs, ctx.backward_precision, first_layer_map)

    def pick(i):
        return grads[i] if needs[i] else None

    grads = (pick(0), pick(1), pick(2), [pick(3 + i) for i in range(n)],
             [pick(3 + n + i) for i in range(n)], None, None, None, None, None)
    # One gradient per argument the operator was called with: the dispatcher may leave out
    # trailing arguments equal to their defaults (precision="fp32", backward_precision="fp32"),
    # and torch 2.11 then refuses a gradient for them (later releases drop them themselves).
    # needs_input_grad has one flag per argument passed.
    return grads[:len(ctx.needs_input_grad)]


torch.library.register_autograd("liif_cuda::query", _backward, setup_context=_setup_context)
torch.library.register_autograd("liif_cuda::query_saving_map", _backward,
                                setup_context=_setup_context)
