"""Helpers shared by the benchmark scripts: timing on CPU/CUDA, training steps, per-variant subprocesses."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def tensors(out: Any) -> Iterator[torch.Tensor]:
    """Every tensor of a (nested) model output."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from tensors(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from tensors(v)


def proxy_loss(out: Any) -> torch.Tensor:
    """Mean square of every output tensor: the network's compute without task-specific targets."""
    return sum(t.float().square().mean() for t in tensors(out))


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in ms: CUDA events with synchronisation on CUDA, ``perf_counter`` on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def train_step_fn(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """One training step (forward, backward, SGD with momentum) under autocast for half dtypes."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = proxy_loss(model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: str, args: list[str], threads: int) -> dict:
    """Run ``script --worker ARGS`` in a fresh process and return the JSON it prints last."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "YOLO_OFFLINE": os.environ.get("YOLO_OFFLINE", "1")}
    out = subprocess.run([sys.executable, script, "--worker", *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
