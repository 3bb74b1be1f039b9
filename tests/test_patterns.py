"""Pattern matching on traced graphs: call sites, consumers, activations, eligibility reasons."""

from __future__ import annotations

import torch
from torch import nn

from models import SharedConv, TwoConsumers, conv_bn
from orepa_convert.patterns import match_convs
from orepa_convert.tracing import trace_model


def _matches(model):
    return {m.path: m for m in match_convs(model, trace_model(model))}


def test_conv_bn_act_module_and_functional():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.nn.functional.silu(self.bn(self.conv(x)))

    found = _matches(nn.Sequential(conv_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), Functional()))
    assert found["0.0"].eligible and found["0.0"].sites[0].act == "ReLU" and found["0.0"].bn_paths == ["0.1"]
    assert found["1.conv"].eligible and found["1.conv"].sites[0].act == "silu"


def test_consumers_and_shared_convs():
    two = _matches(TwoConsumers())["conv"]
    assert not two.eligible and "2 consumers" in two.reason
    shared = _matches(SharedConv())
    (match,) = shared.values()
    assert match.eligible and len(match.sites) == 2 and len(set(match.bn_paths)) == 2


def test_non_bn_consumer_and_unsupported_conv():
    found = _matches(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    assert "not a batch norm" in found["0"].reason
    assert not found["2"].eligible  # a 1x1 conv has one tap
