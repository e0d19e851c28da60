"""The CUDA operator on a GPU: against the reference and the CPU kernel, autograd, opcheck,
torch.compile, CUDA graphs, streams and device errors. Skipped, with the reason, without a GPU; the
kernels themselves are also executed on the host by tests/test_cuda_harness.py."""

import copy

import pytest
import torch
from conftest import CUDA_SKIP_REASON, TOLERANCE, deterministic_algorithms, relative_error
from helpers import border_coords, build, make_mlp, query_problems, random_inputs
from hypothesis import given

import liif_cuda
import liif_reference as ref

pytestmark = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))

FLAGS = dict(local_ensemble=True, feat_unfold=True, cell_decode=True)


def to_cuda(*tensors):
    return [t.cuda() if t is not None else None for t in tensors]


def cuda_copy(module):
    """A copy on the GPU: Module.cuda() moves the module itself, which the CPU side still uses."""
    return copy.deepcopy(module).cuda()


@given(query_problems())
def test_cuda_matches_reference(problem):
    feat, coords, cells, mlp = build(problem)
    feat, coords, cells = to_cuda(feat, coords, cells)
    mlp = mlp.cuda()
    flags = problem["flags"]
    with torch.no_grad():
        expected = ref.query_rgb(feat, coords, cells, mlp, **flags)
        out = liif_cuda.query(feat, coords, cells, mlp, **flags)
    assert out.device == feat.device and out.dtype == expected.dtype
    assert relative_error(out, expected) <= TOLERANCE[problem["dtype"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,height,width,queries", [(1, 16, 16, 1000), (2, 7, 9, 333),
                                                        (1, 40, 40, 50), (3, 5, 5, 4097)])
def test_published_shape(dtype, batch, height, width, queries):
    g = torch.Generator().manual_seed(queries)
    feat, coords, cells = random_inputs(batch, 64, height, width, queries, seed=queries,
                                        dtype=dtype, spread=1.1)
    half = queries // 2
    coords[:, :half] = border_coords(height, width, batch, half, g, dtype)
    mlp = make_mlp(580, [256] * 4, 3, dtype)
    with torch.no_grad():
        cpu = liif_cuda.query(feat, coords, cells, mlp)
        expected = ref.query_rgb(*to_cuda(feat, coords, cells), mlp.cuda())
        out = liif_cuda.query(*to_cuda(feat, coords, cells), mlp)
    assert relative_error(out, expected) <= TOLERANCE[dtype]
    assert relative_error(out.cpu(), cpu) <= TOLERANCE[dtype]


def test_full_frame_matches_chunked_reference():
    """A whole output image as the evaluation runs it: the reference in 30000-query chunks."""
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(1, 64, 48, 64, generator=g).cuda()
    coord = ref.make_coord((190, 250), device="cuda").unsqueeze(0)
    cell = ref.make_cell(coord, (190, 250))
    mlp = make_mlp(580, [256] * 4, 3, torch.float32).cuda()
    with torch.no_grad():
        expected = ref.batched_query_rgb(feat, coord, cell, mlp)
        out = liif_cuda.query(feat, coord, cell, mlp)
    assert relative_error(out, expected) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype,height,width", [(torch.float32, 272, 260),
                                                (torch.float64, 200, 170)])
def test_large_map_in_bands(dtype, height, width):
    """A full-precision map over 64 MiB is convolved in bands of rows (csrc/cuda/
    liif_map_convolution.h): queries on the LR rows beside the bands' edges, forward and the
    gradients (the backward convolves again, in the same bands), against the reference."""
    g = torch.Generator().manual_seed(height)
    feat = torch.randn(1, 64, height, width, generator=g, dtype=dtype)
    row_bytes = 64 * 4 * width * feat.element_size()   # (1, 256, H, W) map
    assert row_bytes * height > 64 << 20
    band = (16 << 20) // row_bytes
    rows = torch.tensor([r for edge in range(band, height, band) for r in (edge - 2, edge - 1,
                                                                            edge, edge + 1)])
    rows = rows[rows < height].repeat(8)
    y = -1 + (2 * rows.to(torch.float64) + torch.rand(len(rows), generator=g, dtype=torch.float64)
              * 2) / height
    x = torch.rand(len(rows), generator=g, dtype=torch.float64) * 2 - 1
    coords = torch.stack([y, x], dim=-1).to(dtype).unsqueeze(0)
    cells = torch.full_like(coords, 2 / (4 * height))
    feat, coords, cells = to_cuda(feat, coords, cells)
    mlp = make_mlp(580, [256] * 4, 3, dtype).cuda()
    ours = feat.clone().requires_grad_()
    theirs = feat.clone().requires_grad_()
    out = liif_cuda.query(ours, coords, cells, mlp)
    expected = ref.query_rgb(theirs, coords, cells, mlp)
    assert relative_error(out.detach(), expected.detach()) <= TOLERANCE[dtype]
    grad = torch.randn_like(out)
    (grad * out).sum().backward()
    (grad * expected).sum().backward()
    assert relative_error(ours.grad, theirs.grad) <= TOLERANCE[dtype]


def test_tf32_settings_do_not_change_the_result():
    """cuDNN's TF32 default must not reach the first-layer map."""
    feat, coords, cells = to_cuda(*random_inputs(1, 64, 12, 12, 500, seed=1))
    mlp = make_mlp(580, [256] * 4, 3, torch.float32).cuda()
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        with torch.no_grad():
            out = liif_cuda.query(feat, coords, cells, mlp)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad():
            expected = ref.query_rgb(feat, coords, cells, mlp)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    assert relative_error(out, expected) <= TOLERANCE[torch.float32]


def test_non_finite_coordinates():
    feat, coords, cells = random_inputs(2, 4, 5, 5, 40, seed=8)
    coords[0, 1, 0] = float("nan")
    coords[1, 3, 1] = float("inf")
    mlp = make_mlp(40, [256, 256], 3, torch.float32)
    out = liif_cuda.query(*to_cuda(feat, coords, cells), cuda_copy(mlp)).cpu()
    bad = ~torch.isfinite(coords).all(-1)
    assert torch.isnan(out[bad]).all()
    expected = liif_cuda.query(feat, coords, cells, mlp)
    assert relative_error(out[~bad], expected[~bad]) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("flags", [FLAGS, dict(local_ensemble=False, feat_unfold=True,
                                               cell_decode=False)])
def test_gradients_match_reference(flags):
    feat, coords, cells = to_cuda(*random_inputs(2, 3, 5, 6, 60, seed=2, dtype=torch.float64,
                                                 spread=1.1))
    mlp = make_mlp(ref.imnet_in_dim(3, flags["feat_unfold"], flags["cell_decode"]), [16, 16], 3,
                   torch.float64).cuda()

    def grads(fn):
        inputs = [t.detach().clone().requires_grad_() for t in (feat, coords, cells)]
        mlp.zero_grad()
        fn(*inputs, mlp, **flags).square().sum().backward()
        got = [t.grad for t in inputs[:2]] + [p.grad.clone() for p in mlp.parameters()]
        if flags["cell_decode"]:
            got.append(inputs[2].grad)
        return got

    for ours, theirs in zip(grads(liif_cuda.query), grads(ref.query_rgb)):
        assert ours.device == feat.device
        assert relative_error(ours, theirs) <= 1e-12


def test_gradcheck():
    feat, coords, cells = to_cuda(*random_inputs(1, 2, 3, 4, 6, seed=3, dtype=torch.float64))
    mlp = make_mlp(ref.imnet_in_dim(2), [5], 2, torch.float64).cuda()
    w, b = liif_cuda.mlp_parameters(mlp)
    inputs = [t.detach().clone().requires_grad_() for t in (feat, coords, cells, *w, *b)]

    def fn(feat, coords, cells, w0, w1, b0, b1):
        return liif_cuda.query(feat, coords, cells, [(w0, b0), (w1, b1)])

    # gradcheck also runs the backward twice and wants identical results: on CUDA that holds with
    # deterministic algorithms (the per-cell accumulation otherwise uses atomic adds).
    with deterministic_algorithms():
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def backward_problem(dtype, batch, queries, hidden, seed):
    feat, coords, cells = random_inputs(batch, 8, 9, 7, queries, seed=seed, dtype=dtype, spread=1.2)
    coords[0, 1] = float("nan")
    coords[-1, 2, 1] = float("inf")
    mlp = make_mlp(ref.imnet_in_dim(8), hidden, 3, dtype)
    w, b = (list(x.detach() for x in p) for p in liif_cuda.mlp_parameters(mlp))
    grad_out = torch.randn(batch, queries, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return [grad_out, feat, coords, cells, w, b, True, True, True, [True] * (3 + 2 * len(w))]


def on_cuda(args):
    return [[t.cuda() for t in a] if isinstance(a, list) and a and torch.is_tensor(a[0])
            else a.cuda() if torch.is_tensor(a) else a for a in args]


@pytest.mark.parametrize("queries,hidden", [(60, [16, 12]), (6000, [256, 256])])
def test_backward_operator_equals_the_cpu_kernel(queries, hidden):
    """float64, non-finite coordinates included; 2 x 6000 queries with 256-wide layers take two
    chunks (csrc/cuda/liif_query_backward.h)."""
    args = backward_problem(torch.float64, 2, queries, hidden, seed=queries)
    cpu = torch.ops.liif_cuda.query_backward(*args)
    with deterministic_algorithms():
        first = torch.ops.liif_cuda.query_backward(*on_cuda(args))
        again = torch.ops.liif_cuda.query_backward(*on_cuda(args))
    for i, (g, c, a) in enumerate(zip(first, cpu, again)):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), c, rtol=1e-9, atol=1e-11, equal_nan=True, msg=str(i))
        assert torch.equal(g.nan_to_num(), a.nan_to_num()), i  # deterministic


def test_opcheck_backward_operator():
    args = on_cuda(backward_problem(torch.float32, 2, 9, [8, 6], seed=2))
    torch.library.opcheck(torch.ops.liif_cuda.query_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    feat, coords, cells = to_cuda(*random_inputs(2, 3, 4, 5, 9))
    mlp = make_mlp(31, [8, 6], 3, torch.float32).cuda()
    weights, biases = liif_cuda.mlp_parameters(mlp)
    weights = [w.detach().clone().requires_grad_(requires_grad) for w in weights]
    biases = [b.detach().clone().requires_grad_(requires_grad) for b in biases]
    feat.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.liif_cuda.query.default,
                          (feat, coords, cells, weights, biases, True, True, True))


def test_compile_fullgraph_forward_and_backward():
    mlp = make_mlp(580, [256, 256], 3, torch.float32).cuda()

    @torch.compile(fullgraph=True)
    def loss(feat, coords, cells):
        return liif_cuda.query(feat, coords, cells, mlp).clamp(-1, 1).square().sum()

    feat, coords, cells = to_cuda(*random_inputs(1, 64, 6, 7, 300, seed=4))
    compiled = feat.clone().requires_grad_()
    eager = feat.clone().requires_grad_()
    value = loss(compiled, coords, cells)
    value.backward()
    expected = liif_cuda.query(eager, coords, cells, mlp).clamp(-1, 1).square().sum()
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(compiled.grad, eager.grad)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_capture_and_replay(precision):
    """Capture and replay give the eager bits; bf16 runs the default tensor-core kernel (the
    persistent multicast one on H100 / H200, whose launch asks the driver how many clusters fit)."""
    feat, coords, cells = to_cuda(*random_inputs(1, 64, 8, 8, 700, seed=5))
    mlp = make_mlp(580, [256] * 4, 3, torch.float32).cuda()
    with torch.no_grad():
        expected = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graphs require
            liif_cuda.query(feat, coords, cells, mlp, precision=precision)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, expected)
        coords.copy_(coords.flip(1))  # new inputs in the same memory
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, liif_cuda.query(feat, coords, cells, mlp,
                                                       precision=precision))


def test_runs_on_the_current_stream():
    feat, coords, cells = to_cuda(*random_inputs(2, 64, 10, 10, 2000, seed=6))
    mlp = make_mlp(580, [256] * 4, 3, torch.float32).cuda()
    with torch.no_grad():
        expected = liif_cuda.query(feat, coords, cells, mlp)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = liif_cuda.query(feat, coords, cells, mlp)
            out_on_side = out * 1  # ordered after the query on the same stream
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(out_on_side, expected)


def test_device_mismatch_is_a_clear_error():
    feat, coords, cells = random_inputs(1, 3, 4, 4, 5)
    mlp = make_mlp(31, [8], 3, torch.float32)
    with pytest.raises(ValueError, match="coords must be on feat's device"):
        liif_cuda.query(feat.cuda(), coords, cells.cuda(), cuda_copy(mlp))
    with pytest.raises(ValueError, match="device"):
        liif_cuda.query(feat.cuda(), coords.cuda(), cells.cuda(), mlp)  # MLP left on the CPU
    with pytest.raises(RuntimeError, match="must be on feat's device"):
        w, b = liif_cuda.mlp_parameters(mlp)
        torch.ops.liif_cuda.query(feat.cuda(), coords.cuda(), cells.cuda(), w, b, True, True, True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    feat, coords, cells = random_inputs(1, 64, 6, 6, 100, seed=7)
    mlp = make_mlp(580, [256, 256], 3, torch.float32)
    with torch.no_grad():
        expected = liif_cuda.query(feat, coords, cells, mlp)
        out = liif_cuda.query(feat.to("cuda:1"), coords.to("cuda:1"), cells.to("cuda:1"),
                              mlp.to("cuda:1"))
    assert out.device == torch.device("cuda:1")
    assert relative_error(out.cpu(), expected) <= TOLERANCE[torch.float32]
