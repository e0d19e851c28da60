"""Exact LR cell borders: the operator picks the cell that torch's own grid_sample picks, on the same
device and dtype (issue 16).

On a full grid of exact borders and centres (every multiple of 1/(2H) along y and 1/(2W) along x,
the first and last clamped to +-(1 - 1e-6) by the reference) the nearest cell is a tie decided by the
last bit of ((c + 1) * H - 1) / 2, which torch computes with a fused multiply-add on this CPU and on
CUDA. The feature map holds each cell's own (iy, ix) and the MLP is one linear layer reading them, so
the output *is* the chosen cell (without the local ensemble) and any other choice is visible."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import CUDA_SKIP_REASON

import liif_cuda
import liif_reference as ref

SHAPES = [(n, n) for n in range(1, 34)] + [(257, 3), (3, 257), (97, 5), (4, 107), (16, 9), (1, 40)]
GRADIENT_SHAPES = [(1, 1), (3, 3), (5, 4), (6, 7), (33, 2)]


def tie_grid(height, width, dtype, batch=1):
    """(B, Q, 2) coordinates: every (k / (2H), l / (2W)), k in -2H..2H, l in -2W..2W."""
    ys = torch.arange(-2 * height, 2 * height + 1, dtype=torch.float64) / (2 * height)
    xs = torch.arange(-2 * width, 2 * width + 1, dtype=torch.float64) / (2 * width)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(1, -1, 2)
    return grid.to(dtype).expand(batch, -1, -1).contiguous()


def index_features(height, width, dtype, batch=1):
    """(B, 2, H, W): each cell holds its own (iy, ix)."""
    iy = torch.arange(height, dtype=dtype).view(height, 1).expand(height, width)
    ix = torch.arange(width, dtype=dtype).view(1, width).expand(height, width)
    return torch.stack([iy, ix]).unsqueeze(0).expand(batch, -1, -1, -1).contiguous()


def reading_mlp(dtype):
    """One linear layer: (iy, ix, rel_y, rel_x) -> (iy, ix), exactly."""
    return [(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=dtype), torch.zeros(2, dtype=dtype))]


FLAGS = dict(feat_unfold=False, cell_decode=False)


def query(feat, coords, mlp, local_ensemble, device="cpu"):
    with torch.no_grad():
        return liif_cuda.query(feat.to(device), coords.to(device), None,
                               [(w.to(device), b.to(device)) for w, b in mlp],
                               local_ensemble=local_ensemble, **FLAGS).cpu()


def reference(feat, coords, mlp, local_ensemble, device="cpu"):
    linear = torch.nn.Linear(4, 2).to(feat.dtype)
    with torch.no_grad():
        linear.weight.copy_(mlp[0][0])
        linear.bias.copy_(mlp[0][1])
    with torch.no_grad():
        return ref.query_rgb(feat.to(device), coords.to(device), None, linear.to(device),
                             local_ensemble=local_ensemble, **FLAGS).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cells_on_exact_borders_are_grid_samples(dtype):
    """Without the local ensemble the output is the chosen cell: equal to the reference's, which
    grid_sample picks, at every border and centre of every shape."""
    mismatches = {}
    for height, width in SHAPES:
        feat = index_features(height, width, dtype, batch=2)
        coords = tie_grid(height, width, dtype, batch=2)
        out = query(feat, coords, reading_mlp(dtype), local_ensemble=False)
        expected = reference(feat, coords, reading_mlp(dtype), local_ensemble=False)
        bad = int((out != expected).any(-1).sum())
        if bad:
            mismatches[(height, width)] = bad
    assert not mismatches, f"queries on another cell than grid_sample's, by shape: {mismatches}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ensemble_on_exact_borders_matches_reference(dtype):
    """With the local ensemble the output blends the four cells' (iy, ix): a different cell with a
    weight that matters moves it by far more than rounding."""
    for height, width in SHAPES[::3]:
        feat = index_features(height, width, dtype)
        coords = tie_grid(height, width, dtype)
        out = query(feat, coords, reading_mlp(dtype), local_ensemble=True)
        expected = reference(feat, coords, reading_mlp(dtype), local_ensemble=True)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        assert (out - expected).abs().max() <= tolerance * (1 + max(height, width)), (height, width)


@pytest.mark.parametrize("local_ensemble", [False, True])
def test_gradients_on_exact_borders(local_ensemble):
    """The backward recomputes the geometry: at ties it must take the forward's (and grid_sample's)
    cells, or the feature gradient lands on another cell."""
    for height, width in GRADIENT_SHAPES:
        g = torch.Generator().manual_seed(height * 100 + width)
        feat = torch.randn(1, 2, height, width, generator=g, dtype=torch.float64)
        coords = tie_grid(height, width, torch.float64)
        mlp = torch.nn.Sequential(torch.nn.Linear(4, 2)).double()

        def grad(fn):
            leaf = feat.clone().requires_grad_()
            fn(leaf, coords, None, mlp, local_ensemble=local_ensemble, **FLAGS).square().sum().backward()
            return leaf.grad

        ours, theirs = grad(liif_cuda.query), grad(ref.query_rgb)
        assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-12, (height, width)


# The CUDA kernels' rounding: ((c + 1) * size - 1) / 2 with one fused multiply-add, as nvcc compiles
# torch's CUDA grid_sample. Restated exactly with fractions, checked on the host harness here and
# against torch's CUDA grid_sample on a GPU.

def round_to(x, dtype):
    """The rational x rounded to the nearest float32 / float64, ties to even."""
    if dtype == torch.float64:
        return Fraction(float(x))  # Python's float(Fraction) rounds correctly
    f = np.float32(float(x))
    candidates = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]

    def key(v):
        return abs(Fraction(float(v)) - x), int(np.array(v).view(np.uint32)) & 1
    return Fraction(float(min(candidates, key=key)))


def cuda_grid_sample_cell(c, size, dtype):
    """torch's CUDA grid_sample cell for a clamped coordinate c: rint(fma(c + 1, size, -1) / 2)."""
    a = round_to(Fraction(c) + 1, dtype)
    source = round_to(a * size - 1, dtype) / 2
    return min(max(int(np.rint(float(source))), 0), size - 1)


def shifted_and_clamped(coords):
    """The reference's coordinate for the (only) neighbour without the ensemble: clamped."""
    return coords.clamp(-1 + 1e-6, 1 - 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_harness_cuda_cells_are_cuda_grid_samples(dtype):
    from cuda_harness import run
    for height, width in [(3, 3), (6, 5), (33, 2), (97, 3)]:
        feat = index_features(height, width, dtype)
        coords = tie_grid(height, width, dtype)
        mlp = torch.nn.Linear(4, 2).to(dtype)
        with torch.no_grad():
            mlp.weight.copy_(reading_mlp(dtype)[0][0])
            mlp.bias.zero_()
        out, _ = run(feat, coords, None, torch.nn.Sequential(mlp), local_ensemble=False, **FLAGS)
        clamped = shifted_and_clamped(coords)[0]
        expected = torch.tensor([[cuda_grid_sample_cell(float(cy), height, dtype),
                                  cuda_grid_sample_cell(float(cx), width, dtype)]
                                 for cy, cx in clamped.tolist()], dtype=dtype)
        assert torch.equal(out[0], expected), (height, width)


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_cells_on_exact_borders_are_grid_samples(dtype):
    for local_ensemble in (False, True):
        for height, width in SHAPES[::2]:
            feat = index_features(height, width, dtype, batch=2)
            coords = tie_grid(height, width, dtype, batch=2)
            out = query(feat, coords, reading_mlp(dtype), local_ensemble, device="cuda")
            expected = reference(feat, coords, reading_mlp(dtype), local_ensemble, device="cuda")
            if local_ensemble:
                tolerance = 1e-5 if dtype == torch.float32 else 1e-12
                assert (out - expected).abs().max() <= tolerance * (1 + max(height, width))
            else:
                assert torch.equal(out, expected), (height, width)
