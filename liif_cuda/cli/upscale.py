"""`liif-cuda upscale`: one file, or several files, folders and glob patterns into an output folder,
shared out among ranks under torchrun."""

import glob
import os
import re
import sys
import time

from ..upscaling import fit_size, keeps_aspect
from .common import (DEVICE_METAVAR, DEVICE_TORCHRUN_HELP, ENCODER_PRECISION_HELP,
                     ENCODER_PRECISIONS, PRECISION_HELP, PRECISIONS, CliError, HelpFormatter,
                     check_cuda_requested, check_precisions, check_writable_folder, device_type,
                     model_errors, notice, say)
from .image_files import (INPUT_FORMATS, OUTPUT_FORMATS, check_input, image_header_size,
                          read_image, write_image)
from .sizes import check_memory, check_scale, parse_size

# Outputs of at least this many pixels get upscale()'s progress bar over pixels.
PIXEL_BAR_MIN = 1 << 21
GLOB_MAGIC = re.compile(r"[*?[]")


def plan_output(source, in_w, in_h, scale, size):
    """(out_w, out_h) for one input; refuses outputs larger than memory, then gives the notice of a
    --size that changes the aspect ratio (not for an output that is refused anyway)."""
    from ..upscaling import output_size
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
    if size is not None and out_w < in_w and out_h < in_h:
        # --size is in pixels: "--size 10x" (10 wide) is easily meant as "10 times".
        notice(f"--size gives {out_w}x{out_h}, smaller than {source} ({in_w}x{in_h}); to enlarge "
               f"by a factor, use --scale")
    if size is None and out_w < in_w and out_h < in_h:
        notice(f"--scale {scale:g} gives {out_w}x{out_h}, smaller than {source} ({in_w}x{in_h}): "
               f"LIIF is made to enlarge")
    return out_w, out_h


def load_upscaling_model(name, device):
    from ..load import load_model
    try:
        return load_model(name, device=device)
    except model_errors() as exc:
        raise CliError(f"--model: {exc}") from None


def upscale_to_file(image, out_w, out_h, model, args, output, overwrite):
    """Upscales a loaded image into `output` (atomically); prints the result line."""
    from ..upscaling import upscale
    start = time.perf_counter()
    large = out_h * out_w >= PIXEL_BAR_MIN
    if large and not sys.stderr.isatty():
        # No bar in a log (it would leave fragments there): a line that the work has started.
        from tqdm import tqdm
        tqdm.write(f"{output}: upscaling to {out_w}x{out_h} ({out_w * out_h / 1e6:.1f} megapixels) "
                   f"from {image.width}x{image.height}", file=sys.stderr)
    result = upscale(image, size=(out_w, out_h), model=model, precision=args.precision,
                     encoder_precision=args.encoder_precision,
                     progress=large and sys.stderr.isatty())
    write_image(result, output, overwrite)
    say(f"{output}: {out_w}x{out_h} from {image.width}x{image.height} in "
        f"{time.perf_counter() - start:.1f} s")


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
    """The device of this process (--device checked by check_cuda_requested): --device or the
    default; cuda:LOCAL_RANK under torchrun, so that each rank has its own GPU."""
    import torch

    from ..upscaling import default_device
    device = requested or default_device()
    if device == "cuda" and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise CliError(f"LOCAL_RANK={local_rank}, but this process sees "
                           f"{torch.cuda.device_count()} CUDA GPU(s)", 2)
        device = f"cuda:{local_rank}"
    if device.startswith("cuda:"):
        # The current device too, for any allocation or launch that does not name one.
        torch.cuda.set_device(torch.device(device))
    return device


def is_single_file(inputs):
    """One input that is not a folder and not a glob pattern (a path that exists is taken
    literally, even with [ or * in its name): -o is then the output file, as it always was."""
    if len(inputs) != 1:
        return False
    path = inputs[0]
    return not os.path.isdir(path) and (os.path.exists(path) or not GLOB_MAGIC.search(path))


def upscale_single(args, scale, size, local_rank):
    source = args.inputs[0]
    check_input(source)  # first: a missing input is the error to name, not the -o it implies
    out_ext = os.path.splitext(args.output)[1].lower()
    if args.format is not None:
        raise CliError("--format is for several inputs; with one input the extension of -o gives "
                       "the format", 2)
    if out_ext == "":
        # Likely meant as a folder that is not there yet (one input into an existing folder works).
        raise CliError(f"output {args.output} has no extension: with one input, -o names the "
                       f"output file (.png, .jpg, .tif or .webp) or an existing folder", 2)
    if out_ext not in OUTPUT_FORMATS:
        raise CliError(f"output {args.output}: unsupported format (use .png, .jpg, .tif or .webp)", 2)
    if os.path.exists(args.output) and os.path.samefile(source, args.output):
        raise CliError(f"output {args.output} is the input; not replacing it")
    if os.path.exists(args.output) and not args.overwrite:
        raise CliError(f"output {args.output} exists; pass --overwrite to replace it")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise CliError(f"output folder {out_dir} does not exist")
    check_writable_folder(out_dir)
    device = upscale_device(args.device, local_rank)
    check_precisions(args, device)
    image = read_image(source)
    out_w, out_h = plan_output(source, image.width, image.height, scale, size)
    model = load_upscaling_model(args.model, device)
    upscale_to_file(image, out_w, out_h, model, args, args.output, args.overwrite)


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
            elif _is_image_name(path) and os.path.islink(path) and not os.path.exists(path):
                notice(f"{path} is a broken symbolic link (or a loop); left out")


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
    if os.path.islink(arg):
        raise CliError(f"input {arg} is a broken symbolic link (or a loop)")
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
    jobs, seen, by_target, earlier_outputs = [], set(), {}, 0
    for arg in args.inputs:
        explicit = os.path.isfile(arg)
        for path, rel in expand_input(arg, args.recursive):
            real = os.path.realpath(path)
            if not explicit and _inside(path, out_dir):
                earlier_outputs += 1
                continue
            if real in seen:
                continue
            seen.add(real)
            stem, ext = os.path.splitext(rel)
            key = (stem, "." + args.format if args.format else ext)  # the name up to its size tag
            if key in by_target:
                raise CliError(f"inputs {by_target[key]} and {path} would both be written to "
                               f"{os.path.join(out_dir, stem)}_*{key[1]} (* the size); upscale "
                               f"them separately", 2)
            by_target[key] = path
            jobs.append((path, rel))
    if not jobs:
        raise CliError("no image files in the inputs" + (
            f" ({earlier_outputs} inside the output folder {out_dir}, which are not taken as "
            f"inputs)" if earlier_outputs else ""))
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
    check_writable_folder(out_dir)


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
    check_precisions(args, device)
    jobs = collect_jobs(args, out_dir)
    make_output_folder(out_dir)  # only once the inputs are known to be good
    mine = jobs[rank::world]   # file i of the sorted list goes to rank i % world_size
    input_paths = {os.path.realpath(path) for path, _ in jobs}
    counts = {"done": 0, "skipped": 0, "failed": 0}
    model = load_upscaling_model(args.model, device) if mine else None
    shard = f"rank {rank} of {world}: " if world > 1 else ""
    # One bar over the files (on a terminal only); upscale() keeps its own over a large image's pixels.
    with tqdm(total=len(mine), unit="file", desc="files", disable=None) as bar:
        for source, rel in mine:
            try:
                counts[upscale_job(source, rel, out_dir, model, args, scale, size, input_paths)] += 1
            except KeyboardInterrupt:
                # What was done stays (each output is whole: written to a temporary name and
                # renamed); say what, then stop as an interrupt does.
                bar.close()
                left = len(mine) - sum(counts.values())
                say(f"{shard}interrupted at {source}: {summary(counts)}, {left} not done "
                    f"({len(mine)} of {len(jobs)} files)")
                raise
            except Exception as exc:  # noqa: BLE001  (whatever fails one file, the others go on)
                report_failure(source, exc)
                counts["failed"] += 1
            bar.update()
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
        notice(f"no total over the ranks ({(str(exc).splitlines() or [repr(exc)])[0]})")
        return None
    return dict(zip(keys, totals.tolist()))


def upscale_command(args):
    check_scale(args.scale)
    size = parse_size(args.size) if args.size is not None else None
    rank, world, local_rank = torchrun_shard()
    # Every rank, before any work (rank > 0 returns at once with one input file).
    check_cuda_requested(args.device, world)
    # One input and an existing folder as -o: written into the folder, as for several inputs.
    if is_single_file(args.inputs) and not os.path.isdir(args.output):
        if rank != 0:
            # One file is rank 0's: the other ranks must not write it a second time.
            notice(f"rank {rank} of {world}: one input file, upscaled by rank 0")
            return
        upscale_single(args, args.scale, size, local_rank)
        return 0
    return upscale_batch(args, args.scale, size, rank, world, local_rank)
UPSCALE_EPILOG = """\
one input file: -o is the output file (its extension gives the format), or an existing folder.
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
    up.add_argument("--device", type=device_type, metavar=DEVICE_METAVAR, default=None,
                    help=DEVICE_TORCHRUN_HELP)
    up.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    up.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS, default="fp32",
                    help=ENCODER_PRECISION_HELP)
    up.add_argument("--overwrite", action="store_true", help="replace existing output files")
    up.set_defaults(func=upscale_command)
