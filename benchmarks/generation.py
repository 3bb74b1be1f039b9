"""Cost of the per-step OREPA weight generation, per branch set, against the layer's own convolution.

    python benchmarks/generation.py                       # 512->512 3x3, batch 16 at 7x7, 2 threads
    python benchmarks/generation.py --channels 128 --hw 32 --batch 16
    python benchmarks/generation.py --model yolov8n       # summed over every block of a converted model

Each figure is the median over ``--iters`` runs of ``block.generate_kernel()`` (forward) and of generation plus
backward of a unit upstream gradient (forward+backward).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch
from torch import nn

from orepa_convert import BRANCHES, OREPAConfig, OREPAConv, convert_to_orepa
from orepa_convert.models import build_model


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

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
