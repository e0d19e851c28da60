"""The reduced precisions on a GPU: the tensor-core kernel against the float32 reference, autocast,
CUDA graphs, torch.compile, and the PSNR of the official weights on Set5 per precision. Skipped, with
the reason, without a GPU; tests/test_tensor_core_harness.py runs the same kernel on the host."""

import os
import sys
from unittest import mock

import pytest
import torch
from conftest import (CUDA_SKIP_REASON, OFFICIAL_WEIGHTS, PRECISION_TOLERANCE, ROOT, SHARED,
                      TOLERANCE, deterministic_algorithms, relative_error, requires_shared)
from helpers import (REDUCED, build_tensor_core_problem, make_mlp, published_problem,
                     random_inputs, rounding_model_bound, tensor_core_problems)
from hypothesis import given

import liif_cuda
import liif_reference as ref

pytestmark = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))


def has_tensor_cores():
    return torch.cuda.get_device_capability()[0] >= 8


def runs_wgmma():
    """An H100 / H200 and a build with its sm_90a code: where LIIF_CUDA_TENSOR_CORE_KERNEL=wgmma
    (or wgmma_ws, wgmma_mc, wgmma_pp) runs the wgmma kernel (or its warp-specialised or multicast
    form, or the latter's ping-pong schedule; elsewhere the mma.sync one)."""
    return liif_cuda.build_info()["cuda_wgmma"] and torch.cuda.get_device_capability() == (9, 0)


# The tensor-core kernels liif_cuda.query can be asked for (LIIF_CUDA_TENSOR_CORE_KERNEL; "auto" is
# the default's name).
TENSOR_CORE_KERNELS = ["auto", "mma", "mma16", "wmma", "wgmma", "wgmma_ws", "wgmma_mc",
                       "wgmma_pp"]
# Kernels that hung on their path earlier in this run of benchmarks/gpu_check.sh: their cases skip,
# so that one hang does not spend the check's test step too.
HUNG_KERNELS = os.environ.get("LIIF_GPU_CHECK_HUNG_KERNELS", "").split()


def kernels(*names):
    """`kernel` parameters, each skipped where it hung in this GPU check."""
    return [pytest.param(k, marks=pytest.mark.skipif(
        k in HUNG_KERNELS, reason=f"the {k} kernel timed out on its path in this GPU check "
        "(gpu_check.sh's paths.log)")) for k in names]


def ran(kernel, names):
    """Whether the wgmma kernel `kernel` is among the profiled kernel names: the GPU check's own
    test of a path's kernel (benchmarks/gpu_paths.py; the multicast kernel's two schedules share a
    function and differ by its last template argument)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from gpu_paths import FORWARD, kernel_ran
    finally:
        sys.path.pop(0)
    return kernel_ran(FORWARD[f"bf16-{kernel}"][3], names)


def tensor_core_kernel(name):
    """The kernel asked for inside a with block (the environment restored after it; a context
    manager rather than monkeypatch, which hypothesis tests cannot take)."""
    return mock.patch.dict(os.environ, {"LIIF_CUDA_TENSOR_CORE_KERNEL": name})


def published(batch=2, height=30, width=40, queries=5000, seed=0):
    feat, coords, cells, mlp = published_problem(batch, height, width, queries, seed=seed,
                                                 spread=1.1, borders=100)
    return feat.cuda(), coords.cuda(), cells.cuda(), mlp.cuda()


@pytest.mark.parametrize("kernel", kernels(*TENSOR_CORE_KERNELS))
@pytest.mark.parametrize("precision", REDUCED)
def test_published_shape(precision, kernel):
    feat, coords, cells, mlp = published()
    with torch.no_grad(), tensor_core_kernel(kernel):
        expected = ref.query_rgb(feat, coords, cells, mlp)
        out = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
    assert out.dtype == torch.float32
    error = relative_error(out, expected)
    assert error <= PRECISION_TOLERANCE[precision]
    if has_tensor_cores():
        assert error > TOLERANCE[torch.float32]  # the tensor-core kernel really ran


@given(tensor_core_problems())
def test_tensor_core_kernel_matches_reference(problem):
    """As on the host (test_tensor_core_harness.py): within twice the error of the kernel's own
    rounding model computed exactly, here with the first-layer map on TF32 tensor cores."""
    feat, coords, cells, mlp = build_tensor_core_problem(problem)
    flags, precision = problem["flags"], problem["precision"]
    exact, bound = rounding_model_bound(feat, coords, cells, mlp, precision, flags, tf32_map=True)
    with torch.no_grad():
        out = liif_cuda.query(feat.cuda(), coords.cuda(), cells.cuda(), mlp.cuda(), **flags,
                              precision=precision).cpu()
    assert relative_error(out, exact) <= bound


@pytest.mark.parametrize("kernel", kernels("wgmma", "wgmma_ws", "wgmma_mc", "wgmma_pp"))
@given(problem=tensor_core_problems())
def test_wgmma_kernel_matches_reference(kernel, problem):
    """The wgmma kernels (the mma.sync one where they do not apply) held to the same bound."""
    feat, coords, cells, mlp = build_tensor_core_problem(problem)
    flags, precision = problem["flags"], problem["precision"]
    exact, bound = rounding_model_bound(feat, coords, cells, mlp, precision, flags, tf32_map=True)
    with torch.no_grad(), tensor_core_kernel(kernel):
        out = liif_cuda.query(feat.cuda(), coords.cuda(), cells.cuda(), mlp.cuda(), **flags,
                              precision=precision).cpu()
    assert relative_error(out, exact) <= bound


@pytest.mark.parametrize("kernel", kernels("wgmma", "wgmma_ws", "wgmma_mc", "wgmma_pp"))
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_wgmma_kernel_runs_where_it_applies(precision, kernel):
    """On an H100 / H200 with an sm_90a build the wgmma kernel asked for is what runs (not a
    fallback)."""
    if not runs_wgmma():
        pytest.skip("the wgmma kernel needs an H100 / H200 (compute capability 9.0) and a build "
                    f"with TORCH_CUDA_ARCH_LIST 9.0a (this one: {liif_cuda.build_info()})")
    feat, coords, cells, mlp = published(batch=1, queries=2000, seed=4)
    with torch.no_grad(), tensor_core_kernel(kernel), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        liif_cuda.query(feat, coords, cells, mlp, precision=precision)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert ran(kernel, names), sorted(set(names))


@pytest.mark.parametrize("kernel", kernels("mma", "mma16", "wgmma", "wgmma_mc"))
@pytest.mark.parametrize("precision", REDUCED)
def test_map_staging_gives_the_same_bits(precision, kernel):
    """LIIF_CUDA_STAGE_MAP=1 (each tile's distinct map rows copied into shared memory, the rest
    from global memory past its 56 slots): the same bits as without, on a grid at x4 (every row
    staged) and on scattered queries (some staged)."""
    feat, coords, cells, mlp = published(batch=2, queries=3000, seed=5)
    out_hw = (4 * 30, 4 * 40)
    grid = ref.make_coord(out_hw, device="cuda").unsqueeze(0).expand(2, -1, -1).contiguous()
    for c, cl in ((coords, cells), (grid, ref.make_cell(grid, out_hw))):
        with torch.no_grad(), tensor_core_kernel(kernel):
            plain = liif_cuda.query(feat, c, cl, mlp, precision=precision)
            with mock.patch.dict(os.environ, {"LIIF_CUDA_STAGE_MAP": "1"}):
                staged = liif_cuda.query(feat, c, cl, mlp, precision=precision)
        assert torch.equal(staged, plain)


@pytest.mark.parametrize("queries", [2000, 2048, 150, 25376])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("kernel", kernels("wgmma_mc", "wgmma_pp"))
def test_multicast_wgmma_kernel_equals_wgmma_kernel(kernel, precision, queries):
    """The multicast form (clusters of two blocks sharing each weight chunk), in either schedule,
    gives the wgmma kernel's bits: the same products in the same order. 2000 and 150 queries make
    an odd number of tiles of 32 (a block without one completes the last cluster), 2048 an even
    one; 25376 queries, 793 tiles, make each of an H100 / H200's 66 clusters loop over 6 or 7 pairs
    of tiles, the last with a block without one."""
    if not runs_wgmma():
        pytest.skip("the multicast wgmma kernel needs an H100 / H200 (compute capability 9.0) and "
                    f"a build with TORCH_CUDA_ARCH_LIST 9.0a (this one: {liif_cuda.build_info()})")
    feat, coords, cells, mlp = published(batch=1, queries=queries, seed=6)
    with torch.no_grad():
        with tensor_core_kernel("wgmma"):
            plain = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
        with tensor_core_kernel(kernel):
            multicast = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
    assert torch.equal(multicast, plain)


@pytest.mark.parametrize("precision", REDUCED)
def test_default_kernel(precision):
    """With LIIF_CUDA_TENSOR_CORE_KERNEL unset: the multicast wgmma kernel for bf16 and fp16 where
    it runs, else the 16-warp mma.sync kernel (on the GPUs whose shared memory holds its block)."""
    major_minor = torch.cuda.get_device_capability()
    if major_minor not in ((8, 0), (9, 0)):
        pytest.skip(f"the mma.sync kernel's block needs an A100 / H100 / H200's shared memory "
                    f"(this device: compute capability {major_minor})")
    if precision == "tf32" and major_minor == (8, 0):
        pytest.skip("the mma.sync kernel's tf32 block needs an H100 / H200's shared memory")
    feat, coords, cells, mlp = published(batch=1, queries=2000, seed=4)
    environment = {k: v for k, v in os.environ.items() if k != "LIIF_CUDA_TENSOR_CORE_KERNEL"}
    with torch.no_grad(), mock.patch.dict(os.environ, environment, clear=True), \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        liif_cuda.query(feat, coords, cells, mlp, precision=precision)
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if "liif_query" in e.name})
    if runs_wgmma() and precision != "tf32":
        assert ran("wgmma_mc", names), names
    else:  # the 16-warp form: 32 rows per warp
        assert any("liif_query_mma_kernel<" in n and ", 32>" in n for n in names), names


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast(dtype):
    """Under autocast the fp16 / bf16 path runs and the result has the autocast dtype; the
    encoder's output may come in that dtype too."""
    feat, coords, cells, mlp = published(seed=1)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    with torch.no_grad():
        expected = ref.query_rgb(feat, coords, cells, mlp)
        explicit = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
        with torch.autocast("cuda", dtype=dtype):
            out = liif_cuda.query(feat, coords, cells, mlp)
            from_half = liif_cuda.query(feat.to(dtype), coords, cells, mlp)
    assert out.dtype == dtype and from_half.dtype == dtype
    assert torch.equal(out, explicit.to(dtype))
    assert relative_error(out.float(), expected) <= PRECISION_TOLERANCE[precision] + 2 ** -8
    assert relative_error(from_half.float(), expected) <= 2 * PRECISION_TOLERANCE[precision] + 2 ** -8


def test_cpu_tensors_ignore_cuda_autocast():
    feat, coords, cells = random_inputs(1, 4, 5, 5, 20, seed=2)
    mlp = make_mlp(ref.imnet_in_dim(4), [256, 256], 3, torch.float32)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = liif_cuda.query(feat, coords, cells, mlp)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("kernel", kernels("mma", "wgmma", "wgmma_ws", "wgmma_mc", "wgmma_pp"))
@pytest.mark.parametrize("precision", REDUCED)
def test_deterministic_and_graph_capturable(precision, kernel):
    feat, coords, cells, mlp = published(batch=1, queries=3000, seed=3)
    with torch.no_grad(), tensor_core_kernel(kernel):
        first = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
        assert torch.equal(first, liif_cuda.query(feat, coords, cells, mlp, precision=precision))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            liif_cuda.query(feat, coords, cells, mlp, precision=precision)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, first)


def test_compile_under_autocast():
    feat, coords, cells, mlp = published(batch=1, queries=1000, seed=4)

    @torch.compile(fullgraph=True)
    def f(feat, coords, cells):
        with torch.autocast("cuda", dtype=torch.float16):
            return liif_cuda.query(feat, coords, cells, mlp)

    with torch.no_grad():
        out = f(feat, coords, cells)
        expected = liif_cuda.query(feat, coords, cells, mlp, precision="fp16")
    assert out.dtype == torch.float16
    assert torch.equal(out, expected.half())


def test_gradients_are_the_float32_ones():
    """Whatever the forward's precision, the backward recomputes the exact function: identical
    gradients (bitwise, with deterministic algorithms: no atomic adds in the backward)."""
    feat, coords, cells, mlp = published(batch=1, height=8, width=8, queries=500, seed=5)
    leaf = feat.clone().requires_grad_()
    with deterministic_algorithms():
        liif_cuda.query(leaf, coords, cells, mlp).sum().backward()
        expected = leaf.grad.clone()
        leaf.grad = None
        liif_cuda.query(leaf, coords, cells, mlp, precision="bf16").sum().backward()
    torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=0)


@requires_shared
@pytest.mark.slow
@pytest.mark.parametrize("precision", REDUCED)
def test_set5_psnr_matches_fp32(precision):
    """Issue 4: with the official weights, each path's PSNR on Set5 (mmedit protocol) is within
    0.005 dB of the float32 path at x2, x4 and x12."""
    import os

    from liif_cuda.evaluation import evaluate
    model = liif_cuda.load_model(OFFICIAL_WEIGHTS, device="cuda")
    data = os.path.join(SHARED, "data", "Set5")
    scales = [2, 4, 12]
    exact = evaluate(model, data, scales, device="cuda", precision="fp32", progress=False)
    reduced = evaluate(model, data, scales, device="cuda", precision=precision, progress=False)
    for s in exact["Set5"]:
        assert abs(reduced["Set5"][s]["psnr"] - exact["Set5"][s]["psnr"]) <= 0.005, s
