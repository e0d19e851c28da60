"""liif_cuda: LIIF (Local Implicit Image Function, CVPR 2021) with its query as one fused PyTorch
operator, the published models and checkpoints, and an upscaler."""

import os

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C
except ImportError as _error:
    _here = os.path.dirname(os.path.abspath(__file__))
    if any(name.startswith("_C.") for name in os.listdir(_here)):
        # Built, but it does not load (another torch than it was built against, say).
        raise ImportError(f"liif_cuda's compiled extension in {_here} does not load ({_error}); "
                          f"rebuild it against the installed torch: bash tools/setup_env.sh in a "
                          f"checkout, else pip install --no-build-isolation --force-reinstall "
                          f"--no-deps SOURCE (the checkout or the sdist; docs/install.md)") from None
    # Most often the checkout's source folder, which Python finds first from the checkout's root
    # (python -m, torchrun -m, a script there): it has no compiled _C. (Python's own message here,
    # a "partially initialized module" and a "circular import", would only mislead.)
    raise ImportError(
        f"liif_cuda's compiled extension (_C) is not in {_here}: in a checkout's root Python "
        f"imports the source folder instead of the installed package; run from another folder or "
        f"with `python -P` (torchrun: from another folder). Otherwise build and install it: bash "
        f"tools/setup_env.sh (docs/install.md)") from None
from . import _registration  # noqa: F401  (fake and autograd kernels of liif_cuda::query)
from ._mlp import mlp_parameters
from ._query import PRECISIONS, query

__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built, and what it does on this machine: {'cuda': bool (CUDA kernels
    compiled), 'cuda_archs': str (their targets), 'cuda_wgmma': bool (H100 / H200 GPUs run this
    build's sm_90a code: the multicast wgmma kernel for bf16 and fp16 by default), 'cpu_bf16': bool
    (precision "bf16" runs bf16 kernels on this CPU: it has AVX512-BF16 and LIIF_CUDA_CPU_BF16 is
    not "0"; otherwise float32)}."""
    return dict(_C.build_info())


from . import models  # noqa: E402
from .checkpoints import CheckpointError  # noqa: E402
from .load import load_model  # noqa: E402
from .patch import patch  # noqa: E402
from .upscaling import upscale  # noqa: E402

__all__ = ["query", "PRECISIONS", "mlp_parameters", "build_info", "models", "load_model", "CheckpointError",
           "patch", "upscale", "__version__"]
