"""orepa_convert: OREPA (Online Convolutional Re-parameterization) for any PyTorch CNN."""

from .block import OREPAConv
from .config import BRANCHES, OREPAConfig

__version__ = "0.1.0"

__all__ = ["BRANCHES", "OREPAConfig", "OREPAConv", "__version__"]
