"""`liif-cuda models` and `liif-cuda --version`."""

import argparse

from .common import HelpFormatter
from .sizes import format_bytes

def models_command(args):
    from ..pretrained import PRETRAINED, cache_dir, cached_copy, source_of
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


def add_models_parser(sub):
    models = sub.add_parser("models", help="list the pretrained models: source, licence, sha256, "
                                           "cached or not",
                            description="List the pretrained models (names for --model and "
                                        "liif_cuda.load_model): their source, licence and sha256, "
                                        "and whether the weights are cached here "
                                        "(LIIF_CUDA_WEIGHTS, ~/.cache/liif_cuda).",
                            formatter_class=HelpFormatter)
    models.set_defaults(func=models_command)
