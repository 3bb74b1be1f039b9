"""orepa_convert: OREPA (Online Convolutional Re-parameterization) for any PyTorch CNN.

``convert_to_orepa(model)`` before training, ``fold_orepa(model)`` before export.
"""

from .block import OREPAConv
from .config import BRANCHES, OREPAConfig
from .convert import convert_to_orepa, inspect_model
from .errors import OREPAError, OREPALayoutError, OREPAStateError
from .fold import fold_orepa
from .registry import register_batchnorm_type, register_conv_type
from .report import ConversionReport, FoldReport, Status
from .state import (
    load_state_dict,
    orepa_state,
    restore,
    restore_from_orepa_state,
    save,
    state_from_layout,
)
from .surgery import is_converted

__version__ = "0.2.0"

__all__ = [
    "BRANCHES",
    "ConversionReport",
    "FoldReport",
    "OREPAConfig",
    "OREPAConv",
    "OREPAStateError",
    "Status",
    "__version__",
    "convert_to_orepa",
    "fold_orepa",
    "inspect_model",
    "load_state_dict",
    "orepa_state",
    "restore",
    "restore_from_orepa_state",
    "save",
    "state_from_layout",
    "is_converted",
    "register_batchnorm_type",
    "register_conv_type",
    "OREPAError",
    "OREPALayoutError",
]
