"""Where the benchmarks put their results: benchmarks/results/<stem>_<YYYYMMDD>.json (_runN for a
later run of the same day), or a path given with --out; and the machine they ran on."""

import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def new_results_path(stem):
    """benchmarks/results/STEM_DATE.json, or STEM_DATE_runN.json with the first free N when a run of
    the same day is there already: a new run never overwrites committed results."""
    base = os.path.join(ROOT, "benchmarks", "results", f"{stem}_{time.strftime('%Y%m%d')}")
    out, run = base + ".json", 1
    while os.path.exists(out):
        run += 1
        out = f"{base}_run{run}.json"
    return out


def write_results(result, stem, out=None):
    """Writes `result` as JSON to `out`, or to new_results_path(stem), and says where (`out` as
    given, the default path from the checkout's root); returns the path."""
    shown = out
    if out is None:
        out = new_results_path(stem)
        shown = os.path.relpath(out, ROOT)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {shown}")
    return out


def result_header(benchmark, script, argv):
    """What every result starts with: the benchmark, the command that made it, the date."""
    return {
        "benchmark": benchmark,
        "command": "python " + " ".join([os.path.relpath(script, ROOT)] + list(argv)),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def cpu_machine_info():
    """The CPU (model, and the flags that decide bf16 matrix speed), threads and versions."""
    import torch

    import liif_cuda
    cpu, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "liif_cuda": liif_cuda.__version__,
        "build": liif_cuda.build_info(),
    }


def process_status_kib(field):
    """A field of /proc/self/status in KiB (VmRSS: resident set, VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_resident_set():
    """Sets VmHWM to the current resident set, so that the next peak is the call's own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rise_bytes(measured, warm_up=None):
    """The rise of this process's peak resident set over one call of `measured`, in bytes, after one
    call of `warm_up` (default: `measured` itself), so that what a process pays once (library code
    paged in, thread pools, oneDNN's generated kernels) is not counted. Run it in a fresh process
    started by run_memory_probe."""
    (warm_up or measured)()
    reset_peak_resident_set()
    before = process_status_kib("VmRSS")
    measured()
    return (process_status_kib("VmHWM") - before) * 1024


def run_memory_probe(script, *args):
    """Runs `python script *args` in a fresh process and returns the last line it prints (a memory
    probe's result). malloc's mmap threshold is fixed there: left dynamic, glibc raises it after the
    probe's warm-up call frees its large buffers, and the measured call then reuses the heap those
    buffers left behind, unseen by the peak resident set."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run([sys.executable, os.path.abspath(script), *map(str, args)],
                          capture_output=True, text=True, check=True, env=env)
    return done.stdout.strip().splitlines()[-1]
