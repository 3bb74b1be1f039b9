"""Users' own batch norm and conv classes: registered, they convert and fold exactly like the built-in ones."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from offline import rel_err
from orepa_convert import (
    OREPAConv,
    convert_to_orepa,
    fold_orepa,
    inspect_model,
    register_batchnorm_type,
    register_conv_type,
)


class AffineNorm(nn.Module):
    """A batch norm that is not a ``_BatchNorm`` (e.g. a framework's own), with the usual attributes."""

    def __init__(self, c: int) -> None:
        nn.Module.__init__(self)  # not super(): the test copies this class under another name
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c) * 0.1)
        self.register_buffer("running_mean", torch.randn(c) * 0.1)
        self.register_buffer("running_var", torch.rand(c) + 0.5)
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                        self.training, 0.1, self.eps)


class ReflectConv(nn.Conv2d):
    """A conv subclass with its own forward: reflect-pads at run time, then the plain convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), self.weight, self.bias)


def _model(norm: type = AffineNorm, conv: type = ReflectConv) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(conv(3, 8, 3), norm(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), norm(8)).double()


def test_unregistered_classes_are_left_alone_with_a_reason():
    # classes of their own (registration is global and other tests register AffineNorm and ReflectConv)
    norm = type("UnregisteredNorm", (nn.Module,), dict(AffineNorm.__dict__))
    conv = type("UnregisteredConv", (nn.Conv2d,), {"forward": ReflectConv.forward})
    report = inspect_model(_model(norm, conv))
    assert report.eligible == 0 and report.candidates == 2
    assert any("overrides forward" in r.reason for r in report.records)


def test_registered_classes_convert_train_and_fold_exactly():
    register_batchnorm_type(AffineNorm)
    assert register_conv_type(ReflectConv) is ReflectConv  # usable as a decorator
    model = _model().eval()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    _, report = convert_to_orepa(model, init="preserve_live", return_report=True)
    assert report.converted == 2 and isinstance(model[0], OREPAConv)
    with torch.no_grad():
        assert rel_err(model(x), y) <= 1e-12  # the same function
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(x)
        folded = fold_orepa(copy.deepcopy(model))
        assert type(folded[0]) is ReflectConv and rel_err(folded(x), trained) <= 1e-12
        fused = fold_orepa(copy.deepcopy(model), fuse_bn=True)
        assert rel_err(fused(x), trained) <= 1e-10


def test_registration_refuses_what_it_cannot_use():
    with pytest.raises(TypeError, match="nn.Conv1d/2d/3d"):
        register_conv_type(nn.Linear)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_batchnorm_type(lambda x: x)
