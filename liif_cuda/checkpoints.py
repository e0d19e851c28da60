"""Reading LIIF checkpoints: the original format, mmediting's two layouts and mmagic 1.x (spec section 5).

The layout is detected from the keys, every state dict is renamed to the original code's names (those of
liif_cuda.models), the architecture is inferred from the tensor shapes, and the model is built and loaded
strictly: a missing or unexpected key is an error that names the layout and the keys, and nothing
half-loaded is returned. Files are opened with `torch.load(weights_only=True)` only.
"""

import re

import torch

from .models import LIIF, RDN, EDSRBaseline


class CheckpointError(ValueError):
    """A file that is not a LIIF checkpoint of a known layout, or one whose keys do not fit it."""


# Layout names, as reported to users.
ORIGINAL = "original LIIF"
MMEDIT_OLD = "mmediting 0.x before July 2021"
MMEDIT_NEW = "mmediting 0.x from July 2021"
MMAGIC = "mmagic 1.x"

# mmediting/mmagic -> original names. EDSR: conv_first -> head.0, body.i.conv1/conv2 ->
# body.i.body.0/2, conv_after_body -> body.16. RDN: sfe1/sfe2 -> SFENet1/2, rdbs.i.layers.j.conv ->
# RDBs.i.convs.j.conv.0, rdbs.i.lff -> RDBs.i.LFF, gff -> GFF.
_MM_RENAMES = [
    (r"^conv_first\.", "encoder.head.0."),
    (r"^body\.(\d+)\.conv1\.", r"encoder.body.\1.body.0."),
    (r"^body\.(\d+)\.conv2\.", r"encoder.body.\1.body.2."),
    (r"^sfe1\.", "encoder.SFENet1."),
    (r"^sfe2\.", "encoder.SFENet2."),
    (r"^rdbs\.(\d+)\.layers\.(\d+)\.conv\.", r"encoder.RDBs.\1.convs.\2.conv.0."),
    (r"^rdbs\.(\d+)\.lff\.", r"encoder.RDBs.\1.LFF."),
    (r"^gff\.", "encoder.GFF."),
    (r"^imnet\.", "imnet."),
]
# mmediting before July 2021 (EDSR only): head, encoder.0.i (blocks), encoder.1 (conv after body).
_MM_OLD_RENAMES = [
    (r"^head\.0\.", "encoder.head.0."),
    (r"^head\.(weight|bias)$", r"encoder.head.0.\1"),
    (r"^encoder\.0\.(\d+)\.conv1\.", r"encoder.body.\1.body.0."),
    (r"^encoder\.0\.(\d+)\.conv2\.", r"encoder.body.\1.body.2."),
    (r"^imnet\.", "imnet."),
]
# The original EDSR's mean-shift convs, which LIIF's forward never applies.
_UNUSED_ORIGINAL = re.compile(r"^encoder\.(sub_mean|add_mean)\.")
# mmagic's data preprocessor holds the normalisation (times 255), not weights.
_PREPROCESSOR = re.compile(r"^data_preprocessor\.")


def _rename(state, rules, layout):
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            if re.match(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise CheckpointError(f"checkpoint looks like the {layout} layout but has the unexpected "
                                  f"key {key!r}")
    return out


def _count(state, pattern):
    found = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def _unwrap(obj, source):
    """The state dict, the layout name and the original-format model args (or None)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} is not a LIIF checkpoint (a {type(obj).__name__}, not a dict)")
    if isinstance(obj.get("model"), dict) and "sd" in obj["model"]:
        model = obj["model"]
        if model.get("name") != "liif":
            raise CheckpointError(f"{source} is an original-format checkpoint of model "
                                  f"{model.get('name')!r}, not 'liif'")
        return dict(model["sd"]), ORIGINAL, model.get("args", {})
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{source} is not a LIIF checkpoint: no 'model' entry (original format) "
                              f"and no state dict (mmediting/mmagic)")
    keys = list(state)
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    mmagic_meta = any("mmagic" in str(k).lower() or "mmengine" in str(k).lower() for k in meta)
    if any(_PREPROCESSOR.match(k) for k in keys) or mmagic_meta:
        return state, MMAGIC, None
    if any(k.startswith("generator.") for k in keys):
        return state, MMEDIT_NEW, None
    if any(k.startswith("head.") or k.startswith("encoder.0.") for k in keys):
        return state, MMEDIT_OLD, None
    raise CheckpointError(f"{source} is not a LIIF checkpoint of a known layout; its first keys are "
                          f"{keys[:5]}")


def to_original_names(obj, source="checkpoint"):
    """(state dict with the original code's names, layout, original args or None, normalisation)."""
    state, layout, args = _unwrap(obj, source)
    if layout == ORIGINAL:
        state = {k: v for k, v in state.items() if not _UNUSED_ORIGINAL.match(k)}
        return state, layout, args, "original"
    preprocessor = {k: v for k, v in state.items() if _PREPROCESSOR.match(k)}
    state = {k: v for k, v in state.items() if not _PREPROCESSOR.match(k)}
    if layout == MMEDIT_OLD:
        # The conv after the residual blocks is body.<number of blocks> in the original names.
        n_blocks = _count(state, r"^encoder\.0\.(\d+)\.conv1\.weight$")
        state = _rename(state, _MM_OLD_RENAMES + [(r"^encoder\.1\.", f"encoder.body.{n_blocks}.")],
                        layout)
    else:
        if not all(k.startswith("generator.") for k in state):
            odd = [k for k in state if not k.startswith("generator.")][:5]
            raise CheckpointError(f"checkpoint looks like the {layout} layout but has keys outside "
                                  f"'generator.': {odd}")
        state = {k[len("generator."):]: v for k, v in state.items()}
        n_blocks = _count(state, r"^body\.(\d+)\.conv1\.weight$")
        state = _rename(state, _MM_RENAMES + [(r"^conv_after_body\.", f"encoder.body.{n_blocks}.")],
                        layout)
    is_rdn = any(k.startswith("encoder.SFENet1.") for k in state)
    normalisation = "mmedit-rdn" if is_rdn else "mmedit-edsr"
    if preprocessor and not is_rdn:
        mean = preprocessor.get("data_preprocessor.mean")
        if mean is not None and not torch.allclose(mean.flatten().double() / 255,
                                                   torch.tensor([0.4488, 0.4371, 0.4040],
                                                                dtype=torch.float64), atol=1e-4):
            raise CheckpointError(f"{source}: unsupported data_preprocessor.mean {mean.flatten()}")
    return state, layout, None, normalisation


def _infer_model(state, layout, args, normalisation, source):
    """Builds the (uninitialised) model the renamed state dict describes."""
    def shape(key):
        if key not in state:
            raise CheckpointError(f"checkpoint looks like the {layout} layout but misses {key!r}")
        return tuple(state[key].shape)

    if any(k.startswith("encoder.SFENet1.") for k in state):
        g0 = shape("encoder.SFENet1.weight")[0]
        n_blocks = _count(state, r"^encoder\.RDBs\.(\d+)\.LFF\.weight$")
        n_layers = _count(state, r"^encoder\.RDBs\.0\.convs\.(\d+)\.conv\.0\.weight$")
        growth = shape("encoder.RDBs.0.convs.0.conv.0.weight")[0]
        encoder = RDN(g0=g0, n_blocks=n_blocks, n_layers=n_layers, growth=growth)
    elif any(k.startswith("encoder.head.0.") for k in state):
        n_feats = shape("encoder.head.0.weight")[0]
        n_blocks = _count(state, r"^encoder\.body\.(\d+)\.body\.0\.weight$")
        encoder = EDSRBaseline(n_resblocks=n_blocks, n_feats=n_feats)
    else:
        raise CheckpointError(f"checkpoint looks like the {layout} layout but has no known encoder "
                              f"(EDSR-baseline or RDN) weights")
    n_linear = _count(state, r"^imnet\.layers\.(\d+)\.weight$")
    if n_linear == 0:
        raise CheckpointError(f"checkpoint looks like the {layout} layout but misses the MLP "
                              f"'imnet.layers.*'")
    linears = [shape(f"imnet.layers.{2 * i}.weight") for i in range((n_linear + 1) // 2)]
    in_dim = linears[0][1]
    hidden = [w[0] for w in linears[:-1]]
    out_dim = linears[-1][0]
    imnet_args = (args or {}).get("imnet_spec", {}).get("args", {})
    flags = {k: (args or {}).get(k, True) for k in ("local_ensemble", "feat_unfold", "cell_decode")}
    c = encoder.out_dim
    # The MLP's input width tells feat_unfold and cell_decode apart where args do not say them.
    by_width = {c * 9 + 4: (True, True), c * 9 + 2: (True, False), c + 4: (False, True),
                c + 2: (False, False)}
    if in_dim not in by_width:
        raise CheckpointError(f"{source}: the MLP takes {in_dim} inputs, which fits no LIIF variant "
                              f"of a {c}-channel encoder")
    if args is None:
        flags["feat_unfold"], flags["cell_decode"] = by_width[in_dim]
    if imnet_args.get("hidden_list") not in (None, hidden):
        raise CheckpointError(f"{source}: args say hidden_list {imnet_args['hidden_list']}, the "
                              f"weights have {hidden}")
    return LIIF(encoder, hidden_list=hidden, out_dim=out_dim, normalisation=normalisation, **flags)


def model_from_checkpoint(obj, source="checkpoint"):
    """A LIIF model (on the CPU, in eval mode) from a loaded checkpoint object of any known layout."""
    state, layout, args, normalisation = to_original_names(obj, source)
    model = _infer_model(state, layout, args, normalisation, source)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source} looks like the {layout} layout but does not fit the model: "
                              f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source} ({layout} layout): {key} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)
    model.layout = layout
    return model.eval()


def read_checkpoint(path):
    """torch.load with weights_only=True, with errors that say what went wrong."""
    # torch.save writes a zip archive (a pickle before PyTorch 1.6); for anything else (an image
    # given as --model, say) torch.load's message would suggest weights_only=False.
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither the zip archive nor "
                              f"the pickle that torch.save writes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # unpickling errors of every kind
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint with weights_only=True "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                              ) from None
