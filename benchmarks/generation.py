"""Cost of the per-step OREPA weight generation, per branch set, against the layer's own convolution.

    python benchmarks/generation.py                       # 512->512 3x3, batch 16 at 7x7, 2 threads
    python benchmarks/generation.py --channels 128 --hw 32 --batch 16
    python benchmarks/generation.py --model yolov8n       # summed over every block of a converted model
    python benchmarks/generation.py --count-ops yolov8n   # ops a training step adds (forward + backward)

Each figure is the median over ``--iters`` runs of ``block.generate_kernel()`` (forward) and of generation plus
backward of a unit upstream gradient (forward+backward).

``--count-ops`` counts, with a ``TorchDispatchMode``, every aten op a training step (forward, backward of a
mean-square loss, gradients set to ``None`` before) runs on the converted model and on the plain one, and prints
the difference: the ops OREPA adds per step. Views and pure allocations are not counted; every other op is at
least one kernel launch on a GPU. On the CPU it includes the denormal guard (one reduction and one host read per
generation node), which never runs on other devices or with ``torch.set_flush_denormal(True)``.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import proxy_loss  # noqa: E402
from orepa_convert import BRANCHES, OREPAConfig, OREPAConv, convert_to_orepa  # noqa: E402
from orepa_convert.cli.model_specs import build_model  # noqa: E402

#: Ops that only allocate or alias memory (views are recognised by their schema).
_NOT_COMPUTE = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "detach",
                          "lift_fresh", "_unsafe_view"})


class OpCounter(TorchDispatchMode):
    """Counts the compute ops (not views, not pure allocations) run while active, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NOT_COMPUTE:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def training_step_ops(model: nn.Module, x: torch.Tensor) -> collections.Counter[str]:
    """The ops of one training step (forward, mean-square loss, backward) after one untimed warm-up step."""
    model.train()
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with OpCounter() as counter:
            proxy_loss(model(x)).backward()
    return counter.counts


def count_generation_ops(spec: str, imgsz: int = 64, device: str | torch.device = "cpu") -> dict:
    """Ops a training step of the converted ``spec`` runs beyond the plain model's (batch 1 at ``imgsz``), on
    ``device`` (on the CPU they include the denormal guard, see the module docstring)."""
    torch.manual_seed(0)
    model = build_model(spec).to(device)
    x = torch.randn(1, 3, imgsz, imgsz, device=device)
    plain = training_step_ops(model, x)
    convert_to_orepa(model)
    orepa = training_step_ops(model, x)
    blocks = [m for m in model.modules() if isinstance(m, OREPAConv)]
    extra = orepa.copy()
    extra.subtract(plain)
    return {"model": spec, "blocks": len(blocks), "groups": len({b._plan for b in blocks}),
            "plain_ops": sum(plain.values()), "orepa_ops": sum(orepa.values()),
            "extra_ops": sum(orepa.values()) - sum(plain.values()),
            "by_op": {k: v for k, v in sorted(extra.items()) if v}}


def _median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _fwd_bwd(block: OREPAConv) -> None:
    kernel = block.generate_kernel()
    kernel.backward(torch.ones_like(kernel))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hw", type=int, default=7)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="instead: sum over every block of this converted model (e.g. yolov8n)")
    parser.add_argument("--count-ops", metavar="MODEL", help="instead: count the ops a training step adds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.count_ops:
        r = count_generation_ops(args.count_ops)
        print(f"{r['model']}: {r['blocks']} blocks in {r['groups']} generation groups; training step ops: plain "
              f"{r['plain_ops']}, OREPA {r['orepa_ops']}, added {r['extra_ops']}")
        print("added by op: " + ", ".join(f"{k} {v}" for k, v in r["by_op"].items()))
        return 0

    if args.model:
        model = build_model(args.model)
        convert_to_orepa(model)
        blocks = [m for m in model.modules() if isinstance(m, OREPAConv)]
        total = sum(_median_ms(lambda b=b: _fwd_bwd(b), args.iters) for b in blocks)
        print(f"{args.model}: {len(blocks)} blocks, generation forward+backward summed: {total:.1f} ms per step")
        return 0

    c, k = args.channels, args.kernel
    print(f"{c}->{c} {k}x{k} groups={args.groups}, {args.threads} threads, median of {args.iters}")
    print(f"{'branches':45s} {'fwd ms':>8s} {'fwd+bwd ms':>11s}")
    for branches in (BRANCHES, ("origin",), ("origin", "avg", "prior", "pw"), ("origin", "pw_kxk"), ("origin", "dws")):
        block = OREPAConv(nn.Conv2d(c, c, k, padding=k // 2, groups=args.groups, bias=False),
                          OREPAConfig(init="paper", branches=branches))
        fwd = _median_ms(block.generate_kernel, args.iters)
        both = _median_ms(lambda b=block: _fwd_bwd(b), args.iters)
        print(f"{'+'.join(branches):45s} {fwd:8.1f} {both:11.1f}")
    conv = nn.Conv2d(c, c, k, padding=k // 2, groups=args.groups, bias=False)
    x = torch.randn(args.batch, c, args.hw, args.hw)
    ms = _median_ms(lambda: conv(x).sum().backward(), args.iters)
    print(f"{'the convolution itself, fwd+bwd, batch %d at %dx%d' % (args.batch, args.hw, args.hw):45s} {'':8s} {ms:11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
