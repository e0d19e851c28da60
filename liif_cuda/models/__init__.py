"""Published LIIF models: EDSR-baseline and RDN encoders, the MLP, and the LIIF model."""

from .encoders import RDN, EDSRBaseline
from .liif import LIIF, MLP, NORMALISATIONS

__all__ = ["EDSRBaseline", "RDN", "MLP", "LIIF", "NORMALISATIONS"]
