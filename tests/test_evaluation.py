"""Evaluation: metrics against scikit-image, the protocols' quirks, MATLAB bicubic, and the published
numbers (those read ../shared and skip with the reason where it is absent)."""

import math
import os
import warnings

import numpy as np
import pytest
from conftest import OFFICIAL_WEIGHTS, SHARED, requires_shared
from helpers import matlab_resize_1d
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import liif_cuda
from liif_cuda import cli
from liif_cuda.evaluation import evaluate, format_table, imresize, psnr_rgb, psnr_y, ssim_mmedit
from liif_cuda.evaluation.protocols import (ImageTooSmall, LRFileMismatch, OptionIgnored,
                                            check_image_size, crop_for_scale, finish_prediction,
                                            lr_shape, make_sample, matlab_y, score)

SET5 = os.path.join(SHARED, "data", "Set5")
SET14 = os.path.join(SHARED, "data", "Set14")


def skimage_ssim(a, b, channel_axis=None):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=255, channel_axis=channel_axis)


def noisy_pair(seed, shape=(37, 45, 3)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.float64)
    return a, np.clip(a + rng.normal(0, 15, shape), 0, 255)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_image_on_random_images(seed):
    a, b = noisy_pair(seed)
    assert psnr_rgb(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-10)
    assert ssim_mmedit(a, b) == pytest.approx(skimage_ssim(a, b, channel_axis=2), abs=1e-10)
    c = 3
    assert psnr_rgb(a, b, crop=c) == pytest.approx(
        peak_signal_noise_ratio(a[c:-c, c:-c], b[c:-c, c:-c], data_range=255), abs=1e-10)


@requires_shared
def test_metrics_match_scikit_image_on_real_images():
    hr = np.asarray(Image.open(os.path.join(SET5, "butterfly.png")).convert("RGB")).astype(np.float64)
    blurred = np.asarray(Image.fromarray(hr.astype(np.uint8)).resize((128, 128), Image.BICUBIC)
                         .resize((256, 256), Image.BICUBIC)).astype(np.float64)
    assert psnr_rgb(blurred, hr) == pytest.approx(peak_signal_noise_ratio(hr, blurred,
                                                                          data_range=255), abs=1e-10)
    assert ssim_mmedit(blurred, hr) == pytest.approx(skimage_ssim(blurred, hr, 2), abs=1e-10)


def test_mmedit_ssim_scores_only_blue_when_cropping():
    """mmediting 0.x's `img[c:-c, c:-c, None]` leaves one loop iteration over a BGR image: Blue."""
    a, b = noisy_pair(7)
    b[:, :, :2] = a[:, :, :2]  # red and green identical: all of the difference is in blue
    blue = skimage_ssim(a[4:-4, 4:-4, 2], b[4:-4, 4:-4, 2])
    assert ssim_mmedit(a, b, crop=4, first_channel_only=True) == pytest.approx(blue, abs=1e-12)
    assert ssim_mmedit(a, b, crop=4) == pytest.approx((2 + blue) / 3, abs=1e-12)  # mmagic
    # Without a crop mmediting 0.x scored all three channels.
    assert ssim_mmedit(a, b, crop=0, first_channel_only=True) == pytest.approx(
        skimage_ssim(a, b, channel_axis=2), abs=1e-12)


def test_paper_psnr_is_the_y_difference():
    a, b = noisy_pair(8)
    a, b = a / 255, b / 255
    y = ((a - b) * np.array([65.738, 129.057, 25.064]) / 256).sum(2)[2:-2, 2:-2]
    assert psnr_y(a, b, shave=2) == pytest.approx(-10 * math.log10(np.mean(y ** 2)), abs=1e-12)
    # The same as MATLAB's Y (65.481 / 255 = 65.738 / 256) in float, without the offset.
    ya = 16 + (a * 255 * np.array([65.481, 128.553, 24.966]) / 255).sum(2)
    yb = 16 + (b * 255 * np.array([65.481, 128.553, 24.966]) / 255).sum(2)
    assert psnr_y(a, b, shave=2) == pytest.approx(
        psnr_rgb(ya[..., None], yb[..., None], crop=2), abs=1e-3)


def test_rounding_per_protocol():
    pred = np.array([[[0.5 / 255, 1.2, -0.1]]])
    assert np.array_equal(finish_prediction(pred, "mmedit"), [[[0.0, 255.0, 0.0]]])  # round half even
    assert np.allclose(finish_prediction(pred, "mmagic"), [[[0.5, 255.0, 0.0]]])
    assert np.allclose(finish_prediction(pred, "paper"), [[[0.5, 255.0, 0.0]]])
    assert matlab_y(np.array([[255, 255, 255]])) == 235 and matlab_y(np.array([[0, 0, 0]])) == 16


def test_lr_size_and_crop_rules():
    assert lr_shape(256, 256, 3) == (85, 85)
    assert lr_shape(30, 31, 2.5) == (12, 12)
    # The + 1e-9 against float error: test_evaluation_audit.py (0.7 * 10, here before, is exactly 7.0).
    hr = np.zeros((257, 100, 3), np.uint8)
    assert crop_for_scale(hr, 3).shape == (255, 99, 3)
    assert crop_for_scale(hr, 2.5).shape == (255, 100, 3)


def test_gt_mod12_and_grayscale(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 39), dtype=np.uint8)).save(path)
    sample = make_sample(str(path), 4, "mmedit")
    assert sample.gt.shape == (48, 36, 3) and sample.lr.shape == (12, 9, 3) and sample.gray
    assert np.array_equal(sample.gt[:, :, 0], sample.gt[:, :, 2])  # read as RGB
    paper = make_sample(str(path), 4, "paper")
    assert paper.gt.shape == (48, 36, 3)  # floor rule only: 50 -> 48, 39 -> 36
    assert make_sample(str(path), 5, "paper").gt.shape == (50, 35, 3)
    # classic: a grayscale file's own values are Y
    pred = sample.gt.astype(np.float64)
    pred[10, 10] += 10
    s = score(pred, sample.gt, 4, "classic", gray=True)
    assert s["psnr"] == pytest.approx(psnr_rgb(pred[..., :1], sample.gt[..., :1].astype(float), 4))


def test_lr_dir_files(tmp_path):
    hr = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(hr).save(tmp_path / "img.png")
    (tmp_path / "LR" / "X2").mkdir(parents=True)
    lr = np.full((12, 12, 3), 7, np.uint8)
    Image.fromarray(lr).save(tmp_path / "LR" / "X2" / "imgx2.png")
    sample = make_sample(str(tmp_path / "img.png"), 2, "paper", lr_dir=str(tmp_path / "LR"))
    assert np.array_equal(sample.lr, lr)
    with pytest.raises(FileNotFoundError, match="no LR file"):
        make_sample(str(tmp_path / "img.png"), 3, "paper", lr_dir=str(tmp_path / "LR"))


def test_matlab_imresize_properties():
    rng = np.random.default_rng(2)
    const = np.full((9, 13, 3), 77, np.uint8)
    assert np.array_equal(imresize(const, 1 / 3), np.full((3, 5, 3), 77, np.uint8))
    assert np.array_equal(imresize(const, 2.5), np.full((23, 33, 3), 77, np.uint8))
    ramp = np.tile(np.arange(40, dtype=np.float64), (6, 1))
    down = imresize(ramp, 0.5)
    # Antialiased cubic of a ramp: interior samples at the centre of each 2-pixel group.
    assert np.allclose(down[:, 3:-3], np.arange(40).reshape(20, 2).mean(1)[3:-3])
    up = imresize(ramp, 2)
    assert np.allclose(up[:, 4:-4], (np.arange(80) / 2 - 0.25)[4:-4])
    x = rng.integers(0, 256, (10, 12), dtype=np.uint8)
    assert imresize(x, 0.5).dtype == np.uint8 and imresize(x, output_shape=(7, 3)).shape == (7, 3)


@pytest.mark.parametrize("scale", [0.5, 1 / 3, 0.75, 2, 2.5])
def test_matlab_imresize_against_a_direct_restatement(scale):
    """Border samples included: the symmetric padding, the antialiasing kernel's width."""
    x = np.random.default_rng(7).uniform(0, 255, (9, 13))
    ours = imresize(x, scale)
    h, w = ours.shape
    expected = matlab_resize_1d(matlab_resize_1d(x, h, scale).T, w, scale).T
    assert np.allclose(ours, expected, rtol=0, atol=1e-9)


CLASSIC_BICUBIC = {"Set5": {2: 33.66, 3: 30.39, 4: 28.42},   # spec section 7
                   "Set14": {2: 30.24, 3: 27.55, 4: 26.00}}


def srcnn_bicubic_psnr(path, scale):
    """The published bicubic rows' own pipeline (SRCNN's evaluation code, restated): the 8-bit Y
    channel (rgb2ycbcr; a grayscale file's values), cropped to a multiple of the scale, MATLAB
    bicubic down and up in double precision on Y / 255, rounded to 8 bits, PSNR with a border of
    the scale removed."""
    with Image.open(path) as im:
        gray = im.mode == "L"
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[0] - rgb.shape[0] % scale, rgb.shape[1] - rgb.shape[1] % scale
    y = rgb[:h, :w, 0].astype(np.float64) if gray else matlab_y(rgb[:h, :w])
    up = imresize(imresize(y / 255, output_shape=(h // scale, w // scale)), output_shape=(h, w))
    up = np.clip(np.floor(up * 255 + 0.5), 0, 255)  # MATLAB's uint8(): half away from zero
    mse = np.mean((up - y)[scale:-scale, scale:-scale] ** 2)
    return 10 * math.log10(255 ** 2 / mse)


@requires_shared
@pytest.mark.parametrize("dataset", ["Set5", "Set14"])
def test_classic_bicubic_rows(dataset):
    """The published bicubic rows come from the pipeline above (Y first, resized in double): with
    this MATLAB imresize it gives them to their two decimals (0.01; SRCNN printed Set14 x2 and x3
    as 30.23 and 27.54, VDSR as 30.24 and 27.55). The classic protocol resizes RGB in uint8 and
    takes Y of the result, as it scores a model's RGB output: about 0.02 dB below them
    (Set14 x2: 30.2183), within 0.025."""
    folder = os.path.join(SHARED, "data", dataset)
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
    results = evaluate("bicubic", [folder], [2, 3, 4], protocol="classic", resize="matlab",
                       progress=False)
    for scale, psnr in CLASSIC_BICUBIC[dataset].items():
        srcnn = float(np.mean([srcnn_bicubic_psnr(p, scale) for p in paths]))
        assert srcnn == pytest.approx(psnr, abs=0.01), scale
        assert results[dataset][f"{scale}"]["psnr"] == pytest.approx(psnr, abs=0.025), scale


# The model card's rows (mmediting's retrained weights) and an independent implementation of the
# mmedit protocol with the official weights (spec section 7, issue 6).
CARD = {"Set5": {2: (35.7120, 0.9365), 3: (32.3655, 0.8913), 4: (30.2668, 0.8511)},
        "Set14": {2: (31.6106, 0.8891), 3: (28.4605, 0.8039), 4: (26.8093, 0.7377)}}
INDEPENDENT_SET5 = {2: (35.7339, 0.9367), 3: (32.3758, 0.8915), 4: (30.3137, 0.8515)}


@pytest.fixture(scope="module")
def official():
    return liif_cuda.load_model(OFFICIAL_WEIGHTS)


@requires_shared
@pytest.mark.slow
def test_official_weights_mmedit_protocol(official):
    results = evaluate(official, [SET5, SET14], [2, 3, 4], protocol="mmedit", progress=False)
    for dataset, rows in CARD.items():
        for scale, (psnr, ssim) in rows.items():
            r = results[dataset][f"{scale}"]
            assert r["psnr"] == pytest.approx(psnr, abs=0.06), (dataset, scale)
            assert r["ssim"] == pytest.approx(ssim, abs=0.002), (dataset, scale)
    for scale, (psnr, ssim) in INDEPENDENT_SET5.items():
        r = results["Set5"][f"{scale}"]
        assert r["psnr"] == pytest.approx(psnr, abs=0.005), scale
        assert r["ssim"] == pytest.approx(ssim, abs=0.0005), scale


@requires_shared
@pytest.mark.slow
def test_fused_and_reference_give_the_same_psnr(official, monkeypatch):
    """The python/ reference query in place of the fused one: the same PSNR to 0.001 dB."""
    import liif_reference as ref

    import liif_cuda.upscaling
    scales = [2, 4, 12]
    ours = evaluate(official, [SET5], scales, protocol="mmedit", progress=False)
    monkeypatch.setattr(liif_cuda.upscaling, "query",
                        lambda *args, precision, **flags: ref.query_rgb(*args, **flags))
    theirs = evaluate(official, [SET5], scales, protocol="mmedit", progress=False)
    for s in scales:
        assert ours["Set5"][f"{s}"]["psnr"] == pytest.approx(theirs["Set5"][f"{s}"]["psnr"],
                                                             abs=0.001)


def test_eval_cli(tmp_path, capsys):
    folder = tmp_path / "tiny"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "r.json"
    assert cli.main(["eval", "--model", "bicubic", "--data", str(folder), "--scales", "2,3",
                     "--protocol", "classic", "--resize", "matlab", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| x2 |" in text and "| x3 |" in text and out.exists()
    import json
    record = json.loads(out.read_text())
    assert len(record["results"]["tiny"]["2"]["images"]) == 2
    assert cli.main(["eval", "--model", "bicubic", "--data", str(folder), "--scales", "2",
                     "--json", str(out)]) != 0  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert cli.main(["eval", "--data", str(tmp_path / "none"), "--scales", "2"]) != 0
    assert cli.main(["eval", "--data", str(folder), "--scales", "0,2"]) != 0
    assert format_table({"a": {"2": {"psnr": 1.0, "ssim": None}}}).endswith("| x2 | 1.0000 / - |")


def test_a_function_as_the_model(tmp_path):
    """evaluate() scores any predictor function the same way it scores the built-in ones."""
    from liif_cuda.evaluation.evaluate import bicubic_upscale
    rng = np.random.default_rng(4)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    calls = []

    def bicubic(lr, out_h, out_w):
        calls.append((lr.shape, out_h, out_w))
        return bicubic_upscale(lr, out_h, out_w)

    ours = evaluate(bicubic, str(tmp_path), [2, 3], protocol="mmedit", progress=False)
    builtin = evaluate("bicubic", str(tmp_path), [2, 3], protocol="mmedit", progress=False)
    assert len(calls) == 4
    assert ours == builtin


@pytest.mark.parametrize("size,scale,protocol,crop,div2k,option,left", [
    # mmedit / mmagic: 24x24 after GTmod12; SSIM needs 11x11 of it after the crop.
    ((26, 30), 2, "mmedit", 6, False, None, None),
    ((26, 30), 2, "mmagic", 7, False, "crop", "leaves 10x10, and SSIM needs at least 11x11"),
    ((26, 30), 2, "mmedit", 0, False, None, None),
    ((26, 30), 6, "mmedit", None, False, None, None),        # 24 - 2 * 6 = 12
    ((26, 30), 8, "mmedit", None, False, "scale", "leaves 8x8"),
    ((26, 30), 8, "mmedit", 2, False, None, None),           # the crop, not the scale, is removed
    ((26, 30), 25, "mmedit", 0, False, "scale", "its LR image would be 0x0"),   # 24x24 / 25
    ((10, 30), 2, "mmedit", None, False, "protocol", "which leaves 0x24"),
    # paper / classic: one pixel left is enough (no SSIM); the crop does not count.
    ((26, 30), 27, "paper", None, False, "scale", "its LR image would be 0x1"),
    ((3, 3), 1, "paper", None, False, None, None),           # 3 - 2 * 1 = 1
    ((2, 3), 1, "classic", None, False, "scale", "leaves 0x1"),
    ((26, 30), 6, "paper", 1000, False, None, None),         # 24x30 - 2 * 6 = 12x18
    ((26, 30), 2, "paper", None, True, None, None),          # 26x30 - 2 * 8 = 10x14
    ((26, 30), 7, "paper", None, True, "scale", "(the scale + 6, div2k)"),
    ((26, 30), 13, "classic", None, False, "scale", "leaves 0x0"),
    ((10, 30), 2, "classic", None, False, None, None),
])
def test_image_size_rules(size, scale, protocol, crop, div2k, option, left):
    w, h = size
    if option is None:
        check_image_size("x.png", h, w, scale, protocol, crop, div2k)
        return
    with pytest.raises(ImageTooSmall) as info:
        check_image_size("x.png", h, w, scale, protocol, crop, div2k)
    assert info.value.option == option and f"x.png ({w}x{h})" in info.value.detail
    assert left in info.value.detail and str(info.value).startswith(f"{option} ")


@given(w=st.integers(1, 60), h=st.integers(1, 60),
       scale=st.sampled_from([0.7, 1, 1.5, 2, 2.5, 3, 4, 6, 7, 12, 18, 30]),
       protocol=st.sampled_from(["mmedit", "mmagic", "paper", "classic"]),
       crop=st.none() | st.integers(0, 20), div2k=st.booleans())
def test_image_size_check_agrees_with_scoring(w, h, scale, protocol, crop, div2k):
    """check_image_size refuses exactly the images that make_sample and score cannot score: from
    the size alone, the same rules."""
    import tempfile
    rng = np.random.default_rng(w * 100 + h)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "i.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        try:
            check_image_size(path, h, w, scale, protocol, crop, div2k)
            refused = False
        except ImageTooSmall:
            refused = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                sample = make_sample(path, scale, protocol)
                pred = np.clip(sample.gt.astype(np.float64) + rng.normal(0, 5, sample.gt.shape),
                               0, 255)
                values = score(pred, sample.gt, scale, protocol, crop, div2k)
            scored = np.isfinite(values["psnr"]) and sample.lr.size > 0
        except (ValueError, ZeroDivisionError, RuntimeWarning):
            scored = False
    assert refused != scored


def test_metrics_refuse_empty_and_too_small_images():
    a, b = noisy_pair(9, shape=(20, 16, 3))
    with pytest.raises(ValueError, match="leaves no pixels"):
        psnr_rgb(a, b, crop=8)
    with pytest.raises(ValueError, match="leaves no pixels"):
        psnr_y(a / 255, b / 255, shave=10)
    with pytest.raises(ValueError, match="crop must be >= 0"):
        psnr_rgb(a, b, crop=-1)
    with pytest.raises(ValueError, match="SSIM needs images of at least 11x11, got 10x14"):
        ssim_mmedit(a, b, crop=3)
    assert 0 < ssim_mmedit(a, b, crop=2) < 1  # 12x16


def test_evaluate_checks_sizes_and_crop_before_loading_the_model(tmp_path):
    Image.fromarray(np.zeros((30, 26, 3), np.uint8)).save(tmp_path / "a.png")
    missing = str(tmp_path / "missing.pth")  # loading it would raise FileNotFoundError
    with pytest.raises(ImageTooSmall, match=r"^scale 200: .*a\.png \(26x30\) is too small"):
        evaluate(missing, str(tmp_path), [2, 200], progress=False)
    with pytest.raises(ImageTooSmall, match=r"^crop 20: "):
        evaluate(missing, str(tmp_path), [2], crop=20, progress=False)
    with pytest.raises(ValueError, match="crop must be >= 0, got -1"):
        evaluate(missing, str(tmp_path), [2], crop=-1, progress=False)


def test_options_a_protocol_ignores_are_refused(tmp_path):
    """crop counts under mmedit and mmagic only, div2k under paper only: given elsewhere they are
    refused before any work (they used to be ignored without a word)."""
    Image.fromarray(np.zeros((30, 26, 3), np.uint8)).save(tmp_path / "a.png")
    missing = str(tmp_path / "missing.pth")  # loading it would raise FileNotFoundError
    for protocol in ("paper", "classic"):
        with pytest.raises(OptionIgnored, match=rf"^crop applies under the mmedit and mmagic "
                                                rf"protocols only; the {protocol} protocol"):
            evaluate(missing, str(tmp_path), [2], protocol=protocol, crop=0, progress=False)
    for protocol in ("mmedit", "mmagic", "classic"):
        with pytest.raises(OptionIgnored, match=f"^div2k applies under the paper protocol only, "
                                                f"not {protocol}$"):
            evaluate(missing, str(tmp_path), [2], protocol=protocol, div2k=True, progress=False)
    for protocol, crop, div2k in (("mmedit", 0, False), ("mmagic", 3, False), ("paper", None, True)):
        results = evaluate("bicubic", str(tmp_path), [2], protocol=protocol, crop=crop,
                           div2k=div2k, progress=False)
        assert results[os.path.basename(tmp_path)]["2"]["images"]


def lr_dir_case(tmp_path, lr_wh):
    """A 26x30 (WxH) HR image and its x2 LR file of size `lr_wh`, under the LR folder's X2."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (30, 26, 3), np.uint8)).save(data / "img.png")
    (tmp_path / "LR" / "X2").mkdir(parents=True)
    w, h = lr_wh
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
        tmp_path / "LR" / "X2" / "imgx2.png")
    return str(data), str(tmp_path / "LR")


@pytest.mark.parametrize("protocol,lr_wh,accepted", [
    ("paper", (13, 15), True),      # floor(26 / 2) x floor(30 / 2)
    ("paper", (12, 12), False),     # made from the mmedit protocol's 24x24 GTmod12
    ("paper", (9, 10), False),      # an x3 file in the X2 folder
    ("paper", (14, 15), False),     # ceil, not floor
    ("mmedit", (12, 12), True),
    ("mmedit", (13, 15), False),
])
def test_lr_dir_file_sizes_are_checked_before_any_work(tmp_path, protocol, lr_wh, accepted):
    """An LR file from lr_dir must be the LR size of its HR image at that scale: another size (made
    for another scale, or another crop) would be upscaled to the ground truth's size and scored as
    if it matched. Checked from the headers before the model loads, and again in make_sample."""
    data, lr_dir = lr_dir_case(tmp_path, lr_wh)
    missing = str(tmp_path / "missing.pth")  # loading it would raise FileNotFoundError
    if accepted:
        results = evaluate("bicubic", data, [2], protocol=protocol, lr_dir=lr_dir, progress=False)
        assert len(results["data"]["2"]["images"]) == 1
        return
    w, h = lr_wh
    want = "12x12" if protocol == "mmedit" else "13x15"
    message = (rf"imgx2\.png is {w}x{h}, but x2 of .*img\.png \(26x30\) under the {protocol} "
               rf"protocol needs a {want} LR image$")
    with pytest.raises(LRFileMismatch, match=message):
        evaluate(missing, data, [2], protocol=protocol, lr_dir=lr_dir, progress=False)
    with pytest.raises(LRFileMismatch, match=message):
        make_sample(os.path.join(data, "img.png"), 2, protocol, lr_dir=lr_dir)


def test_16_bit_grayscale_is_refused_before_any_work(tmp_path):
    """Pillow's convert('RGB') clips a 16-bit grayscale image to 255: it was scored as white."""
    Image.fromarray(np.full((24, 24), 40000, np.uint16)).save(tmp_path / "deep.png")
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"deep\.png is a 16-bit \(or wider\) image, which 8-bit "
                                         r"scoring would clip or truncate"):
        evaluate(missing, str(tmp_path), [2], progress=False)


def test_16_bit_colour_png_is_refused_before_any_work(tmp_path):
    """Pillow opens a 16-bit RGB PNG as 8-bit "RGB" (the low byte dropped): the file's header says
    what it is, and it is refused as the 16-bit grayscale one is."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    h, w = 24, 24
    rows = b"".join(b"\x00" + struct.pack(">HHH", 40000, 20000, 1000) * w for _ in range(h))
    (tmp_path / "deep.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode == "RGB" and im.size == (w, h)
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"deep\.png is a 16-bit \(or wider\) image, which 8-bit "
                                         r"scoring would clip or truncate"):
        evaluate(missing, str(tmp_path), [2], progress=False)


def test_missing_lr_file_is_found_before_any_work(tmp_path):
    data, lr_dir = lr_dir_case(tmp_path, (13, 15))
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="no LR file for img.png at x3"):
        evaluate(missing, data, [2, 3], protocol="paper", lr_dir=lr_dir, progress=False)


def test_infinite_psnr_is_written_as_null(tmp_path):
    """A prediction equal to its ground truth has an infinite PSNR; JSON has no Infinity (Python's
    json would write it, and JavaScript's JSON.parse, jq and others refuse the file)."""
    import json
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(data / "flat.png")
    out = tmp_path / "r.json"
    flat = lambda lr, h, w: np.full((h, w, 3), 90 / 255)  # noqa: E731
    results = evaluate(flat, str(data), [2], json_path=str(out), progress=False)
    assert results["data"]["2"]["psnr"] == math.inf  # the returned results keep it

    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON file")
    record = json.loads(out.read_text(), parse_constant=refuse)
    assert record["results"]["data"]["2"]["psnr"] is None
    assert record["results"]["data"]["2"]["images"][0]["psnr"] is None
    assert record["results"]["data"]["2"]["ssim"] == pytest.approx(1)


def test_evaluate_writes_json_atomically(tmp_path, monkeypatch):
    import importlib
    import json
    module = importlib.import_module("liif_cuda.evaluation.evaluate")
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (30, 26, 3), np.uint8)).save(
        data / "a.png")
    out = tmp_path / "r.json"

    def dump(record, f, **kwargs):
        f.write('{"protocol": ')
        raise KeyboardInterrupt
    monkeypatch.setattr(module.json, "dump", dump)
    with pytest.raises(KeyboardInterrupt):
        evaluate("bicubic", str(data), [2], json_path=str(out), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["data"]  # neither a partial file nor a temporary one
    monkeypatch.undo()
    results = evaluate("bicubic", str(data), [2], json_path=str(out), progress=False)
    assert json.loads(out.read_text())["results"] == results


@requires_shared
def test_published_scales_pass_the_size_check():
    """Set5 and Set14 at every scale of the published tables, under every protocol (the check
    reads the sizes only)."""
    from liif_cuda.evaluation.evaluate import check_sizes, list_images
    files = {d: list_images(os.path.join(SHARED, "data", d)) for d in ("Set5", "Set14")}
    for protocol in ("mmedit", "mmagic", "paper", "classic"):
        for div2k in (False, True):
            check_sizes(files, [2, 3, 4, 6, 12, 18, 24, 30], protocol, div2k=div2k)


def test_score_applies_each_protocols_metric():
    """score() itself: which metric, border and SSIM channels each protocol scores with."""
    gt, pred = noisy_pair(11, (40, 44, 3))
    gt = gt.astype(np.uint8)
    border = 4 + 6
    assert score(pred, gt, 4, "paper", div2k=True)["psnr"] == pytest.approx(
        psnr_rgb(pred, gt.astype(float), crop=border), abs=1e-12)
    assert score(pred, gt, 4, "paper")["psnr"] == pytest.approx(
        psnr_y(pred / 255, gt / 255, shave=4), abs=1e-12)
    for protocol, blue_only in (("mmedit", True), ("mmagic", False)):
        assert score(pred, gt, 4, protocol)["ssim"] == pytest.approx(
            ssim_mmedit(pred, gt.astype(float), 4, first_channel_only=blue_only), abs=1e-12)
    assert score(pred, gt, 4, "mmedit")["ssim"] != pytest.approx(score(pred, gt, 4, "mmagic")["ssim"])
