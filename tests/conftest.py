import contextlib
import os
import sys

# cuBLAS is reproducible under torch.use_deterministic_algorithms(True) only with this workspace
# setting, read when cuBLAS starts (CUDA tests that check bitwise reproducibility need it).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

# The suite runs on a 2-core machine in CI: keep example counts moderate and time unbounded.
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=1000, deadline=None)
# A lent GPU's minutes are few (benchmarks/gpu_check.sh): fewer examples, and no shrinking, which
# would spend them on minimising a failure the report already shows.
settings.register_profile(
    "gpu", max_examples=15, deadline=None, derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for the block: on CUDA the recompute backward's
    per-cell accumulation (index_add_) then runs without atomics, so gradients are bitwise
    reproducible."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.fixture
def float32_fallback(monkeypatch):
    """The CPU's bf16 paths forced off (LIIF_CUDA_CPU_BF16=0): they compute float32."""
    import liif_cuda
    monkeypatch.setenv("LIIF_CUDA_CPU_BF16", "0")
    assert not liif_cuda.build_info()["cpu_bf16"]


def relative_error(out, ref):
    """||out - ref|| / ||ref||, the accuracy measure of the project."""
    return ((out - ref).norm() / ref.norm()).item()


# Accuracy bounds of the fused query against the reference (issue 2: 1e-5 float32, 1e-12 float64).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
# ... and of the reduced precisions against the float32 reference (issue 4).
PRECISION_TOLERANCE = {"tf32": 5e-4, "fp16": 1e-3, "bf16": 4e-3}


def _cuda_skip_reason():
    import liif_cuda
    if not liif_cuda.build_info()["cuda"]:
        return "liif_cuda was built without CUDA kernels (CPU torch or no CUDA toolkit at build time)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible (the CUDA kernels are checked by tests/test_cuda_harness.py here)"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()


# The project's shared data (test images, official weights), next to the checkout; never committed.
SHARED = os.environ.get("LIIF_SHARED_DIR", os.path.join(os.path.dirname(ROOT), "shared"))
OFFICIAL_WEIGHTS = os.path.join(SHARED, "weights", "edsr-baseline-liif.pth")
requires_shared = pytest.mark.skipif(
    not os.path.isfile(OFFICIAL_WEIGHTS),
    reason=f"the shared data ({SHARED}: official weights, Set5) is not next to this checkout")
