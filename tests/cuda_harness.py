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

# The kernel that ran (csrc/cuda/liif_query_launch.h, KernelPath): TENSOR_CORE is the WMMA kernel,
# MMA the mma.sync one, MMA16 its 16-warp form, WGMMA the wgmma one, WGMMA_WS its warp-specialised
# form, WGMMA_MC its form with multicast weights, WGMMA_PP that form's ping-pong schedule.
FAST, GENERIC, TENSOR_CORE, MMA, MMA16, WGMMA, WGMMA_WS, WGMMA_MC, WGMMA_PP = range(1, 10)
WGMMA_PATHS = {"wgmma": WGMMA, "wgmma_ws": WGMMA_WS, "wgmma_mc": WGMMA_MC, "wgmma_pp": WGMMA_PP}


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


# Per-block shared memory of the A100 (sm_80): room for the mma.sync kernel in bf16 / fp16, not tf32.
SHARED_SM80 = 166912


def tensor_core_path(precision, local_ensemble, depth, out_dim, shared, kernel):
    """The kernel the planner must choose for a reduced precision and an MLP of `depth` hidden
    layers 256 wide (csrc/cuda/liif_query_launch.h, plan_launch) on the harness's device, which
    runs wgmma: the wgmma kernel (or its warp-specialised or multicast form, or the latter's
    ping-pong schedule) where it is preferred ("auto", the default, prefers the multicast form),
    the precision is bf16 or fp16, there is a hidden-to-hidden layer, out_dim <= 32 and its shared
    memory fits (sm_90's); else the mma.sync
    kernel (16 warps for "mma16" and "auto", else 8) where there is a hidden-to-hidden layer,
    out_dim <= 32 and its 128 rows fit; else WMMA (whose tf32 block without the local ensemble
    does not fit sm_86: then the exact FAST kernel)."""
    mma_fits = shared >= (SHARED_SM90 if precision == "tf32" else SHARED_SM80)
    if (kernel in ("auto", *WGMMA_PATHS) and precision != "tf32" and depth >= 2
            and out_dim <= 32 and shared >= SHARED_SM90):
        return WGMMA_PATHS.get(kernel, WGMMA_MC)
    if (kernel in ("auto", "mma", "mma16", *WGMMA_PATHS) and depth >= 2
            and out_dim <= 32 and mma_fits):
        return MMA16 if kernel in ("auto", "mma16") else MMA
    if precision == "tf32" and shared == SHARED_SM86 and not local_ensemble:
        return FAST
    return TENSOR_CORE


FLAGS = dict(local_ensemble=True, feat_unfold=True, cell_decode=True)


def run(feat, coords, cells, mlp, shared=SHARED_SM90, reverse_order=False, precision="fp32",
        tensor_core_kernel="mma", clusters_fit=True, **flags):
    """The CUDA query path on the host: (output, the kernel that ran: FAST, GENERIC, TENSOR_CORE,
    MMA, MMA16, WGMMA, WGMMA_WS, WGMMA_MC, WGMMA_PP). `tensor_core_kernel`: the one preferred for
    a reduced precision ("auto", "mma", "mma16", "wmma", "wgmma", "wgmma_ws", "wgmma_mc" or
    "wgmma_pp"); `clusters_fit` False: the emulated device fits none of the multicast kernel's
    clusters at once."""
    flags = {**FLAGS, **flags}
    weights, biases = liif_cuda.mlp_parameters(mlp)
    with torch.no_grad():
        return load()(feat, coords, cells if flags["cell_decode"] else None, weights, biases,
                      flags["local_ensemble"], flags["feat_unfold"], flags["cell_decode"],
                      precision, shared, reverse_order, tensor_core_kernel, clusters_fit)


def backward(grad_out, feat, coords, cells, weights, biases, needs_grad, chunk_rows=0,
             reverse_order=False, precision="fp32", **flags):
    """The CUDA backward (liif_cuda::query_backward's CUDA kernel) on the host: the gradients
    [feat, coords, cells, *weights, *biases], an empty tensor where `needs_grad` is False.
    `chunk_rows`: (query, neighbour) rows per chunk; 0: the GPU's choice."""
    load()
    flags = {**FLAGS, **flags}
    return torch.ops.liif_cuda_harness.query_backward(
        grad_out, feat, coords, cells if flags["cell_decode"] else None, weights, biases,
        flags["local_ensemble"], flags["feat_unfold"], flags["cell_decode"], needs_grad,
        chunk_rows, reverse_order, precision)


class _HostQuery(torch.autograd.Function):
    """The CUDA forward and backward on the host, as autograd sees them on a GPU."""

    @staticmethod
    def forward(ctx, feat, coords, cells, flags, chunk_rows, backward_precision, *params):
        n = len(params) // 2
        out, _ = load()(feat, coords, cells, list(params[:n]), list(params[n:]),
                        flags["local_ensemble"], flags["feat_unfold"], flags["cell_decode"],
                        "fp32", SHARED_SM90, False, "mma")
        ctx.flags, ctx.chunk_rows, ctx.has_cells = flags, chunk_rows, cells is not None
        ctx.backward_precision = backward_precision
        ctx.save_for_backward(feat, coords, cells, *params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        feat, coords, cells, *params = ctx.saved_tensors
        n = len(params) // 2
        needs = list(ctx.needs_input_grad[:3]) + list(ctx.needs_input_grad[6:])
        needs[2] = needs[2] and ctx.has_cells
        grads = backward(grad_out.contiguous(), feat, coords, cells, params[:n], params[n:], needs,
                         ctx.chunk_rows, precision=ctx.backward_precision, **ctx.flags)
        grads = [g if need else None for g, need in zip(grads, needs)]
        return (*grads[:3], None, None, None, *grads[3:])


def query_with_backward(feat, coords, cells, mlp, chunk_rows=0, backward_precision="fp32",
                        **flags):
    """liif_cuda.query's CUDA path on the host, forward (exact) and backward (in
    `backward_precision`): differentiable like it."""
    flags = {**FLAGS, **flags}
    weights, biases = liif_cuda.mlp_parameters(mlp)
    cells = cells if flags["cell_decode"] else None
    return _HostQuery.apply(feat, coords, cells, flags, chunk_rows, backward_precision, *weights,
                            *biases)


def reference(feat, coords, cells, mlp, **flags):
    with torch.no_grad():
        return ref.query_rgb(feat, coords, cells, mlp, **{**FLAGS, **flags})
