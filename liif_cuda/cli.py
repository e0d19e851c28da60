"""The `liif-cuda` command line (docs/cli.md).

    liif-cuda upscale INPUT... -o OUTPUT (--scale S | --size WxH|Wx|xH) [--model NAME|PATH]
                      [--recursive] [--format png|jpg|tif|webp] [--overwrite]
                      [--device cpu|cuda] [--precision fp32|tf32|bf16|fp16]
                      [--encoder-precision fp32|bf16|fp16]
    liif-cuda eval --model NAME|PATH|bicubic --data DIR [--data DIR ...] --scales 2,3,4
                   --protocol mmedit|mmagic|paper|classic [--lr-dir DIR] [--resize pillow|matlab]
                   [--crop N] [--div2k] [--device cpu|cuda] [--precision fp32|tf32|bf16|fp16]
                   [--encoder-precision fp32|bf16|fp16] [--json PATH]
    liif-cuda train --config CONFIG.yaml|NAME --out RUN_DIR [--resume] [--init NAME|PATH]
                    [--device cpu|cuda] [--precision fp32|bf16|fp16] [--workers N]
    liif-cuda models
    liif-cuda --version

One input file: OUTPUT is the output file. Several inputs, a folder or a glob pattern: OUTPUT is a
folder, outputs are named <stem>_x<scale><ext> or <stem>_<W>x<H><ext>, existing ones are skipped, a
file that fails is reported and the others go on; under torchrun the files are shared out among ranks.

Errors (bad paths, unreadable files, bad scales or sizes, outputs too large for memory, existing
outputs without --overwrite) print one line to stderr and exit with status 2 (usage) or 1 (other);
every output file is written to a temporary name and renamed at the end, so it is never left partial.
"""

import argparse
import decimal
import glob
import os
import re
import sys
import tempfile
import time

INPUT_FORMATS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"}
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
                  ".webp": "WEBP"}
# Bytes per output pixel the upscaler holds at the end: float32 RGB result, its copy in the output
# dtype and the encoded image, with room to spare.
BYTES_PER_OUTPUT_PIXEL = 40
# Outputs of at least this many pixels get upscale()'s progress bar over pixels.
PIXEL_BAR_MIN = 1 << 21
# liif_cuda.PRECISIONS, spelled out so that the parser is built without importing torch.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
PRECISION_HELP = ("query arithmetic: fp32 exact (default); tf32, bf16, fp16 on CUDA tensor cores; "
                  "bf16 also on CPUs with AVX512-BF16 (float32 on other CPUs)")
# liif_cuda.upscaling.ENCODER_PRECISIONS
ENCODER_PRECISIONS = ("fp32", "bf16", "fp16")
ENCODER_PRECISION_HELP = ("encoder arithmetic: fp32 (default), or autocast in bf16 (CPU or CUDA) or "
                          "fp16 (CUDA)")
# liif_cuda.evaluation.protocols.PROTOCOLS, with one line each from that module's docstring.
PROTOCOL_HELP = (
    "mmedit: mmediting 0.x model card (GT cropped to a multiple of 12, 8-bit rounded prediction, "
    "RGB PSNR, SSIM of one channel); mmagic: mmagic 1.x (unrounded prediction, 3-channel SSIM); "
    "paper: the LIIF paper (Y PSNR, shave = scale, RGB shave scale + 6 with --div2k, no SSIM); "
    "classic: EDSR/RCAN-style MATLAB Y PSNR of the SR literature's bicubic rows (use with --model "
    "bicubic --resize matlab)")
BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
GLOB_MAGIC = re.compile(r"[*?[]")


class CliError(Exception):
    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def format_bytes(n):
    """A byte count in the binary unit that keeps it under 1000, to 3 significant digits ("9.31 GiB");
    past 1000 EiB, which no machine has, bytes in scientific notation ("4.8e+25 bytes"). Takes
    integers of any size: float() of the byte count of an absurd scale would overflow."""
    n = int(n)
    if n >= 1000 * 1024 ** 6:
        return f"{decimal.Decimal(n):.2g} bytes"
    if n < 1000:
        return f"{n} B"
    for power, unit in enumerate(BYTE_UNITS[1:], 1):
        value = n / 1024 ** power
        if value < 999.5:
            return f"{value:.3g} {unit}"
    return f"{decimal.Decimal(n):.2g} bytes"


def describe_size(w, h):
    """'a 1920x1080 output', or the pixel count in scientific notation when the sides are absurd."""
    if max(w, h) < 10 ** 12:
        return f"a {w}x{h} output"
    return f"an output of {decimal.Decimal(w * h):.2g} pixels"


def parse_size(text):
    """'WxH', 'Wx' or 'xH' -> (w, h) with None for a side to take from the aspect ratio."""
    parts = text.strip().lower().split("x")
    try:
        if len(parts) != 2 or parts == ["", ""]:
            raise ValueError
        w, h = (int(v) if v.strip() else None for v in parts)
    except ValueError:
        raise CliError(f"--size must be WIDTHxHEIGHT, WIDTHx or xHEIGHT, e.g. 1920x1080, got "
                       f"{text!r}", 2) from None
    if (w is not None and w < 1) or (h is not None and h < 1):
        raise CliError(f"--size must be positive, got {text!r}", 2)
    return w, h


def _proportional(side, along, across):
    """round(side * across / along), halves up, at least 1 (integers: exact at any size)."""
    return max(1, (2 * side * across + along) // (2 * along))


def fit_size(size, in_w, in_h):
    """The output (w, h) of a parsed --size for an in_w x in_h image: a missing side keeps the
    aspect ratio."""
    w, h = size
    if h is None:
        h = _proportional(w, in_w, in_h)
    elif w is None:
        w = _proportional(h, in_h, in_w)
    return w, h


def keeps_aspect(w, h, in_w, in_h):
    """Whether w x h is in_w x in_h scaled, up to the rounding of one side."""
    return h == _proportional(w, in_w, in_h) or w == _proportional(h, in_h, in_w)


def check_scale(scale):
    if scale is None:
        return
    if not scale > 0:
        raise CliError(f"--scale must be > 0, got {scale}", 2)
    if scale == float("inf"):
        raise CliError(f"--scale must be a finite number, got {scale}", 2)


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


def check_input(path):
    """The checks of an input that need no decoding; raises CliError."""
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


def read_image(path):
    from PIL import Image, UnidentifiedImageError
    check_input(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CliError(f"input {path} cannot be read as an image ({exc})") from None


def notice(message):
    """Notices (not errors) go to stderr, through tqdm so that they do not tear a progress bar."""
    from tqdm import tqdm
    tqdm.write(f"notice: {message}", file=sys.stderr)


def say(message):
    """Results go to stdout, through tqdm for the same reason."""
    from tqdm import tqdm
    tqdm.write(message, file=sys.stdout)


def write_atomically(image, path, overwrite):
    fmt = OUTPUT_FORMATS[os.path.splitext(path)[1].lower()]
    if fmt == "JPEG" and image.mode in ("RGBA", "LA"):
        notice(f"JPEG has no alpha channel; the alpha of the result is dropped for {path}")
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


# ---- upscale: the size of one output ----------------------------------------------------------

def plan_output(source, in_w, in_h, scale, size):
    """(out_w, out_h) for one input; refuses outputs larger than memory, then gives the notice of a
    --size that changes the aspect ratio (not for an output that is refused anyway)."""
    from .upscaling import output_size
    if size is not None:
        out_w, out_h = fit_size(size, in_w, in_h)
    else:
        try:
            out_h, out_w = output_size(in_h, in_w, scale)
        except OverflowError:  # round() of an infinite product: a scale near the float maximum
            raise CliError(f"--scale {scale:g} gives an output too large for any machine") from None
    check_memory(out_w, out_h)
    if size is not None and None not in size and not keeps_aspect(out_w, out_h, in_w, in_h):
        notice(f"--size {out_w}x{out_h} changes the aspect ratio of {source} "
               f"({in_w}x{in_h}, {in_w / in_h:.3g}:1 -> {out_w / out_h:.3g}:1)")
    return out_w, out_h


def check_memory(out_w, out_h):
    needed = out_h * out_w * BYTES_PER_OUTPUT_PIXEL
    free = available_memory()
    if free is not None and needed > free:
        raise CliError(f"{describe_size(out_w, out_h)} needs about {format_bytes(needed)}, more "
                       f"than the {format_bytes(free)} of memory available")


def load_upscaling_model(name, device):
    from .checkpoints import CheckpointError
    from .load import load_model
    from .pretrained import WeightsNotFound
    try:
        return load_model(name, device=device)
    except (FileNotFoundError, CheckpointError, WeightsNotFound) as exc:
        raise CliError(f"model: {exc}") from None


def upscale_to_file(image, out_w, out_h, model, args, output, overwrite):
    """Upscales a loaded image into `output` (atomically); prints the result line."""
    from .upscaling import upscale
    start = time.perf_counter()
    result = upscale(image, size=(out_w, out_h), model=model, precision=args.precision,
                     encoder_precision=args.encoder_precision,
                     progress=out_h * out_w >= PIXEL_BAR_MIN)
    write_atomically(result, output, overwrite)
    say(f"{output}: {out_w}x{out_h} from {image.width}x{image.height} in "
        f"{time.perf_counter() - start:.1f} s")


# ---- upscale: devices and torchrun ------------------------------------------------------------

def torchrun_shard():
    """(rank, world_size, local_rank or None) from torchrun's environment; (0, 1, None) outside it.
    Only the variables are read: sharing out files needs no process group."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = os.environ.get("LOCAL_RANK")
        local = int(local) if local not in (None, "") else None
    except ValueError:
        raise CliError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)",
                       2) from None
    if world < 1 or not 0 <= rank < world or (local is not None and local < 0):
        raise CliError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE", 2)
    return rank, world, local


def upscale_device(requested, local_rank):
    """The device of this process: --device or the default; cuda:LOCAL_RANK under torchrun, so
    that each rank has its own GPU."""
    import torch

    from .upscaling import default_device
    if requested == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA GPU is available", 2)
    device = requested or default_device()
    if device == "cuda" and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise CliError(f"LOCAL_RANK={local_rank}, but this process sees "
                           f"{torch.cuda.device_count()} CUDA GPU(s)", 2)
        # The current device too, for any allocation or launch that does not name one.
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return device


def check_encoder_precision(args, device):
    if args.encoder_precision == "fp16" and not device.startswith("cuda"):
        raise CliError("--encoder-precision fp16 needs a CUDA device (on the CPU use bf16)", 2)


# ---- upscale: one file ------------------------------------------------------------------------

def is_single_file(inputs):
    """One input that is not a folder and not a glob pattern (a path that exists is taken
    literally, even with [ or * in its name): -o is then the output file, as it always was."""
    if len(inputs) != 1:
        return False
    path = inputs[0]
    return not os.path.isdir(path) and (os.path.exists(path) or not GLOB_MAGIC.search(path))


def upscale_single(args, scale, size, local_rank):
    source = args.inputs[0]
    out_ext = os.path.splitext(args.output)[1].lower()
    if args.format is not None:
        raise CliError("--format is for several inputs; with one input the extension of -o gives "
                       "the format", 2)
    if out_ext not in OUTPUT_FORMATS:
        raise CliError(f"output {args.output}: unsupported format (use .png, .jpg, .tif or .webp)", 2)
    if os.path.exists(args.output) and not args.overwrite:
        raise CliError(f"output {args.output} exists; pass --overwrite to replace it")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise CliError(f"output folder {out_dir} does not exist")
    device = upscale_device(args.device, local_rank)
    check_encoder_precision(args, device)
    image = read_image(source)
    out_w, out_h = plan_output(source, image.width, image.height, scale, size)
    model = load_upscaling_model(args.model, device)
    upscale_to_file(image, out_w, out_h, model, args, args.output, args.overwrite)


# ---- upscale: several files -------------------------------------------------------------------

def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_image_name(path):
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in INPUT_FORMATS


def scan_folder(folder, recursive):
    """(path, path relative to `folder`) of the image files in a folder, in its sub-folders too
    with `recursive`; hidden files and folders are left out (as glob's * does)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            path = os.path.join(root, name)
            if _is_image_name(path) and os.path.isfile(path):
                yield path, os.path.relpath(path, folder)


def _fixed_prefix(pattern):
    """The leading folders of a glob pattern that have no wildcard: matches keep their path
    relative to it."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if GLOB_MAGIC.search(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or ("/" if pattern.startswith(os.sep) else ".")


def expand_input(arg, recursive):
    """(path, relative output path) of the images one command-line input names: a file (kept
    whatever its extension: it fails later if it is no image), a folder, or a glob pattern (expanded
    here, so that quoting works the same in every shell; ** spans folders with --recursive)."""
    if os.path.isdir(arg):
        return list(scan_folder(arg, recursive))
    if os.path.exists(arg):
        return [(arg, os.path.basename(arg))]
    if not GLOB_MAGIC.search(arg):
        raise CliError(f"input {arg} does not exist")
    base = _fixed_prefix(arg)
    found = []
    for match in sorted(glob.glob(arg, recursive=recursive)):
        rel = os.path.relpath(match, base)
        if os.path.isdir(match):
            found += [(path, os.path.join(rel, sub)) for path, sub in scan_folder(match, recursive)]
        elif _is_image_name(match):
            found.append((match, rel))
    if not found:
        raise CliError(f"input pattern {arg!r} matches no image file")
    return found


def output_name(rel, scale, size_wh, fmt):
    """<relative folder>/<stem>_x<scale><ext> or <stem>_<W>x<H><ext>; ext the input's or --format's."""
    stem, ext = os.path.splitext(rel)
    tag = f"x{scale:g}" if scale is not None else f"{size_wh[0]}x{size_wh[1]}"
    return f"{stem}_{tag}{'.' + fmt if fmt else ext}"


def collect_jobs(args, out_dir):
    """The sorted list of (input path, relative output stem path) of a batch; every rank computes the
    same list. Images found in folders or patterns inside the output folder are not inputs (they are
    earlier outputs); two inputs that would give the same output name are refused."""
    jobs, seen, by_target = [], set(), {}
    for arg in args.inputs:
        explicit = os.path.isfile(arg)
        for path, rel in expand_input(arg, args.recursive):
            real = os.path.realpath(path)
            if real in seen or (not explicit and _inside(path, out_dir)):
                continue
            seen.add(real)
            stem, ext = os.path.splitext(rel)
            key = (stem, "." + args.format if args.format else ext)  # the name up to its size tag
            if key in by_target:
                raise CliError(f"inputs {by_target[key]} and {path} would both be written to "
                               f"{os.path.join(out_dir, os.path.splitext(rel)[0])}_...; upscale "
                               f"them separately", 2)
            by_target[key] = path
            jobs.append((path, rel))
    if not jobs:
        raise CliError(f"no image files in the inputs (images inside the output folder {out_dir} "
                       f"are not taken as inputs)")
    return sorted(jobs, key=lambda job: job[1])


def check_output_folder(out_dir):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CliError(f"-o {out_dir} exists and is not a folder; with several inputs, a folder or "
                       f"a pattern, -o names the output folder", 2)
    if not os.path.exists(out_dir) and os.path.splitext(out_dir)[1].lower() in OUTPUT_FORMATS:
        raise CliError(f"-o {out_dir}: with several inputs, a folder or a pattern, -o names the "
                       f"output folder (created if missing), not an image file", 2)


def make_output_folder(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create the output folder {out_dir} ({exc})") from None


def image_header_size(path):
    """(width, height) from the file's header, without decoding it (to name and skip outputs)."""
    from PIL import Image
    check_input(path)
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as exc:
        raise CliError(f"input {path} cannot be read as an image ({exc})") from None


def upscale_job(source, rel, out_dir, model, args, scale, size, input_paths):
    """One file of a batch: 'done' or 'skipped'; raises CliError (or a library error) on failure."""
    size_wh = None
    if size is not None:
        in_w, in_h = image_header_size(source)
        size_wh = fit_size(size, in_w, in_h)
    output = os.path.join(out_dir, output_name(rel, scale, size_wh, args.format))
    if os.path.exists(output) and not args.overwrite:
        notice(f"{output} exists, skipped (--overwrite replaces it)")
        return "skipped"
    if os.path.realpath(output) in input_paths:
        raise CliError(f"output {output} is one of the inputs; not replacing it")
    image = read_image(source)
    out_w, out_h = plan_output(source, image.width, image.height, scale, size)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    upscale_to_file(image, out_w, out_h, model, args, output, args.overwrite)
    return "done"


def report_failure(source, exc):
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if source not in message:
        message = f"{source}: {message}"
    from tqdm import tqdm
    tqdm.write(f"liif-cuda: error: {message}", file=sys.stderr)


def upscale_batch(args, scale, size, rank, world, local_rank):
    from tqdm import tqdm
    out_dir = args.output
    check_output_folder(out_dir)
    device = upscale_device(args.device, local_rank)
    check_encoder_precision(args, device)
    jobs = collect_jobs(args, out_dir)
    make_output_folder(out_dir)  # only once the inputs are known to be good
    mine = jobs[rank::world]   # file i of the sorted list goes to rank i % world_size
    input_paths = {os.path.realpath(path) for path, _ in jobs}
    counts = {"done": 0, "skipped": 0, "failed": 0}
    model = load_upscaling_model(args.model, device) if mine else None
    # One bar over the files (on a terminal only); upscale() keeps its own over a large image's pixels.
    with tqdm(total=len(mine), unit="file", desc="files", disable=None) as bar:
        for source, rel in mine:
            try:
                counts[upscale_job(source, rel, out_dir, model, args, scale, size, input_paths)] += 1
            except Exception as exc:  # noqa: BLE001  (whatever fails one file, the others go on)
                report_failure(source, exc)
                counts["failed"] += 1
            bar.update()
    shard = f"rank {rank} of {world}: " if world > 1 else ""
    say(f"{shard}{summary(counts)} ({len(mine)} of {len(jobs)} files)")
    totals = tally_across_ranks(counts, world)
    if totals is not None and rank == 0:
        say(f"all {world} ranks: {summary(totals)} ({len(jobs)} files)")
    return 1 if counts["failed"] else 0


def summary(counts):
    return f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"


def tally_across_ranks(counts, world):
    """The counts summed over the ranks, or None outside torchrun (no MASTER_ADDR / MASTER_PORT, as
    when RANK and WORLD_SIZE are set by hand) or without torch.distributed's gloo backend.

    Under torchrun this also holds each rank until all are done: torchrun stops the other ranks as
    soon as one exits with an error, which would cut a rank's files short because another rank had
    a failed file. The group is made only here, at the end; the work itself needs none."""
    if world == 1 or not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return None
    import datetime

    import torch
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        return None
    keys = ("done", "skipped", "failed")
    try:
        # The wait for the slowest rank is the timeout: a day, not gloo's default half hour.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
        totals = torch.tensor([counts[k] for k in keys])
        dist.all_reduce(totals)
        dist.destroy_process_group()
    except (RuntimeError, ValueError) as exc:
        notice(f"no total over the ranks ({str(exc).splitlines()[0] if str(exc) else exc!r})")
        return None
    return dict(zip(keys, totals.tolist()))


def upscale_command(args):
    check_scale(args.scale)
    size = parse_size(args.size) if args.size is not None else None
    rank, world, local_rank = torchrun_shard()
    if is_single_file(args.inputs):
        if rank != 0:
            # One file is rank 0's: the other ranks must not write it a second time.
            notice(f"rank {rank} of {world}: one input file, upscaled by rank 0")
            return
        upscale_single(args, args.scale, size, local_rank)
        return 0
    return upscale_batch(args, args.scale, size, rank, world, local_rank)


# ---- eval -------------------------------------------------------------------------------------

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


# ---- models and --version ---------------------------------------------------------------------

def models_command(args):
    from .pretrained import PRETRAINED, cache_dir, cached_copy, source_of
    print(f"pretrained models (looked up in $LIIF_CUDA_WEIGHTS, then {cache_dir()}, else downloaded):")
    for name in sorted(PRETRAINED):
        entry = PRETRAINED[name]
        found = cached_copy(name)
        if found is None:
            cached = "no (downloaded and verified on first use)"
        elif found[1]:
            cached = f"yes, {found[0]} (sha256 verified)"
        else:
            cached = f"a file with another sha256 is at {found[0]}; remove or replace it"
        print(f"{name}: {entry.description}\n"
              f"  licence: {entry.licence}\n"
              f"  source:  {source_of(name)}\n"
              f"  sha256:  {entry.sha256} ({format_bytes(entry.size)}, {entry.size} bytes)\n"
              f"  cached:  {cached}")
    return 0


def version_text():
    import torch

    import liif_cuda
    return (f"liif-cuda {liif_cuda.__version__}, torch {torch.__version__}, "
            f"build_info {liif_cuda.build_info()}")


class VersionAction(argparse.Action):
    """--version: imports torch and the extension only when asked (the parser itself does not)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the liif_cuda and torch versions and liif_cuda.build_info(), and exit"):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


# ---- the parser -------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it in words
    (defaults like None read better as 'CUDA when available, else CPU') or the option is required."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or action.required:
            return text
        return super()._get_help_string(action)


UPSCALE_EPILOG = """\
one input file: -o is the output file (its extension gives the format).
several inputs, a folder or a glob pattern: -o is the output folder (created if missing), and
  <input stem>_x<scale><ext>   with --scale, e.g. photo_x2.5.jpg
  <input stem>_<W>x<H><ext>    with --size, e.g. photo_1920x1080.jpg
are written in it; <ext> is the input's, or --format's. Files of a folder keep their sub-folder
(with --recursive), files of a pattern their path below the pattern's leading folders without
wildcards (photos/*/*.png: <sub-folder>/<name>); images in the output folder are not inputs.
Existing outputs are skipped, unless --overwrite; a file that fails is reported and the others go
on; a summary line ends the run; the exit status is 1 if any file failed.
under torchrun (RANK, WORLD_SIZE, LOCAL_RANK): file i of the sorted list goes to rank
i % WORLD_SIZE, on cuda:LOCAL_RANK for CUDA; each rank prints its own summary, and rank 0
the total over the ranks when torchrun's rendezvous (MASTER_ADDR, MASTER_PORT) is there.
--size Wx or xH keeps the aspect ratio; a WxH of another aspect ratio gives a notice on stderr.
"""


def add_upscale_parser(sub):
    up = sub.add_parser("upscale", help="super-resolve images to any scale or size",
                        description="Super-resolve images with a LIIF model.",
                        epilog=UPSCALE_EPILOG, formatter_class=HelpFormatter)
    up.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="PNG, JPEG, TIFF or WebP image, folder, or glob pattern (quoted; expanded "
                         "by liif-cuda)")
    up.add_argument("-o", "--output", required=True,
                    help="output image (.png .jpg .tif .webp) for one input file; output folder "
                         "otherwise (no default: required)")
    target = up.add_mutually_exclusive_group(required=True)
    target.add_argument("--scale", type=float,
                        help="output / input size, e.g. 2.5 (default: none; give --scale or --size)")
    target.add_argument("--size",
                        help="output WIDTHxHEIGHT, e.g. 1920x1080, or 1920x / x1080 to keep the "
                             "aspect ratio (default: none; give --scale or --size)")
    up.add_argument("--model", default="edsr-baseline-liif",
                    help="pretrained name (see `liif-cuda models`) or checkpoint path")
    up.add_argument("--recursive", action="store_true",
                    help="take the images of the folders' sub-folders too (and let ** in a pattern "
                         "span folders)")
    up.add_argument("--format", choices=["png", "jpg", "tif", "webp"], default=None,
                    help="format of the outputs with several inputs (default: the input's)")
    up.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: CUDA when available, else CPU; cuda:LOCAL_RANK under torchrun")
    up.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    up.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS, default="fp32",
                    help=ENCODER_PRECISION_HELP)
    up.add_argument("--overwrite", action="store_true", help="replace existing output files")
    up.set_defaults(func=upscale_command)


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


def add_models_parser(sub):
    models = sub.add_parser("models", help="list the pretrained models: source, licence, sha256, "
                                           "cached or not", formatter_class=HelpFormatter)
    models.set_defaults(func=models_command)


def build_parser():
    parser = argparse.ArgumentParser(prog="liif-cuda", description="LIIF super-resolution",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)
    # One function per command: a new command is one more add_*_parser(sub) whose parser sets `func`.
    add_upscale_parser(sub)
    add_eval_parser(sub)
    add_models_parser(sub)
    from .training.cli import add_train_parser
    add_train_parser(sub, HelpFormatter)
    return parser


def main(argv=None):
    """Runs one command; returns the exit status (0, 1 when something failed, 2 for usage errors).
    A command's func returns its status (None meaning 0) or raises CliError."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
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
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
