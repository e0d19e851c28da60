"""Fused liif_cuda.query, every precision, against the reference query (python/liif_reference.py) on a
CUDA GPU.

All variants run in this process on the same inputs: C = 64 features, the published MLP
580-256x4-3, a full output grid; the reference exactly as LIIF evaluates (30000-query chunks), in
float32 and under torch.autocast float16; the fused op with precision fp32, tf32, bf16 and fp16. Each
variant is warmed up, then timed `--repeats` times with CUDA events (median reported), interleaved
with the others. Peak memory is the rise of torch.cuda.max_memory_allocated over the memory allocated
before the call (inputs and model excluded, output included). Relative errors are against the float32
reference. TF32 is off for the reference's float32 products (PyTorch's default for matmul). TFLOP/s
count the MLP arithmetic the fused op needs (mlp_flops_per_query, with the first-layer algebra), for
every variant, and are compared with the card's dense peak for the variant's arithmetic (a table of
published peaks below; none for unknown cards). Results go to benchmarks/results/ as JSON with the
device and versions.

    python benchmarks/bench_gpu.py                       # 480x270 -> 1920x1080 and 128x128 x4
    python benchmarks/bench_gpu.py --cases 128x128x4 --repeats 20 --variants reference,fused-bf16
    python benchmarks/bench_gpu.py --device cpu --cases 16x12x2 --skip-training --out /tmp/x.json

The JSON is rewritten after every case, so an interrupted run keeps the cases it finished. A variant
that raises is reported with its error and left out of the remaining cases (the reference must run).
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference, and results_file beside this script (also under python -P).
sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "benchmarks")]

import liif_reference as ref  # noqa: E402

import liif_cuda  # noqa: E402
from results_file import new_results_path, write_results  # noqa: E402

CHANNELS = 64
HIDDEN = [256, 256, 256, 256]
# (LR width, LR height, scale): the issue's 1080p frame and a square x4 case.
DEFAULT_CASES = "480x270x4,128x128x4"
# variant: (runner, precision, tensor-core kernel), the precision naming the arithmetic whose peak
# applies; the kernel is LIIF_CUDA_TENSOR_CORE_KERNEL's choice, named for each variant (mma.sync
# with 8 warps, its 16-warp form, WMMA, or the wgmma kernel, its warp-specialised form, its form
# with multicast weights or that form's ping-pong schedule on H100 / H200 with an sm_90a build; the
# default, "auto", is the multicast form there, else mma16).
VARIANTS = {
    "reference": ("reference", "fp32", None),
    "reference-autocast-fp16": ("reference", "fp16", None),
    "fused-fp32": ("fused", "fp32", None),
    "fused-tf32": ("fused", "tf32", "mma"),
    "fused-bf16": ("fused", "bf16", "mma"),
    "fused-fp16": ("fused", "fp16", "mma"),
    "fused-tf32-mma16": ("fused", "tf32", "mma16"),
    "fused-bf16-mma16": ("fused", "bf16", "mma16"),
    "fused-fp16-mma16": ("fused", "fp16", "mma16"),
    "fused-tf32-wmma": ("fused", "tf32", "wmma"),
    "fused-bf16-wmma": ("fused", "bf16", "wmma"),
    "fused-fp16-wmma": ("fused", "fp16", "wmma"),
    "fused-bf16-wgmma": ("fused", "bf16", "wgmma"),
    "fused-fp16-wgmma": ("fused", "fp16", "wgmma"),
    "fused-bf16-wgmma_ws": ("fused", "bf16", "wgmma_ws"),
    "fused-fp16-wgmma_ws": ("fused", "fp16", "wgmma_ws"),
    "fused-bf16-wgmma_mc": ("fused", "bf16", "wgmma_mc"),
    "fused-fp16-wgmma_mc": ("fused", "fp16", "wgmma_mc"),
    "fused-bf16-wgmma_pp": ("fused", "bf16", "wgmma_pp"),
    "fused-fp16-wgmma_pp": ("fused", "fp16", "wgmma_pp"),
}
# Map staging (LIIF_CUDA_STAGE_MAP=1, an experiment: a tile's distinct first-layer map rows copied
# into shared memory once): the same bits as the kernel's own row, which the line after the table
# checks.
STAGED = {f"fused-bf16-{kernel}-staged": f"fused-bf16-{kernel}"
          for kernel in ("mma16", "wgmma", "wgmma_mc")}
VARIANTS.update({name: ("fused", "bf16", base.split("-")[2]) for name, base in STAGED.items()})
# Timing probes, wrong outputs: a tensor-core kernel without one or both of its data streams
# (LIIF_CUDA_TIMING_PROBE: no first-layer map loads, no hidden-layer weight copies). Their times
# against the kernel's own row say what the layer-0 gather and the weight stream cost
# (docs/gpu.md, "what to try next"). Never counted against the targets.
# Variant name: LIIF_CUDA_TIMING_PROBE's value.
PROBES = {f"probe-bf16-{kernel}-{name}": value
          for kernel in ("mma16", "wgmma", "wgmma_ws", "wgmma_mc", "wgmma_pp")
          for name, value in (("no-map-loads", "no-map-loads"),
                              ("no-weight-loads", "no-weight-loads"),
                              ("no-loads", "no-map-loads,no-weight-loads"))}
VARIANTS.update({name: ("probe", "bf16", name.split("-")[2]) for name in PROBES})
# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, by a substring of the device name.
DENSE_PEAK_TFLOPS = [
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0, "fp16": 835.0}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),   # SXM5 (80GB HBM3)
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
]


def with_staged(variants):
    """The variants and the map-staging ones of each kernel whose bf16 variant is among them."""
    return variants + [name for name, base in STAGED.items()
                       if name not in variants and base in variants]


def with_probes(variants):
    """The variants and the timing probes of each probed kernel whose bf16 variant is among them
    (a kernel left out, say one that hung, is not probed either)."""
    return variants + [name for name in PROBES if name not in variants
                       and f"fused-bf16-{VARIANTS[name][2]}" in variants]


def dense_peak(device_name):
    for key, peaks in DENSE_PEAK_TFLOPS:
        if key in device_name:
            return peaks
    return None


def make_inputs(width, height, scale, device):
    g = torch.Generator().manual_seed(width * 1000 + height + scale)
    feat = torch.randn(1, CHANNELS, height, width, generator=g).to(device)
    torch.manual_seed(0)
    imnet = ref.MLP(ref.imnet_in_dim(CHANNELS), 3, HIDDEN).to(device)
    out_hw = (height * scale, width * scale)
    coord = ref.make_coord(out_hw, device=device).unsqueeze(0)
    cell = ref.make_cell(coord, out_hw)
    return feat, coord, cell, imnet


def run_variant(name, feat, coord, cell, imnet, extra_probe=None):
    """The variant's output; `extra_probe` (a LIIF_CUDA_TIMING_PROBE name) is added to its own."""
    runner, precision, kernel = VARIANTS[name]
    with torch.no_grad():
        if runner == "reference":
            with torch.autocast(feat.device.type, dtype=torch.float16,
                                enabled=precision == "fp16" and feat.is_cuda):
                return ref.batched_query_rgb(feat, coord, cell, imnet, bsize=30000)
        if kernel is not None:
            os.environ["LIIF_CUDA_TENSOR_CORE_KERNEL"] = kernel  # read by the op at every call
        probes = [p for p in (PROBES.get(name), extra_probe) if p]
        settings = {}  # read by the op at every call; the environment restored after it
        if probes:
            settings["LIIF_CUDA_TIMING_PROBE"] = ",".join(probes)
        if name in STAGED:
            settings["LIIF_CUDA_STAGE_MAP"] = "1"
        with mock.patch.dict(os.environ, settings):
            return liif_cuda.query(feat, coord, cell, imnet, precision=precision)


def phase_clocks(name, inputs):
    """Where the variant's kernel spends its cycles: the line the phase-clocks timing probe prints
    (csrc/cuda/liif_phase_clocks.h) from C++ on the process's stderr, caught there, as a dict
    (kernel, blocks, tiles, cycles per tile of each phase and in all); None where none is printed
    (a kernel without clocks, or the CPU)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            run_variant(name, *inputs, extra_probe="phase-clocks")
            if inputs[0].is_cuda:
                torch.cuda.synchronize()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode(errors="replace")
    prefix = "liif_cuda phase clocks: "
    lines = [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]
    sys.stderr.write("".join(line + "\n" for line in text.splitlines()
                             if not line.startswith(prefix)))  # anything else, passed on
    if not lines:
        return None
    values = dict(item.split("=", 1) for item in lines[-1].split())
    return {k: v if k == "kernel" else float(v) for k, v in values.items()}


def timed(name, inputs):
    if not inputs[0].is_cuda:
        t0 = time.perf_counter()
        run_variant(name, *inputs)
        return time.perf_counter() - t0
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run_variant(name, *inputs)
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3


def peak_memory(name, inputs):
    if not inputs[0].is_cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run_variant(name, *inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def mlp_flops_per_query(width, height, scale):
    """Arithmetic the fused op needs per query (multiply-add = 2): for each of the 4 neighbours the
    coordinate and cell columns and the other layers, plus the query's share of the first-layer map
    (one 576 -> 256 product per LR cell). The reference needs the full 580 -> 256 per neighbour."""
    widths = HIDDEN + [3]
    per_neighbour = 2 * 4 * widths[0] + sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
    precompute = 2 * 9 * CHANNELS * widths[0] / scale ** 2
    return 4 * per_neighbour + precompute


def device_info(device):
    if device == "cpu":
        return {"device": "cpu (dry run)", "torch": torch.__version__,
                "python": platform.python_version(), "platform": platform.platform(),
                "liif_cuda": liif_cuda.__version__, "build": liif_cuda.build_info()}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "liif_cuda": liif_cuda.__version__,
        "build": liif_cuda.build_info(),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def measure_case(case, variants, repeats, device, peaks, failed, with_phase_clocks=False):
    """One case's row; variants that raise are recorded in `failed` (name -> error) and skipped.
    With `with_phase_clocks`, the row's "phase_clocks": each tensor-core variant's (phase_clocks),
    from one more call after the timed ones."""
    width, height, scale = (int(v) for v in case.lower().split("x"))
    inputs = make_inputs(width, height, scale, device)
    queries = inputs[1].shape[1]
    flops = mlp_flops_per_query(width, height, scale) * queries
    outs = {}
    for name in variants:  # warm-up, and the outputs for the errors
        if name in failed:
            continue
        try:
            outs[name] = run_variant(name, *inputs).float()
        except Exception as e:  # noqa: BLE001  (reported, the others go on)
            if name == "reference":
                raise
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"{name} failed: {failed[name]}", flush=True)
    names = list(outs)
    # Map staging changes where layer 0's operands are read from, not their values.
    same_bits = {k: torch.equal(outs[k], outs[STAGED[k]]) for k in names
                 if k in STAGED and STAGED[k] in outs}
    reference = outs["reference"]
    rel_err = {k: ((v - reference).norm() / reference.norm()).item() for k, v in outs.items()}
    nan = {k: int(v.isnan().sum()) for k, v in outs.items()}
    del outs, reference
    times = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:  # interleaved, so that drifting clocks touch every variant alike
            times[name].append(timed(name, inputs))
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {name: peak_memory(name, inputs) for name in names}
    tflops = {k: flops / v / 1e12 for k, v in med.items()}
    row = {
        "lr_size_wh": [width, height], "scale": scale,
        "out_size_wh": [width * scale, height * scale], "queries": queries,
        "median_s": med, "times_s": times,
        "queries_per_s": {k: queries / v for k, v in med.items()},
        "speedup_vs_reference": {k: med["reference"] / v for k, v in med.items()},
        "speedup_vs_reference_autocast_fp16": None if "reference-autocast-fp16" not in med else
            {k: med["reference-autocast-fp16"] / v for k, v in med.items()},
        "peak_memory_bytes": mem,
        "memory_ratio": None if mem["reference"] is None else
            {k: v / mem["reference"] for k, v in mem.items()},
        "relative_error": rel_err, "nan_count": nan, "same_bits_as_unstaged": same_bits,
        "mlp_flops": flops, "tflops_per_s": tflops,
        "fraction_of_dense_peak": None if peaks is None else
            {k: tflops[k] / peaks[VARIANTS[k][1]] for k in names},
    }
    print(f"\nLR {width}x{height} -> {width * scale}x{height * scale}, {queries} queries, "
          f"{flops / 1e12:.2f} TFLOP needed")
    name_width = max(len(k) for k in names)
    print(f"{'variant':<{name_width}} {'ms':>8} {'q/s':>10} {'vs ref':>7} {'vs ref16':>8} {'MiB':>7} "
          f"{'mem':>6} {'rel err':>8} {'TFLOP/s':>8} {'% peak':>6}")
    frac = row["fraction_of_dense_peak"]
    vs16 = row["speedup_vs_reference_autocast_fp16"]
    ratio = row["memory_ratio"]
    for k in names:
        cells = [f"{k:<{name_width}}", f"{med[k] * 1e3:>8.2f}", f"{queries / med[k]:>10.3e}",
                 f"{row['speedup_vs_reference'][k]:>6.2f}x",
                 f"{'' if vs16 is None else f'{vs16[k]:.2f}x':>8}",
                 f"{'' if ratio is None else f'{mem[k] / 2**20:.0f}':>7}",
                 f"{'' if ratio is None else f'{ratio[k]:.3f}':>6}", f"{rel_err[k]:>8.1e}",
                 f"{tflops[k]:>8.1f}", f"{'' if frac is None else f'{100 * frac[k]:.1f}':>6}"]
        print(" ".join(cells), flush=True)
    if same_bits:
        print("map staging, the same bits as the kernel's own row: " +
              ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same_bits.items()), flush=True)
    if with_phase_clocks:
        row["phase_clocks"] = {k: phase_clocks(k, inputs) for k in names
                               if VARIANTS[k][2] in ("mma", "mma16", "wgmma", "wgmma_ws",
                                                     "wgmma_mc", "wgmma_pp")}
        print_phase_clocks(row["phase_clocks"], name_width)
    del inputs
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def print_phase_clocks(clocks, name_width):
    phases = ["geometry", "first_layer", "layers", "blend", "total", "staged_rows"]
    print("\nphase clocks, cycles per tile of 128 rows (LIIF_CUDA_TIMING_PROBE=phase-clocks)")
    print(f"{'variant':<{name_width}} " + " ".join(f"{p:>11}" for p in phases))
    for k, values in clocks.items():
        cells = ["" if values is None or p not in values else f"{values[p]:.0f}" for p in phases]
        print(f"{k:<{name_width}} " + " ".join(f"{c:>11}" for c in cells), flush=True)


def measure_training(device, repeats):
    """Forward + backward of the query at the published training shape (batch 16, 48x48 maps, 2304
    queries each, loss = mean |out|), float32: the reference's autograd against the fused operator
    (its backward on this device) and the fused forward with the former recompute backward, median
    seconds and peak memory of each."""
    g = torch.Generator().manual_seed(5)
    feat = torch.randn(16, CHANNELS, 48, 48, generator=g).to(device)
    coords = (torch.rand(16, 2304, 2, generator=g) * 2 - 1).to(device)
    cells = torch.full((16, 2304, 2), 2 / 96).to(device)
    torch.manual_seed(0)
    mlp = ref.MLP(ref.imnet_in_dim(CHANNELS), 3, HIDDEN).to(device)
    from bench_backward import recompute_query  # the fused forward with the former backward
    queries = {"reference": ref.query_rgb, "fused": liif_cuda.query,
               "fused-recompute-backward": recompute_query}

    def step(name):
        leaf = feat.detach().requires_grad_()
        mlp.zero_grad()
        queries[name](leaf, coords, cells, mlp).abs().mean().backward()

    def seconds(name):
        if device != "cuda":
            t0 = time.perf_counter()
            step(name)
            return time.perf_counter() - t0
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(name)
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3

    for name in queries:
        step(name)  # warm-up
    times = {name: [] for name in queries}
    for _ in range(repeats):
        for name in queries:
            times[name].append(seconds(name))
    row = {"median_s": {k: statistics.median(v) for k, v in times.items()}}
    row["speedup_vs_reference"] = row["median_s"]["reference"] / row["median_s"]["fused"]
    row["speedup_vs_recompute_backward"] = (row["median_s"]["fused-recompute-backward"]
                                            / row["median_s"]["fused"])
    if device == "cuda":
        peaks = {}
        for name in queries:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(name)
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - base
        row["peak_memory_bytes"] = peaks
    print(f"\ntraining shape, forward + backward: reference {row['median_s']['reference'] * 1e3:.1f} "
          f"ms, fused {row['median_s']['fused'] * 1e3:.1f} ms ({row['speedup_vs_reference']:.2f}x), "
          f"fused with the recompute backward "
          f"{row['median_s']['fused-recompute-backward'] * 1e3:.1f} ms", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="WxHxSCALE, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, among {', '.join(VARIANTS)} (reference always runs)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per variant")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of this script on tiny cases")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--probes", action="store_true",
                        help="also the timing probes (probe-* rows) of each bf16 variant among "
                             "--variants whose kernel has them")
    parser.add_argument("--staged", action="store_true",
                        help="also the map-staging variant (*-staged) of each bf16 variant among "
                             "--variants whose kernel stages")
    parser.add_argument("--phase-clocks", action="store_true",
                        help="also where each tensor-core variant's kernel spends its cycles "
                             "(LIIF_CUDA_TIMING_PROBE=phase-clocks, one more call each)")
    parser.add_argument("--skip-training", action="store_true",
                        help="leave out the forward + backward at the training shape")
    parser.add_argument("--train-data", default=None,
                        help="a folder of images: also time a whole training step of the recipe, "
                             "liif_cuda against the reference model (benchmarks/bench_train.py)")
    args = parser.parse_args()
    variants = ["reference"] + [v for v in args.variants.split(",") if v and v != "reference"]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose among {', '.join(VARIANTS)}")
    if args.staged:
        variants = with_staged(variants)
    if args.probes:
        variants = with_probes(variants)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (or --device cpu for a dry run)")
    if args.device == "cuda" and not liif_cuda.build_info()["cuda"]:
        raise SystemExit("liif_cuda was built without CUDA kernels")

    info = device_info(args.device)
    peaks = dense_peak(info["device"])
    info["dense_peak_tflops"] = peaks
    print(f"{info['device']}, torch {info['torch']}; dense peak TFLOP/s: {peaks}", flush=True)
    result = {
        "benchmark": "bench_gpu (CUDA, C=64, MLP 580-256x4-3, reference chunk 30000; fused fp32, "
                     "tf32, bf16, fp16 on the mma.sync and WMMA kernels; reference float32 and "
                     "autocast fp16)",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "repeats": args.repeats,
        "machine": info,
        "rows": [],
        "failed_variants": {},
    }
    # One file for the whole run, rewritten after each part.
    stem = f"gpu_query_{info['device'].replace(' ', '_')}"
    out = args.out or new_results_path(stem)
    for case in args.cases.split(","):
        result["rows"].append(measure_case(case, variants, args.repeats, args.device, peaks,
                                           result["failed_variants"], args.phase_clocks))
        write_results(result, stem, out)
    if not args.skip_training:
        result["training_forward_backward"] = measure_training(args.device, args.repeats)
        write_results(result, stem, out)
    if args.train_data:
        import bench_train
        result["training_step"] = bench_train.measure(args.train_data, args.device,
                                                      min(args.repeats, 5))
        bench_train.print_rows(result["training_step"])
        write_results(result, stem, out)
    return 1 if result["failed_variants"] else 0


if __name__ == "__main__":
    sys.exit(main())
