"""Training (issue 12): configs in the original schema, the data recipe, the loop against the
reference model's step, exact resume, DistributedDataParallel on the CPU (two gloo processes),
atomic checkpoints and every bad input. Small images made here, a tiny model, few steps."""

import copy
import csv
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import OFFICIAL_WEIGHTS, ROOT, SHARED, requires_shared
from PIL import Image

import liif_cuda
from liif_cuda.training import ConfigError, TrainingError, check_config, load_config, train
from liif_cuda.training.checkpointing import (load_original_optimizer_state,
                                              load_original_state_dict, make_checkpoint)
from liif_cuda.training.datasets import make_dataset
from liif_cuda.training.trainer import (build_model, normalise_batch, train_step, validate,
                                        validate_shared)

pytest.importorskip("yaml", reason="PyYAML (a training dependency) is not installed")

NORM = {"inp": {"sub": [0.5], "div": [0.5]}, "gt": {"sub": [0.5], "div": [0.5]}}


def write_images(folder, count=2, size=(40, 52), seed=0):
    """Smooth colour images with some texture, so that a small model can learn something."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[0], 0:size[1]] / max(size)
    for i in range(count):
        f = rng.uniform(2, 8, 3)
        img = np.stack([np.sin(f[0] * x + i) * np.cos(f[1] * y), x * y, np.cos(f[2] * (x - y))], -1)
        Image.fromarray(((img * 0.5 + 0.5) * 255).astype(np.uint8)).save(f"{folder}/{i}.png")
    return folder


def dataset_spec(root, repeat=8, batch_size=4, augment=True, inp_size=8, scale_max=3,
                 sample_q=32):
    return {"dataset": {"name": "image-folder",
                        "args": {"root_path": str(root), "repeat": repeat, "cache": "in_memory"}},
            "wrapper": {"name": "sr-implicit-downsampled",
                        "args": {"inp_size": inp_size, "scale_max": scale_max, "augment": augment,
                                 "sample_q": sample_q}},
            "batch_size": batch_size}


def tiny_config(root, epochs=3, **kwargs):
    return check_config({
        "train_dataset": dataset_spec(root, **kwargs),
        "val_dataset": dataset_spec(root, repeat=2, augment=False),
        "data_norm": copy.deepcopy(NORM),
        "model": {"name": "liif", "args": {
            "encoder_spec": {"name": "edsr-baseline",
                             "args": {"n_resblocks": 1, "n_feats": 8, "no_upsampling": True}},
            "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": [16, 16]}}}},
        "optimizer": {"name": "adam", "args": {"lr": 1.0e-3}},
        "epoch_max": epochs, "multi_step_lr": {"milestones": [2], "gamma": 0.5},
        "epoch_val": 1, "epoch_save": 2})


@pytest.fixture
def images(tmp_path):
    return write_images(str(tmp_path / "images"))


def read_log(run):
    with open(os.path.join(run, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def model_state(path):
    return torch.load(path, weights_only=True)["model"]["sd"]


# -- the loop -------------------------------------------------------------------------------------

def test_run_folder_log_and_checkpoints(images, tmp_path):
    run = str(tmp_path / "run")
    last = train(tiny_config(images, epochs=3), run, device="cpu", progress=False)
    assert last == os.path.join(run, "epoch-last.pth")
    assert sorted(os.listdir(run)) == [".lock", "config.yaml", "epoch-2.pth", "epoch-best.pth",
                                       "epoch-last.pth", "log.csv"]
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "val_psnr", "seconds"}
    assert [float(r["lr"]) for r in rows] == [1e-3, 1e-3, 5e-4]  # MultiStepLR per epoch
    assert all(float(r["val_psnr"]) > 0 for r in rows)
    assert load_config(os.path.join(run, "config.yaml")) == tiny_config(images, epochs=3)
    # The original format, which liif_cuda.load_model (and the original code) reads.
    ck = torch.load(last, weights_only=True)
    assert ck["epoch"] == 3 and ck["model"]["name"] == "liif"
    assert ck["optimizer"]["name"] == "adam" and "state" in ck["optimizer"]["sd"]
    # The specs the original's make_optimizer and make_model build from when they resume.
    assert ck["optimizer"]["args"] == {"lr": 1e-3}
    assert ck["model"]["args"] == tiny_config(images)["model"]["args"]
    assert "encoder.sub_mean.weight" in ck["model"]["sd"]  # the original EDSR's strict keys
    model = liif_cuda.load_model(last)
    assert model.imnet.layers[0].out_features == 16


def test_training_from_scratch_lowers_the_loss(images, tmp_path):
    run = str(tmp_path / "run")
    train(tiny_config(images, epochs=12, repeat=16), run, device="cpu", progress=False)  # 96 steps
    losses = [float(r["train_loss"]) for r in read_log(run)]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2])


def test_resume_equals_training_straight(images, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train(tiny_config(images, epochs=4), straight, device="cpu", progress=False)
    train(tiny_config(images, epochs=2), split, device="cpu", progress=False)
    train(tiny_config(images, epochs=4), split, resume=True, device="cpu", progress=False)
    a, b = torch.load(f"{straight}/epoch-last.pth", weights_only=True), \
        torch.load(f"{split}/epoch-last.pth", weights_only=True)
    for key in a["model"]["sd"]:
        assert torch.equal(a["model"]["sd"][key], b["model"]["sd"][key]), key
    for pa, pb in zip(a["optimizer"]["sd"]["state"].values(), b["optimizer"]["sd"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a["liif_cuda"]["scheduler"] == b["liif_cuda"]["scheduler"]
    assert [r["train_loss"] for r in read_log(straight)] == [r["train_loss"] for r in read_log(split)]
    # The data loaders draw their base seeds from torch's generator: restored, it is where the
    # straight run's is.
    assert torch.equal(a["liif_cuda"]["torch_rng"], b["liif_cuda"]["torch_rng"])


def test_workers_do_not_change_the_samples(images, tmp_path):
    spec = dataset_spec(images)
    data = make_dataset(spec, seed=3)
    data.set_epoch(5)
    direct = [data[i] for i in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2)
    batches = list(loader)
    for i, sample in enumerate(direct):
        for key in sample:
            assert torch.equal(batches[i // 2][key][i % 2], sample[key])
    data.set_epoch(6)
    assert not torch.equal(data[0]["inp"], direct[0]["inp"])


def test_dataloader_workers_train_the_same_model(images, tmp_path):
    """Worker processes (the dataset pickled into them, images cached in memory) change nothing."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(tiny_config(images, epochs=2), a, device="cpu", progress=False, workers=0)
    train(tiny_config(images, epochs=2), b, device="cpu", progress=False, workers=2)
    sa, sb = model_state(f"{a}/epoch-last.pth"), model_state(f"{b}/epoch-last.pth")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_resume_from_an_original_checkpoint(images, tmp_path):
    """The original's `resume: PATH` key: a checkpoint without liif_cuda's extra entry (as the
    original code writes them) starts a new run folder at its epoch + 1, with the schedule's rate at
    that epoch (the original's resume would apply the milestones passed a second time)."""
    first = str(tmp_path / "first")
    train(tiny_config(images, epochs=2), first, device="cpu", progress=False)
    original = torch.load(f"{first}/epoch-last.pth", weights_only=True)
    del original["liif_cuda"]
    path = str(tmp_path / "original.pth")
    torch.save(original, path)
    config = tiny_config(images, epochs=3)
    config["resume"] = path
    second = str(tmp_path / "second")
    train(config, second, device="cpu", progress=False)
    rows = read_log(second)
    assert [r["epoch"] for r in rows] == ["3"]
    assert float(rows[0]["lr"]) == 5e-4  # milestone 2 passed: halved
    # Nothing left to train: the last checkpoint is the one resumed from, not one in the new folder.
    config["epoch_max"] = 2
    assert train(config, str(tmp_path / "third"), device="cpu", progress=False) == path


def original_twin(config):
    """The original code's model for tiny_config's (python/liif_reference_models.py restates it)."""
    import liif_reference_models as refm
    return refm.LIIF(refm.EDSR(n_resblocks=1, n_feats=8), hidden_list=[16, 16])


def adam_state_by_name(model, optimizer):
    return {name: optimizer.state.get(p) for name, p in model.named_parameters()}


def test_checkpoints_optimizer_state_in_the_original_layout(images, tmp_path):
    """The original's optimizer covers the original model's parameters, EDSR's four mean-shift ones
    first. A checkpoint's optimizer state loads into the original's optimizer (its
    make_optimizer(load_sd=True): Adam(model.parameters()).load_state_dict), each parameter's state
    on the same parameter; and a checkpoint as the original train_liif.py writes it resumes here,
    each state on the same parameter again."""
    run = str(tmp_path / "run")
    config = tiny_config(images, epochs=2)
    train(config, run, device="cpu", progress=False)
    checkpoint = torch.load(f"{run}/epoch-last.pth", weights_only=True)
    original = original_twin(config)
    # The mean-shift convolutions LIIF never applies are written as the original EDSR makes them.
    for name in (f"encoder.{m}.{p}" for m in ("sub_mean", "add_mean") for p in ("weight", "bias")):
        assert torch.equal(checkpoint["model"]["sd"][name], original.state_dict()[name]), name
    original.load_state_dict(checkpoint["model"]["sd"])  # strict, as the original loads it
    original_adam = torch.optim.Adam(original.parameters(), lr=1e-3)
    original_adam.load_state_dict(checkpoint["optimizer"]["sd"])
    ours = build_model(config["model"])
    ours_adam = torch.optim.Adam(ours.parameters(), lr=1e-3)
    load_original_optimizer_state(ours, ours_adam, checkpoint["optimizer"]["sd"])
    theirs, mine = adam_state_by_name(original, original_adam), adam_state_by_name(ours, ours_adam)
    assert set(theirs) - set(mine) == {f"encoder.{m}.{p}" for m in ("sub_mean", "add_mean")
                                       for p in ("weight", "bias")}
    assert all(not theirs[n] for n in set(theirs) - set(mine))
    for name, state in mine.items():
        assert state["exp_avg"].shape == dict(ours.named_parameters())[name].shape
        assert torch.equal(state["exp_avg_sq"], theirs[name]["exp_avg_sq"]), name

    # A checkpoint of the original code: a step of the original model, saved as train_liif.py does.
    torch.manual_seed(0)
    original = original_twin(config)
    original_adam = torch.optim.Adam(original.parameters(), lr=1e-3)
    coord = torch.rand(1, 20, 2) * 2 - 1
    original(torch.rand(1, 3, 8, 8), coord, torch.full((1, 20, 2), 0.1)).abs().mean().backward()
    original_adam.step()
    path = str(tmp_path / "original.pth")
    torch.save({"model": {"name": "liif", "args": config["model"]["args"],
                          "sd": original.state_dict()},
                "optimizer": {"name": "adam", "args": {"lr": 1e-3},
                              "sd": original_adam.state_dict()},
                "epoch": 1}, path)
    ours_adam = torch.optim.Adam(ours.parameters(), lr=1e-3)
    load_original_optimizer_state(ours, ours_adam, torch.load(path, weights_only=True)["optimizer"]["sd"])
    theirs, mine = adam_state_by_name(original, original_adam), adam_state_by_name(ours, ours_adam)
    assert all(torch.equal(mine[n]["exp_avg"], theirs[n]["exp_avg"]) for n in mine)
    config["resume"] = path
    train(config, str(tmp_path / "from_original"), device="cpu", progress=False)
    assert [r["epoch"] for r in read_log(str(tmp_path / "from_original"))] == ["2"]


def test_optimizer_state_of_before_the_original_layout_and_a_wrong_one(images, tmp_path):
    """liif_cuda's checkpoints of before the original layout (no mean-shift parameters) still load;
    an optimizer state that fits neither layout is a one-line error naming the checkpoint."""
    config = tiny_config(images, epochs=1)
    run = str(tmp_path / "run")
    train(config, run, device="cpu", progress=False)
    checkpoint = torch.load(f"{run}/epoch-last.pth", weights_only=True)
    ours = build_model(config["model"])
    load_original_state_dict(ours, checkpoint["model"]["sd"])
    adam = torch.optim.Adam(ours.parameters(), lr=1e-3)
    load_original_optimizer_state(ours, adam, checkpoint["optimizer"]["sd"])
    own_layout = adam.state_dict()
    again = torch.optim.Adam(ours.parameters(), lr=1e-3)
    load_original_optimizer_state(ours, again, own_layout)
    assert all(torch.equal(again.state[p]["exp_avg"], adam.state[p]["exp_avg"])
               for p in ours.parameters())
    wrong = copy.deepcopy(checkpoint["optimizer"]["sd"])
    wrong["state"][0] = copy.deepcopy(wrong["state"][4])  # state for a mean-shift parameter
    with pytest.raises(ValueError, match="mean-shift"):
        load_original_optimizer_state(ours, adam, wrong)
    wrong = copy.deepcopy(checkpoint["optimizer"]["sd"])
    wrong["param_groups"][0]["params"].pop()
    checkpoint["optimizer"]["sd"] = wrong
    path = str(tmp_path / "wrong.pth")
    torch.save(checkpoint, path)
    config = tiny_config(images, epochs=2)
    config["resume"] = path
    with pytest.raises(ConfigError, match=r"resume: .*wrong\.pth: its optimizer state does not "
                                          r"fit the config's optimizer"):
        train(config, str(tmp_path / "second"), device="cpu", progress=False)


def test_samples_follow_the_recipe(images):
    data = make_dataset(dataset_spec(images, inp_size=8, scale_max=3, sample_q=20), seed=0)
    scales = []
    for i in range(16):
        s = data[i]
        assert s["inp"].shape == (3, 8, 8) and s["coord"].shape == (20, 2)
        assert s["cell"].shape == (20, 2) and s["gt"].shape == (20, 3)
        assert s["coord"].abs().max() < 1 and (s["gt"] >= 0).all() and (s["gt"] <= 1).all()
        # cells are 2 / HR patch size; the patch is round(8 * s) with s in [1, 3]
        hr = round(2 / s["cell"][0, 0].item())
        assert 8 <= hr <= 24 and len(set(map(tuple, s["coord"].tolist()))) == 20
        scales.append(hr)
    assert len(set(scales)) > 3


def test_paired_folders(images, tmp_path):
    """paired-image-folders + sr-implicit-paired: aligned LR / HR patches of the pair's scale."""
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    for name in sorted(os.listdir(images)):
        with Image.open(os.path.join(images, name)) as hr:
            hr.resize((hr.width // 2, hr.height // 2), Image.BICUBIC).save(lr_dir / name)
    spec = {"dataset": {"name": "paired-image-folders",
                        "args": {"root_path_1": str(lr_dir), "root_path_2": images}},
            "wrapper": {"name": "sr-implicit-paired",
                        "args": {"inp_size": 8, "augment": True, "sample_q": 32}},
            "batch_size": 2}
    config = tiny_config(images)
    config["train_dataset"] = spec
    check_config(config)
    sample = make_dataset(spec, seed=0)[1]
    assert sample["inp"].shape == (3, 8, 8) and sample["gt"].shape == (32, 3)
    assert torch.allclose(sample["cell"], torch.full((32, 2), 2 / 16))
    whole = make_dataset(dict(spec, wrapper={"name": "sr-implicit-paired", "args": {}}), seed=0)[0]
    assert whole["inp"].shape == (3, 20, 26) and whole["coord"].shape == (40 * 52, 2)
    # The HR pixels are the pair's: the first query of the whole image is the HR's top-left pixel.
    hr = torch.from_numpy(np.array(Image.open(os.path.join(images, "0.png")))).float() / 255
    assert torch.allclose(whole["gt"][0], hr[0, 0])
    run = str(tmp_path / "run")
    train(config, run, device="cpu", progress=False)
    assert len(read_log(run)) == 3


def test_one_step_equals_the_reference_models_step(images):
    """One Adam step of liif_cuda's model (fused query and backward) and of the python/ reference
    model (reference query, torch autograd) on the same batch: parameters within 1e-5."""
    import liif_reference_models as refm
    torch.manual_seed(0)
    reference = refm.LIIF(refm.EDSR(n_resblocks=2, n_feats=8), hidden_list=[32, 32])
    config = tiny_config(images)
    config["model"]["args"]["encoder_spec"]["args"]["n_resblocks"] = 2
    config["model"]["args"]["imnet_spec"]["args"]["hidden_list"] = [32, 32]
    ours = build_model(config["model"])
    load_original_state_dict(ours, reference.state_dict())
    data = make_dataset(dataset_spec(images, inp_size=10, sample_q=64), seed=1)
    batch = normalise_batch(torch.utils.data.default_collate([data[i] for i in range(4)]), "cpu")

    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    loss = torch.nn.functional.l1_loss(reference(batch["inp"], batch["coord"], batch["cell"]),
                                       batch["gt"])
    ref_opt.zero_grad()
    loss.backward()
    ref_opt.step()
    our_loss = train_step(ours, torch.optim.Adam(ours.parameters(), lr=1e-3), batch)
    assert abs(our_loss.item() - loss.item()) <= 1e-6 * loss.item()
    expected = reference.state_dict()
    for key, value in ours.state_dict().items():
        diff = (value - expected[key]).norm() / expected[key].norm()
        assert diff <= 1e-5, key


def test_bf16_training_runs_and_differs_slightly(images, tmp_path):
    fp32, bf16 = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    train(tiny_config(images, epochs=1), fp32, device="cpu", progress=False)
    train(tiny_config(images, epochs=1), bf16, device="cpu", precision="bf16", progress=False)
    a, b = model_state(f"{fp32}/epoch-last.pth"), model_state(f"{bf16}/epoch-last.pth")
    key = "imnet.layers.0.weight"
    assert not torch.equal(a[key], b[key])
    assert ((a[key] - b[key]).norm() / a[key].norm()) < 0.05


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_on_a_cpu_without_bf16_convolutions_says_so(images, tmp_path, capsys,
                                                                  monkeypatch, native):
    """On a CPU whose torch has no bf16 convolutions (no AVX512 or AMX) a bf16 run goes on as
    asked, and says that float32 is faster there; elsewhere, and in float32, nothing is said."""
    import liif_cuda.upscaling as upscaling
    monkeypatch.setattr(upscaling, "cpu_has_bf16_convolutions", lambda: native)
    for precision in ("bf16", "fp32"):
        train(tiny_config(images, epochs=1), str(tmp_path / f"{precision}"), device="cpu",
              precision=precision, progress=False)
        out = capsys.readouterr().out
        said = "note: --precision bf16 on this CPU: torch has no bf16 convolutions" in out
        assert said == (precision == "bf16" and not native), out
        assert "epoch 1/1: loss" in out


def test_init_from_a_checkpoint(images, tmp_path):
    first = str(tmp_path / "first")
    train(tiny_config(images, epochs=1), first, device="cpu", progress=False)
    second = str(tmp_path / "second")
    config = tiny_config(images, epochs=1)
    config["optimizer"]["args"]["lr"] = 0.0  # nothing moves: the weights are the init's
    train(config, second, init=f"{first}/epoch-last.pth", device="cpu", progress=False)
    a, b = model_state(f"{first}/epoch-last.pth"), model_state(f"{second}/epoch-last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_device_without_the_cuda_kernels(images, tmp_path, capsys, monkeypatch):
    """A GPU visible, liif_cuda built without its CUDA kernels, no --device: training runs on the
    CPU, as upscale and eval choose, and says why (it used to choose CUDA and fail)."""
    import liif_cuda
    import liif_cuda.training.trainer
    monkeypatch.setattr(liif_cuda.training.trainer, "gpu_visible", lambda: True)
    monkeypatch.setattr(liif_cuda, "build_info", lambda: {"cuda": False})
    train(tiny_config(images, epochs=1), str(tmp_path / "run"), progress=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: a GPU is visible, but this liif_cuda was built without its CUDA "
                     "kernels: training on the CPU (docs/install.md says how to build them)"]


def test_first_k_above_the_images_says_so(images, tmp_path, capsys):
    """first_k asks for more images than the folder has: all are used (as the original does) and a
    note names the dataset; a first_k the folder meets says nothing."""
    config = tiny_config(images, epochs=1)
    config["train_dataset"]["dataset"]["args"]["first_k"] = 2   # the folder holds 2
    config["val_dataset"]["dataset"]["args"]["first_k"] = 5
    train(config, str(tmp_path / "run"), device="cpu", progress=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: val_dataset.dataset.args.first_k is 5, but there are 2 images: all 2 "
                     "are used"]


def test_init_with_another_normalisation_says_so(images, tmp_path, capsys, monkeypatch):
    """An mmediting EDSR checkpoint (mean 0.4488..., std 1) as --init: training goes on with the
    original (x - 0.5) / 0.5, and a note says so (it used to be silent)."""
    import liif_cuda.load
    first = str(tmp_path / "first")
    train(tiny_config(images, epochs=1), first, device="cpu", progress=False)
    real_load = liif_cuda.load.load_model

    def load_as_mmedit(path, device=None):
        model = real_load(path, device)
        model.normalisation = "mmedit-edsr"
        return model
    monkeypatch.setattr(liif_cuda.load, "load_model", load_as_mmedit)
    capsys.readouterr()
    train(tiny_config(images, epochs=1), str(tmp_path / "second"), init=f"{first}/epoch-last.pth",
          device="cpu", progress=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: --init {first}/epoch-last.pth was trained with the mmedit-edsr "
                     f"normalisation (mean [0.4488, 0.4371, 0.404], std [1.0, 1.0, 1.0]); training "
                     f"uses the original one (mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]), so the "
                     f"first steps start from a model that sees its inputs and outputs on other "
                     f"scales"]
    monkeypatch.undo()
    train(tiny_config(images, epochs=1), str(tmp_path / "third"), init=f"{first}/epoch-last.pth",
          device="cpu", progress=False)
    assert "note:" not in capsys.readouterr().out


# -- many processes ---------------------------------------------------------------------------------

def torchrun(*argv, cwd, nproc=2, timeout=600):
    """`torchrun --standalone --nproc_per_node N -m liif_cuda ARGV`, run outside the repository
    (whose source folder would shadow the installed package)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "liif_cuda", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


@pytest.mark.slow
def test_ddp_step_equals_single_process_step(images, tmp_path):
    """Two gloo processes under torchrun with the global batch split between them take the same
    step as one process on the whole batch (float32 rounding apart), and rank 0 alone writes a
    checkpoint that loads."""
    import yaml
    config = tiny_config(images, epochs=1, repeat=2, batch_size=4)  # one global batch of 4
    config["val_dataset"] = None
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    train(load_config(str(path)), single, device="cpu", progress=False)
    res = torchrun("train", "--config", str(path), "--out", ddp, "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(ddp)) == [".lock", "config.yaml", "epoch-last.pth", "log.csv"]
    a, b = model_state(f"{single}/epoch-last.pth"), model_state(f"{ddp}/epoch-last.pth")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert len(read_log(ddp)) == 1
    liif_cuda.load_model(f"{ddp}/epoch-last.pth")


def write_config(config, path):
    import yaml
    path.write_text(yaml.safe_dump(config))
    return str(path)


def assert_same_model(a, b):
    """Two checkpoints' parameters, equal up to the float32 rounding in which DDP's gradient
    average differs from one process's mean (the tolerance of the test above)."""
    sa, sb = model_state(a), model_state(b)
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-6)


def assert_same_log(a, b):
    ra, rb = read_log(a), read_log(b)
    assert [(r["epoch"], r["lr"]) for r in ra] == [(r["epoch"], r["lr"]) for r in rb]
    for x, y in zip(ra, rb):
        assert float(x["train_loss"]) == pytest.approx(float(y["train_loss"]), rel=1e-5)
        assert float(x["val_psnr"]) == pytest.approx(float(y["val_psnr"]), abs=1e-3)


@pytest.mark.slow
def test_ddp_epochs_equal_single_process_epochs_with_a_sample_count_not_a_multiple(tmp_path):
    """3 samples, batch 2: one step an epoch on one process (the partial batch dropped) and so on
    two; DistributedSampler's default padding (3 -> 4, a repeated sample) made it two steps there.
    Parameters, logged losses and validation PSNR (shared: its 6 samples make batches of 4 and 2,
    one per rank) are the single process's."""
    images = write_images(str(tmp_path / "images"), count=3)
    path = write_config(tiny_config(images, epochs=2, repeat=1, batch_size=2),
                        tmp_path / "config.yaml")
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    train(load_config(path), single, device="cpu", progress=False)
    res = torchrun("train", "--config", path, "--out", ddp, "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_model(f"{single}/epoch-last.pth", f"{ddp}/epoch-last.pth")
    assert_same_log(single, ddp)


@pytest.mark.slow
def test_ddp_resume_equals_training_straight(images, tmp_path):
    """Two processes stopped after epoch 2 (past the milestone) and resumed, by two processes or
    by one, end where one process training 3 epochs straight ends: every rank restores the model,
    optimizer, schedule and epoch, and the checkpoint holds no per-process state."""
    short = write_config(tiny_config(images, epochs=2, repeat=2, batch_size=2),
                         tmp_path / "short.yaml")
    full = write_config(tiny_config(images, epochs=3, repeat=2, batch_size=2),
                        tmp_path / "full.yaml")
    straight, ddp = str(tmp_path / "straight"), str(tmp_path / "ddp")
    train(load_config(full), straight, device="cpu", progress=False)
    res = torchrun("train", "--config", short, "--out", ddp, "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    single = str(tmp_path / "single")
    shutil.copytree(ddp, single)
    res = torchrun("train", "--config", full, "--out", ddp, "--device", "cpu", "--resume",
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout and res.stdout.count("epoch 3/3") == 1  # rank 0 alone
    train(load_config(full), single, resume=True, device="cpu", progress=False)
    a = torch.load(f"{straight}/epoch-last.pth", weights_only=True)
    for run in (ddp, single):
        assert_same_model(f"{straight}/epoch-last.pth", f"{run}/epoch-last.pth")
        b = torch.load(f"{run}/epoch-last.pth", weights_only=True)
        assert b["epoch"] == 3 and b["liif_cuda"]["scheduler"] == a["liif_cuda"]["scheduler"]
        assert_same_log(straight, run)


@pytest.mark.slow
def test_an_error_on_one_rank_ends_the_run(images, tmp_path):
    """A truncated image (read by whichever rank draws it) fails the run within seconds, the image
    named: torchrun stops the other rank, which would otherwise wait in a collective for it."""
    path = os.path.join(images, "1.png")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    config = tiny_config(images, epochs=1, repeat=2, batch_size=2)
    config["train_dataset"]["dataset"]["args"]["cache"] = "none"
    config = write_config(config, tmp_path / "config.yaml")
    res = torchrun("train", "--config", config, "--out", str(tmp_path / "run"), "--device", "cpu",
                   cwd=tmp_path, timeout=120)
    assert res.returncode != 0
    assert f"liif-cuda: error: training image {path} cannot be read" in res.stderr


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "two"}, "RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets "
                            "them), got RANK='0', WORLD_SIZE='two', LOCAL_RANK='0'"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": ""}, "must be integers"),
    ({"WORLD_SIZE": "0"}, "RANK=0, WORLD_SIZE=0, LOCAL_RANK=0: need 0 <= RANK < WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2, WORLD_SIZE=2, LOCAL_RANK=0: need"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK=-1, WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK >= 0"),
])
def test_bad_torchrun_variables_are_one_line_errors(images, tmp_path, monkeypatch, capsys, env,
                                                    message):
    """Before anything is made: not int()'s message, a division by zero or a wait of 30 minutes
    in init_process_group for a rank that never comes; a usage error (status 2) on the command
    line, as for `upscale`."""
    from liif_cuda import cli
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=re.escape(message)):
        train(tiny_config(images, epochs=1), str(run), device="cpu", progress=False)
    path = write_config(tiny_config(images, epochs=1), tmp_path / "config.yaml")
    assert cli.main(["train", "--config", path, "--out", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("liif-cuda: error: ") and message in err[0], err
    assert not run.exists()


def test_a_local_rank_beyond_the_gpus_is_named(monkeypatch):
    """On CUDA each process takes cuda:LOCAL_RANK; a LOCAL_RANK the process cannot see (a launcher
    that gives each process one GPU through CUDA_VISIBLE_DEVICES) is named, not torch's "invalid
    device ordinal". Checked before any CUDA call, so no GPU is needed."""
    from liif_cuda.training.trainer import Distributed
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    message = "LOCAL_RANK=1, but this process sees 1 CUDA GPU(s)"
    with pytest.raises(TrainingError, match=f"^{re.escape(message)}$"):
        Distributed("cuda")


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """Two GPUs and liif_cuda's CUDA kernels, as the device checks see them; no torchrun. Returns
    the devices torch.cuda.set_device is given (it is not called for real)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(liif_cuda, "build_info", lambda: {"cuda": True})
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(str(device)))
    return current


def test_cuda_n_device_trains_on_gpu_n(images, tmp_path, monkeypatch, two_fake_gpus):
    """device="cuda:1" trains on GPU 1 (not cuda:LOCAL_RANK, 0 here), made the current device
    (the DataLoader's pin-memory thread and bare torch.cuda calls use it), and is CUDA to the fp16
    check; "cuda" is still cuda:LOCAL_RANK. The loop itself is replaced by a recorder."""
    from liif_cuda.training import trainer
    taken = []
    monkeypatch.setattr(trainer, "_train", lambda config, out_dir, resume, init, dist, device_type,
                        *rest: taken.append((str(dist.device), device_type)))
    train(tiny_config(images, epochs=1), str(tmp_path / "a"), device="cuda:1", precision="fp16",
          progress=False)
    assert taken == [("cuda:1", "cuda")] and two_fake_gpus == ["cuda:1"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    train(tiny_config(images, epochs=1), str(tmp_path / "b"), device="cuda", progress=False)
    assert taken[1] == ("cuda:1", "cuda") and two_fake_gpus[1] == "cuda:1"


def test_cuda_n_device_beyond_the_gpus_is_refused(images, tmp_path, two_fake_gpus):
    """load_model's check of the index, before the run folder: not torch's "invalid device
    ordinal" from the first allocation."""
    message = ("device 'cuda:2': GPU 2 is not visible; this process sees 2 CUDA GPU(s), numbered "
               "from 0 (CUDA_VISIBLE_DEVICES chooses which GPUs it sees)")
    with pytest.raises(TrainingError, match=f"^{re.escape(message)}$"):
        train(tiny_config(images, epochs=1), str(tmp_path / "run"), device="cuda:2",
              progress=False)
    assert not (tmp_path / "run").exists() and two_fake_gpus == []


def test_cuda_n_device_under_torchrun_is_refused(images, tmp_path, monkeypatch, two_fake_gpus):
    """With several processes each takes cuda:LOCAL_RANK: "cuda:N" would put them all on GPU N
    (NCCL refuses two ranks on one GPU). Refused before the run folder or the process group."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)

    def init_process_group(*args, **kwargs):
        raise AssertionError("the process group was made")
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    message = ("device 'cuda:1': under torchrun (WORLD_SIZE=2) each process takes cuda:LOCAL_RANK; "
               "pass 'cuda'")
    with pytest.raises(TrainingError, match=f"^{re.escape(message)}$"):
        train(tiny_config(images, epochs=1), str(tmp_path / "run"), device="cuda:1",
              progress=False)
    assert not (tmp_path / "run").exists() and two_fake_gpus == []


# -- checkpoints are never partial ------------------------------------------------------------------

def test_interrupted_save_keeps_the_previous_checkpoint(images, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    train(tiny_config(images, epochs=1), run, device="cpu", progress=False)
    before = open(f"{run}/epoch-last.pth", "rb").read()
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(images, epochs=2), run, resume=True, device="cpu", progress=False)
    assert open(f"{run}/epoch-last.pth", "rb").read() == before
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
    monkeypatch.setattr(torch, "save", real_save)
    train(tiny_config(images, epochs=2), run, resume=True, device="cpu", progress=False)
    assert [r["epoch"] for r in read_log(run)] == ["1", "2"]


# -- bad input ----------------------------------------------------------------------------------------

def test_checkpoints_are_readable_by_others(images, tmp_path):
    """Written through a private temporary file, they still get the usual mode (0666 - umask)."""
    run = str(tmp_path / "run")
    train(tiny_config(images, epochs=2), run, device="cpu", progress=False)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("epoch-last.pth", "epoch-best.pth", "epoch-2.pth", "log.csv", "config.yaml"):
        assert os.stat(os.path.join(run, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_resume_says_where_it_starts(images, tmp_path, capsys):
    run = str(tmp_path / "run")
    train(tiny_config(images, epochs=1), run, device="cpu", progress=False)
    capsys.readouterr()
    train(tiny_config(images, epochs=1), run, resume=True, device="cpu", progress=False)
    out = capsys.readouterr().out
    assert "epoch 1 of 1; nothing left to train" in out and "epoch 2" not in out
    train(tiny_config(images, epochs=2), run, resume=True, device="cpu", progress=False)
    out = capsys.readouterr().out
    assert "resuming from" in out and "epoch 2/2: loss" in out
    assert "saved with --precision" not in out


def test_resume_in_another_precision_says_so(images, tmp_path, capsys):
    """A run resumed without its --precision goes on, and says which it had."""
    run = str(tmp_path / "run")
    train(tiny_config(images, epochs=1), run, device="cpu", precision="bf16", progress=False)
    capsys.readouterr()
    train(tiny_config(images, epochs=2), run, resume=True, device="cpu", progress=False)
    out = capsys.readouterr().out
    assert "the run was saved with --precision bf16; it goes on with --precision fp32" in out


def test_existing_run_is_refused_untouched(images, tmp_path):
    run = str(tmp_path / "run")
    train(tiny_config(images, epochs=1), run, device="cpu", progress=False)
    def stamp():  # the lock file takes the pid of each process that locks it
        return {f: os.path.getmtime(os.path.join(run, f)) for f in os.listdir(run) if f != ".lock"}
    before = stamp()
    # Every checkpoint counted: the first three named, the others as a number.
    with pytest.raises(TrainingError, match=r"already holds checkpoints \(epoch-best.pth, "
                                            r"epoch-last.pth\); pass --resume"):
        train(tiny_config(images, epochs=2), run, device="cpu", progress=False)
    for name in ("epoch-1.pth", "epoch-2.pth", "epoch-3.pth"):
        shutil.copy(os.path.join(run, "epoch-last.pth"), os.path.join(run, name))
    before = stamp()
    with pytest.raises(TrainingError, match=r"already holds checkpoints \(epoch-1.pth, "
                                            r"epoch-2.pth, epoch-3.pth and 2 more\); pass"):
        train(tiny_config(images, epochs=2), run, device="cpu", progress=False)
    assert stamp() == before
    with pytest.raises(TrainingError, match="epoch-last.pth does not exist$"):
        train(tiny_config(images), str(tmp_path / "new"), resume=True, device="cpu")
    # A run stopped before its first epoch ended: its config, no checkpoint.
    os.makedirs(tmp_path / "stopped")
    shutil.copy(os.path.join(run, "config.yaml"), tmp_path / "stopped")
    with pytest.raises(TrainingError, match="epoch-last.pth does not exist; the run there stopped "
                                            "before its first epoch ended: start it again without "
                                            "--resume"):
        train(tiny_config(images), str(tmp_path / "stopped"), resume=True, device="cpu")


def test_a_run_folder_in_use_is_refused_untouched(images, tmp_path):
    """Two trainings into one folder would mix their files: the second, with or without --resume,
    is refused while the first holds the folder's lock (taken here by the test itself: flock locks
    belong to an open file, so the same process is refused too)."""
    import fcntl
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("the other training's")
    with open(run / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242\n")
        lock.flush()
        for resume in (False, True):
            with pytest.raises(TrainingError, match=f"^{run} is in use by another training "
                                                    r"\(pid 4242\)$"):
                train(tiny_config(images, epochs=1), str(run), resume=resume, device="cpu",
                      progress=False)
        assert sorted(os.listdir(run)) == [".lock", "config.yaml"]
        assert (run / ".lock").read_text() == "4242\n"
        assert (run / "config.yaml").read_text() == "the other training's"
    # Released (the other training ended): this one runs.
    train(tiny_config(images, epochs=1, repeat=2), str(run), device="cpu", progress=False)
    assert (run / "epoch-last.pth").exists()


def test_a_file_system_without_locks_trains_unguarded(images, tmp_path, monkeypatch, capsys):
    """flock fails with ENOLCK on some network file systems: a note, and the run goes on."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = tmp_path / "run"
    train(tiny_config(images, epochs=1, repeat=2), str(run), device="cpu", progress=False)
    assert (run / "epoch-last.pth").exists()
    assert f"note: cannot lock {run} (No locks available); a second training into it would not " \
        f"be refused" in capsys.readouterr().out


def test_unwritable_run_folder_is_named(images, tmp_path, monkeypatch):
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refuse)
    run = tmp_path / "new" / "run"
    with pytest.raises(TrainingError, match=f"^--out {run}: cannot write there \\(Permission "
                                            f"denied\\)$"):
        train(tiny_config(images, epochs=1), str(run), device="cpu", progress=False)
    assert not (tmp_path / "new").exists()


def test_unwritable_checkpoint_is_a_clear_error(images, tmp_path, monkeypatch):
    """A full disk made torch.save fail with "[enforce fail at inline_container.cc:672] .
    unexpected pos ...": the error names the checkpoint and, where the disk is full, says so; the
    previous checkpoint is kept and no temporary file is left."""
    import collections
    import shutil
    run = str(tmp_path / "run")
    train(tiny_config(images, epochs=1, repeat=2), run, device="cpu", progress=False)
    before = open(f"{run}/epoch-last.pth", "rb").read()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 12544128 "
                           "vs 12544020")
    monkeypatch.setattr(torch, "save", full_disk)
    usage = collections.namedtuple("usage", "total used free")
    for free, reason in ((1000, "No space left on device"), (10**12, r"\[enforce fail .* unexpected pos 12544128")):
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, free))
        with pytest.raises(TrainingError, match=f"^cannot write the checkpoint "
                                                f"{run}/epoch-last.pth: {reason}"):
            train(tiny_config(images, epochs=2, repeat=2), run, resume=True, device="cpu",
                  progress=False)
        assert open(f"{run}/epoch-last.pth", "rb").read() == before
        assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


def test_resume_with_another_architecture_names_the_weight(images, tmp_path):
    run = str(tmp_path / "run")
    train(tiny_config(images, epochs=1, repeat=2), run, device="cpu", progress=False)
    config = tiny_config(images, epochs=2, repeat=2)
    config["model"]["args"]["imnet_spec"]["args"]["hidden_list"] = [16, 32]
    with pytest.raises(ConfigError, match=r"^--resume .*epoch-last.pth: the checkpoint's model does "
                       r"not match the config's model \(imnet.layers.2.weight: \(16, 16\) in the "
                       r"checkpoint, \(32, 16\) in the config's model\)$"):
        train(config, run, resume=True, device="cpu", progress=False)


def test_resume_with_a_changed_config_says_so_and_keeps_the_old_one(images, tmp_path, capsys):
    """The optimizer state (its learning rate) comes from the checkpoint; config.yaml becomes the
    new config, so the previous one is kept and the differences are named."""
    run = str(tmp_path / "run")
    first = tiny_config(images, epochs=1, repeat=2)
    train(first, run, device="cpu", progress=False)
    capsys.readouterr()
    second = tiny_config(images, epochs=2, repeat=2)
    second["optimizer"]["args"]["lr"] = 2.0e-3
    train(second, run, resume=True, device="cpu", progress=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: the config differs from the run's (optimizer.args.lr 0.001 -> 0.002, "
                     "epoch_max 1 -> 2); the optimizer state and learning rate "
                     "come from the checkpoint, not from the config; the previous config is kept "
                     "as config-before-epoch-2.yaml"]
    assert load_config(f"{run}/config-before-epoch-2.yaml") == first
    assert load_config(f"{run}/config.yaml") == second
    assert float(read_log(run)[1]["lr"]) == 1e-3  # the checkpoint's
    train(second, run, resume=True, device="cpu", progress=False)  # the same config: no note
    assert "note:" not in capsys.readouterr().out
    assert sorted(f for f in os.listdir(run) if f.startswith("config")) == [
        "config-before-epoch-2.yaml", "config.yaml"]


def write_16bit_png(path, size=(40, 52)):
    Image.fromarray(np.full(size, 30000, np.uint16)).save(path)  # mode I;16


@pytest.mark.parametrize("cache", ["in_memory", "none"])
def test_16bit_images_are_refused_naming_them(images, tmp_path, cache):
    """convert('RGB') clips 16-bit grayscale to nearly white: refused when the dataset is made."""
    write_16bit_png(os.path.join(images, "wide.png"))
    spec = dataset_spec(images)
    spec["dataset"]["args"]["cache"] = cache
    with pytest.raises(TrainingError, match=f"^training image {images}/wide.png is a 16-bit"):
        make_dataset(spec, seed=0)


def test_a_truncated_image_is_named(images, tmp_path):
    """Its header reads, its data does not: found when it is read, named (also through a
    DataLoader worker, whose error message starts with "Caught ... in DataLoader worker")."""
    path = os.path.join(images, "1.png")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    config = tiny_config(images, epochs=1, repeat=2)
    for spec in (config["train_dataset"], config["val_dataset"]):
        spec["dataset"]["args"]["cache"] = "none"
    message = f"^training image {path} cannot be read \\(image file is truncated"
    with pytest.raises(TrainingError, match=message):
        make_dataset(config["train_dataset"], seed=0)[1]
    with pytest.raises(TrainingError, match=message):
        train(config, str(tmp_path / "run"), device="cpu", progress=False, workers=1)
    spec = config["train_dataset"]
    spec["dataset"]["args"]["cache"] = "in_memory"
    with pytest.raises(TrainingError, match=message):
        make_dataset(spec, seed=0)


def test_sample_q_beyond_a_whole_image_names_the_key(images):
    """Whole images (no inp_size): the HR patch is known only when the sample is made."""
    spec = dataset_spec(images, inp_size=None, scale_max=1, sample_q=40 * 52 + 1, augment=False)
    data = make_dataset(spec, seed=0, where="val_dataset")
    with pytest.raises(ConfigError, match=f"^val_dataset.wrapper.args.sample_q 2081 exceeds the "
                                          f"2080 pixels of the HR patch \\(40x52\\) of "
                                          f"{images}/0.png$"):
        data[0]


def test_out_must_be_a_folder(images, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for out, resume in (("file", False), ("file", True), ("file/run", False)):
        with pytest.raises(TrainingError, match=f"--out .*{out} is not a folder .*file is a file"):
            train(tiny_config(images), str(tmp_path / out), resume=resume, device="cpu",
                  progress=False)
    assert (tmp_path / "file").read_text() == "not a folder"


def test_cuda_that_cannot_run_is_refused_before_the_run_folder(images, tmp_path, monkeypatch):
    """As load_model's device check: no GPU, or liif_cuda built without its CUDA kernels (the
    first query would have failed, after the run folder was made)."""
    import liif_cuda
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingError, match="^device 'cuda': no CUDA GPU is available"):
        train(tiny_config(images), str(tmp_path / "run"), device="cuda", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(liif_cuda, "build_info", lambda: {"cuda": False})
    with pytest.raises(TrainingError, match="^device 'cuda': liif_cuda was built without its CUDA "
                                            "kernels"):
        train(tiny_config(images), str(tmp_path / "run"), device="cuda", progress=False)
    assert not (tmp_path / "run").exists()


def test_init_from_another_architecture_is_refused(images, tmp_path):
    first = str(tmp_path / "first")
    train(tiny_config(images, epochs=1), first, device="cpu", progress=False)
    config = tiny_config(images, epochs=1)
    config["model"]["args"]["imnet_spec"]["args"]["hidden_list"] = [16, 32]
    run = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"--init .*: the checkpoint's model does not match the "
                       r"config's model \(imnet.layers.2.weight: \(16, 16\) in the checkpoint, "
                       r"\(32, 16\) in the config's model\)"):
        train(config, run, init=f"{first}/epoch-last.pth", device="cpu", progress=False)
    assert not os.path.exists(run)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(epochs_max=3), r"^unknown key config.epochs_max \(did you mean epoch_max\? "
                                       r"allowed: train_dataset, "),
    (lambda c: c.update(zzz=3), r"^unknown key config.zzz \(allowed: train_dataset, "),
    (lambda c: c["train_dataset"]["dataset"].update(name="image-folders"),
     "unknown 'image-folders'"),
    (lambda c: c["train_dataset"]["wrapper"]["args"].update(sample_qq=3),
     r"unknown key train_dataset.wrapper.args.sample_qq \(did you mean sample_q\? allowed:"),
    (lambda c: c["model"]["args"]["encoder_spec"].update(name="edsr"), "unknown 'edsr'"),
    (lambda c: c["model"]["args"]["encoder_spec"]["args"].update(no_upsampling=False),
     "no_upsampling must be true"),
    (lambda c: c["optimizer"].update(name="adamw"), "unknown 'adamw'"),
    (lambda c: c.update(epoch_max=0), "epoch_max must be >= 1"),
    (lambda c: c["train_dataset"]["dataset"]["args"].update(cache="bin"), "cache must be one of"),
    (lambda c: c["train_dataset"].update(batch_size="16"), "batch_size must be an integer"),
    (lambda c: c["train_dataset"]["wrapper"]["args"].update(scale_min=3, scale_max=2),
     "below scale_min"),
    (lambda c: c.pop("model"), "config.model is missing"),
])
def test_config_errors_name_the_key(images, edit, match):
    config = copy.deepcopy(tiny_config(images))
    edit(config)
    with pytest.raises(ConfigError, match=match):
        check_config(config)


def set_key(config, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        config = config[key]
    config[last] = value


SGD = {"name": "sgd", "args": {"lr": 0.1, "momentum": 0.9}}
RDN_SPEC = {"name": "rdn", "args": {"RDNconfig": "A", "no_upsampling": True}}


@pytest.mark.parametrize("key,value,match", [
    ("multi_step_lr.milestones", 1, "multi_step_lr.milestones must be a list of positive integers"),
    ("multi_step_lr.milestones", "one", "multi_step_lr.milestones must be a list"),
    ("multi_step_lr.milestones", [-5], "multi_step_lr.milestones must be a list"),
    ("multi_step_lr.milestones", [0, 2], "multi_step_lr.milestones must be a list"),
    ("multi_step_lr.milestones", [2.5], "multi_step_lr.milestones must be a list"),
    ("multi_step_lr.gamma", -2, "multi_step_lr.gamma must be > 0"),
    ("multi_step_lr.gamma", 0, "multi_step_lr.gamma must be > 0"),
    ("multi_step_lr.gamma", "5e-1", r"multi_step_lr.gamma must be a number.*write 1.e-4"),
    ("train_dataset.wrapper.args.augment", "false",
     "train_dataset.wrapper.args.augment must be true or false"),
    ("train_dataset.wrapper.args.augment", 1, "wrapper.args.augment must be true or false"),
    ("eval_bsize", 0, "eval_bsize must be >= 1"),
    ("epoch_save", 0, "^epoch_save must be >= 1, got 0$"),
    ("epoch_val", 1.5, "^epoch_val must be an integer, got 1.5$"),
    ("train_dataset.dataset.args.first_k", 0,
     "^train_dataset.dataset.args.first_k must be >= 1, got 0$"),
    ("val_dataset.dataset.args.repeat", 0, "^val_dataset.dataset.args.repeat must be >= 1, got 0$"),
    ("train_dataset.wrapper", {"name": "sr-implicit-paired", "args": {"inp_size": 8}},
     "^train_dataset: wrapper 'sr-implicit-paired' does not go with dataset 'image-folder'"),
    ("eval_bsize", "30000", "eval_bsize must be an integer"),
    ("eval_bsize", 1.5, "eval_bsize must be an integer"),
    ("seed", "x", "seed must be an integer"),
    ("seed", -1, "seed must be >= 0"),
    ("optimizer.args.lr", -1, "optimizer.args.lr must be >= 0"),
    ("optimizer.args.lr", float("nan"), "optimizer.args.lr must be a number"),
    ("optimizer.args.betas", [0.9], "optimizer.args.betas must be a pair"),
    ("optimizer.args.betas", [0.9, 1.0], "optimizer.args.betas must be a pair"),
    ("optimizer.args.betas", [-0.1, 0.9], "optimizer.args.betas must be a pair"),
    ("optimizer.args.eps", 0, "optimizer.args.eps must be > 0"),
    ("optimizer.args.eps", "1e-8", "optimizer.args.eps must be a number"),
    ("optimizer.args.weight_decay", -1, "optimizer.args.weight_decay must be >= 0"),
    ("optimizer", {**SGD, "args": {"lr": 0.1, "momentum": -0.9}}, "momentum must be >= 0"),
    ("optimizer", {**SGD, "args": {"lr": 0.1, "nesterov": True}}, "nesterov needs a momentum"),
    ("optimizer", {**SGD, "args": {**SGD["args"], "nesterov": "true"}},
     "optimizer.args.nesterov must be true or false"),
    ("model.args.imnet_spec.args.hidden_list", [256, -1],
     "imnet_spec.args.hidden_list must be a list of positive integers"),
    ("model.args.imnet_spec.args.hidden_list", 256, "imnet_spec.args.hidden_list must be a list"),
    ("model.args.imnet_spec.args.out_dim", 4, "imnet_spec.args.out_dim must be 3"),
    ("model.args.feat_unfold", "false", "model.args.feat_unfold must be true or false"),
    ("model.args.encoder_spec.args.no_upsampling", "false",
     "model.args.encoder_spec.args.no_upsampling must be true or false"),
    ("model.args.encoder_spec", {**RDN_SPEC, "args": {"no_upsampling": "true"}},
     "model.args.encoder_spec.args.no_upsampling must be true or false"),
    # The smallest HR patch of inp_size 8 at scale_min 1 has 64 pixels.
    ("train_dataset.wrapper.args.sample_q", 65, r"^train_dataset.wrapper.args.sample_q 65 exceeds "
     r"the 64 pixels of the smallest HR patch \(8x8: inp_size 8 at scale_min 1\)$"),
    # round(3 * 1.5) is 4, as the wrapper rounds (half to even).
    ("val_dataset.wrapper.args", {"inp_size": 3, "scale_min": 1.5, "scale_max": 3, "sample_q": 32},
     r"^val_dataset.wrapper.args.sample_q 32 exceeds the 16 pixels .*\(4x4: inp_size 3 at "
     r"scale_min 1.5\)$"),
    ("model.args.encoder_spec.args.n_feats", "64", "encoder_spec.args.n_feats must be an integer"),
    ("model.args.encoder_spec.args.n_resblocks", -1, "encoder_spec.args.n_resblocks must be >= 0"),
    ("model.args.encoder_spec", {**RDN_SPEC, "args": {"G0": 0}}, "encoder_spec.args.G0 must be"),
    ("model.args.encoder_spec", {**RDN_SPEC, "args": {"RDNkSize": 4}},
     "encoder_spec.args.RDNkSize must be odd"),
])
def test_bad_values_name_the_key(images, key, value, match):
    config = copy.deepcopy(tiny_config(images))
    set_key(config, key, value)
    with pytest.raises(ConfigError, match=match):
        check_config(config)


@pytest.mark.parametrize("key,value", [
    # MultiStepLR counts milestones in any order, a repeat applying gamma twice (the original passes
    # the list straight to it); one past epoch_max never applies.
    ("multi_step_lr.milestones", [3, 1]),
    ("multi_step_lr.milestones", [2, 2]),
    ("multi_step_lr.milestones", [200, 400]),
    ("multi_step_lr.milestones", []),
    ("multi_step_lr.gamma", 2),
    ("optimizer.args.lr", 0),
    ("optimizer.args", {"lr": 1.0e-4, "betas": [0.0, 0.99], "eps": 1.0e-6, "weight_decay": 0}),
    ("optimizer", {**SGD, "args": {**SGD["args"], "nesterov": True, "weight_decay": 1.0e-4}}),
    ("model.args.imnet_spec.args.hidden_list", []),
    ("model.args.encoder_spec", RDN_SPEC),
    ("seed", 12345),
])
def test_good_values_pass(images, key, value):
    config = copy.deepcopy(tiny_config(images))
    set_key(config, key, value)
    check_config(config)
    build_model(config["model"])


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["optimizer"]["args"].update(lr="1e-4"), "write 1.e-4"),
    (lambda c: c.pop("data_norm"), r"^data_norm is missing: add data_norm: \{inp: \{sub: \[0.5\], "
                                   r"div: \[0.5\]\}, gt: \{sub: \[0.5\], div: \[0.5\]\}\} \(the "
                                   r"published configs' normalisation"),
    (lambda c: c["data_norm"]["gt"].update(sub=[0.0]), "data_norm must be"),
    (lambda c: c["train_dataset"]["wrapper"]["args"].update(inp_size=24, scale_max=4),
     r"images smaller than the 96x96 HR patch.*0.png \(40x52\)"),
    (lambda c: c["train_dataset"]["dataset"]["args"].update(root_path="/nonexistent"),
     "^train_dataset.dataset.args.root_path /nonexistent is not a folder$"),
    (lambda c: c["val_dataset"]["dataset"]["args"].update(root_path="/nonexistent"),
     "^val_dataset.dataset.args.root_path /nonexistent is not a folder$"),
    (lambda c: c["val_dataset"]["dataset"]["args"].update(root_path=2024),  # YAML's number
     "^val_dataset.dataset.args.root_path must be a folder's path, got 2024$"),
    (lambda c: c["train_dataset"]["dataset"]["args"].update(root_path="./load/div2k/none"),
     r"^train_dataset.dataset.args.root_path ./load/div2k/none is not a folder; the packaged "
     r"configs read DIV2K from ./load/div2k/"),
    (lambda c: c.update(eval_type="div2k-4"), "use `liif-cuda eval`"),
    (lambda c: c.update(seed="x"), "seed must be an integer"),
    (lambda c: c["multi_step_lr"].update(milestones=1), "multi_step_lr.milestones must be a list"),
])
def test_bad_configs_fail_before_training(images, tmp_path, edit, match):
    config = copy.deepcopy(tiny_config(images))
    edit(config)
    run = str(tmp_path / "new" / "run")
    with pytest.raises(ValueError, match=match):
        train(config, run, device="cpu", progress=False)
    # A run that cannot start leaves no folder behind (nor the lock file it took in one).
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("native,instead", [(True, "bf16"), (False, "fp32")])
def test_fp16_on_the_cpu_names_the_faster_precision(images, tmp_path, monkeypatch, native,
                                                    instead):
    """fp16 without CUDA is refused, pointing at bf16 only where torch has bf16 convolutions for
    this CPU (elsewhere a bf16 step takes several times float32's)."""
    import liif_cuda.upscaling as upscaling
    monkeypatch.setattr(upscaling, "cpu_has_bf16_convolutions", lambda: native)
    with pytest.raises(ValueError, match=f"^--precision fp16 needs CUDA \\(GradScaler\\); on this "
                                         f"CPU use --precision {instead}$"):
        train(tiny_config(images), str(tmp_path / "run"), precision="fp16", device="cpu")
    assert not (tmp_path / "run").exists()


def test_bad_arguments(images, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        train(tiny_config(images), str(tmp_path / "a"), precision="fp8", device="cpu")
    with pytest.raises(ValueError, match="^--precision fp16 needs CUDA"):
        train(tiny_config(images), str(tmp_path / "b"), precision="fp16", device="cpu")
    with pytest.raises(ValueError, match="device must be"):
        train(tiny_config(images), str(tmp_path / "c"), device="tpu")
    with pytest.raises(ConfigError, match="neither a file nor a packaged config"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="^--out must name a folder$"):
        train(tiny_config(images), "", device="cpu")
    with pytest.raises(ConfigError, match="^--init nonexist.pth: 'nonexist.pth' is neither a "
                                          "checkpoint file nor a pretrained name"):
        train(tiny_config(images), str(tmp_path / "d"), init="nonexist.pth", device="cpu")
    config = tiny_config(images)
    config["resume"] = "nope.pth"
    with pytest.raises(ConfigError, match="^resume: nope.pth does not exist$"):
        train(config, str(tmp_path / "e"), device="cpu")
    assert not [f for f in os.listdir(tmp_path) if f in "abcde"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_dataset: [unclosed\nepoch_max: 3\n")
    with pytest.raises(ConfigError, match=f"^config {bad} is not valid YAML at line 2, column 10: "
                                          f"expected ',' or ']', but got ':'$"):
        load_config(str(bad))
    import yaml
    bad.write_text(yaml.safe_dump(tiny_config(images), sort_keys=False) + "epoch_max: 30\n")
    lines = bad.read_text().splitlines()
    with pytest.raises(ConfigError, match=f"^config {bad}: key 'epoch_max' at line {len(lines)} "
                                          f"is given twice \\(first at line "
                                          f"{lines.index('epoch_max: 3') + 1}\\)$"):
        load_config(str(bad))


def test_yaml_merge_keys_may_override(images, tmp_path):
    """`<<: *anchor` merges a mapping whose keys the mapping may then give again: not a key given
    twice."""
    import yaml
    config = tiny_config(images)
    del config["val_dataset"]
    text = yaml.safe_dump(config, sort_keys=False).replace("train_dataset:\n",
                                                           "train_dataset: &train\n", 1)
    path = tmp_path / "merged.yaml"
    path.write_text(text + "val_dataset:\n  <<: *train\n  batch_size: 2\n")
    merged = load_config(str(path))
    assert merged["val_dataset"] == dict(config["train_dataset"], batch_size=2)


def test_packaged_configs_are_the_published_recipe():
    for name, encoder in (("edsr-baseline-liif", "edsr-baseline"), ("rdn-liif", "rdn")):
        config = load_config(name)
        wrapper = config["train_dataset"]["wrapper"]["args"]
        assert (wrapper["inp_size"], wrapper["scale_max"], wrapper["sample_q"]) == (48, 4, 2304)
        assert config["train_dataset"]["batch_size"] == 16
        assert config["optimizer"] == {"name": "adam", "args": {"lr": 1e-4}}
        assert config["multi_step_lr"] == {"milestones": [200, 400, 600, 800], "gamma": 0.5}
        assert config["epoch_max"] == 1000
        assert config["model"]["args"]["encoder_spec"]["name"] == encoder
        build_model(config["model"])  # builds


def test_validation_weights_each_batch_by_its_size():
    """The original's eval_psnr adds each batch's PSNR to its Averager with the batch's size: a
    batch of 3 at 20 dB and one of 1 at 40 dB give 25 dB, not 30."""
    class Grey(torch.nn.Module):  # predicts 0.5 everywhere (0 before denormalisation)
        def gen_feat(self, inp):
            pass

        def query_rgb(self, coord, cell):
            return torch.zeros(*coord.shape[:2], 3)

    def batch(size, error):
        return {"inp": torch.zeros(size, 3, 4, 4), "coord": torch.zeros(size, 5, 2),
                "cell": torch.zeros(size, 5, 2), "gt": torch.full((size, 5, 3), 0.5 + error)}

    psnr = validate(Grey(), [batch(3, 0.1), batch(1, 0.01)], torch.device("cpu"), "fp32", 30000)
    assert psnr == pytest.approx(25.0, abs=1e-5)


class ThreadRank:
    """One of `world` ranks run as threads of this process: sum() adds every rank's values, as
    Distributed.sum's all_reduce does."""

    def __init__(self, rank, world, board, barrier):
        self.rank, self.world, self.board, self.barrier = rank, world, board, barrier

    def sum(self, values, device):
        self.board[self.rank] = list(values)
        self.barrier.wait()
        return [sum(column) for column in zip(*self.board)]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shared_validation_is_one_process_validation(images, world):
    """10 samples in batches of 3 (3, 3, 3, 1) shared among 1, 2, 3 or 5 ranks (5: one rank
    without a batch): every rank returns the PSNR of one process validating them all. Each rank
    (a thread here) has its own copy of the model, as each process of a real run has: the model
    keeps the feature map of its last gen_feat, which threads sharing one would overwrite in each
    other's batches (a rehearsal run failed so)."""
    import copy
    import threading
    torch.manual_seed(0)
    model = build_model(tiny_config(images)["model"])
    val_set = make_dataset(dataset_spec(images, repeat=5, augment=False), seed=1)
    cpu = torch.device("cpu")
    whole = validate(model, torch.utils.data.DataLoader(val_set, batch_size=3), cpu, "fp32", 30000)
    board, barrier, results = [None] * world, threading.Barrier(world), [None] * world

    models = [copy.deepcopy(model) for _ in range(world)]

    def rank(r):
        results[r] = validate_shared(models[r], val_set, 3, ThreadRank(r, world, board, barrier),
                                     cpu, "fp32", 30000, "original", {})
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [pytest.approx(whole, rel=1e-12)] * world


# -- the official weights ---------------------------------------------------------------------------

@requires_shared
@pytest.mark.slow
def test_finetuning_the_official_weights_keeps_validation_psnr(tmp_path):
    """Fine-tuning from the official EDSR-baseline-LIIF at lr 1e-5 for a short run (BSD68 patches)
    does not lower validation PSNR (Set5 patches at x1-x4) by more than 0.05 dB."""
    config = load_config("edsr-baseline-liif")
    config["train_dataset"] = dataset_spec(os.path.join(SHARED, "data", "BSD68"), repeat=1,
                                           batch_size=4, inp_size=48, scale_max=4, sample_q=2304)
    config["train_dataset"]["dataset"]["args"]["first_k"] = 24  # 6 steps
    config["val_dataset"] = dataset_spec(os.path.join(SHARED, "data", "Set5"), repeat=4,
                                         batch_size=4, augment=False, inp_size=48, scale_max=4,
                                         sample_q=2304)
    config["optimizer"]["args"]["lr"] = 1.0e-5
    config["epoch_max"], config["epoch_val"] = 1, 1
    run = str(tmp_path / "run")
    train(config, run, init=OFFICIAL_WEIGHTS, device="cpu", progress=False)
    val = torch.utils.data.DataLoader(make_dataset(config["val_dataset"], seed=1), batch_size=4)
    before = validate(liif_cuda.load_model(OFFICIAL_WEIGHTS), val, torch.device("cpu"), "fp32",
                      30000)
    after = float(read_log(run)[0]["val_psnr"])
    assert after >= before - 0.05, (before, after)
    assert os.path.exists(os.path.join(run, "epoch-best.pth"))



# -- the command line ---------------------------------------------------------------------------------

def test_liif_cuda_train_command(images, tmp_path, capsys):
    import yaml

    from liif_cuda import cli
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(images, epochs=1)))
    run = str(tmp_path / "run")
    assert cli.main(["train", "--config", str(path), "--out", run, "--device", "cpu"]) == 0
    assert f"last checkpoint: {run}/epoch-last.pth" in capsys.readouterr().out
    # Again without --resume: one line, status 1, nothing touched.
    stamp = os.path.getmtime(f"{run}/epoch-last.pth")
    assert cli.main(["train", "--config", str(path), "--out", run, "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints" in err[0]
    assert os.path.getmtime(f"{run}/epoch-last.pth") == stamp
    path.write_text(yaml.safe_dump({**tiny_config(images), "epochs": 3}))
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "x")]) == 1
    assert "unknown key config.epochs" in capsys.readouterr().err
    assert cli.main(["train", "--config", "no-such-config", "--out", str(tmp_path / "y")]) == 1
    assert "neither a file nor a packaged config" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "z"),
                     "--workers", "-1"]) == 2  # a usage error, as in the other commands
    assert "--workers must be >= 0" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "u"),
                     "--device", "cpu", "--precision", "fp16"]) == 2  # usage, as in upscale
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision fp16 needs CUDA" in err[0]
    assert not (tmp_path / "u").exists()
    if not torch.cuda.is_available():
        assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "v"),
                         "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            "liif-cuda: error: --device cuda: no CUDA GPU is available"), err
        assert not (tmp_path / "v").exists()
    path.write_text(yaml.safe_dump({**tiny_config(images), "multi_step_lr": {"milestones": 1,
                                                                           "gamma": 0.5}}))
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multi_step_lr.milestones must be a list" in err[0]
    path.write_text(yaml.safe_dump(tiny_config(images)))
    (tmp_path / "file").write_text("")
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "file"),
                     "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "is not a folder" in err[0]


def test_interrupted_train_command_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    import liif_cuda.training.trainer
    from liif_cuda import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(liif_cuda.training.trainer, "train", interrupted)
    run = tmp_path / "run"
    argv = ["train", "--config", "edsr-baseline-liif", "--out", str(run), "--precision", "bf16"]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.splitlines() == [  # no checkpoint: start again
        "liif-cuda: no epoch had ended, so there is nothing to resume; the same command starts "
        "the run again", "liif-cuda: interrupted"]
    run.mkdir()
    (run / "epoch-last.pth").write_bytes(b"")
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"liif-cuda: {run}/epoch-last.pth holds the last finished epoch; to go on: liif-cuda "
        f"train --config edsr-baseline-liif --out {run} --resume --precision bf16",
        "liif-cuda: interrupted"]


def docs_try_config():
    """The config of docs/training.md's "A short run on your own images", as the page shows it."""
    import yaml
    with open(os.path.join(ROOT, "docs", "training.md")) as f:
        text = f.read()
    block = text.split("```yaml\n# try.yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)


def test_the_documented_short_run(tmp_path, capsys):
    """docs/training.md's short run trains as the page says: 16 images of 96x96 pixels, 2 epochs of
    4 steps, validated after each, a checkpoint per epoch that load_model reads."""
    import yaml

    from liif_cuda import cli
    config = docs_try_config()
    assert config["epoch_max"] == 2 and config["train_dataset"]["batch_size"] == 4
    images = write_images(str(tmp_path / "my_images"), count=16, size=(96, 96))
    for part in ("train_dataset", "val_dataset"):
        config[part]["dataset"]["args"]["root_path"] = images
    path = tmp_path / "try.yaml"
    path.write_text(yaml.safe_dump(config))
    run = str(tmp_path / "runs" / "try")
    assert cli.main(["train", "--config", str(path), "--out", run, "--device", "cpu"]) == 0
    log = read_log(run)
    assert [r["epoch"] for r in log] == ["1", "2"] and all(r["val_psnr"] for r in log)
    assert {"epoch-1.pth", "epoch-2.pth", "epoch-last.pth", "epoch-best.pth"} <= set(os.listdir(run))
    assert isinstance(liif_cuda.load_model(f"{run}/epoch-last.pth"), liif_cuda.models.LIIF)


def test_resume_keeps_the_best_validation_psnr(images, tmp_path):
    """A resumed run compares with the best PSNR of before the resume, not from scratch."""
    run = str(tmp_path / "run")
    train(tiny_config(images, epochs=2), run, device="cpu", progress=False)
    last = torch.load(f"{run}/epoch-last.pth", weights_only=True)
    last["liif_cuda"]["best_val_psnr"] = 1e9  # nothing after the resume can beat it
    torch.save(last, f"{run}/epoch-last.pth")
    best_epoch = torch.load(f"{run}/epoch-best.pth", weights_only=True)["epoch"]
    train(tiny_config(images, epochs=3), run, resume=True, device="cpu", progress=False)
    assert torch.load(f"{run}/epoch-best.pth", weights_only=True)["epoch"] == best_epoch
    assert torch.load(f"{run}/epoch-last.pth", weights_only=True)["liif_cuda"]["best_val_psnr"] == 1e9



def test_resume_with_a_damaged_random_state_names_the_checkpoint(images, tmp_path):
    run = str(tmp_path / "run")
    train(tiny_config(images, epochs=1), run, device="cpu", progress=False)
    last = torch.load(f"{run}/epoch-last.pth", weights_only=True)
    last["liif_cuda"]["torch_rng"] = torch.zeros(3)  # not a generator's state
    torch.save(last, f"{run}/epoch-last.pth")
    with pytest.raises(ConfigError, match=r"--resume .*epoch-last\.pth: its saved random state "
                                          r"cannot be restored"):
        train(tiny_config(images, epochs=2), run, resume=True, device="cpu", progress=False)


def test_a_resume_restores_the_random_state_of_its_own_gpu_only(monkeypatch):
    """On CUDA only this process's GPU gets its saved state (setting every GPU's would open a
    context on each from every process); without a saved state for it, none."""
    from liif_cuda.training.trainer import restore_random_state
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, dev: calls.append((state, dev)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(states))
    extra = {"torch_rng": torch.get_rng_state(), "cuda_rng": ["gpu0", "gpu1", "gpu2"]}
    restore_random_state(extra, "here", torch.device("cuda", 1))
    assert calls == [("gpu1", torch.device("cuda", 1))]
    calls.clear()
    restore_random_state(extra, "here", torch.device("cuda", 3))
    restore_random_state(extra, "here", torch.device("cpu"))
    assert calls == []

# -- the recipe, sample by sample ---------------------------------------------------------------

def write_noise_images(folder, sizes, seed=0):
    """Random noise images (no two windows alike, under any flip or transpose)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")
    return folder


def read_float(path):
    array = np.array(Image.open(path).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def pillow_bicubic(x, h, w):
    """The original resize_fn, restated: 8 bits, Pillow bicubic to (h, w), back to [0, 1]."""
    array = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    out = np.array(Image.fromarray(array).resize((w, h), Image.BICUBIC))
    return torch.from_numpy(out).permute(2, 0, 1).float() / 255


def original_augment(x, hflip, vflip, dflip):
    """The original wrappers' augment, restated here rather than taken from datasets.py, so that a
    change there shows against it."""
    if hflip:
        x = x.flip(-2)
    if vflip:
        x = x.flip(-1)
    if dflip:
        x = x.transpose(-2, -1)
    return x


def undo_augment(x, hflip, vflip, dflip):
    if dflip:
        x = x.transpose(-2, -1)
    if vflip:
        x = x.flip(-1)
    if hflip:
        x = x.flip(-2)
    return x


FLIPS = [(h, v, d) for h in (False, True) for v in (False, True) for d in (False, True)]


def locate_patch(img, patch):
    """[(flips, x0, y0)]: where the un-augmented patch lies in img, for each augmentation."""
    found = []
    for flips in FLIPS:
        p = undo_augment(patch, *flips)
        h, w = p.shape[-2:]
        for x0 in range(img.shape[-2] - h + 1):
            for y0 in range(img.shape[-1] - w + 1):
                if torch.equal(img[:, x0:x0 + h, y0:y0 + w], p):
                    found.append((flips, x0, y0))
    return found


def whole_sample_check(sample, img, inp_size):
    """One sample of sr-implicit-downsampled without sample_q against the recipe: coord the HR
    patch's make_coord, cell (2 / h, 2 / w), gt the patch, which lies in the image (after one of
    the 8 augmentations) and whose Pillow bicubic, augmented the same way, is inp. Returns
    (flips, x0, y0, HR side)."""
    import liif_reference as ref
    h, w = (round(2 / c) for c in sample["cell"][0].tolist())
    assert torch.equal(sample["coord"], ref.make_coord((h, w)))
    assert torch.equal(sample["cell"], ref.make_cell(sample["coord"], (h, w)))
    hr = sample["gt"].view(h, w, 3).permute(2, 0, 1)
    where = locate_patch(img, hr)
    assert len(where) == 1, where
    flips, x0, y0 = where[0]
    hr0 = undo_augment(hr, *flips)
    lr = pillow_bicubic(hr0, inp_size, inp_size)
    assert torch.equal(sample["inp"], original_augment(lr, *flips))
    return flips, x0, y0, hr0.shape[-2]


def test_patches_augmentation_and_lr_follow_the_original_wrapper(tmp_path):
    """Each sample's HR patch is a window of its image (crops anywhere from 0 to H - w_hr and 0 to
    W - w_hr), its LR is that window's Pillow bicubic, and the same flips / transpose turn both."""
    root = write_noise_images(str(tmp_path / "noise"), [(14, 11)])
    img = read_float(os.path.join(root, "0.png"))
    spec = dataset_spec(root, repeat=80, inp_size=8, scale_max=1, sample_q=None)
    data = make_dataset(spec, seed=0)
    xs, ys, flips = set(), set(), set()
    for i in range(80):
        f, x0, y0, _ = whole_sample_check(data[i], img, 8)
        xs.add(x0), ys.add(y0), flips.add(f)
    assert xs == set(range(14 - 8 + 1)) and ys == set(range(11 - 8 + 1))
    assert flips == set(FLIPS)
    # Scales in [scale_min, scale_max]: HR patches of round(4 * s), LR their Pillow bicubic.
    root = write_noise_images(str(tmp_path / "noise2"), [(16, 15)], seed=1)
    img = read_float(os.path.join(root, "0.png"))
    spec = dataset_spec(root, repeat=40, inp_size=4, scale_max=3, sample_q=None)
    spec["wrapper"]["args"]["scale_min"] = 2
    data = make_dataset(spec, seed=0)
    sides = {whole_sample_check(data[i], img, 4)[3] for i in range(40)}
    assert min(sides) >= 8 and max(sides) <= 12 and len(sides) >= 4


def test_whole_image_samples_are_the_recipes(tmp_path):
    """inp_size None: LR floor(H / s), HR the image cropped to round(LR * s), cells (2 / H, 2 / W)
    of a non-square HR image, coords row-major as make_coord."""
    import liif_reference as ref
    root = write_noise_images(str(tmp_path / "noise"), [(40, 52)])
    img = read_float(os.path.join(root, "0.png"))
    spec = dataset_spec(root, repeat=1, augment=False, inp_size=None, scale_max=3, sample_q=None)
    spec["wrapper"]["args"]["scale_min"] = 3
    sample = make_dataset(spec, seed=0)[0]
    hr = img[:, :39, :51]
    assert torch.equal(sample["coord"], ref.make_coord((39, 51)))
    assert torch.equal(sample["cell"], ref.make_cell(sample["coord"], (39, 51)))
    assert torch.equal(sample["gt"], hr.permute(1, 2, 0).reshape(-1, 3))
    assert torch.equal(sample["inp"], pillow_bicubic(hr, 13, 17))


def test_sampled_queries_keep_their_colours(tmp_path):
    """With sample_q the queries are distinct pixels of the full sample, each with its own
    colour."""
    root = write_noise_images(str(tmp_path / "noise"), [(30, 26)])
    def spec(sample_q):
        return dataset_spec(root, repeat=8, inp_size=6, scale_max=3, sample_q=sample_q)
    full, some = make_dataset(spec(None), seed=2), make_dataset(spec(30), seed=2)
    for i in range(8):
        a, b = full[i], some[i]
        assert torch.equal(a["inp"], b["inp"])
        colour = {tuple(c): g for c, g in zip(a["coord"].tolist(), a["gt"])}
        coords = [tuple(c) for c in b["coord"].tolist()]
        assert len(set(coords)) == 30
        for c, g in zip(coords, b["gt"]):
            assert torch.equal(colour[c], g)


# -- the loop's cadence and order ---------------------------------------------------------------

def test_each_epoch_visits_every_sample_in_the_samplers_order(images, tmp_path, monkeypatch):
    """Epoch e reads every training sample once, in DistributedSampler's permutation for (seed, e),
    with the dataset set to epoch e (new crops each epoch)."""
    from liif_cuda.training import datasets
    seen = []
    real = datasets.SRImplicitDownsampled.__getitem__

    def recording(self, idx):
        if self.where == "train_dataset":
            seen.append((self.epoch, idx))
        return real(self, idx)
    monkeypatch.setattr(datasets.SRImplicitDownsampled, "__getitem__", recording)
    train(tiny_config(images, epochs=2), str(tmp_path / "run"), device="cpu", progress=False)
    n = 16  # 2 images x repeat 8
    for epoch in (1, 2):
        order = [idx for e, idx in seen if e == epoch]
        g = torch.Generator()
        g.manual_seed(0 + epoch)  # the run's seed (the config's default, 0) plus the epoch
        assert order == torch.randperm(n, generator=g).tolist()
    assert [e for e, _ in seen] == [1] * n + [2] * n


def test_epoch_val_and_epoch_save_cadence(images, tmp_path):
    run = str(tmp_path / "run")
    config = tiny_config(images, epochs=4)
    config["epoch_val"], config["epoch_save"] = 2, 3
    train(config, run, device="cpu", progress=False)
    assert [bool(r["val_psnr"]) for r in read_log(run)] == [False, True, False, True]
    assert sorted(f for f in os.listdir(run) if f.endswith(".pth")) == \
        ["epoch-3.pth", "epoch-best.pth", "epoch-last.pth"]


class _Fixed(torch.nn.Module):
    """A model whose normalised prediction is a function of the query coordinates."""
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def gen_feat(self, inp):
        pass

    def query_rgb(self, coord, cell):
        return self.fn(coord)


def test_validation_clamps_and_chunks_as_the_original():
    """Predictions are clamped to [0, 1] before the PSNR (as the original's eval_psnr), and an
    eval_bsize smaller than the queries gives the PSNR of one chunk."""
    coord = torch.rand(2, 50, 2) * 2 - 1
    gt = (coord.sum(-1, keepdim=True).expand(2, 50, 3) * 0.2 * 0.5 + 0.5)
    batch = {"inp": torch.zeros(2, 3, 4, 4), "coord": coord, "cell": torch.zeros(2, 50, 2),
             "gt": gt}
    right = _Fixed(lambda c: c.sum(-1, keepdim=True).expand(*c.shape[:2], 3) * 0.2)
    cpu = torch.device("cpu")
    assert validate(right, [batch], cpu, "fp32", 30000) == pytest.approx(120.0)
    assert validate(right, [batch], cpu, "fp32", 7) == pytest.approx(120.0)
    white = dict(batch, gt=torch.ones(2, 50, 3))
    too_bright = _Fixed(lambda c: torch.full((*c.shape[:2], 3), 3.0))  # 2.0 after denormalising
    assert validate(too_bright, [white], cpu, "fp32", 30000) == pytest.approx(120.0)


def test_normalise_batch_is_the_published_data_norm():
    batch = {"inp": torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone(),
             "coord": torch.zeros(1, 3, 2), "cell": torch.zeros(1, 3, 2),
             "gt": torch.tensor([[[0.0, 0.25, 1.0]] * 3])}
    out = normalise_batch(batch, "cpu")
    assert torch.equal(out["inp"][0, :, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(out["gt"][0, 0], torch.tensor([-1.0, -0.5, 1.0]))


def test_train_step_with_a_gradient_scaler():
    """fp16's GradScaler path of train_step (on the CPU's scaler): the step is the unscaled one, a
    step with non-finite gradients is skipped and halves the scale, and checkpoints keep it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = copy.deepcopy(model)

        def forward(self, inp, coord, cell):
            return self.lin(coord)
    batch = {"inp": torch.zeros(1, 3, 2, 2), "coord": torch.rand(1, 5, 2),
             "cell": torch.zeros(1, 5, 2), "gt": torch.rand(1, 5, 3)}
    plain, scaled = Tiny(), Tiny()
    train_step(plain, torch.optim.SGD(plain.parameters(), lr=0.1), batch)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = torch.optim.SGD(scaled.parameters(), lr=0.1)
    train_step(scaled, opt, batch, scaler=scaler)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b)
    assert scaler.get_scale() == 1024.0
    before = [p.detach().clone() for p in scaled.parameters()]
    bad = dict(batch, coord=torch.full((1, 5, 2), float("inf")))  # infinite gradients
    train_step(scaled, opt, bad, scaler=scaler)
    assert all(torch.equal(p, b) for p, b in zip(scaled.parameters(), before))
    assert scaler.get_scale() == 512.0
    # A checkpoint keeps the scaler's state: a resumed run goes on at the backed-off scale.
    checkpoint = make_checkpoint(scaled, {"args": {}}, opt, {"name": "sgd", "args": {"lr": 0.1}},
                                 None, scaler, 1, None, 0, precision="fp16")
    assert checkpoint["liif_cuda"]["scaler"] == scaler.state_dict()
    resumed = torch.amp.GradScaler("cpu", init_scale=1024.0)
    resumed.load_state_dict(checkpoint["liif_cuda"]["scaler"])
    assert resumed.get_scale() == 512.0


def test_init_with_resume_is_a_usage_error(images, tmp_path, capsys):
    import yaml

    from liif_cuda import cli
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(images, epochs=1)))
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--resume",
                     "--init", "edsr-baseline-liif", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["liif-cuda: error: --init and --resume exclude each other (--resume goes on "
                   "from the run's own last checkpoint)"], err
    assert not (tmp_path / "run").exists()


def test_a_config_written_in_the_run_folder_is_kept_as_written(images, tmp_path):
    """--config OUT/config.yaml: the run's config.yaml is that file, comments and layout included
    (it was replaced by its normalised dump); on --resume with it, too. A different config there
    is replaced."""
    import yaml
    run = tmp_path / "run"
    run.mkdir()
    text = "# my notes\n" + yaml.safe_dump(tiny_config(images, epochs=1), default_flow_style=True)
    (run / "config.yaml").write_text(text)
    train(load_config(str(run / "config.yaml")), str(run), device="cpu", progress=False)
    assert (run / "config.yaml").read_text() == text
    longer = text.replace("epoch_max: 1", "epoch_max: 2")
    assert longer != text
    (run / "config.yaml").write_text(longer)
    train(load_config(str(run / "config.yaml")), str(run), resume=True, device="cpu",
          progress=False)
    assert (run / "config.yaml").read_text() == longer
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text(text)
    config = tiny_config(images, epochs=1)
    config["optimizer"]["args"]["lr"] = 2.e-4
    train(config, str(other), device="cpu", progress=False)
    written = load_config(str(other / "config.yaml"))
    assert written["optimizer"]["args"]["lr"] == 2.e-4
    assert not (other / "config.yaml").read_text().startswith("# my notes")
