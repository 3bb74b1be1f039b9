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


def natural_pw_kxk(second: Tensor) -> Tensor:
    """The block's 1x1->kxk second factor, stored ``[O, *K, t/g]``, in conv layout ``[O, t/g, *K]``."""
    return second.movedim(-1, 1)


def natural_dws_pointwise(pointwise: Tensor, groups: int) -> Tensor:
    """The block's depthwise-separable pointwise weight, stored ``[I, O/g, e]``, in conv layout ``[O, e*I/g]``."""
    in_channels, og, e = pointwise.shape
    ig = in_channels // groups
    return pointwise.reshape(groups, ig, og, e).permute(0, 2, 1, 3).reshape(groups * og, ig * e)


class _GenerateKernel(torch.autograd.Function):
    """The per-step OREPA kernel as one autograd node.

    It works on the block's storage layouts (1x1->kxk second factor ``[O, *K, t/g]``, depthwise-separable
    pointwise ``[I, O/g, e]``), which make every product a plain ``bmm`` whose result is already in the layout
    of what it feeds. Backward keeps only the inputs (no kernel-sized intermediates) and recomputes the rest.
    """

    @staticmethod
    def forward(ctx, spec, *tensors):  # type: ignore[override]
        ctx.spec = spec
        ctx.save_for_backward(*tensors)
        parts = _unpack(spec, tensors)
        return _fused_forward(spec, parts).view(parts["O"], parts["ig"], *spec[0])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        parts = _unpack(ctx.spec, ctx.saved_tensors)
        return (None, *_fused_backward(ctx.spec, parts, grad))


def _unpack(spec, tensors) -> dict:
    kernel_size, groups, expansion, has_origin, n_taps, flags = spec
    has_pw, has_dws = flags
    it = iter(tensors)
    parts: dict = {"taps_v": [], "taps_w": []}
    if has_origin:
        parts["v1"], parts["w1"] = next(it), next(it)
    for _ in range(n_taps):
        parts["taps_v"].append(next(it))
        parts["taps_w"].append(next(it))
    if n_taps:
        parts["filters"] = next(it)  # [O, B, kk]
    if has_pw:
        parts["v4"], parts["learned"], parts["identity"], parts["second"] = next(it), next(it), next(it), next(it)
    if has_dws:
        parts["v6"], parts["dw"], parts["pw"] = next(it), next(it), next(it)
    # shapes
    if has_origin:
        parts["O"], parts["ig"] = parts["w1"].shape[:2]
    elif n_taps:
        parts["O"], parts["ig"] = parts["taps_w"][0].shape
    elif has_pw:
        parts["O"], parts["ig"] = parts["second"].shape[0], parts["learned"].shape[1]
    else:
        parts["ig"] = parts["pw"].shape[0] // groups
        parts["O"] = parts["pw"].shape[1] * groups
    parts["kk"] = num_taps(kernel_size)
    return parts


def _fused_forward(spec, p: dict) -> Tensor:
    kernel_size, g, e, has_origin, n_taps, (has_pw, has_dws) = spec
    O, ig, kk = p["O"], p["ig"], p["kk"]
    og = O // g
    if has_origin:
        kernel = (p["w1"].reshape(O, ig * kk) * p["v1"].unsqueeze(1)).view(O, ig, kk)
    else:
        kernel = p["filters" if n_taps else ("second" if has_pw else "pw")].new_zeros(O, ig, kk)
    if n_taps:
        a = torch.stack(p["taps_w"], -1) * torch.stack(p["taps_v"], -1).unsqueeze(1)  # [O, I/g, B]
        kernel.baddbmm_(a, p["filters"])
    grouped = kernel.view(g, og, ig, kk)
    if has_pw:
        tg = p["second"].shape[-1]
        first = (p["learned"] + p["identity"]).view(g, tg, ig)
        scaled = (p["second"].reshape(g, og, kk * tg) * p["v4"].view(g, og, 1)).view(g, og * kk, tg)
        grouped.add_(torch.bmm(scaled, first).view(g, og, kk, ig).transpose(2, 3))
    if has_dws:
        scaled = p["pw"].view(g, ig, og, e) * p["v6"].view(g, 1, og, 1)
        dense = torch.bmm(scaled.view(g * ig, og, e), p["dw"].view(g * ig, e, kk))  # [g*I/g, O/g, kk]
        grouped.add_(dense.view(g, ig, og, kk).transpose(1, 2))
    return kernel


def _fused_backward(spec, p: dict, grad: Tensor) -> list[Tensor | None]:
    kernel_size, g, e, has_origin, n_taps, (has_pw, has_dws) = spec
    O, ig, kk = p["O"], p["ig"], p["kk"]
    og = O // g
    grad = grad.reshape(O, ig, kk).contiguous()
    unit = _denormal_guard_unit(grad)
    if unit != 1.0:
        # A tiny gradient (e.g. behind a zero-initialised BN gamma) times tiny scales would underflow into
        # denormals inside the GEMMs, ~100x slower on CPUs. Work on the gradient divided by a power of two near
        # its maximum (exact) and fold that factor into the per-channel scale multiplies below.
        grad = grad / unit
    tiny = torch.finfo(grad.dtype).tiny

    def rescale(v: Tensor) -> Tensor:
        """``v * unit`` with results below the normal range flushed to zero (identity when ``unit == 1``)."""
        if unit == 1.0:
            return v
        r = v * unit
        return torch.where(r.abs() < tiny, torch.zeros_like(r), r)

    out: list[Tensor | None] = []
    if has_origin:
        w1 = p["w1"].reshape(O, ig * kk)
        out.append(rescale(torch.linalg.vecdot(grad.view(O, -1), w1)))  # <dL/dW[o], W1[o]>
        out.append((grad * rescale(p["v1"]).view(O, 1, 1)).view_as(p["w1"]))
    if n_taps:
        h = torch.bmm(p["filters"], grad.transpose(1, 2))  # [O, B, I/g]
        for b, (v, w) in enumerate(zip(p["taps_v"], p["taps_w"])):
            hb = h[:, b]
            out.append(rescale(torch.linalg.vecdot(hb, w)))
            out.append(hb * rescale(v).unsqueeze(1))
        out.append(None)  # filters are constants
    if has_pw or has_dws:
        grouped = grad.view(g, og, ig, kk)
    if has_pw:
        second, v4 = p["second"], p["v4"]
        tg = second.shape[-1]
        first = (p["learned"] + p["identity"]).view(g, tg, ig)
        gt = grouped.transpose(2, 3).contiguous().view(g, og * kk, ig)
        prod = torch.bmm(gt, first.transpose(1, 2))  # [g, O/g*kk, t/g]: dL/d(scaled second)
        dv4 = rescale(torch.linalg.vecdot(prod.view(O, kk * tg), second.reshape(O, kk * tg)))
        scaled = (second.reshape(g, og, kk * tg) * v4.view(g, og, 1)).view(g, og * kk, tg)
        dfirst = rescale(torch.bmm(scaled.transpose(1, 2), gt).view_as(p["learned"]))
        dsecond = prod.view(g, og, kk * tg).mul_(rescale(v4).view(g, og, 1)).view_as(second)
        out.extend([dv4, dfirst, None, dsecond])
    if has_dws:
        pw, dw, v6 = p["pw"], p["dw"], p["v6"]
        gq = grouped.transpose(1, 2).contiguous().view(g * ig, og, kk)
        d = dw.view(g * ig, e, kk)
        prod = torch.bmm(gq, d.transpose(1, 2))  # [g*I/g, O/g, e]: dL/d(scaled pointwise)
        dv6 = rescale((prod.view(g, ig, og, e) * pw.view(g, ig, og, e)).sum((1, 3)).view(O))
        scaled = pw.view(g, ig, og, e) * v6.view(g, 1, og, 1)
        ddw = rescale(torch.bmm(scaled.view(g * ig, og, e).transpose(1, 2), gq).view_as(dw))
        dpw = prod.view(g, ig, og, e).mul_(rescale(v6).view(g, 1, og, 1)).view_as(pw)
        out.extend([dv6, ddw, dpw])
    return out


def _denormal_guard_unit(grad: Tensor) -> float:
    """1.0, or on the CPU for a gradient whose largest entry is below 2**-60, the power of two just below that
    entry (GPUs process denormals at full speed; ordinary gradients are far from underflow)."""
    if grad.device.type != "cpu" or torch.compiler.is_compiling():
        return 1.0
    low, high = (v.item() for v in torch.aminmax(grad))  # one pass, no temporary
    largest = max(-low, high)
    if largest == 0.0 or largest >= 2.0**-60 or not math.isfinite(largest):
        return 1.0
    return 2.0 ** math.floor(math.log2(largest))


def generate_kernel_fused(
    kernel_size: Sequence[int],
    groups: int,
    *,
    origin: tuple[Tensor, Tensor] | None = None,
    taps: tuple[Sequence[Tensor], Sequence[Tensor], Tensor] | None = None,
    pw_kxk: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    dws: tuple[Tensor, Tensor, Tensor, int] | None = None,
) -> Tensor:
    """The OREPA kernel from the block's *storage* layouts, as one autograd node (what a block runs every step).

    Args (``None`` when the branch is absent):
        origin: ``(v [O], W [O, I/g, *K])``.
        taps: ``(scales, weights, filters)``: per-branch ``[O]`` scales and ``[O, I/g]`` weights of the 1x1
            branches with a fixed spatial filter, and the filters stacked as ``[O, B, kk]``.
        pw_kxk: ``(v, learned [t, I/g], identity [t, I/g], second [O, *K, t/g])``.
        dws: ``(v, depthwise [e*I, 1, *K], pointwise [I, O/g, e], e)``.

    Equals :func:`generate_kernel` on the natural layouts (:func:`natural_pw_kxk`, :func:`natural_dws_pointwise`).
    """
    tensors: list[Tensor] = []
    if origin is not None:
        tensors.extend(origin)
    n_taps = 0
    if taps is not None:
        scales, weights, filters = taps
        n_taps = len(weights)
        for v, w in zip(scales, weights):
            tensors.extend((v, w))
        tensors.append(filters)
    if pw_kxk is not None:
        tensors.extend(pw_kxk)
    expansion = 1
    if dws is not None:
        v6, dw, pw, expansion = dws
        tensors.extend((v6, dw, pw))
    if not tensors:
        raise ValueError("generate_kernel_fused needs at least one branch")
    spec = (tuple(kernel_size), groups, expansion, origin is not None, n_taps, (pw_kxk is not None, dws is not None))
    return _GenerateKernel.apply(spec, *tensors)
