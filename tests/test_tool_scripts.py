"""The set-up scripts (tools/*.sh, .ci/run), each run on a copy of itself in a checkout-like folder
whose name has a space, from another directory, with fake commands in place of Python, pip, CMake and
the other scripts: their exit status on failure, what they tell the user, their paths and quoting.
Nothing is downloaded or built; each runs in well under a second."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import ROOT


def executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def checkout(tmp_path, *scripts):
    """A folder shaped like the checkout (its name with a space) holding copies of scripts."""
    root = tmp_path / "my checkout"
    for script in scripts:
        (root / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, script), root / script)
    return root


def run(tmp_path, root, script, *args, env=None, path_dirs=()):
    """Runs bash root/script from tmp_path/elsewhere (not the checkout)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = os.pathsep.join([str(d) for d in path_dirs] + [full_env["PATH"]])
    return subprocess.run(["bash", str(root / script), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# tools/setup_env.sh

# The Python that creates .venv: copies the fake venv Python in.
FAKE_SYSTEM_PYTHON = """#!{python}
import os, shutil, sys
log = open(os.environ["FAKE_LOG"], "a")
print("system-python", *sys.argv[1:], file=log)
assert sys.argv[1:3] == ["-m", "venv"], sys.argv
venv = sys.argv[-1]
os.makedirs(os.path.join(venv, "bin"), exist_ok=True)
shutil.copy(os.environ["FAKE_VENV_PYTHON"], os.path.join(venv, "bin", "python"))
"""

# .venv/bin/python: like Python 3.10 (no -P); torch is "installed" by writing .venv/torch.
FAKE_VENV_PYTHON = """#!{python}
import os, sys
args = sys.argv[1:]
venv = os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0])))
log = open(os.environ["FAKE_LOG"], "a")
print("venv-python", os.getcwd(), *args, file=log)
torch_file = os.path.join(venv, "torch")
if args and args[0] == "-P":
    sys.exit("Unknown option: -P")
if args == ["--version"]:
    print("Python 3.10.0")
elif args[:3] == ["-m", "pip", "--version"]:
    print("pip 24.0")
elif args[:3] == ["-m", "pip", "install"]:
    if args[-1] == ".":
        print("building, LIIF_CUDA_BUILD=" + os.environ.get("LIIF_CUDA_BUILD", "unset"))
        if os.environ.get("FAKE_BUILD_FAILS"):
            print("error: csrc/query.cpp: no such member 'foo'")
            sys.exit(1)
    elif "--upgrade" not in args:
        if os.environ.get("FAKE_INSTALL_FAILS"):
            print("ERROR: No matching distribution found for " + args[3])
            sys.exit(1)
        open(torch_file, "w").write(args[3])
elif args[0] == "-c" and "import torch" in args[1] and not os.path.exists(torch_file):
    sys.exit("ModuleNotFoundError: No module named 'torch'")
elif args[0] == "-c" and "torch.version.cuda" in args[1]:
    print("cpu" if "+cpu" in open(torch_file).read() else "cuda")
elif args[0] == "-c" and "torch.__version__" in args[1] and "liif_cuda" not in args[1]:
    print(open(torch_file).read())
elif args[0] == "-c" and "build_info(); print(int" in args[1]:
    print("UserWarning: Failed to initialize NumPy", file=sys.stderr)  # as torch may warn
    print("0 -")
elif args[0] == "-c" and "liif_cuda" in args[1]:
    print("liif_cuda 0.0 torch fake {{}}")
else:
    sys.exit("fake venv python: unexpected " + repr(args))
"""


@pytest.fixture
def setup_env(tmp_path):
    root = checkout(tmp_path, "tools/setup_env.sh")
    fakes = tmp_path / "fakes"
    system = executable(fakes / "python3", FAKE_SYSTEM_PYTHON.format(python=sys.executable))
    venv_python = executable(fakes / "venv-python", FAKE_VENV_PYTHON.format(python=sys.executable))
    log = tmp_path / "calls.log"
    log.touch()
    env = {"PYTHON": str(system), "FAKE_VENV_PYTHON": str(venv_python), "FAKE_LOG": str(log),
           "LIIF_CUDA_TORCH": "", "LIIF_CUDA_BUILD": "", "TORCH_SPEC": "", "CUDA_HOME": ""}

    def go(**extra):
        proc = run(tmp_path, root, "tools/setup_env.sh", env={**env, **extra})
        calls = log.read_text()
        log.write_text("")
        return proc, calls
    return root, go


def test_setup_env_cpu_from_elsewhere(setup_env):
    """A fresh set-up run from another directory makes .venv in the checkout, passes TORCH_SPEC as
    one requirement, builds with LIIF_CUDA_BUILD=0, and reads the build from the import's stdout
    (its warnings on stderr are not taken for the build)."""
    root, go = setup_env
    proc, calls = go(LIIF_CUDA_TORCH="cpu", TORCH_SPEC="torch >=2.13, <2.14")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / ".venv" / "bin" / "python").exists() and (root / "build" / "setup.log").exists()
    assert (root / ".venv" / "torch").read_text() == "torch >=2.13, <2.14"
    assert "building, LIIF_CUDA_BUILD=0" in (root / "build" / "pip-install.log").read_text()
    assert "liif_cuda built: CPU kernels only (LIIF_CUDA_TORCH=cpu)" in proc.stdout, proc.stdout
    assert "ready: run .venv/bin/liif-cuda --help" in proc.stdout
    assert "install --upgrade pip" in calls


def test_setup_env_rerun_keeps_the_venv_and_its_torch(setup_env):
    """Re-running (LIIF_CUDA_TORCH unset) keeps the CPU torch already in .venv and neither
    recreates .venv nor asks an index for a newer pip."""
    root, go = setup_env
    assert go(LIIF_CUDA_TORCH="cpu")[0].returncode == 0
    proc, calls = go()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "setting up with LIIF_CUDA_TORCH=cpu (torch==2.13.0+cpu)" in proc.stdout, proc.stdout
    assert "system-python" not in calls and "--upgrade" not in calls, calls


def test_setup_env_without_torch_in_venv_defaults_to_cuda(setup_env):
    """A .venv whose torch does not import (a set-up stopped early) is set up with the default."""
    root, go = setup_env
    assert go(LIIF_CUDA_TORCH="cpu", FAKE_INSTALL_FAILS="1")[0].returncode == 1
    proc, calls = go()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "setting up with LIIF_CUDA_TORCH=cuda (torch==2.14.1)" in proc.stdout, proc.stdout


def test_setup_env_makes_a_venv_without_pip_again(setup_env):
    root, go = setup_env
    executable(root / ".venv" / "bin" / "python", "#!/bin/sh\nexit 1\n")  # ensurepip failed
    proc, calls = go(LIIF_CUDA_TORCH="cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "system-python -m venv --clear .venv" in calls


def test_setup_env_rejects_an_unknown_torch(setup_env):
    root, go = setup_env
    proc, calls = go(LIIF_CUDA_TORCH="rocm")
    assert proc.returncode == 2 and "LIIF_CUDA_TORCH must be" in proc.stderr and "'rocm'" in proc.stderr
    assert not (root / ".venv").exists() and calls == ""


@pytest.mark.parametrize("failing,message", [
    ("FAKE_INSTALL_FAILS", "No matching distribution found for torch==2.13.0+cpu"),
    ("FAKE_BUILD_FAILS", "no such member 'foo'")])
def test_setup_env_stops_at_a_failure_and_shows_why(setup_env, failing, message):
    root, go = setup_env
    proc, calls = go(LIIF_CUDA_TORCH="cpu", **{failing: "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "setup_env.sh: error:" in proc.stderr and message in proc.stderr, proc.stderr
    assert "ready: run" not in proc.stdout and "liif_cuda built" not in proc.stdout


# ---------------------------------------------------------------------------------------------
# tools/setup_and_test.sh and .ci/run

RECORD = """#!/usr/bin/env bash
echo "{name} $PWD $*" >> "$FAKE_LOG"
"""


@pytest.fixture
def setup_and_test(tmp_path):
    root = checkout(tmp_path, "tools/setup_and_test.sh", ".ci/run")
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    executable(root / "tools" / "setup_env.sh",
               RECORD.format(name="setup_env") + 'mkdir -p build; exit "${FAKE_SETUP_RC:-0}"\n')
    executable(root / ".venv" / "bin" / "pytest", RECORD.format(name="pytest"))
    executable(root / ".venv" / "bin" / "ninja", RECORD.format(name="ninja"))
    executable(bin_dir / "cmake", RECORD.format(name="cmake") +
               '[ "$1" = -S ] && { mkdir -p build/cmake; echo "CMake Error: no compiler"; '
               'exit "${FAKE_CONFIGURE_RC:-0}"; }\n'
               'exit "${FAKE_BUILD_RC:-0}"\n')
    # As CMake 3.18's ctest (the oldest CMake the project supports): no --test-dir.
    executable(bin_dir / "ctest", RECORD.format(name="ctest") +
               'for a; do [ "$a" = --test-dir ] && { echo "Unknown argument --test-dir"; exit 1; }; done\n'
               'exit "${FAKE_CTEST_RC:-0}"\n')

    def go(script="tools/setup_and_test.sh", **extra):
        log.write_text("")
        proc = run(tmp_path, root, script, env={"FAKE_LOG": str(log), **extra}, path_dirs=[bin_dir])
        return proc, [line.split(" ", 1)[0] for line in log.read_text().splitlines()], log.read_text()
    return root, go


def test_setup_and_test_runs_every_part_in_order(setup_and_test):
    root, go = setup_and_test
    proc, called, calls = go()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert called == ["setup_env", "cmake", "cmake", "ctest", "pytest"], calls
    assert f"ctest {root}/build/cmake " in calls and f"pytest {root} -ra tests" in calls, calls


@pytest.mark.parametrize("failing,ran", [
    ("FAKE_SETUP_RC", ["setup_env"]),
    ("FAKE_CONFIGURE_RC", ["setup_env", "cmake"]),
    ("FAKE_BUILD_RC", ["setup_env", "cmake", "cmake"]),
    ("FAKE_CTEST_RC", ["setup_env", "cmake", "cmake", "ctest"])])
def test_setup_and_test_stops_at_the_first_failure(setup_and_test, failing, ran):
    root, go = setup_and_test
    proc, called, calls = go(**{failing: "3"})
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert called == ran, calls
    if failing == "FAKE_CONFIGURE_RC":
        assert "CMake Error: no compiler" in proc.stdout  # the configure log, shown


@pytest.mark.parametrize("rc", ["0", "3"])
def test_ci_runs_setup_and_test_in_the_checkout(setup_and_test, rc):
    root, go = setup_and_test
    proc, called, calls = go(script=".ci/run", FAKE_SETUP_RC=rc)
    assert proc.returncode == int(rc), proc.stdout + proc.stderr
    assert calls.startswith(f"setup_env {root} "), calls


# ---------------------------------------------------------------------------------------------
# tools/quickstart.sh

FAKE_SETUP_ENV = """#!/usr/bin/env bash
echo "[   1 s] setting up"
echo "  ptxas: Used 64 registers"
echo "[   2 s] ready"
exit "${FAKE_SETUP_RC:-0}"
"""

# Like Python 3.10: no -P.
FAKE_DEMO_PYTHON = """#!{python}
import os, sys
if sys.argv[1] == "-P":
    sys.exit("Unknown option: -P")
print("demo", os.getcwd(), sys.argv[1:])
"""


@pytest.mark.parametrize("rc", [0, 1])
def test_quickstart(tmp_path, rc):
    """The set-up's phase lines without the ptxas report, then the demo with the arguments as given;
    a failed set-up stops it with its status."""
    root = checkout(tmp_path, "tools/quickstart.sh")
    executable(root / "tools" / "setup_env.sh", FAKE_SETUP_ENV)
    executable(root / ".venv" / "bin" / "python", FAKE_DEMO_PYTHON.format(python=sys.executable))
    proc = run(tmp_path, root, "tools/quickstart.sh", "--out", "a b.png",
               env={"FAKE_SETUP_RC": str(rc)})
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert "[   2 s] ready" in proc.stdout and "ptxas" not in proc.stdout
    demo = f"demo {root} ['tools/demo.py', '--out', 'a b.png']"
    assert (demo in proc.stdout) == (rc == 0), proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# tools/stage_shared_data.sh

def shared_data(folder):
    (folder / "data" / "Set5").mkdir(parents=True)
    (folder / "data" / "Set5" / "baby.png").write_text("png")
    (folder / "weights").mkdir()
    (folder / "weights" / "edsr-baseline-liif.pth").write_text("pth")
    return folder


def test_stage_shared_data_from_a_folder_relative_to_the_caller(tmp_path):
    root = checkout(tmp_path, "tools/stage_shared_data.sh")
    shared_data(tmp_path / "elsewhere" / "my data")
    proc = run(tmp_path, root, "tools/stage_shared_data.sh", "my data")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "shared" / "data" / "Set5" / "baby.png").read_text() == "png"
    assert (root / "shared" / "weights" / "edsr-baseline-liif.pth").read_text() == "pth"
    assert "edsr-baseline-liif.pth" in proc.stdout


def test_stage_shared_data_default_is_beside_the_checkout(tmp_path):
    root = checkout(tmp_path, "tools/stage_shared_data.sh")
    shared_data(tmp_path / "shared")
    proc = run(tmp_path, root, "tools/stage_shared_data.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "shared" / "data" / "Set5" / "baby.png").exists()


@pytest.mark.parametrize("spoil", ["no Set5", "no weights", "empty weights", "itself"])
def test_stage_shared_data_refuses_an_incomplete_source(tmp_path, spoil):
    """Nothing is changed (the Set5 staged before is kept) when the source lacks what is staged."""
    root = checkout(tmp_path, "tools/stage_shared_data.sh")
    shared_data(root / "shared")
    source = root / "shared" if spoil == "itself" else shared_data(tmp_path / "source")
    if spoil == "no Set5":
        shutil.rmtree(source / "data" / "Set5")
    elif spoil == "no weights":
        shutil.rmtree(source / "weights")
    elif spoil == "empty weights":
        (source / "weights" / "edsr-baseline-liif.pth").unlink()
    proc = run(tmp_path, root, "tools/stage_shared_data.sh", str(source))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "stage_shared_data.sh: error:" in proc.stderr and str(source) in proc.stderr
    assert (root / "shared" / "data" / "Set5" / "baby.png").exists()


# ---------------------------------------------------------------------------------------------
# tools/rehearse_gpu_build.sh

FAKE_REHEARSAL_PYTHON = """#!{python}
import os, shutil, sys
args = sys.argv[1:]
print("python", os.getcwd(), *args, file=open(os.environ["FAKE_LOG"], "a"))
if args[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(args[2], "bin"))
    shutil.copy(sys.argv[0], os.path.join(args[2], "bin", "python"))
elif args[:3] == ["-m", "pip", "install"] and args[-1] == ".":
    print("arch", os.environ.get("TORCH_CUDA_ARCH_LIST"), "werror", os.environ.get("LIIF_WERROR"),
          "build", os.environ.get("LIIF_CUDA_BUILD"))
    if os.environ.get("FAKE_BUILD_FAILS"):
        sys.exit("error: warning treated as error")
elif args[0] == "-c":
    print("torch 2.11.0 CUDA 13.0")
elif "pytest" in args:
    print("shared", os.environ.get("LIIF_SHARED_DIR"))
    print("1072 passed, 75 skipped in 100.00s")
"""


@pytest.fixture
def rehearsal(tmp_path):
    root = checkout(tmp_path, "tools/rehearse_gpu_build.sh")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(git + ["-C", str(root), "add", "-A"], check=True)
    subprocess.run(git + ["-C", str(root), "commit", "-q", "-m", "fake"], check=True)
    python = executable(tmp_path / "fakes" / "python3",
                        FAKE_REHEARSAL_PYTHON.format(python=sys.executable))
    cuda = tmp_path / "cuda"
    executable(cuda / "bin" / "nvcc", "#!/bin/sh\n")
    log = tmp_path / "calls.log"
    log.touch()
    env = {"PYTHON": str(python), "CUDA_HOME": str(cuda), "FAKE_LOG": str(log), "ARCH": "8.0",
           "LIIF_SHARED_DIR": ""}
    return root, lambda **extra: (run(tmp_path, root, "tools/rehearse_gpu_build.sh",
                                      env={**env, **extra}), log)


def test_rehearsal_builds_the_clone_and_runs_the_quick_tests(rehearsal, tmp_path):
    root, go = rehearsal
    proc, log = go()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    build = (root / "build" / "rehearsal-build.log").read_text()
    assert "arch 8.0 werror 1 build 1" in build, build
    calls = log.read_text()
    assert f"python {root}/build/rehearsal-src -m pip install -v --no-build-isolation" in calls
    assert f"shared {tmp_path}/shared" in (root / "build" / "rehearsal-tests.log").read_text()
    assert proc.stdout.rstrip().endswith("1072 passed, 75 skipped in 100.00s"), proc.stdout


def test_rehearsal_stops_at_a_failed_build(rehearsal):
    root, go = rehearsal
    proc, log = go(FAKE_BUILD_FAILS="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "warning treated as error" in proc.stderr and "rehearsal-build.log" in proc.stderr
    assert "-m pytest" not in log.read_text()


def test_rehearsal_without_cuda_toolkit_installs_nothing(rehearsal, tmp_path):
    root, go = rehearsal
    proc, log = go(CUDA_HOME=str(tmp_path / "no-cuda"))
    assert proc.returncode == 2 and "nvcc" in proc.stderr, proc.stdout + proc.stderr
    assert log.read_text() == ""
