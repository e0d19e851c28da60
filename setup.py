"""Build of liif_cuda: the Python package and its extension liif_cuda._C (CPU and, when possible, CUDA).

The extension is compiled against the torch installed in the build environment and only runs with that
torch release, so the wheel pins torch to the same major.minor version.

CUDA kernels are compiled whenever a CUDA toolkit (CUDA_HOME, or nvcc on PATH) and a CUDA build of
torch are present; no GPU is needed. Environment:
  LIIF_CUDA_BUILD=auto|1|0   auto (default) as above; 1 requires CUDA (and fails without it); 0 CPU only
  TORCH_CUDA_ARCH_LIST       GPU targets, default "8.0;8.6;8.9+PTX;9.0a" (A100, RTX 30, RTX 40 / L4,
                             PTX for newer GPUs, and H100 / H200 with the Hopper-only wgmma
                             kernel: 9.0a, not 9.0, whose code has no wgmma; with both listed the
                             wgmma kernel is never planned, since which one a GPU loads is the
                             driver's choice)
  LIIF_WERROR=1|0            1 (default, and CI): warnings in our sources and register spills fail
                             the build; 0 keeps them warnings (an untried compiler or header set)
nvcc prints the ptxas report (registers, shared memory, spills) of every kernel into the build log
(`pip install -v`), and, with LIIF_WERROR=1, the build fails if a kernel spills registers to local memory.
"""

import glob
import os

import setuptools
from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    # --no-build-isolation builds against the environment's torch, which must come first.
    raise SystemExit("liif_cuda builds against an installed torch, and there is none: pip install "
                     "torch, then pip install --no-build-isolation . (docs/install.md)") from None

# pyproject.toml's `license = "BSD-3-Clause"` (an SPDX expression) needs setuptools 77; with
# --no-build-isolation the installed setuptools is used whatever pyproject.toml asks for.
if int(setuptools.__version__.split(".")[0]) < 77:
    raise SystemExit(f"liif_cuda needs setuptools >= 77 to build, found {setuptools.__version__}: "
                     f"pip install 'setuptools>=77' (or build without --no-build-isolation)")
from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension, CUDAExtension,
                                       include_paths)

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9+PTX;9.0a"


def werror():
    mode = os.environ.get("LIIF_WERROR", "1").strip()
    if mode not in ("1", "0"):
        raise SystemExit(f"LIIF_WERROR must be 1 or 0, got {mode!r}")
    return mode == "1"


WERROR = werror()
# Our sources build warning-free; -ffp-contract=off keeps the compiler from fusing the per-query
# geometry's multiply-adds, whose rounding must match the reference (csrc/liif_geometry.h).
CXX_FLAGS = ["-O3", "-Wall", "-Wextra", "-ffp-contract=off"] + (["-Werror"] if WERROR else [])
# ATen's parallel_for is a header template expanded into our code: without OpenMP it runs serially.
# The libgomp that torch ships is already loaded when the extension loads, so it serves both.
OPENMP_FLAGS = ["-fopenmp"]
NVCC_FLAGS = [
    "-O3",
    "-lineinfo",  # source lines in profilers, no effect on the code
    # No --use_fast_math: the geometry's roundings must match the reference, and the MLP stays IEEE.
] + ([
    # The CUDA translation unit includes no torch header, so every warning is ours: all are errors.
    "-Werror=all-warnings",
    "-Xcompiler=-Wall,-Wextra,-Werror",
    # ptxas: print registers, shared memory and spills per kernel, and fail on any spill.
    "-Xptxas=-v,-warn-spills,-Werror",
] if WERROR else ["-Xcompiler=-Wall,-Wextra", "-Xptxas=-v,-warn-spills"])


def cuda_requested():
    mode = os.environ.get("LIIF_CUDA_BUILD", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"LIIF_CUDA_BUILD must be auto, 1 or 0, got {mode!r}")
    # torch guesses CUDA_HOME from nvcc's location when the variable is unset; a toolkit needs both
    # nvcc and the runtime headers there.
    toolkit = CUDA_HOME is not None and all(
        os.path.exists(os.path.join(CUDA_HOME, *part))
        for part in (("bin", "nvcc"), ("include", "cuda_runtime_api.h")))
    available = torch.version.cuda is not None and toolkit
    if mode == "auto" and torch.version.cuda is not None and not toolkit:
        print(f"liif_cuda: no complete CUDA toolkit at CUDA_HOME={CUDA_HOME} (nvcc and "
              f"include/cuda_runtime_api.h); building the CPU kernel only")
    if mode == "1" and not available:
        why = ("torch is a CPU build" if torch.version.cuda is None
               else f"no nvcc and CUDA headers in CUDA_HOME={CUDA_HOME} (set CUDA_HOME, "
                    f"e.g. /usr/local/cuda)")
        raise SystemExit(f"LIIF_CUDA_BUILD=1 but the CUDA kernels cannot be built: {why}")
    return available if mode == "auto" else mode == "1"


def builds_wgmma(archs):
    """Whether compute capability 9.0 GPUs run this build's sm_90a code, which alone has the wgmma
    kernel: 9.0a is a target and plain 9.0 is not."""
    targets = [a.split("+")[0].strip() for a in archs.replace(" ", ";").split(";")]
    return "9.0a" in targets and "9.0" not in targets


def write_build_config(with_cuda, archs):
    """A generated header telling the CUDA operator and liif_cuda.build_info() how the extension
    was built."""
    folder = os.path.join(ROOT, "build", "generated")
    os.makedirs(folder, exist_ok=True)
    text = ("// Generated by setup.py.\n#pragma once\n"
            + ("#define LIIF_WITH_CUDA 1\n" if with_cuda else "")
            + ("#define LIIF_WGMMA_BUILT 1\n" if with_cuda and builds_wgmma(archs) else "")
            + f'#define LIIF_CUDA_ARCHS "{archs}"\n')
    path = os.path.join(folder, "liif_build_config.h")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return folder


def extension():
    with_cuda = cuda_requested()
    sources = [
        os.path.join(CSRC, "python_module.cpp"),
        os.path.join(CSRC, "liif_query_schema.cpp"),
        *sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))),
    ]
    archs = ""
    if with_cuda:
        # torch's CUDAExtension reads the targets from this variable.
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    print(f"liif_cuda: building the CPU kernel{' and CUDA kernels for ' + archs if with_cuda else ''}")
    include_dirs = [os.path.join(ROOT, CSRC), write_build_config(with_cuda, archs)]
    kind = CUDAExtension if with_cuda else CppExtension
    # torch's (and CUDA's) headers are included as system headers so that -Werror applies to our
    # code only.
    system_includes = [f"-isystem{p}" for p in include_paths("cuda" if with_cuda else "cpu")]
    compile_args = {"cxx": CXX_FLAGS + system_includes + OPENMP_FLAGS}
    if with_cuda:
        compile_args["nvcc"] = NVCC_FLAGS
    return kind("liif_cuda._C", sources, include_dirs=include_dirs,
                extra_compile_args=compile_args, extra_link_args=OPENMP_FLAGS)


torch_major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])

setup(
    # The training recipes' configs (liif-cuda train --config edsr-baseline-liif): a folder of data
    # without __init__.py, named as a package so that setuptools installs it without a warning.
    packages=find_packages(include=["liif_cuda", "liif_cuda.*"]) + ["liif_cuda.training.configs"],
    package_data={"liif_cuda": ["py.typed"], "liif_cuda.training.configs": ["*.yaml"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[f"torch=={torch_major_minor}.*", "numpy", "Pillow", "tqdm", "PyYAML"],
)
