"""Mixed precision on the CPU (the paths GPUs take, run where every session can): autocast float16 with a
GradScaler and bfloat16 keep OREPA training finite and as close to fp32 as plain training is; a scaler step
skipped on overflow leaves the blocks untouched; the trained model folds exactly."""

from __future__ import annotations

import pytest
import torch

from amp_checks import amp_error, batch, converted_pair, fold_error, train_with_scaler
from orepa_convert import OREPAConv


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_step_is_finite_and_as_close_to_fp32_as_plain(dtype):
    plain, orepa = converted_pair("cpu")
    x, y = batch("cpu")
    plain_loss, plain_grad, plain_finite = amp_error(plain, x, y, dtype)
    loss_err, grad_err, finite = amp_error(orepa, x, y, dtype)
    assert finite and plain_finite
    # generation runs in fp32 with autocast off: only the convolutions are low precision, as in the plain model
    assert loss_err <= 3 * plain_loss + 1e-3
    assert grad_err <= 3 * plain_grad + 1e-2


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
