"""load_model: a LIIF model from a checkpoint file or a pretrained name."""

import os

from .checkpoints import model_from_checkpoint, read_checkpoint
from .pretrained import PRETRAINED, resolve

DEFAULT_MODEL = "edsr-baseline-liif"


def load_model(path_or_name=DEFAULT_MODEL, device=None):
    """Loads a LIIF model in eval mode.

    `path_or_name` is a checkpoint file (original LIIF, mmediting before or after July 2021, or
    mmagic 1.x; the layout is detected from the keys) or a pretrained name (see
    `liif_cuda.pretrained.PRETRAINED`: "edsr-baseline-liif"), which is looked up in
    $LIIF_CUDA_WEIGHTS, then in ~/.cache/liif_cuda, and otherwise downloaded, verified and cached.
    Raises FileNotFoundError for a path that does not exist and is no known name, and
    liif_cuda.checkpoints.CheckpointError for a file that is not a LIIF checkpoint.
    """
    name = os.fspath(path_or_name)
    if os.path.isfile(name):
        path = name
    elif name in PRETRAINED:
        path = resolve(name)
    else:
        raise FileNotFoundError(f"{name!r} is neither a checkpoint file nor a pretrained name "
                                f"({', '.join(sorted(PRETRAINED))})")
    model = model_from_checkpoint(read_checkpoint(path), source=path)
    return model.to(device) if device is not None else model
