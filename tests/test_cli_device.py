"""--device cpu, cuda and cuda:N in the three commands: the parser, a GPU that is not there,
torchrun, and cuda:N taken as CUDA by the checks that follow. No GPU is needed: torch.cuda and
build_info are faked where the checks consult them, and the work is stopped (and recorded) where
it would start."""

import os

import numpy as np
import pytest
import test_cli
import torch
from PIL import Image

import liif_cuda
import liif_cuda.load
import liif_cuda.training.config
import liif_cuda.training.trainer
from liif_cuda import cli
from liif_cuda.cli.upscale import upscale_device
from liif_cuda.training.trainer import fp16_needs_cuda

BUILD_INFO = liif_cuda.build_info()
# Each command with its required arguments (files made by `place`); the device is checked first.
COMMANDS = {
    "upscale": ["upscale", "in.png", "-o", "out.png", "--scale", "2"],
    "eval": ["eval", "--data", "data", "--scales", "2"],
    "train": ["train", "--config", "config.yaml", "--out", "run"],
}
BAD_DEVICES = ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:1:2", " cuda", "CUDA",
               "cuda:\N{ARABIC-INDIC DIGIT THREE}"]  # a digit to re's \d, not to torch


@pytest.fixture(autouse=True)
def place(tmp_path, monkeypatch):
    """A folder of its own with an input image and a data folder of two; outside torchrun."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((30, 26, 3), np.uint8)).save("in.png")
    os.mkdir("data")
    for i in range(2):
        Image.fromarray(np.zeros((30, 26, 3), np.uint8)).save(f"data/{i}.png")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): this process sees n GPUs, and liif_cuda has its CUDA kernels."""
    def see(count):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(liif_cuda, "build_info", lambda: {**BUILD_INFO, "cuda": True})
    return see


@pytest.fixture
def work(monkeypatch):
    """Where the work would start: load_model (upscale, eval) records its device and stops with a
    --model error (status 1); train records its arguments; torch.cuda.set_device records."""
    seen = {"load": [], "train": [], "current": []}

    def load_model(name, device=None):
        seen["load"].append(str(device))
        raise liif_cuda.load.ModelNotFound("the work started")
    monkeypatch.setattr(liif_cuda.load, "load_model", load_model)
    monkeypatch.setattr(liif_cuda.training.config, "load_config", lambda path: {})
    monkeypatch.setattr(liif_cuda.training.trainer, "train",
                        lambda config, out, **kwargs: seen["train"].append(kwargs))
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: seen["current"].append(str(device)))
    return seen


def started_on(capsys, work, command, argv):
    """The device the command's work started on (or train was given)."""
    if command == "train":
        assert cli.main(argv) == 0
        return work["train"][-1]["device"]
    status, err = test_cli.error_of(capsys, *argv)
    assert status == 1 and err == "liif-cuda: error: --model: the work started", err
    return work["load"][-1]


@pytest.mark.parametrize("command", COMMANDS)
def test_parser_takes_cpu_cuda_and_cuda_n(command):
    parser = cli.build_parser()
    for value, parsed in (("cpu", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda:0"),
                          ("cuda:12", "cuda:12"), ("cuda:007", "cuda:7")):
        assert parser.parse_args(COMMANDS[command] + ["--device", value]).device == parsed
        assert parser.parse_args(COMMANDS[command] + [f"--device={value}"]).device == parsed


@pytest.mark.parametrize("value", BAD_DEVICES)
@pytest.mark.parametrize("command", COMMANDS)
def test_malformed_device_is_a_usage_error(capsys, command, value):
    err = test_cli.argparse_error(capsys, *COMMANDS[command], "--device", value)
    assert err == (f"liif-cuda: error: argument --device: expected cpu, cuda or cuda:N "
                   f"(N a GPU index, 0 for the first), got {value!r} (see liif-cuda {command} "
                   f"--help)")


@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_n_beyond_the_gpus_names_n_and_the_count(capsys, gpus, work, command):
    gpus(2)
    status, err = test_cli.error_of(capsys, *COMMANDS[command], "--device", "cuda:2")
    assert status == 2 and err == ("liif-cuda: error: --device cuda:2: GPU 2 is not visible; this "
                                   "process sees 2 CUDA GPU(s), numbered from 0 "
                                   "(CUDA_VISIBLE_DEVICES chooses which GPUs it sees)"), err
    assert work == {"load": [], "train": [], "current": []}
    # The last one visible is taken, and is the current device where the command sets it.
    assert started_on(capsys, work, command, COMMANDS[command] + ["--device", "cuda:1"]) == "cuda:1"
    assert work["current"] == (["cuda:1"] if command == "upscale" else [])


@pytest.mark.parametrize("gpu,kernels,reason", [
    (False, True, "no CUDA GPU is available"),
    (True, False, "liif_cuda was built without its CUDA kernels"),
])
@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_n_without_a_gpu_is_refused_as_cuda_is(capsys, monkeypatch, work, command, gpu,
                                                    kernels, reason):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(liif_cuda, "build_info", lambda: {**BUILD_INFO, "cuda": kernels})
    status, err = test_cli.error_of(capsys, *COMMANDS[command], "--device", "cuda")
    status0, err0 = test_cli.error_of(capsys, *COMMANDS[command], "--device", "cuda:0")
    assert status == status0 == 2 and f"--device cuda: {reason}" in err, err
    # The same line, naming the device given.
    assert err0 == err.replace("--device cuda:", "--device cuda:0:", 1)
    assert work == {"load": [], "train": [], "current": []}


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("command,inputs", [
    ("upscale", ["in.png"]),  # one file: rank 0's, the others return at once
    ("upscale", ["data"]),    # a batch: a file for each rank
    ("train", []),
])
def test_cuda_n_under_torchrun_is_refused(capsys, monkeypatch, gpus, work, command, inputs, rank):
    """Each process takes cuda:LOCAL_RANK: a cuda:N would put every process on GPU N. Refused on
    every rank before any work, even with GPU N there; --device cuda takes cuda:LOCAL_RANK."""
    gpus(2)
    for name, value in (("RANK", rank), ("WORLD_SIZE", 2), ("LOCAL_RANK", rank)):
        monkeypatch.setenv(name, str(value))
    argv = COMMANDS[command] if command == "train" else \
        ["upscale", *inputs, "-o", "out", "--scale", "2"]
    status, err = test_cli.error_of(capsys, *argv, "--device", "cuda:1")
    assert status == 2 and err == ("liif-cuda: error: --device cuda:1: under torchrun "
                                   "(WORLD_SIZE=2) each process takes cuda:LOCAL_RANK; pass "
                                   "--device cuda"), err
    assert work == {"load": [], "train": [], "current": []} and not os.path.exists("out")
    if inputs != ["in.png"]:
        # train gets "cuda" and takes cuda:LOCAL_RANK itself (test_train.py).
        assert started_on(capsys, work, command, argv + ["--device", "cuda"]) == \
            ("cuda" if command == "train" else f"cuda:{rank}")


def test_cuda_n_with_one_process_under_torchrun_is_taken(capsys, monkeypatch, gpus, work):
    """WORLD_SIZE=1: no other process to share GPU N with."""
    gpus(2)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, "1" if name == "WORLD_SIZE" else "0")
    argv = ["upscale", "data", "-o", "out", "--scale", "2", "--device", "cuda:1"]
    assert started_on(capsys, work, "upscale", argv) == "cuda:1" and work["current"] == ["cuda:1"]


@pytest.mark.parametrize("command,option", [
    ("upscale", "--encoder-precision"), ("eval", "--encoder-precision"), ("train", "--precision"),
])
def test_cuda_0_is_cuda_for_the_precision_checks(capsys, gpus, work, command, option):
    """fp16 needs CUDA: refused on the CPU, taken on cuda:0 (one GPU, faked)."""
    gpus(1)
    argv = COMMANDS[command] + [option, "fp16"]
    status, err = test_cli.error_of(capsys, *argv, "--device", "cpu")
    expected = fp16_needs_cuda() if command == "train" else \
        "--encoder-precision fp16 needs a CUDA device (on the CPU use bf16)"
    assert status == 2 and err == f"liif-cuda: error: {expected}", err
    assert started_on(capsys, work, command, argv + ["--device", "cuda:0"]) == "cuda:0"
    if command == "train":
        assert work["train"][-1]["precision"] == "fp16"


def test_upscale_device_makes_gpu_n_the_current_device(gpus, work):
    """So that what names no device (a bare torch.cuda call) goes to GPU N, as under torchrun."""
    gpus(2)
    assert upscale_device("cuda:1", None) == "cuda:1" and work["current"] == ["cuda:1"]
    assert upscale_device("cuda", 1) == "cuda:1" and work["current"] == ["cuda:1", "cuda:1"]
    assert upscale_device("cuda", None) == "cuda" and len(work["current"]) == 2
