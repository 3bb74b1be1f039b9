"""timm integration: its conv classes with run-time 'same' padding and its FX leaf-module registry.

Each function answers from timm only if the user has imported timm (a model cannot hold timm classes
otherwise); it never imports timm on the user's behalf.
"""

from __future__ import annotations

import sys
from types import ModuleType

from torch import nn


def _layers() -> ModuleType | None:
    """``timm.layers`` if timm is imported, else ``None``."""
    if "timm" not in sys.modules:
        return None
    try:
        import timm.layers
    except ImportError:  # a broken install: behave as without timm
        return None
    return timm.layers


def same_padding_conv_types() -> tuple[type[nn.Module], ...]:
    """timm conv classes whose forward pads to 'same' at run time and then runs a plain conv
    (``Conv2dSame``); empty without timm."""
    layers = _layers()
    return () if layers is None else (layers.Conv2dSame,)


def fx_leaf_modules() -> tuple[type[nn.Module], ...]:
    """Module classes timm registers as FX leaves (``register_notrace_module``); empty without timm."""
    layers = _layers()
    if layers is None:
        return ()
    public = getattr(layers, "get_notrace_modules", None)  # timm's public API (older 1.0.x: its registry)
    return tuple(public()) if public is not None else tuple(getattr(layers._fx, "_leaf_modules", ()))


def fx_autowrap_functions() -> tuple:
    """Functions timm registers as FX leaves (``register_notrace_function``); empty without timm."""
    layers = _layers()
    if layers is None:
        return ()
    public = getattr(layers, "get_notrace_functions", None)
    return tuple(public()) if public is not None else tuple(getattr(layers._fx, "_autowrap_functions", ()))


def frozen_batchnorm_types() -> tuple[type[nn.Module], ...]:
    """timm's frozen batch norms (not ``_BatchNorm`` subclasses); empty without timm."""
    layers = _layers()
    return () if layers is None else (layers.norm_act.FrozenBatchNorm2d, layers.norm_act.FrozenBatchNormAct2d)
