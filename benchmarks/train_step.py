"""Training-step cost of OREPA against plain training, and conversion / fold time.

Protocol (each variant in its own process so its peak RSS is its own): fixed threads, ``--warmup`` steps,
then the median of ``--steps`` timed steps (forward, backward, SGD with momentum); ``--rounds`` alternating
rounds (plain, orepa, plain, orepa, ...), keeping each variant's smallest median and peak RSS.

    python benchmarks/train_step.py                       # resnet18 b32@224 and yolov8n b16@256
    python benchmarks/train_step.py --cases torchvision:resnet18@32x224 --json out.json
    python benchmarks/train_step.py --compile --cases torchvision:resnet18@32x224   # torch.compile'd steps
    python benchmarks/train_step.py --variants plain orepa orepa_1x1 --cases yolov8n@16x256 timm:resnet50@16x160

Variants: ``plain``; ``orepa`` (the default selection: every kxk conv -> BN); ``orepa_1x1`` (also every 1x1 conv
-> BN, ``kernel_sizes=(1, 3, 5, 7)``).

With ``--compile`` both variants run as ``torch.compile(model)`` (inductor, default mode) and the ratio is
compiled OREPA over compiled plain; the first (compiling) step is reported separately as ``first_step_s``.

The loss is the mean square of every output tensor: the same network compute as a task loss, without
task-specific targets. Every variant runs with ``torch.set_flush_denormal(True)`` (see benchmarks/latency.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import cpu_name, peak_rss_mb, proxy_loss, run_worker  # noqa: E402

DEFAULT_CASES = ["torchvision:resnet18@32x224", "yolov8n@16x256"]
#: variant -> convert_to_orepa overrides (None: the plain model)
VARIANTS: dict[str, dict | None] = {"plain": None, "orepa": {}, "orepa_1x1": {"kernel_sizes": (1, 3, 5, 7)}}
CONVERT_TIME_MODELS = ["yolov8x", "timm:resnet50"]


def worker(
    spec: str, variant: str, batch: int, imgsz: int, warmup: int, steps: int, threads: int, compiled: bool = False
) -> dict:
    """Run inside a fresh process: time training steps of one variant and report peak RSS."""
    import torch

    from orepa_convert import convert_to_orepa
    from orepa_convert.cli.model_specs import build_model

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # see benchmarks/latency.py: same setting for every variant
    torch.manual_seed(0)
    model = build_model(spec)
    if variant in VARIANTS and VARIANTS[variant] is not None:
        convert_to_orepa(model, **VARIANTS[variant])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if compiled:
        model = torch.compile(model)
    x = torch.randn(batch, 3, imgsz, imgsz)
    times = []
    first_step_s = None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = proxy_loss(model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == 0:
            first_step_s = time.perf_counter() - t0
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "peak_rss_mb": peak_rss_mb(), "steps": len(times),
            "first_step_s": first_step_s}


def convert_fold_time(spec: str) -> dict:
    import torch

    from orepa_convert import convert_to_orepa, fold_orepa
    from orepa_convert.cli.model_specs import build_model

    model = build_model(spec)
    t0 = time.perf_counter()
    _, report = convert_to_orepa(model, return_report=True)
    t1 = time.perf_counter()
    fold_orepa(model)
    t2 = time.perf_counter()
    del torch
    return {"model": spec, "converted": report.converted, "convert_s": t1 - t0, "fold_s": t2 - t1}


def _run_worker(args: argparse.Namespace, spec: str, variant: str, batch: int, imgsz: int) -> dict:
    extra = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    extra += ["--compile"] if args.compile else []
    return run_worker(__file__, [spec, variant, str(batch), str(imgsz), *extra], args.threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="MODEL@BATCHxIMGSZ")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--convert-models", nargs="*", default=CONVERT_TIME_MODELS)
    parser.add_argument("--compile", action="store_true", help="torch.compile both variants (inductor)")
    parser.add_argument("--variants", nargs="+", default=["plain", "orepa"], choices=list(VARIANTS),
                        help="plain is always run (ratios are against it)")
    parser.add_argument("--json", metavar="PATH")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # internal: one variant in this (fresh) process
        spec, variant, batch, imgsz = argv[1:5]
        rest = parser.parse_args(argv[5:])
        print(json.dumps(worker(spec, variant, int(batch), int(imgsz), rest.warmup, rest.steps, rest.threads,
                                rest.compile)))
        return 0
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    results = {"meta": {"date": date.today().isoformat(), "torch": torch.__version__, "threads": args.threads,
                        "cpu": cpu_name(), "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                        "compiled": args.compile},
               "training": [], "convert_fold": []}
    variants = ["plain", *(v for v in dict.fromkeys(args.variants) if v != "plain")]
    results["meta"]["variants"] = variants
    jobs = [(case, r, v) for case in args.cases for r in range(args.rounds) for v in variants]
    best: dict[tuple[str, str], dict] = {}
    for case, _, variant in tqdm(jobs, desc="training steps", unit="run"):
        spec, _, shape = case.rpartition("@")
        batch, imgsz = (int(v) for v in shape.split("x"))
        res = _run_worker(args, spec, variant, batch, imgsz)
        key = (case, variant)
        prev = best.get(key)
        best[key] = {
            "median_ms": min(res["median_ms"], prev["median_ms"]) if prev else res["median_ms"],
            "peak_rss_mb": min(res["peak_rss_mb"], prev["peak_rss_mb"]) if prev else res["peak_rss_mb"],
            "first_step_s": max(res["first_step_s"], prev["first_step_s"]) if prev else res["first_step_s"],
        }
    for case in args.cases:
        p = best[(case, "plain")]
        row = {"case": case, "plain_step_ms": p["median_ms"], "plain_peak_rss_mb": p["peak_rss_mb"],
               "plain_first_step_s": p["first_step_s"]}
        for variant in variants[1:]:
            o, tag = best[(case, variant)], "" if variant == "orepa" else variant.removeprefix("orepa")
            row.update({
                f"{variant}_step_ms": o["median_ms"], f"time_ratio{tag}": o["median_ms"] / p["median_ms"],
                f"{variant}_peak_rss_mb": o["peak_rss_mb"], f"rss_ratio{tag}": o["peak_rss_mb"] / p["peak_rss_mb"],
                f"{variant}_first_step_s": o["first_step_s"],
            })
        results["training"].append(row)
    for spec in tqdm(args.convert_models, desc="convert/fold time", unit="model"):
        results["convert_fold"].append(convert_fold_time(spec))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
