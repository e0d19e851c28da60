"""liif-cuda models, --version, python -m liif_cuda, the help's defaults, and human-readable sizes in
the memory errors (also for absurd scales)."""

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import liif_cuda
from liif_cuda import cli, pretrained
from test_cli import checkpoint, error_of, image, run  # noqa: F401  (the fixtures)
from test_cli_batch import console_script


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LIIF_CUDA_WEIGHTS", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


def test_models_lists_source_licence_checksum(empty_caches, capsys):
    assert run("models") == 0
    out = capsys.readouterr().out
    entry = pretrained.PRETRAINED["edsr-baseline-liif"]
    assert "edsr-baseline-liif:" in out
    assert entry.sha256 in out and "BSD-3-Clause" in out and entry.wheel_requirement in out
    assert "cached:  no" in out


def test_models_tells_cached_and_verified(empty_caches, capsys, monkeypatch):
    entry = pretrained.PRETRAINED["edsr-baseline-liif"]
    path = empty_caches / entry.filename
    path.write_bytes(b"weights")
    assert run("models") == 0
    assert f"a file with another sha256 is at {path}" in capsys.readouterr().out
    monkeypatch.setitem(pretrained.PRETRAINED, "edsr-baseline-liif",
                        dataclasses.replace(entry, sha256=pretrained.sha256_of(path)))
    assert run("models") == 0
    assert f"cached:  yes, {path} (sha256 verified)" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"liif-cuda {liif_cuda.__version__}, torch {torch.__version__}, "
                   f"build_info {liif_cuda.build_info()}")


def test_no_command_shows_the_help(capsys):
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: liif-cuda")
    for command in ("upscale", "eval", "train", "models"):
        assert command in captured.err

def test_version_through_the_console_script_and_python_m(tmp_path):
    for argv in ([console_script()], [sys.executable, "-m", "liif_cuda"]):
        res = subprocess.run(argv + ["--version"], capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"liif-cuda {liif_cuda.__version__}, torch ")
        assert "cpu_bf16" in res.stdout


def test_python_m_in_the_checkout_root_says_why_it_fails():
    """There Python imports the source folder, which has no compiled extension: the error says so
    and what to do, instead of a "partially initialized module" puzzle."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if any(f.startswith("_C.") for f in os.listdir(os.path.join(root, "liif_cuda"))):
        pytest.skip("an in-place build put the compiled extension into the source folder")
    res = subprocess.run([sys.executable, "-m", "liif_cuda", "--version"], capture_output=True,
                         text=True, cwd=root)
    assert res.returncode != 0
    assert "compiled extension (_C) is not in" in res.stderr and "python -P" in res.stderr


def subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["upscale", "eval", "models"])
def test_help_shows_every_default(command):
    parser = subparsers(cli.build_parser())[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in formatter._expand_help(action).lower(), \
                f"{command} {action.option_strings}: no default in its help"


def test_help_text_has_the_defaults():
    text = " ".join(subparsers(cli.build_parser())["upscale"].format_help().split())
    assert "(default: edsr-baseline-liif)" in text and "(default: False)" in text
    assert "<input stem>_x<scale><ext>" in text


def test_eval_protocol_help_names_every_protocol():
    from liif_cuda.evaluation.protocols import PROTOCOLS
    text = subparsers(cli.build_parser())["eval"].format_help()
    for name in PROTOCOLS:
        assert f"{name}:" in " ".join(text.split())


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (999, "999 B"), (1000, "0.977 KiB"), (1536, "1.5 KiB"), (10 * 2**20, "10 MiB"),
    (9765625000 * 2**30, "9.09 EiB"), (int(9.31 * 2**30), "9.31 GiB"), (999 * 2**40, "999 TiB"),
    (int(999.7 * 2**40), "0.976 PiB"), (5 * 10**25, "5.0e+25 bytes"), (4 * 10**603, "4.0e+603 bytes"),
])
def test_format_bytes(n, text):
    assert cli.format_bytes(n) == text


@pytest.mark.parametrize("scale,match,status", [
    ("1e6", "a 14000000x10000000 output needs about 4.97 PiB, more than the", 1),
    ("1e300", "an output of 1.4e+602 pixels needs about 5.6e+603 bytes", 1),
    ("1.7e308", "gives an output too large for any machine", 1),
    ("inf", "--scale must be a finite number > 0, got inf", 2),
    ("nan", "--scale must be a finite number > 0, got nan", 2),
])
def test_huge_scales_are_one_clean_line(tmp_path, image, checkpoint, capsys, scale, match, status):
    got, err = error_of(capsys, "upscale", image, "-o", tmp_path / "o.png", "--scale", scale,
                        "--model", checkpoint)
    assert match in err and got == status
    assert not (tmp_path / "o.png").exists()


def test_huge_scale_in_a_batch_is_one_failure_per_file(tmp_path, image, checkpoint, capsys):
    status = run("upscale", image, image, "-o", tmp_path / "out", "--scale", "1e6",
                 "--model", checkpoint)
    captured = capsys.readouterr()
    assert status == 1
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 1
    assert errors[0].startswith(f"liif-cuda: error: {image}: a 14000000x10000000 output needs "
                                f"about 4.97 PiB, more than the ")
    assert "0 done, 0 skipped, 1 failed (1 of 1 files)" in captured.out
    assert os.listdir(tmp_path / "out") == []


def test_build_info_says_whether_hopper_runs_the_wgmma_kernel():
    """setup.py's rule reaches the extension: a CUDA build whose targets have 9.0a and not plain
    9.0 (which one a Hopper GPU would load is then the driver's choice)."""
    info = liif_cuda.build_info()
    targets = [a.split("+")[0].strip() for a in info["cuda_archs"].replace(" ", ";").split(";")]
    assert info["cuda_wgmma"] == (info["cuda"] and "9.0a" in targets and "9.0" not in targets)
