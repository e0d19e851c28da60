"""Where a training step's time goes: the step of the published recipe (batch 16, 48x48, 2304 queries,
EDSR-baseline-LIIF; benchmarks/bench_train.py's variants) split into phases (forward + loss, backward,
optimizer; CUDA events, median of `--repeats` steps), and the kernels that take the most device time
(torch.profiler over the same steps). Reference model and liif_cuda side by side.

Variants: `reference`, `liif_cuda-PRECISION` (liif-cuda train's step), and two diagnostics of a
reduced precision's step that liif-cuda train does not take: `liif_cuda-PRECISION-query` (the
encoder outside autocast, in float32, the query alone under it) and
`liif_cuda-PRECISION-channels_last` (the whole step under autocast, the encoder and its input in
channels_last memory format). On an H200 the bf16 step was slower than float32's (GPU run 7);
they say whether the encoder's convolutions under autocast are the cause.

    python benchmarks/profile_train_step.py --data ../shared/data/Set5 --device cuda
    python benchmarks/profile_train_step.py --data ../shared/data/Set5 --device cuda \
        --variants liif_cuda-fp32,liif_cuda-bf16,liif_cuda-bf16-query,liif_cuda-bf16-channels_last
    python benchmarks/profile_train_step.py --data ../shared/data/Set5 --device cpu --repeats 1
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# bench_train and results_file beside this script (also under python -P).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402
from results_file import result_header, write_results  # noqa: E402
from liif_cuda.training.trainer import PRECISIONS, autocast  # noqa: E402


def forward_and_loss(model, batch, precision, layout):
    """train_step's forward and loss; with layout "query", the encoder outside autocast; with
    "channels_last", the input in that memory format (model_and_optimizer puts the encoder's weights
    in it)."""
    device_type = batch["inp"].device.type
    inp = batch["inp"]
    if layout == "query":
        model.gen_feat(inp)
        with autocast(device_type, precision):
            pred = model.query_rgb(batch["coord"], batch["cell"])
        return F.l1_loss(pred.float(), batch["gt"])
    if layout == "channels_last":
        inp = inp.contiguous(memory_format=torch.channels_last)
    with autocast(device_type, precision):
        pred = model(inp, batch["coord"], batch["cell"])
        return F.l1_loss(pred.float(), batch["gt"])


def phase_step(model, optimizer, batch, precision, clock, layout=None):
    """One step as train_step does it, with a mark after each phase; returns the phase seconds."""
    marks = [clock()]
    loss = forward_and_loss(model, batch, precision, layout)
    marks.append(clock())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    marks.append(clock())
    optimizer.step()
    marks.append(clock())
    return marks


def make_clock(device):
    if device != "cuda":
        return time.perf_counter, lambda marks: [b - a for a, b in zip(marks, marks[1:])]

    def clock():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(marks):
        marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    return clock, seconds


LAYOUTS = ("query", "channels_last")


def parse_variant(name):
    """(precision, layout or None) of a variant's name; SystemExit naming it if it is none."""
    if name == "reference":
        return "fp32", None
    parts = name.split("-")
    if (len(parts) not in (2, 3) or parts[0] != "liif_cuda" or parts[1] not in PRECISIONS
            or (len(parts) == 3 and parts[2] not in LAYOUTS)):
        raise SystemExit(f"--variants: unknown variant {name!r} (reference, liif_cuda-PRECISION "
                         f"or liif_cuda-PRECISION-{'|'.join(LAYOUTS)}; PRECISION one of "
                         f"{', '.join(PRECISIONS)})")
    return parts[1], parts[2] if len(parts) == 3 else None


def model_and_optimizer(name, device):
    """bench_train's variant, taken apart: (model, optimizer, precision, layout or None)."""
    precision, layout = parse_variant(name)
    torch.manual_seed(0)
    reference = bench_train.ref_models.LIIF(bench_train.ref_models.EDSR()).to(device)
    if name == "reference":
        return reference, torch.optim.Adam(reference.parameters(), lr=1e-4), precision, layout
    model = bench_train.build_model(bench_train.MODEL_SPEC).to(device)
    bench_train.load_original_state_dict(model, reference.state_dict())
    if layout == "channels_last":
        model.encoder.to(memory_format=torch.channels_last)
    return model, torch.optim.Adam(model.parameters(), lr=1e-4), precision, layout


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a folder of images (at least 192x192)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="reference,liif_cuda-fp32,liif_cuda-bf16")
    parser.add_argument("--kernels", type=int, default=18, help="rows of the kernel table")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU")
    variants = args.variants.split(",")
    for name in variants:
        parse_variant(name)  # before any work
    data = bench_train.batches(args.data, args.repeats + 1, args.device)
    clock, seconds = make_clock(args.device)
    result = {**result_header("profile_train_step", __file__, sys.argv[1:]), "variants": {}}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        result["device"] = torch.cuda.get_device_name(0)
    for name in variants:
        model, optimizer, precision, layout = model_and_optimizer(name, args.device)
        phase_step(model, optimizer, data[0], precision, clock, layout)  # warm-up
        phases = [seconds(phase_step(model, optimizer, b, precision, clock, layout))
                  for b in data[1:]]
        median = [statistics.median(p[i] for p in phases) for i in range(3)]
        print(f"\n{name}: forward+loss {median[0] * 1e3:.2f} ms, backward {median[1] * 1e3:.2f} ms, "
              f"optimizer {median[2] * 1e3:.2f} ms, step {sum(median) * 1e3:.2f} ms", flush=True)
        with torch.profiler.profile(activities=activities) as prof:
            for b in data[1:]:
                phase_step(model, optimizer, b, precision, clock, layout)
            if args.device == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=args.kernels, max_name_column_width=70)
        print(table, flush=True)
        result["variants"][name] = {"forward_s": median[0], "backward_s": median[1],
                                    "optimizer_s": median[2], "table": table}
    write_results(result, f"profile_train_step_{args.device}", args.out)


if __name__ == "__main__":
    main()
