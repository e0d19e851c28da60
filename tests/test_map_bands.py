"""The first-layer map convolved in bands of rows (csrc/cuda/liif_map_convolution.h,
convolve_in_bands), as the CUDA operator does for large maps, here on the CPU through the host
harness: every band size against one whole convolution. (Every harness query also convolves its map in
bands of two rows: tests/test_cuda_harness.py and the others check the kernels on top of them.)"""

import pytest
import torch
import torch.nn.functional as F
from cuda_harness import load
from hypothesis import given
from hypothesis import strategies as st


def map_in_bands(x, w, padding, band_rows):
    load()
    return torch.ops.liif_cuda_harness.map_in_bands(x, w, padding, band_rows)


@given(batch=st.integers(1, 3), channels=st.integers(1, 6), height=st.integers(1, 9),
       width=st.integers(1, 7), out_channels=st.integers(1, 5), taps=st.sampled_from([1, 3]),
       band_rows=st.integers(1, 10), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_bands_equal_one_convolution(batch, channels, height, width, out_channels, taps,
                                     band_rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g, dtype=dtype)
    w = torch.randn(out_channels, channels, taps, taps, generator=g, dtype=dtype)
    expected = F.conv2d(x, w, padding=taps // 2)
    out = map_in_bands(x, w, taps // 2, band_rows)
    assert out.shape == expected.shape and out.dtype == dtype
    # The same products; only the summation order may differ between band sizes.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, expected, **tol)


def test_band_edges_see_their_neighbour_rows():
    # One-row bands of a map whose every row differs: a band that padded with zeros instead of its
    # neighbours' rows would be off by whole rows, not by rounding.
    x = torch.arange(1.0, 6.0).reshape(1, 1, 5, 1).expand(1, 1, 5, 3).contiguous()
    w = torch.ones(1, 1, 3, 3)
    out = map_in_bands(x, w, 1, 1)
    assert torch.equal(out, F.conv2d(x, w, padding=1))
    assert out[0, 0, :, 1].tolist() == [9.0, 18.0, 27.0, 36.0, 27.0]


@pytest.mark.parametrize("padding,band_rows,match", [(0, 2, "taps"), (1, 0, "band_rows")])
def test_bad_arguments_are_refused(padding, band_rows, match):
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    with pytest.raises(RuntimeError, match=match):
        map_in_bands(x, w, padding, band_rows)
