"""Each kernel transform against running its branch on feature maps (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings

from orepa_convert import BRANCHES, OREPAConfig, OREPAConv
from orepa_convert.block import BlockSpec, generation
import oracles
from offline import branch_outputs, pad_like_conv, rel_err
from strategies import conv_configs

_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}


def _branch_kernel(block: OREPAConv, branch: str) -> torch.Tensor:
    """Unscaled dense kernel of one branch, from the pure transforms."""
    c = block.conv
    p = dict(block.named_parameters())
    K = tuple(c.kernel_size)
    if branch == "origin":
        return p["weight_origin"]
    if branch in ("avg", "prior", "pw"):
        return oracles.expand_1x1(block.branch_weight(branch), generation.tap_filter(branch, c.out_channels, K))
    if branch == "pw_kxk":
        first = generation.stacked_identity(block.pw_kxk_width, c.in_channels, c.groups) + p["weight_pw_kxk_in"]
        return oracles.compose_1x1_kxk(first, generation.natural_pw_kxk(p["weight_pw_kxk"]), c.groups)
    if branch == "dws":
        pointwise = generation.natural_dws_pointwise(p["weight_dws_pw"], c.groups)
        return oracles.depthwise_pointwise_to_dense(p["weight_dws_dw"], pointwise, c.groups, block.dws_expansion)
    raise AssertionError(branch)


@settings(deadline=None, max_examples=40)
@given(conv_configs())
def test_each_branch_kernel_matches_its_feature_map_form(cfg):
    conv, size = cfg
    conv = conv.double()
    block = OREPAConv(conv, OREPAConfig(init="paper", seed=3))
    with torch.no_grad():  # non-trivial learned identity part
        block.weight_pw_kxk_in.normal_()
    x = torch.randn(2, conv.in_channels, *size, dtype=torch.float64)
    xp = pad_like_conv(block.conv, x)
    for branch, expected in branch_outputs(block, xp).items():
        w = _branch_kernel(block, branch)
        got = _CONV[len(size)](xp, w, stride=conv.stride, dilation=conv.dilation, groups=conv.groups)
        assert got.shape == expected.shape
        assert rel_err(got, expected) <= 1e-12, branch


@pytest.mark.parametrize("kernel_size", [(3, 3), (1, 3), (5, 5), (7, 7), (2, 2), (4,), (3, 3, 3), (1, 1, 2)])
def test_prior_filters_defined_bounded_nonzero(kernel_size):
    out = 37
    f = generation.dct_prior_filters(out, kernel_size)
    assert f.shape == (out, *kernel_size)
    assert torch.isfinite(f).all() and f.abs().max() <= 1.0
    assert (f.flatten(1).abs().amax(1) > 1e-6).all(), "a prior filter is all zero"
    # every filter is orthogonal to the constant (average) filter: u >= 1
    assert f.flatten(1).sum(1).abs().max() < 1e-9


def test_prior_filters_match_dct_ii_formula():
    f = generation.dct_prior_filters(4, (3, 3))
    # first half along height, frequencies 1, 2; second half along width, frequencies 1, 2
    n = torch.arange(3, dtype=torch.float64) + 0.5
    for o, (axis, u) in enumerate([(0, 1), (0, 2), (1, 1), (1, 2)]):
        basis = torch.cos(math.pi * n * u / 3)
        expected = basis[:, None].expand(3, 3) if axis == 0 else basis[None, :].expand(3, 3)
        assert torch.allclose(f[o], expected)


def test_centre_tap_even_and_odd():
    assert generation.centre_tap((3, 3)) == (1, 1)
    assert generation.centre_tap((2, 4)) == (0, 1)
    assert generation.centre_tap((5,)) == (2,)


def test_stacked_identity():
    t = generation.stacked_identity(8, 4, 2)  # 2 groups, 4 rows per group, 2 inputs per group
    assert t.tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]] * 2
    assert torch.equal(generation.stacked_identity(6, 6, 1), torch.eye(6, dtype=torch.float64))


def test_fold_batchnorm_matches_module():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    bn = torch.nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    w, b = generation.fold_batchnorm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    assert rel_err(torch.nn.functional.conv2d(x, w, b, padding=1), bn(conv(x))) <= 1e-12


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="depthwise-separable"):
        oracles.depthwise_pointwise_to_dense(torch.zeros(8, 1, 3, 3), torch.zeros(4, 6), 1, 8)
    with pytest.raises(ValueError, match="more than one tap"):
        generation.dct_prior_filters(4, (1, 1))


@pytest.mark.parametrize(
    "out_ch, in_ch, groups, kernel_size, width, expansion",
    [(6, 4, 2, (3, 3), 8, 3), (4, 4, 4, (2,), 8, 2), (3, 6, 3, (2, 3, 2), 6, 1)],
)
def test_fused_generation_gradients_match_autograd(out_ch, in_ch, groups, kernel_size, width, expansion):
    """The hand-written backward of the per-step generation against numerical and autograd gradients."""
    g = torch.Generator().manual_seed(0)
    ig = in_ch // groups

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    taps = math.prod(kernel_size)
    filters = torch.randn(out_ch, 3, taps, generator=g, dtype=torch.float64)
    identity = generation.stacked_identity(width, in_ch, groups)
    plan = generation.generation_plan((out_ch, ig, *kernel_size), groups, BRANCHES, expansion, width)
    flat = [r(6 * out_ch), r(out_ch, ig, *kernel_size), r(out_ch, 3, ig)]  # scales, origin, avg/prior/pw
    flat += [r(width, ig), r(out_ch, *kernel_size, width // groups)]  # pw_kxk (storage layout)
    flat += [r(expansion * in_ch, 1, *kernel_size), r(in_ch, expansion, out_ch // groups)]  # dws

    def fused(*t):
        return oracles.generate_kernel_fused(plan, t[0], t[1], t[2], filters, t[3], identity, t[4], t[5], t[6])

    def reference(*t):
        v = t[0].view(6, out_ch)  # rows in BRANCHES order: origin, avg, prior, pw, pw_kxk, dws
        return oracles.generate_kernel(
            kernel_size, groups, origin=(v[0], t[1]),
            taps=(v[1:4], t[2].transpose(0, 1), filters.transpose(0, 1)),
            pw_kxk=(v[4], t[3] + identity, generation.natural_pw_kxk(t[4])),
            dws=(v[5], t[5], generation.natural_dws_pointwise(t[6], groups), expansion),
        )

    assert torch.autograd.gradcheck(fused, flat)
    upstream = torch.randn(out_ch, ig, *kernel_size, generator=g, dtype=torch.float64)
    assert rel_err(fused(*flat), reference(*flat)) <= 1e-12
    for scale in (1.0, 2.0**-100):  # 2**-100: the CPU path that keeps tiny gradients out of the denormal range
        ref = torch.autograd.grad(reference(*flat), flat, upstream * scale)
        got = torch.autograd.grad(fused(*flat), flat, upstream * scale)
        for a, b in zip(got, ref):
            assert rel_err(a, b) <= 1e-12


def test_denormal_guard_is_skipped_when_the_cpu_flushes_denormals():
    grad = torch.full((4, 4), 2.0**-80)  # float32: takes the guarded path unless denormals are flushed
    previous = generation._flushes_denormals()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert generation._flushes_denormals()
        assert generation._denormal_guard_unit(grad) == 1.0
        torch.set_flush_denormal(False)
        assert not generation._flushes_denormals()
        assert generation._denormal_guard_unit(grad) == 2.0**-80
    finally:
        torch.set_flush_denormal(previous)


@pytest.mark.parametrize("branches", [BRANCHES, ("origin", "pw_kxk"), ("avg", "dws"), ("prior", "pw")])
@pytest.mark.parametrize("groups, kernel_size", [(1, (3, 3)), (2, (3, 2)), (4, (3,))])
@pytest.mark.parametrize("width", [4, 8])  # t == I (the identity folded into one baddbmm) and t == 2I
def test_stacked_generation_equals_each_block_alone(branches, groups, kernel_size, width):
    """Several blocks with one plan in one node (``cat``, stacked maths) give each block's own kernel and
    gradients, also with mixed requires_grad and an unused kernel."""
    g = torch.Generator().manual_seed(1)
    out_ch, in_ch, expansion = 8, 4, 2
    spec = BlockSpec((out_ch, in_ch // groups, *kernel_size), groups, tuple(b for b in BRANCHES if b in branches),
                     width, expansion)
    plan, shapes = spec.plan(), spec.parameter_shapes()
    blocks = [
        [torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(i != 1 or name != "scales")
         for name, shape in shapes.items()]
        for i in range(3)
    ]
    taps = generation.tap_branches(branches)
    filters = torch.randn(out_ch, len(taps), math.prod(kernel_size), generator=g, dtype=torch.float64) if taps else None
    identity = generation.stacked_identity(width, in_ch, groups) if "pw_kxk" in branches else None
    upstream = [torch.randn(out_ch, in_ch // groups, *kernel_size, generator=g, dtype=torch.float64) for _ in blocks]
    together = generation.generate_kernels_stacked(plan, blocks, filters, identity, torch.float64)
    leaves = [t for b in blocks for t in b if t.requires_grad]
    got = torch.autograd.grad([together[0], together[2]], leaves, [upstream[0], upstream[2]], allow_unused=True)
    for i, block in enumerate(blocks):
        alone = generation.generate_kernel_autograd(plan, block, filters, identity)
        assert rel_err(together[i], alone) <= 1e-12
    expected = []
    for i, block in enumerate(blocks):
        alone = generation.generate_kernel_autograd(plan, block, filters, identity)
        need = [t for t in block if t.requires_grad]
        grads = torch.autograd.grad(alone, need, upstream[i]) if i != 1 else [torch.zeros_like(t) for t in need]
        expected.extend(grads)
    for a, b in zip(got, expected):
        assert rel_err(a if a is not None else torch.zeros_like(b), b) <= 1e-12
