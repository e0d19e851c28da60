"""benchmarks/results_file.write_results: a second run of a benchmark on the same day gets a file of
its own (_run2, _run3) instead of overwriting the committed results of the first."""

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_file  # noqa: E402


def test_same_day_runs_never_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(results_file, "ROOT", str(tmp_path / "checkout"))
    day = time.strftime("%Y%m%d")
    paths = [results_file.write_results({"run": i}, "bench_x") for i in (1, 2, 3)]
    folder = tmp_path / "checkout" / "benchmarks" / "results"
    assert paths == [str(folder / f"bench_x_{day}{tail}.json") for tail in ("", "_run2", "_run3")]
    assert [json.loads(open(p).read())["run"] for p in paths] == [1, 2, 3]
    explicit = str(tmp_path / "chosen.json")  # an explicit --out is the caller's choice
    assert results_file.write_results({"run": 4}, "bench_x", explicit) == explicit
    assert results_file.write_results({"run": 5}, "bench_x", explicit) == explicit
    assert json.loads(open(explicit).read())["run"] == 5
    # Where it wrote: the default from the checkout's root, an --out as given (not ../chosen.json).
    assert capsys.readouterr().out.splitlines() == (
        [f"wrote benchmarks/results/bench_x_{day}{tail}.json" for tail in ("", "_run2", "_run3")]
        + [f"wrote {explicit}"] * 2)


PROBE = """import json, sys
sys.path.insert(0, {benchmarks!r})
import results_file
MIB = 2 ** 20
print("a line before the result")
print(json.dumps({{
    "alone": results_file.peak_rise_bytes(lambda: len(b"x" * (64 * MIB))),
    "after_larger_warm_up": results_file.peak_rise_bytes(
        lambda: len(b"x" * (64 * MIB)), warm_up=lambda: len(b"x" * (256 * MIB))),
    "nothing": results_file.peak_rise_bytes(lambda: None, warm_up=lambda: len(b"x" * (256 * MIB))),
}}))
"""


def test_peak_rise_is_the_measured_calls_own(tmp_path):
    """run_memory_probe returns the probe's last line; peak_rise_bytes counts a call's transient
    64 MiB buffer (freed before it returns) and not the larger peak of the warm-up before it."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(benchmarks=os.path.join(ROOT, "benchmarks")))
    rise = json.loads(results_file.run_memory_probe(str(script)))
    mib = 2 ** 20
    # At least 63 MiB: the kernel's resident-set counters lag by some pages (63.93 MiB seen), and
    # KiB read as 1000 bytes would give at most 62.5 MiB.
    assert 63 * mib < rise["alone"] < 100 * mib, rise
    assert 63 * mib < rise["after_larger_warm_up"] < 100 * mib, rise
    assert rise["nothing"] < 16 * mib, rise
