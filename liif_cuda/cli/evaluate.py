"""`liif-cuda eval`: PSNR / SSIM of a model on image folders under a published protocol."""

import math
import os
import sys

from .common import (DEVICE_HELP, DEVICE_METAVAR, ENCODER_PRECISION_HELP, ENCODER_PRECISIONS,
                     PRECISION_HELP, PRECISIONS, CliError, HelpFormatter, cannot_write_into,
                     check_cuda_requested, check_precisions, device_type, model_errors)

# liif_cuda.evaluation.protocols.PROTOCOLS, with one line each from that module's docstring.
PROTOCOL_HELP = (
    "mmedit: mmediting 0.x model card (GT cropped to a multiple of 12, 8-bit rounded prediction, "
    "RGB PSNR, SSIM of one channel); mmagic: mmagic 1.x (unrounded prediction, 3-channel SSIM); "
    "paper: the LIIF paper (Y PSNR, shave = scale, RGB shave scale + 6 with --div2k, no SSIM); "
    "classic: EDSR/RCAN-style MATLAB Y PSNR of the SR literature's bicubic rows (use with --model "
    "bicubic --resize matlab)")


def parse_scales(text):
    items = [v.strip() for v in text.split(",")]
    if "" in items:
        raise CliError(f"--scales has an empty item in {text!r}; give numbers separated by commas, "
                       f"e.g. 2,3,4", 2)
    try:
        scales = [float(v) for v in items]
    except ValueError:
        raise CliError(f"--scales must be numbers separated by commas, got {text!r}", 2) from None
    if any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise CliError(f"--scales must be finite numbers > 0, got {text!r}", 2)
    seen = {}
    for item, s in zip(items, scales):
        if f"{s:g}" in seen:  # results are keyed by f"{s:g}": one would replace the other
            raise CliError(f"--scales gives x{s:g} twice ({seen[f'{s:g}']} and {item})", 2)
        seen[f"{s:g}"] = item
    return scales


def check_json_path(path, overwrite):
    """--json must be a file that can be written, checked before the evaluation (not at its end)."""
    if os.path.isdir(path):
        raise CliError(f"--json {path} is a folder; name the file to write", 2)
    if os.path.exists(path) and not overwrite:
        raise CliError(f"--json {path} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        raise CliError(f"--json {path}: folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise CliError(f"--json {path}: {folder} is not a folder")
    why = cannot_write_into(folder)
    if why is not None:
        raise CliError(f"--json {path}: cannot write into folder {folder} ({why})")


def eval_command(args):
    from ..evaluation import evaluate, format_table
    from ..evaluation.evaluate import write_results
    from ..evaluation.protocols import (ImageTooSmall, LRFileMismatch, LRFileMissing,
                                        OptionIgnored, check_protocol_options)
    scales = parse_scales(args.scales)
    if args.crop is not None and args.crop < 0:
        raise CliError(f"--crop must be >= 0, got {args.crop}", 2)
    try:
        check_protocol_options(args.protocol, args.crop, args.div2k)
    except OptionIgnored as exc:
        raise CliError(f"--{exc.option} {exc.detail}", 2) from None
    if args.lr_dir is not None and len(args.data) != 1:
        raise CliError(f"--lr-dir goes with exactly one --data (its LR files), got "
                       f"{len(args.data)}", 2)
    check_cuda_requested(args.device)
    ran_float32 = []  # the reduced precisions asked for that this CPU computes in float32
    if args.model != "bicubic":
        from ..upscaling import default_device
        ran_float32 = check_precisions(args, args.device or default_device())
    for folder in args.data:
        if not os.path.isdir(folder):
            raise CliError(f"--data {folder} is not a folder")
    if args.json:
        check_json_path(args.json, args.overwrite)
    try:
        results = evaluate(args.model, args.data, scales, protocol=args.protocol,
                           lr_dir=args.lr_dir, resize=args.resize, crop=args.crop, div2k=args.div2k,
                           device=args.device, precision=args.precision,
                           encoder_precision=args.encoder_precision,
                           # a bar on a terminal; in a redirected log a line per scale instead
                           progress=True if sys.stderr.isatty() else "lines")
    except ImageTooSmall as exc:
        option = {"scale": "--scales", "crop": "--crop", "protocol": "--protocol"}[exc.option]
        shown = f"{exc.value:g}" if isinstance(exc.value, float) else exc.value
        raise CliError(f"{option} {shown}: {exc.detail}") from None
    except (LRFileMismatch, LRFileMissing) as exc:
        raise CliError(f"--lr-dir: {exc}") from None
    except model_errors() as exc:
        raise CliError(f"--model: {exc}") from None
    # What the table is of, so that a saved output says it.
    setting = [args.model, f"protocol {args.protocol}", f"resize {args.resize}"]
    if args.model != "bicubic":
        for option in ("precision", "encoder_precision"):
            ran = " (ran float32 on this CPU)" if option in ran_float32 else ""
            setting.append(f"{option.replace('_', ' ')} {getattr(args, option)}{ran}")
    print(", ".join(setting) + " (PSNR dB / SSIM):")
    print(format_table(results))
    if args.json:  # written after the table is printed: a failure here does not lose the results
        try:
            write_results(args.json, results, protocol=args.protocol, resize=args.resize,
                          crop=args.crop, div2k=args.div2k, lr_dir=args.lr_dir,
                          precision=args.precision, encoder_precision=args.encoder_precision,
                          ran_float32=ran_float32, overwrite=args.overwrite)
        except FileExistsError:
            raise CliError(f"--json {args.json} appeared during the evaluation; not replacing it "
                           f"(pass --overwrite to replace it)") from None
        except OSError as exc:
            raise CliError(f"--json {args.json}: cannot write it ({exc})") from None
        print(f"per-image values: {args.json}")


def add_eval_parser(sub):
    ev = sub.add_parser("eval", help="PSNR / SSIM on image folders under a published protocol",
                        description="PSNR and SSIM of a model (or the bicubic baseline) on folders "
                                    "of HR images, each made into LR and scored as a published "
                                    "protocol does (docs/evaluation.md); a table on stdout, "
                                    "per-image values with --json.",
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
                    help="border pixels (>= 0) excluded by the mmedit/mmagic metrics (default: the "
                         "scale)")
    ev.add_argument("--div2k", action="store_true", help="paper protocol: RGB, shave scale + 6")
    ev.add_argument("--device", type=device_type, metavar=DEVICE_METAVAR, default=None,
                    help=DEVICE_HELP)
    ev.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    ev.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS, default="fp32",
                    help=ENCODER_PRECISION_HELP)
    ev.add_argument("--json", default=None,
                    help="write per-image values here (default: not written)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    ev.set_defaults(func=eval_command)
