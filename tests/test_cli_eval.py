"""`liif-cuda eval`'s checks of its arguments: each refused before any work, with one line naming
the option (and the image, where an image's size is the trouble). Tiny images, the bicubic model."""

import importlib
import json
import os

import numpy as np
import pytest
import test_cli
from conftest import SHARED, requires_shared
from PIL import Image
from test_cli import checkpoint  # noqa: F401  (a fixture: a small LIIF checkpoint)


SET5 = os.path.join(SHARED, "data", "Set5")
# liif_cuda.evaluation's `evaluate` attribute is the function; this is its module.
evaluate_module = importlib.import_module("liif_cuda.evaluation.evaluate")


@pytest.fixture
def folder(tmp_path):
    """Two 26x30 (WxH) images: 24x24 after the mmedit protocol's GTmod12."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


@pytest.fixture
def no_work(monkeypatch):
    """Any prediction fails the test: the checks must come before the evaluation."""
    def predict(*args, **kwargs):
        raise AssertionError("the evaluation started")
    monkeypatch.setattr(evaluate_module, "predict", predict)


def run(*argv):
    return test_cli.run("eval", *argv)


def error_of(capsys, *argv):
    return test_cli.error_of(capsys, "eval", *argv)


def test_device_cuda_without_a_gpu(folder, monkeypatch, capsys, no_work):
    """As upscale: one line and status 2, before the model is loaded (it used to fail in model.to
    with a traceback: 'Torch not compiled with CUDA enabled')."""
    import torch

    import liif_cuda.load
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(liif_cuda.load, "load_model", load_model)
    for model in ("edsr-baseline-liif", "bicubic"):
        status, err = error_of(capsys, "--model", model, "--data", folder, "--scales", 2,
                               "--device", "cuda")
        # A CPU build of torch says so after it, in parentheses.
        assert status == 2 and err.startswith(
            "liif-cuda: error: --device cuda: no CUDA GPU is available"), err
        assert "\n" not in err


def test_device_cuda_without_cuda_kernels_is_one_line(folder, capsys, monkeypatch):
    """A GPU, but a build of liif_cuda without its CUDA kernels: named before any work."""
    import torch

    import liif_cuda
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(liif_cuda, "build_info", lambda: {"cuda": False})
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2,
                           "--device", "cuda")
    assert status == 2 and err == ("liif-cuda: error: --device cuda: liif_cuda was built without "
                                   "its CUDA kernels (docs/install.md)"), err


def test_model_that_cannot_be_loaded_is_named(tmp_path, folder, capsys, monkeypatch, no_work):
    """An unknown name, a file that is no checkpoint, pretrained weights whose file is corrupt: one
    line that names --model, status 1."""
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "edsr-baseline-liif.pth").write_bytes(b"truncated")
    monkeypatch.setenv("LIIF_CUDA_WEIGHTS", str(weights))
    for model, message in (("no-such-model", "neither a checkpoint file nor a pretrained name"),
                           (tmp_path / "junk.pth", ""),
                           ("edsr-baseline-liif", "does not have the sha256")):
        status, err = error_of(capsys, "--model", model, "--data", folder, "--scales", 2,
                               "--device", "cpu")
        assert status == 1 and err.startswith("liif-cuda: error: --model: "), err
        assert message in err


def test_json_folder_is_checked_first(tmp_path, folder, capsys, no_work):
    missing = tmp_path / "no" / "such" / "x.json"
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2,
                           "--json", missing)
    assert status == 1 and f"--json {missing}" in err and "does not exist" in err
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2,
                           "--json", a_file / "x.json")
    assert status == 1 and "--json" in err and "is not a folder" in err
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2,
                           "--json", tmp_path)
    assert status == 2 and f"--json {tmp_path} is a folder" in err


def test_json_folder_not_writable(tmp_path, folder, capsys, no_work):
    """/proc takes no file, for root too (os.access, used before, says yes to root everywhere: the
    evaluation ran and its --json failed at the end)."""
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2,
                           "--json", "/proc/x.json")
    assert status == 1 and err.startswith("liif-cuda: error: --json /proc/x.json: cannot write "
                                          "into folder /proc (")


def test_json_is_written_atomically(tmp_path, folder, capsys, monkeypatch):
    """An interrupted write leaves the previous file as it was and no temporary file; the table is
    printed before the file is written, so that its results are not lost."""
    out = tmp_path / "r.json"
    out.write_text("previous")

    def dump(record, f, **kwargs):
        f.write('{"protocol": ')
        raise RuntimeError("interrupted")
    monkeypatch.setattr(evaluate_module.json, "dump", dump)
    assert run("--model", "bicubic", "--data", folder, "--scales", 2, "--json", out,
               "--overwrite") == 1
    captured = capsys.readouterr()
    assert "| x2 |" in captured.out and "interrupted" in captured.err
    assert out.read_text() == "previous" and sorted(os.listdir(tmp_path)) == ["r.json", "tiny"]
    monkeypatch.undo()
    assert run("--model", "bicubic", "--data", folder, "--scales", 2, "--json", out,
               "--overwrite") == 0
    assert json.loads(out.read_text())["results"]["tiny"]["2"]["psnr"] > 0
    assert sorted(os.listdir(tmp_path)) == ["r.json", "tiny"]


def test_json_that_appears_during_the_evaluation_is_kept(tmp_path, folder, capsys, monkeypatch):
    out = tmp_path / "r.json"
    real = evaluate_module.evaluate

    def evaluate(*args, **kwargs):
        out.write_text("someone else's")
        return real(*args, **kwargs)
    monkeypatch.setattr("liif_cuda.evaluation.evaluate", evaluate)
    status = run("--model", "bicubic", "--data", folder, "--scales", 2, "--json", out)
    # The evaluation's progress line (no terminal here), then the error.
    progress, err = capsys.readouterr().err.strip().splitlines()
    assert progress.startswith("evaluate: tiny x2: ") and err.startswith("liif-cuda: error: --json")
    assert status == 1 and "--overwrite" in err and out.read_text() == "someone else's"


@pytest.mark.filterwarnings("error")  # numpy's 'Mean of empty slice' warnings before the fix
def test_crop(folder, capsys, no_work):
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2,
                           "--crop", -1)
    assert status == 2 and "--crop must be >= 0, got -1" in err
    _, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2,
                      "--crop", 100000)
    image = os.path.join(folder, "0.png")
    assert err.startswith(f"liif-cuda: error: --crop 100000: {image} (26x30) at x2: ") and \
        "leaves 0x0" in err
    # At x2 the ground truth is 24x24: a crop of 7 leaves 10x10, one short of SSIM's window.
    _, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2, "--crop", 7)
    assert err.startswith(f"liif-cuda: error: --crop 7: {image} (26x30)") and \
        "leaves 10x10, and SSIM needs at least 11x11" in err


@pytest.mark.parametrize("argv,message", [
    (("--protocol", "paper", "--crop", "0"), "--crop applies under the mmedit and mmagic protocols "
                                             "only; the paper protocol removes its own border"),
    (("--protocol", "classic", "--crop", "4"), "--crop applies under the mmedit and mmagic "
                                               "protocols only; the classic protocol"),
    (("--div2k",), "--div2k applies under the paper protocol only, not mmedit"),
    (("--protocol", "classic", "--div2k"), "--div2k applies under the paper protocol only, "
                                           "not classic"),
])
def test_options_the_protocol_ignores(folder, capsys, no_work, argv, message):
    """They used to be ignored without a word."""
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2, *argv)
    assert status == 2 and err.startswith(f"liif-cuda: error: {message}")
    assert len(err.splitlines()) == 1


def test_lr_dir_file_of_another_size(tmp_path, folder, capsys, no_work):
    """An x3 file in the X2 folder: one line naming the file, its size and the size needed."""
    lr = tmp_path / "LR" / "X2"
    lr.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((10, 8, 3), np.uint8)).save(lr / f"{i}x2.png")
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2,
                           "--protocol", "paper", "--lr-dir", tmp_path / "LR")
    assert status == 1 and err == (f"liif-cuda: error: --lr-dir: {lr / '0x2.png'} is 8x10, but x2 "
                                   f"of {os.path.join(folder, '0.png')} (26x30) under the paper "
                                   f"protocol needs a 13x15 LR image")


def test_lr_dir_file_missing(tmp_path, folder, capsys, no_work):
    """Named by the option, as a file of another size is."""
    (tmp_path / "LR" / "X2").mkdir(parents=True)
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2,
                           "--protocol", "paper", "--lr-dir", tmp_path / "LR")
    assert status == 1 and err == (f"liif-cuda: error: --lr-dir: no LR file for 0.png at x2 under "
                                   f"{tmp_path / 'LR'} (tried X2/0x2.png and similar)")


def test_lr_dir_with_two_data_folders(tmp_path, folder, capsys, no_work):
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--data", folder,
                           "--scales", 2, "--protocol", "paper", "--lr-dir", tmp_path)
    assert status == 2 and err == ("liif-cuda: error: --lr-dir goes with exactly one --data (its "
                                   "LR files), got 2")


def test_two_data_folders_of_one_name(tmp_path, folder, capsys, no_work):
    """The results are keyed by the folder's name: the first folder's used to vanish from the
    table and the JSON, silently."""
    other = tmp_path / "elsewhere" / "tiny"
    os.makedirs(other)
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--data", other,
                           "--scales", 2)
    assert status == 1 and err == (f"liif-cuda: error: data folders {folder} and {other} are both "
                                   f"named tiny, which names their results; rename or link one")


@pytest.mark.filterwarnings("error")
def test_crop_that_leaves_the_ssim_window_is_accepted(folder, capsys):
    assert run("--model", "bicubic", "--data", folder, "--scales", 2, "--crop", 6) == 0
    assert "| x2 |" in capsys.readouterr().out


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("protocol", ["mmedit", "paper", "classic"])
def test_scale_too_large_for_an_image(folder, capsys, no_work, protocol):
    image = os.path.join(folder, "0.png")
    for scale in (200, 1000):
        _, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", f"2,{scale}",
                          "--protocol", protocol)
        assert err == (f"liif-cuda: error: --scales {scale}: {image} (26x30) is too small for "
                       f"x{scale}: its LR image would be 0x0")
    # mmedit, x8: a 3x3 LR image, a 24x24 ground truth, 8 pixels removed: 8x8 for SSIM's 11x11.
    # paper, classic, x13: a 2x2 LR image, 26x26, 13 pixels removed: nothing left.
    scale, left = (8, "leaves 8x8, and SSIM needs") if protocol == "mmedit" else (13, "leaves 0x0")
    _, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", scale,
                      "--protocol", protocol)
    assert err.startswith(f"liif-cuda: error: --scales {scale}: {image} (26x30) is too small for "
                          f"x{scale}: removing a {scale}-pixel border (the scale)") and left in err


@requires_shared
@pytest.mark.filterwarnings("error")
def test_scale_too_large_for_set5(capsys, no_work):
    """The new user's commands: x200 leaves nothing of baby.png after the border, x1000 gives an
    empty LR image."""
    baby = os.path.join(SET5, "baby.png")
    _, err = error_of(capsys, "--model", "bicubic", "--data", SET5, "--scales", 200)
    assert err.startswith(f"liif-cuda: error: --scales 200: {baby} (512x512) is too small for x200")
    _, err = error_of(capsys, "--model", "bicubic", "--data", SET5, "--scales", 1000)
    assert err == (f"liif-cuda: error: --scales 1000: {baby} (512x512) is too small for x1000: "
                   f"its LR image would be 0x0")


def test_image_too_small_for_the_mmedit_protocol(tmp_path, capsys, no_work):
    Image.fromarray(np.zeros((30, 10, 3), np.uint8)).save(tmp_path / "narrow.png")
    _, err = error_of(capsys, "--model", "bicubic", "--data", tmp_path, "--scales", 2)
    assert err.startswith(f"liif-cuda: error: --protocol mmedit: {tmp_path / 'narrow.png'} (10x30) "
                          f"is too small: the protocol crops it to a multiple of 12 pixels")


@pytest.mark.parametrize("content", [b"", b"not an image"])
def test_unreadable_image_is_named(tmp_path, folder, capsys, no_work, content):
    """As upscale's "input X cannot be read as an image", before any work."""
    bad = os.path.join(folder, "2.png")
    with open(bad, "wb") as f:
        f.write(content)
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", 2)
    assert status == 1 and err == (f"liif-cuda: error: {bad} cannot be read as an image (Pillow "
                                   f"cannot identify its format)")


@pytest.mark.parametrize("scales,message", [
    ("2,,3", "--scales has an empty item in '2,,3'"),
    ("2,", "--scales has an empty item in '2,'"),
    (",2", "--scales has an empty item in ',2'"),
    ("", "--scales has an empty item in ''"),
    ("2, ,3", "--scales has an empty item"),
    ("2,x", "--scales must be numbers separated by commas"),
    ("2,-1", "--scales must be finite numbers > 0"),
    ("inf", "--scales must be finite numbers > 0"),
    ("nan", "--scales must be finite numbers > 0"),
    ("2,3,2.0", "--scales gives x2 twice (2 and 2.0)"),
])
def test_bad_scales(folder, capsys, no_work, scales, message):
    status, err = error_of(capsys, "--model", "bicubic", "--data", folder, "--scales", scales)
    assert status == 2 and message in err


def test_scales_with_spaces_are_accepted(folder, capsys):
    assert run("--model", "bicubic", "--data", folder, "--scales", " 2, 3 ") == 0
    out = capsys.readouterr().out
    assert "| x2 |" in out and "| x3 |" in out


def test_a_log_gets_a_line_per_scale_and_the_table_says_what_it_is_of(folder, capsys):
    """Without a terminal (here: captured) no bar, but a line on stderr as each scale is done, so
    that a long evaluation in a log shows progress; the table's first line names the model and
    the protocol."""
    assert run("--model", "bicubic", "--data", folder, "--scales", "2,3", "--protocol",
               "classic") == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert [x.split(": ")[1] for x in lines] == ["tiny x2", "tiny x3"], lines
    assert all(x.startswith("evaluate: ") and " 2 images, PSNR " in x and x.endswith(" s")
               for x in lines)
    out = captured.out.splitlines()
    assert out[0] == "bicubic, protocol classic, resize pillow (PSNR dB / SSIM):"
    assert out[1].startswith("| scale | tiny PSNR / SSIM |")


def test_evaluate_refuses_an_unknown_progress(folder):
    from liif_cuda.evaluation import evaluate
    with pytest.raises(ValueError, match="progress must be True, False or 'lines'"):
        evaluate("bicubic", folder, [2], progress="bar")


@pytest.mark.parametrize("query_bf16,convolutions_bf16", [(True, True), (False, True),
                                                          (True, False), (False, False)])
def test_a_precision_run_in_float32_is_recorded(tmp_path, folder, checkpoint, capsys, monkeypatch,
                                                query_bf16, convolutions_bf16):
    """bf16 asked for on a CPU that computes it in float32 (no AVX512-BF16 for the query, no bf16
    convolutions for the encoder): the table's heading and the JSON say which ran float32, beside
    what was asked for."""
    import liif_cuda
    import liif_cuda.upscaling as upscaling
    info = {**liif_cuda.build_info(), "cpu_bf16": query_bf16}
    monkeypatch.setattr(liif_cuda, "build_info", lambda: info)
    monkeypatch.setattr(upscaling, "cpu_has_bf16_convolutions", lambda: convolutions_bf16)
    out = tmp_path / "r.json"
    assert run("--model", checkpoint, "--data", folder, "--scales", 2, "--device", "cpu",
               "--precision", "bf16", "--encoder-precision", "bf16", "--json", out) == 0
    heading = capsys.readouterr().out.splitlines()[0]
    ran = [name for name, native in (("encoder_precision", convolutions_bf16),
                                     ("precision", query_bf16)) if not native]
    record = json.loads(out.read_text())
    assert (record["precision"], record["encoder_precision"]) == ("bf16", "bf16")
    assert record["ran_float32"] == ran
    marked = " (ran float32 on this CPU)"
    assert (f", precision bf16{marked}" in heading) == (not query_bf16), heading
    assert (f"encoder precision bf16{marked}" in heading) == (not convolutions_bf16), heading
    assert heading.count(marked) == len(ran), heading


def test_evaluate_records_a_precision_run_in_float32(tmp_path, folder, checkpoint, monkeypatch):
    """The Python API's JSON says the same as the command's: which precisions asked for the CPU
    computed in float32."""
    import liif_cuda
    import liif_cuda.upscaling as upscaling
    from liif_cuda.evaluation import evaluate
    info = {**liif_cuda.build_info(), "cpu_bf16": False}
    monkeypatch.setattr(liif_cuda, "build_info", lambda: info)
    monkeypatch.setattr(upscaling, "cpu_has_bf16_convolutions", lambda: True)
    model = liif_cuda.load_model(checkpoint)
    for precision, ran in (("bf16", ["precision"]), ("fp32", [])):
        out = tmp_path / f"{precision}.json"
        evaluate(model, folder, [2], protocol="paper", precision=precision,
                 encoder_precision="bf16", json_path=str(out), progress=False)
        assert json.loads(out.read_text())["ran_float32"] == ran
    # A function, even one with a query_rgb attribute, has no precisions; nothing is recorded.
    def predict(lr, out_h, out_w):
        return np.zeros((out_h, out_w, 3))
    predict.query_rgb = None
    out = tmp_path / "function.json"
    evaluate(predict, folder, [2], protocol="paper", precision="bf16", json_path=str(out),
             progress=False)
    assert json.loads(out.read_text())["ran_float32"] == []
