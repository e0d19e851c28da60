"""precision="bf16" on the CPU (issue 13): the hidden layers on the processor's bf16 dot-product units
(csrc/cpu/bf16_linear.cpp), in the rounding model of the CUDA tensor-core kernel, and the float32
fallback where the CPU has none (forced here with LIIF_CUDA_CPU_BF16=0)."""

import os

import numpy as np
import pytest
import torch
from conftest import (OFFICIAL_WEIGHTS, PRECISION_TOLERANCE, SHARED, TOLERANCE, relative_error,
                      requires_shared)
from helpers import (build_tensor_core_problem, cpu_bf16_problems, make_mlp, published_problem,
                     random_inputs, rounding_model_bound)
from hypothesis import given

import liif_cuda
import liif_reference as ref

NATIVE = liif_cuda.build_info()["cpu_bf16"]
requires_native = pytest.mark.skipif(
    not NATIVE, reason="this CPU has no AVX512-BF16 (or LIIF_CUDA_CPU_BF16=0): precision 'bf16' "
    "computes float32 here, which test_fallback_computes_float32 covers")


@requires_native
def test_published_shape():
    """Within the tensor-core bf16 bound of the float32 reference, and not float32 (bf16 ran)."""
    feat, coords, cells, mlp = published_problem(2, 30, 40, 5000, seed=0, spread=1.1, borders=100)
    with torch.no_grad():
        expected = ref.query_rgb(feat, coords, cells, mlp)
        out = liif_cuda.query(feat, coords, cells, mlp, precision="bf16")
    assert out.dtype == torch.float32
    error = relative_error(out, expected)
    assert TOLERANCE[torch.float32] < error <= PRECISION_TOLERANCE["bf16"]


@requires_native
@given(cpu_bf16_problems())
def test_matches_the_rounding_model(problem):
    """Within twice the error of the rounding model computed exactly (the same oracle as the CUDA
    tensor-core kernel's; the CPU computes the first-layer map in float32, not TF32)."""
    feat, coords, cells, mlp = build_tensor_core_problem(problem)
    flags = problem["flags"]
    exact, bound = rounding_model_bound(feat, coords, cells, mlp, "bf16", flags)
    with torch.no_grad():
        out = liif_cuda.query(feat, coords, cells, mlp, **flags, precision="bf16")
    assert relative_error(out, exact) <= bound


@requires_native
def test_deterministic_across_thread_counts():
    feat, coords, cells, mlp = published_problem(1, 12, 9, 3001, seed=1)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            first = liif_cuda.query(feat, coords, cells, mlp, precision="bf16")
            torch.set_num_threads(1)
            single = liif_cuda.query(feat, coords, cells, mlp, precision="bf16")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)


@requires_native
def test_non_finite_coordinates_give_nan_rows_only():
    feat, coords, cells, mlp = published_problem(1, 6, 7, 300, seed=2)
    coords[0, 5] = float("nan")
    coords[0, 9, 1] = float("inf")
    with torch.no_grad():
        out = liif_cuda.query(feat, coords, cells, mlp, precision="bf16")
    bad = torch.zeros(300, dtype=torch.bool)
    bad[[5, 9]] = True
    assert out[0, bad].isnan().all()
    assert out[0, ~bad].isfinite().all()


@requires_native
def test_autocast_selects_it():
    feat, coords, cells, mlp = published_problem(1, 10, 10, 2000, seed=3)
    with torch.no_grad():
        explicit = liif_cuda.query(feat, coords, cells, mlp, precision="bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = liif_cuda.query(feat, coords, cells, mlp)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, explicit.to(torch.bfloat16))


def test_gradients_are_the_float32_ones():
    """The backward recomputes the exact function, whatever the forward's precision."""
    feat, coords, cells, mlp = published_problem(1, 8, 8, 500, seed=4)
    leaf = feat.clone().requires_grad_()
    liif_cuda.query(leaf, coords, cells, mlp).sum().backward()
    expected = leaf.grad.clone()
    weight_grad = mlp.layers[2].weight.grad.clone()
    leaf.grad = None
    mlp.zero_grad()
    liif_cuda.query(leaf, coords, cells, mlp, precision="bf16").sum().backward()
    assert torch.equal(leaf.grad, expected)
    assert torch.equal(mlp.layers[2].weight.grad, weight_grad)


def test_fallback_computes_float32(float32_fallback):
    feat, coords, cells, mlp = published_problem(1, 10, 10, 1000, seed=5)
    with torch.no_grad():
        exact = liif_cuda.query(feat, coords, cells, mlp)
        out = liif_cuda.query(feat, coords, cells, mlp, precision="bf16")
    assert torch.equal(out, exact)


@pytest.mark.parametrize("precision", ["tf32", "fp16"])
def test_other_precisions_compute_float32(precision):
    feat, coords, cells, mlp = published_problem(1, 10, 10, 1000, seed=6)
    with torch.no_grad():
        exact = liif_cuda.query(feat, coords, cells, mlp)
        out = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
    assert torch.equal(out, exact)


def test_one_layer_mlp_computes_float32():
    """No hidden layer, nothing to round: as the float32 path."""
    feat, coords, cells = random_inputs(1, 3, 5, 5, 200, seed=7)
    mlp = make_mlp(ref.imnet_in_dim(3), [], 3, torch.float32)
    with torch.no_grad():
        exact = liif_cuda.query(feat, coords, cells, mlp)
        out = liif_cuda.query(feat, coords, cells, mlp, precision="bf16")
    assert torch.equal(out, exact)


def small_model():
    from liif_cuda.models import LIIF, EDSRBaseline
    torch.manual_seed(9)
    return LIIF(EDSRBaseline(n_resblocks=2, n_feats=8), hidden_list=[32, 32]).eval()


def image():
    return np.random.default_rng(8).random((12, 10, 3)).astype(np.float32)


def relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@requires_native
def test_upscale_uses_it():
    model = small_model()
    exact = liif_cuda.upscale(image(), scale=2, model=model, device="cpu")
    bf16 = liif_cuda.upscale(image(), scale=2, model=model, device="cpu", precision="bf16")
    assert TOLERANCE[torch.float32] < relative(bf16, exact) <= PRECISION_TOLERANCE["bf16"]


@pytest.fixture
def bf16_convolutions(monkeypatch):
    """The CPU has bf16 convolutions (cpu_has_bf16_convolutions) whatever this one has: autocast's
    bf16 runs, natively or (without AVX512 or AMX) in torch's plain loops, on the small model."""
    import liif_cuda.upscaling as upscaling
    monkeypatch.setattr(upscaling, "cpu_has_bf16_convolutions", lambda: True)


def test_upscale_encoder_in_bf16(bf16_convolutions):
    """encoder_precision="bf16" runs the encoder under CPU autocast: close to float32, not equal."""
    model = small_model()
    exact = liif_cuda.upscale(image(), scale=2, model=model, device="cpu")
    out = liif_cuda.upscale(image(), scale=2, model=model, device="cpu", encoder_precision="bf16")
    assert out.dtype == exact.dtype and out.shape == exact.shape
    assert 0 < relative(out, exact) <= 2e-2


def test_upscale_encoder_in_bf16_gives_bf16_features(monkeypatch, bf16_convolutions):
    """The encoder's features reach the query rounded to bf16 (autocast's dtype), which float32
    features and float16 ones (10 bits of mantissa, not bf16's 7) are not."""
    import liif_cuda.upscaling as upscaling
    seen = []
    real_query = upscaling.query

    def recording_query(feat, *args, **kwargs):
        seen.append(feat)
        return real_query(feat, *args, **kwargs)

    monkeypatch.setattr(upscaling, "query", recording_query)
    model = small_model()
    for precision, bf16_features in (("bf16", True), ("fp32", False)):
        seen.clear()
        liif_cuda.upscale(image(), scale=2, model=model, device="cpu", encoder_precision=precision)
        assert seen and all(f.dtype == torch.float32 for f in seen)
        assert all(torch.equal(f, f.bfloat16().float()) for f in seen) == bf16_features, precision


def test_upscale_encoder_bf16_runs_float32_without_bf16_convolutions(monkeypatch):
    """On a CPU whose torch has no bf16 convolutions (no AVX512 or AMX: autocast would take plain
    loops, about 2x float32's time) encoder_precision="bf16" runs float32: float32's bits, as the
    query's "bf16" computes float32 on a CPU without AVX512-BF16."""
    import liif_cuda.upscaling as upscaling
    monkeypatch.setattr(upscaling, "cpu_has_bf16_convolutions", lambda: False)
    model = small_model()
    exact = liif_cuda.upscale(image(), scale=2, model=model, device="cpu")
    out = liif_cuda.upscale(image(), scale=2, model=model, device="cpu", encoder_precision="bf16")
    assert np.array_equal(np.asarray(out), np.asarray(exact))
    assert upscaling.encoder_runs_in("bf16", "cpu") == "fp32"
    assert upscaling.encoder_runs_in("bf16", "cuda") == "bf16"
    assert upscaling.encoder_runs_in("fp16", "cuda") == "fp16"


def test_cpu_has_bf16_convolutions_is_torchs_answer():
    """The check is torch's own (oneDNN's bf16 support), not a list of CPU flags kept here."""
    import liif_cuda.upscaling as upscaling
    assert upscaling.cpu_has_bf16_convolutions() == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_upscale_encoder_precision_errors():
    model = small_model()
    with pytest.raises(ValueError, match="encoder_precision must be one of"):
        liif_cuda.upscale(image(), scale=2, model=model, device="cpu", encoder_precision="int8")
    with pytest.raises(ValueError, match="encoder_precision='fp16' needs a CUDA device"):
        liif_cuda.upscale(image(), scale=2, model=model, device="cpu", encoder_precision="fp16")


@requires_shared
@requires_native
@pytest.mark.slow
def test_set5_psnr_matches_fp32():
    """With the official weights, Set5 PSNR (mmedit protocol) within 0.005 dB of float32 at x2, x4
    and x12."""
    from liif_cuda.evaluation import evaluate
    model = liif_cuda.load_model(OFFICIAL_WEIGHTS, device="cpu")
    data = os.path.join(SHARED, "data", "Set5")
    scales = [2, 4, 12]
    exact = evaluate(model, data, scales, device="cpu", precision="fp32", progress=False)
    bf16 = evaluate(model, data, scales, device="cpu", precision="bf16", progress=False)
    for scale in ("2", "4", "12"):
        assert abs(bf16["Set5"][scale]["psnr"] - exact["Set5"][scale]["psnr"]) <= 0.005
