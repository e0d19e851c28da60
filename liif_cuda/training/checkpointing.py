"""Training checkpoints in the original LIIF format, which the original code and
liif_cuda.load_model both read, written so that no interruption can leave a truncated file.

    {'model': {'name': 'liif', 'args': <config model args>, 'sd': state_dict},
     'optimizer': {'name', 'args', 'sd'}, 'epoch': N,
     'liif_cuda': {'scheduler', 'scaler', 'best_val_psnr', 'seed', 'torch_rng', 'cuda_rng',
                   'precision'}}

The extra 'liif_cuda' entry holds what an exact resume needs beyond the original's fields.
"""

import errno
import os
import shutil

import torch

from .._files import write_atomically
from .config import TrainingError

# The original EDSR keeps two 1x1 mean-shift convolutions in its state dict that LIIF never applies
# (spec section 4); the original code loads state dicts strictly, so they are written back.
_EDSR_MEAN = (0.4488, 0.4371, 0.4040)


def _mean_shift(sign):
    weight = torch.eye(3).view(3, 3, 1, 1)
    return weight, sign * torch.tensor(_EDSR_MEAN)


def _has_mean_shift(model):
    """Whether the original code's twin of the model has the mean-shift convolutions (EDSR)."""
    return any(k.startswith("encoder.head.0.") for k in model.state_dict())


def original_state_dict(model):
    """The model's state dict as the original code names and expects it."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if _has_mean_shift(model):
        for name, sign in (("sub_mean", -1.0), ("add_mean", 1.0)):
            state[f"encoder.{name}.weight"], state[f"encoder.{name}.bias"] = _mean_shift(sign)
    return state


def without_mean_shift(state):
    """An original-format state dict without the mean-shift entries LIIF's models do not have."""
    return {k: v for k, v in state.items()
            if not (k.startswith("encoder.sub_mean.") or k.startswith("encoder.add_mean."))}


def load_original_state_dict(model, state):
    """Loads an original-format state dict (mean-shift entries dropped) strictly."""
    model.load_state_dict(without_mean_shift(state), strict=True)


# The original code's optimizer takes model.parameters(), which for EDSR begin with the mean-shift
# convolutions' weights and biases: never trained (requires_grad False), so without optimizer state,
# but counted in the parameter indices of its state dict, which the original's load_state_dict
# checks against its own parameters.
_MEAN_SHIFT_PARAMETERS = 4


def original_optimizer_state(model, optimizer):
    """The optimizer's state dict as the original code's optimizer of the same model has it."""
    state = optimizer.state_dict()
    if not _has_mean_shift(model):
        return state
    shift = _MEAN_SHIFT_PARAMETERS
    groups = [dict(g, params=[i + shift for i in g["params"]]) for g in state["param_groups"]]
    groups[0]["params"] = list(range(shift)) + groups[0]["params"]
    return {"state": {i + shift: s for i, s in state["state"].items()}, "param_groups": groups}


def load_original_optimizer_state(model, optimizer, state):
    """Loads an optimizer state dict of the original layout (as original_optimizer_state writes it,
    or as the original code saves it), or in liif_cuda's own (no mean-shift parameters: its
    checkpoints of before 2026-11-27)."""
    groups = state["param_groups"]
    count = sum(len(g["params"]) for g in groups)
    ours = sum(len(g["params"]) for g in optimizer.param_groups)
    if _has_mean_shift(model) and count == ours + _MEAN_SHIFT_PARAMETERS:
        mean_shift = set(groups[0]["params"][:_MEAN_SHIFT_PARAMETERS])
        if any(state["state"].get(i) for i in mean_shift):
            raise ValueError("the state has values for the first parameters, which the original "
                             "EDSR's mean-shift convolutions (never trained) would have none for")
        index = {}  # the original's index -> liif_cuda's, in parameter order
        for g in groups:
            for i in g["params"]:
                if i not in mean_shift:
                    index[i] = len(index)
        state = {"state": {index[i]: s for i, s in state["state"].items() if i in index},
                 "param_groups": [dict(g, params=[index[i] for i in g["params"] if i in index])
                                  for g in groups]}
    optimizer.load_state_dict(state)


def _tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_atomically(obj, path):
    """torch.save through a temporary file renamed over `path`: never a truncated checkpoint. A
    failed write (the temporary file removed, `path` left as it was) is a TrainingError naming the
    checkpoint and, where the disk is full, saying so: torch's own message for it is
    "[enforce fail at inline_container.cc:...] . unexpected pos ..."."""
    try:
        write_atomically(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as exc:
        full = getattr(exc, "errno", None) == errno.ENOSPC
        if not full:  # torch's zip writer loses the errno: compare the free space with the size
            try:
                free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
                full = free < _tensor_bytes(obj)
            except OSError:
                pass
        reason = os.strerror(errno.ENOSPC) if full else (
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise TrainingError(f"cannot write the checkpoint {path}: {reason} (the previous "
                            f"checkpoint, if any, is kept)") from exc


def make_checkpoint(model, model_spec, optimizer, optimizer_spec, scheduler, scaler, epoch,
                    best_val_psnr, seed, precision="fp32"):
    return {
        "model": {"name": "liif", "args": model_spec["args"], "sd": original_state_dict(model)},
        "optimizer": {"name": optimizer_spec["name"], "args": optimizer_spec.get("args") or {},
                      "sd": original_optimizer_state(model, optimizer)},
        "epoch": epoch,
        "liif_cuda": {
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best_val_psnr": best_val_psnr,
            "seed": seed,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "precision": precision,  # the run's --precision, which a resume is told about
        },
    }
