"""Mutation tests of the host execution harness: the mma.sync and wgmma kernels with one
fragment-layout, ordering, hand-over, reduction or shared-memory-layout mistake, of the kind that
compiles and runs on a GPU, must fail the harness check that CI runs
(tests/test_tensor_core_harness.py). Each mutant is a copy of csrc/ with one edit, built into its
own harness in a subprocess (the harness registers a fixed operator namespace), one per core at
a time."""

import concurrent.futures
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MMA = os.path.join("cuda", "liif_query_mma_kernel.cuh")
WGMMA = os.path.join("cuda", "liif_query_wgmma_kernel.cuh")
WGMMA_WS = os.path.join("cuda", "liif_query_wgmma_ws_kernel.cuh")
WGMMA_MC = os.path.join("cuda", "liif_query_wgmma_mc_kernel.cuh")
PREPARE = os.path.join("cuda", "liif_query_prepare.h")
GEOMETRY = os.path.join("cuda", "liif_query_kernel.cuh")
KERNEL_OF_FILE = {MMA: "mma", WGMMA: "wgmma", WGMMA_WS: "wgmma_ws", WGMMA_MC: "wgmma_mc"}

# name: (the kernel's file, original text in it, the mutant's text[, the kernel checked, for a
# file that is not a kernel's])
MUTATIONS = {
    "mma.sync A fragments: k halves taken as row halves": (MMA,
        "const int row = row0 + 16 * i + lane % 8 + 8 * (j % 2);\n"
        "      ldmatrix_x4(a[i], act + row * kPitch + 16 * (unit0 + 2 * step + j / 2));",
        "const int row = row0 + 16 * i + lane % 8 + 8 * (j / 2);\n"
        "      ldmatrix_x4(a[i], act + row * kPitch + 16 * (unit0 + 2 * step + j % 2));"),
    "mma.sync B fragments: the two n8 tiles' matrices interleaved": (MMA,
        "const int n = col0 + 16 * pair + lane % 8 + 8 * (j / 2);\n"
        "      ldmatrix_x4(b, w + n * kMmaChunkPitch + 16 * (2 * step + j % 2));",
        "const int n = col0 + 16 * pair + lane % 8 + 8 * (j % 2);\n"
        "      ldmatrix_x4(b, w + n * kMmaChunkPitch + 16 * (2 * step + j / 2));"),
    "mma.sync accumulators: rows g and g + 8 exchanged when stored": (MMA,
        "const int row = row0 + 16 * i + g + 8 * h;\n        OperandPair<S> pair;",
        "const int row = row0 + 16 * i + g + 8 * (1 - h);\n        OperandPair<S> pair;"),
    "mma.sync last layer: the row sum misses two lanes": (MMA,
        "v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);",
        "v += 0.f * __shfl_xor_sync(0xFFFFFFFFu, v, 2);"),
    "wgmma descriptor: leading and stride byte offsets exchanged": (WGMMA,
        "wgmma_descriptor(slot + step * kWgmmaStepBytes, kWgmmaLbo, kWgmmaSbo)",
        "wgmma_descriptor(slot + step * kWgmmaStepBytes, kWgmmaSbo, kWgmmaLbo)"),
    "wgmma weights: a k-step's two core matrices exchanged when copied": (WGMMA,
        "(unit % 2) * static_cast<int>(kWgmmaLbo)",
        "(1 - unit % 2) * static_cast<int>(kWgmmaLbo)"),
    "wgmma A operand from the accumulators: row halves taken as k halves": (WGMMA,
        "const int jn = 2 * step + r / 2, h = r % 2;",
        "const int jn = 2 * step + r % 2, h = r / 2;"),
    "wgmma accumulators read before the last group is retired": (WGMMA,
        "    wgmma_wait<0>();\n#pragma unroll",
        "#pragma unroll"),
    "wgmma reads cp.async data without the proxy fence": (WGMMA,
        "      fence_proxy_async();\n",
        ""),
    "wgmma_ws A descriptor: leading and stride byte offsets exchanged": (WGMMA_WS,
        "wgmma_descriptor(a, kWgmmaLbo, kWgmmaSbo)",
        "wgmma_descriptor(a, kWgmmaSbo, kWgmmaLbo)"),
    "wgmma_ws next operands: row halves exchanged when written": (WGMMA_WS,
        "(jn % 2) * kWgmmaLbo +\n                                         h * kWgmmaSbo)",
        "(jn % 2) * kWgmmaLbo +\n                                         (1 - h) * kWgmmaSbo)"),
    "wgmma_ws layer 0: core matrices written transposed": (WGMMA_WS,
        "(row % 8) * 16 + (k % 8) * 2;",
        "(row % 8) * 2 + (k % 8) * 16;"),
    "wgmma_ws consumers take a tile before the producer hands it over": (WGMMA_WS,
        "    named_barrier_sync(kWsFullBarrier + b, kWgmmaWsThreads);\n",
        ""),
    "wgmma_ws producer hands a tile over before writing its layer 0": (WGMMA_WS,
        "    ws_first_layer<P>(p, s, ws_tile(smem, b), tid);\n"
        "    fence_proxy_async();  // the tensor cores read these operands next\n"
        "    named_barrier_arrive(kWsFullBarrier + b, kWgmmaWsThreads);\n",
        "    named_barrier_arrive(kWsFullBarrier + b, kWgmmaWsThreads);\n"
        "    ws_first_layer<P>(p, s, ws_tile(smem, b), tid);\n"
        "    fence_proxy_async();  // the tensor cores read these operands next\n"),
    # Past the plan by less than the allocation's rounding: caught by the guard zone only.
    "wgmma_ws second tile's geometry 32 bytes past the planned shared memory": (WGMMA_WS,
        "return carve_shared<float, unsigned char>(smem + b * geometry_bytes(l), l);",
        "return carve_shared<float, unsigned char>(smem + b * (geometry_bytes(l) + 32), l);"),
    "wgmma_ws producer blends a tile before the consumers are done": (WGMMA_WS,
        "    named_barrier_sync(kWsDoneBarrier + b, kWgmmaWsThreads);\n",
        "    named_barrier_arrive(kWsDoneBarrier + b, kWgmmaWsThreads);\n"),
    "map staging: slots not offset by the earlier warps' new cells": (MMA,
        "    for (int w = 0; w < warp; ++w) slot += st.new_cells[w];\n", ""),
    "wgmma_mc: a block copies its part into its own ring only": (WGMMA_MC,
        "full + fetch_slot, kWholeCluster);", "full + fetch_slot, 1u << rank);"),
    "wgmma_mc: a slot refilled before the cluster released it": (WGMMA_MC,
        "      mbarrier_wait(empty + fetch_slot, fetch_parity);\n", ""),
    "wgmma_mc: a warp releases a slot in its own block only": (WGMMA_MC,
        "mbarrier_arrive(empty + release_slot, block);",
        "mbarrier_arrive(empty + release_slot, rank);"),
    "wgmma_mc: mbarriers used before the cluster saw them initialised": (WGMMA_MC,
        "  cluster_sync();\n  // The first chunks", "  // The first chunks"),
    "wgmma_mc: a block exits while its peer may still arrive on its mbarriers": (WGMMA_MC,
        "for (int c = stream - kStages; c < stream; ++c)",
        "for (int c = stream; c < stream; ++c)"),
    "wgmma_mc: the next tile's geometry written before the blend has read the tile's": (WGMMA_MC,
        "    // The blend has read the predictions and the geometry before the next tile overwrites "
        "them.\n    __syncthreads();\n", ""),
    "wgmma_mc: refills stop at a tile's last chunk, not the stream's": (WGMMA_MC,
        "while (next <= last && next < stream)", "while (next <= last && next < chunks)"),
    # The leading warpgroup's thread 0 would wait for a release by the trailing warpgroup, which
    # waits for the leading one to issue the layer's first chunks: a deadlock.
    "wgmma_pp: the ring refilled by the leading warpgroup": (WGMMA_MC,
        "kRefiller = kPingPong ? 128 : 0;", "kRefiller = kPingPong ? 0 : 0;", "wgmma_pp"),
    "wgmma_pp: the trailing warpgroup's refills skip the cluster's release": (WGMMA_MC,
        "      mbarrier_wait(empty + fetch_slot, fetch_parity);\n", "", "wgmma_pp"),
    "geometry by row: a row blends with its neighbour's area, not the opposite one's": (GEOMETRY,
        "opposite = a3;  // neighbour 3 - k = k ^ 3", "opposite = a2;", "wgmma_mc"),
    "wgmma_mc weights: a chunk image's core matrices along k exchanged": (PREPARE,
        ".permute({0, 3, 1, 4, 2, 5})", ".permute({0, 4, 1, 3, 2, 5})", "wgmma_mc"),
}
# Mutants of map staging, checked with it on (LIIF_CUDA_STAGE_MAP=1), as "unmutated mma staged".
STAGED = {"map staging: slots not offset by the earlier warps' new cells"}

CHECK = textwrap.dedent("""
    import os, sys, torch, torch.utils.cpp_extension
    root, csrc, build = sys.argv[1:4]
    sys.path[:0] = [os.path.join(root, "tests"), os.path.join(root, "python")]
    torch.utils.cpp_extension.load(
        name="liif_cuda_host_harness", is_python_module=False, build_directory=build,
        sources=[os.path.join(root, "tests", "harness", "liif_query_harness.cpp")],
        extra_include_paths=[csrc],
        extra_cflags=["-O1", "-ffp-contract=off", "-fno-strict-aliasing", "-Wno-unknown-pragmas"])
    print("built", flush=True)
    import liif_cuda
    from helpers import make_mlp, published_problem, rounding_model_bound
    from conftest import relative_error
    kernel = sys.argv[4]
    precisions, expected_path = {"mma": (("bf16", "tf32"), 4), "wgmma": (("bf16", "fp16"), 6),
                                 "wgmma_ws": (("bf16", "fp16"), 7),
                                 "wgmma_mc": (("bf16", "fp16"), 8),
                                 "wgmma_pp": (("bf16", "fp16"), 9)}[kernel]
    # 3 tiles of 128 rows; for the multicast kernel 5, so that on the harness's 2 clusters one
    # loops over two pairs of tiles, the second with a block past the last tile.
    queries = 150 if kernel in ("wgmma_mc", "wgmma_pp") else 70
    feat, coords, cells, published = published_problem(1, 3, 4, queries, seed=11)
    flags = dict(local_ensemble=True, feat_unfold=True, cell_decode=True)
    # Three and two hidden-to-hidden layers: an even number of epilogues could undo a mistake.
    for mlp in (published, make_mlp(580, [256] * 3, 3, torch.float32, seed=12)):
        w, b = liif_cuda.mlp_parameters(mlp)
        # Both thread orders (a missing hand-over may show in one only).
        for precision, reverse in [(p, r) for p in precisions for r in (False, True)]:
            out, path = torch.ops.liif_cuda_harness.query(
                feat, coords, cells, w, b, True, True, True, precision, 232448, reverse, kernel)
            assert path == expected_path, path
            exact, bound = rounding_model_bound(feat, coords, cells, mlp, precision, flags)
            error = relative_error(out, exact)
            print(len(w), precision, reverse, error, bound)
            if not error <= bound:
                sys.exit(3)
    """)


def run_check(csrc, build, cwd, kernel, staged=False):
    # Run outside the checkout: the installed liif_cuda, not the source folder, is imported.
    env = {**os.environ, "LIIF_CUDA_STAGE_MAP": "1" if staged else "0"}
    return subprocess.run([sys.executable, "-c", CHECK, ROOT, csrc, build, kernel], cwd=cwd,
                          capture_output=True, text=True, timeout=900, env=env)


def test_mutations_are_distinct_edits():
    for name, (kernel_file, original, *_) in MUTATIONS.items():
        text = open(os.path.join(ROOT, "csrc", kernel_file)).read()
        assert text.count(original) == 1, name


CASES = list(MUTATIONS) + ["unmutated mma", "unmutated wgmma", "unmutated wgmma_ws",
                           "unmutated wgmma_mc", "unmutated wgmma_pp", "unmutated mma staged"]


def case_sources(name, folder):
    """A copy of csrc/ in `folder` with the case's edit (none for an unmutated case), and the
    kernel its check runs."""
    csrc = folder / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
    if name.startswith("unmutated"):
        return csrc, name.split()[1]
    kernel_file, original, mutant, *checked = MUTATIONS[name]
    path = csrc / kernel_file
    path.write_text(path.read_text().replace(original, mutant))
    return csrc, checked[0] if checked else KERNEL_OF_FILE[kernel_file]


@pytest.fixture(scope="module")
def checked_cases(request, tmp_path_factory):
    """The processes of the cases this session selected, one per core at a time: each mutant
    compiles the whole harness on one core (most of its half minute on CI's machine). The
    unmutated cases share one build: the first one selected builds it, the others come last
    (the build's lock makes a case that comes early wait for it)."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_harness_catches_the_mutant"]
    unmutated = [name for name in selected if name.startswith("unmutated")]
    order = unmutated[:1] + [name for name in selected if name not in unmutated] + unmutated[1:]
    root = tmp_path_factory.mktemp("mutants")
    shared = None  # the unmutated cases' copy of csrc/
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        runs = {}
        for i, name in enumerate(order):
            if name in unmutated:
                if shared is None:
                    shared, _ = case_sources(name, root / "unmutated")
                csrc, kernel = shared, name.split()[1]
            else:
                csrc, kernel = case_sources(name, root / f"case{i}")
            runs[name] = pool.submit(run_check, str(csrc), str(csrc.parent / "build"),
                                     str(csrc.parent), kernel,
                                     staged=name in STAGED or name.endswith("staged"))
        return {name: run.result() for name, run in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_harness_catches_the_mutant(name, checked_cases):
    """The unmutated copy passes the same check (so that a failure means the mutation)."""
    unmutated = name.startswith("unmutated")
    proc = checked_cases[name]
    log = proc.stdout + proc.stderr[-3000:]
    assert "built" in proc.stdout, log  # the mutant compiles: what fails next is the check
    if unmutated:
        assert proc.returncode == 0, log
    else:
        # An error beyond the rounding model's bound (exit 3), or the harness refusing what the
        # kernel did (an exception naming the host harness).
        assert proc.returncode == 3 or (proc.returncode == 1 and "host harness" in proc.stderr), log
