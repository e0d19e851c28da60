"""`precision` and torch.autocast at the Python level, on the CPU (the tensor-core kernel itself:
tests/test_tensor_core_harness.py on the host, tests/test_query_cuda.py on a GPU).

On the CPU "tf32" and "fp16" compute float32 and "bf16" the CPU bf16 path (float32 without native
bf16; both in tests/test_query_cpu_bf16.py): results in the dtype the same call returns on CUDA.
"""

import copy

import pytest
import torch
from conftest import relative_error
from helpers import REDUCED, make_mlp, random_inputs

import liif_cuda
import liif_reference as ref


@pytest.fixture(scope="module")
def problem():
    feat, coords, cells = random_inputs(2, 4, 6, 5, 50, seed=7, spread=1.1)
    return feat, coords, cells, make_mlp(ref.imnet_in_dim(4), [256, 256], 3, torch.float32)


@pytest.mark.parametrize("precision", REDUCED)
def test_every_precision_returns_float32(problem, precision):
    feat, coords, cells, mlp = problem
    with torch.no_grad():
        out = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_returns_the_autocast_dtype(problem, dtype):
    """As PyTorch's autocast operators do: inputs of any floating dtype, result in the autocast
    dtype; the values are those of the autocast dtype's precision, rounded once."""
    feat, coords, cells, mlp = problem
    feat = feat.to(dtype)  # as an encoder under autocast returns it; mixed dtypes are fine
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    with torch.no_grad():
        exact = liif_cuda.query(feat.float(), coords, cells, mlp, precision=precision)
        with torch.autocast("cpu", dtype=dtype):
            out = liif_cuda.query(feat, coords, cells, mlp)
    assert out.dtype == dtype
    assert torch.equal(out, exact.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_out_dtype_keeps_the_unrounded_result(problem, dtype):
    """out_dtype=float32 inside autocast: the same arithmetic, the result not rounded to the
    autocast dtype (what liif_cuda.patch uses, as the original query_rgb returns float32 there)."""
    feat, coords, cells, mlp = problem
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    with torch.no_grad():
        exact = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
        with torch.autocast("cpu", dtype=dtype):
            out = liif_cuda.query(feat.to(dtype), coords, cells, mlp, out_dtype=torch.float32)
        wide = liif_cuda.query(feat, coords, cells, mlp, out_dtype=torch.float64)
        narrow = liif_cuda.query(feat.double(), coords.double(), cells.double(),
                                 copy.deepcopy(mlp).double(), out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, liif_cuda.query(feat.to(dtype).float(), coords, cells, mlp,
                                            precision=precision))
    assert relative_error(out, exact) < 1e-2 and not torch.equal(out, exact.to(dtype).float())
    assert wide.dtype == torch.float64 and narrow.dtype == torch.float32
    with pytest.raises(ValueError, match="out_dtype must be a floating-point torch.dtype"):
        liif_cuda.query(feat, coords, cells, mlp, out_dtype=torch.int32)


def test_explicit_precision_inside_autocast(problem):
    feat, coords, cells, mlp = problem
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = liif_cuda.query(feat, coords, cells, mlp, precision="fp32")
    assert out.dtype == torch.bfloat16




def test_autocast_leaves_float64_alone(problem):
    feat, coords, cells, mlp = problem
    with torch.no_grad():
        expected = liif_cuda.query(feat.double(), coords.double(), cells.double(), mlp.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = liif_cuda.query(feat.double(), coords.double(), cells.double(), mlp)
    mlp.float()
    assert out.dtype == torch.float64
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype,backward_precision", [(torch.float16, None),
                                                      (torch.bfloat16, "fp32")])
def test_gradients_under_autocast_are_the_float32_ones(problem, dtype, backward_precision):
    """Under float16 autocast, and under bfloat16 autocast with backward_precision="fp32" (by
    default bfloat16 autocast takes the bf16 backward: tests/test_query_backward_bf16.py)."""
    feat, coords, cells, mlp = problem
    feat = feat.clone().requires_grad_()
    liif_cuda.query(feat, coords, cells, mlp).square().sum().backward()
    expected = feat.grad.clone()
    feat.grad = None
    with torch.autocast("cpu", dtype=dtype):
        out = liif_cuda.query(feat, coords, cells, mlp, backward_precision=backward_precision)
    out.float().square().sum().backward()
    assert feat.grad.dtype == torch.float32
    # The backward sees the rounded output's gradient, so only close.
    assert ((feat.grad - expected).norm() / expected.norm()).item() < 1e-2


def test_compile_under_autocast(problem):
    feat, coords, cells, mlp = problem

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(feat, coords, cells):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return liif_cuda.query(feat, coords, cells, mlp)

    with torch.no_grad():
        out = f(feat, coords, cells)
        expected = liif_cuda.query(feat, coords, cells, mlp, precision="bf16")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(torch.bfloat16))


def test_opcheck_with_a_precision(problem):
    feat, coords, cells, mlp = problem
    weights, biases = liif_cuda.mlp_parameters(mlp)
    torch.library.opcheck(torch.ops.liif_cuda.query.default,
                          (feat, coords, cells, weights, biases, True, True, True, "bf16"))


def test_bad_precisions(problem):
    feat, coords, cells, mlp = problem
    with pytest.raises(ValueError, match="precision must be one of"):
        liif_cuda.query(feat, coords, cells, mlp, precision="int8")
    with pytest.raises(ValueError, match="precision='bf16' needs float32"):
        liif_cuda.query(feat.double(), coords.double(), cells.double(), mlp.double(),
                        precision="bf16")
    mlp.float()
    weights, biases = liif_cuda.mlp_parameters(mlp)
    with pytest.raises(RuntimeError, match="precision must be one of"):
        torch.ops.liif_cuda.query(feat, coords, cells, weights, biases, True, True, True, "fp8")


def test_cli_offers_the_same_precisions():
    from liif_cuda import cli
    assert cli.PRECISIONS == liif_cuda.PRECISIONS == ("fp32", "tf32", "bf16", "fp16")
