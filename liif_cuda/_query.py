"""The public fused query: a drop-in replacement for LIIF's `query_rgb`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Tuple, Union

import torch

from ._mlp import mlp_parameters
from ._validation import SUPPORTED_DTYPES, check_query_args

_COMPUTED_IN_FLOAT32 = (torch.float16, torch.bfloat16)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
BACKWARD_PRECISIONS = ("fp32", "bf16")
_AUTOCAST_PRECISION = {torch.float16: "fp16", torch.bfloat16: "bf16"}


# LIIF's three variant flags, query's keyword arguments (and attributes of LIIF models).
QUERY_FLAGS = ("local_ensemble", "feat_unfold", "cell_decode")


def _autocast_dtype(feat):
    """The autocast dtype in effect for feat's device type, or None: also for float64 feat, which
    autocast leaves alone (as in PyTorch), and device types autocast does not know (meta)."""
    if feat.dtype == torch.float64:
        return None
    try:
        if not torch.is_autocast_enabled(feat.device.type):
            return None
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(feat.device.type)


def _check_no_func_transform():
    """torch.func's transforms cannot run the operator: it has no batching rule (vmap) and no
    forward-mode derivative, and its backward is registered for torch.autograd, which
    torch.func.grad does not call. Said here, because jvp and jacfwd would otherwise return zero
    tangents silently (torch's behaviour for such operators) and grad would fail with a message
    about an autograd.Function the caller never wrote. torch.func.functionalize is fine."""
    try:
        interpreter = torch._C._functorch.peek_interpreter_stack()
    except AttributeError:  # a torch without functorch's interpreter stack
        return
    if interpreter is None:
        return
    transform = interpreter.key()
    if transform in (torch._C._functorch.TransformType.Vmap, torch._C._functorch.TransformType.Grad,
                     torch._C._functorch.TransformType.Jvp):
        raise NotImplementedError(
            f"liif_cuda.query does not support torch.func transforms (here {transform.name}: vmap, "
            f"grad, jvp, jacrev, jacfwd, hessian): it has no batching rule and no forward-mode "
            f"derivative. For gradients use torch.autograd (.backward(), torch.autograd.grad); for "
            f"a batch, stack it into feat's batch dimension")


def _check_floating(t, name):
    if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
        kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating-point tensor, got {kind}")


# What query's `imnet` may be (mlp_parameters): an nn.Sequential of Linear / ReLU, a module holding
# one as `.layers`, or (weight, bias) pairs.
ImNet = Union[torch.nn.Module, Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]]]


def query(feat: torch.Tensor, coords: torch.Tensor, cells: Optional[torch.Tensor], imnet: ImNet, *,
          local_ensemble: bool = True, feat_unfold: bool = True, cell_decode: bool = True,
          precision: Optional[str] = None, backward_precision: Optional[str] = None,
          out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LIIF's `query_rgb` as one fused operator: (B, Q, out_dim) predictions for query points.

    Args:
        feat: (B, C, H, W) feature map of the encoder.
        coords: (B, Q, 2) query coordinates in [-1, 1], (y, x) order, as `make_coord` makes them.
            Coordinates outside [-1, 1] behave as in the reference: sampling is clamped to the map,
            the relative coordinate is not. A query with a NaN or infinite coordinate returns NaN in
            every channel (the reference's result) and never reads outside the map.
        cells: (B, Q, 2) size of an output pixel, (2 / H_out, 2 / W_out); may be None when
            `cell_decode` is False.
        imnet: the MLP: an `nn.Sequential` of Linear/ReLU, a module with such a `.layers` and
            no forward of its own or that of LIIF's `MLP` / mmediting's `MLPRefiner` (any other
            forward is refused: the fused op computes the layers only), or a sequence of
            (weight, bias) pairs.
        local_ensemble, feat_unfold, cell_decode: LIIF's three flags (all True in published models).
        precision: the arithmetic of the MLP's hidden layers. "fp32" (exact, the default), or
            operands rounded once per layer with float32 accumulation: "tf32" (relative error
            about 2e-4), "fp16" (about 2e-4) or "bf16" (about 1.5e-3). Layer 0, the last layer and
            the blend stay float32. On CUDA these run on tensor cores, for the published MLP shape
            (hidden layers all 256 wide, out_dim <= 128) on GPUs of compute capability 8.0 and
            newer; other MLPs and GPUs compute float32. On the CPU "bf16" runs the hidden layers on
            the processor's bf16 dot-product units (AVX512-BF16; any MLP of two layers or more),
            in the same rounding model as the CUDA kernel; a CPU without them (see
            `liif_cuda.build_info()["cpu_bf16"]`; LIIF_CUDA_CPU_BF16=0 forces it) computes
            float32, and "tf32" and "fp16" compute float32 on every CPU. None (the default):
            "fp32", or, inside `torch.autocast` for feat's device type, the autocast dtype's path.
        backward_precision: the arithmetic of the gradients autograd computes. "fp32": those of the
            exact float32 / float64 function, whatever `precision` is. "bf16": the backward
            recomputes the forward as precision "bf16" computes it (activations rounded to bf16,
            products with float32 accumulation), and the layers between hidden layers multiply
            their output gradient, rounded to bf16, by those bf16 activations and weights with
            float32 results; layer 0, the last layer, the blend and the geometry stay float32
            (but for the convolution's backward on the CPU, in bf16 as under autocast). Its
            gradient errors stay below those of the reference under autocast bf16 (1e-3 to 5e-2
            at the training shape, docs/operator.md). It runs on CUDA GPUs of compute capability
            8.0 and newer and on CPUs with AVX512-BF16, for MLPs with a layer between hidden
            layers; elsewhere the gradients are the exact ones. None (the default): "bf16" inside
            `torch.autocast` with bfloat16 for feat's device type, else "fp32".
        out_dtype: the result's floating dtype. None (the default): the autocast dtype inside
            `torch.autocast`, else the inputs' dtype (see Dtypes). The result is computed in
            float32 (float64 for float64 inputs) and rounded once to it.

    Devices: CPU tensors run the CPU kernel, CUDA tensors the CUDA kernel (when liif_cuda was built
    with it, see `liif_cuda.build_info()`), on the tensors' device and the current stream.

    Dtypes: float32 and float64 are computed in their own precision. float16 and bfloat16 inputs are
    computed in float32 and the result is returned in the input dtype. All tensors, MLP parameters
    included, must share one dtype and device. A reduced `precision` needs float32, float16 or
    bfloat16 inputs. Inside `torch.autocast` (for feat's device type) the inputs may have any
    floating dtypes: they are converted to float32, the result comes back in the autocast dtype, as
    for PyTorch's own autocast operators, and `precision` defaults to the autocast dtype's path
    ("fp16" or "bf16", each as described above). float64 feat is left alone by autocast.

    Autograd: gradients flow to feat, coords, cells and every MLP weight and bias, each computed only
    if it is required. The backward (the operator liif_cuda::query_backward) recomputes the forward
    tile by tile: a fused C++ kernel on the CPU, deterministic; on CUDA, chunks of queries through
    its own kernels and cuBLAS products, deterministic except for the per-LR-cell sum of the
    first-layer map's gradient (atomic adds, unless torch.use_deterministic_algorithms(True)).
    Gradients are the exact float32 / float64 function's whatever the precision, unless
    `backward_precision` is "bf16" (see above). Double backward raises an error.
    """
    if not torch.compiler.is_compiling():
        _check_no_func_transform()
    weights, biases = mlp_parameters(imnet)
    _check_floating(feat, "feat")
    _check_floating(coords, "coords")
    if cell_decode:
        _check_floating(cells, "cells")
    else:
        cells = None
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check_floating(w, f"imnet layer {i} weight")
        _check_floating(b, f"imnet layer {i} bias")

    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype)
                                      and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    if backward_precision is not None and backward_precision not in BACKWARD_PRECISIONS:
        raise ValueError(f"backward_precision must be one of {BACKWARD_PRECISIONS} or None, got "
                         f"{backward_precision!r}")
    autocast_dtype = _autocast_dtype(feat)
    # Inputs computed in float32: every one inside autocast (as autocast does for the operators it
    # runs in float32, the result in the autocast dtype); float16 / bfloat16 ones of one dtype.
    to_float32, required_dtype = False, None
    if autocast_dtype is not None:
        result_dtype = out_dtype or autocast_dtype
        precision = precision or _AUTOCAST_PRECISION.get(autocast_dtype, "fp32")
        if backward_precision is None and autocast_dtype == torch.bfloat16:
            backward_precision = "bf16"
        to_float32 = True
    else:
        precision = precision or "fp32"
        input_dtype = feat.dtype
        result_dtype = out_dtype or input_dtype
        if input_dtype in _COMPUTED_IN_FLOAT32:
            to_float32, required_dtype = True, input_dtype
        elif input_dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"feat must be float32, float64, float16 or bfloat16, got {input_dtype}")
    if to_float32:
        def convert(t, name):
            if required_dtype is not None and t.dtype != required_dtype:
                raise ValueError(f"{name} must have feat's dtype {required_dtype} (all inputs "
                                 f"share one dtype outside autocast), got {t.dtype}")
            return t.float()
        feat, coords = convert(feat, "feat"), convert(coords, "coords")
        cells = None if cells is None else convert(cells, "cells")
        weights = [convert(w, f"imnet layer {i} weight") for i, w in enumerate(weights)]
        biases = [convert(b, f"imnet layer {i} bias") for i, b in enumerate(biases)]
    if precision != "fp32" and feat.dtype != torch.float32:
        raise ValueError(f"precision={precision!r} needs float32, float16 or bfloat16 inputs, "
                         f"got {feat.dtype} (float64 is always computed in float64)")
    backward_precision = backward_precision or "fp32"
    if backward_precision != "fp32" and feat.dtype != torch.float32:
        raise ValueError(f"backward_precision={backward_precision!r} needs float32, float16 or "
                         f"bfloat16 inputs, got {feat.dtype}")

    check_query_args(feat, coords, cells, weights, biases, feat_unfold, cell_decode)
    args = (feat, coords, cells, weights, biases, local_ensemble, feat_unfold, cell_decode,
            precision, backward_precision)
    if (torch.is_grad_enabled() and not torch.compiler.is_exporting()
            and not torch.jit.is_tracing() and any(t is not None and t.requires_grad
                                                   for t in (feat, coords, cells, *weights, *biases))):
        # Autograd will run the backward: keep the first-layer map for it rather than make it
        # again (B x H x W x width0 values, about a twentieth of the training step's query time).
        # Not in torch.export: whether there is a map depends on the shapes (saves_first_layer_map),
        # which a program exported for any number of queries cannot decide; nor in torch.jit.trace,
        # whose check of the trace reruns without gradients. Their backward, if one runs, makes
        # the map again.
        out, _ = torch.ops.liif_cuda.query_saving_map(*args)
    else:
        out = torch.ops.liif_cuda.query(*args)
    return out.to(result_dtype)
