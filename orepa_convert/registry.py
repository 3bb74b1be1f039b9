"""Classes users add to what the library recognises: their own batch norms and conv classes.

Registration is by class, once (typically at import of the module that defines the class), like timm's
``register_notrace_module``; both functions return the class, so they work as decorators.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd

_BATCHNORMS: list[type[nn.Module]] = []
_CONVS: list[type[nn.Module]] = []


def register_batchnorm_type(cls: type[nn.Module]) -> type[nn.Module]:
    """Treat ``cls`` as a batch norm: a conv whose output feeds only it becomes eligible, and it is one FX leaf.

    Its instances must compute ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` in eval mode
    with those attribute names (what ``fold_orepa(fuse_bn=True)`` folds), like ``nn.BatchNorm2d``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_batchnorm_type takes an nn.Module subclass, got {cls!r}")
    if cls not in _BATCHNORMS:
        _BATCHNORMS.append(cls)
    return cls


def register_conv_type(cls: type[nn.Module]) -> type[nn.Module]:
    """Convert instances of ``cls``, a conv subclass whose own forward ends in the plain convolution of its
    ``weight`` (e.g. it pads at run time first): the block runs that forward with the generated kernel as the
    weight, and folding gives back a ``cls`` instance holding the folded kernel."""
    if not (isinstance(cls, type) and issubclass(cls, _ConvNd)) or getattr(cls, "transposed", False):
        raise TypeError(f"register_conv_type takes a subclass of nn.Conv1d/2d/3d, got {cls!r}")
    if cls not in _CONVS:
        _CONVS.append(cls)
    return cls


def registered_batchnorm_types() -> tuple[type[nn.Module], ...]:
    return tuple(_BATCHNORMS)


def registered_conv_types() -> tuple[type[nn.Module], ...]:
    return tuple(_CONVS)
