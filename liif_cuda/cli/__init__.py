"""The `liif-cuda` command line (docs/cli.md): one module per command, this one builds the parser
and runs a command.

    liif-cuda upscale INPUT... -o OUTPUT (--scale S | --size WxH|Wx|xH) [--model NAME|PATH]
                      [--recursive] [--format png|jpg|tif|webp] [--overwrite]
                      [--device cpu|cuda|cuda:N] [--precision fp32|tf32|bf16|fp16]
                      [--encoder-precision fp32|bf16|fp16]
    liif-cuda eval --model NAME|PATH|bicubic --data DIR [--data DIR ...] --scales 2,3,4
                   --protocol mmedit|mmagic|paper|classic [--lr-dir DIR] [--resize pillow|matlab]
                   [--crop N] [--div2k] [--device cpu|cuda|cuda:N] [--precision fp32|tf32|bf16|fp16]
                   [--encoder-precision fp32|bf16|fp16] [--json PATH]
    liif-cuda train --config CONFIG.yaml|NAME --out RUN_DIR [--resume] [--init NAME|PATH]
                    [--device cpu|cuda|cuda:N] [--precision fp32|bf16|fp16] [--workers N]
    liif-cuda models
    liif-cuda --version

One input file: OUTPUT is the output file. Several inputs, a folder or a glob pattern: OUTPUT is a
folder, outputs are named <stem>_x<scale><ext> or <stem>_<W>x<H><ext>, existing ones are skipped, a
file that fails is reported and the others go on; under torchrun the files are shared out among ranks.

Errors (bad paths, unreadable files, bad scales or sizes, outputs too large for memory, existing
outputs without --overwrite) print one line to stderr and exit with status 2 (usage) or 1 (other);
every output file is written to a temporary name and renamed at the end, so it is never left partial.
"""

import difflib
import re
import sys

from ..upscaling import fit_size, keeps_aspect
from .common import PRECISIONS, ArgumentParser, CliError, HelpFormatter
from .evaluate import add_eval_parser
from .info import VersionAction, add_models_parser
from .sizes import format_bytes
from .upscale import add_upscale_parser

__all__ = ["main", "build_parser", "CliError", "PRECISIONS", "fit_size", "format_bytes",
           "keeps_aspect"]


def build_parser():
    parser = ArgumentParser(prog="liif-cuda", description="LIIF super-resolution",
                            formatter_class=HelpFormatter)
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)  # their parsers are ArgumentParsers
    # One function per command: a new command is one more add_*_parser(sub) whose parser sets `func`.
    add_upscale_parser(sub)
    add_eval_parser(sub)
    add_models_parser(sub)
    from ..training.cli import add_train_parser
    add_train_parser(sub, HelpFormatter)
    parser.commands = sub.choices
    return parser


def check_options_known(parser, argv):
    """An option the command does not have is named, with the closest ones, before argparse parses:
    argparse would first complain about a required option the typo was meant to give
    ("--scael 2": "one of the arguments --scale --size is required"), or print the top-level usage.
    Abbreviations of an option, which argparse accepts, and values after "--" pass."""
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = getattr(parser, "commands", {}).get(command)
    if sub is None:
        return  # no command, or an unknown one: argparse says so
    known = sub._option_string_actions
    for arg in argv[argv.index(command) + 1:]:
        if arg == "--":
            return
        if not arg.startswith("-") or arg == "-" or re.match(r"-\.?\d", arg):
            continue  # a value (a negative number included)
        name = arg.split("=", 1)[0]
        if name in known or (not name.startswith("--") and name[:2] in known):  # -oFILE
            continue
        if name.startswith("--") and any(option.startswith(name) for option in known):
            continue  # an abbreviation (argparse refuses an ambiguous one itself)
        close = difflib.get_close_matches(name, [o for o in known if o.startswith("--")], n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        sub.error(f"unrecognized option {name}{hint}")


# Options whose value may start with "-": argparse takes "-5x" or "-1e-9" (not plain negative
# numbers) for an unknown option and says only "expected one argument"; joined as "--size=-5x", the
# value reaches the option's own check, whose message says what is wrong with it.
DASHED_VALUE_OPTIONS = ("--size", "--scale", "--scales", "--crop")


def join_dashed_values(argv):
    out, i = [], 0
    while i < len(argv):
        if argv[i] in DASHED_VALUE_OPTIONS and i + 1 < len(argv) and re.match(r"-[\d.]",
                                                                               argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv=None):
    """Runs one command; returns the exit status (0, 1 when something failed, 2 for usage errors).
    A command's func returns its status (None meaning 0) or raises CliError."""
    parser = build_parser()
    argv = join_dashed_values([str(a) for a in (sys.argv[1:] if argv is None else argv)])
    if not argv:  # the help says more than argparse's "the following arguments are required"
        parser.print_help(sys.stderr)
        return 2
    check_options_known(parser, argv)
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
