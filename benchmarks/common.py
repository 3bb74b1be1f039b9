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


def yolo_study_train_args(batch: int) -> dict[str, Any]:
    """Ultralytics options of the efficacy studies on generated data (CPU): SGD with an optimizer step every batch
    (nbs = batch), no warm-up, no mosaic, no AMP, single-process data loading."""
    return {"batch": batch, "nbs": batch, "warmup_epochs": 0, "mosaic": 0.0, "optimizer": "SGD", "device": "cpu",
            "workers": 0, "amp": False}


def export_study(result: dict[str, Any], path: "os.PathLike[str]", dataset: dict[str, Any]) -> None:
    """Write a comparison's runs as a study file: ``{"meta", "chosen_lr", "summary", "runs": [{"variant", "lr",
    "seed", "split", "map50_95", ...}]}`` (``split`` "val" for every run, also the selection runs; "test" for the
    reported ones)."""
    from datetime import date
    from pathlib import Path

    meta = {"date": date.today().isoformat(), "device": "cpu", "torch": torch.__version__, "cpu": cpu_name(),
            "settings": result["settings"], "reported_split": result["reported_split"], **dataset}
    runs = [{k: r[k] for k in ("variant", "lr", "seed", "split", "epochs", result["metric"], "wall_seconds", "peak_memory_mb")}
            for r in result["runs"]]
    out = {"meta": meta, "chosen_lr": result["chosen_lr"], "summary": result["summary"], "runs": runs}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")

