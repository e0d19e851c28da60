"""The tensor-core kernel (liif_cuda.query's reduced precisions), executed on the host by the harness
of tests/harness against the float32 reference.

The harness emulates the WMMA fragment operations, the fp16 / bf16 / tf32 operand roundings bit for
bit and the asynchronous weight copies (see tests/harness/cuda_host_emulation.h), so the results here
carry the kernel's own rounding errors; on the GPU only the order of the float32 accumulation
differs. Issue 4's bounds, relative error against the float32 reference <= 5e-4 (tf32), 1e-3 (fp16),
4e-3 (bf16), are asserted on random inputs of the published shape and of a few other channel counts,
flags and depths (test_random_inputs, test_published_shape). Over arbitrary small shapes (hypothesis:
one-pixel maps, a few queries, outputs that are small differences of large terms) a relative error
measures the problem's conditioning as much as the kernel, so there the kernel is held to its own
rounding model computed exactly (KernelRounding: the same values rounded at the same places, float64
elsewhere), as flash-attention's tests hold their kernels to the reference's own precision error: at
most twice the model's error, plus float32's 1e-5. That also catches roundings missed or added where
a result would stay within the issue's bound.
"""

import copy

import pytest
import torch
from conftest import PRECISION_TOLERANCE, TOLERANCE, relative_error
from cuda_harness import (FAST, FLAGS, GENERIC, MMA, MMA16, SHARED_DEFAULT, SHARED_SM80,
                          SHARED_SM86, SHARED_SM90, TENSOR_CORE, WGMMA, WGMMA_MC, WGMMA_PATHS,
                          WGMMA_PP, WGMMA_WS, load, reference, run, tensor_core_path)
from helpers import (REDUCED, border_coords, build_tensor_core_problem, make_mlp,
                     published_problem, random_inputs, rounding_model_bound, tensor_core_problems)
from hypothesis import given, settings
from hypothesis import strategies as st
from liif_rounding_model import KernelRounding, tf32_round_nearest_away

import liif_reference as ref


KERNELS = ["mma", "mma16", "wmma", "wgmma", "wgmma_ws", "wgmma_mc", "wgmma_pp"]
# The kernels of 128-row tiles (all but WMMA).
TILED = ["mma", "mma16", "wgmma", "wgmma_ws", "wgmma_mc", "wgmma_pp"]
MULTICAST = ("wgmma_mc", "wgmma_pp")


# Each example runs 256-thread blocks of emulated tensor-core tiles: half the profile's examples.
@settings(max_examples=max(10, settings().max_examples // 2))
@given(tensor_core_problems(), st.sampled_from([SHARED_SM86, SHARED_SM80, SHARED_SM90]),
       st.booleans(), st.sampled_from(KERNELS))
def test_tensor_core_kernel_matches_reference(problem, shared, reverse_order, kernel):
    feat, coords, cells, mlp = build_tensor_core_problem(problem)
    flags = problem["flags"]
    precision = problem["precision"]
    out, path = run(feat, coords, cells, mlp, shared, reverse_order, precision, kernel, **flags)
    assert path == tensor_core_path(precision, flags["local_ensemble"], problem["depth"],
                                    problem["out_dim"], shared, kernel)
    if path == FAST:
        # 64 queries per block need 256 bytes more than sm_86's 99 KiB: the exact kernel runs.
        expected = reference(feat, coords, cells, mlp, **flags)
        assert relative_error(out, expected) <= TOLERANCE[torch.float32]
        return
    exact, bound = rounding_model_bound(feat, coords, cells, mlp, precision, flags)
    assert out.shape == exact.shape and out.dtype == torch.float32
    assert relative_error(out, exact) <= bound


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("channels,flags,depth,out_dim", [
    (3, FLAGS, 4, 3),
    (16, dict(local_ensemble=False, feat_unfold=True, cell_decode=True), 2, 3),
    (8, dict(local_ensemble=True, feat_unfold=False, cell_decode=False), 3, 8),
])
def test_random_inputs(precision, channels, flags, depth, out_dim):
    """Issue 4's bounds on random features, coordinates and cells (a 9x7 map, B = 2)."""
    feat, coords, cells = random_inputs(2, channels, 9, 7, 60, seed=channels, spread=1.1)
    in_dim = ref.imnet_in_dim(channels, flags["feat_unfold"], flags["cell_decode"])
    mlp = make_mlp(in_dim, [256] * depth, out_dim, torch.float32, seed=depth)
    for kernel in KERNELS:
        out, path = run(feat, coords, cells, mlp, precision=precision, tensor_core_kernel=kernel,
                        **flags)
        assert path == tensor_core_path(precision, flags["local_ensemble"], depth, out_dim,
                                        SHARED_SM90, kernel)
        error = relative_error(out, reference(feat, coords, cells, mlp, **flags))
        assert TOLERANCE[torch.float32] < error <= PRECISION_TOLERANCE[precision]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("shared", [SHARED_SM86, SHARED_SM90])
@pytest.mark.parametrize("batch,height,width,queries", [
    (1, 6, 5, 16),    # one full block of the WMMA kernel, half of the mma.sync kernel's
    (2, 4, 7, 45),    # B > 1, blocks straddling the images, a partial last block
    (1, 3, 4, 70),    # more than one mma.sync block, the second partial
    (3, 1, 1, 5),     # a one-pixel map
])
def test_published_shape(kernel, precision, shared, batch, height, width, queries):
    """C = 64 and the published MLP 580-256x4-3, half the coordinates on pixel borders."""
    feat, coords, cells, mlp = published_problem(batch, height, width, queries)
    out, path = run(feat, coords, cells, mlp, shared, reverse_order=True, precision=precision,
                    tensor_core_kernel=kernel)
    assert path == tensor_core_path(precision, True, 4, 3, shared, kernel)
    error = relative_error(out, reference(feat, coords, cells, mlp))
    assert error <= PRECISION_TOLERANCE[precision]
    # The operands really are rounded: the float32 kernels stay below 1e-5.
    assert error > TOLERANCE[torch.float32]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("precision", REDUCED)
def test_non_finite_coordinates(precision, kernel):
    feat, coords, cells = random_inputs(2, 4, 5, 5, 20, seed=3)
    coords[0, 1, 0] = float("nan")
    coords[1, 7, 1] = float("inf")
    mlp = make_mlp(ref.imnet_in_dim(4), [256, 256, 256], 3, torch.float32)
    out, path = run(feat, coords, cells, mlp, precision=precision, tensor_core_kernel=kernel)
    assert path == tensor_core_path(precision, True, 3, 3, SHARED_SM90, kernel)
    expected = reference(feat, coords, cells, mlp)
    model = reference(feat, coords, cells, KernelRounding(mlp, precision))
    bad = ~torch.isfinite(coords).all(-1)
    assert torch.isnan(out[bad]).all()
    # The finite queries within the rounding model's bound (test_tensor_core_kernel_matches_reference).
    bound = 2 * relative_error(model[~bad], expected[~bad]) + TOLERANCE[torch.float32]
    assert relative_error(out[~bad], expected[~bad]) <= bound


@pytest.mark.parametrize("hidden,out_dim,shared,path", [
    ([256, 256], 3, SHARED_SM90, MMA),
    ([256, 256], 32, SHARED_SM80, MMA),            # the widest last layer the mma.sync kernel keeps
    ([256, 256], 33, SHARED_SM90, TENSOR_CORE),    # beyond: WMMA
    ([256], 3, SHARED_SM90, TENSOR_CORE),          # no hidden-to-hidden layer: WMMA
    ([256, 256], 3, SHARED_SM86, TENSOR_CORE),     # 99 KiB: no room for 128 rows, WMMA
    ([256, 256], 128, SHARED_SM86, TENSOR_CORE),   # the widest last layer WMMA keeps
    ([256, 256], 129, SHARED_SM90, GENERIC),       # beyond: the float32 kernels, exact
    ([256, 128, 256], 3, SHARED_SM90, GENERIC),
    ([256, 256], 3, SHARED_DEFAULT, GENERIC),      # 48 KiB of shared memory: no room for either
])
def test_kernel_choice_and_fallback(hidden, out_dim, shared, path):
    feat, coords, cells = random_inputs(1, 4, 5, 5, 23, seed=2)
    mlp = make_mlp(ref.imnet_in_dim(4), hidden, out_dim, torch.float32)
    out, used = run(feat, coords, cells, mlp, shared, precision="bf16")
    assert used == path
    bound = (PRECISION_TOLERANCE["bf16"] if path in (TENSOR_CORE, MMA)
             else TOLERANCE[torch.float32])
    assert relative_error(out, reference(feat, coords, cells, mlp)) <= bound


@pytest.mark.parametrize("kernel,fallback", [("mma", TENSOR_CORE), ("wgmma", MMA),
                                             ("wgmma_ws", MMA), ("wgmma_mc", MMA),
                                             ("wgmma_pp", MMA)])
def test_tensor_core_kernels_exactly_where_their_blocks_fit(kernel, fallback):
    """bf16: the 128-row kernels run exactly where their blocks fit the device's limit, and a
    byte less runs the next kernel that does (the mma.sync kernel, else WMMA). Their blocks
    (csrc/cuda/liif_query_launch.h): 128 rows of 256 bf16 layer-0 activations padded by 16 bytes,
    or for the warp-specialised kernel two tiles' operands of 128 x 256 bf16 unpadded; a ring of
    4 chunks of 256 x 80 bytes (mma.sync), 6 (wgmma) or 5 (wgmma_ws) of 256 x 64, and for the
    multicast kernel 6 (8 with the ping-pong schedule) with two 8-byte mbarriers each; and the
    float32 geometry of 128 rows and 32 queries (twice, for the warp-specialised kernel's two
    tiles)."""
    rows, queries = 128, 32
    geometry = rows * (3 * 4 + 4) + queries * (2 * 4 + 4)
    act, ring, tiles = {"mma": (rows * (256 * 2 + 16), 4 * 256 * 80, 1),
                        "wgmma": (rows * (256 * 2 + 16), 6 * 256 * 64, 1),
                        "wgmma_ws": (2 * rows * 256 * 2, 5 * 256 * 64, 2),
                        "wgmma_mc": (rows * (256 * 2 + 16), 6 * 256 * 64 + 6 * 2 * 8, 1),
                        "wgmma_pp": (rows * (256 * 2 + 16), 8 * 256 * 64 + 8 * 2 * 8, 1)}[kernel]
    fits = act + ring + tiles * geometry
    feat, coords, cells = random_inputs(1, 4, 5, 6, 8, seed=5)
    mlp = make_mlp(ref.imnet_in_dim(4), [256, 256], 3, torch.float32)
    path = {"mma": MMA, **WGMMA_PATHS}[kernel]
    exact, bound = rounding_model_bound(feat, coords, cells, mlp, "bf16", FLAGS)
    for shared, expected in ((fits, path), (fits - 1, fallback)):
        out, used = run(feat, coords, cells, mlp, shared, precision="bf16",
                        tensor_core_kernel=kernel)
        assert used == expected, shared
        assert relative_error(out, exact) <= bound


def test_reduced_precision_needs_float32():
    feat, coords, cells = random_inputs(1, 2, 3, 3, 4, seed=5, dtype=torch.float64)
    mlp = make_mlp(ref.imnet_in_dim(2), [256], 3, torch.float64)
    with pytest.raises(RuntimeError, match="needs float32"):
        run(feat, coords, cells, mlp, precision="fp16")


# The emulation itself: bit-exact operand roundings, copies that land only when waited for,
# unrounded tf32 operands refused.

def special_floats():
    g = torch.Generator().manual_seed(0)
    values = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, 65520.0, -65520.0, 1e-8, 6e-8, 3e-8,
              2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -24, 2.0 ** -14, 3.4e38, 1e-40,
              float("inf"), -float("inf"), 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8,
              1 + 3 * 2.0 ** -8]
    random = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-12, 8, (4000,),
                                                                                   generator=g)])
    return torch.cat([torch.tensor(values), random]).float()


@pytest.mark.parametrize("precision", REDUCED)
def test_emulated_operand_rounding_is_exact(precision):
    load()
    x = special_floats()
    got = torch.ops.liif_cuda_harness.round_operands(x, precision)
    expected = {"fp16": lambda t: t.half().float(), "bf16": lambda t: t.bfloat16().float(),
                "tf32": tf32_round_nearest_away}[precision](x)
    assert torch.equal(got, expected)
    nan = torch.ops.liif_cuda_harness.round_operands(torch.tensor([float("nan")]), precision)
    assert torch.isnan(nan).all()


def test_host_rounds_tf32_weights_as_the_kernel_rounds():
    load()
    x = special_floats()
    assert torch.equal(torch.ops.liif_cuda_harness.round_to_tf32(x), tf32_round_nearest_away(x))
    nan = torch.ops.liif_cuda_harness.round_to_tf32(torch.tensor([float("nan"), -float("nan")]))
    assert torch.isnan(nan).all()


@pytest.mark.parametrize("wait_first", [True, False])
def test_emulated_async_copies_land_when_waited_for(wait_first):
    load()
    src = torch.arange(4 * 64, dtype=torch.float32)
    out = torch.ops.liif_cuda_harness.async_copy(src, wait_first)
    if wait_first:
        assert torch.equal(out.view(64, 4), src.view(64, 4).roll(-1, dims=0))
    else:
        # Read before the copies landed: the NaN bytes shared memory starts with (except the last
        # thread's read of thread 0's slot: thread 0 has waited for its copy by then).
        assert torch.isnan(out.view(64, 4)[:-1]).all()


def test_emulation_refuses_unrounded_tf32_operands():
    load()
    torch.ops.liif_cuda_harness.tf32_operand(True)
    with pytest.raises(RuntimeError, match="tf32 operand"):
        torch.ops.liif_cuda_harness.tf32_operand(False)


# The warp-wide instructions of the mma.sync kernel: emulated on each lane's own registers.

@pytest.mark.parametrize("lane_mask", [1, 2, 16])
@pytest.mark.parametrize("reverse_order", [False, True])
def test_emulated_shuffle(lane_mask, reverse_order):
    load()
    out = torch.ops.liif_cuda_harness.shuffle(64, lane_mask, reverse_order)
    expected = torch.arange(128) ^ lane_mask
    assert torch.equal(out, expected.float())


@pytest.mark.parametrize("mode,message", [
    ("instructions", "different warp-wide instructions"),
    ("barrier", "reached by 31 lanes"),
    ("outside", "inside the block's shared memory"),
])
def test_emulation_refuses_warp_misuse(mode, message):
    load()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.liif_cuda_harness.warp_misuse(mode)


@pytest.mark.parametrize("via_ldmatrix", [False, True])
@pytest.mark.parametrize("precision", REDUCED)
def test_emulated_mma_tile_is_a_matrix_product(precision, via_ldmatrix):
    """Fragments by PTX's documented per-lane layouts (or ldmatrix as the kernel uses it), two
    m16n8 mma.sync: D = A B + C exactly (operands representable, products exact in float32)."""
    load()
    k = 8 if precision == "tf32" else 16
    g = torch.Generator().manual_seed(k)
    # Small integers and halves: every product and sum is exact in float32, whatever the order.
    a = torch.randint(-8, 9, (16, k), generator=g).float() / 2
    b = torch.randint(-8, 9, (k, 16), generator=g).float() / 4
    c = torch.randint(-64, 65, (16, 16), generator=g).float()
    d = torch.ops.liif_cuda_harness.mma_tile(a, b, c, precision, via_ldmatrix)
    assert torch.equal(d, a @ b + c)


@pytest.mark.parametrize("kernel", TILED)
@pytest.mark.parametrize("precision", REDUCED)
def test_mma_kernel_result_is_independent_of_thread_order(precision, kernel):
    """Threads run in order or in reverse between barriers: a missing barrier or a read of a
    fragment another lane has not produced yet changes the result."""
    feat, coords, cells, mlp = published_problem(2, 5, 6, 70, seed=7)
    out, path = run(feat, coords, cells, mlp, precision=precision, tensor_core_kernel=kernel)
    again, _ = run(feat, coords, cells, mlp, reverse_order=True, precision=precision,
                   tensor_core_kernel=kernel)
    assert path == tensor_core_path(precision, True, 4, 3, SHARED_SM90, kernel)
    assert path in (MMA, MMA16, WGMMA, WGMMA_WS, WGMMA_MC, WGMMA_PP)
    assert torch.equal(out, again)


@pytest.mark.parametrize("precision", REDUCED)
def test_mma_kernel_with_16_warps_equals_8_warps(precision):
    """The 16-warp form splits each warp's rows in two and changes no sum's order: the same
    bits."""
    feat, coords, cells, mlp = published_problem(2, 4, 7, 90, seed=5)
    eight, path8 = run(feat, coords, cells, mlp, precision=precision, tensor_core_kernel="mma")
    sixteen, path16 = run(feat, coords, cells, mlp, precision=precision,
                          tensor_core_kernel="mma16")
    assert (path8, path16) == (MMA, MMA16)
    assert torch.equal(eight, sixteen)


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("shared", [SHARED_SM80, SHARED_SM90])
def test_default_kernel_is_multicast_wgmma_else_16_warps(precision, shared):
    """"auto" (the default: LIIF_CUDA_TENSOR_CORE_KERNEL unset) runs the multicast wgmma kernel
    where it applies and fits, else the 16-warp mma.sync kernel (the fastest of each on an H200),
    and gives that kernel's bits."""
    feat, coords, cells, mlp = published_problem(1, 4, 5, 40, seed=11)
    out, path = run(feat, coords, cells, mlp, shared, precision=precision,
                    tensor_core_kernel="auto")
    if precision == "tf32" and shared == SHARED_SM80:
        assert path == TENSOR_CORE  # the mma.sync kernel's tf32 block does not fit an A100
        return
    expected_path = WGMMA_MC if precision != "tf32" and shared == SHARED_SM90 else MMA16
    assert path == expected_path == tensor_core_path(precision, True, 4, 3, shared, "auto")
    named, _ = run(feat, coords, cells, mlp, shared, precision=precision,
                   tensor_core_kernel="wgmma_mc" if expected_path == WGMMA_MC else "mma16")
    assert torch.equal(out, named)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_auto_runs_the_wgmma_kernel_where_no_cluster_fits(monkeypatch, precision):
    """Where no cluster of the multicast kernel fits the device at once (cudaOccupancyMaxActiveClusters
    says 0 on a partitioned or shared GPU), "auto" runs the wgmma kernel instead, with its bits
    (also with map staging and the phase clocks, which the first plan had set up); the multicast
    kernel asked for by name is an error that says what to ask for instead."""
    feat, coords, cells, mlp = published_problem(1, 4, 5, 40, seed=11)
    out, path = run(feat, coords, cells, mlp, precision=precision, tensor_core_kernel="auto",
                    clusters_fit=False)
    wgmma, _ = run(feat, coords, cells, mlp, precision=precision, tensor_core_kernel="wgmma")
    multicast, multicast_path = run(feat, coords, cells, mlp, precision=precision,
                                    tensor_core_kernel="auto")
    assert (path, multicast_path) == (WGMMA, WGMMA_MC)
    assert torch.equal(out, wgmma) and torch.equal(wgmma, multicast)
    for kernel in ("wgmma_mc", "wgmma_pp"):
        with pytest.raises(RuntimeError, match=f"LIIF_CUDA_TENSOR_CORE_KERNEL={kernel}: no cluster "
                                               "of the multicast wgmma kernel fits the device; "
                                               "set it to wgmma or unset it"):
            run(feat, coords, cells, mlp, precision=precision, tensor_core_kernel=kernel,
                clusters_fit=False)
    monkeypatch.setenv("LIIF_CUDA_STAGE_MAP", "1")
    monkeypatch.setenv("LIIF_CUDA_TIMING_PROBE", "phase-clocks")
    staged, staged_path = run(feat, coords, cells, mlp, precision=precision,
                              tensor_core_kernel="auto", clusters_fit=False)
    assert staged_path == WGMMA and torch.equal(staged, wgmma)


@pytest.mark.parametrize("kernel", TILED)
def test_timing_probe_without_map_loads(monkeypatch, kernel):
    """LIIF_CUDA_TIMING_PROBE=no-map-loads (benchmarks' probe rows) reads no map row: the result
    of an MLP whose first layer has zero feature columns (a zero map), bit for bit; unset, the
    kernel's own."""
    feat, coords, cells, mlp = published_problem(1, 5, 6, 50, seed=12)
    plain, path = run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel=kernel)
    no_features = copy.deepcopy(mlp)
    with torch.no_grad():
        no_features.layers[0].weight[:, :9 * feat.shape[1]] = 0
    zero_map, _ = run(feat, coords, cells, no_features, precision="bf16", tensor_core_kernel=kernel)
    monkeypatch.setenv("LIIF_CUDA_TIMING_PROBE", "no-map-loads")
    probe, probe_path = run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel=kernel)
    assert probe_path == path == tensor_core_path("bf16", True, 4, 3, SHARED_SM90, kernel)
    assert torch.equal(probe, zero_map) and not torch.equal(probe, plain)
    for bad in ("no-map", "no-map-loads,", "no-map-loads,,no-weight-loads"):
        monkeypatch.setenv("LIIF_CUDA_TIMING_PROBE", bad)
        with pytest.raises(RuntimeError, match="LIIF_CUDA_TIMING_PROBE must be"):
            run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel=kernel)


@pytest.mark.parametrize("probes", ["no-weight-loads", "no-map-loads,no-weight-loads"])
@pytest.mark.parametrize("kernel", TILED)
def test_timing_probe_without_weight_loads(monkeypatch, kernel, probes):
    """LIIF_CUDA_TIMING_PROBE=no-weight-loads copies no hidden-layer weight into the ring (the
    harness hands the probe a misaligned weight pointer, so any copy would be an error), and the
    products read what the harness fills shared memory with before each block (NaN bytes): every
    output NaN, where the kernel's own are finite; the same with both probes at once."""
    feat, coords, cells, mlp = published_problem(1, 5, 6, 50, seed=12)
    plain, path = run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel=kernel)
    monkeypatch.setenv("LIIF_CUDA_TIMING_PROBE", probes)
    probe, probe_path = run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel=kernel)
    assert probe_path == path == tensor_core_path("bf16", True, 4, 3, SHARED_SM90, kernel)
    assert torch.isfinite(plain).all() and torch.isnan(probe).all()


@pytest.mark.parametrize("kernel", TILED)
def test_phase_clocks_probe(monkeypatch, capfd, kernel):
    """LIIF_CUDA_TIMING_PROBE=phase-clocks changes no output bit and prints one line: each phase's
    mean cycles per tile (the harness's clock is in nanoseconds), adding up to the block's total;
    for the warp-specialised kernel the total only. 180 queries: 6 tiles of 32, on 6 blocks, or
    on the emulated device's 2 SMs for the warp-specialised kernel, or its 2 clusters of 2 blocks
    for the multicast kernel (either schedule), which records each block's last tile (4 of the
    6)."""
    feat, coords, cells, mlp = published_problem(2, 4, 7, 90, seed=13)
    plain, _ = run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel=kernel)
    assert "phase clocks" not in capfd.readouterr().err  # without the probe, no line
    monkeypatch.setenv("LIIF_CUDA_TIMING_PROBE", "phase-clocks")
    probed, _ = run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel=kernel)
    assert torch.equal(probed, plain)
    lines = [x for x in capfd.readouterr().err.splitlines() if x.startswith("liif_cuda phase clocks:")]
    assert len(lines) == 1, lines
    values = dict(item.split("=") for item in lines[0].split(": ", 1)[1].split())
    phases = ["geometry", "first_layer", "layers", "blend"]
    blocks = {"wgmma_ws": 2, "wgmma_mc": 4, "wgmma_pp": 4}.get(kernel, 6)
    assert values.pop("kernel") == kernel
    assert int(values.pop("tiles")) == (4 if kernel in MULTICAST else 6)
    assert int(values.pop("blocks")) == blocks
    total = float(values.pop("total"))
    assert total > 0
    if kernel == "wgmma_ws":
        assert values == {}
    else:
        assert sorted(values) == sorted(phases) and all(float(values[k]) > 0 for k in phases)
        assert sum(float(values[k]) for k in phases) == pytest.approx(total, abs=4)  # rounding


def grid_problem(batch, height, width, scale, seed=14):
    """A whole output grid at `scale` (as upscaling queries it): C = 64, the published MLP."""
    feat, _, _, mlp = published_problem(batch, height, width, 1, seed=seed)
    out_hw = (height * scale, width * scale)
    coords = ref.make_coord(out_hw).unsqueeze(0).expand(batch, -1, -1).contiguous()
    return feat, coords, ref.make_cell(coords, out_hw), mlp


def staged_rows_per_tile(capfd):
    line = [x for x in capfd.readouterr().err.splitlines() if x.startswith("liif_cuda phase")][-1]
    return float(dict(item.split("=") for item in line.split(": ", 1)[1].split())
                 .get("staged_rows", 0))


@pytest.mark.parametrize("kernel", ["mma", "mma16", "wgmma", "wgmma_mc"])
@pytest.mark.parametrize("problem,staged", [
    # A grid at x4, two images (tiles straddle them): every row's cell staged.
    (lambda: grid_problem(2, 3, 5, 4), "all"),
    # Random queries over 16 x 16 cells: about 100 distinct cells a tile, past the 56 slots.
    (lambda: published_problem(1, 16, 16, 64, seed=15), "some"),
])
def test_map_staging_gives_the_same_bits(monkeypatch, capfd, kernel, problem, staged):
    """LIIF_CUDA_STAGE_MAP=1: the tile's distinct map rows copied into shared memory once, layer 0
    gathered from there (from global memory past the slots): the same bits as without. The
    phase-clocks line counts the rows staged, so that a staging that never happens fails."""
    feat, coords, cells, mlp = problem()
    plain, path = run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel=kernel)
    monkeypatch.setenv("LIIF_CUDA_TIMING_PROBE", "phase-clocks")
    monkeypatch.setenv("LIIF_CUDA_STAGE_MAP", "1")
    capfd.readouterr()
    out, staged_path = run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel=kernel,
                           reverse_order=True)
    assert staged_path == path and torch.equal(out, plain)
    rows = staged_rows_per_tile(capfd)
    queries = coords.shape[0] * coords.shape[1]
    tiles = -(-queries // 32)
    if staged == "all":
        assert rows == pytest.approx(4 * queries / tiles, abs=0.05)
    else:
        assert 0 < rows < 100
    monkeypatch.setenv("LIIF_CUDA_STAGE_MAP", "0")
    run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel=kernel)
    assert staged_rows_per_tile(capfd) == 0
    monkeypatch.setenv("LIIF_CUDA_STAGE_MAP", "yes")
    with pytest.raises(RuntimeError, match="LIIF_CUDA_STAGE_MAP must be unset, empty, 0 or 1"):
        run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel=kernel)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("batch,height,width,queries", [(2, 4, 7, 90), (1, 9, 9, 300)])
def test_warp_specialised_wgmma_kernel_equals_wgmma_kernel(precision, batch, height, width,
                                                            queries):
    """The warp-specialised form moves layer 0, the geometry and the blend to another warpgroup,
    takes A from shared memory and loops each block over several tiles (the emulated device has
    2 SMs: here 3 and 10 tiles), but changes no sum's order: the same bits."""
    feat, coords, cells, mlp = published_problem(batch, height, width, queries, seed=9)
    plain, path = run(feat, coords, cells, mlp, precision=precision, tensor_core_kernel="wgmma")
    ws, path_ws = run(feat, coords, cells, mlp, reverse_order=True, precision=precision,
                      tensor_core_kernel="wgmma_ws")
    assert (path, path_ws) == (WGMMA, WGMMA_WS)
    assert torch.equal(plain, ws)


@pytest.mark.parametrize("local_ensemble", [True, False])
@pytest.mark.parametrize("cell_decode", [True, False])
def test_geometry_by_row_equals_geometry_by_query(local_ensemble, cell_decode):
    """The mma.sync and wgmma kernels find a tile's neighbours with one thread per (query,
    neighbour) row, their areas' sum by shuffles; the warp-specialised kernel with one thread per
    query (visit_neighbours): the same bits, on pixel borders, past the image, on NaN and infinite
    coordinates (NaN outputs), with a partial last tile and two images (bits compared, so that NaN
    counts)."""
    feat, coords, cells = random_inputs(2, 8, 5, 7, 75, seed=21, spread=1.3)
    g = torch.Generator().manual_seed(22)
    coords[:, :30] = border_coords(5, 7, 2, 30, g, torch.float32)
    coords[0, 31, 0] = float("nan")
    coords[1, 40, 1] = float("inf")
    coords[1, 41] = -float("inf")
    flags = dict(local_ensemble=local_ensemble, feat_unfold=True, cell_decode=cell_decode)
    mlp = make_mlp(ref.imnet_in_dim(8, True, cell_decode), [256] * 3, 3, torch.float32, seed=23)
    by_row, path = run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel="wgmma",
                       **flags)
    by_query, path_ws = run(feat, coords, cells, mlp, precision="bf16",
                            tensor_core_kernel="wgmma_ws", **flags)
    assert (path, path_ws) == (WGMMA, WGMMA_WS)
    assert torch.isnan(by_row[0, 31]).all() and torch.isnan(by_row[1, 40:42]).all()
    assert torch.equal(by_row.view(torch.int32), by_query.view(torch.int32))


@pytest.mark.parametrize("kernel", MULTICAST)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("batch,height,width,queries,tiles", [
    (2, 4, 7, 90, 6), (1, 9, 9, 150, 5), (1, 3, 3, 5, 1)])
def test_multicast_wgmma_kernel_equals_wgmma_kernel(monkeypatch, capfd, kernel, precision, batch,
                                                    height, width, queries, tiles):
    """The multicast form streams the same weights by bulk copies shared by a cluster of two
    blocks, with mbarriers instead of a barrier per chunk, but changes no sum's order: the same
    bits, in both thread orders (the harness runs a cluster's blocks together, each as far ahead
    of the other as the mbarriers let it). An odd number of tiles launches a block without one,
    which takes part in its cluster's stream, writes nothing and records no phase clocks.
    Persistent: the emulated device runs 2 clusters at once, so that with 5 or 6 tiles (3 pairs)
    one cluster loops over two pairs and the other takes one; each block records its last tile's
    clocks (so 4 blocks record 4 tiles here, and a block of the single tile's cluster none).
    The ping-pong schedule (wgmma_pp: the second warpgroup a few chunks behind the first in each
    layer, the ring refilled by it) changes no sum either."""
    feat, coords, cells, mlp = published_problem(batch, height, width, queries, seed=9)
    plain, path = run(feat, coords, cells, mlp, precision=precision, tensor_core_kernel="wgmma")
    monkeypatch.setenv("LIIF_CUDA_TIMING_PROBE", "phase-clocks")
    capfd.readouterr()
    for reverse_order in (False, True):
        multicast, path_mc = run(feat, coords, cells, mlp, reverse_order=reverse_order,
                                 precision=precision, tensor_core_kernel=kernel)
        assert (path, path_mc) == (WGMMA, WGMMA_PATHS[kernel])
        assert torch.equal(plain, multicast)
        line = [x for x in capfd.readouterr().err.splitlines() if x.startswith("liif_cuda phase")]
        values = dict(item.split("=") for item in line[-1].split(": ", 1)[1].split())
        assert values["blocks"] == values["tiles"] == str(min(tiles, 4))


@pytest.mark.parametrize("kernel", MULTICAST)
@pytest.mark.parametrize("depth", [2, 8])
def test_multicast_wgmma_kernel_equals_wgmma_kernel_at_other_depths(kernel, depth):
    """The multicast stream and the ping-pong schedule over one hidden-to-hidden layer (a tile's
    8 chunks: the ping-pong ring holds them all, the first fill is a whole tile) and over seven
    (56 chunks a tile), on 5 tiles (one cluster loops over two pairs), in both thread orders: the
    wgmma kernel's bits."""
    feat, coords, cells, _ = published_problem(1, 9, 9, 150, seed=16)
    mlp = make_mlp(580, [256] * depth, 3, torch.float32, seed=17)
    plain, path = run(feat, coords, cells, mlp, precision="bf16", tensor_core_kernel="wgmma")
    for reverse_order in (False, True):
        out, used = run(feat, coords, cells, mlp, reverse_order=reverse_order, precision="bf16",
                        tensor_core_kernel=kernel)
        assert (path, used) == (WGMMA, WGMMA_PATHS[kernel])
        assert torch.equal(out, plain)


# The wgmma kernel: warpgroup-wide, asynchronous, emulated on each lane's own registers.

def wgmma_operands(seed):
    g = torch.Generator().manual_seed(seed)
    # Small integers and halves: every product and sum is exact in float32, whatever the order.
    a = torch.randint(-8, 9, (64, 16), generator=g).float() / 2
    b = torch.randint(-8, 9, (16, 256), generator=g).float() / 4
    c = torch.randint(-64, 65, (64, 256), generator=g).float()
    return a, b, c


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_emulated_wgmma_is_a_matrix_product(precision):
    """Fragments by the documented per-lane layouts, B in shared memory in the canonical K-major
    layout the kernel uses: D = A B + C exactly, and only once the wait retires the product."""
    load()
    a, b, c = wgmma_operands(3)
    d = torch.ops.liif_cuda_harness.wgmma_tile(a, b, c, precision, "wait")
    assert torch.equal(d, a @ b + c)
    early = torch.ops.liif_cuda_harness.wgmma_tile(a, b, c, precision, "before_wait")
    assert torch.equal(early, c)


def test_emulated_wgmma_with_a_in_shared_memory_is_a_matrix_product():
    load()
    a, b, c = wgmma_operands(5)
    for precision in ("bf16", "fp16"):
        d = torch.ops.liif_cuda_harness.wgmma_tile(a, b, c, precision, "shared_a")
        assert torch.equal(d, a @ b + c)


def test_emulated_named_barriers_hand_over_and_refuse_misuse():
    """bar.arrive / bar.sync between a producer and a consumer warp: what is written before the
    arrival is seen after the wait, what is written after it is not (the arriving thread goes on
    last); a wait nobody completes, an arrival nobody waits for and differing counts are errors."""
    load()
    assert torch.equal(torch.ops.liif_cuda_harness.named_barrier("handoff"),
                       torch.arange(32, dtype=torch.float32))
    assert torch.isnan(torch.ops.liif_cuda_harness.named_barrier("late_write")).all()
    for mode, message in [("deadlock", "waits forever at named barrier 1"),
                          ("unmatched", "an arrival nobody waited for"),
                          ("count", "reached with 32 and 64 threads")]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.liif_cuda_harness.named_barrier(mode)


def test_emulated_bulk_copies_multicast_and_refuse_misuse():
    """A cluster of two blocks: each copies half of 32 floats into both blocks' buffers and
    announces the whole on its own mbarrier; after the wait both hold all 32, before it the bytes
    that were there (NaN). A copy nobody waits for, an mbarrier used uninitialised or overwritten,
    too many arrivals in a phase, an arrival on a block whose threads returned and a misaligned
    size are errors."""
    load()
    src = torch.arange(32, dtype=torch.float32)
    assert torch.equal(torch.ops.liif_cuda_harness.bulk_copy(src, "multicast"),
                       torch.stack([src, src]))
    assert torch.isnan(torch.ops.liif_cuda_harness.bulk_copy(src, "read_before_wait")).all()
    for mode, message in [("never_waited", "bulk copies that no thread waited for"),
                          ("uninitialised", "used before mbarrier.init"),
                          ("overwritten", "was overwritten by ordinary stores"),
                          ("too_many", "more arrivals on the mbarrier"),
                          ("exit_before_arrival", "after all its threads returned"),
                          ("unaligned", "a size that is a multiple of 16")]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.liif_cuda_harness.bulk_copy(src, mode)


@pytest.mark.parametrize("mode,message", [
    ("unfenced", "without fence.proxy.async"),
    ("a_written", "A registers written before the wgmma was waited for"),
])
def test_emulation_refuses_wgmma_misuse(mode, message):
    load()
    a, b, c = wgmma_operands(4)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.liif_cuda_harness.wgmma_tile(a, b, c, "bf16", mode)

