"""upscale(): tiling equals the untiled computation, any scale and size, every image kind."""

import io
import pathlib

import numpy as np
import pytest
import torch
from conftest import relative_error
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import liif_cuda
import liif_reference_models as refm
from liif_cuda.images import LUMA, resize_alpha
from liif_cuda.models import LIIF, RDN, EDSRBaseline
from liif_cuda.upscaling import output_size


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LIIF(EDSRBaseline(n_resblocks=2, n_feats=8), hidden_list=[32, 32]).eval()


def reference_upscale(model, img, out_h, out_w):
    """The original procedure with the reference model holding the same weights."""
    reference = refm.LIIF(refm.EDSR(n_resblocks=2, n_feats=8), hidden_list=[32, 32])
    reference.load_state_dict(model.state_dict(), strict=False)
    return refm.upscale_reference(reference.eval(), img, out_h, out_w)[0]


@pytest.mark.parametrize("tile", [None, 5, 8, 13])
@pytest.mark.parametrize("out_hw", [(53, 61), (20, 44), (17, 13)])
def test_tiles_equal_the_whole_image(model, tile, out_hw):
    """Tiles of 5 to 13 LR pixels (smaller than the receptive radius, uneven last tiles),
    non-integer and unequal scales, and a downscale: the same result as the reference on the whole
    image."""
    img = torch.rand(3, 16, 19, generator=torch.Generator().manual_seed(1))
    out = liif_cuda.upscale(img, size=out_hw[::-1], model=model, tile=tile, chunk=97)
    assert out.shape == (3, *out_hw)
    assert relative_error(out, reference_upscale(model, img[None], *out_hw)) <= 1e-5


def test_rdn_tiles(model):
    torch.manual_seed(3)
    rdn = LIIF(RDN(g0=8, n_blocks=2, n_layers=2, growth=4), hidden_list=[16]).eval()
    img = torch.rand(3, 14, 12)
    whole = liif_cuda.upscale(img, scale=2.5, model=rdn)
    tiled = liif_cuda.upscale(img, scale=2.5, model=rdn, tile=6)
    assert relative_error(tiled, whole) <= 1e-5


def test_output_size():
    assert output_size(10, 20, scale=2.5) == (25, 50)
    assert output_size(10, 20, scale=(2, 3)) == (20, 60)
    assert output_size(10, 20, size=(33, 7)) == (7, 33)
    for bad in (0, -1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be"):
            output_size(10, 20, scale=bad)
    with pytest.raises(ValueError, match="exactly one"):
        output_size(10, 20, scale=2, size=(3, 3))
    with pytest.raises(ValueError, match="exactly one"):
        output_size(10, 20)
    with pytest.raises(ValueError, match="size must be positive"):
        output_size(10, 20, size=(0, 5))
    for bad in ("2", (2,), (1, 2, 3), [2, "3"], True):
        with pytest.raises(ValueError, match="scale must be"):
            output_size(10, 20, scale=bad)
    for bad in ((10.5, 10), ("10", 10), (10,), (float("nan"), 10), (float("inf"), 10),
                (True, 10)):
        with pytest.raises(ValueError, match="whole pixels"):
            output_size(10, 20, size=bad)
    assert output_size(10, 20, size=(60.0, 40.0)) == (40, 60)  # a computed size, no fraction
    assert output_size(10, 20, scale=0.1) == (1, 2)
    for tiny in (1e-9, 0.05, (1, 0.01)):   # 0.05: 10 * 0.05 = 0.5 rounds to 0 (half to even)
        with pytest.raises(ValueError, match=r"makes the 20x10 image \d+x\d+; the output needs"):
            output_size(10, 20, scale=tiny)
    assert output_size(10, 20, scale=np.float32(2)) == (20, 40)
    assert output_size(10, 20, size=np.array([33, 7])) == (7, 33)
    # One side None: the aspect ratio kept, rounded as the CLI's --size 33x / x7 rounds it.
    assert output_size(10, 20, size=(33, None)) == (17, 33)   # 16.5, halves up
    assert output_size(10, 20, size=(None, 7)) == (7, 14)
    assert output_size(10, 20, size=(1, None)) == (1, 1)      # at least one pixel
    for bad in ((None, None), (None, 0), (-3, None), (None, 2.5)):
        with pytest.raises(ValueError, match="size must be"):
            output_size(10, 20, size=bad)


def test_image_kinds_agree(model):
    rng = np.random.default_rng(4)
    rgb8 = rng.integers(0, 256, (12, 15, 3), dtype=np.uint8)
    as_float = liif_cuda.upscale(rgb8.astype(np.float32) / 255, scale=2, model=model)
    out8 = liif_cuda.upscale(rgb8, scale=2, model=model)
    assert out8.dtype == np.uint8 and out8.shape == (24, 30, 3)
    assert np.array_equal(out8, np.clip(np.rint(as_float * 255), 0, 255).astype(np.uint8))
    pil = liif_cuda.upscale(Image.fromarray(rgb8), scale=2, model=model)
    assert isinstance(pil, Image.Image) and pil.mode == "RGB" and np.array_equal(np.array(pil), out8)
    tensor_in = torch.from_numpy(rgb8).permute(2, 0, 1).float() / 255
    tensor = liif_cuda.upscale(tensor_in, scale=2, model=model)
    assert torch.allclose(tensor.permute(1, 2, 0), torch.from_numpy(as_float))
    batched = liif_cuda.upscale(tensor_in[None], scale=2, model=model)
    assert batched.shape == (1, 3, 24, 30) and torch.equal(batched[0], tensor)
    rgb16 = rgb8.astype(np.uint16) * 257
    out16 = liif_cuda.upscale(rgb16, scale=2, model=model)
    assert out16.dtype == np.uint16
    assert np.abs(out16.astype(np.int64) - np.rint(as_float * 65535)).max() <= 1
    # Against the same values as float: rounded to the nearest 16-bit level, as 8 bits are.
    as_float16 = liif_cuda.upscale(rgb16.astype(np.float32) / np.float32(65535), scale=2,
                                   model=model)
    assert np.array_equal(out16, np.clip(np.rint(as_float16 * 65535), 0, 65535).astype(np.uint16))


def test_grayscale_policy(model):
    gray = np.random.default_rng(5).integers(0, 256, (10, 9), dtype=np.uint8)
    out = liif_cuda.upscale(gray, scale=3, model=model)
    assert out.shape == (30, 27) and out.dtype == np.uint8
    rgb = liif_cuda.upscale(np.repeat(gray[:, :, None], 3, 2).astype(np.float32) / 255, scale=3,
                            model=model)
    luma = sum(w * rgb[:, :, i] for i, w in enumerate(LUMA))
    assert np.array_equal(out, np.clip(np.rint(luma * 255), 0, 255).astype(np.uint8))
    pil = liif_cuda.upscale(Image.fromarray(gray), scale=3, model=model)
    assert pil.mode == "L" and np.array_equal(np.array(pil), out)
    kept = liif_cuda.upscale(gray[:, :, None], scale=3, model=model)  # (H, W, 1) stays so
    assert kept.shape == (30, 27, 1) and np.array_equal(kept[:, :, 0], out)


def test_grayscale_result_is_pillows_luma():
    """An RGB result goes back to one channel as Pillow's convert("L") does (ITU-R 601 weights on
    R, G, B in that order), to within Pillow's fixed-point rounding."""
    from liif_cuda.images import ImageKind, from_tensor
    rgb8 = np.random.default_rng(11).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    rgb8[0, 0], rgb8[0, 1], rgb8[0, 2] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    rgb = torch.from_numpy(rgb8).permute(2, 0, 1)[None].float() / 255
    gray = from_tensor(rgb, None, ImageKind("numpy", np.dtype(np.uint8), 1, True))
    pillow = np.array(Image.fromarray(rgb8).convert("L"))
    assert gray.shape == (7, 5) and gray.dtype == np.uint8
    assert np.abs(gray.astype(np.int64) - pillow).max() <= 1
    assert list(gray[0, :3]) == [76, 150, 29]


def test_sixteen_bit_grayscale_pil_image_stays_sixteen_bit(model):
    """A PIL "I;16" image comes back as "I;16", with the values of the uint16 array's upscale."""
    gray16 = np.random.default_rng(12).integers(0, 65536, (10, 9), dtype=np.uint16)
    image = Image.fromarray(gray16)
    assert image.mode == "I;16"
    out = liif_cuda.upscale(image, scale=3, model=model)
    assert out.mode == "I;16" and out.size == (27, 30)
    expected = liif_cuda.upscale(gray16, scale=3, model=model)
    assert expected.dtype == np.uint16 and np.array_equal(np.array(out), expected)


def test_tensor_dtype_and_channels_are_kept(model):
    """A tensor comes back with its dtype (computed in float32) and its channel count."""
    image = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(13))
    out32 = liif_cuda.upscale(image, scale=2, model=model)
    assert out32.dtype == torch.float32 and out32.shape == (3, 18, 22)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        out = liif_cuda.upscale(image.to(dtype), scale=2, model=model)
        assert out.dtype == dtype and out.shape == (3, 18, 22), dtype
        expected = liif_cuda.upscale(image.to(dtype).float(), scale=2, model=model).to(dtype)
        assert torch.equal(out, expected), dtype
    gray = liif_cuda.upscale(image[:1].double(), scale=2, model=model)
    assert gray.dtype == torch.float64 and gray.shape == (1, 18, 22)


def test_pil_modes_without_interpolable_values(model):
    """Bilevel comes back as 8-bit grayscale; palette, CMYK and YCbCr as RGB, RGBA where there is
    transparency: each the upscale of its conversion."""
    rng = np.random.default_rng(8)
    rgb = Image.fromarray(rng.integers(0, 256, (10, 9, 3), dtype=np.uint8))
    bilevel = Image.fromarray(rng.integers(0, 2, (10, 9), dtype=np.uint8) * 255).convert("1")
    palette = rgb.convert("P")
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    for image, mode in ((bilevel, "L"), (palette, "RGB"), (rgb.convert("CMYK"), "RGB"),
                        (rgb.convert("YCbCr"), "RGB"), (transparent, "RGBA")):
        out = liif_cuda.upscale(image, scale=2, model=model)
        assert out.mode == mode and out.size == (18, 20), image.mode
        same = liif_cuda.upscale(image.convert(mode), scale=2, model=model)
        assert np.array_equal(np.array(out), np.array(same)), image.mode


def test_alpha_policy(model):
    rng = np.random.default_rng(6)
    rgba = rng.integers(0, 256, (8, 11, 4), dtype=np.uint8)
    out = liif_cuda.upscale(Image.fromarray(rgba, "RGBA"), scale=2.5, model=model)
    assert out.mode == "RGBA" and out.size == (28, 20)
    arr = np.array(out)
    rgb_only = liif_cuda.upscale(rgba[:, :, :3], scale=2.5, model=model)
    assert np.array_equal(arr[:, :, :3], rgb_only)
    alpha = resize_alpha(torch.from_numpy(rgba[:, :, 3:]).permute(2, 0, 1)[None].float() / 255,
                         20, 28)
    assert np.array_equal(arr[:, :, 3], np.rint(alpha[0, 0].numpy() * 255).astype(np.uint8))
    la = liif_cuda.upscale(Image.fromarray(rgba[:, :, [0, 3]], "LA"), scale=2, model=model)
    assert la.mode == "LA"
    # The first band is the grey level, the second the alpha: each as it would be alone.
    la = np.array(la)
    assert np.array_equal(la[:, :, 0], liif_cuda.upscale(rgba[:, :, 0], scale=2, model=model))
    alpha = resize_alpha(torch.from_numpy(rgba[:, :, 3:]).permute(2, 0, 1)[None].float() / 255,
                         16, 22)
    assert np.array_equal(la[:, :, 1], np.rint(alpha[0, 0].numpy() * 255).astype(np.uint8))


@pytest.mark.parametrize("image,match", [
    (np.zeros((4, 4, 5), np.uint8), "C in 1..4"),
    (np.zeros((4,), np.uint8), "C in 1..4"),
    (np.zeros((4, 4, 3), np.int32), "uint8, uint16 or floating"),
    (torch.zeros(2, 3, 4, 4), "C, H, W"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8), "floating point"),
    (np.zeros((0, 10, 3), np.uint8), r"empty \(0x10"),
    (np.zeros((10, 0), np.uint8), r"empty \(10x0"),
    (torch.zeros(3, 0, 5), r"empty \(0x5"),
    (Image.new("RGB", (0, 4)), r"empty \(4x0"),
])
def test_bad_images(model, image, match):
    with pytest.raises(ValueError, match=match):
        liif_cuda.upscale(image, scale=2, model=model)
    with pytest.raises(ValueError, match=match):
        liif_cuda.upscale(image, size=(5, 5), model=model)


@pytest.mark.parametrize("kwargs,match", [
    ({"tile": 0}, "tile must be a whole number >= 1 or None, got 0"),
    ({"tile": -1}, "tile must be a whole number >= 1 or None, got -1"),
    ({"tile": 2.5}, "tile must be"),
    ({"tile": True}, "tile must be"),
    ({"chunk": 0}, "chunk must be a whole number >= 1, got 0"),
    ({"chunk": -1}, "chunk must be"),
    ({"chunk": None}, "chunk must be"),
])
def test_bad_tile_or_chunk(model, kwargs, match):
    """A negative tile used to return uninitialised memory (values up to 1e31) without a word."""
    with pytest.raises(ValueError, match=match):
        liif_cuda.upscale(np.zeros((20, 30, 3), np.uint8), scale=2, model=model, **kwargs)


def test_small_tiles_and_chunks_agree(model):
    image = np.random.default_rng(9).random((9, 7, 3), dtype=np.float32)
    whole = liif_cuda.upscale(image, scale=2.5, model=model)
    tiled = liif_cuda.upscale(image, scale=2.5, model=model, tile=1, chunk=1)
    assert np.allclose(tiled, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_float_image(model, value):
    """One such pixel used to make the whole output NaN without a word."""
    image = np.full((6, 5, 3), 0.5, np.float32)
    image[2, 3, 1] = value
    with pytest.raises(ValueError, match=r"image has 1 NaN or infinite value\(s\)"):
        liif_cuda.upscale(image, scale=2, model=model)
    with pytest.raises(ValueError, match="NaN or infinite"):
        liif_cuda.upscale(torch.from_numpy(image).permute(2, 0, 1), scale=2, model=model)


@pytest.mark.parametrize("path", ["photo.png", b"photo.png", pathlib.Path("photo.png")])
def test_a_path_is_not_an_image(model, path):
    with pytest.raises(TypeError, match="got the path"):
        liif_cuda.upscale(path, scale=2, model=model)


def test_float_image_beyond_one_warns(model):
    eight_bit_as_float = np.full((4, 4, 3), 200.0, np.float32)
    with pytest.warns(UserWarning, match="goes up to 200"):
        liif_cuda.upscale(eight_bit_as_float, scale=2, model=model)


def test_device_that_cannot_run_here(model):
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for call in (lambda: liif_cuda.upscale(np.zeros((4, 4, 3), np.uint8), scale=2, model=model,
                                           device=missing),
                 lambda: liif_cuda.load_model("edsr-baseline-liif", device=missing)):
        with pytest.raises(ValueError, match=f"device '{missing}'"):
            call()
    for device in ("gpu", "mps", "meta"):  # torch knows the last two; liif_cuda runs on neither
        with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
            liif_cuda.upscale(np.zeros((4, 4, 3), np.uint8), scale=2, model=model, device=device)
        with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
            liif_cuda.load_model("edsr-baseline-liif", device=device)


def test_bad_precision(model):
    with pytest.raises(ValueError, match="precision must be one of"):
        liif_cuda.upscale(np.zeros((4, 4, 3), np.uint8), scale=2, model=model, precision="fp8")


@pytest.mark.parametrize("precision", ["tf32", "fp16"])
def test_tf32_and_fp16_compute_float32_on_the_cpu(model, precision):
    """(bf16 on the CPU: tests/test_query_cpu_bf16.py.)"""
    image = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    exact = liif_cuda.upscale(image, scale=1.7, model=model, device="cpu")
    out = liif_cuda.upscale(image, scale=1.7, model=model, device="cpu", precision=precision)
    assert np.array_equal(out, exact)


class ShiftEncoder(torch.nn.Module):
    """Features that are the input `radius` pixels away along each diagonal, zero beyond the image
    (as `radius` 3x3 convolutions that each shift by one pixel would give): the receptive radius is
    exactly `radius` and, unlike a random network's, the farthest pixel's influence does not fade,
    so a tile that encodes one pixel too few of its margin changes the result by far more than
    rounding."""

    def __init__(self, radius):
        super().__init__()
        self.out_dim, self.receptive_radius, self.default_tile = 12, radius, 512

    def forward(self, x):
        r, (h, w) = self.receptive_radius, x.shape[-2:]
        padded = torch.nn.functional.pad(x, (r, r, r, r))
        return torch.cat([padded[:, :, dy:dy + h, dx:dx + w] for dy in (0, 2 * r)
                          for dx in (0, 2 * r)], 1)


@pytest.mark.parametrize("out_hw", [(28, 22), (12, 10), (8, 6), (20, 4), (13, 11), (39, 33)])
def test_tiles_encode_exactly_the_margin_they_need(out_hw):
    """Every tile size from 1 pixel up, upscales and downscales (a pixel owned by one tile may read
    features up to two cells beyond it): the same result as the image encoded whole."""
    torch.manual_seed(6)
    model = LIIF(ShiftEncoder(3), hidden_list=[16]).eval()
    img = torch.rand(3, 13, 11, generator=torch.Generator().manual_seed(7))
    whole = liif_cuda.upscale(img, size=out_hw[::-1], model=model)
    for tile in range(1, 8):
        tiled = liif_cuda.upscale(img, size=out_hw[::-1], model=model, tile=tile)
        assert relative_error(tiled, whole) <= 1e-5, tile


def test_each_pixel_is_one_query_in_calls_of_at_most_chunk(model, monkeypatch):
    """The memory bound: every output pixel is queried once, by calls of at most `chunk` queries
    (or one row of a tile, where that is longer); and the progress bar counts the pixels."""
    import tqdm

    import liif_cuda.upscaling as upscaling
    calls, bars = [], []
    real_query = upscaling.query

    def counting_query(feat, coords, *args, **kwargs):
        calls.append(coords.shape[1])
        return real_query(feat, coords, *args, **kwargs)

    class RecordingBar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, file=io.StringIO(), **kwargs)
            bars.append(self)

    monkeypatch.setattr(upscaling, "query", counting_query)
    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)
    img = torch.rand(3, 16, 19, generator=torch.Generator().manual_seed(1))
    for tile, chunk in ((None, 97), (None, 1), (5, 97), (8, 10)):
        calls.clear()
        liif_cuda.upscale(img, size=(61, 53), model=model, tile=tile, chunk=chunk, progress=True)
        assert sum(calls) == 53 * 61 and max(calls) <= max(chunk, 61), (tile, chunk)
        assert bars[-1].n == bars[-1].total == 53 * 61


def test_tile_coordinates_keep_their_offset_from_the_cell_centre():
    """A tile's query coordinate is its cell's centre in the feature crop (make_coord's, as the
    kernel computes it) plus the point's offset from that cell's centre in the whole image, scaled
    to the crop and rounded once: within half a float32 step of that, and exactly the centre where
    the offset is 0 (the far border's values hang on it). The whole axis is left as it is."""
    from liif_cuda.upscaling import _to_crop, pixel_centres
    zeros = 0
    for n in (7, 19, 1000):
        for out in (n, 3 * n, 2 * n + 1):
            centres = pixel_centres(out)
            assert _to_crop(centres, n, 0, n) == (centres, 1.0)
            for start, stop in ((0, n - 1), (1, n), (n // 3, n // 3 + 4)):
                inside = ((centres + 1) * n / 2 >= start) & ((centres + 1) * n / 2 < stop)
                points = centres[inside]
                mapped, factor = _to_crop(points, n, start, stop)
                assert mapped.dtype == torch.float32 and factor == n / (stop - start)
                cell = ((points.double() + 1) * n / 2).floor().long()
                offset = points.double() - pixel_centres(n)[cell].double()
                centre = pixel_centres(stop - start)[cell - start].double()
                expected = centre + offset * factor
                half_step = torch.from_numpy(np.spacing(expected.float().abs().numpy())) / 2
                assert ((mapped.double() - expected).abs() <= half_step.double()).all()
                assert torch.equal(mapped[offset == 0].double(), centre[offset == 0])
                zeros += int((offset == 0).sum())
    assert zeros > 0


@pytest.mark.parametrize("scale", [1, 3, 5])
def test_tiled_far_border_at_scales_on_cell_centres(model, scale):
    """At odd integer scales the last row's and column's pixels lie on the last cells' centres,
    where both ensemble neighbours clamp to one cell and the float32 rounding of an offset near 0
    picks the value (here up to 0.016 apart): the tiles round it as the whole image does."""
    img = torch.rand(3, 16, 19, generator=torch.Generator().manual_seed(1))
    whole = liif_cuda.upscale(img, scale=scale, model=model)
    for tile in (5, 8):
        tiled = liif_cuda.upscale(img, scale=scale, model=model, tile=tile)
        assert (tiled - whole).abs().max() <= 1e-5, tile


@given(h=st.integers(2, 20), w=st.integers(2, 20),
       scale_y=st.one_of(st.integers(1, 5), st.floats(0.3, 4.5)),
       scale_x=st.one_of(st.integers(1, 5), st.floats(0.3, 4.5)),
       tile=st.integers(1, 9), seed=st.integers(0, 99))
def test_tiles_pixel_by_pixel(model, h, w, scale_y, scale_x, tile, seed):
    """Any image, scale and tile: within 1e-5 of the whole image's result overall, and every pixel
    within 1e-4. (Where a pixel lies within a float32 step of the last cell's centre, its value hangs
    on that offset's rounding: a crop represents it only to its own steps, off by up to half of one,
    which moved a pixel by 3.1e-5 at most in 600 such random cases; exact offsets, 0 among them,
    are kept.)"""
    img = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))
    size = (max(1, round(w * scale_x)), max(1, round(h * scale_y)))
    whole = liif_cuda.upscale(img, size=size, model=model)
    tiled = liif_cuda.upscale(img, size=size, model=model, tile=tile)
    assert relative_error(tiled, whole) <= 1e-5
    assert (tiled - whole).abs().max() <= 1e-4
