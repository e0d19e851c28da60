"""One kernel path of liif_cuda.query on a GPU, checked and timed in a short process of its own (so
that a crash in one path loses nothing else): the CUDA kernel that ran (from the profiler), the
relative error against the reference query (python/liif_reference.py) and, for the reduced
precisions, against the kernel's rounding model (python/liif_rounding_model.py), NaN count and the
median time. benchmarks/gpu_check.sh runs every path this way before anything else.

    python benchmarks/gpu_paths.py bf16                      # one path, one line of results
    python benchmarks/gpu_paths.py --list                    # the paths
    python benchmarks/gpu_paths.py fast-fp32 --device cpu --small   # dry run of the script itself

Paths: forward kernels (fast-fp32, generic-fp32, generic-fp64; tf32, bf16, fp16 on the mma.sync
kernel, -mma16 on its 16-warp form, -wmma on the WMMA kernel, -wgmma on the wgmma kernel,
-wgmma_ws on its warp-specialised form, -wgmma_mc on its form with multicast weights and -wgmma_pp
on that form's ping-pong schedule where the GPU runs them: H100 / H200 with an sm_90a build),
`backward`
(autograd against the reference's, float64 and float32; benchmarks/bench_gpu.py times forward +
backward at the training shape), `graph`
(capture and replay equal the eager result), `large` (a 64M-query call, checked on a sample).
Prints `PATH ok|FAIL ...` and appends a JSON line to --json. Exit status 1 when a check fails.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import liif_reference as ref  # noqa: E402
from liif_rounding_model import KernelRounding, map_columns  # noqa: E402

import liif_cuda  # noqa: E402

# Issue 4's bounds against the float32 reference, and the exact paths' (tests/conftest.py).
TOLERANCE = {"fp32": 1e-5, "fp64": 1e-12, "tf32": 5e-4, "fp16": 1e-3, "bf16": 4e-3}

# path: (dtype, hidden widths, precision, kernel expected in the profile: its name, then after "@"
# its last template argument where it has one); the reduced precisions on the mma.sync kernel (the
# default: 8 warps of 64 rows), on its 16-warp form (-mma16: 32 rows per warp), on the WMMA
# kernel and on the wgmma kernels (LIIF_CUDA_TENSOR_CORE_KERNEL; the multicast one's last template
# argument is its ping-pong schedule).
FORWARD = {
    "fast-fp32": (torch.float32, [256] * 4, "fp32", "liif_query_fast_kernel"),
    "generic-fp32": (torch.float32, [96, 80, 64], "fp32", "liif_query_generic_kernel"),
    "generic-fp64": (torch.float64, [256] * 4, "fp32", "liif_query_generic_kernel"),
    "tf32": (torch.float32, [256] * 4, "tf32", "liif_query_mma_kernel@64"),
    "bf16": (torch.float32, [256] * 4, "bf16", "liif_query_mma_kernel@64"),
    "fp16": (torch.float32, [256] * 4, "fp16", "liif_query_mma_kernel@64"),
    "tf32-mma16": (torch.float32, [256] * 4, "tf32", "liif_query_mma_kernel@32"),
    "bf16-mma16": (torch.float32, [256] * 4, "bf16", "liif_query_mma_kernel@32"),
    "fp16-mma16": (torch.float32, [256] * 4, "fp16", "liif_query_mma_kernel@32"),
    "tf32-wmma": (torch.float32, [256] * 4, "tf32", "liif_query_tensor_core_kernel"),
    "bf16-wmma": (torch.float32, [256] * 4, "bf16", "liif_query_tensor_core_kernel"),
    "fp16-wmma": (torch.float32, [256] * 4, "fp16", "liif_query_tensor_core_kernel"),
    "bf16-wgmma": (torch.float32, [256] * 4, "bf16", "liif_query_wgmma_kernel"),
    "fp16-wgmma": (torch.float32, [256] * 4, "fp16", "liif_query_wgmma_kernel"),
    "bf16-wgmma_ws": (torch.float32, [256] * 4, "bf16", "liif_query_wgmma_ws_kernel"),
    "fp16-wgmma_ws": (torch.float32, [256] * 4, "fp16", "liif_query_wgmma_ws_kernel"),
    "bf16-wgmma_mc": (torch.float32, [256] * 4, "bf16", "liif_query_wgmma_mc_kernel@false"),
    "fp16-wgmma_mc": (torch.float32, [256] * 4, "fp16", "liif_query_wgmma_mc_kernel@false"),
    "bf16-wgmma_pp": (torch.float32, [256] * 4, "bf16", "liif_query_wgmma_mc_kernel@true"),
    "fp16-wgmma_pp": (torch.float32, [256] * 4, "fp16", "liif_query_wgmma_mc_kernel@true"),
}
# The paths of the wgmma kernels.
WGMMA_SUFFIXES = ("-wgmma", "-wgmma_ws", "-wgmma_mc", "-wgmma_pp")
SUFFIXES = ("-wmma", "-mma16") + WGMMA_SUFFIXES  # the tensor-core kernel a path's name selects
PATHS = list(FORWARD) + ["backward", "graph", "large"]
# The paths the GPU check runs (--list): all but the WMMA kernel's, which runs 1 to 3 measured and
# the mma.sync kernel replaced, and the 8-warp mma.sync kernel's (tf32, bf16, fp16), which shares
# its template with the 16-warp form that replaced it as the default (run 6). The CUDA tests still
# run both, and their paths still run by name: so that the check fits a lease, with the profiles of
# the kernels under study.
CHECKED = [p for p in PATHS if not p.endswith("-wmma") and p not in ("tf32", "bf16", "fp16")]


def runs_wgmma(device):
    """Whether liif_cuda plans the wgmma kernel on `device`: a compute capability 9.0 GPU and a
    build with sm_90a code (liif_cuda.build_info()["cuda_wgmma"]); elsewhere the mma.sync kernel
    runs the -wgmma, -wgmma_ws, -wgmma_mc and -wgmma_pp paths."""
    return (device.type == "cuda" and liif_cuda.build_info()["cuda_wgmma"]
            and torch.cuda.get_device_capability(device) == (9, 0))


def kernel_ran(expected, names):
    """Whether `expected` ("name" or "name@last template argument", an int or a bool) is among the
    profiled kernel names; the argument is checked in a demangled name ("..., 32>", "..., true>")
    or a mangled one ("Li32E", "Lb1E"), and not where the profiler shows neither."""
    name, _, argument = expected.partition("@")
    mangled = {"true": "Lb1E", "false": "Lb0E"}.get(argument, f"Li{argument}E")

    def argument_matches(k):
        if not argument:
            return True
        if "<" in k:
            return f"{argument}>" in k.replace(" ", "")
        return mangled in k if k.startswith("_Z") else True

    return any(name in k and argument_matches(k) for k in names)


def relative_error(out, expected):
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


# The tensor-core kernels' tiles: 128 (query, neighbour) rows, query-major, so 32 queries of the
# flattened batch per tile; in the wgmma kernels warp w of a tile owns rows 16 w .. +15 (queries
# 4 w .. +3), the warpgroup w / 4. The warp-specialised kernel's persistent blocks (one per SM, at
# most one per tile) take tiles b, b + blocks, ..., the k-th of them in tile buffer k % 2.
TILE_QUERIES = 32


def where_wrong(out, expected, tolerance, persistent_blocks=None):
    """Where a failed forward path's wrong queries are, in the tensor-core kernels' terms, so that a
    layout or synchronisation mistake shows from one run: a query is wrong where its error exceeds
    10x the path's tolerance (relative to the reference's RMS) or it has a NaN. Counts by warp of
    the tile (queries q % 32 // 4), by output channel and, for the persistent kernel of
    `persistent_blocks` blocks, by tile buffer; the first wrong query and tile, and whether wrong
    outputs are zeros."""
    out, expected = out.double().flatten(0, -2), expected.double().flatten(0, -2)
    scale = expected.pow(2).mean().sqrt().clamp_min(1e-30)
    error = (out - expected).abs() / scale
    wrong_element = error.isnan() | (error > 10 * tolerance)
    wrong = wrong_element.any(1)
    index = wrong.nonzero().flatten()
    if index.numel() == 0:
        return {"wrong_queries": 0}
    warp = index % TILE_QUERIES // 4
    found = {
        "wrong_queries": int(index.numel()), "of_queries": int(out.shape[0]),
        "first_wrong_query": int(index[0]), "first_wrong_tile": int(index[0]) // TILE_QUERIES,
        "wrong_by_warp": ",".join(str(int((warp == w).sum())) for w in range(TILE_QUERIES // 4)),
        "wrong_by_channel": ",".join(str(int(c)) for c in wrong_element.sum(0)),
        "wrong_are_zero": bool((out[index] == 0).all()),
    }
    if persistent_blocks:
        buffer = index // TILE_QUERIES // persistent_blocks % 2
        found["wrong_by_tile_buffer"] = ",".join(str(int((buffer == b).sum())) for b in range(2))
    return found


class Runner:
    def __init__(self, device, small, repeats=5, profile=True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.small = small
        self.repeats = repeats
        self.profile = profile and self.cuda

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, repeats=None):
        repeats = self.repeats if repeats is None else min(repeats, self.repeats)
        if repeats == 0:
            return None
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def kernels(self, fn):
        """Names of the liif_cuda kernels `fn` launches (CUDA profiler), or None where unknown."""
        if not self.profile:
            return None
        try:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            names = {e.name for e in prof.events() if "liif" in e.name}
            return sorted(names) or None
        except Exception as e:  # the profiler is a diagnostic here, never the failure
            print(f"  (profiler unavailable: {e})")
            return None

    def problem(self, dtype, hidden, batch=2, lr=(45, 61), out=(131, 177), seed=0):
        """feat (B, 64, H, W), a whole output grid of a non-integer scale for every image, cells,
        and the MLP (seeded)."""
        if self.small:
            lr, out = (7, 9), (19, 23)
        g = torch.Generator().manual_seed(seed)
        feat = torch.randn(batch, 64, *lr, generator=g, dtype=dtype)
        coords = ref.make_coord(out, dtype=dtype).unsqueeze(0).repeat(batch, 1, 1)
        cells = ref.make_cell(coords, out)
        torch.manual_seed(seed)
        mlp = ref.MLP(ref.imnet_in_dim(64), 3, hidden).to(dtype)
        d = self.device
        return feat.to(d), coords.to(d), cells.to(d), mlp.to(d)


def forward_path(r, name):
    dtype, hidden, precision, kernel = FORWARD[name]
    os.environ["LIIF_CUDA_TENSOR_CORE_KERNEL"] = name.rpartition("-")[2] if name.endswith(
        SUFFIXES) else "mma"
    feat, coords, cells, mlp = r.problem(dtype, hidden)
    if name.endswith(WGMMA_SUFFIXES) and not runs_wgmma(feat.device):
        kernel = "liif_query_mma_kernel@64"

    def run():
        with torch.no_grad():
            return liif_cuda.query(feat, coords, cells, mlp, precision=precision)

    out = run()
    with torch.no_grad():
        expected = ref.query_rgb(feat, coords, cells, mlp)
    res = {"queries": coords.shape[0] * coords.shape[1], "nan": int(out.isnan().sum()),
           "error_vs_reference": relative_error(out, expected)}
    key = "fp64" if dtype == torch.float64 else precision
    res["tolerance"] = TOLERANCE[key]
    ok = res["nan"] == 0 and res["error_vs_reference"] <= res["tolerance"]
    if precision != "fp32":
        # The kernel's rounding model, with the first-layer map on TF32 tensor cores as on a GPU.
        model_mlp = KernelRounding(mlp, precision, map_columns(mlp.layers[0].in_features))
        with torch.no_grad():
            model = ref.query_rgb(feat, coords, cells, model_mlp)
        res["model_error_vs_reference"] = relative_error(model, expected)
        res["error_vs_model"] = relative_error(out, model)
        res["bound"] = 2 * res["model_error_vs_reference"] + TOLERANCE["fp32"]
        ok = ok and res["error_vs_reference"] <= res["bound"]
        if r.cuda:  # the tensor-core kernel really ran (not the exact fallback)
            ok = ok and res["error_vs_reference"] > TOLERANCE["fp32"]
    if not ok:
        blocks = None
        if name.endswith("-wgmma_ws") and runs_wgmma(feat.device):  # launch_blocks in C++
            tiles = -(-res["queries"] // TILE_QUERIES)
            blocks = min(tiles, torch.cuda.get_device_properties(feat.device).multi_processor_count)
        res.update(where_wrong(out, expected, res["tolerance"], blocks))
    res["kernels"] = r.kernels(run)
    if res["kernels"] is not None:
        ok = ok and kernel_ran(kernel, res["kernels"])
    res["ms"] = r.median_ms(run)
    return ok, res


def gradients(fn, feat, coords, cells, mlp, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in (feat, coords, cells)]
    mlp.zero_grad()
    out = fn(*inputs, mlp)
    out.backward(grad_out)
    return [t.grad for t in inputs] + [p.grad.clone() for p in mlp.parameters()]


def backward_path(r, _name):
    res, ok = {}, True
    for dtype, bound in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        feat, coords, cells, mlp = r.problem(dtype, [256, 256], lr=(9, 11), out=(23, 29), seed=1)
        coords = coords * 1.05  # a few queries outside the map too
        grad_out = torch.randn(coords.shape[0], coords.shape[1], 3, dtype=dtype, device=r.device)
        ours = gradients(liif_cuda.query, feat, coords, cells, mlp, grad_out)
        theirs = gradients(ref.query_rgb, feat, coords, cells, mlp, grad_out)
        errors = [relative_error(a, b) for a, b in zip(ours, theirs)]
        res[f"max_gradient_error_{str(dtype)[6:]}"] = max(errors)
        res[f"nan_{str(dtype)[6:]}"] = int(sum(g.isnan().sum() for g in ours))
        ok = ok and max(errors) <= bound and res[f"nan_{str(dtype)[6:]}"] == 0
    return ok, res


def graph_path(r, _name):
    res, ok = {}, True
    for precision in ("fp32", "bf16"):
        feat, coords, cells, mlp = r.problem(torch.float32, [256] * 4, batch=1, seed=3)
        with torch.no_grad():
            eager = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
            if not r.cuda:
                continue
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                liif_cuda.query(feat, coords, cells, mlp, precision=precision)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
            graph.replay()
            torch.cuda.synchronize()
            same = torch.equal(static, eager)
            coords.copy_(coords.flip(1))  # new inputs in the captured memory
            graph.replay()
            torch.cuda.synchronize()
            same = same and torch.equal(
                static, liif_cuda.query(feat, coords, cells, mlp, precision=precision))
            res[f"replay_equals_eager_{precision}"] = same
            res[f"replay_ms_{precision}"] = r.median_ms(graph.replay)
            res[f"eager_ms_{precision}"] = r.median_ms(
                lambda: liif_cuda.query(feat, coords, cells, mlp, precision=precision))
            ok = ok and same
    return ok, res


def large_path(r, _name):
    """2^26 queries in one call (int64 indexing of queries and outputs), checked on a sample."""
    n = 1 << (16 if r.small else 26)
    g = torch.Generator().manual_seed(4)
    feat = torch.randn(1, 64, 64, 64, generator=g).to(r.device)
    coords = (torch.rand(1, n, 2, generator=g) * 2.2 - 1.1).to(r.device)
    cells = torch.full((1, n, 2), 2 / 1024).to(r.device)
    torch.manual_seed(4)
    mlp = ref.MLP(580, 3, [256] * 4).to(r.device)
    res, ok = {"queries": n}, True
    sample = torch.randint(0, n, (1 << 14,), generator=g).to(r.device)
    sample[-1] = n - 1
    with torch.no_grad():
        expected = ref.query_rgb(feat, coords[:, sample], cells[:, sample], mlp)
        for precision in ("fp32", "bf16"):
            r.sync()
            t0 = time.perf_counter()
            out = liif_cuda.query(feat, coords, cells, mlp, precision=precision)
            r.sync()
            res[f"ms_{precision}"] = (time.perf_counter() - t0) * 1e3
            res[f"nan_{precision}"] = int(out.isnan().sum())
            err = relative_error(out[:, sample], expected)
            res[f"sample_error_{precision}"] = err
            ok = ok and res[f"nan_{precision}"] == 0 and err <= TOLERANCE[precision]
            del out
    return ok, res


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help=f"any of {', '.join(PATHS)}")
    parser.add_argument("--list", action="store_true",
                        help="print the paths the GPU check runs and exit")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of this script (no CUDA kernel is checked)")
    parser.add_argument("--small", action="store_true", help="small problems (a quick look)")
    parser.add_argument("--json", default=None, help="append one JSON line per path to this file")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (0: no timing)")
    parser.add_argument("--no-profile", action="store_true",
                        help="do not ask the profiler which kernel ran (under ncu or "
                             "compute-sanitizer, which use the same interface)")
    args = parser.parse_args()
    if args.list:
        print(" ".join(CHECKED))
        return 0
    unknown = [p for p in args.paths if p not in PATHS]
    if unknown or not args.paths:
        parser.error(f"paths must be among {', '.join(PATHS)}; got {args.paths}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    r = Runner(args.device, args.small or args.device == "cpu", args.repeats, not args.no_profile)
    status = 0
    for name in args.paths:
        t0 = time.perf_counter()
        check = forward_path if name in FORWARD else globals()[f"{name}_path"]
        ok, res = check(r, name)
        res = {"path": name, "ok": ok, "device": args.device, "small": r.small,
               "seconds": round(time.perf_counter() - t0, 2), **res}
        print(f"{name} {'ok' if ok else 'FAIL'} " + " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in res.items() if k not in ("path", "ok")), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")
        status |= not ok
    return status


if __name__ == "__main__":
    sys.exit(main())
