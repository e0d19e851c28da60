"""Builds and loads the host execution harness of the CUDA kernels (tests/harness) once per session."""

import functools
import os

import torch
import torch.utils.cpp_extension

import liif_cuda
import liif_reference as ref

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Per-block shared memory of the GPUs the wheel targets (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_SM86 = 101376   # sm_86 / sm_89: the smallest, the fast kernel just fits
SHARED_SM90 = 232448   # sm_90 (H100)
SHARED_DEFAULT = 49152  # without opting in: too small for the fast kernel, the generic one runs

FAST, GENERIC, TENSOR_CORE = 1, 2, 3


@functools.lru_cache(maxsize=None)
def load():
    """Compiles the harness (about a minute on 2 cores, then cached in build/) and returns the op."""
    build_dir = os.path.join(ROOT, "build", "host_harness")
    os.makedirs(build_dir, exist_ok=True)
    torch.utils.cpp_extension.load(
        name="liif_cuda_host_harness",
        sources=[os.path.join(HERE, "harness", "liif_query_harness.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        # -ffp-contract=off: the geometry's roundings must match the reference (csrc/liif_geometry.h).
        # -fno-strict-aliasing: the kernels read float arrays through float2/float4 as CUDA allows.
        extra_cflags=["-O2", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall",
                      "-Wextra", "-Wno-unknown-pragmas"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.liif_cuda_harness.query


FLAGS = dict(local_ensemble=True, feat_unfold=True, cell_decode=True)


def run(feat, coords, cells, mlp, shared=SHARED_SM90, reverse_order=False, precision="fp32",
        **flags):
    """The CUDA query path on the host: (output, the kernel that ran: FAST, GENERIC, TENSOR_CORE)."""
    flags = {**FLAGS, **flags}
    weights, biases = liif_cuda.mlp_parameters(mlp)
    with torch.no_grad():
        return load()(feat, coords, cells if flags["cell_decode"] else None, weights, biases,
                      flags["local_ensemble"], flags["feat_unfold"], flags["cell_decode"],
                      precision, shared, reverse_order)


def reference(feat, coords, cells, mlp, **flags):
    with torch.no_grad():
        return ref.query_rgb(feat, coords, cells, mlp, **{**FLAGS, **flags})
