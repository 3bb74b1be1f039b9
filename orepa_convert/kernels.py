"""Pure kernel maths of OREPA: each branch as a dense conv kernel, their weighted sum, and BN folding.

Every function works for 1-, 2- and 3-D kernels and any groups. Notation: a conv kernel has shape
``[O, I/g, *K]``; ``kk = prod(K)`` is its number of taps. Nothing here touches ``nn.Module`` state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


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


class _GenerateKernel(torch.autograd.Function):
    """:func:`generate_kernel` with a hand-written backward that keeps only the parameters for backward
    (no kernel-sized intermediates) and runs every gradient as a contiguous contraction."""

    @staticmethod
    def forward(ctx, spec, v1, w1, vt, wt, filters, v4, first, second, v6, dw, pw):  # type: ignore[override]
        kernel_size, groups, expansion = spec
        ctx.spec = spec
        ctx.save_for_backward(v1, w1, vt, wt, filters, v4, first, second, v6, dw, pw)
        return generate_kernel(
            kernel_size,
            groups,
            origin=None if w1 is None else (v1, w1),
            taps=None if wt is None else (vt, wt, filters),
            pw_kxk=None if second is None else (v4, first, second),
            dws=None if dw is None else (v6, dw, pw, expansion),
        )

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        kernel_size, groups, expansion = ctx.spec
        v1, w1, vt, wt, filters, v4, first, second, v6, dw, pw = ctx.saved_tensors
        need = ctx.needs_input_grad
        out_channels, in_per_group = grad.shape[:2]
        g, og = groups, out_channels // groups
        grad = grad.reshape(out_channels, in_per_group, -1).contiguous()  # [O, I/g, kk]
        gg = grad.view(g, og, in_per_group, -1)
        d = [None] * 12
        if w1 is not None:
            d[1] = torch.einsum("ox,ox->o", grad.view(out_channels, -1), w1.reshape(out_channels, -1))
            d[2] = (grad * v1.view(-1, 1, 1)).view_as(w1)
        if wt is not None:
            h = torch.einsum("oik,bok->boi", grad, filters)  # [B, O, I/g]
            d[3] = torch.einsum("boi,boi->bo", h, wt)
            d[4] = h.mul_(vt.unsqueeze(-1))
        if second is not None:
            per_group = second.shape[1]
            s = second.reshape(g, og, per_group, -1)
            f = first.view(g, per_group, in_per_group)
            p = torch.einsum("goik,gsi->gosk", gg, f).contiguous()  # [g, O/g, t/g, kk], layout of second
            d[6] = torch.einsum("gox,gox->go", p.view(g, og, -1), s.reshape(g, og, -1)).reshape(out_channels)
            if need[7]:
                d[7] = torch.einsum("goik,gosk->gsi", gg, s * v4.view(g, og, 1, 1)).reshape_as(first)
            d[8] = p.mul_(v4.view(g, og, 1, 1)).view_as(second)
        if dw is not None:
            q = pw.view(g, og, in_per_group, expansion)
            dd = dw.view(g, in_per_group, expansion, -1)
            p = torch.einsum("goik,gijk->goij", gg, dd).contiguous()  # [g, O/g, I/g, e], layout of pw
            d[9] = torch.einsum("gox,gox->go", p.view(g, og, -1), q.reshape(g, og, -1)).reshape(out_channels)
            if need[10]:
                d[10] = torch.einsum("goij,goik->gijk", q * v6.view(g, og, 1, 1), gg).reshape_as(dw)
            d[11] = p.mul_(v6.view(g, og, 1, 1)).view_as(pw)
        return tuple(d)


def generate_kernel_fused(
    kernel_size: Sequence[int],
    groups: int,
    *,
    origin: tuple[Tensor, Tensor] | None = None,
    taps: tuple[Tensor, Tensor, Tensor] | None = None,
    pw_kxk: tuple[Tensor, Tensor, Tensor] | None = None,
    dws: tuple[Tensor, Tensor, Tensor, int] | None = None,
) -> Tensor:
    """Same result and arguments as :func:`generate_kernel`, as one autograd node whose backward saves
    only its inputs: what the block runs every training step."""
    v1, w1 = origin if origin is not None else (None, None)
    vt, wt, filters = taps if taps is not None else (None, None, None)
    v4, first, second = pw_kxk if pw_kxk is not None else (None, None, None)
    v6, dw, pw, expansion = dws if dws is not None else (None, None, None, 1)
    spec = (tuple(kernel_size), groups, expansion)
    return _GenerateKernel.apply(spec, v1, w1, vt, wt, filters, v4, first, second, v6, dw, pw)
