"""What the commands of the `liif-cuda` command line share: the error that ends a command with one
line, notices and results printed around progress bars, the help formatter and the precisions."""

import argparse
import re
import sys
import tempfile

# liif_cuda.PRECISIONS, spelled out so that the parser is built without importing torch.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
PRECISION_HELP = ("query arithmetic: fp32 exact (default); tf32, bf16, fp16 on CUDA tensor cores; "
                  "bf16 also on CPUs with AVX512-BF16 (float32 on other CPUs)")
# liif_cuda.upscaling.ENCODER_PRECISIONS
ENCODER_PRECISIONS = ("fp32", "bf16", "fp16")
ENCODER_PRECISION_HELP = ("encoder arithmetic: fp32 (default), or autocast in bf16 (CUDA, or CPUs "
                          "with AVX512 or AMX; float32 on other CPUs) or fp16 (CUDA)")


# --device: the forms the three commands take (load.check_device takes the same and more).
DEVICE_METAVAR = "cpu|cuda|cuda:N"
DEVICE_HELP = ("cpu, cuda or cuda:N (default: CUDA when available, else CPU); cuda is the first "
               "visible GPU, cuda:N the N-th from 0 (CUDA_VISIBLE_DEVICES chooses which GPUs are "
               "visible)")
DEVICE_TORCHRUN_HELP = DEVICE_HELP + ("; under torchrun, cuda is cuda:LOCAL_RANK and cuda:N is "
                                      "refused")


def device_type(text):
    """argparse's type of --device: "cpu", "cuda" or "cuda:N", N in the ASCII digits 0-9 (re's
    digit class would take other scripts' digits too), leading zeros dropped ("cuda:01" is
    cuda:1; torch.device refuses it). Anything else is argparse's one-line usage error, which
    names --device, instead of torch's "Invalid device string" at the first use."""
    match = re.fullmatch(r"cpu|cuda(?::([0-9]+))?", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N (N a GPU index, 0 "
                                          f"for the first), got {text!r}")
    return text if match.group(1) is None else f"cuda:{int(match.group(1))}"


def is_cuda(device):
    """Whether a --device value (or default_device()'s) is CUDA: "cuda" and "cuda:N" alike."""
    return device == "cuda" or device.startswith("cuda:")


class CliError(Exception):
    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def notice(message):
    """Notices (not errors) go to stderr, through tqdm so that they do not tear a progress bar."""
    from tqdm import tqdm
    tqdm.write(f"notice: {message}", file=sys.stderr)


def cannot_write_into(folder):
    """Why a file cannot be created in `folder` (read-only, no permission, /proc), or None: found
    by creating one and removing it, since os.access says yes to root everywhere."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".liif-cuda-probe-"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def check_writable_folder(folder):
    """An output folder that takes no file is found before the work."""
    why = cannot_write_into(folder)
    if why is not None:
        raise CliError(f"cannot write into the output folder {folder} ({why})")


def say(message):
    """Results go to stdout, through tqdm for the same reason."""
    from tqdm import tqdm
    tqdm.write(message, file=sys.stdout)


def check_cuda_requested(requested, world=1):
    """--device cuda or cuda:N needs a CUDA GPU (GPU N visible) and liif_cuda's CUDA kernels: one
    line before any work, not torch's assertion or a missing kernel later. The reasons are
    load.check_device's. Under torchrun with several processes (`world`), each process takes
    cuda:LOCAL_RANK: a cuda:N would put them all on one GPU (NCCL refuses that, or the ranks
    share it unawares), so it is refused."""
    if requested is None or not is_cuda(requested):
        return
    if requested != "cuda" and world > 1:
        raise CliError(f"--device {requested}: under torchrun (WORLD_SIZE={world}) each process "
                       f"takes cuda:LOCAL_RANK; pass --device cuda", 2)
    from ..load import check_device
    try:
        check_device(requested, name=f"--device {requested}")
    except ValueError as exc:
        raise CliError(str(exc), 2) from None


def model_errors():
    """What load_model raises for a --model it cannot load (a missing file or unknown name, a file
    that is not a LIIF checkpoint, pretrained weights that cannot be had)."""
    from ..checkpoints import CheckpointError
    from ..load import ModelNotFound
    from ..pretrained import WeightsNotFound
    return (ModelNotFound, CheckpointError, WeightsNotFound)


def check_precisions(args, device):
    """--encoder-precision fp16 without CUDA is refused; a --precision or --encoder-precision that
    the CPU runs in float32 (the documented fallbacks) is said, since it looks like a reduced
    precision but takes float32's time. Returns the names of those that run float32 here
    ("precision", "encoder_precision"), so that a saved result can say so."""
    if args.encoder_precision == "fp16" and not is_cuda(device):
        raise CliError("--encoder-precision fp16 needs a CUDA device (on the CPU use bf16)", 2)
    from ..upscaling import float32_fallbacks
    ran_float32 = float32_fallbacks(args.precision, args.encoder_precision,
                                    "cpu" if device == "cpu" else "cuda")
    if "precision" in ran_float32:
        if args.precision == "bf16":
            notice("--precision bf16 runs float32 on this CPU (it has no AVX512-BF16)")
        else:
            notice(f"--precision {args.precision} runs float32 on the CPU (tf32 and fp16 are "
                   f"CUDA tensor-core precisions; the CPU's reduced precision is bf16)")
    if "encoder_precision" in ran_float32:
        notice("--encoder-precision bf16 runs float32 on this CPU (torch has no bf16 "
               "convolutions for it: they need AVX512 or AMX)")
    return ran_float32


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own errors (a bad value, a missing option) in one line with the commands' own
    prefix ("liif-cuda: error:"), instead of a usage block before it; the command's --help has the
    usage."""

    def error(self, message):
        program = self.prog.split()[0]  # "liif-cuda", also for a command's parser
        self.exit(2, f"{program}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it in words
    (defaults like None read better as 'CUDA when available, else CPU') or the option is required."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or action.required:
            return text
        return super()._get_help_string(action)
