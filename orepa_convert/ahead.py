"""Generate every block's kernel at the start of the converted model's training forward pass, stacked.

``convert_to_orepa`` attaches two hooks to the model it converted. In training mode, the forward pre-hook
groups the model's :class:`~orepa_convert.block.OREPAConv` blocks by generation plan (kernel shape, groups,
branches, widths), dtype and device, generates each group's kernels as one autograd node over the stacked
parameters, and hands each block its kernel; the forward hook drops whatever was not used. The function and the
gradients are those of generating inside each block, with far fewer ops: yolov8n's 39 blocks form 15 groups,
so a training step runs about 15 generation nodes instead of 39 (on a GPU: that many fewer kernel launches).
On CPUs it is also faster because the generation work runs back to back instead of between large
convolutions that evict the caches; autograd, which runs the most recently created nodes first, then also runs
the generation backward passes back to back, at the end of the backward pass.

That last point is why it is off in a distributed run (``torch.distributed`` initialised with more than one
process): DDP all-reduces gradient buckets while the backward pass goes on, and branch gradients that all
arrive at the end would delay every bucket holding them. There each block generates its kernel in its own
forward, and its generation backward runs right after its convolution's.

A block only takes a kernel generated ahead when its parameters are unchanged since (version counters) and
nothing records the forward differently: no ``torch.compile`` tracing, no functorch transform, no saved-tensor
hooks (activation checkpointing, offloading), grad mode on. Otherwise it generates its own kernel as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .block import OREPAConv
from .block.runtime import autocast_off, generate_kernels, generation_ahead_allowed, generation_dtype


def distributed_run() -> bool:
    """Whether this process is one of several in an initialised ``torch.distributed`` group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def generate_all(root: nn.Module) -> None:
    """Generate the kernel of every training-mode block of ``root`` now, one autograd node per group of
    blocks with the same plan, dtype and device, for their next forward (frozen blocks use their cache)."""
    groups: dict[tuple, list[OREPAConv]] = {}
    for module in root.modules():
        if isinstance(module, OREPAConv) and module.training and not (module.eval_cache and module.frozen):
            scales = module.scales
            groups.setdefault((module._plan, scales.dtype, scales.device), []).append(module)
    for (plan, dtype, device), blocks in groups.items():
        with autocast_off(device):
            kernels = generate_kernels(plan, blocks, generation_dtype(dtype))
        for block, kernel in zip(blocks, kernels):
            block.__dict__["_ahead"] = (block._cache_key(), kernel if kernel.dtype == dtype else kernel.to(dtype))


def _generate_ahead(root: nn.Module, args: Any) -> None:
    """Forward pre-hook: generate every training-mode block's kernel now (not in a distributed run)."""
    if root.training and generation_ahead_allowed() and not distributed_run():
        generate_all(root)


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
