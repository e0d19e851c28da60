"""liif_cuda: the LIIF query (Local Implicit Image Function, CVPR 2021) as one fused PyTorch operator."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C
from . import _registration  # noqa: F401  (fake and autograd kernels of liif_cuda::query)
from ._mlp import mlp_parameters
from ._query import query

__version__ = "0.1.0"


def build_info():
    """How the extension was built: {'cuda': bool, 'cuda_archs': str}."""
    return dict(_C.build_info())


__all__ = ["query", "mlp_parameters", "build_info", "__version__"]
