"""`liif-cuda train` on a GPU (issue 12): each precision trains and writes a checkpoint that loads,
fp16 through its GradScaler; one step on CUDA equals one on the CPU within float32 rounding. Skipped,
with the reason, without a GPU (benchmarks/gpu_check.sh runs it on one)."""

import os

import pytest
import torch
from conftest import CUDA_SKIP_REASON
from test_train import images, read_log, tiny_config  # noqa: F401  (the images fixture)

import liif_cuda
from liif_cuda.training import train

pytestmark = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trains_on_cuda(images, tmp_path, precision):  # noqa: F811
    run = str(tmp_path / precision)
    train(tiny_config(images, epochs=2), run, device="cuda", precision=precision, progress=False)
    rows = read_log(run)
    assert len(rows) == 2 and all(float(r["train_loss"]) > 0 for r in rows)
    ck = torch.load(os.path.join(run, "epoch-last.pth"), weights_only=True)
    if precision == "fp16":
        assert ck["liif_cuda"]["scaler"] is not None
    liif_cuda.load_model(os.path.join(run, "epoch-last.pth"))


def test_cuda_step_equals_cpu_step(images, tmp_path):  # noqa: F811
    cpu, cuda = str(tmp_path / "cpu"), str(tmp_path / "cuda")
    config = tiny_config(images, epochs=1, repeat=1, batch_size=2)
    config["val_dataset"] = None
    train(config, cpu, device="cpu", progress=False)
    train(config, cuda, device="cuda", progress=False)
    a = torch.load(f"{cpu}/epoch-last.pth", weights_only=True)["model"]["sd"]
    b = torch.load(f"{cuda}/epoch-last.pth", weights_only=True)["model"]["sd"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
