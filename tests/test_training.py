"""A converted model under torch.compile, autocast, channels_last, bf16 and DDP."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models import Variety, randomise_bn
from offline import rel_err
from orepa_convert import OREPAConv, convert_to_orepa, fold_orepa


def _model(seed=0):
    torch.manual_seed(seed)
    model = randomise_bn(Variety())
    convert_to_orepa(model, init="paper")
    return model


def test_torch_compile_aot_eager_matches_eager():
    """The compiled step computes what the eager step computes: checked in float64, where two orderings of the
    same sums agree to ~1e-15, so 1e-10 holds on any CPU (float32 gradients can differ by 1e-4 and more where
    they cancel)."""
    model = _model().double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    eager = model(x)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    out.square().mean().backward()
    assert rel_err(out, eager) <= 1e-10
    for n, p in model.named_parameters():
        assert rel_err(p.grad, grads[n]) <= 1e-10 or grads[n].abs().max() == 0, n


def test_autocast_channels_last_and_bf16():
    model = _model()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_err(cl(x.to(memory_format=torch.channels_last)), ref) <= 1e-5
    bf = _model().to(torch.bfloat16)
    yb = bf(x.to(torch.bfloat16))
    yb.float().square().mean().backward()
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()
    fold_orepa(bf)
    assert bf.reflect[0].weight.dtype == torch.bfloat16


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model(seed=0)  # same init on every rank (local generator, seeded)
    ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-2, momentum=0.9)
    torch.manual_seed(rank)
    for _ in range(3):
        loss = ddp(torch.randn(2, 3, 12, 12)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fold_orepa(ddp)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    queue.put((rank, (gathered[0] - gathered[1]).abs().max().item(), sum(isinstance(m, OREPAConv) for m in model.modules())))
    del ddp, opt  # release DDP's reducer before the process group (gloo teardown is otherwise flaky)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_cpu_ranks_without_find_unused_parameters():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    for _rank, diff, blocks_left in results:
        assert diff == 0.0, "ranks diverged"
        assert blocks_left == 0
