"""The liif-cuda command line, end to end on small images with a small checkpoint, and its errors."""

import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import liif_cuda
from liif_cuda import cli
from liif_cuda.models import LIIF, EDSRBaseline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = LIIF(EDSRBaseline(n_resblocks=2, n_feats=8), hidden_list=[16])
    path = tmp_path_factory.mktemp("ck") / "small.pth"
    args = {"encoder_spec": {"name": "edsr-baseline", "args": {"no_upsampling": True}},
            "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": [16]}}}
    torch.save({"model": {"name": "liif", "args": args, "sd": model.state_dict()}}, path)
    return str(path)


@pytest.fixture
def image(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(arr).save(path)
    return str(path)


def run(*argv):
    return cli.main([str(a) for a in argv])


def test_upscale_end_to_end(tmp_path, image, checkpoint, capsys):
    out = tmp_path / "out.png"
    assert run("upscale", image, "-o", out, "--scale", 2.5, "--model", checkpoint,
               "--device", "cpu") == 0
    result = Image.open(out)
    assert result.size == (35, 25) and result.mode == "RGB"
    expected = liif_cuda.upscale(Image.open(image), scale=2.5, model=liif_cuda.load_model(checkpoint))
    assert np.array_equal(np.array(result), np.array(expected))
    assert "35x25 from 14x10" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".liif-cuda-")] == []
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others, as files usually are


def test_bf16_options(tmp_path, image, checkpoint):
    """--precision bf16 and --encoder-precision bf16 reach upscale() (on the CPU: the bf16 kernels
    where the CPU has them, float32 otherwise; autocast for the encoder)."""
    out = tmp_path / "out.png"
    assert run("upscale", image, "-o", out, "--scale", 2, "--model", checkpoint, "--device", "cpu",
               "--precision", "bf16", "--encoder-precision", "bf16") == 0
    expected = liif_cuda.upscale(Image.open(image), scale=2, model=liif_cuda.load_model(checkpoint),
                                 device="cpu", precision="bf16", encoder_precision="bf16")
    assert np.array_equal(np.array(Image.open(out)), np.array(expected))


def test_console_script(tmp_path, image, checkpoint):
    """The installed `liif-cuda` entry point, as a user runs it."""
    exe = shutil.which("liif-cuda", path=os.path.dirname(sys.executable)) or shutil.which("liif-cuda")
    assert exe, "the liif-cuda console script is not installed"
    out = tmp_path / "out.jpg"
    res = subprocess.run([exe, "upscale", image, "-o", str(out), "--size", "31x9", "--model",
                          checkpoint, "--device", "cpu"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert Image.open(out).size == (31, 9)


@pytest.mark.parametrize("suffix,mode", [("png", "L"), ("webp", "RGB"), ("tif", "RGBA"),
                                          ("jpg", "RGB")])
def test_formats_and_modes(tmp_path, checkpoint, suffix, mode):
    arr = np.random.default_rng(1).integers(0, 256, (8, 9, len(mode)), dtype=np.uint8)
    src = tmp_path / f"in.{suffix}"
    Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode).save(src)
    out = tmp_path / f"out.{suffix}"
    assert run("upscale", src, "-o", out, "--scale", 2, "--model", checkpoint) == 0
    result = Image.open(out)
    assert result.size == (18, 16) and result.mode == mode


def test_rgba_to_jpeg_drops_alpha_with_a_notice(tmp_path, checkpoint, capsys):
    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((5, 5, 4), np.uint8), "RGBA").save(src)
    assert run("upscale", src, "-o", tmp_path / "out.jpg", "--scale", 2, "--model",
               checkpoint) == 0
    assert "alpha" in capsys.readouterr().err


@pytest.mark.parametrize("precision,cpu_bf16,said", [
    ("tf32", True, "--precision tf32 runs float32 on the CPU"),
    ("fp16", True, "--precision fp16 runs float32 on the CPU"),
    ("bf16", False, "--precision bf16 runs float32 on this CPU (it has no AVX512-BF16)"),
    ("bf16", True, None),
    ("fp32", False, None),
])
def test_precision_the_cpu_runs_in_float32_is_said(tmp_path, image, checkpoint, capsys,
                                                   monkeypatch, precision, cpu_bf16, said):
    """A reduced precision that the CPU runs in float32 takes float32's time: a notice says so, once
    (the upscale still runs)."""
    info = {**liif_cuda.build_info(), "cpu_bf16": cpu_bf16}
    monkeypatch.setattr(liif_cuda, "build_info", lambda: info)
    assert run("upscale", image, "-o", tmp_path / "o.png", "--scale", 2, "--model", checkpoint,
               "--device", "cpu", "--precision", precision) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "notice:" in line]
    if said:
        assert len(notices) == 1 and notices[0].startswith(f"notice: {said}"), notices
    else:
        assert notices == [], notices


@pytest.mark.parametrize("command", ["upscale", "eval"])
@pytest.mark.parametrize("native", [True, False])
def test_encoder_bf16_the_cpu_runs_in_float32_is_said(tmp_path, image, checkpoint, capsys,
                                                      monkeypatch, command, native):
    """--encoder-precision bf16 on a CPU whose torch has no bf16 convolutions runs float32
    (liif_cuda.upscaling.encoder_runs_in): a notice says so, once; where it has them, nothing."""
    import liif_cuda.upscaling as upscaling
    monkeypatch.setattr(upscaling, "cpu_has_bf16_convolutions", lambda: native)
    if command == "upscale":
        argv = ["upscale", image, "-o", tmp_path / "o.png", "--scale", 2]
    else:
        data = tmp_path / "data"
        data.mkdir()
        shutil.copy(image, data / "a.png")
        argv = ["eval", "--data", data, "--scales", 2, "--protocol", "paper"]
    assert run(*argv, "--model", checkpoint, "--device", "cpu", "--encoder-precision",
               "bf16") == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "notice:" in line]
    said = ("notice: --encoder-precision bf16 runs float32 on this CPU (torch has no bf16 "
            "convolutions for it: they need AVX512 or AMX)")
    assert notices == ([] if native else [said]), notices


def error_of(capsys, *argv):
    status = run(*argv)
    err = capsys.readouterr().err.strip()
    assert status != 0
    assert len(err.splitlines()) == 1 and err.startswith("liif-cuda: error:"), err
    return status, err


def test_never_overwrites_without_flag(tmp_path, image, checkpoint, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    _, err = error_of(capsys, "upscale", image, "-o", out, "--scale", 2, "--model", checkpoint)
    assert "--overwrite" in err and out.read_bytes() == b"precious"
    assert run("upscale", image, "-o", out, "--scale", 2, "--model", checkpoint,
               "--overwrite") == 0
    assert Image.open(out).size == (28, 20)


def test_failed_write_leaves_no_file(tmp_path, image, checkpoint, capsys, monkeypatch):
    def broken_save(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", fp.name)
    monkeypatch.setattr(Image.Image, "save", broken_save)
    out = tmp_path / "out.png"
    status, err = error_of(capsys, "upscale", image, "-o", out, "--scale", 2, "--model",
                           checkpoint)
    assert status != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]
    # The output named, not the temporary file it was being written through.
    assert f"cannot write {out} (No space left on device)" in err and ".tmp" not in err


SCALE_MUST = "--scale must be a finite number > 0"


@pytest.mark.parametrize("argv,match", [
    (["upscale", "{tmp}/missing.png", "-o", "{tmp}/o.png", "--scale", "2"], "does not exist"),
    # A missing input is named first, not the output format a single input implies for -o.
    (["upscale", "{tmp}/nosuch/", "-o", "{tmp}/outdir", "--scale", "2"],
     "input {tmp}/nosuch/ does not exist"),
    (["upscale", "{tmp}", "-o", "{tmp}/o.png", "--scale", "2"], "-o names the output folder"),
    (["upscale", "{tmp}/junk.png", "-o", "{tmp}/o.png", "--scale", "2"], "cannot be read"),
    (["upscale", "{tmp}/in.bmp", "-o", "{tmp}/o.png", "--scale", "2"], "unsupported format"),
    (["upscale", "{img}", "-o", "{tmp}/o.png", "--scale", "0"], SCALE_MUST),
    (["upscale", "{img}", "-o", "{tmp}/o.png", "--scale", "-2"], SCALE_MUST),
    (["upscale", "{img}", "-o", "{tmp}/o.png", "--size", "12by4"], "WIDTHxHEIGHT"),
    # Values starting with "-" reach the option's own check (argparse took them for options).
    (["upscale", "{img}", "-o", "{tmp}/o.png", "--size", "-5x"], "--size"),
    (["upscale", "{img}", "-o", "{tmp}/o.png", "--scale", "-1e-9"], SCALE_MUST),
    (["upscale", "{img}", "-o", "{tmp}/o.png", "--size", "0x4"], "positive"),
    (["upscale", "{img}", "-o", "{tmp}/o.gif", "--scale", "2"], "unsupported format"),
    # A folder not made yet, likely: the message says what -o can be.
    (["upscale", "{img}", "-o", "{tmp}/o13", "--scale", "2"],
     "output {tmp}/o13 has no extension: with one input, -o names the output file (.png, .jpg, "
     ".tif or .webp) or an existing folder"),
    (["upscale", "{img}", "-o", "{tmp}/o.png", "--scale", "2", "--format", "jpg"],
     "--format is for several inputs"),
    (["upscale", "{img}", "-o", "{tmp}/no/such/dir/o.png", "--scale", "2"], "does not exist"),
    # Found before the work: /proc takes no new file, not even root's.
    (["upscale", "{img}", "-o", "/proc/o.png", "--scale", "2"],
     "cannot write into the output folder /proc"),
    (["upscale", "{img}", "-o", "{tmp}/o.png", "--size", "400000x300000"], "needs about 4.37 TiB"),
    (["upscale", "{img}", "-o", "{tmp}/o.png", "--scale", "2", "--model", "{tmp}/junk.png"],
     "model:"),
    (["upscale", "{img}", "-o", "{tmp}/o.png", "--scale", "2", "--model", "nonexistent"],
     "neither a checkpoint file nor a pretrained name"),
    (["upscale", "{img}", "-o", "{tmp}/o.png", "--scale", "2", "--device", "cpu",
      "--encoder-precision", "fp16"], "--encoder-precision fp16 needs a CUDA device"),
])
def test_errors_are_one_line(tmp_path, image, checkpoint, capsys, argv, match):
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "in.bmp").write_bytes(b"BM")
    argv = [a.format(tmp=tmp_path, img=image) for a in argv]
    if "--model" not in argv:
        argv += ["--model", checkpoint]
    _, err = error_of(capsys, *argv)
    assert match.format(tmp=tmp_path) in err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("gpu,cuda_kernels,match", [
    (False, True, "--device cuda: no CUDA GPU is available"),
    (True, False, "--device cuda: liif_cuda was built without its CUDA kernels"),
])
def test_device_cuda_that_cannot_run_is_one_line(tmp_path, image, checkpoint, capsys, monkeypatch,
                                                 gpu, cuda_kernels, match):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(liif_cuda, "build_info", lambda: {"cuda": cuda_kernels})
    status, err = error_of(capsys, "upscale", image, "-o", tmp_path / "o.png", "--scale", 2,
                           "--model", checkpoint, "--device", "cuda")
    assert status == 2 and match in err
    assert not (tmp_path / "o.png").exists()


def test_decompression_bomb_is_one_line(tmp_path, image, checkpoint, capsys, monkeypatch):
    """An input past Pillow's pixel limit (its decompression-bomb guard) is refused in one line."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # the 14x10 image is then a "bomb"
    status, err = error_of(capsys, "upscale", image, "-o", tmp_path / "o.png", "--scale", 2,
                           "--model", checkpoint)
    assert status == 1 and "cannot be read as an image" in err and "pixels" in err
    assert not (tmp_path / "o.png").exists()


def test_sixteen_bit_png_is_refused(tmp_path, checkpoint, capsys):
    src = tmp_path / "deep.png"
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(src)
    _, err = error_of(capsys, "upscale", src, "-o", tmp_path / "o.png", "--scale", 2, "--model",
                      checkpoint)
    assert "16-bit PNG" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["upscale", "x.png", "-o", "y.png", "--scale", "2", "--size", "4x4"])
    assert exc.value.code == 2


def argparse_error(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv,expected", [
    # A typo in an option is named first, not the required option it was meant to give.
    (["upscale", "x.png", "-o", "y.png", "--scael", "2"],
     "liif-cuda: error: unrecognized option --scael; did you mean --scale or --size?"),
    (["upscale", "x.png", "-o", "y.png", "--scale", "2", "--overwirte"],
     "liif-cuda: error: unrecognized option --overwirte; did you mean --overwrite?"),
    (["eval", "--model", "bicubic", "--data", "d", "--scales", "2", "--protocl", "mmedit"],
     "liif-cuda: error: unrecognized option --protocl; did you mean --protocol?"),
    (["train", "--config", "c.yaml", "--out", "r", "--devcie", "cpu"],
     "liif-cuda: error: unrecognized option --devcie; did you mean --device?"),
    (["upscale", "x.png", "-o", "y.png", "--scale", "2", "--zzz"],
     "liif-cuda: error: unrecognized option --zzz (see"),
    # argparse's own errors: one line, naming the command's --help instead of printing its usage.
    (["upscale", "x.png", "-o", "y.png", "--scale", "abc"],
     "liif-cuda: error: argument --scale: invalid float value: 'abc' "
     "(see liif-cuda upscale --help)"),
    (["upscale", "x.png", "--scale", "2"],
     "liif-cuda: error: the following arguments are required: -o/--output"),
    (["upscal", "x.png"], "liif-cuda: error: argument command: invalid choice: 'upscal'"),
])
def test_argument_errors_are_one_line(capsys, argv, expected):
    assert argparse_error(capsys, *argv).startswith(expected)


def test_abbreviations_and_values_are_not_unknown_options(tmp_path, image, checkpoint):
    """What argparse accepts passes the check: an unambiguous abbreviation (--sc), -oFILE, a
    negative value joined to its option, a value after "--"."""
    assert run("upscale", image, f"-o{tmp_path / 'a.png'}", "--sc", "2", "--model", checkpoint) == 0
    assert Image.open(tmp_path / "a.png").size == (28, 20)
    assert run("upscale", "-o", tmp_path / "b.png", "--scale", "2", "--model", checkpoint, "--",
               image) == 0
