"""Evaluation that reproduces LIIF's published tables: protocols, metrics, MATLAB bicubic."""

from .evaluate import evaluate, format_table
from .matlab_resize import imresize
from .metrics import psnr_rgb, psnr_y, ssim_mmedit
from .protocols import PROTOCOLS

__all__ = ["evaluate", "format_table", "imresize", "psnr_rgb", "psnr_y", "ssim_mmedit", "PROTOCOLS"]
