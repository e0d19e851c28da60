"""`liif-cuda train` (also `python -m liif_cuda train`, and under torchrun)."""

import argparse
import os
import shlex
import sys

from ..cli.common import DEVICE_METAVAR, DEVICE_TORCHRUN_HELP, device_type

# liif_cuda.training.trainer.PRECISIONS, spelled out so that the parser is built without it.
PRECISIONS = ("fp32", "bf16", "fp16")


def add_train_parser(sub, formatter_class=argparse.ArgumentDefaultsHelpFormatter):
    tr = sub.add_parser("train", help="train a LIIF model from a config in the original schema",
                        description="Train a LIIF model (docs/training.md). Under torchrun: "
                                    "DistributedDataParallel, one process per GPU.",
                        formatter_class=formatter_class)
    tr.add_argument("--config", required=True,
                    help="YAML config file, or a packaged one: edsr-baseline-liif, rdn-liif")
    tr.add_argument("--out", required=True, help="run folder: log.csv, config.yaml, checkpoints")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/epoch-last.pth")
    tr.add_argument("--init", default=None,
                    help="start from a pretrained model: a name (edsr-baseline-liif) or a checkpoint")
    tr.add_argument("--device", type=device_type, metavar=DEVICE_METAVAR, default=None,
                    help=DEVICE_TORCHRUN_HELP)
    tr.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="fp32; bf16 (autocast, CPU or CUDA); fp16 (CUDA autocast + GradScaler)")
    tr.add_argument("--workers", type=int, default=None,
                    help="DataLoader worker processes (default: 4 on CUDA, 0 on the CPU)")
    tr.set_defaults(func=train_command)
    return tr


def train_command(args):
    from ..cli.common import CliError, check_cuda_requested, is_cuda
    from .config import load_config
    from .trainer import TrainingError, fp16_needs_cuda, torchrun_place, train
    # Usage errors (status 2), as in the other commands.
    if args.workers is not None and args.workers < 0:
        raise CliError(f"--workers must be >= 0, got {args.workers}", 2)
    if args.resume and args.init is not None:
        raise CliError("--init and --resume exclude each other (--resume goes on from the run's "
                       "own last checkpoint)", 2)
    try:
        world = torchrun_place()[1]
    except TrainingError as exc:  # bad torchrun variables, a usage error as for `upscale`
        raise CliError(str(exc), 2) from None
    check_cuda_requested(args.device, world)
    if args.precision == "fp16":
        from ..upscaling import default_device
        if not is_cuda(args.device or default_device()):
            raise CliError(fp16_needs_cuda(), 2)
    config = load_config(args.config)
    try:
        path = train(config, args.out, resume=args.resume, init=args.init, device=args.device,
                     precision=args.precision, workers=args.workers,
                     progress=sys.stderr.isatty())  # no bar fragments in a redirected log
    except KeyboardInterrupt:
        # liif_cuda.cli prints "interrupted"; this says how to go on (rank 0 only under torchrun).
        last = os.path.join(args.out, "epoch-last.pth")
        if os.environ.get("RANK", "0") == "0" and os.path.isfile(last):
            command = ["liif-cuda", "train", "--config", args.config, "--out", args.out,
                       "--resume"] + (["--precision", args.precision]
                                      if args.precision != "fp32" else [])
            print(f"liif-cuda: {last} holds the last finished epoch; to go on: "
                  f"{shlex.join(command)}", file=sys.stderr)
        elif os.environ.get("RANK", "0") == "0" and not args.resume:
            print("liif-cuda: no epoch had ended, so there is nothing to resume; the same command "
                  "starts the run again", file=sys.stderr)
        raise
    if path is not None:
        print(f"last checkpoint: {path}")
