"""The CUDA backward (csrc/cuda/liif_query_backward.h and its kernels) executed on the host by the
harness (tests/harness), against the reference's autograd with the tolerances of
test_query_backward.py: hypothesis over shapes, flags, widths, depths and B; the published MLP on
pixel borders, outside [-1, 1] and on a one-pixel map; chunking; every subset of gradients;
non-finite coordinates; the thread order; errors. On a GPU, tests/test_query_cuda.py checks the
same operator there."""

import pytest
import torch
from helpers import build, make_mlp, query_problems, random_inputs
from hypothesis import example, given, settings
from test_query_backward import (LAYER0_ALONE, NEEDS, PUBLISHED_FLAGS, assert_gradients_match,
                                 published_mlp_problem)

import cuda_harness
import liif_cuda
import liif_reference as ref


@given(query_problems())
def test_gradients_match_reference(problem):
    feat, coords, cells, mlp = build(problem)
    flags = problem["flags"]
    assert_gradients_match((feat, coords, cells if flags["cell_decode"] else None, mlp), flags,
                           problem["dtype"], query=cuda_harness.query_with_backward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [
    dict(batch=1, height=1, width=1, queries=20, spread=1.5),     # one-pixel map
    dict(batch=3, height=7, width=5, queries=150, spread=1.3),    # B > 1, outside [-1, 1]
])
def test_gradients_published_mlp(dtype, case):
    """C = 8 and 256-wide hidden layers (the fast forward kernel), half the coordinates on pixel
    borders."""
    assert_gradients_match(published_mlp_problem(dtype, case, [256, 256]), PUBLISHED_FLAGS, dtype,
                           query=cuda_harness.query_with_backward)


def small_problem(cell_decode=True, queries=40, hidden=(16, 12), out_dim=2):
    feat, coords, cells = random_inputs(2, 3, 5, 4, queries, seed=4, dtype=torch.float64,
                                        spread=1.2)
    mlp = make_mlp(ref.imnet_in_dim(3, True, cell_decode), list(hidden), out_dim, torch.float64)
    w, b = (list(x.detach() for x in p) for p in liif_cuda.mlp_parameters(mlp))
    grad_out = torch.randn(2, queries, out_dim, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(5))
    return grad_out, feat, coords, cells if cell_decode else None, w, b


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 100])
def test_chunks_give_the_gradients_of_one_chunk(chunk_rows):
    """Chunks of one query (rows fewer than the neighbours), of several, and one that ends inside
    the second batch element, with a NaN coordinate, against a single chunk."""
    grad_out, feat, coords, cells, w, b = small_problem()
    coords[0, 3] = float("nan")
    needs = [True] * 9
    whole = cuda_harness.backward(grad_out, feat, coords, cells, w, b, needs)
    chunked = cuda_harness.backward(grad_out, feat, coords, cells, w, b, needs,
                                    chunk_rows=chunk_rows)
    for i, (c, o) in enumerate(zip(chunked, whole)):
        torch.testing.assert_close(c, o, rtol=1e-12, atol=1e-14, equal_nan=True, msg=str(i))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("local_ensemble", [True, False])
def test_non_finite_coordinates_as_the_cpu_kernel(value, local_ensemble):
    """A query whose coordinate is not finite: NaN coordinate gradients, zero cell gradients, and
    nothing in the other gradients; equal to the CPU kernel (float64)."""
    grad_out, feat, coords, cells, w, b = small_problem()
    coords[1, 0, 0] = value
    coords[0, 5, 1] = value
    needs = [True] * 9
    args = (grad_out, feat, coords, cells, w, b)
    ours = cuda_harness.backward(*args, needs, local_ensemble=local_ensemble)
    cpu = torch.ops.liif_cuda.query_backward(*args, local_ensemble, True, True, needs)
    for i, (o, c) in enumerate(zip(ours, cpu)):
        torch.testing.assert_close(o, c, rtol=1e-10, atol=1e-12, equal_nan=True, msg=str(i))
    assert ours[1][1, 0].isnan().all() and ours[1][0, 5].isnan().all()
    assert not ours[1][0, 4].isnan().any()
    assert (ours[2][1, 0] == 0).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("local_ensemble", [True, False])
def test_output_gradient_of_an_undecoded_query_is_ignored(value, local_ensemble):
    """A loss of a query's NaN output (its coordinate is not finite) may hand back a NaN or
    infinite output gradient for it (a squared error's, say): the query still contributes nothing,
    the gradients are those of a zero output gradient there, as on the CPU kernel (float64)."""
    grad_out, feat, coords, cells, w, b = small_problem()
    coords[1, 0, 0] = float("nan")
    coords[0, 5, 1] = float("inf")
    needs = [True] * 9
    grad_out[1, 0] = grad_out[0, 5] = 0.0
    zero = cuda_harness.backward(grad_out, feat, coords, cells, w, b, needs,
                                 local_ensemble=local_ensemble)
    grad_out[1, 0] = grad_out[0, 5] = value
    args = (grad_out, feat, coords, cells, w, b)
    ours = cuda_harness.backward(*args, needs, local_ensemble=local_ensemble)
    cpu = torch.ops.liif_cuda.query_backward(*args, local_ensemble, True, True, needs)
    for i, (o, z, c) in enumerate(zip(ours, zero, cpu)):
        assert torch.equal(o.isnan(), z.isnan()), i
        torch.testing.assert_close(o, z, rtol=0, atol=0, equal_nan=True, msg=str(i))
        torch.testing.assert_close(o, c, rtol=1e-10, atol=1e-12, equal_nan=True, msg=str(i))


def with_layer0_alone(test):
    """`test` with an explicit example for each of LAYER0_ALONE (needs asked by keyword)."""
    for needs in LAYER0_ALONE:
        test = example(needs=needs)(test)
    return test


@settings(max_examples=30)
@pytest.mark.parametrize("cell_decode", [True, False])
@given(needs=NEEDS)
@with_layer0_alone
def test_any_subset_of_gradients(cell_decode, needs):
    """What is not asked for comes back empty, what is asked for equals the full computation's."""
    grad_out, feat, coords, cells, w, b = small_problem(cell_decode)
    args = (grad_out, feat, coords, cells, w, b)
    full = cuda_harness.backward(*args, [True] * 9, cell_decode=cell_decode)
    some = cuda_harness.backward(*args, needs, cell_decode=cell_decode)
    for i, (f, s, need) in enumerate(zip(full, some, needs)):
        if need and (i != 2 or cell_decode):
            assert torch.equal(s, f), i
        else:
            assert s.numel() == 0, i


def test_one_layer_mlp_and_no_queries():
    grad_out, feat, coords, cells, w, b = small_problem(hidden=())
    ours = cuda_harness.backward(grad_out, feat, coords, cells, w, b, [True] * 5)
    cpu = torch.ops.liif_cuda.query_backward(grad_out, feat, coords, cells, w, b, True, True, True,
                                             [True] * 5)
    for i, (o, c) in enumerate(zip(ours, cpu)):
        torch.testing.assert_close(o, c, rtol=1e-10, atol=1e-12, msg=str(i))
    empty = cuda_harness.backward(grad_out[:, :0], feat, coords[:, :0], cells[:, :0], w, b,
                                  [True] * 5)
    assert [tuple(g.shape) for g in empty] == [tuple(t.shape) for t in
                                               (feat, coords[:, :0], cells[:, :0], *w, *b)]
    assert all((g == 0).all() for g in empty)


def test_thread_order_does_not_change_the_gradients():
    grad_out, feat, coords, cells, w, b = small_problem()
    forward = cuda_harness.backward(grad_out, feat, coords, cells, w, b, [True] * 9)
    reverse = cuda_harness.backward(grad_out, feat, coords, cells, w, b, [True] * 9,
                                    reverse_order=True)
    assert all(torch.equal(f, r) for f, r in zip(forward, reverse))


@pytest.mark.parametrize("bad,message", [
    (lambda g: g[:, :-1], "grad_out must be"),
    (lambda g: g.float(), "grad_out must have feat's dtype"),
])
def test_bad_grad_out_is_a_clear_error(bad, message):
    grad_out, feat, coords, cells, w, b = small_problem()
    with pytest.raises(RuntimeError, match=message):
        cuda_harness.backward(bad(grad_out), feat, coords, cells, w, b, [True] * 9)


@pytest.mark.parametrize("out_dim", [1, 8, 9])
def test_last_layer_padding(out_dim):
    """The last layer is padded to a multiple of 8 outputs for cuBLAS (none when it already is one):
    the gradients are the CPU kernel's, the padding's cut off."""
    grad_out, feat, coords, cells, w, b = small_problem(out_dim=out_dim)
    args = (grad_out, feat, coords, cells, w, b)
    ours = cuda_harness.backward(*args, [True] * 9, chunk_rows=40)
    cpu = torch.ops.liif_cuda.query_backward(*args, True, True, True, [True] * 9)
    for i, (o, c) in enumerate(zip(ours, cpu)):
        assert o.shape == c.shape and o.is_contiguous(), i
        torch.testing.assert_close(o, c, rtol=1e-10, atol=1e-12, msg=str(i))
