"""Training on the CPU: forward + backward of the query, and a whole training step of the EDSR-baseline
LIIF model, fused against the reference.

Query, at the published training recipe's shape (batch 16, 48x48 feature maps with 64 channels,
2304 queries per patch, MLP 580-256x4-3, float32, loss = mean |out|): the reference's autograd
(python/liif_reference.py, unchunked, as the original training runs it), the fused operator with its
fused backward, and the fused forward with the recompute backward in torch operations that preceded
it (liif_cuda._backward.recompute_backward); in bf16, the fused operator with precision and
backward_precision "bf16" against the reference under torch.autocast bf16, with each one's gradient
error against the float32 gradients. Same inputs, same process, interleaved, median of
`--repeats` after a warm-up. Peak memory: the rise of the resident set during one forward + backward,
each variant in a fresh process.

Training step (encoder forward, query, L1 loss against a target, backward, Adam step), the LIIF model
of liif_cuda.models against the original model (python/liif_reference_models.py) with the same
weights, batch 16, 48x48 inputs, 2304 queries each; per-phase times (encoder forward, query forward,
backward, optimizer step) and the query's backward measured alone. Results go to
benchmarks/results/cpu_backward_<date>.json with the machine (CPU model and flags) and versions.

Run on an otherwise idle machine:

    python benchmarks/bench_backward.py                 # about 2 minutes on 2 cores
    python benchmarks/bench_backward.py --repeats 5 --skip-memory
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
import liif_reference_models as ref_models  # noqa: E402

import liif_cuda  # noqa: E402
from liif_cuda._backward import recompute_backward  # noqa: E402
from liif_cuda.models import LIIF, EDSRBaseline  # noqa: E402
from results_file import (cpu_machine_info, peak_rise_bytes, result_header,  # noqa: E402
                          run_memory_probe, write_results)

BATCH, CHANNELS, SIZE, QUERIES = 16, 64, 48, 2304
HIDDEN = [256, 256, 256, 256]


class RecomputeBackward(torch.autograd.Function):
    """The fused forward with the previous backward (torch operations, recomputing in chunks)."""

    @staticmethod
    def forward(ctx, feat, coords, cells, *params):
        n = len(params) // 2
        ctx.save_for_backward(feat, coords, cells, *params)
        ctx.n = n
        return liif_cuda.query(feat, coords, cells, list(zip(params[:n], params[n:])))

    @staticmethod
    def backward(ctx, grad_out):
        feat, coords, cells, *params = ctx.saved_tensors
        n = ctx.n
        needs = [bool(x) for x in ctx.needs_input_grad]
        grads = recompute_backward(grad_out.contiguous(), feat, coords, cells, params[:n],
                                   params[n:], True, True, True, needs)
        return tuple(g if need else None for g, need in zip(grads, needs))


def recompute_query(feat, coords, cells, mlp):
    w, b = liif_cuda.mlp_parameters(mlp)
    return RecomputeBackward.apply(feat, coords, cells, *w, *b)


def fused_bf16(feat, coords, cells, mlp):
    return liif_cuda.query(feat, coords, cells, mlp, precision="bf16", backward_precision="bf16")


def reference_autocast_bf16(feat, coords, cells, mlp):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return ref.query_rgb(feat, coords, cells, mlp).float()


QUERIES_BY_NAME = {"reference": ref.query_rgb, "fused": liif_cuda.query,
                   "fused-recompute-backward": recompute_query,
                   "reference-autocast-bf16": reference_autocast_bf16, "fused-bf16": fused_bf16}


def gradient_errors(feat, coords, cells, mlp):
    """Relative error of each bf16 variant's gradients (feat, every weight and bias) against the
    float32 reference's, for loss = mean |out|: {variant: {"feat": e, "weight0": e, ...}}."""
    def grads(name):
        leaf = feat.detach().requires_grad_()
        mlp.zero_grad()
        QUERIES_BY_NAME[name](leaf, coords, cells, mlp).abs().mean().backward()
        linears = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
        out = {"feat": leaf.grad}
        for i, m in enumerate(linears):
            out[f"weight{i}"] = m.weight.grad.clone()
            out[f"bias{i}"] = m.bias.grad.clone()
        return out
    exact = grads("reference")
    return {name: {k: ((v.float() - exact[k]).norm() / exact[k].norm()).item()
                   for k, v in grads(name).items()}
            for name in ("reference-autocast-bf16", "fused-bf16")}


def query_inputs():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=g)
    coords = torch.rand(BATCH, QUERIES, 2, generator=g) * 2 - 1
    cells = torch.full((BATCH, QUERIES, 2), 2 / (2 * SIZE))
    torch.manual_seed(0)
    mlp = ref.MLP(ref.imnet_in_dim(CHANNELS), 3, HIDDEN)
    return feat, coords, cells, mlp


def time_query(name, feat, coords, cells, mlp):
    leaf = feat.detach().requires_grad_()
    mlp.zero_grad()
    t0 = time.perf_counter()
    loss = QUERIES_BY_NAME[name](leaf, coords, cells, mlp).abs().mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def memory_probe(name):
    """Peak rise of the resident set over one forward + backward, in this (fresh) process."""
    feat, coords, cells, mlp = query_inputs()

    def warm_up():  # allocator pools, BLAS buffers; its gradients dropped before the measured pass
        time_query(name, feat, coords, cells, mlp)
        mlp.zero_grad()
    print(peak_rise_bytes(lambda: time_query(name, feat, coords, cells, mlp), warm_up))


def training_models():
    torch.manual_seed(0)
    fused = LIIF(EDSRBaseline())
    reference = ref_models.LIIF(ref_models.EDSR())
    # The original EDSR also holds mean-shift buffers, unused by LIIF.
    missing, unexpected = reference.load_state_dict(fused.state_dict(), strict=False)
    assert not unexpected and all("_mean" in k for k in missing), (missing, unexpected)
    return {"reference": reference, "fused": fused}


def training_batch():
    g = torch.Generator().manual_seed(1)
    inp = torch.rand(BATCH, 3, SIZE, SIZE, generator=g)
    coords = torch.rand(BATCH, QUERIES, 2, generator=g) * 2 - 1
    cells = torch.full((BATCH, QUERIES, 2), 2 / (2 * SIZE))
    target = torch.rand(BATCH, QUERIES, 3, generator=g)
    return inp, coords, cells, target


def time_step(model, optimizer, batch):
    """Seconds of each phase of one training step, and the query's backward alone."""
    inp, coords, cells, target = batch
    optimizer.zero_grad()
    t0 = time.perf_counter()
    feat = model.gen_feat(inp)
    t1 = time.perf_counter()
    pred = model.query_rgb(coords, cells)
    t2 = time.perf_counter()
    loss = (pred - target).abs().mean()
    loss.backward()
    t3 = time.perf_counter()
    optimizer.step()
    t4 = time.perf_counter()
    # The query's backward alone: the same query on a detached copy of the features.
    model.feat = feat.detach().requires_grad_()
    pred = model.query_rgb(coords, cells)
    loss = (pred - target).abs().mean()
    t5 = time.perf_counter()
    loss.backward()
    t6 = time.perf_counter()
    optimizer.zero_grad()
    return {"encoder_forward": t1 - t0, "query_forward": t2 - t1, "backward": t3 - t2,
            "optimizer": t4 - t3, "step": t4 - t0, "query_backward_alone": t6 - t5}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-probe":
        memory_probe(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    feat, coords, cells, mlp = query_inputs()
    names = list(QUERIES_BY_NAME)
    for name in names:
        time_query(name, feat, coords, cells, mlp)  # warm-up
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(time_query(name, feat, coords, cells, mlp))
    query = {}
    for name in names:
        fwd = statistics.median(t[0] for t in times[name])
        bwd = statistics.median(t[1] for t in times[name])
        query[name] = {"forward_s": fwd, "backward_s": bwd, "total_s": fwd + bwd}
    for name in names:
        query[name]["speedup_vs_reference"] = (query["reference"]["total_s"]
                                               / query[name]["total_s"])
    memory = {}
    if not args.skip_memory:
        for name in names:
            memory[name] = int(run_memory_probe(__file__, "--memory-probe", name))
            query[name]["peak_memory_bytes"] = memory[name]
    errors = gradient_errors(feat, coords, cells, mlp)
    print(f"query forward + backward, batch {BATCH}, {SIZE}x{SIZE}, {QUERIES} queries per image:")
    print(f"{'variant':<26} {'forward s':>9} {'backward s':>10} {'total s':>8} {'vs ref':>7} "
          f"{'peak MiB':>9}")
    for name in names:
        q = query[name]
        mem = f"{memory[name] / 2**20:.0f}" if name in memory else ""
        print(f"{name:<26} {q['forward_s']:>9.3f} {q['backward_s']:>10.3f} {q['total_s']:>8.3f} "
              f"{q['speedup_vs_reference']:>6.2f}x {mem:>9}", flush=True)
    for name, errs in errors.items():
        query[name]["gradient_relative_errors"] = errs
        print(f"{name}: gradient error against float32, max {max(errs.values()):.1e} "
              f"(feat {errs['feat']:.1e})")

    models = training_models()
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in models.items()}
    batch = training_batch()
    for k in models:
        time_step(models[k], optimizers[k], batch)  # warm-up
    steps = {k: [] for k in models}
    for _ in range(args.repeats):
        for k in models:
            steps[k].append(time_step(models[k], optimizers[k], batch))
    training = {k: {phase: statistics.median(s[phase] for s in steps[k]) for phase in steps[k][0]}
                for k in models}
    training["fused"]["speedup_vs_reference"] = training["reference"]["step"] / training["fused"]["step"]
    print(f"\ntraining step (EDSR-baseline LIIF, batch {BATCH}, {SIZE}x{SIZE}, Adam):")
    phases = list(training["reference"].keys())
    print(f"{'':<10}" + "".join(f"{p:>22}" for p in phases))
    for k in models:
        print(f"{k:<10}" + "".join(f"{training[k][p]:>22.3f}" for p in phases))
    print(f"fused step {training['fused']['speedup_vs_reference']:.2f}x the reference's")

    result = {
        **result_header("bench_backward (CPU, float32 and bf16: query forward + backward at the "
                        "training shape; EDSR-baseline LIIF training step)", __file__,
                        sys.argv[1:]),
        "shape": {"batch": BATCH, "channels": CHANNELS, "size": SIZE, "queries": QUERIES,
                  "hidden": HIDDEN},
        "repeats": args.repeats,
        "machine": cpu_machine_info(),
        "query": query,
        "training_step": training,
    }
    write_results(result, "cpu_backward", args.out)


if __name__ == "__main__":
    main()
