"""Hand-made models for the corner cases of the conversion pass, and helpers shared by the tests."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import tensors  # noqa: E402,F401  (shared with the benchmarks)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that equivalence checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def randomise_block(block: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter of an OREPA block (scales included) non-trivial values, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)
    return block


class SharedConv(nn.Module):
    """One conv module called twice, each call feeding its own BN: eligible, converted once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


class TwoConsumers(nn.Module):
    """A conv whose output feeds a BN and a residual add: not eligible."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def conv_bn(conv: nn.Module, bn: nn.Module, act: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(conv, bn, act or nn.Identity())


class Variety(nn.Module):
    """Reflect padding, dilation, groups, depthwise, non-square and even kernels, each conv -> BN -> act."""

    def __init__(self) -> None:
        super().__init__()
        self.reflect = conv_bn(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU())
        self.dilated = conv_bn(nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8), nn.SiLU())
        self.grouped = conv_bn(nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=True), nn.BatchNorm2d(12))
        self.depthwise = conv_bn(nn.Conv2d(12, 12, 5, padding=2, stride=2, groups=12), nn.BatchNorm2d(12))
        self.nonsquare = conv_bn(nn.Conv2d(12, 8, (1, 3), padding=(0, 1), padding_mode="circular"), nn.BatchNorm2d(8))
        self.even = conv_bn(nn.Conv2d(8, 8, 2, padding=1, padding_mode="replicate"), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 2, 1)  # 1x1 and no BN: a candidate, ineligible

    def forward(self, x):
        for name in ("reflect", "dilated", "grouped", "depthwise", "nonsquare", "even"):
            x = getattr(self, name)(x)
        return self.head(x)


class OneAndThreeD(nn.Module):
    """Conv1d -> BatchNorm1d and Conv3d -> BatchNorm3d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = conv_bn(nn.Conv1d(3, 6, 5, padding=2), nn.BatchNorm1d(6), nn.ReLU())
        self.c3 = conv_bn(nn.Conv3d(6, 4, 3, padding=1), nn.BatchNorm3d(4))

    def forward(self, x):  # x: [N, 3, L]; L = 64 = 4 x 4 x 4
        y = self.c1(x)
        return self.c3(y.reshape(y.shape[0], 6, 4, 4, 4))


class DataDependent(nn.Module):
    """A top-level forward with data-dependent control flow (untraceable); its children trace fine."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = conv_bn(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        y = self.a(x)
        if y.mean() > 0:  # noqa: SIM108 - data-dependent on purpose
            y = self.b(y)
        else:
            y = self.b(-y)
        return y


class DataGate(nn.Module):
    """A child whose own forward has data-dependent control flow, around a conv -> BN of its own."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = conv_bn(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))

    def forward(self, x):
        y = self.inner(x)
        return y * 2 if y.mean() > 0 else y


class StemGateHead(nn.Module):
    """conv -> BN in the parent's own forward, an untraceable child between them, then conv -> BN again: only the
    child's call may become opaque; both of the parent's pairs and the child's own pair are eligible."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.gate = DataGate(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.gate(x)
        return self.bn2(self.conv2(x))


class ListOfBlocks(nn.Module):
    """Blocks in a ModuleList, called from an untraceable forward: the list is a container, not a region."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(conv_bn(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8)) for c in (3, 8))

    def forward(self, x):
        for block in self.blocks:
            x = block(x) if x.mean() > -10 else x
        return x
