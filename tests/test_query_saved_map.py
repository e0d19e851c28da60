"""The first-layer map the forward keeps for the backward (liif_cuda::query_saving_map and
query_backward's `first_layer_map`): the same outputs as liif_cuda::query, the map where its rule
says (checked against the fake by opcheck), and the same gradients, bit for bit, as the backward
that makes the map again; on the CPU kernel, the CUDA backward on the host harness, and a GPU."""

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA_SKIP_REASON, deterministic_algorithms
from helpers import build, make_mlp, query_problems, random_inputs
from hypothesis import given

import cuda_harness
import liif_cuda
import liif_reference as ref
from liif_cuda._registration import saves_first_layer_map


def op_args(feat, coords, cells, mlp, flags, precision="fp32", backward_precision="fp32"):
    w, b = liif_cuda.mlp_parameters(mlp)
    return (feat, coords, cells if flags["cell_decode"] else None, [x.detach() for x in w],
            [x.detach() for x in b], flags["local_ensemble"], flags["feat_unfold"],
            flags["cell_decode"], precision, backward_precision)


def backward_args(args, grad_out):
    """query_backward's arguments for query's `args`, every gradient asked for."""
    feat, coords, cells, w, b, le, fu, cd, _, backward_precision = args
    needs = [True, True, cells is not None] + [True] * (2 * len(w))
    return (grad_out, feat, coords, cells, w, b, le, fu, cd, needs, backward_precision)


@given(query_problems())
def test_saved_map_gives_the_same_outputs_and_gradients(problem):
    feat, coords, cells, mlp = build(problem)
    flags = problem["flags"]
    args = op_args(feat, coords, cells, mlp, flags)
    out, first_layer_map = torch.ops.liif_cuda.query_saving_map(*args)
    assert torch.equal(out, torch.ops.liif_cuda.query(*args))
    B, C, H, W = feat.shape
    if saves_first_layer_map(feat, coords, args[3], flags["local_ensemble"], "fp32"):
        # The CPU's map: the convolution of the feature columns, bias included.
        k = 3 if flags["feat_unfold"] else 1
        w0, b0 = args[3][0], args[4][0]
        width0 = w0.shape[0]
        expected = F.conv2d(feat, w0[:, :C * k * k].reshape(width0, C, k, k), b0, padding=k // 2)
        assert first_layer_map.shape == (B, H, W, width0)
        torch.testing.assert_close(first_layer_map, expected.permute(0, 2, 3, 1))
    else:
        assert first_layer_map.numel() == 0
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    again = torch.ops.liif_cuda.query_backward(*backward_args(args, grad_out))
    reused = torch.ops.liif_cuda.query_backward(*backward_args(args, grad_out), first_layer_map)
    for a, r in zip(again, reused):
        assert torch.equal(a, r)


def test_autograd_keeps_the_map_only_when_a_gradient_is_needed(monkeypatch):
    feat, coords, cells = random_inputs(2, 3, 4, 5, 30)
    mlp = make_mlp(ref.imnet_in_dim(3), [8, 8], 3, torch.float32)
    leaf = feat.clone().requires_grad_()
    out = liif_cuda.query(leaf, coords, cells, mlp)
    saved = [t for t in out.grad_fn.saved_tensors if t.dim() == 4 and t.shape[-1] == 8]
    assert len(saved) == 1 and saved[0].shape == (2, 4, 5, 8)
    # The backward operator receives it.
    received = []
    backward = liif_cuda._registration.query_backward

    def spy(*args):
        received.append(args[-1])
        return backward(*args)
    monkeypatch.setattr(liif_cuda._registration, "query_backward", spy)
    out.sum().backward()
    assert len(received) == 1 and received[0] is not None and torch.equal(received[0], saved[0])
    assert leaf.grad is not None
    with torch.no_grad():
        assert torch.equal(liif_cuda.query(leaf, coords, cells, mlp), out.detach())
    # With a frozen MLP and constant inputs there is no graph at all.
    for p in mlp.parameters():
        p.requires_grad_(False)
    assert liif_cuda.query(feat, coords, cells, mlp).grad_fn is None


def test_the_backward_reads_the_map_it_is_given():
    """A map other than the forward's changes the gradients (so the tests above compare a backward
    that really took the saved map), on the CPU kernel and the CUDA backward on the host."""
    feat, coords, cells = random_inputs(2, 3, 4, 5, 40, seed=5)
    mlp = make_mlp(ref.imnet_in_dim(3), [16, 16], 3, torch.float32)
    flags = dict(local_ensemble=True, feat_unfold=True, cell_decode=True)
    args = op_args(feat, coords, cells, mlp, flags)
    _, first_layer_map = torch.ops.liif_cuda.query_saving_map(*args)
    grad_out = torch.randn(2, 40, 3)
    true = torch.ops.liif_cuda.query_backward(*backward_args(args, grad_out), first_layer_map)
    shifted = torch.ops.liif_cuda.query_backward(*backward_args(args, grad_out),
                                                 first_layer_map + 0.5)
    # Layer 1's weight gradient takes layer 0's output, which the map feeds.
    assert not torch.equal(true[3 + 1], shifted[3 + 1])
    w, b = args[3], args[4]
    needs = [True] * (3 + 2 * len(w))
    cuda_harness.load()
    host = [torch.ops.liif_cuda_harness.query_backward(
        grad_out, feat, coords, cells, w, b, True, True, True, needs, 0, False, "fp32", m)
        for m in (first_layer_map, first_layer_map + 0.5)]
    assert not torch.equal(host[0][3 + 1], host[1][3 + 1])


def test_the_map_output_is_not_differentiable():
    """The backward takes the query output's gradient only: a gradient flowing into the map would
    be dropped silently, so the map is marked non-differentiable (autograd refuses it instead)."""
    feat, coords, cells = random_inputs(2, 3, 4, 5, 30)
    mlp = make_mlp(ref.imnet_in_dim(3), [8], 3, torch.float32)
    flags = dict(local_ensemble=True, feat_unfold=True, cell_decode=True)
    args = op_args(feat.requires_grad_(), coords, cells, mlp, flags)
    out, first_layer_map = torch.ops.liif_cuda.query_saving_map(*args)
    assert first_layer_map.numel() > 0 and out.requires_grad
    assert not first_layer_map.requires_grad


@pytest.mark.parametrize("queries", [30, 2], ids=["map", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_query_saving_map(queries, dtype):
    feat, coords, cells = random_inputs(2, 3, 4, 5, queries, dtype=dtype)
    mlp = make_mlp(ref.imnet_in_dim(3), [8, 6], 3, dtype)
    flags = dict(local_ensemble=True, feat_unfold=True, cell_decode=True)
    args = op_args(feat, coords, cells, mlp, flags)
    torch.library.opcheck(torch.ops.liif_cuda.query_saving_map.default, args)
    # With inputs that require gradients: the autograd registration and its backward too.
    grad_args = (args[0].clone().requires_grad_(), args[1].clone().requires_grad_(), args[2],
                 [w.clone().requires_grad_() for w in args[3]], args[4], *args[5:])
    torch.library.opcheck(torch.ops.liif_cuda.query_saving_map.default, grad_args)
    _, first_layer_map = torch.ops.liif_cuda.query_saving_map(*args)
    assert (first_layer_map.numel() > 0) == (queries == 30)
    grad_out = torch.randn(2, queries, 3, dtype=dtype)
    torch.library.opcheck(torch.ops.liif_cuda.query_backward.default,
                          (*backward_args(args, grad_out), first_layer_map),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("local_ensemble,queries,kept", [
    (True, 5, False), (True, 6, True), (False, 20, False), (False, 21, True), (False, 6, False)])
def test_map_kept_exactly_past_one_row_per_lr_cell(local_ensemble, queries, kept):
    """The map is kept when (query, neighbour) rows outnumber the 4 x 5 LR cells (4 rows a query
    with the local ensemble, 1 without) and not when they are as many: the kernel and the fake
    (checked by opcheck) agree with saves_first_layer_map at that boundary."""
    feat, coords, cells = random_inputs(2, 3, 4, 5, queries)
    mlp = make_mlp(ref.imnet_in_dim(3), [8, 6], 3, torch.float32)
    flags = dict(local_ensemble=local_ensemble, feat_unfold=True, cell_decode=True)
    args = op_args(feat, coords, cells, mlp, flags)
    _, first_layer_map = torch.ops.liif_cuda.query_saving_map(*args)
    assert (first_layer_map.numel() > 0) == kept
    assert saves_first_layer_map(feat, coords, args[3], local_ensemble, "fp32") == kept
    torch.library.opcheck(torch.ops.liif_cuda.query_saving_map.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_on_cuda_only_the_exact_map_is_kept():
    """On a CUDA device the map is kept for precision "fp32" alone (a reduced precision's map is not
    the exact one the backward needs); on the CPU for every precision."""
    feat, coords, _ = random_inputs(2, 3, 4, 5, 30)
    w = [torch.empty(8, 27), torch.empty(3, 8)]
    for precision in ("fp32", "tf32", "bf16", "fp16"):
        assert saves_first_layer_map(feat, coords, w, True, precision)
        assert saves_first_layer_map(feat.to("meta"), coords.to("meta"), w, True, precision)
    for precision, kept in (("fp32", True), ("tf32", False), ("bf16", False), ("fp16", False)):
        on_cuda = type("CudaTensor", (), {"shape": feat.shape,
                                           "device": torch.device("cuda", 0)})()
        assert saves_first_layer_map(on_cuda, coords, w, True, precision) == kept


@pytest.mark.parametrize("bad,message", [
    (lambda m: m[:, :-1], r"first_layer_map must be \(B, H, W, width0\)"),
    (lambda m: m.double(), "first_layer_map must have feat's dtype"),
    (lambda m: m.transpose(1, 2).contiguous().transpose(1, 2), "first_layer_map must be contiguous"),
])
def test_bad_first_layer_map_is_a_clear_error(bad, message):
    feat, coords, cells = random_inputs(1, 3, 4, 4, 30)
    mlp = make_mlp(ref.imnet_in_dim(3), [8], 3, torch.float32)
    flags = dict(local_ensemble=True, feat_unfold=True, cell_decode=True)
    args = op_args(feat, coords, cells, mlp, flags)
    _, first_layer_map = torch.ops.liif_cuda.query_saving_map(*args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.liif_cuda.query_backward(*backward_args(args, torch.randn(1, 30, 3)),
                                           bad(first_layer_map))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_backward_on_the_host_takes_the_saved_map(precision):
    """The CUDA backward's map (no bias, (B, H, W, width0)), made by the harness's own
    convolution, given back: the same gradients, bit for bit."""
    feat, coords, cells = random_inputs(2, 3, 4, 5, 40, seed=3)
    mlp = make_mlp(ref.imnet_in_dim(3), [16, 16, 16], 3, torch.float32)
    w, b = [[x.detach() for x in t] for t in liif_cuda.mlp_parameters(mlp)]
    width0 = w[0].shape[0]
    first_layer_map = F.conv2d(feat, w[0][:, :27].reshape(width0, 3, 3, 3), padding=1)
    first_layer_map = first_layer_map.permute(0, 2, 3, 1).contiguous()
    grad_out = torch.randn(2, 40, 3)
    needs = [True] * (3 + 2 * len(w))
    again = cuda_harness.backward(grad_out, feat, coords, cells, w, b, needs, precision=precision)
    reused = torch.ops.liif_cuda_harness.query_backward(
        grad_out, feat, coords, cells, w, b, True, True, True, needs, 0, False, precision,
        first_layer_map)
    for a, r in zip(again, reused):
        assert torch.equal(a, r)


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_saved_map(precision):
    """On a GPU: the map is kept for "fp32" only (the reduced precisions' map has TF32 error), and
    the backward given it computes what it computes without it."""
    feat, coords, cells = [t.cuda() for t in random_inputs(2, 3, 4, 5, 40, seed=4)]
    mlp = make_mlp(ref.imnet_in_dim(3), [16, 16], 3, torch.float32).cuda()
    flags = dict(local_ensemble=True, feat_unfold=True, cell_decode=True)
    args = op_args(feat, coords, cells, mlp, flags, precision=precision)
    out, first_layer_map = torch.ops.liif_cuda.query_saving_map(*args)
    assert torch.equal(out, torch.ops.liif_cuda.query(*args))
    assert (first_layer_map.numel() > 0) == (precision == "fp32")
    torch.library.opcheck(torch.ops.liif_cuda.query_saving_map.default, args)
    grad_out = torch.randn(out.shape, device="cuda")
    # Without atomic adds in the per-cell sum of the map's gradient, so that both are bitwise
    # reproducible.
    with deterministic_algorithms():
        again = torch.ops.liif_cuda.query_backward(*backward_args(args, grad_out))
        reused = torch.ops.liif_cuda.query_backward(*backward_args(args, grad_out),
                                                    first_layer_map)
    for a, r in zip(again, reused):
        assert torch.equal(a, r)
    if first_layer_map.numel() > 0:  # and one it takes: another map changes the gradients
        with deterministic_algorithms():
            shifted = torch.ops.liif_cuda.query_backward(*backward_args(args, grad_out),
                                                         first_layer_map + 0.5)
        assert not torch.equal(reused[3 + 1], shifted[3 + 1])
