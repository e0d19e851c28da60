"""`python -m liif_cuda ...`: the liif-cuda command line (for torchrun -m liif_cuda upscale ...)."""

import sys

from .cli import main

sys.exit(main())
