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


def autocast_finite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the loss and every parameter gradient of an autocast training step are finite."""
    loss, grads = loss_and_grads(model, x, y, dtype)
    return bool(torch.isfinite(loss)) and all(torch.isfinite(g).all() for g in grads.values())


def blocks_under_autocast_are_plain_convs(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> int:
    """Check, for every block of ``model`` on its own input, what the library claims of mixed precision: the block
    generates its kernel in float32 with autocast off (the same tensor as without autocast), and everything it
    computes in low precision is the stock convolution of that kernel, so its output and the gradients of its
    parameters are *bitwise* those of the plain conv holding that kernel, under the same autocast. This is an
    equality of identical operations on identical inputs, so it holds on any CPU or GPU (cuDNN is made
    deterministic for it). Returns the number of blocks checked."""
    inputs: dict[OREPAConv, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.setdefault(mod, args[0].detach().float()))
             for m in model.modules() if isinstance(m, OREPAConv)]
    try:
        model.eval()
        with torch.no_grad():
            model(x)  # each block's input, as the model computes it
    finally:
        for h in hooks:
            h.remove()
    device = x.device.type
    flags = torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True)
    with flags:
        for block, inp in inputs.items():
            block.train()
            plain_kernel = block.generate_kernel()
            with torch.autocast(device, dtype=dtype):
                kernel = block.generate_kernel()
            assert kernel.dtype == torch.float32 and torch.equal(kernel, plain_kernel), "generation left float32"
            g = torch.Generator(device=inp.device).manual_seed(0)
            params = [p for p in block.parameters() if p.requires_grad]

            def step(forward):  # noqa: ANN001
                with torch.autocast(device, dtype=dtype):
                    out = forward()
                grad_out = torch.randn(out.shape, generator=g.manual_seed(0), device=out.device).to(out.dtype)
                return (out.detach(), *torch.autograd.grad(out, params, grad_out))

            got = step(lambda: block(inp))
            conv = block._conv
            want = step(lambda: conv._conv_forward(inp, block.generate_kernel(), block.bias))
            assert got[0].dtype == dtype, f"the convolution ran in {got[0].dtype}, not {dtype}"
            for a, b in zip(got, want):
                assert torch.equal(a, b), "an OREPA block under autocast differs from the plain conv of its kernel"
    return len(inputs)


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
