"""The CUDA kernels, executed on the host by the harness of tests/harness, against the reference.

This runs everywhere (no GPU needed): the harness compiles csrc/cuda/liif_query_kernel.cuh itself with
the host compiler and emulates blocks, threads, barriers and shared memory, with the same Tensor-level
preparation as the CUDA operator; only cuDNN (the first-layer map's convolution) is replaced by the
CPU's convolution. `max_shared_bytes` plays the GPU's per-block shared-memory limit, which decides
between the specialised (published-shape) and the generic kernel.
"""

import pytest
import torch
from conftest import TOLERANCE, relative_error
from cuda_harness import (FAST, GENERIC, SHARED_DEFAULT, SHARED_SM86, SHARED_SM90, load,
                          reference, run)
from helpers import build, make_mlp, published_problem, query_problems, random_inputs
from hypothesis import given
from hypothesis import strategies as st

import liif_cuda
import liif_reference as ref


@given(query_problems(), st.sampled_from([SHARED_DEFAULT, SHARED_SM86]), st.booleans())
def test_generic_kernel_matches_reference(problem, shared, reverse_order):
    """Any C, widths, depth, out_dim, flags, B, float32/float64, borders, coordinates outside."""
    feat, coords, cells, mlp = build(problem)
    flags = problem["flags"]
    out, path = run(feat, coords, cells, mlp, shared, reverse_order, **flags)
    assert path == GENERIC
    expected = reference(feat, coords, cells, mlp, **flags)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert relative_error(out, expected) <= TOLERANCE[problem["dtype"]]


@pytest.mark.parametrize("shared,path", [(SHARED_SM86, FAST), (SHARED_SM90, FAST),
                                         (SHARED_DEFAULT, GENERIC)])
@pytest.mark.parametrize("batch,height,width,queries", [
    (1, 6, 5, 16),    # one full block of the fast kernel
    (1, 6, 5, 37),    # a partial last block
    (2, 4, 7, 45),    # B > 1: blocks straddle the images
    (3, 1, 1, 5),     # a one-pixel map
])
def test_published_shape(shared, path, batch, height, width, queries):
    """C = 64 and the published MLP 580-256x4-3, coordinates on pixel borders and outside the map."""
    feat, coords, cells, mlp = published_problem(batch, height, width, queries)
    out, used = run(feat, coords, cells, mlp, shared)
    assert used == path
    assert relative_error(out, reference(feat, coords, cells, mlp)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("flags", [dict(local_ensemble=False), dict(feat_unfold=False),
                                   dict(cell_decode=False)])
def test_fast_kernel_flags(flags):
    """Without the local ensemble a block of the fast kernel holds 64 queries instead of 16."""
    feat, coords, cells = random_inputs(2, 8, 5, 6, 70, seed=1, spread=1.1)
    in_dim = ref.imnet_in_dim(8, flags.get("feat_unfold", True), flags.get("cell_decode", True))
    mlp = make_mlp(in_dim, [256] * 3, 3, torch.float32)
    out, path = run(feat, coords, cells, mlp, **flags)
    assert path == FAST
    expected = reference(feat, coords, cells, mlp, **flags)
    assert relative_error(out, expected) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("hidden,out_dim,path", [
    ([256], 3, FAST),             # one hidden layer: straight to the last layer
    ([256, 256], 1, FAST),
    ([256, 256], 128, FAST),      # the widest last layer the fast kernel keeps
    ([256, 256], 129, GENERIC),
    ([256, 128, 256], 3, GENERIC),
    ([512], 3, GENERIC),
])
def test_kernel_choice_and_last_layer(hidden, out_dim, path):
    feat, coords, cells = random_inputs(1, 4, 5, 5, 23, seed=2)
    mlp = make_mlp(ref.imnet_in_dim(4), hidden, out_dim, torch.float32)
    out, used = run(feat, coords, cells, mlp)
    assert used == path
    assert relative_error(out, reference(feat, coords, cells, mlp)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("shared", [SHARED_SM90, SHARED_DEFAULT])
def test_non_finite_coordinates(shared):
    feat, coords, cells = random_inputs(2, 4, 5, 5, 20, seed=3)
    coords[0, 1, 0] = float("nan")
    coords[1, 7, 1] = float("inf")
    coords[1, 19] = -float("inf")
    mlp = make_mlp(ref.imnet_in_dim(4), [256, 256], 3, torch.float32)
    out, _ = run(feat, coords, cells, mlp, shared)
    expected = reference(feat, coords, cells, mlp)
    bad = ~torch.isfinite(coords).all(-1)
    assert torch.isnan(out[bad]).all() and torch.isnan(expected[bad]).all()
    assert relative_error(out[~bad], expected[~bad]) <= TOLERANCE[torch.float32]


def test_matches_cpu_kernel_float64():
    feat, coords, cells = random_inputs(2, 5, 6, 4, 50, seed=4, dtype=torch.float64, spread=1.3)
    mlp = make_mlp(ref.imnet_in_dim(5), [32, 16], 3, torch.float64)
    out, _ = run(feat, coords, cells, mlp)
    assert relative_error(out, liif_cuda.query(feat, coords, cells, mlp)) <= 1e-13


def test_too_wide_layer_is_refused():
    feat, coords, cells = random_inputs(1, 2, 3, 3, 4, seed=5)
    mlp = make_mlp(ref.imnet_in_dim(2), [8000], 3, torch.float32)
    with pytest.raises(RuntimeError, match="shared memory"):
        run(feat, coords, cells, mlp, SHARED_SM86)


# The emulation itself: a missing barrier and a divergent barrier must not go unnoticed.

@pytest.mark.parametrize("reverse_order", [False, True])
def test_emulation_orders_threads_at_barriers(reverse_order):
    load()
    blocks, threads = 3, 64
    out = torch.ops.liif_cuda_harness.exchange(blocks, threads, True, reverse_order)
    index = torch.arange(blocks * threads, dtype=torch.int32).view(blocks, threads)
    assert torch.equal(out.view(blocks, threads), index.roll(-1, dims=1))


def test_emulation_exposes_a_missing_barrier():
    load()
    blocks, threads = 2, 32
    expected = torch.arange(blocks * threads, dtype=torch.int32).view(blocks, threads).roll(-1, 1)
    forward = torch.ops.liif_cuda_harness.exchange(blocks, threads, False, False)
    # In thread order, thread t reads slot t + 1 before thread t + 1 has written it.
    assert not torch.equal(forward.view(blocks, threads), expected)


def test_emulation_rejects_a_divergent_barrier():
    load()
    with pytest.raises(RuntimeError, match="__syncthreads"):
        torch.ops.liif_cuda_harness.divergent_barrier()
