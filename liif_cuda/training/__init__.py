"""Training LIIF models: `liif-cuda train` and `train(config, out_dir, ...)` on the original code's
configs (spec section 8.1), on one CPU, one GPU or many processes under torchrun."""

from .config import ConfigError, check_config, load_config
from .trainer import PRECISIONS, TrainingError, build_model, train, train_step

__all__ = ["ConfigError", "TrainingError", "PRECISIONS", "check_config", "load_config", "train",
           "train_step", "build_model"]
