"""timm integration: its conv classes with run-time 'same' padding and its FX leaf-module registry."""

from __future__ import annotations

import functools

from torch import nn


@functools.lru_cache(maxsize=None)
def same_padding_conv_types() -> tuple[type[nn.Module], ...]:
    """timm conv classes whose forward pads to 'same' at run time and then runs a plain conv
    (``Conv2dSame``); empty without timm."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:
        return ()
    return (Conv2dSame,)


def fx_leaf_modules() -> tuple[type[nn.Module], ...]:
    """Module classes timm registers as FX leaves (``register_notrace_module``); empty without timm."""
    try:
        from timm.layers import _fx
    except ImportError:
        return ()
    return tuple(getattr(_fx, "_leaf_modules", ()))


def fx_autowrap_functions() -> tuple:
    """Functions timm registers as FX leaves (``register_notrace_function``); empty without timm."""
    try:
        from timm.layers import _fx
    except ImportError:
        return ()
    return tuple(getattr(_fx, "_autowrap_functions", ()))


@functools.lru_cache(maxsize=None)
def frozen_batchnorm_types() -> tuple[type[nn.Module], ...]:
    """timm's frozen batch norms (not ``_BatchNorm`` subclasses); empty without timm."""
    try:
        from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d
    except ImportError:
        return ()
    return (FrozenBatchNorm2d, FrozenBatchNormAct2d)
