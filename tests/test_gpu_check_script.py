"""benchmarks/gpu_check.sh, the script a lent GPU runs, in its CPU dry-run mode: every step runs (the
CUDA calls skipped, no build), so that the script and the programs it calls cannot rot between the
rare GPU sessions."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "600"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(results),
                           "--dry-run"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(results))
    # What the device tool brings back: at most 8 files, no folders.
    assert len(files) <= 8 and all((results / f).is_file() for f in files), files
    summary = (results / "summary.txt").read_text()
    paths = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_paths.py"),
                            "--list"], capture_output=True, text=True, check=True).stdout.split()
    for step in [f"path {p}" for p in paths] + ["benchmark", "cuda tests"]:
        assert any(line.startswith(step + " ") and " ok " in line
                   for line in summary.splitlines()), (step, summary)
    assert "verdict: every step passed" in summary
    lines = [json.loads(line) for line in (results / "paths.jsonl").read_text().splitlines()]
    assert [r["path"] for r in lines] == paths and all(r["ok"] for r in lines)
    bench = json.loads(next(results.glob("gpu_query_*.json")).read_text())
    assert bench["rows"] and not bench["failed_variants"]


def test_gpu_check_runs_every_test_file_with_gpu_cases():
    """A test file with GPU cases (skipped here by conftest's CUDA_SKIP_REASON) that the GPU check
    did not run would run nowhere."""
    script = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read()
    listed = set(re.search(r'CUDA_TESTS="([^"]*)"', script).group(1).replace("\\\n", " ").split())
    tests = os.path.join(ROOT, "tests")
    with_gpu_cases = {f"tests/{name}" for name in os.listdir(tests)
                      if name.startswith("test_") and name.endswith(".py")
                      and re.search(r"^from conftest import .*CUDA_SKIP_REASON",
                                    open(os.path.join(tests, name)).read(), re.MULTILINE)}
    assert with_gpu_cases and with_gpu_cases <= listed, with_gpu_cases - listed


def test_usage_error_without_results_dir():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
