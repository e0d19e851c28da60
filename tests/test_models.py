"""The models through the fused op against the python/ reference models, and patch()."""

import copy
import io
import os

import numpy as np
import pytest
import torch
from conftest import OFFICIAL_WEIGHTS, SHARED, relative_error, requires_shared
from PIL import Image

import liif_cuda
import liif_reference as ref
import liif_reference_models as refm
from liif_cuda.models import LIIF, RDN, EDSRBaseline


def copy_into_reference(model, encoder="edsr", hidden=(16,)):
    """The original code's model with the model's weights and its three flags."""
    flags = {k: getattr(model, k) for k in ("local_ensemble", "feat_unfold", "cell_decode")}
    reference = refm.LIIF(refm.EDSR(n_resblocks=2, n_feats=8) if encoder == "edsr"
                          else refm.RDN(G0=8, D=2, C=2, G=4), hidden_list=list(hidden), **flags)
    missing, unexpected = reference.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("_mean" in k for k in missing)
    return reference.eval()


@pytest.mark.parametrize("encoder", ["edsr", "rdn"])
def test_encoders_and_model_match_reference(encoder):
    torch.manual_seed(0)
    enc = EDSRBaseline(n_resblocks=2, n_feats=8) if encoder == "edsr" else \
        RDN(g0=8, n_blocks=2, n_layers=2, growth=4)
    model = LIIF(enc, hidden_list=[16]).eval()
    reference = copy_into_reference(model, encoder)
    inp = torch.rand(2, 3, 10, 13)
    coord = torch.rand(2, 77, 2) * 2 - 1
    cell = torch.full((2, 77, 2), 0.03)
    with torch.no_grad():
        assert torch.equal(model.encoder(inp), reference.encoder(inp))
        assert relative_error(model(inp, coord, cell), reference(inp, coord, cell)) <= 1e-5


@pytest.mark.parametrize("flags", [
    dict(local_ensemble=False), dict(feat_unfold=False), dict(cell_decode=False),
    dict(local_ensemble=False, feat_unfold=False, cell_decode=False)])
def test_model_without_an_option_matches_reference(flags):
    """A model built without the local ensemble, the unfold or the cell: forward (query_rgb) as
    the original code's model built so."""
    torch.manual_seed(5)
    model = LIIF(EDSRBaseline(n_resblocks=2, n_feats=8), hidden_list=[16], **flags).eval()
    reference = copy_into_reference(model)
    inp = torch.rand(1, 3, 8, 9)
    coord = torch.rand(1, 60, 2) * 2 - 1
    cell = torch.full((1, 60, 2), 0.1)
    with torch.no_grad():
        assert relative_error(model(inp, coord, cell), reference(inp, coord, cell)) <= 1e-5


def test_receptive_radius_is_a_bound():
    """Changing one input pixel changes no feature farther than the stated radius, and some feature
    at that distance (the bound is tight)."""
    torch.manual_seed(1)
    for enc in (EDSRBaseline(n_resblocks=2, n_feats=4), RDN(g0=4, n_blocks=2, n_layers=2, growth=2)):
        x = torch.rand(1, 3, 41, 41)
        y = x.clone()
        y[0, :, 20, 20] += 1
        with torch.no_grad():
            diff = (enc(x) - enc(y)).abs().amax(dim=(0, 1))
        changed = torch.nonzero(diff > 0)
        reach = (changed - 20).abs().max().item()
        assert reach == enc.receptive_radius


def test_normalisations():
    model = LIIF(EDSRBaseline(n_resblocks=1, n_feats=4), hidden_list=[8],
                 normalisation="mmedit-edsr")
    img = torch.rand(1, 3, 2, 2)
    mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)
    assert torch.allclose(model.normalise(img), img - mean)
    assert torch.allclose(model.denormalise(torch.zeros(5, 3)), mean.view(1, 3).expand(5, 3))
    for name in ("original", "mmedit-rdn"):  # the original code's and mmediting's RDN: 0.5 / 0.5
        model = LIIF(EDSRBaseline(n_resblocks=1, n_feats=4), hidden_list=[8], normalisation=name)
        assert torch.allclose(model.normalise(img), (img - 0.5) / 0.5)
        assert torch.allclose(model.denormalise(torch.zeros(5, 3)), torch.full((5, 3), 0.5))
        assert torch.allclose(model.denormalise(torch.ones(5, 3)), torch.ones(5, 3))
    with pytest.raises(ValueError, match="normalisation must be one of"):
        LIIF(EDSRBaseline(n_resblocks=1, n_feats=4), normalisation="imagenet")


class MMEditStyleLIIF(torch.nn.Module):
    """mmediting's interface: query_rgb(feature, coord, cell=None)."""

    def __init__(self, reference):
        super().__init__()
        self.imnet = reference.imnet
        self.local_ensemble, self.feat_unfold, self.cell_decode = True, True, True

    def query_rgb(self, feature, coord, cell=None):
        return ref.query_rgb(feature, coord, cell, self.imnet)


def test_patch_original_and_mmedit_models():
    torch.manual_seed(2)
    reference = copy_into_reference(LIIF(EDSRBaseline(n_resblocks=2, n_feats=8), hidden_list=[16]))
    inp = torch.rand(1, 3, 8, 9)
    coord = torch.rand(1, 60, 2) * 2 - 1
    cell = torch.full((1, 60, 2), 0.1)
    with torch.no_grad():
        expected = reference(inp, coord, cell)
        feat = reference.feat
        mm = MMEditStyleLIIF(reference)
        expected_mm = mm.query_rgb(feat, coord, cell)
        assert liif_cuda.patch(reference) is reference
        assert relative_error(reference(inp, coord, cell), expected) <= 1e-5
        liif_cuda.patch(mm)
        assert relative_error(mm.query_rgb(feat, coord, cell), expected_mm) <= 1e-5
        reference.local_ensemble = False  # flags are read at every call
        expected = ref.query_rgb(feat, coord, cell, reference.imnet, local_ensemble=False)
        assert relative_error(reference.query_rgb(coord, cell), expected) <= 1e-5


@pytest.mark.parametrize("flags", [
    dict(feat_unfold=False), dict(cell_decode=False),
    dict(feat_unfold=False, cell_decode=False, local_ensemble=False)])
def test_patch_takes_every_flag_from_the_model(flags):
    """A model of the original code built without feat_unfold or cell_decode: the patched query
    uses the model's flags (and its MLP's narrower input), and gives the unpatched outputs."""
    torch.manual_seed(3)
    reference = refm.LIIF(refm.EDSR(n_resblocks=2, n_feats=8), hidden_list=[16], **flags).eval()
    inp = torch.rand(1, 3, 8, 9)
    coord = torch.rand(1, 60, 2) * 2 - 1
    cell = torch.full((1, 60, 2), 0.1)
    with torch.no_grad():
        expected = reference(inp, coord, cell)
        liif_cuda.patch(reference)
        assert relative_error(reference(inp, coord, cell), expected) <= 1e-5


def test_patched_model_under_autocast_returns_float32_as_the_original():
    """Under autocast the original query_rgb returns float32 (its blend multiplies bf16
    predictions by float32 areas); so does the patched model, with its error against float32 at
    most that of the original under the same autocast."""
    torch.manual_seed(4)
    model = copy_into_reference(LIIF(EDSRBaseline(n_resblocks=2, n_feats=8), hidden_list=[16, 16]),
                                hidden=(16, 16))
    inp = torch.rand(1, 3, 8, 9)
    coord = torch.rand(1, 60, 2) * 2 - 1
    cell = torch.full((1, 60, 2), 0.1)
    with torch.no_grad():
        exact = model(inp, coord, cell)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            original = model(inp, coord, cell)
            patched = liif_cuda.patch(copy.deepcopy(model))(inp, coord, cell)
    assert original.dtype == patched.dtype == torch.float32
    assert relative_error(patched, exact) <= 1.5 * relative_error(original, exact)
    assert relative_error(patched, exact) > 1e-4  # bf16 really ran


def test_patch_an_mmagic_editor_patches_its_generator():
    """mmagic's editor (class LIIF, a BaseEditModel) and mmediting's restorer hold the LIIF net as
    .generator and have no query_rgb of their own."""
    reference = copy_into_reference(LIIF(EDSRBaseline(n_resblocks=2, n_feats=8), hidden_list=[16]))
    editor = torch.nn.Module()
    editor.generator = MMEditStyleLIIF(reference)
    assert liif_cuda.patch(editor) is editor
    assert type(editor.generator)._liif_cuda_patched


def test_patch_rejects_non_liif():
    with pytest.raises(TypeError, match="^Linear has no query_rgb method: not a LIIF model$"):
        liif_cuda.patch(torch.nn.Linear(2, 2))
    wrapped = torch.nn.DataParallel(copy_into_reference(LIIF(EDSRBaseline(n_resblocks=2, n_feats=8),
                                                             hidden_list=[16])))
    with pytest.raises(TypeError, match=r"^DataParallel has no query_rgb method: not a LIIF model "
                                        r"\(it wraps a LIIF model as .module: patch\(model.module\)"):
        liif_cuda.patch(wrapped)
    model = MMEditStyleLIIF(copy_into_reference(LIIF(EDSRBaseline(n_resblocks=2, n_feats=8),
                                                     hidden_list=[16])))
    model.imnet = None
    with pytest.raises(TypeError, match="imnet"):
        liif_cuda.patch(model)

    class TanhMLP(torch.nn.Module):  # a forward the fused op would leave out
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return torch.tanh(self.layers(x))

    model.imnet = TanhMLP(torch.nn.Sequential(torch.nn.Linear(8 * 9 + 4, 16), torch.nn.ReLU(),
                                              torch.nn.Linear(16, 3)))
    with pytest.raises(TypeError, match="^MMEditStyleLIIF.imnet: TanhMLP defines its own forward"):
        liif_cuda.patch(model)
    assert not getattr(type(model), "_liif_cuda_patched", False)
    # Named as LIIF's MLP, as a fork of LIIF names its MLP with an output activation: the name
    # lets nothing through.
    TanhMLP.__name__ = TanhMLP.__qualname__ = "MLP"
    with pytest.raises(TypeError, match="^MMEditStyleLIIF.imnet: MLP defines its own forward"):
        liif_cuda.patch(model)
    assert not getattr(type(model), "_liif_cuda_patched", False)

    model = MMEditStyleLIIF(copy_into_reference(LIIF(EDSRBaseline(n_resblocks=2, n_feats=8),
                                                     hidden_list=[16])))
    del model.cell_decode  # the query reads the three flags at every call: refused at patch time
    with pytest.raises(TypeError, match=r"lacks the LIIF flags \['cell_decode'\]"):
        liif_cuda.patch(model)
    assert not getattr(type(model), "_liif_cuda_patched", False)


def test_copies_of_a_patched_model_query_their_own_features_and_mlp():
    """copy.deepcopy, nn.DataParallel's replicas and torch.save / torch.load of the whole model keep
    the fused query, on the copy's own features and MLP (a closure stored on the instance would
    query the original model's)."""
    torch.manual_seed(3)
    model = copy_into_reference(LIIF(EDSRBaseline(n_resblocks=2, n_feats=8), hidden_list=[16]))
    patched_class = type(liif_cuda.patch(model))
    assert isinstance(model, refm.LIIF) and patched_class.__name__ == "LIIF"
    inp, other = torch.rand(1, 3, 8, 9), torch.rand(1, 3, 8, 9)
    coord = torch.rand(1, 60, 2) * 2 - 1
    cell = torch.full((1, 60, 2), 0.1)

    def expected(m, x):
        return ref.query_rgb(m.encoder(x), coord, cell, m.imnet)

    with torch.no_grad():
        clone = copy.deepcopy(model)
        clone.imnet.layers[0].weight.add_(0.5)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        model(inp, coord, cell)  # model.feat is now inp's: no copy may read it
        replica = model._replicate_for_data_parallel()  # what nn.DataParallel does per device
        for m, x in ((clone, other), (loaded, other), (replica, other), (model, inp)):
            assert type(m) is patched_class
            assert relative_error(m(x, coord, cell), expected(m, x)) <= 1e-5
        assert relative_error(clone(inp, coord, cell), expected(model, inp)) > 1e-2
        assert liif_cuda.patch(clone) is clone and type(clone) is patched_class


def test_patch_refuses_a_query_rgb_set_on_the_instance():
    model = copy_into_reference(LIIF(EDSRBaseline(n_resblocks=2, n_feats=8), hidden_list=[16]))
    model.query_rgb = model.query_rgb
    with pytest.raises(TypeError, match="query_rgb set on the instance"):
        liif_cuda.patch(model)


def set5_images():
    folder = os.path.join(SHARED, "data", "Set5")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


@requires_shared
@pytest.mark.parametrize("scale", [4, 2.7])
def test_official_model_on_set5_matches_reference(scale):
    """Official weights on every Set5 image (centre 120x120 crops, LR by Pillow bicubic): the fused
    model's output equals the reference model's within 1e-5 relative."""
    ours = liif_cuda.load_model(OFFICIAL_WEIGHTS)
    theirs = refm.load_original(OFFICIAL_WEIGHTS)
    for path in set5_images():
        hr = Image.open(path).convert("RGB")
        left, top = (hr.width - 120) // 2, (hr.height - 120) // 2
        hr = hr.crop((left, top, left + 120, top + 120))
        lr_size = round(120 / scale)
        lr = hr.resize((lr_size, lr_size), Image.BICUBIC)
        x = torch.from_numpy(np.array(lr)).permute(2, 0, 1).float().div(255).unsqueeze(0)
        expected = refm.upscale_reference(theirs, x, 120, 120)
        out = liif_cuda.upscale(x[0], size=(120, 120), model=ours)
        assert relative_error(out, expected[0]) <= 1e-5, path
