"""Generate every block's kernel at the start of the converted model's training forward pass.

``convert_to_orepa`` attaches two hooks to the model it converted. In training mode, the forward pre-hook
generates the kernels of all the model's :class:`~orepa_convert.block.OREPAConv` blocks one after the other
and hands each block its kernel; the forward hook drops whatever was not used. The result is the same
function and the same gradients as generating inside each block. It is faster on CPUs: the generation work
runs back to back instead of between large convolutions that evict the caches, and autograd, which runs the
most recently created nodes first, then also runs the generation backward passes back to back, at the end of
the backward pass.

A block only takes a kernel generated ahead when its parameters are unchanged since (version counters) and
nothing records the forward differently: no ``torch.compile`` tracing, no functorch transform, no saved-tensor
hooks (activation checkpointing, offloading), grad mode on. Otherwise it generates its own kernel as usual.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .block import OREPAConv, generation_ahead_allowed


def _generate_ahead(root: nn.Module, args: Any) -> None:
    """Forward pre-hook: generate every training-mode block's kernel now."""
    if not root.training or not generation_ahead_allowed():
        return
    for module in root.modules():
        if isinstance(module, OREPAConv) and module.training:
            module.generate_ahead()


def _drop_unused(root: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (also after an exception): forget kernels that no block took."""
    for module in root.modules():
        if isinstance(module, OREPAConv):
            module.__dict__.pop("_ahead", None)


def attach(root: nn.Module) -> None:
    """Install the hooks on ``root`` (once; converting again does not add more)."""
    if _generate_ahead not in root._forward_pre_hooks.values():
        root.register_forward_pre_hook(_generate_ahead)
    if _drop_unused not in root._forward_hooks.values():
        root.register_forward_hook(_drop_unused, always_call=True)


def detach(model: nn.Module) -> None:
    """Remove the hooks from every module of ``model`` (``fold_orepa`` does this)."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _generate_ahead:
                del module._forward_pre_hooks[key]
        for key, hook in list(module._forward_hooks.items()):
            if hook is _drop_unused:
                del module._forward_hooks[key]
                getattr(module, "_forward_hooks_always_called", {}).pop(key, None)


def has_hooks(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries the hooks."""
    return any(
        _generate_ahead in m._forward_pre_hooks.values() or _drop_unused in m._forward_hooks.values()
        for m in model.modules()
    )

