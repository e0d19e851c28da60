"""The CUDA kernels, executed on the host by the harness of tests/harness, against the reference.

This runs everywhere (no GPU needed): the harness compiles csrc/cuda/liif_query_kernel.cuh itself with
the host compiler and emulates blocks, threads, barriers and shared memory, with the same Tensor-level
preparation as the CUDA operator; only cuDNN (the first-layer map's convolution) is replaced by the
CPU's convolution. `max_shared_bytes` plays the GPU's per-block shared-memory limit, which decides
between the specialised (published-shape) and the generic kernel.
"""

from fractions import Fraction

import pytest
import torch
from conftest import TOLERANCE, relative_error
from cuda_harness import (FAST, GENERIC, SHARED_DEFAULT, SHARED_SM86, SHARED_SM90, backward,
                          load, reference, run)
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


# The planner's shared-memory sizes (csrc/cuda/liif_query_launch.h): a kernel runs exactly where
# its block fits the device's per-block limit, not a byte less.

def block_bytes(rows, queries, act_bytes, weight_bytes, element_size=4):
    """A block's shared memory as the kernels carve it (liif_query_kernel.cuh, carve_shared):
    activations, weight chunks, then per row rel_y, rel_x and blend weight (T) and LR cell (int),
    per query cell_y and cell_x (T) and state (int)."""
    return (act_bytes + weight_bytes + rows * (3 * element_size + 4)
            + queries * (2 * element_size + 4))


@pytest.mark.parametrize("local_ensemble", [True, False])
def test_fast_kernel_exactly_where_its_block_fits(local_ensemble):
    """64 rows of 256 float32 activations and two chunks of 16 x 256 float32 weights."""
    rows = 64
    fast = block_bytes(rows, rows // (4 if local_ensemble else 1), rows * 256 * 4,
                       2 * 16 * 256 * 4)
    feat, coords, cells = random_inputs(1, 4, 5, 5, 23, seed=2)
    mlp = make_mlp(ref.imnet_in_dim(4), [256, 256], 3, torch.float32)
    expected = reference(feat, coords, cells, mlp, local_ensemble=local_ensemble)
    for shared, path in ((fast, FAST), (fast - 1, GENERIC)):
        out, used = run(feat, coords, cells, mlp, shared, local_ensemble=local_ensemble)
        assert used == path, shared
        assert relative_error(out, expected) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("local_ensemble,hidden,out_dim", [
    (True, [100], 3),     # the widest layer a hidden one
    (False, [5], 3),      # activations rounded up to 32 bytes
    (True, [8], 50),      # the widest layer the last one
])
def test_generic_kernel_down_to_one_query_per_block(dtype, local_ensemble, hidden, out_dim):
    """Where only one query's rows fit, the generic kernel runs one query per block; a byte less
    and the MLP is refused. Its block: two activation buffers of the widest layer per row (rounded
    up to 32 bytes) and the rows' and queries' geometry, in T."""
    rows = 4 if local_ensemble else 1
    element = torch.finfo(dtype).bits // 8
    act = -(-2 * rows * max(hidden + [out_dim]) * element // 32) * 32
    one_query = block_bytes(rows, 1, act, 0, element)
    feat, coords, cells = random_inputs(2, 3, 4, 5, 9, seed=3, dtype=dtype, spread=1.1)
    mlp = make_mlp(ref.imnet_in_dim(3), hidden, out_dim, dtype)
    out, path = run(feat, coords, cells, mlp, one_query, local_ensemble=local_ensemble)
    assert path == GENERIC
    expected = reference(feat, coords, cells, mlp, local_ensemble=local_ensemble)
    assert relative_error(out, expected) <= TOLERANCE[dtype]
    with pytest.raises(RuntimeError, match="shared memory"):
        run(feat, coords, cells, mlp, one_query - 1, local_ensemble=local_ensemble)


def source_indices(c, n, dtype):
    """grid_sample's nearest source index ((c + 1) * n - 1) / 2 on an axis of n cells, rounded half
    to even, computed [as CUDA does: a = c + 1 rounded to dtype, then one fused multiply-add (one
    rounding of the exact a * n - 1); with two roundings (the product's, then the difference's)]."""
    def rounded(x):
        return float(torch.tensor(float(x), dtype=dtype))  # exact in float64 for float32's
    a = Fraction(rounded(Fraction(c) + 1))
    fused = rounded(a * n - 1) / 2
    two_roundings = rounded(Fraction(rounded(a * n)) - 1) / 2
    return [min(max(round(s), 0), n - 1) for s in (fused, two_roundings)]


@pytest.mark.parametrize("dtype,n", [(torch.float32, 97), (torch.float64, 3)])
def test_cells_picked_as_cuda_grid_sample_picks_them(dtype, n):
    """On the GPU the reference's grid_sample computes the source index with a fused multiply-add
    (nvcc contracts it), which sends a few coordinates on cell borders to the other cell than two
    roundings do; the CUDA kernels pick cells as it does, whatever the CPU's grid_sample does.
    Coordinates on every border of an axis of n cells and three floats either side; a pass-through
    MLP outputs the index of the cell it was given, along y and along x."""
    borders = torch.tensor([-1 + 2 * k / n for k in range(1, n)], dtype=dtype)
    coordinates = [borders]
    for direction in (-2.0, 2.0):
        c = borders
        for _ in range(3):
            c = torch.nextafter(c, torch.full_like(c, direction))
            coordinates.append(c)
    c = torch.cat(coordinates)
    expected, two_roundings = zip(*(source_indices(x, n, dtype) for x in c.tolist()))
    assert expected != two_roundings  # the probe tells the two apart
    mlp = make_mlp(3, [1], 1, dtype)  # feature, rel_y, rel_x -> relu(feature)
    with torch.no_grad():
        for m in mlp.layers[::2]:
            m.weight.zero_()
            m.weight[0, 0] = 1
            m.bias.zero_()
    flags = dict(local_ensemble=False, feat_unfold=False, cell_decode=False)
    feat = torch.arange(n, dtype=dtype)
    for axis, shape in ((0, (n, 1)), (1, (1, n))):
        coords = torch.zeros(1, len(c), 2, dtype=dtype)
        coords[0, :, axis] = c
        out, _ = run(feat.view(1, 1, *shape), coords, None, mlp, **flags)
        assert out[0, :, 0].tolist() == [float(i) for i in expected], axis


def test_deepest_mlp_the_parameter_block_holds():
    """The parameter block carries up to kMaxLayers = 64 layers' widths (by value): an MLP of 64
    Linear layers runs, forward and backward; one of 65 is refused clearly."""
    feat, coords, cells = random_inputs(1, 2, 3, 4, 6, seed=6, dtype=torch.float64)
    grad_out = torch.randn(1, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for hidden in ([3] * 63, [3] * 64):
        mlp = make_mlp(ref.imnet_in_dim(2), hidden, 2, torch.float64)
        with torch.no_grad():  # keeps the activations alive through 63 layers
            for m in mlp.layers[2:-1:2]:
                m.weight.copy_(torch.eye(3) + 0.1)
        w, b = (list(x.detach() for x in p) for p in liif_cuda.mlp_parameters(mlp))
        needs = [True] * (3 + 2 * len(w))
        if len(w) > 64:
            with pytest.raises(RuntimeError, match="65 Linear layers, at most 64"):
                run(feat, coords, cells, mlp)
            with pytest.raises(RuntimeError, match="65 Linear layers, at most 64"):
                backward(grad_out, feat, coords, cells, w, b, needs)
            continue
        out, _ = run(feat, coords, cells, mlp)
        expected = reference(feat, coords, cells, mlp)
        assert relative_error(out, expected) <= TOLERANCE[torch.float64]
        ours = backward(grad_out, feat, coords, cells, w, b, needs)
        cpu = torch.ops.liif_cuda.query_backward(grad_out, feat, coords, cells, w, b, True, True,
                                                 True, needs)
        for i, (o, c) in enumerate(zip(ours, cpu)):
            torch.testing.assert_close(o, c, rtol=1e-10, atol=1e-12, msg=str(i))


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


def test_emulation_guards_the_end_of_shared_memory():
    """A block's dynamic shared memory is exactly its launch's size: its last bytes are the
    block's; past them a read sees NaN (as float32, and as fp16 / bf16 for each half) and a write,
    stored or copied asynchronously, is an error (a kernel whose layout outgrew the plan it is
    launched with), also of all-ones bytes (an int -1: the buffer's own NaN fill)."""
    load()
    bounds = torch.ops.liif_cuda_harness.shared_bounds
    value = torch.full((4,), 1.5)
    for async_copy in (False, True):
        assert bounds(value, 256, 240, async_copy, 252).item() == 1.5
    past = bounds(value, 256, 0, False, 256)
    assert torch.isnan(past).all()
    assert past.view(torch.float16).isnan().all() and past.view(torch.bfloat16).isnan().all()
    assert torch.isnan(bounds(value, 250, 0, False, 252)).all()  # in the allocation's rounding
    minus_one = torch.full((4,), -1, dtype=torch.int32).view(torch.float32)
    for write_at, src in ((256, value), (1264, value), (256 + 15360, value), (256, minus_one)):
        with pytest.raises(RuntimeError, match=f"block 0 wrote past the end of its 256 bytes of "
                                               f"dynamic shared memory \\(at byte {write_at}\\)"):
            bounds(src, 256, write_at, False, 0)
    with pytest.raises(RuntimeError, match="block 0 wrote past the end of its 250 bytes .* 250"):
        bounds(value, 250, 240, False, 0)
    with pytest.raises(RuntimeError, match="async_copy_16 to bytes outside the block's 256 bytes"):
        bounds(value, 256, 256, True, 0)
