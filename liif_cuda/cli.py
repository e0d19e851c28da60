"""The `liif-cuda` command line.

    liif-cuda upscale INPUT -o OUTPUT (--scale S | --size WxH) [--model NAME|PATH]
                      [--device cpu|cuda] [--precision fp32|tf32|bf16|fp16]
                      [--encoder-precision fp32|bf16|fp16] [--overwrite]
    liif-cuda eval --model NAME|PATH|bicubic --data DIR [--data DIR ...] --scales 2,3,4
                   --protocol mmedit|mmagic|paper|classic [--lr-dir DIR] [--resize pillow|matlab]
                   [--crop N] [--div2k] [--device cpu|cuda] [--precision fp32|tf32|bf16|fp16]
                   [--encoder-precision fp32|bf16|fp16] [--json PATH]

Errors (bad paths, unreadable files, bad scales or sizes, outputs too large for memory, existing
outputs without --overwrite) print one line to stderr and exit with status 2 (usage) or 1 (other);
the output file is written to a temporary name and renamed at the end, so it is never left partial.
"""

import argparse
import os
import sys
import tempfile
import time

INPUT_FORMATS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"}
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
                  ".webp": "WEBP"}
# Bytes per output pixel the upscaler holds at the end: float32 RGB result, its copy in the output
# dtype and the encoded image, with room to spare.
BYTES_PER_OUTPUT_PIXEL = 40
# liif_cuda.PRECISIONS, spelled out so that the parser is built without importing torch.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
PRECISION_HELP = ("query arithmetic: fp32 exact (default); tf32, bf16, fp16 on CUDA tensor cores; "
                  "bf16 also on CPUs with AVX512-BF16 (float32 on other CPUs)")
# liif_cuda.upscaling.ENCODER_PRECISIONS
ENCODER_PRECISIONS = ("fp32", "bf16", "fp16")
ENCODER_PRECISION_HELP = ("encoder arithmetic: fp32 (default), or autocast in bf16 (CPU or CUDA) or "
                          "fp16 (CUDA)")


class CliError(Exception):
    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def parse_size(text):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CliError(f"--size must be WIDTHxHEIGHT, e.g. 1920x1080, got {text!r}", 2) from None
    if w < 1 or h < 1:
        raise CliError(f"--size must be positive, got {text!r}", 2)
    return w, h


def available_memory():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _png_bit_depth(path):
    with open(path, "rb") as f:
        head = f.read(26)
    return head[24] if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 25 else None


def read_image(path):
    from PIL import Image, UnidentifiedImageError
    if not os.path.exists(path):
        raise CliError(f"input {path} does not exist")
    if not os.path.isfile(path):
        raise CliError(f"input {path} is not a file")
    if os.path.splitext(path)[1].lower() not in INPUT_FORMATS:
        raise CliError(f"input {path}: unsupported format (use PNG, JPEG, TIFF or WebP)")
    if _png_bit_depth(path) == 16:
        # Pillow reads 16-bit colour PNGs as 8-bit: refuse rather than lose the precision silently.
        raise CliError(f"input {path} is a 16-bit PNG, which is not supported; convert it to 8 bits "
                       f"(the Python API takes 16-bit numpy arrays)")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CliError(f"input {path} cannot be read as an image ({exc})") from None


def write_atomically(image, path, overwrite):
    fmt = OUTPUT_FORMATS[os.path.splitext(path)[1].lower()]
    if fmt == "JPEG" and image.mode in ("RGBA", "LA"):
        print(f"notice: JPEG has no alpha channel; the alpha of the result is dropped for {path}",
              file=sys.stderr)
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".liif-cuda-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt)
        if not overwrite and os.path.exists(path):
            raise CliError(f"output {path} exists; pass --overwrite to replace it")
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise CliError(f"cannot write {path} ({exc})") from None
        raise


def upscale_command(args):
    import torch

    from .upscaling import default_device, output_size, upscale
    if args.scale is not None and not args.scale > 0:
        raise CliError(f"--scale must be > 0, got {args.scale}", 2)
    size = parse_size(args.size) if args.size else None
    out_ext = os.path.splitext(args.output)[1].lower()
    if out_ext not in OUTPUT_FORMATS:
        raise CliError(f"output {args.output}: unsupported format (use .png, .jpg, .tif or .webp)", 2)
    if os.path.exists(args.output) and not args.overwrite:
        raise CliError(f"output {args.output} exists; pass --overwrite to replace it")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise CliError(f"output folder {out_dir} does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA GPU is available", 2)

    check_encoder_precision(args, args.device or default_device())
    image = read_image(args.input)
    out_h, out_w = output_size(image.height, image.width, args.scale, size)
    needed = out_h * out_w * BYTES_PER_OUTPUT_PIXEL
    free = available_memory()
    if free is not None and needed > free:
        raise CliError(f"a {out_w}x{out_h} output needs about {needed / 2**30:.1f} GiB, more than "
                       f"the {free / 2**30:.1f} GiB of memory available")
    from .checkpoints import CheckpointError
    from .pretrained import WeightsNotFound
    try:
        from .load import load_model
        model = load_model(args.model, device=args.device or default_device())
    except (FileNotFoundError, CheckpointError, WeightsNotFound) as exc:
        raise CliError(f"model: {exc}") from None
    start = time.perf_counter()
    result = upscale(image, size=(out_w, out_h), model=model, precision=args.precision,
                     encoder_precision=args.encoder_precision,
                     progress=out_h * out_w >= (1 << 21))
    write_atomically(result, args.output, args.overwrite)
    print(f"{args.output}: {out_w}x{out_h} from {image.width}x{image.height} in "
          f"{time.perf_counter() - start:.1f} s")


def check_encoder_precision(args, device):
    if args.encoder_precision == "fp16" and device != "cuda":
        raise CliError("--encoder-precision fp16 needs a CUDA device (on the CPU use bf16)", 2)


def parse_scales(text):
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"--scales must be numbers separated by commas, got {text!r}", 2) from None
    if not scales or any(not s > 0 for s in scales):
        raise CliError(f"--scales must be numbers > 0, got {text!r}", 2)
    return scales


def eval_command(args):
    from .checkpoints import CheckpointError
    from .evaluation import evaluate, format_table
    from .pretrained import WeightsNotFound
    scales = parse_scales(args.scales)
    if args.model != "bicubic":
        from .upscaling import default_device
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
                           encoder_precision=args.encoder_precision)
    except (FileNotFoundError, CheckpointError, WeightsNotFound) as exc:
        raise CliError(str(exc)) from None
    print(format_table(results))
    if args.json:
        print(f"per-image values: {args.json}")


def build_parser():
    parser = argparse.ArgumentParser(prog="liif-cuda", description="LIIF super-resolution")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upscale", help="super-resolve an image to any scale or size")
    up.add_argument("input", help="PNG, JPEG, TIFF or WebP image")
    up.add_argument("-o", "--output", required=True, help="output image (.png .jpg .tif .webp)")
    target = up.add_mutually_exclusive_group(required=True)
    target.add_argument("--scale", type=float, help="output / input size, e.g. 2.5")
    target.add_argument("--size", help="output WIDTHxHEIGHT, e.g. 1920x1080")
    up.add_argument("--model", default="edsr-baseline-liif",
                    help="pretrained name or checkpoint path (default edsr-baseline-liif)")
    up.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: CUDA when available, else CPU")
    up.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    up.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS, default="fp32",
                    help=ENCODER_PRECISION_HELP)
    up.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    up.set_defaults(func=upscale_command)

    ev = sub.add_parser("eval", help="PSNR / SSIM on image folders under a published protocol")
    ev.add_argument("--model", default="edsr-baseline-liif",
                    help="pretrained name, checkpoint path, or 'bicubic' (MATLAB bicubic baseline)")
    ev.add_argument("--data", action="append", required=True, help="folder of HR images (repeat)")
    ev.add_argument("--scales", default="2,3,4,6,12,18,24,30", help="comma-separated, e.g. 2,3,4")
    ev.add_argument("--protocol", choices=["mmedit", "mmagic", "paper", "classic"],
                    default="mmedit")
    ev.add_argument("--lr-dir", default=None, help="read LR images from here (X<s>/<name>x<s>.png)")
    ev.add_argument("--resize", choices=["pillow", "matlab"], default="pillow",
                    help="how LR images are made from HR ones")
    ev.add_argument("--crop", type=int, default=None,
                    help="border pixels excluded by the mmedit/mmagic metrics (default: the scale)")
    ev.add_argument("--div2k", action="store_true", help="paper protocol: RGB, shave scale + 6")
    ev.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ev.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    ev.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS, default="fp32",
                    help=ENCODER_PRECISION_HELP)
    ev.add_argument("--json", default=None, help="write per-image values here")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    ev.set_defaults(func=eval_command)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CliError as exc:
        print(f"liif-cuda: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("liif-cuda: interrupted", file=sys.stderr)
        return 130
    except (ValueError, MemoryError, RuntimeError, OSError) as exc:
        print(f"liif-cuda: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
