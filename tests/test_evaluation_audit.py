"""Evaluation, the checks a mutation audit of liif_cuda/evaluation found missing: each test states
the expectation it checks from the spec (section 6), a hand computation or scikit-image, not from
the code under test. Small synthetic images: the file runs in seconds and needs no shared data."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import matlab_resize_1d
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from liif_cuda.evaluation import evaluate, format_table, imresize, psnr_rgb, psnr_y, ssim_mmedit
from liif_cuda.evaluation.protocols import (check_image_size, crop_for_scale, finish_prediction,
                                            lr_shape, make_sample, matlab_y, score)


def skimage_ssim(a, b, channel_axis=None):
    """mmediting's SSIM as scikit-image states it: Gaussian 11x11 window, sigma 1.5, population
    covariance, data range 255, the mean of the valid part of the map."""
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255,
                                 channel_axis=channel_axis)


def skimage_psnr(pred, gt, crop):
    c = slice(crop, -crop) if crop else slice(None)
    return peak_signal_noise_ratio(np.asarray(gt, np.float64)[c, c],
                                   np.asarray(pred, np.float64)[c, c], data_range=255)


def save(path, array):
    Image.fromarray(array).save(path)
    return str(path)


# Metrics at their smallest sizes.

def test_ssim_accepts_exactly_its_window():
    """11x11 pixels left after the crop is enough for SSIM's 11x11 window (a single map value),
    as check_image_size promises; scikit-image computes the same value."""
    rng = np.random.default_rng(20)
    a = rng.integers(0, 256, (21, 21, 3)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    expected = skimage_ssim(a[5:-5, 5:-5], b[5:-5, 5:-5], channel_axis=2)
    assert ssim_mmedit(a, b, crop=5) == pytest.approx(expected, abs=1e-12)
    blue = skimage_ssim(a[5:-5, 5:-5, 2], b[5:-5, 5:-5, 2])
    assert ssim_mmedit(a, b, crop=5, first_channel_only=True) == pytest.approx(blue, abs=1e-12)
    # 30x26 at x3.3: 24x24 after GTmod12, a 23x23 ground truth, 11x11 after a crop of 6
    check_image_size("x.png", 30, 26, 3.3, "mmagic", crop=6)


def test_psnr_of_a_single_pixel_left_after_the_border():
    """A 3x3 image with a 1-pixel border leaves one pixel, which is scored (check_image_size
    accepts it under paper and classic): 20 log10(255 / rms) of the centre pixel by hand."""
    a = np.zeros((3, 3, 3))
    b = np.zeros((3, 3, 3))
    b[1, 1] = (3, 4, 5)  # mse over the centre pixel's channels: (9 + 16 + 25) / 3
    assert psnr_rgb(a, b, crop=1) == pytest.approx(20 * math.log10(255 / math.sqrt(50 / 3)),
                                                   abs=1e-12)
    y = (3 * 65.738 + 4 * 129.057 + 5 * 25.064) / 256 / 255  # the spec's Y difference, [0, 1]
    assert psnr_y(a / 255, b / 255, shave=1) == pytest.approx(-10 * math.log10(y ** 2), abs=1e-9)
    check_image_size("x.png", 3, 3, 1, "paper")


# Protocol pieces, each against the spec's words.

@pytest.mark.parametrize("protocol", ["mmedit", "mmagic"])
def test_mmedit_and_mmagic_psnr_remove_the_crop_border(protocol):
    """RGB PSNR after removing `crop` (default: the scale) pixels from each side."""
    rng = np.random.default_rng(21)
    gt = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
    pred = np.clip(gt + rng.normal(0, 12, gt.shape), 0, 255)
    pred[:4] = 255  # an error that the default crop of 4 removes entirely
    assert score(pred, gt, 4, protocol)["psnr"] == pytest.approx(skimage_psnr(pred, gt, 4),
                                                                 abs=1e-10)
    assert score(pred, gt, 4, protocol, crop=6)["psnr"] == pytest.approx(
        skimage_psnr(pred, gt, 6), abs=1e-10)


def test_matlab_y_by_hand():
    """rgb2ycbcr's Y of uint8 RGB: 16 + (65.481 R + 128.553 G + 24.966 B) / 255, rounded."""
    rgb = np.array([[255, 0, 0],      # 16 + 65.481 = 81.481
                    [0, 255, 0],      # 16 + 128.553 = 144.553
                    [0, 0, 255],      # 16 + 24.966 = 40.966
                    [1, 2, 3],        # 16 + 397.485 / 255 = 17.559
                    [10, 20, 30],     # 16 + 3974.85 / 255 = 31.588
                    [100, 150, 200]])  # 16 + 30824.25 / 255 = 136.879
    assert matlab_y(rgb).tolist() == [81, 145, 41, 18, 32, 137]


def test_classic_scores_an_8_bit_prediction():
    """The classic rows score MATLAB uint8 images: the prediction is clamped and rounded to 8 bits
    (as under mmedit), unlike mmagic and paper."""
    pred = np.array([[[0.4 / 255, 1.6 / 255, 254.4 / 255]]])
    assert np.array_equal(finish_prediction(pred, "classic"), [[[0.0, 2.0, 254.0]]])


def test_lr_size_absorbs_float_error():
    """floor(H / s + 1e-9): 33 / 1.1 is 29.999999999999996 in float64 and 55 / 1.1 is
    49.99999999999999, 30 and 50 exactly; the 1e-9 makes them 30 and 50."""
    assert 33 / 1.1 < 30 and 55 / 1.1 < 50  # the premise
    assert lr_shape(33, 55, 1.1) == (30, 50)
    assert crop_for_scale(np.zeros((33, 55, 3)), 1.1).shape == (33, 55, 3)


def test_ground_truth_size_rounds_for_non_integer_scales():
    """h_lr = floor(H / s + 1e-9), ground truth round(h_lr * s): 12 at x1.7 gives h_lr = 7 and
    round(11.9) = 12 (not 11); 20 at x2.6 gives 7 and round(18.2) = 18."""
    assert lr_shape(12, 20, 1.7) == (7, 11)
    assert crop_for_scale(np.zeros((12, 20, 3)), 1.7).shape == (12, 19, 3)  # round(18.7) = 19
    assert crop_for_scale(np.zeros((20, 12, 3)), 2.6).shape == (18, 10, 3)  # 7 * 2.6, 4 * 2.6


def test_samples_by_hand(tmp_path):
    """make_sample against the spec: the ground truth is the top-left corner (after GTmod12 under
    mmedit and mmagic, never under paper), and the LR image is Pillow's bicubic resize of that
    ground truth (8-bit) to floor(size / s + 1e-9); MATLAB's imresize of it with resize='matlab'."""
    rng = np.random.default_rng(22)
    hr = rng.integers(0, 256, (41, 53, 3), dtype=np.uint8)
    path = save(tmp_path / "img.png", hr)
    cases = [  # protocol, scale, the ground truth's size (h, w), the LR size
        ("mmedit", 3, (36, 48), (12, 16)),   # GTmod12: 36x48, then 12x16 LR
        ("mmagic", 3, (36, 48), (12, 16)),
        ("paper", 3, (39, 51), (13, 17)),    # no GTmod12: floor(41 / 3) = 13, floor(53 / 3) = 17
        ("mmedit", 7, (35, 42), (5, 6)),     # 36x48 after GTmod12, then 5 * 7 x 6 * 7
        ("paper", 1.7, (41, 53), (24, 31)),  # floor(24.1), floor(31.2); round(40.8), round(52.7)
    ]
    for protocol, scale, (h, w), (h_lr, w_lr) in cases:
        sample = make_sample(path, scale, protocol)
        assert np.array_equal(sample.gt, hr[:h, :w]), (protocol, scale)
        expected = np.asarray(Image.fromarray(hr[:h, :w]).resize((w_lr, h_lr), Image.BICUBIC))
        assert np.array_equal(sample.lr, expected), (protocol, scale)
        assert not sample.gray
    matlab = make_sample(path, 3, "paper", resize="matlab")
    assert np.array_equal(matlab.lr, imresize(hr[:39, :51], output_shape=(13, 17)))
    assert not np.array_equal(matlab.lr, make_sample(path, 3, "paper").lr)


@pytest.mark.parametrize("protocol,scale,shape", [("mmedit", 3.3, (30, 26)),
                                                  ("paper", 2.5, (48, 53))])
def test_lr_size_for_non_integer_scales_is_the_spec_one(tmp_path, protocol, scale, shape):
    """Spec section 6: h_lr = floor(H / s + 1e-9) of the image (after GTmod12 where it applies;
    it was taken of the cropped ground truth, a pixel short where round(h_lr * s) < h_lr * s),
    the image cropped to round(h_lr * s), the LR image Pillow's bicubic resize of that crop to
    h_lr x w_lr. mmedit, 30x26 at x3.3: 24x24 after GTmod12, h_lr = 7, ground truth round(23.1) =
    23. paper, 48x53 at x2.5: w_lr = 21, ground truth round(52.5) = 52."""
    hr = np.random.default_rng(28).integers(0, 256, shape + (3,), dtype=np.uint8)
    path = save(tmp_path / "img.png", hr)
    h, w = (24, 24) if protocol == "mmedit" else shape
    h_lr, w_lr = math.floor(h / scale + 1e-9), math.floor(w / scale + 1e-9)
    gt_h, gt_w = round(h_lr * scale), round(w_lr * scale)
    sample = make_sample(path, scale, protocol)
    assert np.array_equal(sample.gt, hr[:gt_h, :gt_w])
    assert sample.lr.shape == (h_lr, w_lr, 3)
    expected = np.asarray(Image.fromarray(hr[:gt_h, :gt_w]).resize((w_lr, h_lr), Image.BICUBIC))
    assert np.array_equal(sample.lr, expected)


@pytest.mark.parametrize("in_shape,out_shape", [((9, 13), (4, 20)), ((12, 10), (30, 4)),
                                                ((11, 11), (5, 7))])
def test_imresize_to_a_size_uses_each_axis_own_scale(in_shape, out_shape):
    """imresize(img, output_shape=(H, W)): MATLAB derives the scale of each axis from it, H / h
    for the rows and W / w for the columns (float input: no rounding)."""
    x = np.random.default_rng(23).uniform(0, 255, in_shape)
    (h, w), (oh, ow) = in_shape, out_shape
    expected = matlab_resize_1d(matlab_resize_1d(x, oh, oh / h).T, ow, ow / w).T
    assert np.allclose(imresize(x, output_shape=out_shape), expected, rtol=0, atol=1e-9)


def test_imresize_uint8_rounds_after_each_pass_as_matlab():
    """MATLAB's imresize of a uint8 image rounds and clips to uint8 after each dimension's pass
    (rounding once at the end differed from MATLAB's own output, the MATLAB-made images of the
    fatheral/matlab_imresize project, by 1 in 14% of the values)."""
    x = np.random.default_rng(24).integers(0, 256, (12, 10), dtype=np.uint8)
    oh, ow = 5, 7  # rows shrink more (5/12) than columns (7/10): MATLAB resizes the rows first
    rows = np.clip(np.round(matlab_resize_1d(x.astype(np.float64), oh, oh / 12)), 0, 255)
    both = np.clip(np.round(matlab_resize_1d(rows.T, ow, ow / 10).T), 0, 255)
    assert np.array_equal(imresize(x, output_shape=(oh, ow)), both.astype(np.uint8))


def test_imresize_uint8_rounds_half_away_from_zero():
    """MATLAB's uint8() rounds a tie up (half away from zero), where numpy rounds to even: at x2
    the cubic's weights are multiples of 1/128, and this row gives exactly 112.5 at column 6."""
    x = np.array([[20, 76, 123, 108, 103, 7]], np.uint8)
    exact = matlab_resize_1d(x.T.astype(np.float64), 12, 2.0).T
    assert exact[0, 6] == 112.5  # the premise: a tie, whose even neighbour is 112
    assert imresize(x, output_shape=(1, 12))[0, 6] == 113


def test_imresize_clips_uint8_overshoot():
    """Bicubic overshoots at a step; a uint8 result is clipped to 0..255 (MATLAB saturates), not
    wrapped. The rows keep their size (scale 1, an exact identity), the columns double."""
    x = np.tile(np.array([0, 0, 0, 0, 255, 255, 255, 255], np.uint8), (3, 1))
    cols = matlab_resize_1d(x.T.astype(np.float64), 16, 2.0).T
    assert cols.max() > 255.5 and cols.min() < -0.5  # the premise: the cubic overshoots
    assert np.array_equal(imresize(x, output_shape=(3, 16)),
                          np.clip(np.round(cols), 0, 255).astype(np.uint8))


def test_format_table_layout():
    """The model card's layout: a column per dataset in the given order, PSNR / SSIM with four
    decimals each."""
    results = {"Set5": {"2": {"psnr": 35.71204, "ssim": 0.936549}, "4": {"psnr": 30.26676,
                                                                         "ssim": 0.85114}},
               "Set14": {"2": {"psnr": 31.61061, "ssim": 0.889149}, "4": {"psnr": 26.80934,
                                                                          "ssim": None}}}
    assert format_table(results).splitlines() == [
        "| scale | Set5 PSNR / SSIM | Set14 PSNR / SSIM |",
        "|---|---|---|",
        "| x2 | 35.7120 / 0.9365 | 31.6106 / 0.8891 |",
        "| x4 | 30.2668 / 0.8511 | 26.8093 / - |",
    ]


# evaluate() end to end: a predictor function whose output is known, scored by hand.

def constant_model(value):
    """A predictor function: a constant image of `value` (0..255 units, before the protocol's
    rounding)."""
    return lambda lr, out_h, out_w: np.full((out_h, out_w, 3), value / 255)


@pytest.fixture
def three_images(tmp_path):
    """Three 24x24 images (the mmedit protocol keeps all of each) around grey 100 with different
    spreads, so that the mean, the median and the pooled MSE of their PSNRs all differ."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(25)
    images = []
    for i, spread in enumerate((4, 20, 60)):
        img = np.clip(100 + rng.normal(0, spread, (24, 24, 3)), 0, 255).astype(np.uint8)
        images.append(img)
        save(folder / f"{i}.png", img)
    return str(folder), images


def test_evaluate_mmedit_by_hand(three_images):
    """mmedit, x2, crop 3: each image's PSNR over RGB and SSIM of Blue with 3 pixels removed,
    the prediction 100.4 rounded to 100; the dataset's values are the means over the images."""
    folder, images = three_images
    results = evaluate(constant_model(100.4), folder, [2], protocol="mmedit", crop=3,
                       progress=False)["data"]["2"]
    pred = np.full((24, 24, 3), 100.0)
    psnrs = [skimage_psnr(pred, img, 3) for img in images]
    ssims = [skimage_ssim(pred[3:-3, 3:-3, 2], img[3:-3, 3:-3, 2].astype(np.float64))
             for img in images]
    assert [i["image"] for i in results["images"]] == ["0.png", "1.png", "2.png"]
    assert [i["psnr"] for i in results["images"]] == pytest.approx(psnrs, abs=1e-9)
    assert [i["ssim"] for i in results["images"]] == pytest.approx(ssims, abs=1e-9)
    assert results["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-9)
    assert results["ssim"] == pytest.approx(np.mean(ssims), abs=1e-9)
    # The averages are per image: neither the median nor the PSNR of the pooled MSE.
    pooled = -10 * math.log10(np.mean([10 ** (-p / 10) for p in psnrs]))
    assert abs(np.median(psnrs) - np.mean(psnrs)) > 0.1 and abs(pooled - np.mean(psnrs)) > 0.1
    assert abs(np.median(ssims) - np.mean(ssims)) > 0.01


def test_evaluate_mmagic_by_hand(three_images):
    """mmagic: the prediction is not rounded (100.4 is scored), SSIM averages the three channels,
    the border is the scale."""
    folder, images = three_images
    results = evaluate(constant_model(100.4), folder, [2], protocol="mmagic",
                       progress=False)["data"]["2"]
    pred = np.full((24, 24, 3), 100.4)
    assert [i["psnr"] for i in results["images"]] == pytest.approx(
        [skimage_psnr(pred, img, 2) for img in images], abs=1e-9)
    assert [i["ssim"] for i in results["images"]] == pytest.approx(
        [skimage_ssim(pred[2:-2, 2:-2], img[2:-2, 2:-2].astype(np.float64), channel_axis=2)
         for img in images], abs=1e-9)


def test_evaluate_paper_by_hand(three_images):
    """paper: PSNR of the Y difference with shave = s, not rounded; with div2k, RGB with s + 6."""
    folder, images = three_images
    model = constant_model(100.4)
    y_results = evaluate(model, folder, [2], protocol="paper", progress=False)["data"]["2"]
    rgb_results = evaluate(model, folder, [2], protocol="paper", div2k=True,
                           progress=False)["data"]["2"]
    for img, y_image, rgb_image in zip(images, y_results["images"], rgb_results["images"]):
        diff = (100.4 - img.astype(np.float64)) / 255
        y = (diff * np.array([65.738, 129.057, 25.064]) / 256).sum(axis=2)[2:-2, 2:-2]
        assert y_image["psnr"] == pytest.approx(-10 * math.log10(np.mean(y ** 2)), abs=1e-9)
        assert rgb_image["psnr"] == pytest.approx(skimage_psnr(np.full(img.shape, 100.4), img, 8),
                                                  abs=1e-9)
        assert y_image["ssim"] is None and rgb_image["ssim"] is None
    assert y_results["ssim"] is None and rgb_results["ssim"] is None


def test_evaluate_classic_by_hand(tmp_path):
    """classic: MATLAB's rounded Y of the rounded prediction, shave = s; a grayscale file's own
    values are its Y (not rgb2ycbcr of the grey replicated to RGB)."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(26)
    grey = rng.integers(0, 256, (26, 26), dtype=np.uint8)
    colour = rng.integers(0, 256, (26, 26, 3), dtype=np.uint8)
    save(folder / "a_grey.png", grey)
    save(folder / "b_colour.png", colour)
    results = evaluate(constant_model(100.4), str(folder), [2], protocol="classic",
                       progress=False)["data"]["2"]
    grey_mse = np.mean((100.0 - grey[2:-2, 2:-2]) ** 2)
    pred_y = round(16 + (65.481 + 128.553 + 24.966) * 100 / 255)  # 100.4 -> 100 -> Y 102
    colour_y = np.round(16 + (colour.astype(np.float64) @ [65.481, 128.553, 24.966]) / 255)
    colour_mse = np.mean((pred_y - colour_y[2:-2, 2:-2]) ** 2)
    assert [i["psnr"] for i in results["images"]] == pytest.approx(
        [10 * math.log10(255 ** 2 / grey_mse), 10 * math.log10(255 ** 2 / colour_mse)], abs=1e-9)
    assert results["ssim"] is None and [i["ssim"] for i in results["images"]] == [None, None]


@pytest.mark.parametrize("protocol", ["classic", "mmagic"])
def test_bicubic_keeps_a_flat_image(tmp_path, protocol):
    """MATLAB's bicubic (normalised weights) maps a constant image to the same constant, down
    and up: the bicubic model's prediction equals the ground truth (an infinite PSNR)."""
    folder = tmp_path / "flat"
    folder.mkdir()
    save(folder / "a.png", np.full((24, 36, 3), 200, np.uint8))
    results = evaluate("bicubic", str(folder), [2, 3], protocol=protocol, resize="matlab",
                       progress=False)["flat"]
    assert results["2"]["psnr"] == math.inf and results["3"]["psnr"] == math.inf


def test_json_records_the_settings(tmp_path, three_images):
    """The JSON file names every setting that produced its results, as they were given."""
    folder, _ = three_images
    out = tmp_path / "mmagic.json"
    results = evaluate(constant_model(90), folder, [2], protocol="mmagic", resize="matlab", crop=3,
                       precision="bf16", encoder_precision="fp16", json_path=str(out),
                       progress=False)
    record = json.loads(out.read_text())
    assert {k: v for k, v in record.items() if k != "results"} == {
        "protocol": "mmagic", "resize": "matlab", "crop": 3, "div2k": False, "lr_dir": None,
        "precision": "bf16", "encoder_precision": "fp16", "ran_float32": []}
    assert record["results"] == results

    # paper with an LR folder, and div2k.
    data = tmp_path / "paper"
    data.mkdir()
    save(data / "img.png", np.full((24, 24, 3), 50, np.uint8))
    (tmp_path / "LR" / "X2").mkdir(parents=True)
    save(tmp_path / "LR" / "X2" / "imgx2.png", np.full((12, 12, 3), 50, np.uint8))
    out = tmp_path / "paper.json"
    evaluate(constant_model(90), str(data), [2], protocol="paper", lr_dir=str(tmp_path / "LR"),
             div2k=True, json_path=str(out), progress=False)
    record = json.loads(out.read_text())
    assert (record["protocol"], record["crop"], record["div2k"], record["lr_dir"]) == (
        "paper", None, True, str(tmp_path / "LR"))
    assert record["results"]["paper"]["2"]["ssim"] is None


# A LIIF model: the prediction is the original test procedure's (python/liif_reference_models.py).

def test_evaluate_a_liif_model_as_the_original_predicts(tmp_path):
    """evaluate(model) scores the original procedure's prediction: the 8-bit LR / 255, normalised
    (x - 0.5) / 0.5, queried at every pixel centre of the (H, W) ground truth, * 0.5 + 0.5, clamped.
    A tiny random EDSR-LIIF, its first conv scaled up so that its output follows its input; the
    images are not square (an H/W mix-up shows); mmagic, so no rounding hides small changes."""
    import liif_reference_models as rm  # python/, on the path through conftest

    from liif_cuda.models import LIIF, EDSRBaseline
    torch.manual_seed(0)
    model = LIIF(EDSRBaseline(n_resblocks=2, n_feats=8), hidden_list=[16, 16]).eval()
    with torch.no_grad():
        model.encoder.head[0].weight.mul_(20)
    reference = rm.LIIF(rm.EDSR(n_resblocks=2, n_feats=8), hidden_list=[16, 16])
    missing = reference.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert all(".sub_mean." in k or ".add_mean." in k for k in missing)  # unused by LIIF
    reference.eval()
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(27)
    hr = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
    save(folder / "a.png", hr)
    results = evaluate(model, str(folder), [2, 3], protocol="mmagic", device="cpu",
                       progress=False)["data"]
    for scale in (2, 3):
        h_lr, w_lr = 24 // scale, 36 // scale
        lr = np.asarray(Image.fromarray(hr).resize((w_lr, h_lr), Image.BICUBIC))
        inp = torch.from_numpy(lr.astype(np.float32) / 255).permute(2, 0, 1)[None]
        pred = rm.upscale_reference(reference, inp, 24, 36)[0].permute(1, 2, 0).double().numpy()
        expected = skimage_psnr(pred * 255, hr, scale)
        # The fused query against the reference in float32: predictions within about 1e-6 of
        # each other, which moves a PSNR near 20 dB by well under 1e-4 dB.
        assert results[f"{scale}"]["images"][0]["psnr"] == pytest.approx(expected, abs=1e-4)
