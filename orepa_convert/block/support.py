"""Which convs an OREPA block can stand in for, and what it would add: the conversion's support policy."""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..config import OREPAConfig
from . import generation
from .spec import BlockSpec

PLAIN_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

SINGLE_TAP = "single-tap (1x1) kernel (opt 1x1 convs in with kernel_sizes=(1, 3))"


def same_padding_convs() -> tuple[type[nn.Module], ...]:
    """Conv classes whose own forward the block runs with the generated weight, besides the plain ones: timm's
    run-time 'same' padding conv and the classes users register (:func:`orepa_convert.register_conv_type`)."""
    from ..integrations.timm import same_padding_conv_types
    from ..registry import registered_conv_types

    return same_padding_conv_types() + registered_conv_types()


def runs_plain_forward(cls: type) -> bool:
    """Whether instances of ``cls`` compute a plain ``nn.Conv1d/2d/3d`` forward: the class itself, or a subclass
    that only changes construction (e.g. torchvision's ``Conv3DSimple``) and overrides neither ``forward`` nor
    ``_conv_forward``."""
    return _runs_plain_forward(cast(Hashable, cls))


@functools.cache
def _runs_plain_forward(cls: Any) -> bool:
    base: Any = next((b for b in PLAIN_CONVS if issubclass(cls, b)), None)
    return base is not None and cls.forward is base.forward and cls._conv_forward is base._conv_forward


def unsupported_reason(conv: nn.Module, *, pointwise: bool = False) -> str | None:
    """Why ``conv`` cannot be wrapped, or ``None`` if it can; single-tap (1x1) kernels only with ``pointwise``."""
    if torch.nn.utils.parametrize.is_parametrized(conv, "weight"):
        return "weight is parametrized"
    cls = type(conv)
    if not runs_plain_forward(cls) and not issubclass(cls, same_padding_convs()):
        name = f"{cls.__module__}.{cls.__qualname__}"
        if isinstance(conv, PLAIN_CONVS):
            return f"conv subclass {name} overrides forward/_conv_forward (its computation is not a plain conv's)"
        return f"unsupported conv class {name}"
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin) or getattr(conv, "transposed", False):
        return "lazy or transposed conv"
    weight = conv._parameters.get("weight")
    if not isinstance(weight, nn.Parameter):
        return "conv has no weight parameter"
    if generation.num_taps(weight.shape[2:]) < 2 and not pointwise:
        return SINGLE_TAP
    return None


def branch_parameter_count(conv: _ConvNd, config: OREPAConfig) -> int:
    """Parameters an :class:`~orepa_convert.OREPAConv` around ``conv`` would have beyond ``conv``'s own (weight
    and bias)."""
    return BlockSpec.for_conv(conv, config).added_parameters()
