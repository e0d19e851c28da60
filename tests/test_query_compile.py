"""The operator's registration: opcheck (schema, fake, autograd, AOT dispatch) and torch.compile."""

import pytest
import torch
from helpers import make_mlp, random_inputs

import liif_cuda


def op_args(requires_grad, dtype=torch.float32, cell_decode=True):
    feat, coords, cells = random_inputs(2, 3, 4, 5, 9, dtype=dtype)
    cells = cells if cell_decode else None
    mlp = make_mlp(27 + 2 + (2 if cell_decode else 0), [8, 6], 3, dtype)
    weights, biases = liif_cuda.mlp_parameters(mlp)
    weights = [w.detach().clone().requires_grad_(requires_grad) for w in weights]
    biases = [b.detach().clone().requires_grad_(requires_grad) for b in biases]
    feat.requires_grad_(requires_grad)
    return (feat, coords, cells, weights, biases, True, True, cell_decode)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("cell_decode", [True, False])
def test_opcheck(requires_grad, cell_decode):
    torch.library.opcheck(torch.ops.liif_cuda.query.default,
                          op_args(requires_grad, cell_decode=cell_decode))


def test_opcheck_bf16_precisions():
    """The forward and the backward in their bf16 modes (the operator's last two arguments)."""
    torch.library.opcheck(torch.ops.liif_cuda.query.default, (*op_args(True), "bf16", "bf16"))


def test_opcheck_backward_op():
    feat, coords, cells, weights, biases, *flags = op_args(False)
    grad_out = torch.randn(2, 9, 3)
    needs = [True, True, True] + [True] * (2 * len(weights))
    for precision in ("fp32", "bf16"):
        torch.library.opcheck(torch.ops.liif_cuda.query_backward.default,
                              (grad_out, feat, coords, cells, weights, biases, *flags, needs,
                               precision),
                              test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    mlp = make_mlp(31, [16, 16], 3, torch.float32)

    @torch.compile(fullgraph=True)
    def upscale(feat, coords, cells):
        return liif_cuda.query(feat, coords, cells, mlp).clamp(-1, 1) * 0.5 + 0.5

    for q in (20, 37):  # a second shape exercises recompilation / dynamic shapes
        feat, coords, cells = random_inputs(1, 3, 6, 7, q, seed=q)
        expected = liif_cuda.query(feat, coords, cells, mlp).clamp(-1, 1) * 0.5 + 0.5
        torch.testing.assert_close(upscale(feat, coords, cells), expected)


def test_compile_backward():
    mlp = make_mlp(31, [8], 3, torch.float32)

    @torch.compile(fullgraph=True)
    def loss(feat, coords, cells):
        return liif_cuda.query(feat, coords, cells, mlp).square().sum()

    feat, coords, cells = random_inputs(1, 3, 5, 5, 30, seed=2)
    feat.requires_grad_()
    loss(feat, coords, cells).backward()
    eager = feat.detach().clone().requires_grad_()
    liif_cuda.query(eager, coords, cells, mlp).square().sum().backward()
    torch.testing.assert_close(feat.grad, eager.grad)


class _Decoder(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, feat, coords, cells):
        return liif_cuda.query(feat, coords, cells, self.mlp)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_export_with_any_number_of_queries(requires_grad):
    """torch.export with a dynamic query count, parameters requiring gradients (an nn.Module's
    default) or not: the exported program equals eager on other shapes too, and its backward runs.
    (With gradients the forward would keep its first-layer map where the shapes make it pay off, a
    decision on the query count that an exported program cannot take: it does not keep it there.)"""
    decoder = _Decoder(make_mlp(31, [8], 3, torch.float32)).requires_grad_(requires_grad)
    feat, coords, cells = random_inputs(1, 3, 4, 5, 30, seed=4)
    queries = torch.export.Dim("queries")
    program = torch.export.export(decoder, (feat, coords, cells),
                                  dynamic_shapes=({}, {1: queries}, {1: queries}))
    for q in (7, 30, 90):  # fewer and more (query, neighbour) rows than the map's 20 cells
        feat, coords, cells = random_inputs(1, 3, 4, 5, q, seed=q)
        out = program.module()(feat, coords, cells)
        torch.testing.assert_close(out, decoder(feat, coords, cells), rtol=0, atol=0)
        if requires_grad:
            out.square().sum().backward()
            grads = [p.grad for p in program.module().parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("transform", ["vmap", "grad", "jvp", "jacrev", "jacfwd"])
def test_func_transforms_are_refused(transform):
    """torch.func transforms would fail with a message about an autograd.Function nobody wrote
    (grad, jacrev), or return zero tangents silently (jvp, jacfwd): a clear error instead."""
    mlp = make_mlp(31, [8], 3, torch.float32)
    feat, coords, cells = random_inputs(1, 3, 4, 5, 9, seed=3)

    def f(x):
        return liif_cuda.query(x, coords, cells, mlp)

    calls = {"vmap": lambda: torch.func.vmap(f)(feat[None]),
             "grad": lambda: torch.func.grad(lambda x: f(x).sum())(feat),
             "jvp": lambda: torch.func.jvp(f, (feat,), (torch.ones_like(feat),)),
             "jacrev": lambda: torch.func.jacrev(f)(feat),
             "jacfwd": lambda: torch.func.jacfwd(f)(feat)}
    with pytest.raises(NotImplementedError, match="does not support torch.func transforms"):
        calls[transform]()


def test_functionalize_is_fine():
    mlp = make_mlp(31, [8], 3, torch.float32)
    feat, coords, cells = random_inputs(1, 3, 4, 5, 9, seed=3)
    out = torch.func.functionalize(lambda x: liif_cuda.query(x, coords, cells, mlp))(feat)
    torch.testing.assert_close(out, liif_cuda.query(feat, coords, cells, mlp), rtol=0, atol=0)


def test_jit_trace_with_gradients_passes_its_check():
    """torch.jit.trace of a module whose parameters require gradients: its default check (which
    reruns the function) passes, the trace equals eager on other inputs and its backward runs."""
    decoder = _Decoder(make_mlp(31, [8], 3, torch.float32))
    feat, coords, cells = random_inputs(1, 3, 4, 5, 30, seed=5)
    traced = torch.jit.trace(decoder, (feat, coords, cells))
    feat, coords, cells = random_inputs(1, 3, 4, 5, 30, seed=6)
    out = traced(feat, coords, cells)
    torch.testing.assert_close(out, decoder(feat, coords, cells), rtol=0, atol=0)
    out.square().sum().backward()
    assert all(p.grad is not None for p in decoder.parameters())
