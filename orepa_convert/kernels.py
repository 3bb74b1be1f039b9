"""Pure kernel maths of OREPA: each branch as a dense conv kernel, their weighted sum, and BN folding.

Every function works for 1-, 2- and 3-D kernels and any groups. Notation: a conv kernel has shape
``[O, I/g, *K]``; ``kk = prod(K)`` is its number of taps. Nothing here touches ``nn.Module`` state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .config import BRANCHES


def num_taps(kernel_size: Sequence[int]) -> int:
    """Number of taps of a kernel: the product of its spatial sizes."""
    return math.prod(kernel_size)


def centre_tap(kernel_size: Sequence[int]) -> tuple[int, ...]:
    """The tap of the 1x1 branch: the exact centre for odd sizes, ``(k - 1) // 2`` (the lower of the
    two middle taps) along every even axis."""
    return tuple((k - 1) // 2 for k in kernel_size)


def dct_prior_filters(out_channels: int, kernel_size: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
    """The frequency-prior filters ``[O, *K]``: one DCT-II basis vector per output channel.

    Output channels are split into contiguous, equal blocks, one per spatial axis ``d`` with ``k_d > 1``.
    In its block, channel ``j`` gets ``cos(pi * (n + 0.5) * u / k_d)`` along axis ``d`` (constant along the
    others) with frequency ``u = 1 + (j mod (k_d - 1))``: ``u = 0`` would repeat the average branch and
    ``u = k_d`` is identically zero. Every filter is therefore non-zero and bounded in [-1, 1], for every
    kernel shape and dimensionality (unlike the reference code, which only initialises 3x3).
    """
    kernel_size = tuple(kernel_size)
    axes = [d for d, k in enumerate(kernel_size) if k > 1]
    if not axes:
        raise ValueError(f"the prior branch needs a kernel with more than one tap, got {kernel_size}")
    filters = torch.empty(out_channels, *kernel_size, dtype=torch.float64)
    block = torch.arange(out_channels) * len(axes) // out_channels
    for slot, d in enumerate(axes):  # at most three spatial axes
        channels = (block == slot).nonzero().flatten()
        k = kernel_size[d]
        u = torch.arange(len(channels), dtype=torch.float64) % (k - 1) + 1
        n = torch.arange(k, dtype=torch.float64) + 0.5
        basis = torch.cos(math.pi * u[:, None] * n[None, :] / k)  # [channels, k]
        shape = [len(channels)] + [1] * len(kernel_size)
        shape[1 + d] = k
        filters[channels] = basis.view(shape).expand(len(channels), *kernel_size)
    return filters.to(dtype)


def tap_filter(branch: str, out_channels: int, kernel_size: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
    """The fixed per-output-channel spatial filter ``[O, *K]`` that turns a 1x1 weight into a kxk kernel.

    ``avg``: the k x k average (``1 / kk`` at every tap); ``prior``: :func:`dct_prior_filters`;
    ``pw``: 1 at :func:`centre_tap`, 0 elsewhere.
    """
    kernel_size = tuple(kernel_size)
    if branch == "avg":
        return torch.full((out_channels, *kernel_size), 1.0 / num_taps(kernel_size), dtype=dtype)
    if branch == "prior":
        return dct_prior_filters(out_channels, kernel_size, dtype)
    if branch == "pw":
        filt = torch.zeros(out_channels, *kernel_size, dtype=dtype)
        filt[(slice(None), *centre_tap(kernel_size))] = 1.0
        return filt
    raise ValueError(f"no fixed tap filter for branch {branch!r}")


def expand_1x1(weight: Tensor, filters: Tensor) -> Tensor:
    """Dense kernel of a 1x1 conv ``weight [O, I/g]`` followed by a fixed per-output-channel filter ``[O, *K]``."""
    nd = filters.dim() - 1
    return weight.reshape(*weight.shape, *([1] * nd)) * filters.unsqueeze(1)


def stacked_identity(width: int, in_channels: int, groups: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The fixed part ``[t, I/g]`` of the 1x1->kxk branch's first 1x1 conv: row ``r`` of each group maps to
    input ``r mod (I/g)`` of that group (the plain identity when ``t == I``)."""
    if width % groups or in_channels % groups:
        raise ValueError(f"width {width} and in_channels {in_channels} must be divisible by groups {groups}")
    per_group, in_per_group = width // groups, in_channels // groups
    rows = torch.arange(width) % per_group % in_per_group
    return torch.nn.functional.one_hot(rows, in_per_group).to(dtype)


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


def fold_batchnorm(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Fold an inference-mode batch norm into the conv before it, in float64, cast back to ``weight.dtype``.

    ``W' = W * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``.
    """
    f64 = torch.float64
    std_inv = torch.rsqrt(running_var.to(f64) + eps)
    gamma = bn_weight.to(f64) if bn_weight is not None else torch.ones_like(std_inv)
    beta = bn_bias.to(f64) if bn_bias is not None else torch.zeros_like(std_inv)
    b = bias.to(f64) if bias is not None else torch.zeros_like(std_inv)
    scale = gamma * std_inv
    new_weight = weight.to(f64) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    new_bias = beta + (b - running_mean.to(f64)) * scale
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


def natural_pw_kxk(second: Tensor) -> Tensor:
    """The block's 1x1->kxk second factor, stored ``[O, *K, t/g]``, in conv layout ``[O, t/g, *K]``."""
    return second.movedim(-1, 1)


def natural_dws_pointwise(pointwise: Tensor, groups: int) -> Tensor:
    """The block's depthwise-separable pointwise weight, stored ``[I, e, O/g]``, in conv layout ``[O, e*I/g]``."""
    in_channels, e, og = pointwise.shape
    ig = in_channels // groups
    return pointwise.reshape(groups, ig, e, og).permute(0, 3, 1, 2).reshape(groups * og, ig * e)


#: The 1x1 branches whose kxk form is a fixed per-output-channel filter (adjacent in :data:`BRANCHES`).
TAP_BRANCHES: tuple[str, ...] = ("avg", "prior", "pw")


def tap_branches(branches: Sequence[str]) -> list[str]:
    """The fixed-filter 1x1 branches among ``branches``, in :data:`~orepa_convert.config.BRANCHES` order (the
    order of their rows in a block's ``weight_taps`` and ``scales``)."""
    return [b for b in TAP_BRANCHES if b in branches]


class GenerationPlan(NamedTuple):
    """Static description of one block's kernel generation, built once per block.

    ``shape`` is the kernel shape ``[O, I/g, *K]``; ``rows`` gives the row of ``scales [n, O]`` of the origin
    branch, of the first fixed-filter 1x1 branch, of ``pw_kxk`` and of ``dws`` (-1 when absent); ``num_taps``
    is the number of fixed-filter 1x1 branches (their rows follow each other).
    """

    shape: tuple[int, ...]
    out_channels: int
    in_per_group: int
    kernel_taps: int  # kk
    groups: int
    num_branches: int
    rows: tuple[int, int, int, int]
    num_taps: int
    expansion: int


def generation_plan(shape: Sequence[int], groups: int, branches: Sequence[str], expansion: int) -> GenerationPlan:
    """The :class:`GenerationPlan` of a block with kernel ``shape`` and ``branches`` (scale rows in
    :data:`~orepa_convert.config.BRANCHES` order)."""
    order = [b for b in BRANCHES if b in branches]
    if not order:
        raise ValueError(f"a generation plan needs at least one of the branches {BRANCHES}, got {branches!r}")
    taps = tap_branches(order)
    rows = tuple(order.index(b) if b in order else -1 for b in ("origin", taps[0] if taps else "", "pw_kxk", "dws"))
    return GenerationPlan(
        tuple(shape), shape[0], shape[1], math.prod(shape[2:]), groups, len(order), rows, len(taps), expansion  # type: ignore[arg-type]
    )


class _GenerateKernel(torch.autograd.Function):
    """The per-step OREPA kernel as one autograd node.

    It works on the block's storage layouts (fixed-filter 1x1 weights stacked ``[O, B, I/g]``, 1x1->kxk second
    factor ``[O, *K, t/g]``, depthwise-separable pointwise ``[I, e, O/g]``, scales ``[n, O]``), which make every
    product a plain ``bmm`` and keep every per-channel scale multiply on a contiguous innermost axis. In the
    forward each scale multiplies inside an ``addcmul_`` (or the small filter stack) rather than in a pass of its
    own. Backward keeps only the inputs (and the small ``[t, I/g]`` first factor) and recomputes the rest.
    """

    @staticmethod
    def forward(ctx, plan, scales, origin, taps, filters, pw_in, identity, pw, dws_dw, dws_pw):  # type: ignore[override]
        o, ig, kk, g, e = plan.out_channels, plan.in_per_group, plan.kernel_taps, plan.groups, plan.expansion
        og = o // g
        r_origin, r_taps, r_pw, r_dws = plan.rows
        v = scales.view(plan.num_branches, o)
        if origin is not None:
            kernel = origin.reshape(o, ig, kk) * v[r_origin].view(o, 1, 1)
        else:
            kernel = scales.new_zeros(o, ig, kk)
        if taps is not None:
            kernel.baddbmm_(taps.transpose(1, 2), filters * v[r_taps : r_taps + plan.num_taps].t().unsqueeze(-1))
        grouped = kernel.view(g, og, ig, kk)
        first = None
        if pw is not None:
            first = pw_in + identity  # [t, I/g]
            tg = pw.shape[-1]
            prod = torch.bmm(pw.reshape(g, og * kk, tg), first.view(g, tg, ig))  # [g, O/g*kk, I/g]
            grouped.addcmul_(prod.view(g, og, kk, ig).transpose(2, 3), v[r_pw].view(g, og, 1, 1))
        if dws_pw is not None:
            pointwise = dws_pw.reshape(g * ig, e, og).transpose(1, 2)
            dense = torch.bmm(pointwise, dws_dw.reshape(g * ig, e, kk))  # [g*I/g, O/g, kk]
            grouped.addcmul_(dense.view(g, ig, og, kk).transpose(1, 2), v[r_dws].view(g, og, 1, 1))
        ctx.plan = plan
        ctx.save_for_backward(scales, origin, taps, filters, pw, dws_dw, dws_pw, first)
        return kernel.view(plan.shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        scales, origin, taps, filters, pw, dws_dw, dws_pw, first = ctx.saved_tensors
        plan = ctx.plan
        o, ig, kk, g, e = plan.out_channels, plan.in_per_group, plan.kernel_taps, plan.groups, plan.expansion
        n, og = plan.num_branches, o // g
        r_origin, r_taps, r_pw, r_dws = plan.rows
        grad = grad.reshape(o, ig, kk).contiguous()
        v = scales.view(n, o)
        unit = _denormal_guard_unit(grad)
        if unit != 1.0:
            # A tiny gradient (e.g. behind a zero-initialised BN gamma) times tiny scales would underflow into
            # denormals inside the GEMMs, ~100x slower on CPUs. Work on the gradient divided by a power of two
            # near its maximum (exact), multiply the scales that weight the branch gradients by that power
            # (flushing what leaves the normal range) and the scale gradients at the end.
            grad = grad / unit
            v = _scaled_flushed(v, unit)
        dv = torch.empty_like(scales).view(n, o)
        d_origin = d_taps = d_pw_in = d_pw = d_dw = d_dws_pw = None
        if origin is not None:
            torch.linalg.vecdot(grad.view(o, ig * kk), origin.reshape(o, ig * kk), out=dv[r_origin])
            d_origin = (grad * v[r_origin].view(o, 1, 1)).view_as(origin)
        if taps is not None:
            b = plan.num_taps
            h = torch.bmm(filters, grad.transpose(1, 2))  # [O, B, I/g]: dL/d(scaled 1x1 weights) / scale
            torch.linalg.vecdot(h, taps, out=dv[r_taps : r_taps + b].t())
            d_taps = h.mul_(v[r_taps : r_taps + b].t().unsqueeze(-1))
        if pw is not None or dws_pw is not None:
            grouped = grad.view(g, og, ig, kk)
        if pw is not None:
            tg = pw.shape[-1]
            second = pw.reshape(g, og * kk, tg)
            gt = _copy(grouped.transpose(2, 3)).view(g, og * kk, ig)  # one layout copy, scaled in place below
            prod = torch.bmm(gt, first.view(g, tg, ig).transpose(1, 2))  # [g, O/g*kk, t/g]
            torch.linalg.vecdot(prod.view(o, kk * tg), pw.reshape(o, kk * tg), out=dv[r_pw])
            scale = v[r_pw].view(g, og, 1)
            gt.view(g, og, kk * ig).mul_(scale)
            d_pw_in = torch.bmm(second.transpose(1, 2), gt).view(-1, ig)
            d_pw = prod.view(g, og, kk * tg).mul_(scale).view_as(pw)
        if dws_pw is not None:
            pointwise = dws_pw.reshape(g, ig, e, og)
            gq = grouped.transpose(1, 2)  # [g, I/g, O/g, kk]: strided batches, no copy when g == 1
            prod = torch.matmul(dws_dw.reshape(g, ig, e, kk), gq.transpose(2, 3))  # [g, I/g, e, O/g]
            torch.sum((prod * pointwise).view(g, ig * e, og), 1, out=dv[r_dws].view(g, og))
            scale = v[r_dws]
            scaled = (grad * scale.view(o, 1, 1)).view(g, og, ig, kk).transpose(1, 2)
            d_dw = torch.matmul(pointwise, scaled).view_as(dws_dw)  # [g, I/g, e, kk]
            d_dws_pw = prod.mul_(scale.view(g, 1, 1, og)).view_as(dws_pw)
        d_scales = (dv if unit == 1.0 else _scaled_flushed(dv, unit)).view_as(scales)
        return None, d_scales, d_origin, d_taps, None, d_pw_in, None, d_pw, d_dw, d_dws_pw


def _copy(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` that never aliases it (``reshape``/``contiguous`` may return a view)."""
    return t.clone(memory_format=torch.contiguous_format)


def _scaled_flushed(v: Tensor, unit: float) -> Tensor:
    """``v * unit`` with results below the normal range set to zero."""
    r = v * unit
    return r.masked_fill_(r.abs() < torch.finfo(r.dtype).tiny, 0.0)


_DENORMAL = [5e-324]  # the smallest float64 denormal, in a list so that no constant folding applies


def _flushes_denormals() -> bool:
    """Whether this thread's FPU flushes denormals (``torch.set_flush_denormal(True)``): then they cannot
    occur and the guard below is skipped (a Python float multiply, ~0.1 us)."""
    return _DENORMAL[0] * 1.0 == 0.0


def _denormal_guard_unit(grad: Tensor) -> float:
    """1.0, or on the CPU for a gradient whose largest entry is below 2**-60, the power of two just below that
    entry (GPUs process denormals at full speed; ordinary gradients are far from underflow)."""
    if grad.device.type != "cpu" or torch.compiler.is_compiling() or _flushes_denormals():
        return 1.0
    low, high = (v.item() for v in torch.aminmax(grad))  # one pass, no temporary
    largest = max(-low, high)
    if largest == 0.0 or largest >= 2.0**-60 or not math.isfinite(largest):
        return 1.0
    return 2.0 ** math.floor(math.log2(largest))


def generate_kernel_fused(
    plan: GenerationPlan,
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
    """The OREPA kernel from the block's *storage* layouts, as one autograd node (what a block runs every step).

    Args (``None`` for the tensors of an absent branch; ``plan`` says which are present):
        plan: shapes and scale rows, from :func:`generation_plan`.
        scales: all per-branch scales, ``[n * O]`` (row ``j`` of its ``[n, O]`` view scales branch ``j``).
        origin: ``W [O, I/g, *K]``.
        taps, filters: the 1x1 branches with a fixed spatial filter: weights ``[O, B, I/g]``, filters
            ``[O, B, kk]``.
        pw_in, identity, pw: the 1x1->kxk branch: learned and fixed parts ``[t, I/g]`` of the first factor, the
            second factor ``[O, *K, t/g]``.
        dws_dw, dws_pw: the depthwise-separable branch: depthwise ``[e*I, 1, *K]``, pointwise ``[I, e, O/g]``.

    Equals :func:`generate_kernel` on the natural layouts (:func:`natural_pw_kxk`, :func:`natural_dws_pointwise`).
    """
    return _GenerateKernel.apply(plan, scales, origin, taps, filters, pw_in, identity, pw, dws_dw, dws_pw)
