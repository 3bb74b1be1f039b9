"""Hypothesis strategies for random conv configurations."""

from __future__ import annotations

from hypothesis import strategies as st
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_configs(draw, max_dims: int = 3, pointwise: bool = False):
    """A random conv (any dims, kernel, stride, dilation, groups, padding, padding mode, bias)
    and an input size for it; with ``pointwise`` the kernel is 1x1 (single tap)."""
    nd = draw(st.integers(1, max_dims))
    kmax = {1: 5, 2: 4, 3: 3}[nd]
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(nd))
    if pointwise:
        kernel = (1,) * nd
    elif all(k == 1 for k in kernel):
        kernel = (2,) + kernel[1:]
    groups = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    if depthwise:
        in_ch = out_ch = groups = draw(st.sampled_from([2, 3, 4]))
    else:
        in_ch = groups * draw(st.integers(1, 3))
        out_ch = groups * draw(st.integers(1, 3))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    size = tuple(dilation[i] * (kernel[i] - 1) + 3 + draw(st.integers(0, 2)) for i in range(nd))
    conv = CONV[nd](
        in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
        padding_mode=mode,
    )
    return conv, size
