"""Offline (feature-map) forms of the OREPA branches, for testing the kernel maths against.

The input is padded exactly as the conv pads it, then each branch runs its own ops with padding 0.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from orepa_convert.block import generation

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def rel_err(a: Tensor, b: Tensor) -> float:
    """The project's single error measure: max|a - b| / max|b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def pad_like_conv(conv: nn.Module, x: Tensor) -> Tensor:
    """Pad ``x`` exactly as ``conv`` does before convolving (static, 'same', or timm's run-time same)."""
    if type(conv).__name__ == "Conv2dSame":
        from timm.layers.padding import pad_same

        return pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)


def _tap_branch(x: Tensor, weight: Tensor, filt: Tensor, stride, dilation, groups: int) -> Tensor:
    """1x1 conv, then the fixed per-output-channel kxk filter as a depthwise conv."""
    nd = filt.dim() - 1
    conv = _CONV[nd]
    y = conv(x, weight.reshape(*weight.shape, *([1] * nd)), groups=groups)
    return conv(y, filt.unsqueeze(1), stride=stride, dilation=dilation, groups=filt.shape[0])


def branch_outputs(block, xp: Tensor) -> dict[str, Tensor]:
    """Each branch of ``block`` run on the padded input ``xp``, *unscaled*."""
    c = block.conv
    nd = len(c.kernel_size)
    conv = _CONV[nd]
    s, d, g = c.stride, c.dilation, c.groups
    K = tuple(c.kernel_size)
    p = dict(block.named_parameters())
    out: dict[str, Tensor] = {}
    for b in block.branches:
        if b == "origin":
            out[b] = conv(xp, p["weight_origin"], stride=s, dilation=d, groups=g)
        elif b == "avg":
            filt = generation.tap_filter("avg", c.out_channels, K, xp.dtype)
            out[b] = _tap_branch(xp, block.branch_weight("avg"), filt, s, d, g)
            if all(di == 1 for di in d):  # with no dilation it is literally average pooling
                w = block.branch_weight("avg")
                y = conv(xp, w.reshape(*w.shape, *([1] * nd)), groups=g)
                pooled = _AVG[nd](y, K, stride=s)
                assert rel_err(pooled, out[b]) < 1e-12
        elif b == "prior":
            filt = generation.tap_filter("prior", c.out_channels, K, xp.dtype)
            out[b] = _tap_branch(xp, block.branch_weight("prior"), filt, s, d, g)
        elif b == "pw":
            # a 1x1 conv on the padded input offset by the centre tap, sampled with the stride
            centre = generation.centre_tap(K)
            idx = [slice(None), slice(None)]
            for axis in range(nd):
                n_out = (xp.shape[2 + axis] - d[axis] * (K[axis] - 1) - 1) // s[axis] + 1
                start = centre[axis] * d[axis]
                idx.append(slice(start, start + (n_out - 1) * s[axis] + 1, s[axis]))
            w = block.branch_weight("pw")
            out[b] = conv(xp[tuple(idx)], w.reshape(*w.shape, *([1] * nd)), groups=g)
        elif b == "pw_kxk":
            first = generation.stacked_identity(block.pw_kxk_width, c.in_channels, g, xp.dtype) + p["weight_pw_kxk_in"]
            y = conv(xp, first.reshape(*first.shape, *([1] * nd)), groups=g)
            out[b] = conv(y, generation.natural_pw_kxk(p["weight_pw_kxk"]), stride=s, dilation=d, groups=g)
        elif b == "dws":
            y = conv(xp, p["weight_dws_dw"], stride=s, dilation=d, groups=c.in_channels)
            w = generation.natural_dws_pointwise(p["weight_dws_pw"], g)
            out[b] = conv(y, w.reshape(*w.shape, *([1] * nd)), groups=g)
    return out


def offline_block(block, x: Tensor) -> Tensor:
    """The block computed on feature maps: sum of per-channel scaled branches, plus the bias."""
    xp = pad_like_conv(block.conv, x)
    nd = xp.dim() - 2
    total = None
    for b, y in branch_outputs(block, xp).items():
        v = block.scale(b).reshape(1, -1, *([1] * nd))
        total = v * y if total is None else total + v * y
    if block.bias is not None:
        total = total + block.bias.reshape(1, -1, *([1] * nd))
    return total
