"""The fused backward operator (liif_cuda::query_backward, csrc/cpu/liif_query_backward_cpu.cpp)
against the reference's autograd: hypothesis over shapes, flags, widths, depths and B; every subset
of gradients; determinism; the operator's registration and its errors.

Tested at the reference's own precision, as flash-attention tests its kernels: some gradients are
sums that cancel (over rows with random-sign output gradients, or the coordinate gradient's four
neighbours' nearly opposite terms on a one-pixel map or on cell borders), where any order of
summation loses digits. In float64 ours may differ from the reference by at most twice the
reference's own error (measured against the reference with the hidden units permuted: the same
function, summed in another order) plus 1e-10. In float32 ours is compared with the reference in
float64 ("exact"): at most twice the float32 reference's error plus 1e-5 of the size of the sums'
terms (the exact gradient for |grad_out|, whose terms do not cancel), float32's rounding of sums of
a few hundred terms."""

import copy

import pytest
import torch
from conftest import relative_error
from helpers import border_coords, build, make_mlp, query_problems, random_inputs
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cuda_harness
import liif_cuda
import liif_reference as ref


def grads(query, feat, coords, cells, mlp, grad_out, flags):
    """[feat, coords, cells (None without cells), *weights, *biases]: the gradients of
    sum(out * grad_out)."""
    inputs = [None if t is None else t.detach().clone().requires_grad_()
              for t in (feat, coords, cells)]
    mlp.zero_grad()
    (query(*inputs, mlp, **flags) * grad_out).sum().backward()
    linears = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    return ([None if t is None else t.grad for t in inputs]
            + [m.weight.grad for m in linears] + [m.bias.grad for m in linears])


def permuted(mlp, seed):
    """The same MLP with each hidden layer's units permuted, and the maps back from its parameter
    gradients to the original's."""
    g = torch.Generator().manual_seed(seed)
    linears = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    perms = [torch.randperm(m.out_features, generator=g) for m in linears[:-1]]
    perms.append(torch.arange(linears[-1].out_features))
    twin = copy.deepcopy(mlp)
    twins = [m for m in twin.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for l, m in enumerate(twins):
            w = linears[l].weight[perms[l]]
            if l > 0:
                w = w[:, perms[l - 1]]
            m.weight.copy_(w)
            m.bias.copy_(linears[l].bias[perms[l]])
    inverse = [torch.argsort(p) for p in perms]

    def back(weight_grads, bias_grads):
        ws = [gw[inverse[l]] if l == 0 else gw[inverse[l]][:, inverse[l - 1]]
              for l, gw in enumerate(weight_grads)]
        return ws + [gb[inverse[l]] for l, gb in enumerate(bias_grads)]
    return twin, back


class Recorder(torch.nn.Module):
    """The reference's MLP, keeping each call's input and output (one call per neighbour)."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.calls = []

    def forward(self, x):
        out = self.mlp(x)
        self.calls.append((x.detach(), out.detach()))
        return out


def blend_noise(feat, coords, cells, mlp, grad_out, flags, dtype):
    """The rounding noise any evaluation leaves in the coordinate gradient through the blend
    weights: d weight_k / d area_j = ([j = opposite(k)] - weight_k) / total is two terms of size
    grad_blend / total that cancel (exactly, without the local ensemble), and total can be as small as
    1e-9 on cell borders. Per query: 8 eps sum_k |grad_blend_k| / total (|rel_x_k| H + |rel_y_k| W)."""
    recorder = Recorder(mlp)
    with torch.no_grad():
        ref.query_rgb(feat, coords, cells, recorder, **flags)
    H, W = feat.shape[-2:]
    feat_dim = feat.shape[1] * (9 if flags["feat_unfold"] else 1)
    B, Q = coords.shape[:2]
    total, terms = 0, []
    for x, pred in recorder.calls:
        rel = x[:, feat_dim:feat_dim + 2].double().view(B, Q, 2)
        area = (rel[..., 0] * rel[..., 1]).abs() + 1e-9
        total = total + area
        blend_grad = (grad_out.double() * pred.double().view(B, Q, -1)).sum(-1).abs()
        terms.append(blend_grad * (rel[..., 1].abs() * H + rel[..., 0].abs() * W))
    return 8 * torch.finfo(dtype).eps * sum(terms) / total


def query_parts(i, blend_noise_per_query, scale_per_query):
    """Indices that split gradient i for its check: the coordinate gradient's (i == 1) queries whose
    blend noise is below `scale_per_query()` (the check's own tolerance per query, computed for the
    coordinate gradient only), checked without that noise's slack, and the others (total areas
    near 1e-9 on cell borders), checked with it, so that a few such queries do not make the slack
    cover every query's gradient; other gradients whole."""
    if i != 1:
        return [...]
    quiet = blend_noise_per_query <= scale_per_query()
    return [quiet, ~quiet]


def assert_gradients_match(problem_inputs, flags, dtype, query=liif_cuda.query):
    """`query`'s gradients (liif_cuda.query's by default) against the reference's."""
    feat, coords, cells, mlp = problem_inputs
    g = torch.Generator().manual_seed(7)
    out_dim = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)][-1].out_features
    grad_out = torch.randn(coords.shape[0], coords.shape[1], out_dim, generator=g, dtype=dtype)
    ours = grads(query, feat, coords, cells, mlp, grad_out, flags)
    theirs = grads(ref.query_rgb, feat, coords, cells, mlp, grad_out, flags)
    # A gradient that is exactly zero (no live ReLU, or the blend weight's that is identically 1
    # without the local ensemble) comes out of the reference as rounding noise: both below this.
    noise = 1e3 * torch.finfo(dtype).eps * grad_out.norm().item()
    noise_coords = blend_noise(feat, coords, cells, mlp, grad_out, flags, dtype)

    def per_query(g):
        return g.double().norm(dim=-1)
    if dtype == torch.float64:
        twin, back = permuted(mlp, seed=3)
        other = grads(ref.query_rgb, feat, coords, cells, twin, grad_out, flags)
        n = (len(other) - 3) // 2
        other = other[:3] + back(other[3:3 + n], other[3 + n:])
        for i, (o, t, e) in enumerate(zip(ours, theirs, other)):
            if t is None:
                assert o is None
                continue
            if max(o.norm().item(), t.norm().item()) <= noise:
                continue
            own = relative_error(t, e)
            for part in query_parts(i, noise_coords, lambda: 1e-10 * per_query(t)):
                o_, t_ = o[part], t[part]
                slack = 2 * noise_coords[part].norm().item() if i == 1 else 0
                assert (o_ - t_).norm().item() <= (2 * own + 1e-10) * t_.norm().item() + slack, \
                    (i, own)
        return
    as64 = [None if t is None else t.double() for t in (feat, coords, cells)]
    mlp64 = copy.deepcopy(mlp).double()
    exact = grads(ref.query_rgb, *as64, mlp64, grad_out.double(), flags)
    sizes = grads(ref.query_rgb, *as64, mlp64, grad_out.double().abs(), flags)
    for i, (o, t, e, size) in enumerate(zip(ours, theirs, exact, sizes)):
        if e is None:
            assert o is None
            continue
        if max(o.norm().item(), t.norm().item()) <= noise:
            continue
        for part in query_parts(i, noise_coords, lambda: 1e-5 * (per_query(e) + per_query(size))):
            o_, t_, e_, size_ = o[part], t[part], e[part], size[part]
            error = (o_.double() - e_).norm().item()
            own = (t_.double() - e_).norm().item()
            slack = 2 * noise_coords[part].norm().item() if i == 1 else 0
            assert error <= 2 * own + 1e-5 * (e_.norm().item() + size_.norm().item()) + slack, \
                (i, error, own)


@given(query_problems())
def test_gradients_match_reference(problem):
    feat, coords, cells, mlp = build(problem)
    flags = problem["flags"]
    assert_gradients_match((feat, coords, cells if flags["cell_decode"] else None, mlp), flags,
                           problem["dtype"])


PUBLISHED_FLAGS = dict(local_ensemble=True, feat_unfold=True, cell_decode=True)


def published_mlp_problem(dtype, case, hidden):
    """(feat, coords, cells, mlp): C = 8, the given 256-wide hidden layers, half the coordinates on
    pixel borders; `case` gives batch, height, width, queries and the coordinates' spread."""
    g = torch.Generator().manual_seed(case["queries"])
    feat, coords, cells = random_inputs(case["batch"], 8, case["height"], case["width"],
                                        case["queries"], seed=case["queries"], dtype=dtype,
                                        spread=case["spread"])
    half = case["queries"] // 2
    coords[:, :half] = border_coords(case["height"], case["width"], case["batch"], half, g, dtype)
    return feat, coords, cells, make_mlp(ref.imnet_in_dim(8), hidden, 3, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [
    dict(batch=1, height=1, width=1, queries=20, spread=1.5),     # one-pixel map
    dict(batch=3, height=7, width=5, queries=300, spread=1.3),    # B > 1, outside [-1, 1]
    dict(batch=2, height=9, width=8, queries=700, spread=1.0),    # several tiles per image
])
def test_gradients_published_mlp(dtype, case):
    """C = 8 and 256-wide hidden layers, half the coordinates on pixel borders."""
    assert_gradients_match(published_mlp_problem(dtype, case, [256, 256, 256]), PUBLISHED_FLAGS,
                           dtype)


# Every subset of the gradients: what is not asked for is not computed (an empty tensor from the
# operator, None from autograd), and what is asked for equals the full computation's.

NEEDS = st.lists(st.booleans(), min_size=3 + 2 * 3, max_size=3 + 2 * 3)
# Each of the gradients that need layer 0's output gradient, alone: feat's, the coordinates', the
# cells', layer 0's weight's and bias's (each must make the backward go down to layer 0).
LAYER0_ALONE = [[i == j for i in range(9)] for j in (0, 1, 2, 3, 6)]


def with_layer0_alone(test):
    """`test(needs, cell_decode)` with an explicit example for each of LAYER0_ALONE."""
    for needs in LAYER0_ALONE:
        test = example(needs, True)(test)
    return test


@settings(max_examples=40)
@given(NEEDS, st.booleans())
@with_layer0_alone
def test_any_subset_of_gradients(needs, cell_decode):
    feat, coords, cells = random_inputs(2, 3, 5, 4, 90, seed=1, dtype=torch.float64, spread=1.1)
    cells = cells if cell_decode else None
    mlp = make_mlp(ref.imnet_in_dim(3, True, cell_decode), [16, 12], 2, torch.float64)
    w, b = liif_cuda.mlp_parameters(mlp)
    w = [x.detach() for x in w]
    b = [x.detach() for x in b]
    grad_out = torch.randn(2, 90, 2, dtype=torch.float64)
    args = (grad_out, feat, coords, cells, w, b, True, True, cell_decode)
    full = torch.ops.liif_cuda.query_backward(*args, [True] * 9)
    some = torch.ops.liif_cuda.query_backward(*args, needs)
    for i, (f, s, need) in enumerate(zip(full, some, needs)):
        if need and (i != 2 or cell_decode):
            assert torch.equal(s, f), i
        else:
            assert s.numel() == 0, i


@pytest.mark.parametrize("placement", ["uniform", "borders"])
@pytest.mark.parametrize("local_ensemble,feat_unfold,cell_decode", [
    (True, True, True), (False, True, False), (True, False, True)])
@pytest.mark.parametrize("chunk_bytes", [1, None])
def test_recompute_backward_equals_the_fused_kernel(monkeypatch, chunk_bytes, local_ensemble,
                                                    feat_unfold, cell_decode, placement):
    """The recompute backward in torch operations (the CUDA backward for now) against the CPU's fused
    kernel, in float64: in one chunk and in chunks of a single query per batch element; with and
    without each flag (the cells given, and unused, without cell_decode); anywhere, and on the cell
    edges the ensemble's shifts land on (where its cells are the kernel's only if its geometry is
    the kernel's to the last constant)."""
    from liif_cuda import _backward
    if chunk_bytes is not None:
        monkeypatch.setattr(_backward, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(_backward, "MIN_CHUNK_QUERIES", 1)
    feat, coords, cells = random_inputs(2, 3, 5, 4, 40, seed=4, dtype=torch.float64, spread=1.2)
    if placement == "borders":
        coords = border_coords(5, 4, 2, 40, torch.Generator().manual_seed(5), torch.float64)
    coords[0, 3] = float("nan")
    mlp = make_mlp(ref.imnet_in_dim(3, feat_unfold, cell_decode), [16, 12], 2, torch.float64)
    w, b = (list(x.detach() for x in p) for p in liif_cuda.mlp_parameters(mlp))
    grad_out = torch.randn(2, 40, 2, dtype=torch.float64)
    args = (grad_out, feat, coords, cells, w, b, local_ensemble, feat_unfold, cell_decode,
            [True] * 9)
    fused = torch.ops.liif_cuda.query_backward(*args)
    recomputed = _backward.recompute_backward(*args)
    for i, (f, r) in enumerate(zip(fused, recomputed)):
        if placement == "borders" and i == 1:
            # Next to a cell's centre or edge a coordinate's gradient sums terms of 1e5 and more
            # (the blend's derivative where an area is near 0) to values near 1: equal to float64's
            # rounding of those terms only (test_gradients_published_mlp bounds it).
            continue
        torch.testing.assert_close(r, f, rtol=1e-10, atol=1e-12, equal_nan=True, msg=str(i))


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("where", ["cpu kernel", "cuda backward on the host"])
def test_nan_activation_passes_its_gradient_as_in_torch(where, layer):
    """A NaN activation (here: unit 5 of `layer`, whose bias is NaN: layer 0, whose ReLU the CUDA
    backward's first-layer kernel applies, or the first hidden layer, whose ReLU is torch's)
    passes its gradient through the ReLU, as torch's threshold_backward does in the reference's
    autograd (`a <= 0` stops it, NaN does not): that layer's weight gradient is finite and equal
    to the reference's, NaN where the reference's is."""
    feat, coords, cells = random_inputs(1, 3, 5, 6, 30, seed=4, dtype=torch.float64)
    mlp = make_mlp(ref.imnet_in_dim(3), [16, 16, 16], 3, torch.float64)
    with torch.no_grad():
        mlp.layers[2 * layer].bias[5] = float("nan")  # the Linear layers are every other module
    grad_out = torch.randn(1, 30, 3, dtype=torch.float64)
    query = liif_cuda.query if where == "cpu kernel" else cuda_harness.query_with_backward
    ours = grads(query, feat, coords, cells, mlp, grad_out, {})
    theirs = grads(ref.query_rgb, feat, coords, cells, mlp, grad_out, {})
    weight = 3 + layer  # [feat, coords, cells, weight0, weight1, ...]
    assert torch.isfinite(theirs[weight][5]).all() and theirs[weight][5].abs().sum() > 0
    for o, t in zip(ours[3:], theirs[3:]):
        assert torch.equal(o.isnan(), t.isnan())
        assert torch.allclose(o, t, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_frozen_parts_get_no_gradient():
    """Fine-tuning the MLP only: no feat gradient; a frozen MLP: none of its gradients."""
    feat, coords, cells = random_inputs(1, 4, 6, 6, 50, seed=3)
    mlp = make_mlp(ref.imnet_in_dim(4), [32, 32], 3, torch.float32)
    liif_cuda.query(feat, coords, cells, mlp).square().sum().backward()
    assert feat.grad is None and all(p.grad is not None for p in mlp.parameters())
    for p in mlp.parameters():
        p.grad = None
        p.requires_grad_(False)
    leaf = feat.clone().requires_grad_()
    liif_cuda.query(leaf, coords, cells, mlp).square().sum().backward()
    assert leaf.grad is not None and all(p.grad is None for p in mlp.parameters())


def test_frozen_encoder_skips_the_convolution_backward():
    """Without feat's and layer 0's gradients the map's gradient is neither gathered nor
    convolved back."""
    feat, coords, cells = random_inputs(1, 4, 6, 6, 200, seed=4)
    mlp = make_mlp(ref.imnet_in_dim(4), [32, 32], 3, torch.float32)
    mlp.layers[0].requires_grad_(False)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        liif_cuda.query(feat, coords, cells, mlp).square().sum().backward()
    names = {e.name for e in prof.events()}
    assert "liif_cuda::query_backward" in names
    assert "aten::convolution_backward" not in names
    assert mlp.layers[2].weight.grad is not None and mlp.layers[0].weight.grad is None


@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic_whatever_the_threads(threads):
    feat, coords, cells = random_inputs(2, 8, 9, 9, 3000, seed=5)
    mlp = make_mlp(ref.imnet_in_dim(8), [64, 64], 3, torch.float32)
    w, b = liif_cuda.mlp_parameters(mlp)
    args = (torch.randn(2, 3000, 3), feat, coords, cells, [x.detach() for x in w],
            [x.detach() for x in b], True, True, True, [False, True, True] + [True] * 6)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        first = torch.ops.liif_cuda.query_backward(*args)
        torch.set_num_threads(1 if threads == 2 else 2)
        second = torch.ops.liif_cuda.query_backward(*args)
    finally:
        torch.set_num_threads(previous)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_double_backward_is_a_clear_error():
    feat, coords, cells = random_inputs(1, 2, 3, 3, 5, seed=6, dtype=torch.float64)
    mlp = make_mlp(ref.imnet_in_dim(2), [4], 2, torch.float64)
    leaf = feat.clone().requires_grad_()
    out = liif_cuda.query(leaf, coords, cells, mlp).square().sum()
    (grad,) = torch.autograd.grad(out, leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("needs", [[True] * 9, [False, True, False] + [True, False, False] * 2])
def test_opcheck_backward_operator(needs):
    """Every gradient, and some (the fake's empty tensors where none is asked for)."""
    feat, coords, cells = random_inputs(2, 3, 4, 5, 9)
    mlp = make_mlp(31, [8, 6], 3, torch.float32)
    w, b = liif_cuda.mlp_parameters(mlp)
    args = (torch.randn(2, 9, 3), feat, coords, cells, [x.detach() for x in w],
            [x.detach() for x in b], True, True, True, needs)
    torch.library.opcheck(torch.ops.liif_cuda.query_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bad,message", [
    (lambda g: g[:, :-1], "grad_out must be"),
    (lambda g: g.double(), "grad_out must have feat's dtype"),
    (lambda g: g.unsqueeze(0), "grad_out must be"),
])
def test_bad_grad_out_is_a_clear_error(bad, message):
    feat, coords, cells = random_inputs(2, 3, 4, 5, 9)
    mlp = make_mlp(31, [8], 3, torch.float32)
    w, b = liif_cuda.mlp_parameters(mlp)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.liif_cuda.query_backward(bad(torch.randn(2, 9, 3)), feat, coords, cells,
                                           [x.detach() for x in w], [x.detach() for x in b],
                                           True, True, True, [True] * 7)


def test_wrong_number_of_flags_is_a_clear_error():
    feat, coords, cells = random_inputs(1, 3, 4, 5, 9)
    mlp = make_mlp(31, [8], 3, torch.float32)
    w, b = liif_cuda.mlp_parameters(mlp)
    with pytest.raises(RuntimeError, match="needs_grad must have 7 flags"):
        torch.ops.liif_cuda.query_backward(torch.randn(1, 9, 3), feat, coords, cells,
                                           [x.detach() for x in w], [x.detach() for x in b],
                                           True, True, True, [True] * 6)


@pytest.mark.parametrize("height,width", [(70, 70), (9, 8)], ids=["direct", "map"])
def test_gradients_past_one_wave_of_tiles(height, width):
    """More than kWaveTiles = 16 tiles of 256 rows per image (1100 queries x 4 neighbours), B = 2:
    the per-cell rows of every wave reach feat's gradient, on both first-layer paths."""
    feat, coords, cells = random_inputs(2, 3, height, width, 1100, seed=9, dtype=torch.float64,
                                        spread=1.1)
    mlp = make_mlp(ref.imnet_in_dim(3), [16, 16], 2, torch.float64)
    assert_gradients_match((feat, coords, cells, mlp), PUBLISHED_FLAGS, torch.float64)


def test_a_chunk_of_every_batch_element_stays_within_the_bound():
    """chunk_queries answers queries per batch element, and a chunk holds them for every batch
    element together: its memory bound is shared by the batch (a bound per element would let a
    chunk grow with the batch size)."""
    from liif_cuda import _backward
    widths = [256] * 4 + [3]
    one = _backward.chunk_queries(1, 4, widths, 4)
    assert one > _backward.MIN_CHUNK_QUERIES  # the bound, not the minimum, decides here
    for batch in (2, 4, 16):
        per_element = _backward.chunk_queries(batch, 4, widths, 4)
        assert one - batch < batch * per_element <= one, batch
