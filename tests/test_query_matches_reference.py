"""The fused query against the reference query_rgb (python/liif_reference.py) on the CPU."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCE, relative_error
from helpers import build, make_mlp, query_problems, random_inputs
from hypothesis import given

import liif_cuda
import liif_reference as ref


@given(query_problems())
def test_fused_matches_reference(problem):
    feat, coords, cells, mlp = build(problem)
    flags = problem["flags"]
    inputs = [feat, coords, cells, *mlp.parameters()]
    before = [t.detach().clone() for t in inputs]
    with torch.no_grad():
        expected = ref.query_rgb(feat, coords, cells, mlp, **flags)
        out = liif_cuda.query(feat, coords, cells, mlp, **flags)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert relative_error(out, expected) <= TOLERANCE[problem["dtype"]]
    assert all(torch.equal(t, b) for t, b in zip(inputs, before)), "an input was modified"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,size,queries", [(1, 16, 1000), (2, 7, 333), (1, 40, 50),
                                                (2, 40, 300)])
def test_published_shape(dtype, batch, size, queries):
    """C = 64 and the published MLP 580-256x4-3: several tiles, a partial last tile, and both the
    precomputed-map (many queries) and per-row (few queries, large map: 40x40 with 50 or 300
    queries, one tile or several) first layers."""
    feat, coords, cells = random_inputs(batch, 64, size, size, queries, seed=size, dtype=dtype)
    mlp = make_mlp(580, [256] * 4, 3, dtype)
    with torch.no_grad():
        expected = ref.query_rgb(feat, coords, cells, mlp)
        out = liif_cuda.query(feat, coords, cells, mlp)
    assert relative_error(out, expected) <= TOLERANCE[dtype]


def test_full_grid_matches_chunked_reference():
    """A whole output image, as the evaluation runs it: the reference in 30000-query chunks."""
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(1, 64, 20, 24, generator=g)
    coord = ref.make_coord((70, 85)).unsqueeze(0)
    cell = ref.make_cell(coord, (70, 85))
    mlp = make_mlp(580, [256] * 4, 3, torch.float32)
    with torch.no_grad():
        expected = ref.batched_query_rgb(feat, coord, cell, mlp, bsize=1000)
        out = liif_cuda.query(feat, coord, cell, mlp)
    assert relative_error(out, expected) <= TOLERANCE[torch.float32]


def test_results_do_not_depend_on_thread_count():
    feat, coords, cells = random_inputs(2, 8, 9, 11, 900, seed=4)
    mlp = make_mlp(76, [32, 32], 3, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = liif_cuda.query(feat, coords, cells, mlp)
        torch.set_num_threads(max(2, threads))
        many = liif_cuda.query(feat, coords, cells, mlp)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_zero_queries_returns_empty():
    feat = torch.randn(2, 3, 4, 5)
    coords = torch.empty(2, 0, 2)
    mlp = make_mlp(31, [8], 3, torch.float32)
    out = liif_cuda.query(feat, coords, coords.clone(), mlp)
    assert out.shape == (2, 0, 3)


class _MLPSubclass(ref.MLP):
    """A subclass of LIIF's MLP that keeps its forward (the layers only): accepted."""

    def __init__(self, mlp):
        torch.nn.Module.__init__(self)
        self.layers = mlp.layers


class _LayersHolder(torch.nn.Module):
    """A module that only holds the layers (its forward is nn.Module's, it has none of its own):
    nothing but the layers to compute, so accepted."""

    def __init__(self, mlp):
        super().__init__()
        self.layers = mlp.layers


class MLPRefiner(torch.nn.Module):
    """mmediting's and mmagic's MLP, whose forward is its layers on the last dimension."""

    def __init__(self, mlp):
        super().__init__()
        self.layers = mlp.layers

    def forward(self, x):
        shape = x.shape[:-1]
        return self.layers(x.view(-1, x.shape[-1])).view(*shape, -1)


class ImplicitDecoder(torch.nn.Module):
    """A fork's MLP under another name, with the original's forward: accepted by its code."""

    def __init__(self, mlp):
        super().__init__()
        self.layers = mlp.layers

    def forward(self, x):
        """Its docstring does not change its code."""
        shape = x.shape[:-1]
        x = self.layers(x.view(-1, x.shape[-1]))
        return x.view(*shape, -1)


def test_imnet_forms_agree():
    """Sequential, a module with .layers (LIIF's MLP, a subclass that keeps its forward,
    mmediting's MLPRefiner, a module with no forward of its own), and (weight, bias) pairs, with
    and without biases."""
    feat, coords, cells = random_inputs(1, 4, 5, 6, 30, seed=5)
    mlp = make_mlp(40, [16, 8], 2, torch.float32)
    pairs = [(m.weight, m.bias) for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    expected = ref.query_rgb(feat, coords, cells, mlp)
    for imnet in (mlp, mlp.layers, pairs, tuple(pairs), _MLPSubclass(mlp), MLPRefiner(mlp),
                  _LayersHolder(mlp), ImplicitDecoder(mlp), liif_cuda.models.MLP(40, 2, [16, 8])):
        if isinstance(imnet, liif_cuda.models.MLP):
            imnet.load_state_dict(mlp.state_dict())
        assert relative_error(liif_cuda.query(feat, coords, cells, imnet), expected) <= 1e-5
    no_bias = torch.nn.Sequential(torch.nn.Linear(40, 16, bias=False), torch.nn.ReLU(),
                                  torch.nn.Linear(16, 2))
    expected = ref.query_rgb(feat, coords, cells, no_bias)
    out = liif_cuda.query(feat, coords, cells, [(no_bias[0].weight, None),
                                                (no_bias[2].weight, no_bias[2].bias)])
    assert relative_error(out, expected) <= 1e-5
    assert relative_error(liif_cuda.query(feat, coords, cells, no_bias), expected) <= 1e-5


def test_missing_biases_in_float64():
    """A missing bias counts as zeros of its weight's dtype and device: float64 too."""
    feat, coords, cells = random_inputs(1, 4, 5, 6, 30, seed=5, dtype=torch.float64)
    no_bias = torch.nn.Sequential(torch.nn.Linear(40, 16, bias=False), torch.nn.ReLU(),
                                  torch.nn.Linear(16, 2, bias=False)).double()
    expected = ref.query_rgb(feat, coords, cells, no_bias)
    assert relative_error(liif_cuda.query(feat, coords, cells, no_bias), expected) <= 1e-12


def test_cells_ignored_without_cell_decode():
    feat, coords, _ = random_inputs(1, 3, 4, 4, 10, seed=6)
    mlp = make_mlp(29, [8], 3, torch.float32)
    expected = ref.query_rgb(feat, coords, None, mlp, cell_decode=False)
    out = liif_cuda.query(feat, coords, None, mlp, cell_decode=False)
    assert relative_error(out, expected) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    feat, coords, cells = (t.to(dtype) for t in random_inputs(1, 4, 6, 6, 50, seed=7))
    mlp = make_mlp(40, [16], 3, torch.float32).to(dtype)
    out = liif_cuda.query(feat, coords, cells, mlp)
    assert out.dtype == dtype
    expected = liif_cuda.query(feat.float(), coords.float(), cells.float(), mlp.float())
    assert torch.equal(out, expected.to(dtype))


def test_non_finite_coordinates_give_nan_and_stay_in_bounds():
    feat, coords, cells = random_inputs(2, 4, 5, 5, 6, seed=8)
    coords[0, 1, 0] = float("nan")
    coords[0, 2, 1] = float("inf")
    coords[1, 3, 0] = -float("inf")
    coords[1, 4] = float("nan")
    mlp = make_mlp(40, [16], 3, torch.float32)
    out = liif_cuda.query(feat, coords, cells, mlp)
    bad = ~torch.isfinite(coords).all(-1)
    assert torch.isnan(out[bad]).all()
    expected = ref.query_rgb(feat, coords, cells, mlp)
    assert torch.isnan(expected[bad]).all()  # the reference's result, too
    assert relative_error(out[~bad], expected[~bad]) <= 1e-5


def test_huge_coordinates_are_clamped_like_the_reference():
    feat, _, cells = random_inputs(1, 4, 5, 7, 4, seed=9)
    coords = torch.tensor([[[1e30, -1e30], [-3.0, 2.0], [1.0, -1.0], [0.999999, -0.999999]]])
    mlp = make_mlp(40, [16], 3, torch.float32)
    expected = ref.query_rgb(feat, coords, cells, mlp)
    out = liif_cuda.query(feat, coords, cells, mlp)
    finite = torch.isfinite(expected).all(-1)
    assert torch.equal(torch.isfinite(out).all(-1), finite)
    assert relative_error(out[finite], expected[finite]) <= 1e-5


@pytest.mark.parametrize("feat_unfold", [True, False])
def test_one_pixel_map_leaves_the_mlp_untouched(feat_unfold):
    """A 1x1 map makes the first-layer map a single row: it must not alias the first bias."""
    feat, coords, cells = random_inputs(2, 3, 1, 1, 5, seed=10)
    mlp = make_mlp(ref.imnet_in_dim(3, feat_unfold), [], 2, torch.float32)
    before = [p.detach().clone() for p in mlp.parameters()]
    first = liif_cuda.query(feat, coords, cells, mlp, feat_unfold=feat_unfold)
    second = liif_cuda.query(feat, coords, cells, mlp, feat_unfold=feat_unfold)
    assert all(torch.equal(p, b) for p, b in zip(mlp.parameters(), before))
    assert torch.equal(first, second)
    expected = ref.query_rgb(feat, coords, cells, mlp, feat_unfold=feat_unfold)
    assert relative_error(first, expected) <= TOLERANCE[torch.float32]


def _selecting_mlp(channels, selected):
    """A one-layer MLP whose output j is input `selected[j]`."""
    in_dim = ref.imnet_in_dim(channels)
    mlp = ref.MLP(in_dim, len(selected), []).double()
    with torch.no_grad():
        mlp.layers[0].weight.zero_()
        mlp.layers[0].bias.zero_()
        for j, i in enumerate(selected):
            mlp.layers[0].weight[j, i] = 1.0
    return mlp


@pytest.mark.parametrize("query", [ref.query_rgb, liif_cuda.query])
def test_the_query_is_bilinear_interpolation_for_a_pass_through_mlp(query):
    """An oracle independent of python/: with the local ensemble, an MLP that passes a feature
    through makes LIIF bilinear interpolation (grid_sample, align_corners False, border padding):
    the swapped areas are the bilinear weights. Pins make_coord, rx / ry, the eps shift and clamp,
    the area swap, the 3x3 unfold's order (its centre and its top-left entry), the relative
    coordinates' and cells' scaling by H and W, for the reference and the kernel alike."""
    g = torch.Generator().manual_seed(11)
    B, C, H, W, Q = 2, 3, 5, 7, 400

    def exact(n):  # LR pixel centres (not the last: see below) and the edges between pixels
        return [-1 + (2 * k + 1) / n for k in range(n - 1)] + [-1 + 2 * k / n for k in range(1, n)]
    grid = torch.tensor([(y, x) for y in exact(H) for x in exact(W)], dtype=torch.float64)
    feat = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    coords = (torch.rand(B, Q, 2, generator=g, dtype=torch.float64) * 2 - 1) * 1.3
    coords[:, :len(grid)] = grid
    cells = torch.rand(B, Q, 2, generator=g, dtype=torch.float64) * 0.5
    centre = [9 * c + 4 for c in range(C)]
    top_left = [9 * c for c in range(C)]
    rel = [9 * C, 9 * C + 1, 9 * C + 2, 9 * C + 3]
    mlp = _selecting_mlp(C, centre + top_left + rel)
    with torch.no_grad():
        out = query(feat, coords, cells, mlp)

    def bilinear(f):
        return F.grid_sample(f, coords.flip(-1).unsqueeze(1), mode="bilinear",
                             padding_mode="border", align_corners=False)[:, :, 0].permute(0, 2, 1)
    shifted = F.pad(feat, (1, 0, 1, 0))[..., :H, :W]  # feat[y - 1, x - 1], zero outside
    # Not on the first / last centres, where both neighbours of an axis are one cell and their
    # areas vanish with the relative coordinate (the 1e-9 then weighs the four alike).
    ok = ((coords[..., 0].abs() - (1 - 1 / H)).abs() > 1e-3) & \
        ((coords[..., 1].abs() - (1 - 1 / W)).abs() > 1e-3)
    # The 1e-9 LIIF adds to each area moves the weights by up to 3e-8 here (areas down to 1e-3 by
    # 1e-3 of an LR pixel's side next to the left-out bands).
    torch.testing.assert_close(out[..., :C][ok], bilinear(feat)[ok], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[..., C:2 * C][ok], bilinear(shifted)[ok], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[..., 2 * C + 2], cells[..., 0] * H, rtol=1e-7, atol=0)
    torch.testing.assert_close(out[..., 2 * C + 3], cells[..., 1] * W, rtol=1e-7, atol=0)
    # Beyond the map's last centres every neighbour is the same cell: the relative coordinate of
    # that cell's centre, in LR pixels.
    for axis, n in ((0, H), (1, W)):
        c = coords[..., axis]
        outside = c.abs() > 1 - 1 / n
        nearest_centre = torch.sign(c) * (1 - 1 / n)
        torch.testing.assert_close(out[..., 2 * C + axis][outside],
                                   ((c - nearest_centre) * n)[outside], rtol=1e-7, atol=1e-9)
        assert outside.sum() > 20


def test_parametrized_linear_is_accepted():
    """weight_norm's parametrization (a Linear subclass that keeps Linear's forward, its weight
    computed on access): the fused op reads the weight it computes."""
    feat, coords, cells = random_inputs(1, 4, 5, 6, 30, seed=6)
    mlp = make_mlp(40, [16], 2, torch.float32)
    torch.nn.utils.parametrizations.weight_norm(mlp.layers[0])
    with torch.no_grad():
        mlp.layers[0].parametrizations.weight.original0.mul_(1.5)  # weight no longer the init's
    expected = ref.query_rgb(feat, coords, cells, mlp)
    assert relative_error(liif_cuda.query(feat, coords, cells, mlp), expected) <= 1e-5
