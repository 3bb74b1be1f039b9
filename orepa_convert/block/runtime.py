"""How the current call records a block's forward, and kernel generation dispatched on it.

A block generates its kernel as one fused autograd node in eager mode, and from plain differentiable ops where
something else derives the backward (``torch.compile`` tracing, ``torch.func`` transforms). Which of those is
active, whether a kernel generated ahead may stand in (:mod:`orepa_convert.ahead`), and the dtype generation
runs in are read here from torch's state; nothing here changes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from . import generation

#: Warning when ``torch.export`` (and the default, dynamo-based ``torch.onnx.export``) traces an eval-mode block.
EXPORT_UNFOLDED = (
    "exporting an unfolded OREPA model: torch.export traces the parameters as fake tensors, so the graph keeps each "
    "block's kernel generation and branch weights (several times the folded model's nodes and weights). Call "
    "orepa_convert.fold_orepa(model) before torch.export / torch.onnx.export(dynamo=True) to export the plain, "
    "folded graph (torch.onnx.export(..., dynamo=False) and torch.jit.trace record each block as its folded conv)"
)


class Generating(Protocol):
    """What generation needs from a block: its parameters in plan order and its fixed tensors."""

    @property
    def tap_filters(self) -> Tensor | None: ...
    @property
    def pw_kxk_identity(self) -> Tensor | None: ...

    def generation_inputs(self) -> list[Tensor]: ...


def generation_ahead_allowed() -> bool:
    """Whether a kernel generated before the forward pass may stand in for generating it in the block: grad
    mode on and nothing that records the forward differently (``torch.compile`` tracing, functorch transforms,
    saved-tensor hooks as used by activation checkpointing and offloading). See :mod:`orepa_convert.ahead`."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top_hooks is None:
        return False  # cannot tell whether saved-tensor hooks are active: generate in the block
    try:
        return top_hooks(False) is None
    except Exception:  # another torch's signature or state: do not guess, generate in the block
        return False


def generation_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype a block generates its kernel in: float64 for float64 parameters; else float32, or float64
    while float32 matmuls may run at reduced precision (``torch.set_float32_matmul_precision`` other than
    ``"highest"``, e.g. TF32), which would make the trained function drift from the exact fold by ~1e-3. This
    reads the global setting and never changes it (thread-safe, no graph break)."""
    if param_dtype == torch.float64 or _reduced_float32_matmuls():
        return torch.float64
    return torch.float32


@torch.compiler.assume_constant_result
def _reduced_float32_matmuls() -> bool:
    """Whether float32 matmuls may run at reduced precision. Under ``torch.compile`` it is read once, when the
    graph is traced (set the precision before compiling, as the compiled matmuls follow it too)."""
    return torch.get_float32_matmul_precision() != "highest"


def traced_generation() -> bool:
    """Whether generation must use plain differentiable ops: under ``torch.compile`` tracing (the compiler
    derives and fuses the backward) or inside ``torch.func`` transforms (which cannot see through the fused
    autograd node)."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device`` (thread-local state) if it is enabled there."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def generate_kernels(
    plan: generation.GenerationPlan, blocks: Sequence[Generating], dtype: torch.dtype
) -> tuple[Tensor, ...]:
    """The kernels of ``blocks`` (all with ``plan``, parameters of one dtype and device), computed and returned
    in ``dtype``: one fused autograd node for all of them, or plain ops per block under
    :func:`traced_generation`."""
    first = blocks[0]
    filters, identity = first.tap_filters, first.pw_kxk_identity
    if filters is not None and filters.dtype != dtype:
        filters = filters.to(dtype)
    if identity is not None and identity.dtype != dtype:
        identity = identity.to(dtype)
    if traced_generation():
        return tuple(
            generation.generate_kernel_autograd(plan, [t.to(dtype) for t in b.generation_inputs()], filters, identity)
            for b in blocks
        )
    return generation.generate_kernels_stacked(plan, [b.generation_inputs() for b in blocks], filters, identity, dtype)
