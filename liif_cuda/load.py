"""load_model: a LIIF model from a checkpoint file or a pretrained name."""

import os
from typing import Union

import torch

from .checkpoints import model_from_checkpoint, read_checkpoint
from .models import LIIF
from .pretrained import PRETRAINED, resolve

DEFAULT_MODEL = "edsr-baseline-liif"


class ModelNotFound(FileNotFoundError):
    """load_model's argument is neither a checkpoint file nor a pretrained name."""


def check_device(device, name=None):
    """torch.device(device), with a clear ValueError where it cannot run liif_cuda here (instead of
    torch's assertion from deep inside Module.to, or a missing kernel at the first query). `name`
    leads the messages of a device it cannot use (default "device 'cuda:1'", say)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        from . import build_info
        name = name or f"device {device!r}"
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU build)"
            raise ValueError(f"{name}: no CUDA GPU is available{build}")
        if not build_info()["cuda"]:
            raise ValueError(f"{name}: liif_cuda was built without its CUDA kernels "
                             f"(docs/install.md)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            # The count of this process, not of the machine: CUDA_VISIBLE_DEVICES narrows it.
            raise ValueError(f"{name}: GPU {dev.index} is not visible; this process sees "
                             f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0 "
                             f"(CUDA_VISIBLE_DEVICES chooses which GPUs it sees)")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def load_model(path_or_name: Union[str, os.PathLike] = DEFAULT_MODEL,
               device: Union[str, torch.device, None] = None) -> LIIF:
    """Loads a LIIF model in eval mode.

    `path_or_name` is a checkpoint file (original LIIF, mmediting before or after July 2021, or
    mmagic 1.x; the layout is detected from the keys) or a pretrained name (see
    `liif_cuda.pretrained.PRETRAINED`: "edsr-baseline-liif"), which is looked up in
    $LIIF_CUDA_WEIGHTS, then in ~/.cache/liif_cuda, and otherwise downloaded, verified and cached.
    Raises ModelNotFound (a FileNotFoundError) for a path that does not exist and is no known name,
    liif_cuda.checkpoints.CheckpointError for a file that is not a LIIF checkpoint, and ValueError
    for a device that cannot run it here.
    """
    if device is not None:
        device = check_device(device)
    name = os.fspath(path_or_name)
    if os.path.isfile(name):
        path = name
    elif name in PRETRAINED:
        path = resolve(name)
    elif os.path.isdir(name):
        # A training run's folder, most likely: its checkpoints are files in it.
        last = os.path.join(name, "epoch-last.pth")
        hint = f" such as {last}" if os.path.isfile(last) else ""
        raise ModelNotFound(f"{name!r} is a folder; pass a checkpoint file{hint} or a pretrained "
                            f"name ({', '.join(sorted(PRETRAINED))})")
    else:
        raise ModelNotFound(f"{name!r} is neither a checkpoint file nor a pretrained name "
                            f"({', '.join(sorted(PRETRAINED))})")
    model = model_from_checkpoint(read_checkpoint(path), source=path)
    return model.to(device) if device is not None else model
