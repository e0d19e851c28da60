"""`liif-cuda eval`: PSNR / SSIM of a model on image folders under a published protocol."""

import os
import sys

from .common import (ENCODER_PRECISION_HELP, ENCODER_PRECISIONS, PRECISION_HELP, PRECISIONS,
                     CliError, HelpFormatter, check_encoder_precision)

# liif_cuda.evaluation.protocols.PROTOCOLS, with one line each from that module's docstring.
PROTOCOL_HELP = (
    "mmedit: mmediting 0.x model card (GT cropped to a multiple of 12, 8-bit rounded prediction, "
    "RGB PSNR, SSIM of one channel); mmagic: mmagic 1.x (unrounded prediction, 3-channel SSIM); "
    "paper: the LIIF paper (Y PSNR, shave = scale, RGB shave scale + 6 with --div2k, no SSIM); "
    "classic: EDSR/RCAN-style MATLAB Y PSNR of the SR literature's bicubic rows (use with --model "
    "bicubic --resize matlab)")


def parse_scales(text):
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"--scales must be numbers separated by commas, got {text!r}", 2) from None
    if not scales or any(not s > 0 for s in scales):
        raise CliError(f"--scales must be numbers > 0, got {text!r}", 2)
    return scales


def eval_command(args):
    from ..checkpoints import CheckpointError
    from ..evaluation import evaluate, format_table
    from ..pretrained import WeightsNotFound
    scales = parse_scales(args.scales)
    if args.model != "bicubic":
        from ..upscaling import default_device
        check_encoder_precision(args, args.device or default_device())
    for folder in args.data:
        if not os.path.isdir(folder):
            raise CliError(f"--data {folder} is not a folder")
    if args.json and os.path.exists(args.json) and not args.overwrite:
        raise CliError(f"--json {args.json} exists; pass --overwrite to replace it")
    try:
        results = evaluate(args.model, args.data, scales, protocol=args.protocol,
                           lr_dir=args.lr_dir, resize=args.resize, crop=args.crop, div2k=args.div2k,
                           device=args.device, precision=args.precision, json_path=args.json,
                           encoder_precision=args.encoder_precision,
                           progress=sys.stderr.isatty())  # no bar fragments in a redirected log
    except (FileNotFoundError, CheckpointError, WeightsNotFound) as exc:
        raise CliError(str(exc)) from None
    print(format_table(results))
    if args.json:
        print(f"per-image values: {args.json}")


def add_eval_parser(sub):
    ev = sub.add_parser("eval", help="PSNR / SSIM on image folders under a published protocol",
                        formatter_class=HelpFormatter)
    ev.add_argument("--model", default="edsr-baseline-liif",
                    help="pretrained name, checkpoint path, or 'bicubic' (MATLAB bicubic baseline)")
    ev.add_argument("--data", action="append", required=True,
                    help="folder of HR images (repeat for several; no default: required)")
    ev.add_argument("--scales", default="2,3,4,6,12,18,24,30", help="comma-separated, e.g. 2,3,4")
    ev.add_argument("--protocol", choices=["mmedit", "mmagic", "paper", "classic"],
                    default="mmedit", help=PROTOCOL_HELP)
    ev.add_argument("--lr-dir", default=None,
                    help="read LR images from here (X<s>/<name>x<s>.png) (default: made from the "
                         "HR images)")
    ev.add_argument("--resize", choices=["pillow", "matlab"], default="pillow",
                    help="how LR images are made from HR ones")
    ev.add_argument("--crop", type=int, default=None,
                    help="border pixels excluded by the mmedit/mmagic metrics (default: the scale)")
    ev.add_argument("--div2k", action="store_true", help="paper protocol: RGB, shave scale + 6")
    ev.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: CUDA when available, else CPU")
    ev.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    ev.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS, default="fp32",
                    help=ENCODER_PRECISION_HELP)
    ev.add_argument("--json", default=None,
                    help="write per-image values here (default: not written)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    ev.set_defaults(func=eval_command)
