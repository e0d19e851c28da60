"""benchmarks/gpu_check.sh, the script a lent GPU runs, in its CPU dry-run mode: every step runs (the
CUDA calls skipped, no build), so that the script and the programs it calls cannot rot between the
rare GPU sessions."""

import json
import os
import re
import shutil
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
    assert "issue 14 targets, 16x12x2 on cpu" in summary  # informational: no peak known, not met
    lines = [json.loads(line) for line in (results / "paths.jsonl").read_text().splitlines()]
    assert [r["path"] for r in lines] == paths and all(r["ok"] for r in lines)
    bench = json.loads(next(results.glob("gpu_query_*.json")).read_text())
    assert bench["rows"] and not bench["failed_variants"]
    assert "probe-bf16-wgmma_ws-no-weight-loads" in bench["rows"][0]["median_s"]  # --probes
    assert bench["rows"][0]["same_bits_as_unstaged"] == {"fused-bf16-mma16-staged": True,
                                                         "fused-bf16-wgmma-staged": True,
                                                         "fused-bf16-wgmma_mc-staged": True}


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


FAKE_PYTHON = """#!{python}
# Stands in for Python in gpu_check.sh's dry run: the path FAKE_HANG_PATH hangs, the path
# FAKE_KILLED_PATH is killed at once (as by the out-of-memory killer), and the test file
# FAKE_CRASH_TEST crashes its process (SIGSEGV); every other path, the benchmark and the tests pass
# at once; the tests print the kernels they were told hung.
import os, signal, sys, time
args = sys.argv[1:]
if "benchmarks/gpu_paths.py" in args:
    rest = args[args.index("benchmarks/gpu_paths.py") + 1:]
    if rest[0] == "--list":
        print("bf16 bf16-wgmma_ws fp16-wgmma_ws bf16-wgmma")
    elif rest[0] == os.environ.get("FAKE_HANG_PATH"):
        time.sleep(60)
    elif rest[0] == os.environ.get("FAKE_KILLED_PATH"):
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        print(rest[0], "ok")
elif "benchmarks/bench_gpu.py" in args:
    print("variants:", args[args.index("--variants") + 1])
elif "pytest" in args:
    if os.environ.get("FAKE_CRASH_TEST") and args[-1].endswith(os.environ["FAKE_CRASH_TEST"]):
        os.kill(os.getpid(), signal.SIGSEGV)
    print("hung kernels:", repr(os.environ.get("LIIF_GPU_CHECK_HUNG_KERNELS")))
else:
    os.execv(sys.executable, [sys.executable] + args)
"""


def run_dry_with_fake_python(tmp_path, **env):
    """gpu_check.sh --dry-run with FAKE_PYTHON as its Python: (process, results folder)."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    results = tmp_path / "results"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(results),
                           "--dry-run"], env={**os.environ, "PYTHON": str(python), **env},
                          capture_output=True, text=True, timeout=300)
    return proc, results


def test_a_hung_kernel_is_not_run_again(tmp_path):
    """A kernel whose path times out (a hang on the GPU) costs one path's limit: its other paths are
    skipped, the benchmark leaves it out and the CUDA tests are told to skip it."""
    proc, results = run_dry_with_fake_python(tmp_path, FAKE_HANG_PATH="bf16-wgmma_ws",
                                             GPU_CHECK_PATH_LIMIT_S="3")
    summary = (results / "summary.txt").read_text()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = summary.splitlines()

    def line(step):
        return next(x for x in lines if x.startswith(step + " "))

    assert "TIMEOUT" in line("path bf16-wgmma_ws")
    assert "skipped (its kernel timed out" in line("path fp16-wgmma_ws")
    assert " ok " in line("path bf16") and " ok " in line("path bf16-wgmma")
    assert "variants: fused-fp32,fused-bf16,fused-bf16-wgmma," in (results / "bench.log").read_text()
    assert "hung kernels: 'wgmma_ws'" in (results / "pytest.log").read_text()
    assert "verdict: failed: path bf16-wgmma_ws (" in summary


def test_a_killed_path_is_not_a_hang(tmp_path):
    """A path killed before its limit (exit 137: the out-of-memory killer, say) fails as killed,
    and its kernel's other paths, the benchmark and the tests still run it: only a timeout marks a
    kernel hung."""
    proc, results = run_dry_with_fake_python(tmp_path, FAKE_KILLED_PATH="bf16-wgmma_ws",
                                             GPU_CHECK_PATH_LIMIT_S="30")
    summary = (results / "summary.txt").read_text()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = summary.splitlines()
    assert "KILLED (exit 137: out of memory?)" in next(
        x for x in lines if x.startswith("path bf16-wgmma_ws "))
    assert " ok " in next(x for x in lines if x.startswith("path fp16-wgmma_ws "))
    assert "hung kernels" not in summary
    assert "hung kernels: ''" in (results / "pytest.log").read_text()


def test_a_crashed_test_file_loses_only_its_own_cases(tmp_path):
    """Each CUDA test file runs in a process of its own: one that crashes fails its step, with its
    native stack in pytest.log (where a C compiler built the crash handler), and the other files
    still run."""
    proc, results = run_dry_with_fake_python(tmp_path, FAKE_CRASH_TEST="test_query_saved_map.py")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (results / "summary.txt").read_text()
    steps = [x for x in summary.splitlines() if x.startswith("cuda tests ")]
    script = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read()
    files = re.search(r'CUDA_TESTS="([^"]*)"', script).group(1).replace("\\\n", " ").split()
    assert len(steps) == len(files), steps
    for step, name in zip(steps, files):
        crashed = name.endswith("test_query_saved_map.py")
        assert step.startswith(f"cuda tests {os.path.basename(name)[:-3]} ")
        assert ("FAIL (exit 139)" in step) == crashed and (" ok " in step) != crashed, step
    assert "verdict: failed: cuda tests test_query_saved_map (" in summary
    log = (results / "pytest.log").read_text()
    if shutil.which("gcc") and shutil.which("addr2line"):
        assert log.count("== native backtrace (SIGSEGV)") == 1, log[-3000:]
        assert "== end of native backtrace" in log and log.count("== native frames resolved") == 1
        # the unnamed frames (+0x...) resolved, each once
        resolved = log.split("== native frames resolved")[1]
        assert "(+0x" in resolved and " -> " in resolved, resolved[:2000]


def test_a_failed_path_says_where_its_wrong_queries_are():
    """gpu_paths.where_wrong, which a failed forward path prints: the wrong queries located by warp
    of the tensor-core kernels' tiles (32 queries, 4 per warp), tile buffer and channel."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from gpu_paths import where_wrong
    finally:
        sys.path.pop(0)
    expected = torch.randn(2, 96, 3, generator=torch.Generator().manual_seed(0))
    assert where_wrong(expected.clone(), expected, 1e-3) == {"wrong_queries": 0}
    out = expected.clone().flatten(0, 1)
    # Warp 5's queries (20..23 of each tile) of odd tiles wrong in channel 1, as a layout or
    # buffer mistake would make them; one NaN in query 0 (tile 0, warp 0, channel 2).
    for tile in (1, 3, 5):
        out[tile * 32 + 20: tile * 32 + 24, 1] += 1.0
    out[0, 2] = float("nan")
    found = where_wrong(out.view(2, 96, 3), expected, 1e-3)
    assert found == {"wrong_queries": 13, "of_queries": 192, "first_wrong_query": 0,
                     "first_wrong_tile": 0, "wrong_by_warp": "1,0,0,0,0,12,0,0",
                     "wrong_by_channel": "0,12,1", "wrong_are_zero": False}
    # The persistent kernel with 2 blocks: tiles 0, 1 in buffer 0, tiles 2, 3 in buffer 1, ...
    found = where_wrong(out.view(2, 96, 3), expected, 1e-3, persistent_blocks=2)
    assert found["wrong_by_tile_buffer"] == "9,4"  # query 0, tiles 1 and 5 in 0; tile 3 in 1
    zeros = expected.clone()
    zeros[1, 64:] = 0  # queries 160..191, the last tile
    found = where_wrong(zeros, expected, 1e-3)
    assert found["first_wrong_tile"] == 5 and found["wrong_are_zero"] and found["wrong_queries"] == 32


def test_kernel_ran_reads_the_last_template_argument():
    """gpu_paths.kernel_ran, a forward path's check of the kernel that ran: its function and its
    last template argument (an int, or a bool: the multicast kernel's two schedules share one
    function), in a profile's demangled names or mangled ones."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from gpu_paths import kernel_ran
    finally:
        sys.path.pop(0)
    params = "(liif::cuda::QueryKernelParams<float>)"
    demangled = [f"void liif::cuda::liif_query_wgmma_mc_kernel<(liif::cuda::Precision)2, true>{params}",
                 f"void liif::cuda::liif_query_mma_kernel<(liif::cuda::Precision)2, 32>{params}"]
    mangled = ["_ZN4liif4cuda26liif_query_wgmma_mc_kernelILNS0_9PrecisionE2ELb1EEEvNS0_17QueryKernel"
               "ParamsIfEE",
               "_ZN4liif4cuda21liif_query_mma_kernelILNS0_9PrecisionE2ELi32EEEvNS0_17QueryKernelParam"
               "sIfEE"]
    for names in (demangled, mangled):
        assert kernel_ran("liif_query_wgmma_mc_kernel@true", names)
        assert not kernel_ran("liif_query_wgmma_mc_kernel@false", names)
        assert kernel_ran("liif_query_mma_kernel@32", names)
        assert not kernel_ran("liif_query_mma_kernel@64", names)
        assert not kernel_ran("liif_query_wgmma_kernel", names)


@pytest.mark.parametrize("path,spoil", [
    ("bf16", "none"), ("bf16", "above-model-bound"), ("bf16", "above-tolerance"), ("bf16", "nan"),
    ("generic-fp32", "none"), ("generic-fp32", "above-tolerance"), ("generic-fp32", "nan")])
def test_a_forward_path_fails_outside_its_bounds(monkeypatch, path, spoil):
    """gpu_paths.forward_path's verdict, here on the CPU: a path is right within its precision's
    tolerance and, for a reduced precision (bf16), twice its rounding model's error; failed, with
    the wrong queries located, for an output further from the reference than the model allows
    (though within the tolerance), beyond the tolerance (3x, within the 10x that where_wrong
    counts as wrong), or with a NaN. Its tolerances are the tests' own (conftest.py)."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_paths
    finally:
        sys.path.pop(0)
    from conftest import PRECISION_TOLERANCE, TOLERANCE
    assert gpu_paths.TOLERANCE == {"fp32": TOLERANCE[torch.float32],
                                   "fp64": TOLERANCE[torch.float64], **PRECISION_TOLERANCE}
    # forward_path sets the kernel's environment variable: restored after the test by monkeypatch.
    monkeypatch.setenv("LIIF_CUDA_TENSOR_CORE_KERNEL", "mma")
    runner = gpu_paths.Runner("cpu", small=True, repeats=0, profile=False)
    ok, res = gpu_paths.forward_path(runner, path)
    assert ok and res["error_vs_reference"] <= res.get("bound", res["tolerance"]), res
    assert res.get("bound", 0) < res["tolerance"], res
    query = gpu_paths.liif_cuda.query
    scale = {"above-model-bound": (res.get("bound", 0) + res["tolerance"]) / 2,
             "above-tolerance": 3 * res["tolerance"]}.get(spoil, 0.0)

    def spoilt(*args, **kwargs):
        out = query(*args, **kwargs)
        g = torch.Generator().manual_seed(0)
        out = out + scale * out.norm() / out.numel() ** 0.5 * torch.randn(out.shape, generator=g)
        if spoil == "nan":
            out[0, 0, 0] = float("nan")
        return out
    monkeypatch.setattr(gpu_paths.liif_cuda, "query", spoilt)
    ok, res = gpu_paths.forward_path(runner, path)
    assert ok == (spoil == "none"), res
    if spoil == "above-model-bound":
        assert res["bound"] < res["error_vs_reference"] < res["tolerance"], res
    if spoil == "nan":
        assert res["nan"] == 1 and res["wrong_queries"] >= 1, res


def test_a_results_dir_that_is_an_option_or_unusable_stops_at_once(tmp_path):
    """`gpu_check.sh --dry-run` (RESULTS_DIR forgotten) and a RESULTS_DIR that cannot be made end
    with exit 2 before any step, not a check whose logs would go to /."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    proc = subprocess.run(["bash", script, "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr, proc.stdout + proc.stderr
    (tmp_path / "a file").write_text("")
    proc = subprocess.run(["bash", script, str(tmp_path / "a file" / "results"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "a file" in proc.stderr, proc.stdout + proc.stderr
    assert proc.stdout == ""


# Stands in for Python on a "GPU" machine (gpu_check.sh without --dry-run): the device is sm_90, the
# build fails for the architectures in FAKE_FAILING_ARCHS, gpu_paths.py --list fails with
# FAKE_LIST_FAILS; everything else passes at once.
FAKE_GPU_PYTHON = """#!{python}
import os, sys
args = sys.argv[1:]
if args[:1] == ["-c"] and "get_device_capability" in args[1]:
    print("9.0")
elif args[:1] == ["-c"] and "get_device_name" in args[1]:
    print("Fake_GPU")
elif args[:3] == ["-m", "pip", "install"]:
    arch = os.environ["TORCH_CUDA_ARCH_LIST"]
    print("building for", arch, "LIIF_WERROR", os.environ.get("LIIF_WERROR"))
    if arch in os.environ.get("FAKE_FAILING_ARCHS", "").split():
        sys.exit("error: the build failed")
    print("ptxas info    : Used 64 registers")
elif "benchmarks/gpu_paths.py" in args:
    rest = args[args.index("benchmarks/gpu_paths.py") + 1:]
    if rest[0] == "--list":
        if os.environ.get("FAKE_LIST_FAILS"):
            sys.exit("ImportError: liif_cuda/_C.so: undefined symbol")
        print("bf16 bf16-wgmma bf16-wgmma_mc bf16-wgmma_pp")
    else:
        print(rest[0], "ok")
elif "benchmarks/bench_gpu.py" in args:
    print("benchmark arguments:", args[1:])
elif "benchmarks/profile_train_step.py" in args:
    print("training profile arguments:", args[1:])
elif "pytest" in args:
    print("1 passed in 0.1s")
elif args[:1] == ["-c"]:
    print("liif_cuda (fake)")
else:
    os.execv(sys.executable, [sys.executable] + args)
"""


def run_gpu_mode(tmp_path, **env):
    """gpu_check.sh in its GPU mode with FAKE_GPU_PYTHON and fake compute-sanitizer and ncu (each
    passes, printing its arguments)."""
    python = tmp_path / "python"
    python.write_text(FAKE_GPU_PYTHON.format(python=sys.executable))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("compute-sanitizer", "ncu", "nvidia-smi"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*"\n')
    for f in [python, *bin_dir.iterdir()]:
        f.chmod(0o755)
    results = tmp_path / "results"
    full_env = {**os.environ, "PYTHON": str(python), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "LIIF_SHARED_DIR": "", **env}
    # RESULTS_DIR relative to the directory it is run from (not the checkout)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "results"],
                          cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=300)
    return proc, (results / "summary.txt").read_text(), results


def summary_line(summary, step):
    return next((x for x in summary.splitlines() if x.startswith(step + " ")), None)


def test_gpu_mode_runs_the_optional_steps_within_the_budget(tmp_path):
    """With 100 s of budget, memcheck (60 s limit), ncu (60 s), racecheck (50 s, one step per
    kernel) and the training profile (90 s) run (the fake tools take no time), the multicast
    kernel's two schedules first, the profile after the default kernel's ncu; the Set5 folder of
    the shared data (its path with a space) reaches the benchmark and the profile intact; a
    relative RESULTS_DIR is taken from where the script is run."""
    shared = tmp_path / "shared data"
    (shared / "data" / "Set5").mkdir(parents=True)
    proc, summary, results = run_gpu_mode(tmp_path, GPU_CHECK_BUDGET_S="100",
                                          LIIF_SHARED_DIR=str(shared))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "building for 9.0a LIIF_WERROR 0" in (results / "build.log").read_text()
    assert " ok " in summary_line(summary, "build")
    steps = ("path bf16", "path bf16-wgmma", "path bf16-wgmma_mc", "path bf16-wgmma_pp",
             "benchmark", "memcheck", "racecheck bf16-wgmma_mc", "racecheck bf16-wgmma_pp",
             "ncu bf16-wgmma_mc", "training profile", "ncu bf16-wgmma_pp",
             "racecheck bf16-wgmma_ws", "ncu bf16-wgmma")
    for step in steps:
        assert " ok " in summary_line(summary, step), (step, summary)
    lines = summary.splitlines()
    at = {step: next(i for i, x in enumerate(lines) if x.startswith(step + " ")) for step in steps}
    assert at["ncu bf16-wgmma_mc"] < at["training profile"] < at["ncu bf16-wgmma_pp"], summary
    order = [x.split()[0] + " " + x.split()[1] for x in summary.splitlines()
             if x.startswith(("racecheck ", "ncu "))]
    assert order[:4] == ["racecheck bf16-wgmma_mc", "racecheck bf16-wgmma_pp", "ncu bf16-wgmma_mc",
                         "ncu bf16-wgmma_pp"], summary
    assert len([x for x in summary.splitlines() if x.startswith("cuda tests ")]) == 6, summary
    assert summary_line(summary, "racecheck hazards") is None, summary  # only after a failure
    bench_log = (results / "bench.log").read_text()
    assert f"'--train-data', '{shared}/data/Set5'" in bench_log
    assert f"training profile arguments: ['--data', '{shared}/data/Set5', '--device', 'cuda'" \
        in bench_log
    assert "verdict: every step passed" in summary
    # What the device tool brings back: at most 8 files, no folders (the profile's JSON stays out).
    assert len(os.listdir(results)) <= 8 and all(f.is_file() for f in results.iterdir())


@pytest.mark.parametrize("failing", ["9.0a", "9.0a 9.0"])
def test_gpu_mode_build_failure(tmp_path, failing):
    """A failed 9.0a build is retried as 9.0 (the check then runs, failed: build); when that fails
    too, nothing else runs and the check fails."""
    proc, summary, results = run_gpu_mode(tmp_path, FAKE_FAILING_ARCHS=failing,
                                          GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL (exit 1)" in summary_line(summary, "build")
    retried = summary_line(summary, "build 9.0")
    if failing == "9.0a":
        assert " ok " in retried and " ok " in summary_line(summary, "path bf16"), summary
        assert "verdict: failed: build (" in summary
        # Without budget the optional steps are skipped, each saying what it would have needed.
        for step, limit in (("memcheck", 60), ("racecheck bf16-wgmma_mc", 50),
                            ("ncu bf16-wgmma_mc", 60)):
            assert f"needs {limit})" in summary_line(summary, step), (step, summary)
    else:
        assert "FAIL" in retried and summary_line(summary, "path bf16") is None, summary
        assert "verdict: the build failed" in summary


def test_a_path_list_that_fails_fails_the_check(tmp_path):
    """gpu_paths.py --list failing (the extension does not import) fails the check: it must not pass
    with no path checked."""
    proc, summary, results = run_gpu_mode(tmp_path, FAKE_LIST_FAILS="1", GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" in summary_line(summary, "path list"), summary
    assert "undefined symbol" in (results / "paths.log").read_text()
    assert "verdict: failed: path list (" in summary
