"""Pure kernel maths of OREPA: each branch as a dense conv kernel, their weighted sum, and BN folding.

Every function works for 1-, 2- and 3-D kernels and any groups. Notation: a conv kernel has shape
``[O, I/g, *K]``; ``kk = prod(K)`` is its number of taps. Nothing here touches ``nn.Module`` state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, cast

import torch
from torch import Tensor

from ..config import BRANCHES


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


def tap_filter(
    branch: str, out_channels: int, kernel_size: Sequence[int], dtype: torch.dtype = torch.float64
) -> Tensor:
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
        centre: tuple[slice | int, ...] = (slice(None), *centre_tap(kernel_size))
        filt[centre] = 1.0
        return filt
    raise ValueError(f"no fixed tap filter for branch {branch!r}")


def stacked_identity(width: int, in_channels: int, groups: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The fixed part ``[t, I/g]`` of the 1x1->kxk branch's first 1x1 conv: row ``r`` of each group maps to
    input ``r mod (I/g)`` of that group (the plain identity when ``t == I``)."""
    if width % groups or in_channels % groups:
        raise ValueError(f"width {width} and in_channels {in_channels} must be divisible by groups {groups}")
    per_group, in_per_group = width // groups, in_channels // groups
    rows = torch.arange(width) % per_group % in_per_group
    return torch.nn.functional.one_hot(rows, in_per_group).to(dtype)


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
    """Static description of one block's kernel generation, built once per block (blocks with equal plans
    generate together, stacked).

    ``shape`` is the kernel shape ``[O, I/g, *K]``; ``rows`` gives the row of ``scales [n, O]`` of the origin
    branch, of the first fixed-filter 1x1 branch, of ``pw_kxk`` and of ``dws`` (-1 when absent); ``num_taps``
    is the number of fixed-filter 1x1 branches (their rows follow each other); ``width`` is the 1x1->kxk
    internal width ``t`` (0 without that branch).
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
    width: int = 0

    @property
    def plain_identity(self) -> bool:
        """Whether the 1x1->kxk branch's fixed first factor is the plain identity (``t == I``)."""
        return self.width == self.in_per_group * self.groups

    @property
    def kinds(self) -> tuple[str, ...]:
        """The parameter tensors a block with this plan has, in :data:`PARAMETER_KINDS` order."""
        r_origin, r_taps, r_pw, r_dws = self.rows
        present = {"scales": True, "origin": r_origin >= 0, "taps": r_taps >= 0, "pw_in": r_pw >= 0,
                   "pw": r_pw >= 0, "dws_dw": r_dws >= 0, "dws_pw": r_dws >= 0}  # fmt: skip
        return tuple(k for k in PARAMETER_KINDS if present[k])


#: The parameter tensors of a block, in the order :func:`generate_kernels_stacked` takes them.
PARAMETER_KINDS: tuple[str, ...] = ("scales", "origin", "taps", "pw_in", "pw", "dws_dw", "dws_pw")


def generation_plan(
    shape: Sequence[int], groups: int, branches: Sequence[str], expansion: int, width: int = 0
) -> GenerationPlan:
    """The :class:`GenerationPlan` of a block with kernel ``shape`` and ``branches`` (scale rows in
    :data:`~orepa_convert.config.BRANCHES` order); ``width`` is the 1x1->kxk internal width."""
    order = [b for b in BRANCHES if b in branches]
    if not order:
        raise ValueError(f"a generation plan needs at least one of the branches {BRANCHES}, got {branches!r}")
    if "pw_kxk" in order and (width < groups or width % groups):
        raise ValueError(
            f"the 1x1->kxk branch needs a width that is a positive multiple of groups={groups}, got {width}"
        )
    taps = tap_branches(order)
    r_origin, r_taps, r_pw, r_dws = (
        order.index(b) if b in order else -1 for b in ("origin", taps[0] if taps else "", "pw_kxk", "dws")
    )
    rows = (r_origin, r_taps, r_pw, r_dws)
    return GenerationPlan(
        tuple(shape),
        shape[0],
        shape[1],
        math.prod(shape[2:]),
        groups,
        len(order),
        rows,
        len(taps),
        expansion,
        width if "pw_kxk" in order else 0,
    )


def _stacked_forward(
    plan: GenerationPlan, count: int, t: dict[str, Tensor], filters: Tensor | None, identity: Tensor | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The kernels ``[G, O, I/g, kk]`` of ``G = count`` blocks from their stacked storage tensors ``t`` (each
    ``[G, *storage shape]``), and what the backward keeps. Seven or eight ops whatever ``G``."""
    G, o, ig, kk, g, e = count, plan.out_channels, plan.in_per_group, plan.kernel_taps, plan.groups, plan.expansion
    og, (r_origin, r_taps, r_pw, r_dws) = o // g, plan.rows
    v = t["scales"].view(G, plan.num_branches, o)
    keep: dict[str, Tensor] = {}
    if r_origin >= 0:
        kernel = t["origin"].reshape(G, o, ig, kk) * v[:, r_origin, :, None, None]
    else:
        kernel = v.new_zeros(G, o, ig, kk)
    if r_taps >= 0:
        b = plan.num_taps
        keep["fv"] = fv = cast(Tensor, filters) * v[:, r_taps : r_taps + b].transpose(1, 2).unsqueeze(
            -1
        )  # [G, O, B, kk]
        kernel.view(G * o, ig, kk).baddbmm_(t["taps"].reshape(G * o, b, ig).transpose(1, 2), fv.view(G * o, b, kk))
    grouped = kernel.view(G * g, og, ig, kk)
    if r_pw >= 0:
        tg = plan.width // g
        second = t["pw"].reshape(G * g, og * kk, tg)
        # the unscaled branch kernel in [G*g, O/g*kk, I/g] layout; kept for the scale gradient
        if plan.plain_identity:  # second @ (learned + I) = second + second @ learned: one op, no sum kept
            keep["prod"] = prod = torch.baddbmm(second, second, t["pw_in"].reshape(G * g, tg, ig))
        else:
            keep["first"] = first = t["pw_in"] + cast(Tensor, identity)  # [G, t, I/g]
            keep["prod"] = prod = torch.bmm(second, first.view(G * g, tg, ig))
        grouped.addcmul_(prod.view(G * g, og, kk, ig).transpose(2, 3), v[:, r_pw].reshape(G * g, og, 1, 1))
    if r_dws >= 0:
        pointwise = t["dws_pw"].reshape(G * g * ig, e, og).transpose(1, 2)
        keep["dense"] = dense = torch.bmm(pointwise, t["dws_dw"].reshape(G * g * ig, e, kk))  # [G*I, O/g, kk]
        grouped.addcmul_(dense.view(G * g, ig, og, kk).transpose(1, 2), v[:, r_dws].reshape(G * g, og, 1, 1))
    return kernel, keep


def _stacked_backward(
    plan: GenerationPlan,
    count: int,
    grad: Tensor,
    t: dict[str, Tensor],
    keep: dict[str, Tensor],
    filters: Tensor | None,
) -> dict[str, Tensor]:
    """Gradients ``[G, *storage shape]`` of every parameter kind from the stacked kernel gradients ``grad``.

    Each scale gradient is one product and one reduction; gradients that a scale multiplies come out of a
    contraction with an already scaled factor, or are scaled in place. Transposed reads of the gradient (about
    ten times slower than contiguous passes on CPUs) happen once per branch that needs another layout, in a pass
    that also scales (``dws``) or in the one copy whose layout matches the kept branch kernel (``pw_kxk``).
    Nineteen ops whatever ``G``.
    """
    G, o, ig, kk, g, e = count, plan.out_channels, plan.in_per_group, plan.kernel_taps, plan.groups, plan.expansion
    og, n, (r_origin, r_taps, r_pw, r_dws) = o // g, plan.num_branches, plan.rows
    grad = grad.reshape(G, o, ig, kk)
    v = t["scales"].view(G, n, o)
    fv = keep.get("fv")
    unit = _denormal_guard_unit(grad)
    if unit != 1.0:
        # A tiny gradient (e.g. behind a zero-initialised BN gamma) times tiny scales would underflow into
        # denormals inside the GEMMs, ~100x slower on CPUs. Work on the gradient divided by a power of two near
        # its maximum (exact), multiply the scales that weight the branch gradients by that power (flushing
        # what leaves the normal range) and the scale gradients at the end.
        grad = grad / unit
        v = _scaled_flushed(v, unit)
        fv = None if fv is None else _scaled_flushed(fv, unit)
    dv = grad.new_empty(G, n, o)
    out: dict[str, Tensor] = {"scales": dv}
    if r_origin >= 0:
        origin = t["origin"].reshape(G, o, ig, kk)
        torch.sum(grad * origin, (2, 3), out=dv[:, r_origin])
        out["origin"] = (grad * v[:, r_origin, :, None, None]).view(t["origin"].shape)
    if r_taps >= 0:
        b = plan.num_taps
        rows = grad.view(G * o, ig, kk)
        u = torch.bmm(t["taps"].reshape(G * o, b, ig), rows)  # [G*O, B, kk]
        torch.sum(u.view(G, o, b, kk) * cast(Tensor, filters), 3, out=dv[:, r_taps : r_taps + b].transpose(1, 2))
        out["taps"] = torch.bmm(cast(Tensor, fv).view(G * o, b, kk), rows.transpose(1, 2)).view(t["taps"].shape)
    if r_pw >= 0:
        tg = plan.width // g
        # the gradient in the layout of the kept branch kernel [G*g, O/g*kk, I/g] (the one transposing pass);
        # everything after it reads contiguously
        gt = grad.new_empty(G * g, og, kk, ig)
        gt.copy_(grad.view(G * g, og, ig, kk).transpose(2, 3))
        gt = gt.view(G * g, og * kk, ig)
        torch.sum((gt * keep["prod"]).view(G, g, og, kk * ig), 3, out=dv[:, r_pw].view(G, g, og))
        if plan.plain_identity:
            d_pw = torch.baddbmm(gt, gt, t["pw_in"].reshape(G * g, tg, ig).transpose(1, 2))
        else:
            d_pw = torch.bmm(gt, keep["first"].view(G * g, tg, ig).transpose(1, 2))
        scale = v[:, r_pw].reshape(G * g, og, 1)
        out["pw"] = d_pw.view(G * g, og, kk * tg).mul_(scale).view(t["pw"].shape)
        scaled_second = (t["pw"].reshape(G * g, og, kk * tg) * scale).view(G * g, og * kk, tg)
        out["pw_in"] = torch.bmm(scaled_second.transpose(1, 2), gt).view(t["pw_in"].shape)
    if r_dws >= 0:
        # the scaled gradient as [G*g*I/g, O/g, kk] (input channel outermost), in one pass
        scaled = grad.new_empty(G * g, ig, og, kk)
        torch.mul(grad.view(G * g, og, ig, kk).transpose(1, 2), v[:, r_dws].reshape(G * g, 1, og, 1), out=scaled)
        scaled = scaled.view(G * g * ig, og, kk)
        pointwise = t["dws_pw"].reshape(G * g * ig, e, og)
        out["dws_dw"] = torch.bmm(pointwise, scaled).view(t["dws_dw"].shape)
        out["dws_pw"] = torch.bmm(t["dws_dw"].reshape(G * g * ig, e, kk), scaled.transpose(1, 2)).view(
            t["dws_pw"].shape
        )
        dense = keep["dense"].view(G, g, ig, og, kk).transpose(2, 3)
        torch.sum(grad.view(G, g, og, ig, kk) * dense, (3, 4), out=dv[:, r_dws].view(G, g, og))
    if unit != 1.0:
        out["scales"] = _scaled_flushed(dv, unit)
    out["scales"] = out["scales"].view(t["scales"].shape)
    return out


def _stack_inputs(plan: GenerationPlan, count: int, flat: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Each parameter kind of ``count`` blocks (``flat``, kind-major) as one ``[G, *storage shape]`` tensor in
    ``dtype``: views for one block, else one ``cat`` of everything and views into it."""
    if count == 1:
        return [x.to(dtype).unsqueeze(0) for x in flat]
    shapes = [flat[i * count].shape for i in range(len(plan.kinds))]  # the blocks of a plan store equal shapes
    buffer = torch.cat([x.reshape(-1) for x in flat]).to(dtype)
    sizes = [count * math.prod(shape) for shape in shapes]
    return [part.view(count, *shape) for part, shape in zip(buffer.split(sizes), shapes)]


class _GenerateStacked(torch.autograd.Function):
    """The kernels of ``count`` blocks with one :class:`GenerationPlan`, as one autograd node.

    Inputs are every block's storage tensors, kind-major (all scales, then all origin weights, ...). One block
    works on views (``unsqueeze``); several are concatenated in one ``cat`` and computed with a leading stack
    dimension, so the number of ops (on a GPU: kernel launches) does not grow with the number of blocks. Backward
    keeps the inputs (concatenating a group's again), the small filter stack, the ``[t, I/g]`` first factor when
    ``t != I`` and the unscaled 1x1->kxk and depthwise-separable branch kernels, and returns each block's
    gradients as views of the stacked results.
    """

    @staticmethod
    def forward(ctx, plan, count, dtype, filters, identity, *flat):  # type: ignore[override]
        stacked = _stack_inputs(plan, count, flat, dtype)
        kernel, keep = _stacked_forward(plan, count, dict(zip(plan.kinds, stacked)), filters, identity)
        ctx.plan, ctx.count, ctx.dtype, ctx.keep_names = plan, count, dtype, tuple(keep)
        ctx.in_dtypes = tuple(x.dtype for x in flat[::count])
        # A group keeps its parameters, not their concatenated copy, and concatenates again in backward.
        ctx.save_for_backward(filters, *(stacked if count == 1 else flat), *keep.values())
        return tuple(kernel.view(count, *plan.shape).unbind(0))

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: this hand-written backward is not itself differentiable
            raise RuntimeError(
                "double backward (create_graph=True) through OREPA's fused kernel generation is not supported; "
                "use torch.func transforms (torch.func.grad / jacrev / hessian), under which OREPA blocks generate "
                "their kernels with plain differentiable ops, or call fold_orepa(model) first"
            )
        plan, count = ctx.plan, ctx.count
        filters, *saved = ctx.saved_tensors
        kinds = plan.kinds
        inputs = len(kinds) * (1 if count == 1 else count)
        stacked = saved[:inputs] if count == 1 else _stack_inputs(plan, count, saved[:inputs], ctx.dtype)
        t = dict(zip(kinds, stacked))
        keep = dict(zip(ctx.keep_names, saved[inputs:]))
        grad = grads[0].unsqueeze(0) if count == 1 else torch.stack(grads)
        out = _stacked_backward(plan, count, grad.contiguous(), t, keep, filters)
        result: list[Tensor | None] = []
        for kind, dtype in zip(kinds, ctx.in_dtypes):
            result.extend(out[kind].to(dtype).unbind(0))
        needed = ctx.needs_input_grad[5:]
        return (None, None, None, None, None, *(r if need else None for r, need in zip(result, needed)))


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
    low, high = torch.stack(torch.aminmax(grad)).tolist()  # one pass, one host read
    largest = max(-low, high)
    if largest == 0.0 or largest >= 2.0**-60 or not math.isfinite(largest):
        return 1.0
    return 2.0 ** math.floor(math.log2(largest))


def generate_kernels_stacked(
    plan: GenerationPlan,
    blocks: Sequence[Sequence[Tensor]],
    filters: Tensor | None,
    identity: Tensor | None,
    dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    """The OREPA kernels of blocks sharing one ``plan``, in ``dtype``, as one autograd node (a step's generation).

    Args:
        plan: shapes and scale rows, from :func:`generation_plan`.
        blocks: per block, its storage tensors in :attr:`GenerationPlan.kinds` order: ``scales [n * O]`` (row
            ``j`` of its ``[n, O]`` view scales branch ``j``), origin ``W [O, I/g, *K]``, fixed-filter 1x1
            weights ``[O, B, I/g]``, the 1x1->kxk learned first factor ``[t, I/g]`` and second factor
            ``[O, *K, t/g]``, depthwise ``[e*I, 1, *K]`` and pointwise ``[I, e, O/g]`` (absent branches omitted).
        filters: the fixed tap filters ``[O, B, kk]`` (``None`` without fixed-filter branches).
        identity: the fixed part ``[t, I/g]`` of the 1x1->kxk first factor (``None`` without that branch).
        dtype: the compute dtype (the parameters may have another; gradients come back in theirs).

    Returns one kernel ``[O, I/g, *K]`` per block. Equals :func:`generate_kernel_autograd`, and the dense
    branch-by-branch reference (``tests/oracles.py``) on the natural layouts (:func:`natural_pw_kxk`,
    :func:`natural_dws_pointwise`).
    """
    kinds = plan.kinds
    if not blocks or any(len(b) != len(kinds) for b in blocks):
        raise ValueError(f"each block needs its {len(kinds)} tensors {kinds}")
    flat = [block[i] for i in range(len(kinds)) for block in blocks]
    return _GenerateStacked.apply(plan, len(blocks), dtype, filters, identity, *flat)


def generate_kernel_autograd(
    plan: GenerationPlan, tensors: Sequence[Tensor], filters: Tensor | None, identity: Tensor | None
) -> Tensor:
    """One block's kernel from its storage tensors (as :func:`generate_kernels_stacked` takes them) with plain,
    differentiable torch ops: what ``torch.compile`` traces (its compiler fuses the elementwise work) and what
    ``torch.func`` transforms and double backward go through."""
    t = dict(zip(plan.kinds, tensors))
    o, ig, kk, g, e = plan.out_channels, plan.in_per_group, plan.kernel_taps, plan.groups, plan.expansion
    og, (r_origin, r_taps, r_pw, r_dws) = o // g, plan.rows
    v = t["scales"].view(plan.num_branches, o)
    parts = []
    if r_origin >= 0:
        parts.append(t["origin"].reshape(o, ig, kk) * v[r_origin].view(o, 1, 1))
    if r_taps >= 0:
        fv = cast(Tensor, filters) * v[r_taps : r_taps + plan.num_taps].t().unsqueeze(-1)  # [O, B, kk]
        parts.append(torch.bmm(t["taps"].transpose(1, 2), fv))
    if r_pw >= 0:
        tg = plan.width // g
        prod = torch.bmm(t["pw"].reshape(g, og * kk, tg), (t["pw_in"] + cast(Tensor, identity)).view(g, tg, ig))
        parts.append((prod.view(g, og, kk, ig).transpose(2, 3) * v[r_pw].view(g, og, 1, 1)).reshape(o, ig, kk))
    if r_dws >= 0:
        pointwise = t["dws_pw"].reshape(g * ig, e, og).transpose(1, 2)
        dense = torch.bmm(pointwise, t["dws_dw"].reshape(g * ig, e, kk)).view(g, ig, og, kk).transpose(1, 2)
        parts.append((dense * v[r_dws].view(g, og, 1, 1)).reshape(o, ig, kk))
    kernel = parts[0]
    for part in parts[1:]:
        kernel = kernel + part
    return kernel.view(plan.shape)
