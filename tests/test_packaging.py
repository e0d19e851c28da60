"""The packaging outside the set-up script: the source distribution holds everything the build needs
(a sdist without the headers failed to compile), the version has one source, the licence travels,
and a build without torch says what to do."""

import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a checkout holds that is not the project's (made by the set-up, a build or a GPU run).
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "shared", "runs",
                                     "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
                                     "*.so")


def files_under(folder):
    return {os.path.relpath(os.path.join(d, f), ROOT)
            for d, _, names in os.walk(os.path.join(ROOT, folder)) for f in names
            if "__pycache__" not in d and not f.endswith((".pyc", ".so"))}


def version_in_source():
    text = open(os.path.join(ROOT, "liif_cuda", "__init__.py")).read()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist made from a copy of the checkout (the build writes into its source folder):
    (the names of its members below its top folder, PKG-INFO's text)."""
    tmp = tmp_path_factory.mktemp("sdist")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    proc = subprocess.run([sys.executable, "-c", "from setuptools import build_meta; "
                           "print(build_meta.build_sdist(r'%s'))" % (tmp / "dist")],
                          cwd=source, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = proc.stdout.split()[-1]
    with tarfile.open(tmp / "dist" / name) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
        top = members[0].split("/")[0]
        info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    assert name == f"liif_cuda-{version_in_source()}.tar.gz", name
    return {m.split("/", 1)[1] for m in members}, info


def test_sdist_holds_every_source_of_the_build(sdist):
    members, _ = sdist
    # Every C++ and CUDA file (setuptools alone took the listed .cpp files: no headers, and no CUDA
    # sources where the sdist was made with a CPU build of torch), every file of the package.
    needed = files_under("csrc") | files_under("liif_cuda")
    needed |= {"setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"}
    assert not needed - members, sorted(needed - members)
    assert any(m.endswith(".cuh") for m in members) and "liif_cuda/py.typed" in members
    assert "liif_cuda/training/configs/edsr-baseline-liif.yaml" in members
    # Not the checkout's tests, data or build products.
    assert not [m for m in members if m.startswith(("tests/", "build/", "shared/", ".venv/"))
                or m.endswith((".so", ".pyc"))], sorted(members)


def test_sdist_metadata_version_and_licence(sdist):
    _, info = sdist
    assert re.search(r"^Version: (.+)$", info, re.M).group(1) == version_in_source()
    assert "License-Expression: BSD-3-Clause" in info and "License-File: LICENSE" in info
    licence = open(os.path.join(ROOT, "LICENSE")).read()
    assert "BSD 3-Clause" in licence and "Yinbo Chen" in licence  # the original code's notice


def test_build_without_torch_says_what_to_do():
    """setup.py where torch cannot be imported: a one-line error, not a traceback."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "liif_cuda builds against an installed torch, and there is none: pip install torch, then "
        "pip install --no-build-isolation . (docs/install.md)"), proc.stderr
