"""Fused liif_cuda.query against the reference query (python/liif_reference.py) on a CUDA GPU, float32.

Both run in this process on the same inputs: C = 64 features, the published MLP 580-256x4-3, a full
output grid; the reference exactly as LIIF evaluates (30000-query chunks). Each variant is warmed up,
then timed `--repeats` times with CUDA events (median reported), interleaved with the other. Peak
memory is the rise of torch.cuda.max_memory_allocated over the memory allocated before the call
(inputs and model excluded, output included). TF32 is off for the reference's products (PyTorch's
default for matmul); the fused op never uses it. Results go to benchmarks/results/ as JSON with the
device and versions.

    python benchmarks/bench_gpu.py                       # 480x270 -> 1920x1080 and 128x128 x4
    python benchmarks/bench_gpu.py --cases 128x128x4 --repeats 20
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import liif_reference as ref  # noqa: E402

import liif_cuda  # noqa: E402

CHANNELS = 64
HIDDEN = [256, 256, 256, 256]
# (LR width, LR height, scale): the 1080p frame and a square x4 case.
DEFAULT_CASES = "480x270x4,128x128x4"


def make_inputs(width, height, scale):
    g = torch.Generator().manual_seed(width * 1000 + height + scale)
    feat = torch.randn(1, CHANNELS, height, width, generator=g).cuda()
    torch.manual_seed(0)
    imnet = ref.MLP(ref.imnet_in_dim(CHANNELS), 3, HIDDEN).cuda()
    out_hw = (height * scale, width * scale)
    coord = ref.make_coord(out_hw, device="cuda").unsqueeze(0)
    cell = ref.make_cell(coord, out_hw)
    return feat, coord, cell, imnet


def run_variant(name, feat, coord, cell, imnet):
    with torch.no_grad():
        if name == "reference":
            return ref.batched_query_rgb(feat, coord, cell, imnet, bsize=30000)
        return liif_cuda.query(feat, coord, cell, imnet)


def timed(name, inputs):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run_variant(name, *inputs)
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3


def peak_memory(name, inputs):
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


def device_info():
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="WxHxSCALE, comma-separated")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per variant")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    if not liif_cuda.build_info()["cuda"]:
        raise SystemExit("liif_cuda was built without CUDA kernels")

    info = device_info()
    print(f"{info['device']} (sm_{info['compute_capability'].replace('.', '')}), torch "
          f"{info['torch']}, CUDA {info['cuda_runtime']}")
    header = (f"{'LR':>9} {'out':>11} {'queries':>9} {'ref ms':>8} {'fused ms':>9} {'ref q/s':>11} "
              f"{'fused q/s':>11} {'speed-up':>8} {'ref MiB':>8} {'fused MiB':>9} {'mem':>6} "
              f"{'rel err':>8} {'TFLOP/s':>7}")
    print(header)
    rows = []
    for case in args.cases.split(","):
        width, height, scale = (int(v) for v in case.lower().split("x"))
        inputs = make_inputs(width, height, scale)
        queries = inputs[1].shape[1]
        outs = {name: run_variant(name, *inputs) for name in ("reference", "fused")}  # warm-up
        rel_err = ((outs["fused"] - outs["reference"]).norm() / outs["reference"].norm()).item()
        del outs
        times = {"reference": [], "fused": []}
        for _ in range(args.repeats):
            for name in times:
                times[name].append(timed(name, inputs))
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {name: peak_memory(name, inputs) for name in times}
        flops = mlp_flops_per_query(width, height, scale) * queries
        row = {
            "lr_size_wh": [width, height], "scale": scale,
            "out_size_wh": [width * scale, height * scale], "queries": queries,
            "median_s": med, "times_s": times,
            "queries_per_s": {k: queries / v for k, v in med.items()},
            "speedup": med["reference"] / med["fused"],
            "peak_memory_bytes": mem, "memory_ratio": mem["fused"] / mem["reference"],
            "relative_error": rel_err,
            "fused_mlp_flops": flops, "fused_tflops_per_s": flops / med["fused"] / 1e12,
        }
        rows.append(row)
        print(f"{width:>4}x{height:<4} {width * scale:>5}x{height * scale:<5} {queries:>9} "
              f"{med['reference'] * 1e3:>8.1f} {med['fused'] * 1e3:>9.1f} "
              f"{row['queries_per_s']['reference']:>11.3e} {row['queries_per_s']['fused']:>11.3e} "
              f"{row['speedup']:>7.2f}x {mem['reference'] / 2**20:>8.0f} {mem['fused'] / 2**20:>9.0f} "
              f"{row['memory_ratio']:>6.3f} {rel_err:>8.1e} {row['fused_tflops_per_s']:>7.1f}",
              flush=True)
        del inputs
        torch.cuda.empty_cache()

    result = {
        "benchmark": "bench_gpu (CUDA, float32, C=64, MLP 580-256x4-3, reference chunk 30000)",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "repeats": args.repeats,
        "machine": info,
        "rows": rows,
    }
    out = args.out or os.path.join(
        ROOT, "benchmarks", "results",
        f"gpu_query_{info['device'].replace(' ', '_')}_{time.strftime('%Y%m%d')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
