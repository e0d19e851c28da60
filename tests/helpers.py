"""Inputs for the query tests, and restatements the tests share."""

import numpy as np
import torch
from conftest import TOLERANCE, relative_error
from hypothesis import strategies as st

import liif_reference as ref
from liif_rounding_model import KernelRounding, map_columns


def make_mlp(in_dim, hidden, out_dim, dtype, seed=0):
    torch.manual_seed(seed)
    return ref.MLP(in_dim, out_dim, list(hidden)).to(dtype)


def border_coords(height, width, batch, queries, generator, dtype):
    """Coordinates on LR pixel edges and centres, on the edges shifted by the ensemble's shifts, and
    on the image border: the places where nearest sampling has to break a tie or clamp."""
    def axis(n, size):
        k = torch.randint(0, n + 1, size, generator=generator).to(torch.float64)
        centre = torch.randint(0, 2, size, generator=generator) * (1 / n)
        point = (-1 + 2 * k / n + centre).to(dtype)  # an edge or a centre, rounded to dtype
        # Subtract (in dtype) one of the ensemble's shifts, rounded as the reference rounds them, so
        # that the shifted coordinate lands on the edge or centre itself.
        shifts = torch.tensor([0.0, 1 / n + 1e-6, -1 / n + 1e-6, 1e-6], dtype=torch.float64)
        kind = torch.randint(0, len(shifts), size, generator=generator)
        return point - shifts.to(dtype)[kind]

    size = (batch, queries)
    return torch.stack([axis(height, size), axis(width, size)], dim=-1)


def random_cells(batch, queries, generator, dtype):
    return (torch.rand(batch, queries, 2, generator=generator, dtype=torch.float64) * 0.5
            + 1e-3).to(dtype)


def random_inputs(batch, channels, height, width, queries, seed=0, dtype=torch.float32,
                  spread=1.0):
    """feat (B, C, H, W), coords uniform in [-spread, spread] and cells (B, Q, 2)."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(batch, channels, height, width, generator=g, dtype=dtype)
    coords = (torch.rand(batch, queries, 2, generator=g, dtype=dtype) * 2 - 1) * spread
    return feat, coords, random_cells(batch, queries, g, dtype)


def published_problem(batch, height, width, queries, seed=None, spread=1.2, borders=None):
    """C = 64 features and the published MLP 580-256x4-3 (float32); the first `borders` (default
    half) of each image's coordinates on LR pixel borders, the others uniform in [-spread, spread]."""
    seed = queries if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    feat, coords, cells = random_inputs(batch, 64, height, width, queries, seed=seed, spread=spread)
    borders = queries // 2 if borders is None else borders
    coords[:, :borders] = border_coords(height, width, batch, borders, g, torch.float32)
    return feat, coords, cells, make_mlp(580, [256] * 4, 3, torch.float32)


@st.composite
def query_problems(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    flags = dict(local_ensemble=draw(st.booleans()), feat_unfold=draw(st.booleans()),
                 cell_decode=draw(st.booleans()))
    batch = draw(st.integers(1, 3))
    channels = draw(st.integers(1, 6))
    height = draw(st.integers(1, 9))
    width = draw(st.integers(1, 9))
    # From far fewer (query, neighbour) rows than LR cells (per-row products) to far more
    # (precomputed first-layer map), and past one tile of 256 rows.
    queries = draw(st.sampled_from([1, 2, 5, 17, 40, 70, 150]))
    hidden = draw(st.lists(st.integers(1, 24), min_size=0, max_size=3))
    out_dim = draw(st.integers(1, 4))
    placement = draw(st.sampled_from(["inside", "outside", "borders", "mixed"]))
    seed = draw(st.integers(0, 2**31 - 1))
    contiguous = draw(st.booleans())
    return dict(dtype=dtype, flags=flags, batch=batch, channels=channels, height=height,
                width=width, queries=queries, hidden=hidden, out_dim=out_dim, placement=placement,
                seed=seed, contiguous=contiguous)


def build(problem):
    g = torch.Generator().manual_seed(problem["seed"])
    dtype, B, Q = problem["dtype"], problem["batch"], problem["queries"]
    C, H, W = problem["channels"], problem["height"], problem["width"]
    feat = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    uniform = (torch.rand(B, Q, 2, generator=g, dtype=dtype) * 2 - 1)
    if problem["placement"] == "inside":
        coords = uniform
    elif problem["placement"] == "outside":
        coords = uniform * 1.5
    elif problem["placement"] == "borders":
        coords = border_coords(H, W, B, Q, g, dtype)
    else:
        pick = torch.rand(B, Q, 1, generator=g) < 0.5
        coords = torch.where(pick, border_coords(H, W, B, Q, g, dtype), uniform * 1.2)
    cells = random_cells(B, Q, g, dtype)
    if not problem["contiguous"]:
        feat = feat.transpose(2, 3).contiguous().transpose(2, 3)  # channels-last-like strides
        coords = coords.transpose(0, 1).contiguous().transpose(0, 1)
        cells = torch.cat([cells, cells], dim=-1)[..., ::2]
    flags = problem["flags"]
    in_dim = ref.imnet_in_dim(C, flags["feat_unfold"], flags["cell_decode"])
    mlp = make_mlp(in_dim, problem["hidden"], problem["out_dim"], dtype, seed=problem["seed"] % 1000)
    return feat, coords, cells, mlp


# The tensor-core kernel (liif_cuda.query's reduced precisions).

REDUCED = ["tf32", "bf16", "fp16"]


@st.composite
def tensor_core_problems(draw):
    """The shapes the tensor-core kernel takes: hidden layers 256 wide, out_dim <= 128."""
    return dict(
        precision=draw(st.sampled_from(REDUCED)),
        flags=dict(local_ensemble=draw(st.booleans()), feat_unfold=draw(st.booleans()),
                   cell_decode=draw(st.booleans())),
        batch=draw(st.integers(1, 2)), channels=draw(st.integers(1, 6)),
        height=draw(st.integers(1, 8)), width=draw(st.integers(1, 8)),
        # At least 17 x 3 outputs: the model's error over a handful of outputs is too noisy a scale.
        queries=draw(st.sampled_from([17, 40])),
        depth=draw(st.integers(1, 3)), out_dim=draw(st.sampled_from([3, 8])),
        placement=draw(st.sampled_from(["inside", "outside", "borders"])),
        seed=draw(st.integers(0, 2**31 - 1)))


def build_tensor_core_problem(problem):
    """feat, coords, cells (float32, CPU) and the MLP of a tensor_core_problems() example."""
    g = torch.Generator().manual_seed(problem["seed"])
    B, C, H, W, Q = (problem[k] for k in ("batch", "channels", "height", "width", "queries"))
    feat = torch.randn(B, C, H, W, generator=g)
    if problem["placement"] == "borders":
        coords = border_coords(H, W, B, Q, g, torch.float32)
    else:
        spread = 1.0 if problem["placement"] == "inside" else 1.4
        coords = (torch.rand(B, Q, 2, generator=g) * 2 - 1) * spread
    cells = random_cells(B, Q, g, torch.float32)
    flags = problem["flags"]
    in_dim = ref.imnet_in_dim(C, flags["feat_unfold"], flags["cell_decode"])
    hidden = problem["hidden"] if "hidden" in problem else [256] * problem["depth"]
    mlp = make_mlp(in_dim, hidden, problem["out_dim"], torch.float32, seed=problem["seed"] % 1000)
    return feat, coords, cells, mlp


@st.composite
def cpu_bf16_problems(draw):
    """The CPU bf16 path takes any MLP of two layers or more: the tensor-core problems with hidden
    widths of any size (odd ones and ones past a 32-column block included) and any out_dim."""
    problem = draw(tensor_core_problems())
    problem.pop("depth")
    problem["precision"] = "bf16"
    problem["hidden"] = draw(st.lists(st.sampled_from([1, 2, 7, 16, 31, 32, 33, 64, 70, 256]),
                                      min_size=1, max_size=3))
    problem["out_dim"] = draw(st.integers(1, 20))
    # Every row count modulo the kernel's 8-row blocks (without the local ensemble rows = queries).
    problem["queries"] = draw(st.integers(17, 40))
    return problem


def rounding_model_bound(feat, coords, cells, mlp, precision, flags, tf32_map=False):
    """The float32 reference for a tensor-core result, and the bound on its relative error: twice
    the error of the kernel's own rounding model computed exactly (liif_rounding_model), plus
    float32's 1e-5. The reference is float32 because float64 would choose other neighbours on
    pixel borders. `tf32_map`: the first-layer map is computed on TF32 tensor cores (the CUDA op on
    a GPU), not exactly (the host execution harness)."""
    model_mlp = KernelRounding(mlp, precision, map_columns(
        mlp.layers[0].in_features, flags["cell_decode"]) if tf32_map else None)
    with torch.no_grad():
        exact = ref.query_rgb(feat, coords, cells, mlp, **flags)
        model = ref.query_rgb(feat, coords, cells, model_mlp, **flags)
    bound = 2 * relative_error(model, exact) + TOLERANCE[torch.float32]
    return exact, bound


def matlab_resize_1d(x, out_len, scale):
    """MATLAB imresize's bicubic along axis 0, written out directly: every output sample is the
    normalised weighted sum of the input extended by symmetric padding (np.pad 'symmetric',
    MATLAB's [1:n, n:-1:1]), with the cubic a = -0.5 kernel stretched by 1 / scale when shrinking
    (antialiasing)."""
    def cubic(t):
        t = np.abs(t)
        return np.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1,
                        np.where(t <= 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0.0))
    n = x.shape[0]
    pad = 4 * n
    ext = np.pad(x, [(pad, pad)] + [(0, 0)] * (x.ndim - 1), mode="symmetric")
    j = np.arange(-pad, n + pad) + 1.0  # 1-based positions of ext's samples
    out = []
    for i in range(1, out_len + 1):
        u = i / scale + 0.5 * (1 - 1 / scale)
        w = scale * cubic(scale * (u - j)) if scale < 1 else cubic(u - j)
        out.append(np.tensordot(w / w.sum(), ext, axes=(0, 0)))
    return np.stack(out)
