"""The CPU benchmarks' measurement and reporting logic (benchmarks/*.py), whose numbers back the
performance claims of the docs: each script's timing loop, ratios, units and results record, run on
stand-ins for the measured work and a fake clock (time.perf_counter), so that every number has one
right value: medians of the timed runs only (the warm-up's time is far off, so that counting it
shows), every variant on the same inputs with its own precision, ratios the right way round,
memory per variant in bytes. No speed is asserted, nothing here is timed for real."""

import importlib
import json
import os
import statistics
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "python")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import liif_reference as ref  # noqa: E402

WARM_UP = 1000.0  # seconds of every warm-up call: a median or mean that counted one would show it


class Clock:
    """time.perf_counter for the scripts: time passes only when a stand-in says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(time, "perf_counter", c)
    return c


def bench(name):
    return importlib.import_module(name)


def run_main(module, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    return module.main()


class Durations:
    """Per name, the seconds of each successive call: the first is the warm-up (WARM_UP), then
    `times` (chosen so that median, mean and the first or last differ)."""

    def __init__(self, times):
        self.times = {k: [WARM_UP, *v] for k, v in times.items()}
        self.calls = {k: 0 for k in times}

    def next(self, name):
        self.calls[name] += 1
        return self.times[name][self.calls[name] - 1]


# bench_query.py

QUERY_TIMES = {"reference": [9.0, 1.0, 2.0], "fused": [0.5, 0.1, 0.2],
               "fused-bf16": [0.06, 0.3, 0.05]}


@pytest.mark.parametrize("bf16_kernels", [True, False])
def test_bench_query_table_from_the_timed_runs(tmp_path, monkeypatch, clock, bf16_kernels):
    """bench_query's results: medians of the repeats after the warm-up, queries per second of the
    whole output grid, speed and memory ratios of each variant to the reference, each variant's
    floor at the matmul rate of the dtype it computes in (fused-bf16: float32 on a CPU without
    the bf16 kernels), the variants on the same inputs, memory measured per variant and the
    machine recorded."""
    bq = bench("bench_query")
    info = {**bq.liif_cuda.build_info(), "cpu_bf16": bf16_kernels}
    monkeypatch.setattr(bq.liif_cuda, "build_info", lambda: info)
    durations = Durations(QUERY_TIMES)
    inputs = bq.make_inputs(3, 2)
    seen = set()
    ref_out = torch.arange(1.0, 4.0).view(1, 1, 3)

    def fake_run(name, feat, coord, cell, imnet):
        seen.add(tuple(id(x) for x in (feat, coord, cell, imnet)))
        clock.advance(durations.next(name))
        return ref_out * (1 + {"reference": 0, "fused": 1e-3, "fused-bf16": 1e-2}[name])

    memory = {"reference": 6 << 20, "fused": 3 << 20, "fused-bf16": 2 << 20}
    probes = []

    def fake_memory(size, scale, variant):
        probes.append((size, scale, variant))
        return memory[variant]

    def make_inputs(size, scale):  # time spent making inputs is no variant's
        clock.advance(WARM_UP)
        return inputs

    monkeypatch.setattr(bq, "make_inputs", make_inputs)
    monkeypatch.setattr(bq, "run_variant", fake_run)
    monkeypatch.setattr(bq, "peak_memory_in_subprocess", fake_memory)
    rates = {torch.float32: 1e9, torch.bfloat16: 3e9}
    monkeypatch.setattr(bq, "matmul_rate", lambda dtype=torch.float32: rates[dtype])
    out = tmp_path / "q.json"
    run_main(bq, monkeypatch, "--sizes", "3", "--scales", "2", "--repeats", "3", "--out", str(out))
    result = json.loads(out.read_text())
    assert len(seen) == 1  # every call on the same inputs
    assert sorted(probes) == sorted((3, 2, v) for v in bq.VARIANTS)
    (row,) = result["rows"]
    median = {k: statistics.median(v) for k, v in QUERY_TIMES.items()}
    assert row["queries"] == 36 and set(row["times_s"]) == set(QUERY_TIMES)
    assert all(row["times_s"][k] == pytest.approx(v) for k, v in QUERY_TIMES.items())
    assert row["median_s"] == pytest.approx(median)
    assert row["queries_per_s"] == pytest.approx({k: 36 / v for k, v in median.items()})
    fused = ("fused", "fused-bf16")
    assert row["speedup"] == pytest.approx({v: median["reference"] / median[v] for v in fused})
    assert row["peak_memory_bytes"] == memory
    assert row["memory_ratio"] == pytest.approx({"fused": 0.5, "fused-bf16": 1 / 3})
    assert row["relative_error"] == pytest.approx({"fused": 1e-3, "fused-bf16": 1e-2}, rel=1e-4)
    flops = bq.flops_per_query(3, 2)
    assert row["floor_queries_per_s"] == pytest.approx(
        {"fused": 1e9 / flops, "fused-bf16": (3e9 if bf16_kernels else 1e9) / flops})
    assert row["fraction_of_floor"] == pytest.approx(
        {v: 36 / median[v] / row["floor_queries_per_s"][v] for v in fused})
    assert row["bf16_over_fp32"] == pytest.approx(median["fused"] / median["fused-bf16"])
    assert result["matmul_flops_per_s"] == 1e9 and result["bf16_matmul_flops_per_s"] == 3e9
    assert result["repeats"] == 3 and "--sizes 3" in result["command"]
    machine = result["machine"]  # the CPU and the flags that decide bf16's speed
    assert machine["cpu"] and set(machine["cpu_flags"]) >= {"avx512_bf16", "amx_bf16"}


def test_bench_query_variants_run_their_own_precision(monkeypatch):
    bq = bench("bench_query")
    calls = []

    def spy(feat, coord, cell, imnet, precision="fp32"):
        calls.append((precision, torch.is_grad_enabled()))
        return feat

    monkeypatch.setattr(bq.liif_cuda, "query", spy)
    monkeypatch.setattr(bq.ref, "batched_query_rgb",
                        lambda *a: calls.append(("reference", torch.is_grad_enabled())))
    for name in bq.VARIANTS:
        bq.run_variant(name, torch.zeros(1), None, None, None)
    assert calls == [("reference", False), ("fp32", False), ("bf16", False)]


def test_bench_query_flops_per_query():
    """The fused op's MLP arithmetic per query, counted by torch's flop counter: four neighbours
    through the MLP whose first layer keeps its 4 coordinate and cell columns, plus the query's
    share of the first-layer map (each LR pixel's 9 x 64 unfolded features times 256 columns)."""
    from torch.utils.flop_counter import FlopCounterMode
    bq = bench("bench_query")
    size, scale = 5, 3
    mlp = ref.MLP(4, 3, bq.HIDDEN)
    with FlopCounterMode(display=False) as per_query:
        mlp(torch.zeros(4, 4))  # the 4 neighbours of one query
    with FlopCounterMode(display=False) as feature_map:
        torch.mm(torch.zeros(size * size, 9 * bq.CHANNELS), torch.zeros(9 * bq.CHANNELS, 256))
    expected = (per_query.get_total_flops()
                + feature_map.get_total_flops() / (size * scale) ** 2)
    assert bq.flops_per_query(size, scale) == pytest.approx(expected, rel=1e-12)


def test_bench_query_matmul_rate(monkeypatch, clock):
    """FLOP/s of one product: the median over the repeats of a loop's time per product, the
    warm-up products untimed."""
    bq = bench("bench_query")
    products = []

    def mm(a, w, out):
        products.append(1)
        clock.advance(WARM_UP if len(products) <= 20 else [1e-3, 2e-3, 9e-3][len(products) % 3])

    monkeypatch.setattr(bq.torch, "mm", mm)
    times = [statistics.mean([1e-3, 2e-3, 9e-3][(21 + 50 * r + i) % 3] for i in range(50))
             for r in range(5)]
    assert bq.matmul_rate() == pytest.approx(2 * 4096 * 256 * 256 / statistics.median(times))


def test_bench_query_memory_probe_measures_its_own_case(monkeypatch, capsys):
    """bench_query's memory probe: the process that peak_memory_in_subprocess starts measures one
    call of the variant, size and scale it was given, on their inputs, and prints the rise."""
    bq = bench("bench_query")
    ran = []
    monkeypatch.setattr(bq, "make_inputs", lambda size, scale: (size, scale, None, None))
    monkeypatch.setattr(bq, "run_variant", lambda name, *inputs: ran.append((name, *inputs[:2])))
    monkeypatch.setattr(bq, "peak_rise_bytes", lambda measured: [measured(), 4321][-1])

    def probe(script, *args):  # the fresh process, here in this one
        assert os.path.samefile(script, bq.__file__)
        run_main(bq, monkeypatch, *args)
        return capsys.readouterr().out.splitlines()[-1]

    monkeypatch.setattr(bq, "run_memory_probe", probe)
    assert bq.peak_memory_in_subprocess(5, 3, "fused-bf16") == 4321
    assert ran == [("fused-bf16", 5, 3)]


# bench_backward.py


class Tick(torch.autograd.Function):
    """The identity, whose backward takes `seconds` of the fake clock."""

    @staticmethod
    def forward(ctx, x, clock, seconds):
        ctx.clock, ctx.seconds = clock, seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.advance(ctx.seconds)
        return grad, None, None


def test_bench_backward_time_query(monkeypatch, clock):
    bb = bench("bench_backward")

    def query(feat, coords, cells, mlp):
        clock.advance(3.0)
        return Tick.apply(feat * 2, clock, 5.0)

    monkeypatch.setitem(bb.QUERIES_BY_NAME, "fused", query)
    feat = torch.ones(2)
    assert bb.time_query("fused", feat, None, None, torch.nn.Linear(1, 1)) == (3.0, 5.0)


def test_bench_backward_time_step_phases(clock):
    """time_step's phases: encoder forward, query forward, backward (both), optimizer step, the
    whole step, and the query's backward alone (on detached features: not the encoder's)."""
    bb = bench("bench_backward")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def gen_feat(self, inp):
            clock.advance(1.0)
            self.feat = Tick.apply(self.w * inp, clock, 10.0)  # the encoder's backward
            return self.feat

        def query_rgb(self, coords, cells):
            clock.advance(2.0)
            return Tick.apply(self.feat * coords, clock, 20.0)  # the query's backward

    class Optimizer:
        def zero_grad(self):
            pass

        def step(self):
            clock.advance(4.0)

    batch = (torch.ones(3), torch.ones(3), None, torch.zeros(3))
    assert bb.time_step(Model(), Optimizer(), batch) == {
        "encoder_forward": 1.0, "query_forward": 2.0, "backward": 30.0, "optimizer": 4.0,
        "step": 37.0, "query_backward_alone": 20.0}


def test_bench_backward_results(tmp_path, monkeypatch):
    """bench_backward's record: per variant the medians of forward and backward after the
    warm-up, their sum, the ratio to the reference, each variant's own memory probe; the training
    step's phases (medians) and its ratio to the reference's."""
    bb = bench("bench_backward")
    names = list(bb.QUERIES_BY_NAME)
    fwd = Durations({n: [3.0 + i, 1.0 + i, 8.0 + i] for i, n in enumerate(names)})
    bwd = Durations({n: [7.0 * (i + 1), 5.0, 6.0] for i, n in enumerate(names)})
    monkeypatch.setattr(bb, "query_inputs", lambda: (None, None, None, None))
    monkeypatch.setattr(bb, "time_query", lambda name, *a: (fwd.next(name), bwd.next(name)))
    probes = []

    def probe(script, flag, name):
        probes.append((flag, name))
        return str(1000 + names.index(name))

    monkeypatch.setattr(bb, "run_memory_probe", probe)
    errors = {"reference-autocast-bf16": {"feat": 1e-2}, "fused-bf16": {"feat": 2e-3}}
    monkeypatch.setattr(bb, "gradient_errors", lambda *a: errors)
    monkeypatch.setattr(bb, "training_models", lambda: {"reference": torch.nn.Linear(1, 1),
                                                        "fused": torch.nn.Linear(1, 1)})
    monkeypatch.setattr(bb, "training_batch", lambda: None)
    steps = {"reference": Durations({"step": [8.0, 4.0, 6.0], "optimizer": [1.0, 3.0, 2.0]}),
             "fused": Durations({"step": [2.0, 1.0, 3.0], "optimizer": [0.5, 0.5, 0.25]})}
    models = {}

    def time_step(model, optimizer, batch):
        k = models.setdefault(id(model), "reference" if not models else "fused")
        return {p: steps[k].next(p) for p in ("step", "optimizer")}

    monkeypatch.setattr(bb, "time_step", time_step)
    out = tmp_path / "b.json"
    run_main(bb, monkeypatch, "--repeats", "3", "--out", str(out))
    result = json.loads(out.read_text())
    query = result["query"]
    total = {}
    for i, n in enumerate(names):
        f, b = statistics.median(fwd.times[n][1:]), statistics.median(bwd.times[n][1:])
        total[n] = f + b
        assert query[n]["forward_s"] == f and query[n]["backward_s"] == b, n
        assert query[n]["total_s"] == pytest.approx(f + b), n
        assert query[n]["peak_memory_bytes"] == 1000 + i, n
    for n in names:
        assert query[n]["speedup_vs_reference"] == pytest.approx(total["reference"] / total[n])
    assert sorted(probes) == sorted(("--memory-probe", n) for n in names)
    for n, e in errors.items():
        assert query[n]["gradient_relative_errors"] == e
    training = result["training_step"]
    assert training["reference"] == {"step": 6.0, "optimizer": 2.0}
    assert training["fused"]["step"] == 2.0 and training["fused"]["optimizer"] == 0.5
    assert training["fused"]["speedup_vs_reference"] == pytest.approx(3.0)
    assert result["repeats"] == 3 and "cpu_flags" in result["machine"]


def test_bench_backward_gradient_errors_from_fresh_gradients(monkeypatch):
    """Each variant's gradients are its own (not added to the variant's before it): with every
    variant the float32 reference, every error is 0."""
    bb = bench("bench_backward")
    for name in ("reference-autocast-bf16", "fused-bf16"):
        monkeypatch.setitem(bb.QUERIES_BY_NAME, name, ref.query_rgb)
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 4, 5, 5, generator=g)
    coords = torch.rand(1, 7, 2, generator=g) * 2 - 1
    cells = torch.full((1, 7, 2), 0.2)
    torch.manual_seed(0)
    mlp = ref.MLP(ref.imnet_in_dim(4), 3, [8])
    errors = bb.gradient_errors(feat, coords, cells, mlp)
    assert set(errors) == {"reference-autocast-bf16", "fused-bf16"}
    for errs in errors.values():
        assert set(errs) == {"feat", "weight0", "bias0", "weight1", "bias1"}
        assert all(e == 0 for e in errs.values()), errs


def test_bench_backward_bf16_variants(monkeypatch):
    """The bf16 variants: the fused op with bf16 forward and backward; the reference under CPU
    autocast bf16, its output back in float32."""
    bb = bench("bench_backward")
    calls = []
    monkeypatch.setattr(bb.liif_cuda, "query", lambda *a, **k: calls.append(k))
    bb.fused_bf16(None, None, None, None)
    assert calls == [{"precision": "bf16", "backward_precision": "bf16"}]

    def reference(feat, coords, cells, mlp):
        calls.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return feat.bfloat16()

    monkeypatch.setattr(bb.ref, "query_rgb", reference)
    assert bb.reference_autocast_bf16(torch.ones(2), None, None, None).dtype == torch.float32
    assert calls[1] == (True, torch.bfloat16)


def test_bench_backward_memory_probe_runs_its_variant(monkeypatch, capsys):
    """The probe process of one variant measures that variant's forward + backward, after a
    warm-up pass of the same."""
    bb = bench("bench_backward")
    ran = []
    monkeypatch.setattr(bb, "query_inputs", lambda: (None, None, None, torch.nn.Linear(1, 1)))
    monkeypatch.setattr(bb, "time_query", lambda name, *a: ran.append(name))

    def peak_rise_bytes(measured, warm_up):
        warm_up()
        ran.append("measured:")
        measured()
        return 99

    monkeypatch.setattr(bb, "peak_rise_bytes", peak_rise_bytes)
    run_main(bb, monkeypatch, "--memory-probe", "fused-bf16")
    assert ran == ["fused-bf16", "measured:", "fused-bf16"]
    assert capsys.readouterr().out.strip() == "99"


def test_bench_backward_recompute_variant_is_the_fused_query():
    """The variant with the former recompute backward computes the fused op's values and
    gradients (feature map, every weight and bias)."""
    bb = bench("bench_backward")
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    coords = torch.rand(2, 6, 2, generator=g, dtype=torch.float64) * 2.2 - 1.1
    cells = torch.full((2, 6, 2), 0.3, dtype=torch.float64)
    torch.manual_seed(0)
    mlp = ref.MLP(ref.imnet_in_dim(3), 3, [8, 8]).double()
    grad_out = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    results = []
    for query in (bb.liif_cuda.query, bb.recompute_query):
        leaf = feat.detach().requires_grad_()
        mlp.zero_grad()
        out = query(leaf, coords, cells, mlp)
        out.backward(grad_out)
        results.append([out, leaf.grad] + [p.grad.clone() for p in mlp.parameters()])
    for ours, fused in zip(*results):
        torch.testing.assert_close(ours, fused, rtol=1e-10, atol=1e-12)


def test_bench_backward_training_models_share_weights():
    bb = bench("bench_backward")
    models = bb.training_models()
    fused, reference = models["fused"].state_dict(), models["reference"].state_dict()
    assert fused and all(torch.equal(v, reference[k]) for k, v in fused.items())


# bench_backward_memory.py


@pytest.mark.parametrize("variant", ["reference", "fused"])
def test_bench_backward_memory_probe(monkeypatch, capsys, variant):
    """The probe measures its own variant's forward + backward, with the gradients of the pass
    before dropped (as an optimizer's zero_grad does), and prints the measured rise."""
    bm = bench("bench_backward_memory")
    ran = []

    def query(name):
        def run(feat, coord, cell, mlp):
            ran.append((name, feat.grad is None and all(p.grad is None for p in mlp.parameters())))
            return (feat.mean() + sum(p.sum() for p in mlp.parameters())) * torch.ones(1, 1, 3)
        return run

    monkeypatch.setattr(bm.liif_cuda, "query", query("fused"))
    monkeypatch.setattr(bm.ref, "query_rgb", query("reference"))
    monkeypatch.setattr(bm, "peak_rise_bytes", lambda step: [step(), step(), 12345][-1])
    bm.probe(variant)
    assert ran == [(variant, True)] * 2
    assert json.loads(capsys.readouterr().out) == {"peak_memory_bytes": 12345}


def test_bench_backward_memory_results(tmp_path, monkeypatch):
    bm = bench("bench_backward_memory")
    probes = []

    def probe(script, flag, variant):
        probes.append((flag, variant))
        return json.dumps({"peak_memory_bytes": {"reference": 700, "fused": 70}[variant]})

    monkeypatch.setattr(bm, "run_memory_probe", probe)
    out = tmp_path / "m.json"
    run_main(bm, monkeypatch, "--out", str(out))
    result = json.loads(out.read_text())
    assert probes == [("--probe", "reference"), ("--probe", "fused")]
    assert result["variants"] == {"reference": {"peak_memory_bytes": 700},
                                  "fused": {"peak_memory_bytes": 70}}
    assert "cpu_flags" in result["machine"]


# bench_cpu_bf16.py

SETUP_PRECISIONS = {"fp32": ("fp32", "fp32"), "query-bf16": ("bf16", "fp32"),
                    "query+encoder-bf16": ("bf16", "bf16")}


def test_bench_cpu_bf16_upscale_timing(monkeypatch, clock):
    """time_upscale: each set-up with its own precisions, medians of the repeats after the warm-up,
    the encoder's time of each call (not added up over calls), speed-ups over float32, and the
    encoder wrapper taken out afterwards."""
    bc = bench("bench_cpu_bf16")
    upscaling = bc.upscaling
    # Per call after the warm-up: seconds in the encoder, and in the rest of upscale().
    encoder = {"fp32": [0.5, 0.25, 1.5], "query-bf16": [0.75, 0.25, 0.5],
               "query+encoder-bf16": [0.125, 0.375, 0.25]}
    rest = {"fp32": [5.5, 1.75, 6.5], "query-bf16": [2.25, 0.75, 2.0],
            "query+encoder-bf16": [1.375, 0.125, 0.75]}
    encoder_durations, rest_durations = Durations(encoder), Durations(rest)
    by_precisions = {v: k for k, v in SETUP_PRECISIONS.items()}

    def run_encoder(encoder_module, setup, encoder_precision):
        clock.advance(encoder_durations.next(setup))
        return "feat"

    monkeypatch.setattr(upscaling, "run_encoder", run_encoder)
    calls = []

    def upscale(image, scale, model, precision, encoder_precision):
        setup = by_precisions[precision, encoder_precision]
        calls.append((model, scale, setup))
        upscaling.run_encoder(None, setup, encoder_precision)  # upscale() calls it so
        clock.advance(rest_durations.next(setup))
        return image

    monkeypatch.setattr(bc.liif_cuda, "upscale", upscale)
    result = bc.time_upscale("model", 3)
    assert upscaling.run_encoder is run_encoder
    assert sorted(calls) == sorted(("model", 2.5, n) for n in encoder for _ in range(4))
    times = {k: [e + r for e, r in zip(encoder[k], rest[k])] for k in encoder}
    assert all(result["times_s"][k] == pytest.approx(v) for k, v in times.items())
    median = {k: statistics.median(v) for k, v in times.items()}
    assert result["median_s"] == pytest.approx(median)
    assert result["encoder_median_s"] == pytest.approx(
        {k: statistics.median(v) for k, v in encoder.items()})
    assert result["speedup_vs_fp32"] == pytest.approx({k: median["fp32"] / v
                                                       for k, v in median.items()})


def test_bench_cpu_bf16_set5(monkeypatch):
    bc = bench("bench_cpu_bf16")
    psnr = {("fp32", "fp32"): 30.0, ("bf16", "fp32"): 29.9, ("bf16", "bf16"): 29.5}
    calls = []

    def evaluate(model, data, scales, precision, encoder_precision, device, progress, **kw):
        calls.append((model, data, scales, device, kw))
        return {"Set5": {str(s): {"psnr": psnr[precision, encoder_precision] + s} for s in scales}}

    monkeypatch.setattr(bc, "evaluate", evaluate)
    result = bc.set5_psnr("model", "data", [2.0, 3.0])
    assert calls == [("model", os.path.join("data", "Set5"), [2.0, 3.0], "cpu", {})] * 3
    assert result["protocol"] == "mmedit"  # evaluate's default
    for name, precisions in SETUP_PRECISIONS.items():
        assert result["psnr"][name] == {"2.0": psnr[precisions] + 2, "3.0": psnr[precisions] + 3}
        assert result["delta_vs_fp32_db"][name] == pytest.approx(
            {s: psnr[precisions] - 30.0 for s in ("2.0", "3.0")})


# bench_train.py

TRAIN_TIMES = {"reference": [4.0, 2.0, 3.0], "reference-bf16": [5.0, 6.0, 1.0],
               "liif_cuda-fp32": [1.0, 0.5, 2.0], "liif_cuda-bf16": [0.8, 0.2, 0.4]}


def test_bench_train_measure(monkeypatch, clock):
    """measure(): every variant steps through the same batches, the first its warm-up; medians of
    the rest, iterations per second, the ratio to the reference, each variant's memory probe."""
    bt = bench("bench_train")
    data = [f"batch{i}" for i in range(4)]
    monkeypatch.setattr(bt, "batches", lambda data_dir, count, device: data[:count])
    durations, seen = Durations(TRAIN_TIMES), {k: [] for k in TRAIN_TIMES}

    def make_variant(name, device):
        def step(batch):
            seen[name].append(batch)
            clock.advance(durations.next(name))
        return step

    monkeypatch.setattr(bt, "make_variant", make_variant)
    probes = []

    def probe(script, *args):
        probes.append(args)
        return str(100 + list(TRAIN_TIMES).index(args[-1]))

    monkeypatch.setattr(bt, "run_memory_probe", probe)
    rows = bt.measure("imgs", "cpu", 3)
    assert all(seen[k] == data for k in TRAIN_TIMES), seen
    assert sorted(probes) == sorted(("--data", "imgs", "--memory-probe", k) for k in TRAIN_TIMES)
    median = {k: statistics.median(v) for k, v in TRAIN_TIMES.items()}
    for i, (k, row) in enumerate(rows.items()):
        assert row["times_s"] == pytest.approx(TRAIN_TIMES[k])
        assert row["median_step_s"] == pytest.approx(median[k])
        assert row["iterations_per_s"] == pytest.approx(1 / median[k])
        assert row["speedup_vs_reference"] == pytest.approx(median["reference"] / median[k])
        assert row["peak_memory_bytes"] == 100 + i


def test_bench_train_variants_precision_and_weights(monkeypatch):
    """Each variant's step runs train_step in its own precision, and every model starts from the
    same weights."""
    bt = bench("bench_train")
    calls = {}
    monkeypatch.setattr(bt, "train_step", lambda model, optimizer, batch, precision, scaler=None:
                        calls.__setitem__(batch, (model, optimizer, precision, scaler)))
    for name in bt.VARIANTS["cpu"]:
        bt.make_variant(name, "cpu")(name)
    assert {k: v[2] for k, v in calls.items()} == {
        "reference": "fp32", "reference-bf16": "bf16", "liif_cuda-fp32": "fp32",
        "liif_cuda-bf16": "bf16"}

    def weights(model):
        return sorted((tuple(p.shape), p.double().sum().item()) for p in model.parameters()
                      if p.requires_grad)  # not the original's fixed mean shifts

    first = weights(calls["reference"][0])
    assert all(weights(v[0]) == first for v in calls.values())
    for model, optimizer, _, scaler in calls.values():  # each its own Adam on its own model
        assert scaler is None and isinstance(optimizer, torch.optim.Adam)
        params = optimizer.param_groups[0]["params"]
        assert [id(p) for p in params] == [id(p) for p in model.parameters()]


def test_bench_train_memory_probe_steps_its_variant(monkeypatch):
    """The CPU probe process of one variant measures one step of that variant, after a warm-up
    step of it on another batch."""
    bt = bench("bench_train")
    monkeypatch.setattr(bt, "batches", lambda data_dir, count, device: ["measured", "warm"][:count])
    steps = []
    monkeypatch.setattr(bt, "make_variant",
                        lambda name, device: lambda batch: steps.append((name, device, batch)))

    def peak_rise_bytes(measured, warm_up):
        warm_up()
        measured()
        return 7

    monkeypatch.setattr(bt, "peak_rise_bytes", peak_rise_bytes)
    assert bt.peak_memory("imgs", "liif_cuda-bf16") == 7
    assert steps == [("liif_cuda-bf16", "cpu", "warm"), ("liif_cuda-bf16", "cpu", "measured")]


# profile_train_step.py


def test_profile_train_step_variants():
    """Its variants' names: liif-cuda train's step per precision and the two diagnostics of a
    reduced precision's step; any other name is refused before any work."""
    pt = bench("profile_train_step")
    assert pt.parse_variant("reference") == ("fp32", None)
    assert pt.parse_variant("liif_cuda-bf16") == ("bf16", None)
    assert pt.parse_variant("liif_cuda-bf16-query") == ("bf16", "query")
    assert pt.parse_variant("liif_cuda-fp16-channels_last") == ("fp16", "channels_last")
    for bad in ("liif_cuda", "liif_cuda-fp64", "liif_cuda-bf16-nhwc", "ref", "liif_cuda-bf16-query-x"):
        with pytest.raises(SystemExit, match=f"--variants: unknown variant '{bad}'"):
            pt.parse_variant(bad)


def test_profile_train_step_diagnostic_layouts():
    """The diagnostics compute train_step's loss: "query" with the encoder outside autocast
    (float32 features under bf16), "channels_last" with the encoder's weights and input in that
    memory format; in float32 all three give the same loss."""
    pt = bench("profile_train_step")
    torch.manual_seed(3)
    batch = {"inp": torch.randn(2, 3, 6, 7), "coord": torch.rand(2, 20, 2) * 2 - 1,
             "cell": torch.full((2, 20, 2), 0.1), "gt": torch.randn(2, 20, 3)}
    losses, feat_dtypes = {}, {}
    for layout in (None, "query", "channels_last"):
        name = "liif_cuda-bf16" + (f"-{layout}" if layout else "")
        model, _, precision, got_layout = pt.model_and_optimizer(name, "cpu")
        assert (precision, got_layout) == ("bf16", layout)
        conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == (
            layout == "channels_last")
        losses[layout] = pt.forward_and_loss(model, batch, "fp32", layout).item()
        pt.forward_and_loss(model, batch, "bf16", layout)
        feat_dtypes[layout] = model.feat.dtype
    assert feat_dtypes == {None: torch.bfloat16, "query": torch.float32,
                           "channels_last": torch.bfloat16}
    assert losses["query"] == pytest.approx(losses[None], rel=1e-6)
    assert losses["channels_last"] == pytest.approx(losses[None], rel=1e-5)


def test_bench_train_cuda_peak_memory(monkeypatch):
    """On CUDA: the peak allocated during the step above what was allocated before it, the peak
    of earlier work (here 1000) not counted."""
    bt = bench("bench_train")
    state = {"allocated": 100, "peak": 1000}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda: state.__setitem__("peak", state["allocated"]))

    def step(batch):  # 50 bytes more while it runs, 10 kept
        state["peak"] = max(state["peak"], state["allocated"] + 50)
        state["allocated"] += 10

    assert bt.cuda_peak_memory(step, None) == 50


# bench_upscale_large.py


def test_bench_upscale_large_record(tmp_path, monkeypatch, clock):
    """The upscale's time and the rise of the peak resident set over the resident set just before
    the call (the peak reset then), in bytes; the model asked for, on the CPU; the output's size
    as width x height; results through results_file: a second run never overwrites the first."""
    bu = bench("bench_upscale_large")
    results_file = bench("results_file")
    for module in (results_file, bu):  # never the checkout's results
        monkeypatch.setattr(module, "ROOT", str(tmp_path), raising=False)
    folder = tmp_path / "benchmarks" / "results"
    folder.mkdir(parents=True)  # as in a checkout
    monkeypatch.setattr(bu.liif_cuda, "load_model", lambda name: ("model", name))
    status = {"VmRSS": 1000, "VmHWM": 99999}  # KiB; the peak of before the reset is not the call's

    def reset():
        status["VmHWM"] = status["VmRSS"]

    def upscale(image, scale, model, device, progress):
        assert model == ("model", "m") and device == "cpu" and scale == 2.5
        clock.advance(7.0)
        status["VmHWM"] = max(status["VmHWM"], status["VmRSS"] + 300)
        h, w = image.shape[:2]
        return np.full((round(h * scale), round(w * scale), 3), 4.0)

    monkeypatch.setattr(bu, "reset_peak_resident_set", reset)
    monkeypatch.setattr(bu, "process_status_kib", lambda field: status[field])
    monkeypatch.setattr(bu.liif_cuda, "upscale", upscale)
    args = ("--width", "16", "--height", "12", "--scale", "2.5", "--model", "m")
    run_main(bu, monkeypatch, *args)
    run_main(bu, monkeypatch, *args)
    files = sorted(os.listdir(folder))
    assert len(files) == 2 and files[0].startswith("upscale_large_"), files
    result = json.loads((folder / files[0]).read_text())
    assert result["input_wh"] == [16, 12] and result["output_wh"] == [40, 30]
    assert result["seconds"] == 7.0
    assert result["peak_rss_increase_bytes"] == 300 * 1024
    assert result["rss_before_bytes"] == 1000 * 1024 and result["output_mean"] == 4.0
    assert "--width 16" in result["command"] and "cpu_flags" in result["machine"]


# precision_psnr.py


def test_precision_psnr_each_precision_decodes_with_its_rounding(tmp_path, monkeypatch):
    """precision_psnr: Set5 under mmedit at x2, x4, x12, each precision decoded by the reference
    with the MLP rounded as that precision's kernel rounds (float32: the exact MLP), and the
    differences to float32."""
    pp = bench("precision_psnr")

    class Model:
        imnet = "exact"

    monkeypatch.setattr(pp.reference_models, "load_original", lambda path: Model())
    monkeypatch.setattr(pp, "KernelRounding", lambda imnet, precision: f"{imnet}-{precision}")
    decoders = []

    lr = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 15  # 0 .. 255

    def upscale_reference(model, img, out_h, out_w):
        decoders.append(model.imnet)
        # The reference's input: the LR image in [0, 1], (1, 3, h, w).
        torch.testing.assert_close(img, torch.from_numpy(lr / 255).float().permute(2, 0, 1)[None])
        return img[:, :, :1, :1].repeat(1, 1, out_h, out_w)

    monkeypatch.setattr(pp.reference_models, "upscale_reference", upscale_reference)
    value = {"exact": 30.0, "exact-tf32": 30.5, "exact-bf16": 29.0, "exact-fp16": 29.75}
    calls = []

    def evaluate(predict, data, scales, protocol, progress):
        calls.append((data, scales, protocol))
        pred = predict(lr, 4, 6)
        assert pred.shape == (4, 6, 3) and np.allclose(pred[3, 5], lr[0, 0] / 255)
        return {"Set5": {str(s): {"psnr": value[decoders[-1]] + s} for s in scales}}

    monkeypatch.setattr(pp, "evaluate", evaluate)
    out = tmp_path / "p.json"
    run_main(pp, monkeypatch, "--data", "d", "--weights", "w", "--out", str(out))
    result = json.loads(out.read_text())
    assert decoders == ["exact", "exact-tf32", "exact-bf16", "exact-fp16"]
    assert calls == [(os.path.join("d", "Set5"), [2, 4, 12], "mmedit")] * 4
    names = {"fp32": "exact", "tf32": "exact-tf32", "bf16": "exact-bf16", "fp16": "exact-fp16"}
    for p, n in names.items():
        assert result["psnr"][p] == {str(s): value[n] + s for s in (2, 4, 12)}
        if p != "fp32":
            assert result["difference_db"][p] == pytest.approx(
                {str(s): value[n] - 30.0 for s in (2, 4, 12)})


# precision_errors_host.py


def test_precision_errors_host_rows(tmp_path, monkeypatch):
    """Each precision runs in the harness in its own precision, on each seed's own inputs, its
    error relative to the float32 reference's output."""
    pe = bench("precision_errors_host")
    error = {"fp32": 3e-4, "tf32": 1e-3, "bf16": 4e-3, "fp16": 2e-3}
    seeds = []
    random_inputs = pe.random_inputs

    def inputs(*args, seed, **kwargs):
        seeds.append(seed)
        return random_inputs(*args, seed=seed, **kwargs)

    def run(feat, coords, cells, mlp, shared, precision):
        # In float64, so that the error is the one put in (to float32 norms' rounding, 1e-7).
        with torch.no_grad():
            return ref.query_rgb(feat, coords, cells, mlp).double() * (1 + error[precision]), None

    monkeypatch.setattr(pe, "random_inputs", inputs)
    monkeypatch.setattr(pe, "run", run)
    out = tmp_path / "e.json"
    run_main(pe, monkeypatch, "--seeds", "2", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert seeds == [0, 1] and [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        assert r["relative_error"] == pytest.approx(error, rel=1e-6), r


# reproduce_tables.py


def test_reproduce_tables_protocols_and_table(tmp_path, monkeypatch, capsys):
    """The LIIF rows: the model asked for, Set5 and Set14, the scales asked for, mmedit protocol,
    the device asked for; the bicubic rows: MATLAB bicubic under the classic protocol (Y channel,
    shave = scale) at x2, x3, x4; the table's differences ours - card; results through
    results_file."""
    rt = bench("reproduce_tables")
    results_file = bench("results_file")
    for module in (results_file, rt):  # never the checkout's results
        monkeypatch.setattr(module, "ROOT", str(tmp_path))
    folder = tmp_path / "benchmarks" / "results"
    folder.mkdir(parents=True)  # as in a checkout
    calls = []

    def evaluate(model, folders, scales, **kwargs):
        calls.append((model, folders, scales, kwargs))
        base = 20.0 if model == "bicubic" else 30.0
        return {os.path.basename(f): {str(s): {"psnr": base + s + i, "ssim": 0.5 + i / 10}
                                      for s in scales}
                for i, f in enumerate(folders)}

    monkeypatch.setattr(rt, "evaluate", evaluate)
    run_main(rt, monkeypatch, "--data", "d", "--model", "m", "--device", "cpu", "--scales", "2,12")
    folders = [os.path.join("d", "Set5"), os.path.join("d", "Set14")]
    assert calls == [("m", folders, [2, 12], {"protocol": "mmedit", "device": "cpu"}),
                     ("bicubic", folders, [2, 3, 4],
                      {"protocol": "classic", "resize": "matlab"})]
    lines = capsys.readouterr().out.splitlines()
    x12 = next(line for line in lines if line.startswith("| x12 |")).split(" | ")
    cp, cs = rt.CARD["Set5"][12]
    assert x12[1:4] == [f"{cp:.4f} / {cs:.4f}", f"{42.0:.4f} / {0.5:.4f}",
                        f"{42.0 - cp:+.4f} / {0.5 - cs:+.4f}"]
    run_main(rt, monkeypatch, "--data", "d", "--scales", "2")
    files = sorted(os.listdir(folder))
    assert len(files) == 2, files  # the second run did not overwrite the first
    result = json.loads((folder / files[0]).read_text())
    assert result["liif_mmedit"]["Set14"]["12"]["psnr"] == 43.0
    assert result["bicubic_classic"]["Set5"]["3"]["psnr"] == 23.0


def test_reproduce_tables_match_the_committed_results():
    """The script's card, published bicubic values and scales are those of the committed results
    (benchmarks/results/eval_tables_*.json) that docs/evaluation.md shows."""
    rt = bench("reproduce_tables")
    folder = os.path.join(ROOT, "benchmarks", "results")
    names = sorted(f for f in os.listdir(folder) if f.startswith("eval_tables_"))
    assert names, "no committed eval_tables results"
    committed = json.loads(open(os.path.join(folder, names[-1])).read())

    def keyed(table):  # JSON's keys are strings, its tuples lists
        return {d: {str(s): list(v) if isinstance(v, tuple) else v for s, v in t.items()}
                for d, t in table.items()}

    assert committed["card"] == keyed(rt.CARD)
    assert committed["published_bicubic"] == keyed(rt.BICUBIC)
    for d in rt.CARD:
        assert list(committed["liif_mmedit"][d]) == [str(s) for s in rt.SCALES]
        assert sorted(rt.CARD[d]) == rt.SCALES


# gpu_paths.py


def test_gpu_paths_median_ms(clock):
    """Runner.median_ms on the CPU: milliseconds, the median of the repeats, the warm-up untimed."""
    gp = bench("gpu_paths")
    durations = Durations({"fn": [0.004, 0.001, 0.002, 0.010, 0.003]})
    runner = gp.Runner("cpu", small=True, repeats=5, profile=False)
    assert runner.median_ms(lambda: clock.advance(durations.next("fn"))) == pytest.approx(3.0)
    assert durations.calls["fn"] == 6
    assert runner.median_ms(lambda: None, repeats=0) is None


def test_gpu_paths_float64_path_holds_float64_tolerance(monkeypatch):
    """generic-fp64 is checked at float64's tolerance: an output 1e-9 off fails it."""
    gp = bench("gpu_paths")
    monkeypatch.setenv("LIIF_CUDA_TENSOR_CORE_KERNEL", "mma")  # forward_path sets it; restored
    runner = gp.Runner("cpu", small=True, repeats=0, profile=False)
    ok, res = gp.forward_path(runner, "generic-fp64")
    assert ok and res["tolerance"] == gp.TOLERANCE["fp64"], res
    query = gp.liif_cuda.query
    monkeypatch.setattr(gp.liif_cuda, "query", lambda *a, **k: query(*a, **k) * (1 + 1e-9))
    ok, res = gp.forward_path(runner, "generic-fp64")
    assert not ok and 1e-10 < res["error_vs_reference"] < 1e-8, res
