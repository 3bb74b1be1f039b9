"""The OREPA block: equivalence with its branches, exact folding, inits, gradients, state and dtypes."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from models import randomise_block
from orepa_convert import BRANCHES, OREPAConfig, OREPAConv
from offline import offline_block, rel_err
from strategies import conv_configs


@settings(deadline=None, max_examples=40)
@given(conv_configs())
def test_block_equals_sum_of_branches_and_folds_exactly_float64(cfg):
    conv, size = cfg
    block = randomise_block(OREPAConv(conv.double(), OREPAConfig(init="paper")))
    x = torch.randn(2, conv.in_channels, *size, dtype=torch.float64)
    y = block(x)
    assert rel_err(y, offline_block(block, x)) <= 1e-12
    folded = copy.deepcopy(block).fold()
    assert type(folded) is type(conv)
    assert rel_err(folded(x), y) <= 1e-12


@settings(deadline=None, max_examples=30)
@given(conv_configs())
def test_fold_exact_float32(cfg):
    conv, size = cfg
    block = randomise_block(OREPAConv(conv, OREPAConfig(init="paper")), seed=1).eval()
    x = torch.randn(2, conv.in_channels, *size)
    with torch.no_grad():
        y = block(x)
        folded = block.fold()
        assert rel_err(folded(x), y) <= 1e-5


@settings(deadline=None, max_examples=30)
@given(conv_configs())
def test_preserve_init_is_exact(cfg):
    conv, size = cfg
    x = torch.randn(2, conv.in_channels, *size)
    weight = conv.weight.detach().clone()
    expected = conv(x)
    block = OREPAConv(conv)
    assert torch.equal(block.generate_kernel(), weight)
    assert torch.equal(block(x), expected)


def test_conv2d_same_from_timm():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    conv = timm_layers.Conv2dSame(4, 6, 3, stride=2, bias=True).double()
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)  # odd/even sizes: asymmetric run-time padding
    expected = conv(x)
    block = OREPAConv(conv)
    assert torch.equal(block(x), expected)
    randomise_block(block)
    y = block(x)
    assert rel_err(y, offline_block(block, x)) <= 1e-12
    folded = block.fold()
    assert type(folded) is timm_layers.Conv2dSame
    assert rel_err(folded(x), y) <= 1e-12


def test_exposes_conv_attributes_and_guards_weight():
    conv = nn.Conv2d(4, 8, (3, 5), stride=2, padding=(1, 2), dilation=1, groups=2, padding_mode="reflect")
    block = OREPAConv(conv)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(block, name) == getattr(conv, name)
    assert block.weight.shape == (8, 2, 3, 5)
    with pytest.raises(AttributeError, match="fold_orepa"):
        block.weight = nn.Parameter(torch.zeros(8, 2, 3, 5))
    # the scales are one 1-D parameter (treated like BN weights by optimizers), row j of its [n, O] view
    # scaling branch j
    assert block.scales.shape == (6 * 8,)
    for j, b in enumerate(BRANCHES):
        assert block.scale(b).shape == (8,)
        assert block.scale(b).data_ptr() == block.scales.data_ptr() + j * 8 * block.scales.element_size()
    assert block.weight_taps.shape == (8, 3, 2) and block.branch_weight("prior").shape == (8, 2)
    with pytest.raises(ValueError, match="no branch"):
        OREPAConv(nn.Conv2d(4, 4, 3), OREPAConfig(branches=("origin", "pw"))).scale("avg")
    with pytest.raises(ValueError, match="not a fixed-filter"):
        block.branch_weight("dws")


def test_shapes_follow_paper_widths():
    dense = OREPAConv(nn.Conv2d(16, 32, 3, groups=4))
    assert dense.weight_pw_kxk_in.shape == (16, 4)  # t = I for g <= 4
    assert dense.weight_pw_kxk.shape == (32, 3, 3, 4)  # stored [O, *K, t/g]
    assert dense.weight_dws_dw.shape == (8 * 16, 1, 3, 3)
    assert dense.weight_dws_pw.shape == (16, 8, 8)  # stored [I, e, O/g]
    assert OREPAConv(nn.Conv2d(4, 6, 3), OREPAConfig(dws_expansion=2)).weight_dws_pw.shape == (4, 2, 6)
    dw = OREPAConv(nn.Conv2d(16, 16, 3, groups=16))
    assert dw.weight_pw_kxk_in.shape == (32, 1)  # t = 2I for g > 4
    custom = OREPAConv(nn.Conv2d(8, 8, 3), OREPAConfig(pw_kxk_width=3, dws_expansion=2, branches=("origin", "pw_kxk", "dws")))
    assert custom.weight_pw_kxk_in.shape == (24, 8)
    assert custom.weight_dws_dw.shape == (16, 1, 3, 3)
    assert custom.branches == ("origin", "pw_kxk", "dws")
    assert not hasattr(custom, "weight_taps")


def test_paper_init_scales():
    block = OREPAConv(nn.Conv2d(4, 4, 3), OREPAConfig(init="paper"))
    expected = {"origin": 0.25, "avg": 0.25, "prior": 0.0, "pw_kxk": 0.5, "pw": 1.0, "dws": 0.5}
    for b, v in expected.items():
        assert torch.all(block.scale(b) == v)
    assert torch.all(block.weight_pw_kxk_in == 0)
    bound = (6 / (4 * 9)) ** 0.5  # Kaiming-uniform, a = 0
    assert block.weight_origin.abs().max() <= bound and block.weight_origin.abs().max() > 0.5 * bound


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1),
                                  nn.Conv1d(4, 6, 5)])
def test_scratch_init_is_the_paper_init_at_the_wrapped_convs_channel_norms(conv):
    target = conv.weight.detach().flatten(1).norm(dim=1)
    paper = OREPAConv(copy.deepcopy(conv), OREPAConfig(init="paper")).generate_kernel(torch.float64).double().flatten(1)
    block = OREPAConv(conv, OREPAConfig(init="scratch"))
    kernel = block.generate_kernel(torch.float64).double().flatten(1)
    assert torch.allclose(kernel.norm(dim=1), target.double(), rtol=1e-6)
    # the same direction as the paper's kernel, per output channel: only the scales were rescaled
    cosine = (kernel * paper).sum(1) / (kernel.norm(dim=1) * paper.norm(dim=1))
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-9)
    assert block.block_config().init == "scratch"


def test_gradients_reach_every_branch():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    block = OREPAConv(conv)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    x = torch.randn(2, 4, 8, 8)
    block(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    for n, g in grads.items():
        zero_scale_weight = n.startswith("weight_") and n != "weight_origin"
        if zero_scale_weight:
            assert torch.count_nonzero(g) == 0, f"{n} should get exactly zero gradient on the first step"
        else:
            assert torch.count_nonzero(g) > 0, f"{n} got no gradient"
    opt.step()
    opt.zero_grad()
    block(x).square().mean().backward()
    for n, p in block.named_parameters():
        assert torch.count_nonzero(p.grad) > 0, f"{n} got no gradient after one step"


def test_global_rng_untouched_and_seeded():
    convs = [nn.Conv2d(4, 4, 3) for _ in range(3)]  # their own init uses the global RNG: build them first
    state = torch.get_rng_state()
    a = OREPAConv(convs[0], OREPAConfig(seed=5))
    b = OREPAConv(convs[1], OREPAConfig(seed=5))
    c = OREPAConv(convs[2], OREPAConfig(seed=6))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.weight_dws_dw, b.weight_dws_dw)
    assert not torch.equal(a.weight_dws_dw, c.weight_dws_dw)


def test_pickle_deepcopy_state_dict_round_trip():
    block = randomise_block(OREPAConv(nn.Conv2d(4, 6, 3, padding=1, bias=True))).eval()
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        y = block(x)  # fills the eval cache, which must not travel
    buf = io.BytesIO()
    torch.save(block, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "_kernel_cache" not in loaded.__dict__
    for other in (loaded, copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        with torch.no_grad():
            assert torch.equal(other(x), y)
    fresh = OREPAConv(nn.Conv2d(4, 6, 3, padding=1, bias=True), OREPAConfig(seed=9)).eval()
    fresh.load_state_dict(block.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    sd = block.state_dict()
    assert sd["_extra_state"].dtype == torch.int64


@pytest.mark.parametrize("branches", [BRANCHES, ("origin", "prior", "pw_kxk"), ("origin", "pw", "dws")])
def test_format_1_state_dicts_still_load(branches):
    """Format 1 kept one tensor per tap branch and per scale; its state dicts load into the stacked layout."""
    block = randomise_block(OREPAConv(nn.Conv2d(4, 6, 3, padding=1), OREPAConfig(branches=branches)))
    v1 = {k: v for k, v in block.state_dict().items() if k not in ("weight_taps", "scales", "_extra_state")}
    taps = [b for b in block.branches if b in ("avg", "prior", "pw")]
    for b in taps:
        v1[f"weight_{b}"] = block.branch_weight(b).detach().clone()
    for b in block.branches:
        v1[f"scale_{b}"] = block.scale(b).detach().clone()
    if "dws" in block.branches:  # format 1 stored it [I, O/g, e]
        v1["weight_dws_pw"] = block.weight_dws_pw.detach().transpose(1, 2).clone()
    old_order = ("origin", "avg", "prior", "pw_kxk", "pw", "dws")
    mask = sum(1 << old_order.index(b) for b in block.branches)
    v1["_extra_state"] = torch.tensor([1, mask, block.pw_kxk_width, block.dws_expansion])
    fresh = OREPAConv(nn.Conv2d(4, 6, 3, padding=1), OREPAConfig(branches=branches, seed=5))
    fresh.load_state_dict(v1)
    assert torch.equal(fresh.generate_kernel(), block.generate_kernel())


def test_mismatched_config_load_fails_clearly():
    block = OREPAConv(nn.Conv2d(4, 4, 3))
    other = OREPAConv(nn.Conv2d(4, 4, 3), OREPAConfig(branches=("origin", "avg", "pw")))
    with pytest.raises(RuntimeError, match="convert with the same OREPAConfig"):
        other.load_state_dict(block.state_dict(), strict=False)
    sd = block.state_dict()
    sd["_extra_state"] = torch.tensor([99, 63, 4, 8])
    with pytest.raises(RuntimeError, match="format version 99"):
        OREPAConv(nn.Conv2d(4, 4, 3)).load_state_dict(sd)
    plain = nn.Conv2d(4, 4, 3).state_dict()
    with pytest.raises(RuntimeError, match="plain conv weight"):
        OREPAConv(nn.Conv2d(4, 4, 3)).load_state_dict(plain, strict=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_finite_and_generation_in_float32(dtype):
    torch.manual_seed(0)
    block = OREPAConv(nn.Conv2d(8, 8, 5, padding=2), OREPAConfig(init="paper")).to(dtype)
    x = torch.randn(2, 8, 16, 16, dtype=dtype)
    y = block(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    ref = {n: p.float() for n, p in block.named_parameters()}
    fp32 = OREPAConv(nn.Conv2d(8, 8, 5, padding=2), OREPAConfig(init="paper"))
    with torch.no_grad():
        for n, p in fp32.named_parameters():
            p.copy_(ref[n])
    # generated in float32 from the low-precision parameters, rounded once at the end
    assert torch.equal(block.generate_kernel(), fp32.generate_kernel().to(dtype))


def test_autocast_does_not_change_generation():
    block = randomise_block(OREPAConv(nn.Conv2d(4, 4, 3)))
    exact = block.generate_kernel()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k = block.generate_kernel()
        y = block(torch.randn(1, 4, 6, 6))
    assert k.dtype == torch.float32 and torch.equal(k, exact)
    assert y.dtype == torch.bfloat16


def test_eval_cache_never_stale_and_never_while_recording():
    block = randomise_block(OREPAConv(nn.Conv2d(4, 4, 3))).eval()
    with torch.no_grad():
        k1 = block.weight
        assert block.weight is k1  # served from cache
        block.scale("avg").add_(1.0)  # in-place update, as an EMA does
        k2 = block.weight
    assert k2 is not k1 and not torch.equal(k1, k2)
    k3 = block.weight  # grad enabled and parameters require grad: autograd records, no cache
    assert k3.requires_grad and k3 is not k2
    block.to(torch.float64)
    with torch.no_grad():
        assert block.weight.dtype == torch.float64
    uncached = randomise_block(OREPAConv(nn.Conv2d(4, 4, 3), OREPAConfig(eval_cache=False))).eval()
    with torch.no_grad():
        assert uncached.weight is not uncached.weight


def test_fold_twice_and_fuse_for_timm_reparameterize():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=True)
    block = randomise_block(OREPAConv(conv))
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        y = block(x)
        first = block.fold()
        w1 = first.weight.clone()
        second = block.fold()
    assert first is conv and second is conv
    assert torch.equal(second.weight, w1)
    assert set(dict(conv.named_parameters())) == {"weight", "bias"}
    timm_utils = pytest.importorskip("timm.utils")
    model = nn.Sequential(OREPAConv(nn.Conv2d(4, 4, 3, padding=1)), nn.ReLU())
    randomise_block(model[0])
    with torch.no_grad():
        y = model(x)
    model = timm_utils.reparameterize_model(model)
    assert type(model[0]) is nn.Conv2d
    with torch.no_grad():
        assert rel_err(model(x), y) <= 1e-5


def test_hooks_on_wrapped_conv_still_fire():
    conv = nn.Conv2d(4, 4, 3)
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    block = OREPAConv(conv)
    block(torch.randn(1, 4, 5, 5))
    assert seen == [torch.Size([1, 4, 3, 3])]


@pytest.mark.parametrize(
    "conv, match",
    [
        (nn.ConvTranspose2d(4, 4, 3), "unsupported conv class"),
        (type("PaddedConv", (nn.Conv2d,), {"forward": lambda self, x: super(type(self), self).forward(x + 1)})(4, 4, 3),
         "overrides forward"),
    ],
)
def test_unsupported_convs_rejected(conv, match):
    with pytest.raises(ValueError, match=match):
        OREPAConv(conv)


def test_parametrized_weight_rejected():
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="parametrized"):
        OREPAConv(conv)


@pytest.mark.parametrize("branches", [("avg",), ("prior",), ("pw_kxk",), ("pw",), ("dws",), ("avg", "dws"), ("origin", "prior")])
def test_branch_subsets_match_feature_maps_and_fold(branches):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True).double()
    block = randomise_block(OREPAConv(conv, OREPAConfig(init="paper", branches=branches)))
    assert block.branches == branches
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    y = block(x)
    y.sum().backward()
    assert all(p.grad is not None for p in block.parameters())
    assert rel_err(y, offline_block(block, x)) <= 1e-12
    with torch.no_grad():
        assert rel_err(block.fold()(x), y) <= 1e-12


class _KeywordConv(nn.Conv2d):
    """A conv subclass that only sets constructor arguments (as torchvision's video Conv3DSimple does)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, kernel_size=3, padding=1, bias=False)


def test_conv_subclass_that_keeps_the_forward_is_wrapped_and_folds_to_its_class():
    conv = _KeywordConv(4, 6)
    x = torch.randn(2, 4, 7, 7)
    expected = conv(x)
    block = OREPAConv(conv)
    assert rel_err(block(x), expected) <= 1e-6  # preserve: the same function
    randomise_block(block)
    y = block(x)
    folded = block.fold()
    assert type(folded) is _KeywordConv and rel_err(folded(x), y) <= 1e-5


def test_preserve_live_keeps_the_function_with_every_branch_live():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=True)
    x = torch.randn(2, 8, 9, 9)
    expected = conv(x).detach()
    block = OREPAConv(conv, OREPAConfig(init="preserve_live"))
    assert rel_err(block(x), expected) <= 1e-5  # the same function, to float rounding
    assert all(abs(block.scale(b)).sum() > 0 for b in block.branches if b != "prior")  # prior starts at 0 in the paper
    assert torch.equal(block.scale("origin"), torch.ones(12))
    block(x).square().mean().backward()
    dead = [n for n, p in block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []  # with init="preserve" every branch weight but the origin would get a zero gradient here
    with torch.no_grad():
        assert rel_err(block.fold()(x), block(x)) <= 1e-5


@pytest.mark.parametrize("live_scale", [1.0, 0.25])
def test_preserve_live_scale_sets_the_live_branches_norm_and_keeps_the_function(live_scale):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1).double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    expected = conv(x).detach()
    twin = copy.deepcopy(conv)
    block = OREPAConv(conv, OREPAConfig(init="preserve_live", live_scale=live_scale))
    with torch.no_grad():
        assert rel_err(block(x), expected) <= 1e-12  # float64: the same function
        live = block.generate_kernel(torch.float64) - block.weight_origin  # origin scale is 1
        # what the live branches generate: live_scale times scratch's, whose whole kernel has the conv's norms
        scratch = OREPAConv(twin, OREPAConfig(init="scratch"))
        scratch_live = scratch.generate_kernel(torch.float64) - scratch.weight_origin * scratch.scale("origin").view(-1, 1, 1, 1)
        torch.testing.assert_close(live, live_scale * scratch_live, rtol=1e-12, atol=1e-14)
    assert block.block_config().live_scale == live_scale


def test_block_fields_come_from_its_spec_and_eval_cache_stays_settable():
    conv = nn.Conv2d(4, 8, 3, groups=2)
    config = OREPAConfig(branches=("origin", "pw_kxk", "dws"), pw_kxk_width=2, dws_expansion=2, seed=4)
    spec = config.spec_for(conv)
    block = OREPAConv(conv, config)
    assert block.spec == spec and block.block_config() == config.replace()
    assert {n: tuple(p.shape) for n, p in block.named_parameters() if n != "bias"} == spec.parameter_shapes()
    assert sum(p.numel() for n, p in block.named_parameters() if n != "bias") - 8 * 2 * 9 == spec.added_parameters()
    assert (block.branches, block.pw_kxk_width, block.dws_expansion) == (spec.branches, 8, 2)
    block.eval_cache = False  # a switch benchmarks flip on live blocks
    assert block.spec.eval_cache is False and block.block_config().eval_cache is False


def test_every_init_has_one_initialiser():
    from orepa_convert.block.inits import INITIALISERS
    from orepa_convert.config import INITS

    assert tuple(INITIALISERS) == INITS
