"""Mixed-precision training checks shared by the CPU suite (tests/test_amp.py) and the CUDA suite
(tests/test_cuda.py): the same code runs on either device."""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

from offline import rel_err
from orepa_convert import OREPAConv, convert_to_orepa, fold_orepa


def converted_pair(device: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A plain resnet18 (10 classes) and its OREPA conversion (paper init: every branch live), on ``device``."""
    torch.manual_seed(seed)
    plain = torchvision.models.resnet18(num_classes=10)
    orepa = convert_to_orepa(copy.deepcopy(plain), init="paper")
    with torch.no_grad():  # moderate branch scales, as after some training (the paper init amplifies a lot)
        for block in orepa.modules():
            if isinstance(block, OREPAConv):
                block.scales.mul_(0.3)
    return plain.to(device), orepa.to(device)


def batch(device: str, n: int = 4, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen).to(device), torch.randint(0, 10, (n,), generator=gen).to(device)


def loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, dict]:
    """Loss and parameter gradients of one training forward/backward, under autocast to ``dtype`` (None: fp32)."""
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def amp_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> tuple[float, float, bool]:
    """(relative loss error, relative error of the conv-weight gradients) of an autocast step against fp32, and
    whether every gradient is finite."""
    ref_loss, ref = loss_and_grads(model, x, y, None)
    loss, grads = loss_and_grads(model, x, y, dtype)
    finite = all(torch.isfinite(g).all() for g in grads.values())
    keys = [k for k in ref if ref[k].dim() == 4 or k.endswith(("weight_origin", "weight_taps", "scales"))]
    grad_err = max(rel_err(grads[k], ref[k]) for k in keys)
    return rel_err(loss, ref_loss), grad_err, finite


def train_with_scaler(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, steps: int,
                      init_scale: float = 2.0**8) -> torch.amp.GradScaler:
    """``steps`` SGD steps under autocast with a GradScaler (enabled for float16 only, as torch recommends; the
    initial scale is low because this small random model overflows float16 at torch's default 2**16, plain or not)."""
    scaler = torch.amp.GradScaler(x.device.type, init_scale=init_scale, enabled=dtype == torch.float16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(steps):
        with torch.autocast(x.device.type, dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return scaler


def fold_error(model: nn.Module, x: torch.Tensor) -> float:
    """Relative error of the folded model against the unfolded one (eval, fp32)."""
    model.eval()
    with torch.no_grad():
        before = model(x)
        folded = fold_orepa(copy.deepcopy(model))
        return rel_err(folded(x), before)
