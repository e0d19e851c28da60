"""benchmarks/gpu_targets.py, which ends a GPU check with issue 14's targets met or not: on the
results of GPU runs 3 and 4 (committed) and on variations of them."""

import copy
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_targets  # noqa: E402

RUN4 = os.path.join(ROOT, "benchmarks", "results", "gpu_query_NVIDIA_H200_20261126_run4.json")


@pytest.fixture
def run4():
    with open(RUN4) as f:
        return json.load(f)


def frame(results):
    return gpu_targets.find_row(results, "480x270x4")


def line(lines, start):
    return next(x.strip() for x in lines if x.strip().startswith(start))


def test_run4_as_docs_gpu_md_states_it(run4, capsys):
    """Run 4: fp32 3.3x met; bf16 and fp16 about 18 ms, 17x, below both speed targets; fp32's 318
    MiB above half the reference's 510."""
    assert gpu_targets.main([RUN4]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "issue 14 targets, 480x270x4 on NVIDIA H200:"
    assert line(lines, "bf16:").endswith("NOT MET") and "best fused-bf16 18.21 ms" in line(lines, "bf16:")
    assert "18.5% of the dense peak" in line(lines, "bf16:") and "16.82x" in line(lines, "bf16:")
    assert line(lines, "fp16:").endswith("NOT MET")
    assert line(lines, "fp32:") == "fp32: fused-fp32 3.31x the reference (target 1.5x): met"
    assert line(lines, "fused-fp32 ") == "fused-fp32 318 MiB (0.62): NOT MET"
    assert line(lines, "fused-bf16 ") == "fused-bf16 165 MiB (0.32): met"
    assert lines[-1] == "  targets: not all met"


def make_fast(results, variant, seconds, peak_ratio=0.3):
    """Adds a variant to the 1080p row as fast as `seconds`, accurate, within the memory target."""
    row = frame(results)
    ref = row["median_s"]["reference"]
    peaks = results["machine"]["dense_peak_tflops"]
    precision = gpu_targets.precision_of(variant)
    row["median_s"][variant] = seconds
    row["speedup_vs_reference"][variant] = ref / seconds
    row["fraction_of_dense_peak"][variant] = row["mlp_flops"] / seconds / 1e12 / peaks[precision]
    row["relative_error"][variant] = gpu_targets.ERROR_BOUND[precision] / 2
    row["nan_count"][variant] = 0
    row["memory_ratio"][variant] = peak_ratio
    row["peak_memory_bytes"][variant] = peak_ratio * row["peak_memory_bytes"]["reference"]


def test_all_met_when_a_kernel_reaches_them(run4):
    results = copy.deepcopy(run4)
    make_fast(results, "fused-bf16-wgmma_ws", 0.0065)
    make_fast(results, "fused-fp16-wgmma_ws", 0.0062)
    row = frame(results)
    lines, met = gpu_targets.report(results, "480x270x4")
    assert not met  # fp32's memory still above the target
    row["memory_ratio"]["fused-fp32"] = 0.36
    lines, met = gpu_targets.report(results, "480x270x4")
    assert met and lines[-1] == "  targets: all met", lines
    assert "best fused-bf16-wgmma_ws 6.50 ms, 51.8% of the dense peak" in line(lines, "bf16:")


@pytest.mark.parametrize("spoil", ["error", "nan", "slow", "ratio-only", "memory"])
def test_a_fast_variant_counts_only_when_right(run4, spoil):
    """Too inaccurate, a NaN, too slow, fast enough against the reference but not against the peak,
    or too much memory: each keeps a target unmet."""
    results = copy.deepcopy(run4)
    make_fast(results, "fused-bf16-wgmma_ws", 0.0065)
    make_fast(results, "fused-fp16-wgmma_ws", 0.0062)
    row = frame(results)
    row["memory_ratio"]["fused-fp32"] = 0.36
    v = "fused-bf16-wgmma_ws"
    if spoil == "error":
        row["relative_error"][v] = 5e-3
    elif spoil == "nan":
        row["nan_count"][v] = 1
    elif spoil == "slow":
        make_fast(results, v, 0.0080)   # 42% of the peak, 38x
    elif spoil == "ratio-only":
        row["fraction_of_dense_peak"][v] = 0.40
    elif spoil == "memory":
        row["memory_ratio"][v] = 0.51
    lines, met = gpu_targets.report(results, "480x270x4")
    assert not met and lines[-1] == "  targets: not all met"


def test_unknown_card_and_missing_case(run4, tmp_path, capsys):
    results = copy.deepcopy(run4)
    make_fast(results, "fused-bf16-wgmma_ws", 0.0065)
    frame(results)["fraction_of_dense_peak"] = None
    lines, met = gpu_targets.report(results, "480x270x4")
    assert not met and "no dense peak known for this card (target 45%)" in line(lines, "bf16:")
    assert gpu_targets.report(results, "16x12x2") is None
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert gpu_targets.main([str(path), "--case", "16x12x2"]) == 2
    assert "has no case 16x12x2" in capsys.readouterr().err
