"""Mixed precision on the CPU (the paths GPUs take, run where every session can): under autocast float16 or
bfloat16 every block computes exactly what the plain conv of its kernel computes, and training stays finite; a
scaler step
skipped on overflow leaves the blocks untouched; the trained model folds exactly."""

from __future__ import annotations

import pytest
import torch

from amp_checks import autocast_finite, batch, blocks_under_autocast_are_plain_convs, converted_pair, fold_error, train_with_scaler
from orepa_convert import OREPAConv


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_runs_only_the_convolutions_in_low_precision_exactly_as_plain_convs(dtype):
    """Generation runs in float32 with autocast off, so under autocast each block is exactly the plain conv of its
    kernel (output and parameter gradients bitwise equal; see ``blocks_under_autocast_are_plain_convs``), and a
    whole autocast step of the converted model is finite, as the plain model's is. No bound here is taken from
    a measured error: how close a low-precision network comes to float32 depends on the CPU's or GPU's float16
    kernels, and is the same for an OREPA block as for the conv it equals."""
    plain, orepa = converted_pair("cpu")
    x, y = batch("cpu")
    assert blocks_under_autocast_are_plain_convs(orepa, x, dtype) == 17  # every kxk conv of resnet18
    assert autocast_finite(orepa, x, y, dtype) and autocast_finite(plain, x, y, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_amp_training_then_fold_is_exact(dtype):
    _, model = converted_pair("cpu")
    x, y = batch("cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = train_with_scaler(model, x, y, dtype, steps=3)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith("weight_taps") for n in moved) and any(n.endswith("scales") for n in moved)
    assert scaler.is_enabled() == (dtype == torch.float16)
    assert fold_error(model, x) <= 1e-5


def test_fp16_scaler_skips_an_overflowing_step_without_touching_the_blocks():
    _, model = converted_pair("cpu")
    x, y = batch("cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = train_with_scaler(model, x, y, torch.float16, steps=1, init_scale=2.0**120)  # the scaled loss overflows
    assert scaler.get_scale() < 2.0**120  # the step was skipped and the scale backed off
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # every block parameter (and every other) unchanged
    blocks = [m for m in model.modules() if isinstance(m, OREPAConv)]
    assert blocks and all(torch.isfinite(b.generate_kernel()).all() for b in blocks)
    train_with_scaler(model, x, y, torch.float16, steps=2)  # and training goes on from there
    assert fold_error(model, x) <= 1e-5
