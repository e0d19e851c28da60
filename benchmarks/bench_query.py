"""Fused liif_cuda.query against the reference query (python/liif_reference.py) on the CPU.

Variants: the reference, the fused query in float32 ("fused") and with precision="bf16"
("fused-bf16": the bf16 kernels where the CPU has AVX512-BF16, float32 otherwise; the machine record
says which). All run in this process on the same inputs (C = 64 features, the published MLP
580-256x4-3, a full output grid at each scale), interleaved, after a warm-up run each; the table
reports the median time of the repeats, queries per second and the speed ratio. Peak memory is
measured for each variant in isolation, in a fresh subprocess per (size, scale, variant): the rise
of the process's peak resident set (VmHWM) over its resident set just before the call, so it counts
everything the call allocates, the output included. Results go to benchmarks/results/ as JSON with
the machine and versions.

Run on an otherwise idle machine: a build or test run on another core distorts CPU timings.

    python benchmarks/bench_query.py                 # the full grid (about 15 minutes on 2 cores)
    python benchmarks/bench_query.py --sizes 64 --scales 4
    python benchmarks/bench_query.py --variants reference,fused   # float32 only
"""

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference, and results_file beside this script (also under python -P).
sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "benchmarks")]

import liif_reference as ref  # noqa: E402

import liif_cuda  # noqa: E402
from results_file import (cpu_machine_info, peak_rise_bytes, result_header,  # noqa: E402
                          run_memory_probe, write_results)

CHANNELS = 64
HIDDEN = [256, 256, 256, 256]


def make_inputs(size, scale, dtype=torch.float32):
    g = torch.Generator().manual_seed(size * 100 + scale)
    feat = torch.randn(1, CHANNELS, size, size, generator=g, dtype=dtype)
    torch.manual_seed(0)
    imnet = ref.MLP(ref.imnet_in_dim(CHANNELS), 3, HIDDEN).to(dtype)
    out_size = size * scale
    coord = ref.make_coord((out_size, out_size), dtype=dtype).unsqueeze(0)
    cell = ref.make_cell(coord, (out_size, out_size))
    return feat, coord, cell, imnet


VARIANTS = ("reference", "fused", "fused-bf16")


def run_variant(name, feat, coord, cell, imnet):
    with torch.no_grad():
        if name == "reference":
            return ref.batched_query_rgb(feat, coord, cell, imnet)
        precision = "bf16" if name == "fused-bf16" else "fp32"
        return liif_cuda.query(feat, coord, cell, imnet, precision=precision)


def measure_peak_memory(size, scale, variant):
    """Runs in a fresh process: peak resident memory added by one call, in bytes. The same call
    first, so that what a process pays once (library code paged in, thread pools, oneDNN's
    generated kernels: 8 to 30 MiB, depending on the torch build) is not counted; the subprocess
    runs with a fixed malloc mmap threshold, so that the first call's freed buffers go back to the
    system instead of serving the second call unseen."""
    feat, coord, cell, imnet = make_inputs(size, scale)
    return peak_rise_bytes(lambda: run_variant(variant, feat, coord, cell, imnet))


def peak_memory_in_subprocess(size, scale, variant):
    return int(run_memory_probe(__file__, "--memory-probe", f"{size},{scale},{variant}"))


def time_variants(size, scale, repeats, variants):
    feat, coord, cell, imnet = make_inputs(size, scale)
    times = {name: [] for name in variants}
    outs = {}
    for name in times:  # warm-up, and the outputs for the accuracy column
        outs[name] = run_variant(name, feat, coord, cell, imnet)
    for _ in range(repeats):
        for name in times:
            t0 = time.perf_counter()
            run_variant(name, feat, coord, cell, imnet)
            times[name].append(time.perf_counter() - t0)
    r = outs["reference"]
    rel_err = {k: ((v - r).norm() / r.norm()).item() for k, v in outs.items() if k != "reference"}
    return {k: statistics.median(v) for k, v in times.items()}, times, rel_err


def flops_per_query(size, scale):
    """MLP arithmetic of the fused op per query (multiply-add = 2): the hidden and last layers and
    the coordinate/cell columns for each of the 4 neighbours, plus this query's share of the
    precomputed first-layer map (one 576 -> 256 product per LR pixel)."""
    widths = HIDDEN + [3]
    per_neighbour = 2 * 4 * widths[0] + sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
    precompute = 2 * 9 * CHANNELS * widths[0] * size * size / (size * scale) ** 2
    return 4 * per_neighbour + precompute


def matmul_rate(repeats=5, dtype=torch.float32):
    """FLOP/s of a (4096 x 256) @ (256 x 256) product in `dtype` through ATen on all threads (MKL
    for float32, oneDNN for bfloat16): the arithmetic floor the fused op is measured against."""
    a, w = torch.randn(4096, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
    out = torch.empty(4096, 256, dtype=dtype)
    for _ in range(20):
        torch.mm(a, w, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(50):
            torch.mm(a, w, out=out)
        times.append((time.perf_counter() - t0) / 50)
    return 2 * 4096 * 256 * 256 / statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,64,128", help="LR sizes (square), comma-separated")
    parser.add_argument("--scales", default="2,4,8", help="upscaling factors, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {','.join(VARIANTS)} (reference required)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_probe:
        size, scale, variant = args.memory_probe.split(",")
        print(measure_peak_memory(int(size), int(scale), variant))
        return
    variants = args.variants.split(",")
    if "reference" not in variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants: reference plus any of {VARIANTS}, got {args.variants!r}")

    rates = {"fp32": matmul_rate(), "bf16": matmul_rate(dtype=torch.bfloat16)}
    bf16_kernels = liif_cuda.build_info()["cpu_bf16"]
    print(f"ATen matmul (4096x256 @ 256x256, {torch.get_num_threads()} threads): float32 "
          f"{rates['fp32'] / 1e9:.1f} GFLOP/s, bfloat16 {rates['bf16'] / 1e9:.1f} GFLOP/s; "
          f"bf16 kernels on this CPU: {bf16_kernels}")
    # fused-bf16 computes float32 on a CPU without them: its floor is float32's there.
    floor_rate = {"fused": rates["fp32"],
                  "fused-bf16": rates["bf16"] if bf16_kernels else rates["fp32"]}
    rows = []
    fused = [v for v in variants if v != "reference"]
    header = f"{'LR':>8} {'scale':>5} {'queries':>9} {'ref q/s':>10}"
    for v in fused:
        header += f" {v + ' q/s':>15} {'vs ref':>7} {'peak MiB':>9} {'rel err':>8} {'% of floor':>10}"
    print(header + f" {'ref peak MiB':>12}")
    for size in [int(s) for s in args.sizes.split(",")]:
        for scale in [int(s) for s in args.scales.split(",")]:
            queries = (size * scale) ** 2
            med, all_times, rel_err = time_variants(size, scale, args.repeats, variants)
            mem = {v: peak_memory_in_subprocess(size, scale, v) for v in variants}
            qps = {k: queries / v for k, v in med.items()}
            flops = flops_per_query(size, scale)
            row = {
                "lr_size": [size, size], "scale": scale, "queries": queries,
                "median_s": med, "times_s": all_times,
                "queries_per_s": qps,
                "speedup": {v: med["reference"] / med[v] for v in fused},
                "peak_memory_bytes": mem,
                "memory_ratio": {v: mem[v] / mem["reference"] for v in fused},
                "relative_error": rel_err,
                "flops_per_query": flops,
                # The floor of each variant: its arithmetic at the matmul rate of the dtype it
                # computes in.
                "floor_queries_per_s": {v: floor_rate[v] / flops for v in fused},
            }
            row["fraction_of_floor"] = {v: qps[v] / row["floor_queries_per_s"][v] for v in fused}
            if "fused" in fused and "fused-bf16" in fused:
                row["bf16_over_fp32"] = med["fused"] / med["fused-bf16"]
            rows.append(row)
            line = f"{size:>4}x{size:<3} {scale:>5} {queries:>9} {qps['reference']:>10.0f}"
            for v in fused:
                line += (f" {qps[v]:>15.0f} {row['speedup'][v]:>6.2f}x {mem[v] / 2**20:>9.1f} "
                         f"{rel_err[v]:>8.1e} {100 * row['fraction_of_floor'][v]:>9.0f}%")
            print(line + f" {mem['reference'] / 2**20:>12.1f}", flush=True)

    if any(f > 1.15 for row in rows for f in row["fraction_of_floor"].values()):
        # Well above 100%: the matmul rate (measured first, alone) was low, as on a busy machine.
        print("note: a variant ran faster than its floor: the matmul rate above was measured "
              "low; is another job running? (benchmark on an idle machine)")
    result = {
        **result_header("bench_query (CPU, float32 and bf16, C=64, MLP 580-256x4-3, reference "
                        "chunk 30000)", __file__, sys.argv[1:]),
        "repeats": args.repeats,
        "machine": cpu_machine_info(),
        "matmul_flops_per_s": rates["fp32"],
        "bf16_matmul_flops_per_s": rates["bf16"],
        "rows": rows,
    }
    write_results(result, "cpu_query", args.out)


if __name__ == "__main__":
    main()
