"""Training throughput: the step of `liif-cuda train` (liif_cuda.training.train_step: the LIIF model
of liif_cuda.models with the fused query and its fused backward, L1 loss, Adam) against the step of
the original model (python/liif_reference_models.py: reference query, torch autograd, the same loss
and optimizer), on the same batches of the published recipe made by liif_cuda's data pipeline
(48x48 LR patches at scales U(1, 4), 2304 queries each, batch 16, EDSR-baseline-LIIF, same initial
weights). Variants: the reference in float32 and under autocast bf16; liif_cuda in float32 and with
--precision bf16 (autocast, and the query's bf16 backward; on CUDA also fp16 with a GradScaler).
Interleaved, median of `--repeats` steps after a warm-up step each. Peak memory on the CPU: the rise
of the resident set over one step, each variant in a fresh process; on CUDA: the peak allocated
during one step above what was allocated before it.
Writes benchmarks/results/cpu_train_<date>.json with the machine (CPU flags included) and versions;
on a GPU, benchmarks/bench_gpu.py --train-data DIR runs the same comparison (gpu_check.sh does).

Run on an otherwise idle machine (about 3 minutes on 2 cores):

    python benchmarks/bench_train.py --data ../shared/data/BSD68
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

import liif_reference_models as ref_models  # noqa: E402

from liif_cuda.training.checkpointing import load_original_state_dict  # noqa: E402
from liif_cuda.training.datasets import make_dataset  # noqa: E402
from liif_cuda.training.trainer import build_model, normalise_batch, train_step  # noqa: E402
from results_file import (cpu_machine_info, peak_rise_bytes, result_header,  # noqa: E402
                          run_memory_probe, write_results)

VARIANTS = {"cpu": ("reference", "reference-bf16", "liif_cuda-fp32", "liif_cuda-bf16"),
            "cuda": ("reference", "reference-bf16", "liif_cuda-fp32", "liif_cuda-bf16",
                     "liif_cuda-fp16")}
# The published recipe (liif_cuda/training/configs/edsr-baseline-liif.yaml), spelled out so that no
# YAML parser is needed on a bare GPU machine.
TRAIN_SPEC = {"dataset": {"name": "image-folder", "args": {}},
              "wrapper": {"name": "sr-implicit-downsampled",
                          "args": {"inp_size": 48, "scale_max": 4, "augment": True,
                                   "sample_q": 2304}},
              "batch_size": 16}
MODEL_SPEC = {"name": "liif", "args": {
    "encoder_spec": {"name": "edsr-baseline", "args": {"no_upsampling": True}},
    "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": [256, 256, 256, 256]}}}}


def batches(data_dir, count, device, batch_size=16):
    spec = dict(TRAIN_SPEC, batch_size=batch_size,
                dataset={"name": "image-folder",
                         "args": {"root_path": data_dir, "repeat": 64, "cache": "in_memory"}})
    data = make_dataset(spec, seed=0)
    data.set_epoch(1)
    collate = torch.utils.data.default_collate
    return [normalise_batch(collate([data[i * batch_size + j] for j in range(batch_size)]), device)
            for i in range(count)]


def make_variant(name, device):
    """A step function; every variant starts from the same initial weights."""
    torch.manual_seed(0)
    reference = ref_models.LIIF(ref_models.EDSR()).to(device)
    if name.startswith("reference"):  # the same step (L1, Adam) on the original model
        optimizer = torch.optim.Adam(reference.parameters(), lr=1e-4)
        precision = "bf16" if name == "reference-bf16" else "fp32"
        return lambda batch: train_step(reference, optimizer, batch, precision)
    model = build_model(MODEL_SPEC).to(device)
    load_original_state_dict(model, reference.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    precision = name.split("-")[1]
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return lambda batch: train_step(model, optimizer, batch, precision, scaler)


def peak_memory(data_dir, name):
    """In a fresh process (CPU): the rise of the resident set over one step, after a warm-up."""
    batch, warm = batches(data_dir, 2, "cpu")
    step = make_variant(name, "cpu")
    return peak_rise_bytes(lambda: step(batch), warm_up=lambda: step(warm))


def cuda_peak_memory(step, batch):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(data_dir, device, repeats, memory=True):
    """{variant: median step time, iterations/s, ratio to the reference, peak memory}."""
    variants = VARIANTS[device]
    data = batches(data_dir, repeats + 1, device)
    steps = {name: make_variant(name, device) for name in variants}

    def timed(name, batch):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        steps[name](batch)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for name in variants:  # warm-up
        timed(name, data[0])
    times = {name: [] for name in variants}
    for batch in data[1:]:
        for name in variants:
            times[name].append(timed(name, batch))
    median = {k: statistics.median(v) for k, v in times.items()}
    peaks = {}
    if memory:
        for name in variants:
            if device == "cuda":
                peaks[name] = cuda_peak_memory(steps[name], data[0])
            else:
                peaks[name] = int(run_memory_probe(__file__, "--data", data_dir,
                                                   "--memory-probe", name))
    return {name: {"median_step_s": median[name], "iterations_per_s": 1 / median[name],
                   "speedup_vs_reference": median["reference"] / median[name],
                   "times_s": times[name], "peak_memory_bytes": peaks.get(name)}
            for name in variants}


def print_rows(rows):
    print(f"{'variant':>16} {'step s':>8} {'it/s':>7} {'vs ref':>7} {'peak MiB':>9}")
    for name, row in rows.items():
        mem = row["peak_memory_bytes"]
        print(f"{name:>16} {row['median_step_s']:>8.3f} {row['iterations_per_s']:>7.3f} "
              f"{row['speedup_vs_reference']:>6.2f}x "
              f"{f'{mem / 2**20:.0f}' if mem is not None else '-':>9}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data",
                                                       "BSD68"),
                        help="a folder of training images (at least 192x192)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed steps per variant, after one warm-up step (default: 5)")
    parser.add_argument("--skip-memory", action="store_true",
                        help="no peak-memory measurement (it runs each variant in a new process)")
    parser.add_argument("--out", default=None,
                        help="the results file (default: benchmarks/results/cpu_train_DATE.json)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(peak_memory(args.data, args.memory_probe))
        return
    rows = measure(args.data, "cpu", args.repeats, memory=not args.skip_memory)
    print_rows(rows)
    result = {
        **result_header("bench_train (CPU, EDSR-baseline-LIIF step, batch 16, 48x48, 2304 queries)",
                        __file__, sys.argv[1:]),
        "machine": cpu_machine_info(), "repeats": args.repeats, "data": args.data,
        "variants": rows,
    }
    write_results(result, "cpu_train", args.out)


if __name__ == "__main__":
    main()
