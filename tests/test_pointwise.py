"""The 1x1 OREPA block (the paper's OREPA_1x1), opted in with 1 in kernel_sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from models import randomise_block
from offline import offline_block, rel_err
from orepa_convert import OREPAConfig, OREPAConv, convert_to_orepa, fold_orepa, inspect_model, orepa_state
from orepa_convert.cli import main
from orepa_convert.cli.model_specs import build_model
from orepa_convert.state import restore_from_orepa_state
from strategies import conv_configs

POINTWISE = OREPAConfig(init="paper", kernel_sizes=(1, 3))


def _chain_oracle(block: OREPAConv, x: torch.Tensor) -> torch.Tensor:
    """origin 1x1 + the 1x1 -> 1x1 chain, run as feature maps, each scaled per output channel."""
    conv, nd, g = block.conv, x.dim() - 2, block.groups
    fn = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}[nd]
    xp = nn.functional.pad(x, conv._reversed_padding_repeated_twice,
                           mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    one = (1,) * nd
    v = block.scales.view(2, -1)
    shape = (1, -1) + one
    origin = fn(xp, block.weight_origin, stride=conv.stride, dilation=conv.dilation, groups=g)
    first = (block.pw_kxk_identity.to(x.dtype) + block.weight_pw_kxk_in).reshape(block.pw_kxk_width, -1, *one)
    second = block.weight_pw_kxk.reshape(block.out_channels, -1, *one)
    chain = fn(fn(xp, first, groups=g), second, stride=conv.stride, dilation=conv.dilation, groups=g)
    out = origin * v[0].view(shape) + chain * v[1].view(shape)
    return out if block.bias is None else out + block.bias.view(shape)


@settings(deadline=None, max_examples=40)
@given(conv_configs(pointwise=True))
def test_pointwise_block_equals_its_branches_and_folds_exactly_float64(cfg):
    conv, size = cfg
    block = randomise_block(OREPAConv(conv.double(), POINTWISE))
    assert block.branches == ("origin", "pw_kxk")
    x = torch.randn(2, conv.in_channels, *size, dtype=torch.float64)
    y = block(x)
    assert rel_err(y, _chain_oracle(block, x)) <= 1e-12
    assert rel_err(y, offline_block(block, x)) <= 1e-12
    folded = copy.deepcopy(block).fold()
    assert type(folded) is type(conv)
    assert tuple(folded.weight.shape) == (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
    assert rel_err(folded(x), y) <= 1e-12


@settings(deadline=None, max_examples=20)
@given(conv_configs(pointwise=True))
def test_pointwise_preserve_is_exact_and_paper_scales_follow_the_reference(cfg):
    conv, size = cfg
    x = torch.randn(2, conv.in_channels, *size)
    expected = conv(x)
    paper = OREPAConv(copy.deepcopy(conv), POINTWISE)
    assert paper.scales.view(2, -1)[:, 0].tolist() == [1.0, 0.5]
    block = OREPAConv(conv, POINTWISE.replace(init="preserve"))
    assert torch.equal(block(x), expected)
    with torch.no_grad():
        assert rel_err(block.eval().fold()(x), expected) <= 1e-6


def test_pointwise_gradients_reach_every_branch():
    block = OREPAConv(nn.Conv2d(6, 4, 1, groups=2), POINTWISE)
    block(torch.randn(2, 6, 5, 5)).square().sum().backward()
    block.zero_grad()
    with torch.no_grad():
        block.scales.add_(0.1)
    block(torch.randn(2, 6, 5, 5)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_default_selection_leaves_1x1_alone_and_explains_how_to_opt_in():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    report = inspect_model(model)
    assert report.converted == 0 and "kernel_sizes=(1, 3)" in report.records[0].reason
    assert inspect_model(model, kernel_sizes=(1, 3)).converted == 1
    with pytest.raises(ValueError, match="needs the 'pw_kxk' branch"):
        OREPAConfig(kernel_sizes=(1, 3), branches=("origin", "avg"))
    with pytest.raises(ValueError, match="needs the 'pw_kxk' branch"):
        OREPAConv(nn.Conv2d(3, 8, 1), OREPAConfig(branches=("origin", "avg")))
    assert OREPAConv(nn.Conv2d(3, 8, 1)).branches == ("origin", "pw_kxk")  # a block built directly needs no opt-in


@pytest.mark.parametrize("spec, kxk, pointwise", [("yolov8n.yaml", 39, 18), ("timm:resnet50", 17, 36)])
def test_models_convert_1x1_fold_exactly_and_restore(spec, kxk, pointwise):
    torch.manual_seed(0)
    model = build_model(spec).eval()
    assert inspect_model(model).converted == kxk
    _, report = convert_to_orepa(model, kernel_sizes=(1, 3, 5, 7), return_report=True)  # preserve; "trained" below
    assert report.converted == kxk + pointwise
    blocks = [m for m in model.modules() if isinstance(m, OREPAConv)]
    assert sum(m.kernel_size == (1, 1) for m in blocks) == pointwise
    _randomise_all(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = _flat(model(x))
    keys = set(build_model(spec).state_dict())
    fresh = build_model(spec)
    restore_from_orepa_state(fresh, orepa_state(model))
    fresh.load_state_dict(model.state_dict())
    fold_orepa(model)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert rel_err(_flat(model(x)), before) <= 1e-5
        assert rel_err(_flat(fresh.eval()(x)), before) <= 1e-6


def test_timm_reparameterize_model_folds_1x1_blocks():
    from timm.utils import reparameterize_model

    model = build_model("timm:resnet50").eval()
    convert_to_orepa(model, kernel_sizes=(1, 3), init="paper")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        folded = reparameterize_model(model)
        assert not any(isinstance(m, OREPAConv) for m in folded.modules())
        assert rel_err(folded(x), before) <= 1e-5


def test_cli_inspect_with_1x1(capsys):
    assert main(["inspect", "timm:resnet18", "--kernel-sizes", "1", "3"]) == 0
    out = capsys.readouterr().out
    assert "would convert 19/20" in out and "downsample.0" in out  # 16 3x3 + 3 1x1; the 7x7 stem is not listed


def _randomise_all(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, OREPAConv):
                for p in m.parameters(recurse=False):
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _flat(out) -> torch.Tensor:
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out.float()
