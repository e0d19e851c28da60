"""Reading LIIF checkpoints: the original format, mmediting's two layouts and mmagic 1.x (spec section 5).

The layout is detected from the keys, every state dict is renamed to the original code's names (those of
liif_cuda.models), the architecture is inferred from the tensor shapes, and the model is built and loaded
strictly: a missing or unexpected key is an error that names the layout and the keys, and nothing
half-loaded is returned. Files are opened with `torch.load(weights_only=True)` only.
"""

import ast
import re
import warnings

import torch

from ._query import QUERY_FLAGS
from .models import LIIF, RDN, EDSRBaseline
from .models.liif import NORMALISATIONS


class CheckpointError(ValueError):
    """A file that is not a LIIF checkpoint of a known layout, or one whose keys do not fit it."""


# Layout names, as reported to users.
ORIGINAL = "original LIIF"
MMEDIT_OLD = "mmediting 0.x before July 2021"
MMEDIT_NEW = "mmediting 0.x from July 2021"
MMAGIC = "mmagic 1.x"
MM_GENERATOR = "mmediting 0.x / mmagic 1.x"  # generator.* keys, no meta that says which
MM_NET = "mmediting / mmagic LIIF net"  # the net's own state dict, without the generator. prefix

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
        mmedit_meta = any("mmedit" in str(k).lower() for k in meta)
        return state, MMEDIT_NEW if mmedit_meta else MM_GENERATOR, None
    if any(k.startswith("head.") or k.startswith("encoder.0.") for k in keys):
        return state, MMEDIT_OLD, None
    if (any(k.startswith(("conv_first.", "sfe1.")) for k in keys)
            and any(k.startswith("imnet.") for k in keys)):
        return state, MM_NET, None
    raise CheckpointError(f"{source} is not a LIIF checkpoint of a known layout; its first keys are "
                          f"{keys[:5]}")


def _config_text(obj):
    """The training config an mmediting / mmagic checkpoint keeps in its meta (mmcv's runner:
    'config', mmengine's: 'cfg'; the config as Python text), or None."""
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return next((meta[k] for k in ("cfg", "config") if isinstance(meta.get(k), str)), None)


def _number(node):
    """A number of a config's syntax tree, or numbers combined with + - * / (0.4488 * 255)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_number(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
        a, b = _number(node.left), _number(node.right)
        return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b,
                ast.Div: a / b if b else float("nan")}[type(node.op)]
    raise ValueError("not a number")


def _pairs(node):
    """(name, value node) of a dict(...) call or a {...} literal."""
    if isinstance(node, ast.Call):
        return [(k.arg, k.value) for k in node.keywords if k.arg]
    if isinstance(node, ast.Dict):
        return [(k.value, v) for k, v in zip(node.keys, node.values)
                if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return []


# mmcv's Config.text, which mmediting 0.x's tools/train.py keeps, is each file of the config (its
# _base_ files first) as its path on a line of its own and then its text.
_CONFIG_PATH_LINE = re.compile(r"^[^=#'\"()\[\]{}]+\.(py|json|ya?ml)$")  # spaces allowed


def config_settings(text, source="checkpoint"):
    """What an mmediting / mmagic config says of the model that its weights do not: the flags, and
    the normalisation as (mean, std) on [0, 1] (mmagic's data_preprocessor on 0-255, mmediting
    0.x's rgb_mean / rgb_std). Read from the syntax tree, nothing of it run. Of a config kept as
    its files (mmcv's Config.text), a later file's settings replace its _base_ files', as mmcv
    merges them."""
    settings, segment = {}, []
    for line in text.splitlines() + [None]:
        if line is None or _CONFIG_PATH_LINE.match(line.strip()):
            settings.update(_file_settings("\n".join(segment), source))
            segment = []
        else:
            segment.append(line)
    return settings


def _file_settings(text, source):
    """config_settings of one config file's text; {} for text that is not Python (a JSON or YAML
    file of the config)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return {}
    found = {}
    for node in ast.walk(tree):
        for name, value in _pairs(node):
            if name in QUERY_FLAGS and isinstance(value, ast.Constant) and isinstance(value.value, bool):
                found.setdefault(name, set()).add(value.value)
            elif name in ("rgb_mean", "rgb_std", "data_preprocessor"):
                inner = _pairs(value) if name == "data_preprocessor" else [(name, value)]
                for key, numbers in inner:
                    if key in ("mean", "std", "rgb_mean", "rgb_std") and isinstance(
                            numbers, (ast.List, ast.Tuple)):
                        try:
                            values = [_number(e) for e in numbers.elts]
                        except ValueError:
                            continue
                        scale = 255.0 if name == "data_preprocessor" else 1.0
                        found.setdefault(key.replace("rgb_", ""), set()).add(
                            tuple(round(v / scale, 6) for v in values))
    for name, values in found.items():
        if len(values) > 1:
            raise CheckpointError(f"{source}: its config gives {name} several values "
                                  f"({sorted(values)}), so the model it describes is unclear")
    return {name: values.pop() for name, values in found.items()}


def _normalisation_named(mean, std, is_rdn, source):
    """The name in NORMALISATIONS of a config's (mean, std), preferring the encoder's own."""
    def same(a, b):
        a = a * 3 if len(a) == 1 else a
        return len(a) == len(b) and all(abs(x - y) <= 1e-4 for x, y in zip(a, b))

    preferred = ["mmedit-rdn", "original", "mmedit-edsr"] if is_rdn else \
        ["mmedit-edsr", "original", "mmedit-rdn"]
    for name in preferred:
        if same(mean, NORMALISATIONS[name][0]) and same(std, NORMALISATIONS[name][1]):
            return name
    raise CheckpointError(f"{source}: its config normalises with mean {list(mean)} and std "
                          f"{list(std)}, which liif_cuda's models do not support (they support "
                          f"{', '.join(sorted({f'{m} / {s}' for m, s in NORMALISATIONS.values()}))})")


def to_original_names(obj, source="checkpoint"):
    """(state dict with the original code's names, layout, args, normalisation): args are the original
    format's model args, or for mmediting / mmagic the flags their config states."""
    state, layout, args = _unwrap(obj, source)
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(f"{source} looks like the {layout} layout but its {odd!r} is a "
                              f"{type(state[odd]).__name__}, not a tensor")
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
        prefix = "" if layout == MM_NET else "generator."
        if not all(k.startswith(prefix) for k in state):
            odd = [k for k in state if not k.startswith(prefix)][:5]
            raise CheckpointError(f"checkpoint looks like the {layout} layout but has keys outside "
                                  f"'{prefix}': {odd}")
        state = {k[len(prefix):]: v for k, v in state.items()}
        n_blocks = _count(state, r"^body\.(\d+)\.conv1\.weight$")
        state = _rename(state, _MM_RENAMES + [(r"^conv_after_body\.", f"encoder.body.{n_blocks}.")],
                        layout)
    is_rdn = any(k.startswith("encoder.SFENet1.") for k in state)
    normalisation = "mmedit-rdn" if is_rdn else "mmedit-edsr"
    text = _config_text(obj)
    settings = config_settings(text, source) if text is not None else {}
    for key in ("mean", "std"):  # a data preprocessor's buffers, where a state dict kept them
        tensor = preprocessor.get(f"data_preprocessor.{key}")
        if key not in settings and tensor is not None:
            settings[key] = tuple((tensor.flatten().double() / 255).tolist())
    assumed = []
    if "mean" in settings or "std" in settings:
        mean, std = (settings.get(k, NORMALISATIONS[normalisation][i])
                     for i, k in enumerate(("mean", "std")))
        normalisation = _normalisation_named(mean, std, is_rdn, source)
    else:
        assumed.append(f"the {normalisation} normalisation")
    flags = {k: settings[k] for k in QUERY_FLAGS if k in settings}
    if "local_ensemble" not in flags:
        # The weights are the same with and without the local ensemble: only a config can say.
        assumed.insert(0, "local_ensemble=True")
    if assumed:
        warnings.warn(f"{source}: no config in the checkpoint's meta says how the model was "
                      f"trained; loading it with {' and '.join(assumed)}, as the published "
                      f"models", stacklevel=3)
    return state, layout, flags, normalisation


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
    flags = {k: (args or {}).get(k, True) for k in QUERY_FLAGS}
    c = encoder.out_dim
    # The MLP's input width tells feat_unfold and cell_decode, which args (or a config) may also say.
    by_width = {c * 9 + 4: (True, True), c * 9 + 2: (True, False), c + 4: (False, True),
                c + 2: (False, False)}
    if in_dim not in by_width:
        raise CheckpointError(f"{source}: the MLP takes {in_dim} inputs, which fits no LIIF variant "
                              f"of a {c}-channel encoder")
    for name, value in zip(("feat_unfold", "cell_decode"), by_width[in_dim]):
        if name in (args or {}) and bool(args[name]) != value:
            said = "args say" if layout == ORIGINAL else "config says"
            raise CheckpointError(f"{source}: its {said} {name}={args[name]}, but its MLP's "
                                  f"{in_dim} inputs are those of {name}={value}")
        flags[name] = value
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


class UnreadObject:
    """Stands for an object of a checkpoint that weights_only does not allow (mmengine's message
    hub: its history buffers and numpy values): made from nothing of the file, it runs nothing.
    `global_name` says what the file held there."""

    global_name = "?"

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<unread {self.global_name}>"


def _refused_globals(path):
    """The globals torch.load(weights_only=True) refuses in the file ([] if this torch cannot say)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # older torch, or a file it cannot list
        return []


def _load_with_placeholders(path, names):
    """torch.load(weights_only=True) with the globals `names` read as UnreadObjects. torch still
    refuses the modules it blocks (os, subprocess, builtins' eval, ...), whatever is allowed."""
    stand_ins = [(type(name.rsplit(".", 1)[-1], (UnreadObject,), {"global_name": name}), name)
                 for name in names]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True)


def _global_refused_in(error):
    """The global a weights_only error names ("... GLOBAL numpy.dtype ..."), or None. A builtin
    comes without its module ("GLOBAL getattr": mmengine's history buffers pickle methods so)."""
    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    if named is None:
        return None
    return named.group(1) if "." in named.group(1) else f"builtins.{named.group(1)}"


def read_checkpoint(path):
    """torch.load with weights_only=True, with errors that say what went wrong. Objects it would
    refuse (mmengine's checkpoints keep some beside the weights) are read as UnreadObjects."""
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
        error = exc
    # The refused globals: listed up front for zip files; for the older format (mmagic's
    # publish_model.py writes it) one by one from the errors. Each try adds one or stops.
    names, tried = list(_refused_globals(path)), None
    while True:
        refused = _global_refused_in(error)
        if refused is not None and refused not in names:
            names.append(refused)
        if not names or names == tried:
            break
        tried = list(names)
        try:
            return _load_with_placeholders(path, names)
        except Exception as exc:
            error = exc
    if names:
        raise CheckpointError(f"{path} cannot be read with weights_only=True: it holds "
                              f"{refused or ', '.join(names)}, which liif_cuda does not load (a "
                              f"checkpoint of weights has no use for it)") from None
    first = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint with weights_only=True "
                          f"({type(error).__name__}: {first[0] if first else ''})") from None
