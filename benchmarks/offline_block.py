"""The *offline* (DBB-style) reference that OREPA linearises: the same six branches as the OREPA block, each run on
the feature maps and each ending in its own BatchNorm, summed; the model's own BN follows as before.

It exists only as the comparison the paper makes (training cost of offline vs online re-parameterization); it is
not part of the library and is not meant to be folded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orepa_convert import OREPAConfig, inspect_model
from orepa_convert.block import generation


class OfflineBranches(nn.Module):
    """Six branches on feature maps for a 2-D conv, each followed by its own BN, summed."""

    def __init__(self, conv: nn.Conv2d, config: OREPAConfig | None = None) -> None:
        super().__init__()
        config = config or OREPAConfig()
        o, i, g = conv.out_channels, conv.in_channels, conv.groups
        k, s, d = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
        t, e = config.branch_width(i, g), config.dws_expansion
        self.pad = conv._reversed_padding_repeated_twice if isinstance(conv.padding, tuple) else None
        self.mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        self.centre = generation.centre_tap(k)
        self.k, self.s, self.d = k, s, d

        def conv_bn(cin, cout, ks, stride=1, dilation=1, groups=1):
            return nn.Sequential(nn.Conv2d(cin, cout, ks, stride, 0, dilation, groups, bias=False), nn.BatchNorm2d(cout))

        self.origin = conv_bn(i, o, k, s, d, g)
        self.avg = nn.Sequential(nn.Conv2d(i, o, 1, groups=g, bias=False), nn.BatchNorm2d(o))
        self.prior_1x1 = nn.Conv2d(i, o, 1, groups=g, bias=False)
        self.register_buffer("prior_filter", generation.dct_prior_filters(o, k, torch.float32).unsqueeze(1))
        self.prior_bn = nn.BatchNorm2d(o)
        self.pw_kxk = nn.Sequential(nn.Conv2d(i, t, 1, groups=g, bias=False), nn.BatchNorm2d(t), *conv_bn(t, o, k, s, d, g))
        self.pw = conv_bn(i, o, 1, s, 1, g)
        self.dws = nn.Sequential(nn.Conv2d(i, e * i, k, s, 0, d, groups=i, bias=False), nn.BatchNorm2d(e * i),
                                 *conv_bn(e * i, o, 1, 1, 1, g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = F.pad(x, self.pad, mode=self.mode) if self.pad is not None else x
        y = self.origin(xp)
        h, w = y.shape[-2:]
        avg = F.avg_pool2d(self.avg[0](xp), self.k, self.s) if self.d == (1, 1) else None
        if avg is None:  # dilated: average as a depthwise filter with the conv's dilation
            z = self.avg[0](xp)
            ones = torch.full((z.shape[1], 1, *self.k), 1.0 / (self.k[0] * self.k[1]), device=z.device, dtype=z.dtype)
            avg = F.conv2d(z, ones, stride=self.s, dilation=self.d, groups=z.shape[1])
        y = y + self.avg[1](avg)
        z = self.prior_1x1(xp)
        y = y + self.prior_bn(F.conv2d(z, self.prior_filter.to(z.dtype), stride=self.s, dilation=self.d, groups=z.shape[1]))
        y = y + self.pw_kxk(xp)
        ci, cj = (c * dd for c, dd in zip(self.centre, self.d))
        y = y + self.pw(xp[..., ci:ci + (h - 1) * self.s[0] + 1, cj:cj + (w - 1) * self.s[1] + 1])
        return y + self.dws(xp)


def to_offline(model: nn.Module, config: OREPAConfig | None = None) -> int:
    """Replace every conv that ``convert_to_orepa`` would convert by :class:`OfflineBranches`; returns the count."""
    report = inspect_model(model, config)
    count = 0
    for record in report.records:
        if record.status != "to convert":
            continue
        conv = model.get_submodule(record.path)
        if type(conv) is not nn.Conv2d or isinstance(conv.padding, str):
            continue  # the offline reference covers static-padding 2-D convs, as in the paper's models
        parent, _, name = record.path.rpartition(".")
        block = OfflineBranches(conv, config).to(next(conv.parameters()).device)
        block.train(conv.training)
        setattr(model.get_submodule(parent), name, block)
        count += 1
    return count
