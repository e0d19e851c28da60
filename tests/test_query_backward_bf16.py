"""The backward's bf16 mode (backward_precision="bf16", and the default inside torch.autocast with
bfloat16): the products between hidden layers with bf16 operands and results, on the CPU kernel and
on the CUDA backward run by the host harness. Its error against the exact gradients is held to that
of the reference's own autograd under torch.autocast bf16 (the error PyTorch users accept when they
train in bf16), and must be visible (the mode really ran) where the CPU has bf16 products; the
choice of mode, the fallback and the errors."""

import copy

import pytest
import torch
from conftest import CUDA_SKIP_REASON, TOLERANCE, relative_error
from helpers import border_coords, build, make_mlp, query_problems, random_inputs
from hypothesis import given
from hypothesis import strategies as st

import cuda_harness
import liif_cuda
import liif_reference as ref
from liif_rounding_model import Bf16BackwardRounding

NATIVE = liif_cuda.build_info()["cpu_bf16"]
# Where the bf16 mode runs on this machine: the CPU kernel (with bf16 products) and the CUDA
# backward executed by the host harness.
ON_THE_HOST = [
    pytest.param("cpu kernel", marks=pytest.mark.skipif(
        not NATIVE, reason="this CPU has no bf16 products (AVX512-BF16)")),
    "cuda backward on the host"]


def problem(queries=300, hidden=(256, 256, 256), seed=1, cell_decode=True):
    g = torch.Generator().manual_seed(seed)
    feat, coords, cells = random_inputs(2, 8, 9, 7, queries, seed=seed, spread=1.2)
    coords[:, :queries // 3] = border_coords(9, 7, 2, queries // 3, g, torch.float32)
    mlp = make_mlp(ref.imnet_in_dim(8, True, cell_decode), list(hidden), 3, torch.float32)
    grad_out = torch.randn(2, queries, 3, generator=g)
    return feat, coords, cells if cell_decode else None, mlp, grad_out


def gradients(query, feat, coords, cells, mlp, grad_out, autocast=False, bf16_output=False,
              **kwargs):
    """[feat, coords, (cells,) weights..., biases...] of sum(out * grad_out). `bf16_output`: the
    output rounded to bf16 as autocast returns it (so is its gradient, then)."""
    inputs = [t.detach().clone().requires_grad_() for t in (feat, coords, cells) if t is not None]
    mlp.zero_grad()
    with torch.autocast(feat.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = query(*inputs[:2], inputs[2] if cells is not None else None, mlp,
                    cell_decode=cells is not None, **kwargs)
    if bf16_output:
        out = out.bfloat16()
    (out.float() * grad_out).sum().backward()
    linears = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    return ([t.grad for t in inputs] + [m.weight.grad.clone() for m in linears]
            + [m.bias.grad.clone() for m in linears])


@pytest.mark.parametrize("where", ON_THE_HOST + [
    pytest.param("cuda", marks=pytest.mark.skipif(CUDA_SKIP_REASON is not None,
                                                  reason=str(CUDA_SKIP_REASON)))])
@pytest.mark.parametrize("case", [dict(), dict(hidden=(64, 48, 32), queries=90, seed=3),
                                  dict(cell_decode=False, seed=5)])
def test_error_at_most_that_of_autocast(where, case):
    feat, coords, cells, mlp, grad_out = problem(**case)
    if where == "cuda":
        feat, coords, grad_out = feat.cuda(), coords.cuda(), grad_out.cuda()
        cells = cells.cuda() if cells is not None else None
        mlp = mlp.cuda()
    exact = gradients(liif_cuda.query, feat, coords, cells, mlp, grad_out)
    if where == "cuda backward on the host":
        ours = gradients(cuda_harness.query_with_backward, feat, coords, cells, mlp, grad_out,
                         backward_precision="bf16")
    else:
        ours = gradients(liif_cuda.query, feat, coords, cells, mlp, grad_out,
                         backward_precision="bf16")
    autocast = gradients(ref.query_rgb, feat, coords, cells, mlp, grad_out, autocast=True)
    errors = [relative_error(o, e) for o, e in zip(ours, exact)]
    theirs = [relative_error(a.float(), e) for a, e in zip(autocast, exact)]
    for i, (mine, their) in enumerate(zip(errors, theirs)):
        assert mine <= 1.5 * their + 1e-6, (i, mine, their)
    assert max(errors) > 1e-4  # the bf16 products really ran


@st.composite
def bf16_backward_problems(draw):
    """query_problems in float32 with at least one layer between hidden layers (the layers the
    mode rounds), of widths that need padding to the kernel's 32-column blocks or not."""
    problem = draw(query_problems())
    problem.update(dtype=torch.float32,
                   hidden=draw(st.lists(st.integers(1, 70), min_size=2, max_size=4)))
    return problem


@pytest.mark.parametrize("where", ON_THE_HOST)
@given(problem=bf16_backward_problems())
def test_follows_its_rounding_model(where, problem):
    """The bf16 mode (the CPU kernel's, and the CUDA backward's run by the host harness) against
    python/liif_rounding_model.Bf16BackwardRounding (the same roundings, in float64, but for the
    CPU's bf16 convolution backward of the map's gradient, within the bound): feat's, the cells' and
    every parameter's gradient within half the
    model's own distance from the exact gradient plus one bf16 rounding (2^-8) of its norm. Both
    round the same values to bf16 except where float32 and float64 land on either side of a
    rounding boundary or a ReLU's threshold, which moves a gradient by a fraction of the mode's
    error (up to about 0.2 of it in a simulation of 40 random problems), or, with a handful of
    rows, by one rounding of one of them; a wrong mask, transpose, padding column or layer moves
    it by as much as the gradient itself. The coordinates' gradient is left to the
    autocast bound above: near a pixel centre two of the four areas almost vanish and its area
    terms cancel to float32 noise, different for any other rounding of the predictions."""
    feat, coords, cells, mlp = build(problem)
    flags = problem["flags"]
    cells = cells if flags["cell_decode"] else None
    g = torch.Generator().manual_seed(problem["seed"] % 1000)
    grad_out = torch.randn(*coords.shape[:2], problem["out_dim"], generator=g)
    model_mlp = Bf16BackwardRounding(mlp)

    def run(query):
        inputs = [t.detach().clone().requires_grad_() for t in (feat, coords, cells)
                  if t is not None]
        mlp.zero_grad()
        out = query(inputs[0], inputs[1], inputs[2] if cells is not None else None)
        (out * grad_out).sum().backward()
        linears = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
        grads = ([t.grad for t in inputs] + [m.weight.grad.clone() for m in linears]
                 + [m.bias.grad.clone() for m in linears])
        return grads[:1] + grads[2:]  # without the coordinates'

    if where == "cpu kernel":
        ours = run(lambda f, c, ce: liif_cuda.query(f, c, ce, mlp, backward_precision="bf16",
                                                    **flags))
    else:
        ours = run(lambda f, c, ce: cuda_harness.query_with_backward(
            f, c, ce, mlp, backward_precision="bf16", **flags))
    model = run(lambda f, c, ce: ref.query_rgb(f, c, ce, model_mlp, **flags))
    exact = run(lambda f, c, ce: liif_cuda.query(f, c, ce, mlp, **flags))
    for i, (o, m, e) in enumerate(zip(ours, model, exact)):
        assert (o - m).norm() <= 0.5 * (m - e).norm() + 2**-8 * m.norm(), i


@pytest.mark.skipif(not NATIVE, reason="this CPU has no bf16 products (AVX512-BF16)")
def test_autocast_bf16_selects_the_bf16_backward():
    feat, coords, cells, mlp, grad_out = problem(queries=60)
    explicit = gradients(liif_cuda.query, feat, coords, cells, mlp, grad_out, bf16_output=True,
                         precision="bf16", backward_precision="bf16")
    autocast = gradients(liif_cuda.query, feat, coords, cells, mlp, grad_out, autocast=True)
    exact_backward = gradients(liif_cuda.query, feat, coords, cells, mlp, grad_out, autocast=True,
                               backward_precision="fp32")
    reference = gradients(liif_cuda.query, feat, coords, cells, mlp, grad_out, bf16_output=True,
                          precision="bf16")
    assert all(torch.equal(a, e) for a, e in zip(autocast, explicit))
    assert all(torch.equal(a, e) for a, e in zip(exact_backward, reference))
    assert not all(torch.equal(a, e) for a, e in zip(autocast, reference))


def test_without_bf16_products_it_is_the_exact_backward(float32_fallback):
    """No bf16 units (forced), or no layer between hidden layers: the exact gradients."""
    feat, coords, cells, mlp, grad_out = problem(queries=60, hidden=(32, 32))
    exact = gradients(liif_cuda.query, feat, coords, cells, mlp, grad_out)
    bf16 = gradients(liif_cuda.query, feat, coords, cells, mlp, grad_out, backward_precision="bf16")
    assert all(torch.equal(a, e) for a, e in zip(bf16, exact))


@pytest.mark.parametrize("where", ["cpu kernel", "cuda backward on the host"])
def test_two_layer_mlp_is_exact(where):
    """No layer between hidden layers: nothing is rounded, not even layer 0's output."""
    feat, coords, cells, mlp, grad_out = problem(queries=60, hidden=(32,))
    query = liif_cuda.query if where == "cpu kernel" else cuda_harness.query_with_backward
    exact = gradients(query, feat, coords, cells, mlp, grad_out)
    bf16 = gradients(query, feat, coords, cells, mlp, grad_out, backward_precision="bf16")
    assert all(torch.equal(a, e) for a, e in zip(bf16, exact))


def test_output_gradient_rounded_where_the_mode_says():
    """The CUDA backward on the host, where its only rounding is that of the output gradient of
    the layer between hidden layers: every value of the forward is a small integer (exact in
    bf16), one neighbour per query (blend weight 1) and a last layer of one output whose weights
    are powers of two, so that the layer's output gradient rounded to bf16 is that of grad_out
    rounded to bf16. The gradients of that layer's weight and of what lies below it (layer 0's
    parameters, feat's) are then the exact ones (the reference's, float64) for grad_out rounded to
    bf16, those of its bias and of the last layer the exact ones for grad_out itself."""
    g = torch.Generator().manual_seed(4)
    flags = dict(local_ensemble=False, feat_unfold=False)  # and no cells: cell_decode=False
    feat = torch.randint(-2, 3, (2, 3, 4, 5), generator=g).float()
    coords = torch.rand(2, 30, 2, generator=g) * 2 - 1
    mlp = make_mlp(ref.imnet_in_dim(3, False, False), [6, 5], 1, torch.float32)
    first, hidden, last = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer in (first, hidden):
            layer.weight.copy_(torch.randint(-2, 3, layer.weight.shape, generator=g))
            layer.bias.copy_(torch.randint(-1, 3, layer.bias.shape, generator=g))
        first.weight[:, 3:] = 0  # the relative coordinates' columns: integers stay integers
        powers = torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0])
        last.weight.copy_(powers[torch.randint(0, 6, last.weight.shape, generator=g)])
    grad_out = torch.randn(2, 30, 1, generator=g)
    rounded = grad_out.bfloat16().float()
    assert not torch.equal(rounded, grad_out)
    ours = gradients(cuda_harness.query_with_backward, feat, coords, None, mlp, grad_out,
                     backward_precision="bf16", **flags)
    mlp64 = copy.deepcopy(mlp).double()
    exact = [gradients(ref.query_rgb, feat.double(), coords.double(), None, mlp64, go.double(),
                       **flags) for go in (grad_out, rounded)]
    # [feat, coords, weight 0, 1, 2, bias 0, 1, 2]: which grad_out each one sees. The coordinates'
    # is zero (the blend weight of one neighbour is 1 and the relative coordinates' columns are
    # zero), up to float32 noise: left out.
    sees_rounded = [True, None, True, True, False, True, False, False]
    for i, (o, r) in enumerate(zip(ours, sees_rounded)):
        if r is not None:
            assert relative_error(o.double(), exact[r][i]) <= TOLERANCE[torch.float32], i


@pytest.mark.parametrize("needs", [[True, False, False] + [False, False, True, False] * 2,
                                   [False, True, True] + [False] * 8,
                                   [False, False, False] + [False, True, False, False] * 2])
def test_subsets_equal_the_full_computation(needs):
    feat, coords, cells, mlp, grad_out = problem(queries=40, hidden=(32, 32, 32))
    w, b = (list(x.detach() for x in p) for p in liif_cuda.mlp_parameters(mlp))
    args = (grad_out, feat, coords, cells, w, b, True, True, True)
    full = torch.ops.liif_cuda.query_backward(*args, [True] * 11, "bf16")
    some = torch.ops.liif_cuda.query_backward(*args, needs, "bf16")
    for i, (f, s, need) in enumerate(zip(full, some, needs)):
        assert torch.equal(s, f) if need else s.numel() == 0, i


def test_bad_backward_precision_is_a_clear_error():
    feat, coords, cells, mlp, grad_out = problem(queries=10, hidden=(8, 8))
    with pytest.raises(ValueError, match="backward_precision must be one of"):
        liif_cuda.query(feat, coords, cells, mlp, backward_precision="fp16")
    with pytest.raises(ValueError, match="backward_precision='bf16' needs float32"):
        liif_cuda.query(feat.double(), coords.double(), cells.double(), mlp.double(),
                        backward_precision="bf16")
    w, b = (list(x.detach().float() for x in p) for p in liif_cuda.mlp_parameters(mlp))
    with pytest.raises(RuntimeError, match="backward_precision must be 'fp32' or 'bf16'"):
        torch.ops.liif_cuda.query_backward(grad_out, feat, coords, cells, w, b, True, True, True,
                                           [True] * 9, "tf32")


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
def test_training_shape_on_cuda():
    """The published recipe's shape (batch 16, 48x48 maps of 64 channels, 2304 queries each, MLP
    580-256x4-3): several chunks and cuBLAS's own choices for products of 147456 rows."""
    g = torch.Generator().manual_seed(11)
    feat = torch.randn(16, 64, 48, 48, generator=g).cuda()
    coords = (torch.rand(16, 2304, 2, generator=g) * 2 - 1).cuda()
    cells = torch.full((16, 2304, 2), 2 / 96).cuda()
    mlp = make_mlp(ref.imnet_in_dim(64), [256] * 4, 3, torch.float32).cuda()
    grad_out = torch.randn(16, 2304, 3, generator=g).cuda()
    exact = gradients(liif_cuda.query, feat, coords, cells, mlp, grad_out)
    ours = gradients(liif_cuda.query, feat, coords, cells, mlp, grad_out, backward_precision="bf16")
    autocast = gradients(ref.query_rgb, feat, coords, cells, mlp, grad_out, autocast=True)
    for i, (o, a, e) in enumerate(zip(ours, autocast, exact)):
        assert relative_error(o, e) <= 1.5 * relative_error(a.float(), e) + 1e-6, i
