"""Training configs in the original LIIF code's YAML schema (spec section 8.1), checked strictly: an
unknown key or name is an error naming it, so that a typo cannot silently train something else."""

import copy
import difflib
import math
import os

from .._query import QUERY_FLAGS

PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the key and what was expected."""


class TrainingError(RuntimeError):
    """A run that cannot start or go on (existing checkpoints, nothing to resume, unreadable
    training images, a checkpoint that cannot be written, ...)."""


# Each dict maps an allowed key to whether it is required.
TOP_LEVEL = {"train_dataset": True, "val_dataset": False, "data_norm": False, "model": True,
             "optimizer": True, "epoch_max": True, "multi_step_lr": False, "epoch_val": False,
             "epoch_save": False, "resume": False, "eval_type": False, "eval_bsize": False,
             "seed": False}
DATASET_SPEC = {"dataset": True, "wrapper": True, "batch_size": True}
DATASETS = {
    "image-folder": {"root_path": True, "split_file": False, "split_key": False, "first_k": False,
                     "repeat": False, "cache": False},
    "paired-image-folders": {"root_path_1": True, "root_path_2": True, "split_file": False,
                             "split_key": False, "first_k": False, "repeat": False,
                             "cache": False},
}
WRAPPERS = {
    "sr-implicit-downsampled": {"inp_size": False, "scale_min": False, "scale_max": False,
                                "augment": False, "sample_q": False},
    "sr-implicit-paired": {"inp_size": False, "augment": False, "sample_q": False},
}
MODEL_ARGS = {"encoder_spec": True, "imnet_spec": True, "local_ensemble": False,
              "feat_unfold": False, "cell_decode": False}
ENCODERS = {
    "edsr-baseline": {"n_resblocks": False, "n_feats": False, "res_scale": False, "scale": False,
                      "no_upsampling": False, "rgb_range": False},
    "rdn": {"G0": False, "RDNkSize": False, "RDNconfig": False, "scale": False,
            "no_upsampling": False},
}
OPTIMIZERS = {"adam": {"lr": True, "betas": False, "eps": False, "weight_decay": False},
              "sgd": {"lr": True, "momentum": False, "weight_decay": False, "nesterov": False}}
CACHES = ("none", "in_memory")


def _mapping(value, where):
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _keys(value, allowed, where):
    _mapping(value, where)
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            guess = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"unknown key {where}.{key} ({guess}allowed: {', '.join(allowed)})")
    for key, required in allowed.items():
        if required and key not in value:
            raise ConfigError(f"{where}.{key} is missing")


def _named(spec, choices, where):
    """A `{name, args}` spec whose name is one of `choices` (a dict name -> allowed args)."""
    _keys(spec, {"name": True, "args": False}, where)
    name = spec["name"]
    if name not in choices:
        raise ConfigError(f"{where}.name: unknown {name!r} (known: {', '.join(choices)})")
    args = spec.get("args") or {}
    _keys(args, choices[name], f"{where}.args")
    return name, args


def _number(value, where, kind=float, minimum=None, allow_none=False, above=None):
    """A finite int (kind=int) or int/float, >= minimum and > above where given."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not isinstance(value, int)) or (
            isinstance(value, float) and not math.isfinite(value)):
        hint = ""
        if kind is float and isinstance(value, str) and "e" in value.lower():
            try:
                float(value)
                hint = " (in YAML write 1.e-4, not 1e-4, which PyYAML reads as a string)"
            except ValueError:
                pass
        raise ConfigError(f"{where} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r}{hint}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where} must be >= {minimum}, got {value!r}")
    if above is not None and value <= above:
        raise ConfigError(f"{where} must be > {above}, got {value!r}")
    return value


def _flag(value, where):
    # A quoted "false" would otherwise count as true.
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _positive_ints(value, where, what):
    # Lists only: YAML gives lists, and the run's config.yaml (yaml.safe_dump) cannot hold tuples.
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ConfigError(f"{where} must be a list of positive integers ({what}), got {value!r}")
    return value


def _check_dataset(spec, where):
    _keys(spec, DATASET_SPEC, where)
    name, args = _named(spec["dataset"], DATASETS, f"{where}.dataset")
    wrapper, wargs = _named(spec["wrapper"], WRAPPERS, f"{where}.wrapper")
    _number(spec["batch_size"], f"{where}.batch_size", int, 1)
    if args.get("cache", "none") not in CACHES:
        raise ConfigError(f"{where}.dataset.args.cache must be one of {CACHES} (the original's "
                          f"'bin' cache is not supported), got {args['cache']!r}")
    _number(args.get("first_k"), f"{where}.dataset.args.first_k", int, 1, allow_none=True)
    _number(args.get("repeat", 1), f"{where}.dataset.args.repeat", int, 1)
    if (name == "paired-image-folders") != (wrapper == "sr-implicit-paired"):
        raise ConfigError(f"{where}: wrapper {wrapper!r} does not go with dataset {name!r} "
                          f"(sr-implicit-paired takes paired-image-folders, "
                          f"sr-implicit-downsampled takes image-folder)")
    _number(wargs.get("inp_size"), f"{where}.wrapper.args.inp_size", int, 1, allow_none=True)
    sample_q = _number(wargs.get("sample_q"), f"{where}.wrapper.args.sample_q", int, 1,
                       allow_none=True)
    _flag(wargs.get("augment", False), f"{where}.wrapper.args.augment")
    scale_min = _number(wargs.get("scale_min", 1), f"{where}.wrapper.args.scale_min", float, 1)
    scale_max = _number(wargs.get("scale_max", scale_min), f"{where}.wrapper.args.scale_max")
    if scale_max < scale_min:
        raise ConfigError(f"{where}.wrapper.args.scale_max ({scale_max}) is below scale_min "
                          f"({scale_min})")
    inp_size = wargs.get("inp_size")
    if wrapper == "sr-implicit-downsampled" and inp_size is not None and sample_q is not None:
        # The smallest HR patch, as SRImplicitDownsampled crops it at the scale scale_min (whole
        # images and paired folders: known only at run time, where the wrapper checks it).
        side = round(inp_size * scale_min)
        if sample_q > side * side:
            raise ConfigError(f"{where}.wrapper.args.sample_q {sample_q} exceeds the {side * side} "
                              f"pixels of the smallest HR patch ({side}x{side}: inp_size "
                              f"{inp_size} at scale_min {scale_min})")


def _check_norm(norm):
    _keys(norm, {"inp": False, "gt": False}, "data_norm")
    for part, value in norm.items():
        _keys(value, {"sub": False, "div": False}, f"data_norm.{part}")
        for key in ("sub", "div"):
            numbers = value.get(key, [0.0 if key == "sub" else 1.0])
            if not isinstance(numbers, list) or len(numbers) not in (1, 3):
                raise ConfigError(f"data_norm.{part}.{key} must be a list of 1 or 3 numbers, got "
                                  f"{numbers!r}")
            for n in numbers:
                _number(n, f"data_norm.{part}.{key}")


def _check_model(model):
    _keys(model, {"name": True, "args": True, "sd": False}, "model")
    if model["name"] != "liif":
        raise ConfigError(f"model.name: unknown {model['name']!r} (known: liif)")
    args = model["args"]
    _keys(args, MODEL_ARGS, "model.args")
    for key in QUERY_FLAGS:
        _flag(args.get(key, True), f"model.args.{key}")
    encoder, eargs = _named(args["encoder_spec"], ENCODERS, "model.args.encoder_spec")
    where = "model.args.encoder_spec.args"
    if not _flag(eargs.get("no_upsampling", True), f"{where}.no_upsampling"):
        raise ConfigError(f"{where}.no_upsampling must be true: LIIF's encoders have no upsampler")
    # (res_scale, rgb_range and RDNconfig: build_model checks the values it supports.)
    if encoder == "edsr-baseline":
        _number(eargs.get("n_resblocks", 16), f"{where}.n_resblocks", int, 0)
        _number(eargs.get("n_feats", 64), f"{where}.n_feats", int, 1)
    else:
        _number(eargs.get("G0", 64), f"{where}.G0", int, 1)
        size = _number(eargs.get("RDNkSize", 3), f"{where}.RDNkSize", int, 1)
        if size % 2 == 0:  # "same" padding needs an odd kernel; an even one shifts the features
            raise ConfigError(f"{where}.RDNkSize must be odd, got {size}")
    _, margs = _named(args["imnet_spec"], {"mlp": {"out_dim": True, "hidden_list": True}},
                      "model.args.imnet_spec")
    where = "model.args.imnet_spec.args"
    _positive_ints(margs["hidden_list"], f"{where}.hidden_list", "the hidden layers' widths")
    # The loss compares the prediction with the targets' RGB, and (x - 0.5) / 0.5 is 3 channels.
    if not isinstance(margs["out_dim"], int) or margs["out_dim"] != 3:
        raise ConfigError(f"{where}.out_dim must be 3 (the model predicts RGB), got "
                          f"{margs['out_dim']!r}")


def _check_optimizer(spec):
    """The arguments torch's Adam and SGD would refuse, or misuse, named by their keys."""
    name, args = _named(spec, OPTIMIZERS, "optimizer")
    where = "optimizer.args"
    _number(args["lr"], f"{where}.lr", minimum=0)  # 0: a frozen run, as torch allows
    _number(args.get("weight_decay", 0), f"{where}.weight_decay", minimum=0)
    if name == "adam":
        # torch allows eps 0, which makes 0 / 0 of a parameter whose gradients have all been 0.
        _number(args.get("eps", 1e-8), f"{where}.eps", above=0)
        betas = args.get("betas", [0.9, 0.999])
        if not (isinstance(betas, list) and len(betas) == 2 and all(
                _number(b, f"{where}.betas") >= 0 and b < 1 for b in betas)):
            raise ConfigError(f"{where}.betas must be a pair of numbers in [0, 1), got {betas!r}")
    else:
        momentum = _number(args.get("momentum", 0), f"{where}.momentum", minimum=0)
        if _flag(args.get("nesterov", False), f"{where}.nesterov") and momentum == 0:
            raise ConfigError(f"{where}.nesterov needs a momentum > 0")


def check_config(config):
    """Raises ConfigError on anything outside the schema; returns the config."""
    _keys(config, TOP_LEVEL, "config")
    _check_dataset(config["train_dataset"], "train_dataset")
    if config.get("val_dataset") is not None:
        _check_dataset(config["val_dataset"], "val_dataset")
    _check_norm(config.get("data_norm") or {})
    _check_model(_mapping(config["model"], "model"))
    _check_optimizer(config["optimizer"])
    _number(config["epoch_max"], "epoch_max", int, 1)
    for key in ("epoch_val", "epoch_save"):
        _number(config.get(key), key, int, 1, allow_none=True)
    # Queries per chunk of the validation's query (the original's eval_bsize); none: 30000.
    _number(config.get("eval_bsize"), "eval_bsize", int, 1, allow_none=True)
    if config.get("multi_step_lr") is not None:
        steps = config["multi_step_lr"]
        _keys(steps, {"milestones": True, "gamma": True}, "multi_step_lr")
        # Epochs after which the rate is multiplied by gamma (MultiStepLR, stepped at the end of
        # each epoch); a milestone 0 would lower it before the first epoch. Unsorted lists and
        # repeats are accepted: MultiStepLR counts milestones (a repeated one applies gamma twice)
        # and the original code passes the list straight to it. Milestones beyond epoch_max never
        # apply, as in the published recipe shortened for fine-tuning.
        _positive_ints(steps["milestones"], "multi_step_lr.milestones", "epochs")
        # gamma > 1 raises the rate at each milestone: unusual, not wrong; <= 0 is.
        _number(steps["gamma"], "multi_step_lr.gamma", above=0)
    # numpy's seed sequences (each sample's generator) take no negative numbers.
    _number(config.get("seed", 0), "seed", int, 0)
    return config


def read_yaml(stream, path):
    """yaml.safe_load, but a key given twice in a mapping is an error (PyYAML keeps the last one
    silently) and invalid YAML is one line with the file, line and column."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override keys
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(f"config {path}: key {key!r} at line {line} is given "
                                          f"twice (first at line {seen[key]})")
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                seen[key] = line
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(stream, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config {path} is not valid YAML{where}: {problem}") from None


def load_config(path_or_name):
    """A config from a YAML file, or a packaged one by name ("edsr-baseline-liif", "rdn-liif");
    checked with check_config. Returns a dict."""
    path = os.fspath(path_or_name)
    if not os.path.isfile(path):
        packaged = os.path.join(PACKAGED, f"{path}.yaml")
        if not os.path.isfile(packaged):
            names = sorted(f[:-5] for f in os.listdir(PACKAGED) if f.endswith(".yaml"))
            raise ConfigError(f"config {path!r} is neither a file nor a packaged config "
                              f"({', '.join(names)})")
        path = packaged
    with open(path) as f:
        config = read_yaml(f, path)
    if not isinstance(config, dict):
        raise ConfigError(f"config {path} must be a YAML mapping")
    return check_config(copy.deepcopy(config))
