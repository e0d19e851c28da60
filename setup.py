"""Build of liif_cuda: the Python package and its C++ extension liif_cuda._C.

The extension is compiled against the torch installed in the build environment and only runs with that
torch release, so the wheel pins torch to the same major.minor version.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")

# Our sources build warning-free; -ffp-contract=off keeps the compiler from fusing the per-query
# geometry's multiply-adds, whose rounding must match the reference (csrc/liif_geometry.h).
CXX_FLAGS = ["-O3", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off"]
# torch's headers are included as system headers so that -Werror applies to our code only.
CXX_FLAGS += [f"-isystem{p}" for p in include_paths()]
# ATen's parallel_for is a header template expanded into our code: without OpenMP it runs serially.
# The libgomp that torch ships is already loaded when the extension loads, so it serves both.
OPENMP_FLAGS = ["-fopenmp"]


def extension():
    sources = [
        os.path.join(CSRC, "python_module.cpp"),
        os.path.join(CSRC, "liif_query_schema.cpp"),
        *sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))),
    ]
    return CppExtension(
        "liif_cuda._C",
        sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": CXX_FLAGS + OPENMP_FLAGS},
        extra_link_args=OPENMP_FLAGS,
    )


torch_major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])

setup(
    packages=find_packages(include=["liif_cuda", "liif_cuda.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[f"torch=={torch_major_minor}.*", "numpy"],
)
