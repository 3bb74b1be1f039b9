"""Kernels generated ahead at the start of the training forward pass (orepa_convert.ahead)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import Variety, randomise_bn
from orepa_convert import OREPAConv, ahead, convert_to_orepa, fold_orepa


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The same converted model twice, the second without the ahead hooks."""
    torch.manual_seed(seed)
    model = randomise_bn(Variety())
    convert_to_orepa(model, init="paper")
    plain = copy.deepcopy(model)
    ahead.detach(plain)
    assert ahead.has_hooks(model) and not ahead.has_hooks(plain)
    return model, plain


def _grads(model: nn.Module, x: torch.Tensor, steps: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):  # the second step runs on moved parameters
        opt.zero_grad()
        out = model(x)
        out.square().mean().backward()
        opt.step()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_same_outputs_and_gradients_as_generating_in_each_block():
    model, plain = _pair()
    x = torch.randn(2, 3, 12, 12)
    out, grads = _grads(model, x)
    ref, ref_grads = _grads(plain, x)
    assert torch.equal(out, ref)
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    assert not any("_ahead" in b.__dict__ for b in model.modules() if isinstance(b, OREPAConv))


def test_generation_runs_before_the_first_block_and_only_when_training_with_grad():
    model, _ = _pair()
    blocks = [m for m in model.modules() if isinstance(m, OREPAConv)]
    seen: list[bool] = []
    blocks[0].register_forward_pre_hook(lambda m, a: seen.append(all("_ahead" in b.__dict__ for b in blocks)))
    x = torch.randn(1, 3, 12, 12)
    model(x)
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert seen == [True, False, False]


def test_stale_or_unused_kernels_are_never_served():
    model, _ = _pair()
    block = next(m for m in model.modules() if isinstance(m, OREPAConv))
    x = torch.randn(1, block.in_channels, 8, 8)
    ahead.generate_all(model)
    assert "_ahead" in block.__dict__
    with torch.no_grad():
        block.scale("origin").add_(1.0)  # parameters change after the kernel was generated
    fresh = block.generate_kernel()
    assert torch.equal(block._kernel(), fresh)
    # an exception inside the forward still drops every kernel generated ahead
    model.dilated.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(1, 3, 12, 12))
    assert not any("_ahead" in b.__dict__ for b in model.modules() if isinstance(b, OREPAConv))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    """Checkpointing recomputes the forward in another order of operations, so the gradients are compared in
    float64 (two orderings of the same float64 sums agree far inside 1e-12 relative; float32 ones need not)."""
    model, plain = (m.double() for m in _pair())

    class Checkpointed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            x = checkpoint(self.inner.reflect, x, use_reentrant=reentrant)
            for name in ("dilated", "grouped", "depthwise", "nonsquare", "even"):
                x = getattr(self.inner, name)(x)
            return self.inner.head(x)

    wrapped = Checkpointed(model)
    ahead.attach(wrapped)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, requires_grad=reentrant)
    out, grads = _grads(wrapped, x, steps=1)
    ref, ref_grads = _grads(Checkpointed(plain), x, steps=1)
    assert torch.equal(out, ref)
    scale = max(g.abs().max() for g in ref_grads.values())
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max() <= 1e-12 * scale, name


def test_hooks_attached_once_kept_by_copies_and_removed_by_fold():
    model, _ = _pair()
    convert_to_orepa(model)  # idempotent: no second set of hooks
    assert list(model._forward_pre_hooks.values()).count(ahead._generate_ahead) == 1
    assert list(model._forward_hooks.values()).count(ahead._drop_unused) == 1
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert ahead.has_hooks(clone)
    fold_orepa(model)
    assert not ahead.has_hooks(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not getattr(model, "_forward_hooks_always_called", {})


def test_frozen_blocks_generate_once_while_the_rest_trains():
    """A frozen block (no parameter requires grad, as ultralytics freeze= leaves it) keeps its kernel across
    training steps until its parameters change; trainable blocks still generate every step."""
    model, _ = _pair()
    blocks = [m for m in model.modules() if isinstance(m, OREPAConv)]
    frozen, trainable = blocks[0], blocks[1:]
    for p in frozen.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 12, 12)
    model(x).square().mean().backward()
    cached = frozen.__dict__["_kernel_cache"][1]
    model(x).square().mean().backward()
    assert frozen.__dict__["_kernel_cache"][1] is cached  # not regenerated
    assert all("_kernel_cache" not in b.__dict__ for b in trainable)
    with torch.no_grad():
        frozen.scale("origin").mul_(0.5)  # an in-place change is seen
    out = model(x)
    assert frozen.__dict__["_kernel_cache"][1] is not cached
    assert torch.equal(frozen.__dict__["_kernel_cache"][1], frozen.generate_kernel())
    assert out.requires_grad
