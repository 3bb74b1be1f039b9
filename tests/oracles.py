"""Test oracles: the OREPA kernel written branch by branch in dense conv layouts, to check the library's fused
generation (:mod:`orepa_convert.block.generation`) against; and the single-block form of the stacked generation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from orepa_convert.block import generation


def expand_1x1(weight: Tensor, filters: Tensor) -> Tensor:
    """Dense kernel of a 1x1 conv ``weight [O, I/g]`` followed by a fixed per-output-channel filter ``[O, *K]``."""
    nd = filters.dim() - 1
    return weight.reshape(*weight.shape, *([1] * nd)) * filters.unsqueeze(1)


def compose_1x1_kxk(first: Tensor, second: Tensor, groups: int) -> Tensor:
    """Dense kernel of a grouped 1x1 conv ``first [t, I/g]`` followed by a grouped kxk conv
    ``second [O, t/g, *K]`` (both with ``groups``, no padding between them)."""
    out_channels, per_group, *kernel_size = second.shape
    in_per_group = first.shape[1]
    f = first.reshape(groups, per_group, in_per_group)
    s = second.reshape(groups, out_channels // groups, per_group, -1)
    dense = torch.einsum("gosk,gsi->goik", s, f)
    return dense.reshape(out_channels, in_per_group, *kernel_size)


def depthwise_pointwise_to_dense(depthwise: Tensor, pointwise: Tensor, groups: int, expansion: int) -> Tensor:
    """Dense kernel of a depthwise conv ``depthwise [e*I, 1, *K]`` (``e = expansion`` filters per input
    channel, output channel ``i*e + j``) followed by a grouped 1x1 conv ``pointwise [O, e*I/g]``."""
    channels, _, *kernel_size = depthwise.shape
    out_channels, width = pointwise.shape
    if channels != groups * width or width % expansion:
        raise ValueError(
            f"depthwise {tuple(depthwise.shape)} and pointwise {tuple(pointwise.shape)} do not form a "
            f"depthwise-separable pair with groups={groups}, expansion={expansion}"
        )
    in_per_group = width // expansion
    d = depthwise.reshape(groups, in_per_group, expansion, -1)
    q = pointwise.reshape(groups, out_channels // groups, in_per_group, expansion)
    dense = torch.einsum("goij,gijk->goik", q, d)
    return dense.reshape(out_channels, in_per_group, *kernel_size)


def generate_kernel(
    kernel_size: Sequence[int],
    groups: int,
    *,
    origin: tuple[Tensor, Tensor] | None = None,
    taps: tuple[Tensor, Tensor, Tensor] | None = None,
    pw_kxk: tuple[Tensor, Tensor, Tensor] | None = None,
    dws: tuple[Tensor, Tensor, Tensor, int] | None = None,
) -> Tensor:
    """The OREPA kernel ``sum_b diag(v_b) W_b`` as a few large contractions.

    Args (each ``None`` when the branch is absent; ``v`` are per-output-channel scales ``[O]``):
        origin: ``(v, W [O, I/g, *K])``.
        taps: the 1x1 branches with a fixed spatial filter, stacked: ``(v [B, O], W [B, O, I/g],
            filters [B, O, kk])``.
        pw_kxk: ``(v, first [t, I/g], second [O, t/g, *K])``; ``first`` already includes its identity.
        dws: ``(v, depthwise [e*I, 1, *K], pointwise [O, e*I/g], e)``.

    Each scale multiplies the smallest tensor that carries the output-channel index, so that the only
    kernel-sized tensors are the per-branch contraction results and the running sum.
    """
    kernel_size = tuple(kernel_size)
    parts: list[Tensor] = []
    if origin is not None:
        v, w = origin
        parts.append(v.reshape(-1, *([1] * (w.dim() - 1))) * w)
    if taps is not None:
        v, w, filters = taps
        dense = torch.einsum("boi,bok->oik", v.unsqueeze(-1) * w, filters)
        parts.append(dense.reshape(dense.shape[0], dense.shape[1], *kernel_size))
    if pw_kxk is not None:
        v, first, second = pw_kxk
        parts.append(compose_1x1_kxk(first, v.reshape(-1, *([1] * (second.dim() - 1))) * second, groups))
    if dws is not None:
        v, depthwise, pointwise, expansion = dws
        parts.append(depthwise_pointwise_to_dense(depthwise, v.unsqueeze(1) * pointwise, groups, expansion))
    if not parts:
        raise ValueError("generate_kernel needs at least one branch")
    # Accumulate in place into one contiguous [O, I/g, *K] buffer: the contraction results come in
    # permuted layouts, and out-of-place sums of mixed layouts are several times slower. Autograd is
    # unaffected: no op above saves its output for backward.
    kernel = parts[0].contiguous()
    for part in parts[1:]:
        kernel.add_(part)
    return kernel


def generate_kernel_fused(
    plan: generation.GenerationPlan,
    scales: Tensor,
    origin: Tensor | None,
    taps: Tensor | None,
    filters: Tensor | None,
    pw_in: Tensor | None,
    identity: Tensor | None,
    pw: Tensor | None,
    dws_dw: Tensor | None,
    dws_pw: Tensor | None,
) -> Tensor:
    """One block's kernel as one autograd node: :func:`generate_kernels_stacked` for a single block, with the
    tensors passed by name (``None`` for an absent branch) and computed in ``scales.dtype``."""
    named = {"scales": scales, "origin": origin, "taps": taps, "pw_in": pw_in, "pw": pw, "dws_dw": dws_dw,
             "dws_pw": dws_pw}  # fmt: skip
    present = [cast(Tensor, named[k]) for k in plan.kinds]  # plan.kinds names the branches the block has
    return generation.generate_kernels_stacked(plan, [present], filters, identity, scales.dtype)[0]
