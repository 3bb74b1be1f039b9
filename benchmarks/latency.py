"""Latency before and after folding, and training cost against plain and offline (DBB-style) re-parameterization.

    python benchmarks/latency.py                                   # CUDA if available, else CPU; default models
    python benchmarks/latency.py --device cpu --models yolov8n,resnet18 --batch 1 8 --imgsz 224 \\
        --json out.json --markdown out.md --plot out.png
    python benchmarks/latency.py --quick --models resnet18         # smoke run

Models: a bare name is an ultralytics model if ultralytics ships a YAML of that name, else a timm model;
``timm:NAME`` and ``torchvision:NAME`` are explicit. Everything is built with random weights (nothing is
downloaded).

Inference (eval, ``torch.inference_mode``): *plain* is the original model; *orepa* is the converted model,
unfolded, with the block's eval cache (its default) and without it (``orepa_nocache_ms``); *folded* is the
model after ``fold_orepa``. The non-origin branch scales are set to random values (std 0.1), as after training,
so the generated kernels are genuine six-branch sums and ``fold_max_abs_err`` measures a real fold.

On the CPU every variant runs with ``torch.set_flush_denormal(True)``: models whose last BN gamma starts at zero
(timm's ResNets) produce tiny gradients, and the optimizer's momentum on the extra branch parameters then
decays through the denormal range, which x86 CPUs process ~100x slower (GPUs are unaffected).

Training: median step time (forward, backward, SGD with momentum; the loss is the mean square of the outputs)
and peak memory for *plain*, *orepa* and *offline*. Offline is the same six branches run on the feature maps,
each with its own BN (benchmarks/offline_block.py). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA,
and the peak RSS of a dedicated process per variant on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from datetime import date
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks.common import cpu_name, median_ms, peak_rss_mb, run_worker, tensors, train_step_fn  # noqa: E402
from benchmarks.offline_block import to_offline  # noqa: E402
from orepa_convert import OREPAConv, convert_to_orepa, fold_orepa  # noqa: E402
from orepa_convert.cli.model_specs import build_model  # noqa: E402

DEFAULT_MODELS = "yolov8n,yolov8s,yolov8m,yolo11n,resnet18,resnet50,efficientnet_b0,mobilenetv3_large_100"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = ("plain", "orepa", "offline")


def randomise_scales(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Give every non-origin branch scale a random value, as after training (a paper-init network of random
    weights explodes and would only measure how it amplifies float rounding)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in (m for m in model.modules() if isinstance(m, OREPAConv)):
            for branch in block.branches:
                if branch != "origin":
                    scale = block.scale(branch)
                    scale.copy_(torch.randn(scale.shape, generator=gen) * std)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward(model: torch.nn.Module, x: torch.Tensor):
    def run():
        with torch.inference_mode():
            return model(x)

    return run


def inference(spec: str, batch: int, imgsz: int, dtype: torch.dtype, device: torch.device, warmup: int,
              iters: int) -> dict:
    torch.manual_seed(0)
    plain = build_model(spec).eval()
    orepa = convert_to_orepa(copy.deepcopy(plain))
    randomise_scales(orepa)
    folded = fold_orepa(copy.deepcopy(orepa))
    plain, orepa, folded = (m.to(device=device, dtype=dtype) for m in (plain, orepa, folded))
    x = torch.randn(batch, 3, imgsz, imgsz, device=device, dtype=dtype)
    row = {"model": spec, "batch": batch, "imgsz": imgsz, "dtype": str(dtype).replace("torch.", "")}
    blocks = [m for m in orepa.modules() if isinstance(m, OREPAConv)]

    def set_cache(on: bool) -> None:
        for b in blocks:
            b.eval_cache = on

    variants = {
        "plain_ms": lambda: _forward(plain, x)(),
        "orepa_ms": lambda: (set_cache(True), _forward(orepa, x)()),
        "orepa_nocache_ms": lambda: (set_cache(False), _forward(orepa, x)()),
        "folded_ms": lambda: _forward(folded, x)(),
    }
    for fn in variants.values():  # warm every variant up before timing any of them
        median_ms(fn, device, warmup, 1)
    for _ in range(2):  # two interleaved passes; each variant keeps its better median
        for key, fn in variants.items():
            ms = median_ms(fn, device, 0, iters)
            row[key] = min(ms, row.get(key, ms))
    set_cache(True)
    y_orepa = [t.float() for t in tensors(_forward(orepa, x)())]
    y_folded = [t.float() for t in tensors(_forward(folded, x)())]
    row["fold_max_abs_err"] = max((a - b).abs().max().item() for a, b in zip(y_folded, y_orepa))
    row["fold_rel_err"] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(y_folded, y_orepa))
    row["params_plain"], row["params_orepa"], row["params_folded"] = _params(plain), _params(orepa), _params(folded)
    row["blocks"] = len(blocks)
    return row


def training_variant(spec: str, variant: str, batch: int, imgsz: int, dtype: torch.dtype, device: torch.device,
                     warmup: int, iters: int) -> dict:
    """Step time and peak memory of one variant (run in its own process on the CPU)."""
    torch.manual_seed(0)
    model = build_model(spec)
    if variant == "orepa":
        convert_to_orepa(model)
    elif variant == "offline":
        to_offline(model)
    model.to(device)
    x = torch.randn(batch, 3, imgsz, imgsz, device=device)
    step = train_step_fn(model, x, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    ms = median_ms(step, device, warmup, iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"step_ms": ms, "peak_mb": peak}


def training(spec: str, batch: int, imgsz: int, args: argparse.Namespace, device: torch.device) -> dict:
    row = {"model": spec, "batch": batch, "imgsz": imgsz}
    for variant in VARIANTS:
        if device.type == "cuda":
            res = training_variant(spec, variant, batch, imgsz, DTYPES[args.dtype], device, args.warmup, args.steps)
            torch.cuda.empty_cache()
        else:
            res = run_worker(__file__, [spec, variant, str(batch), str(imgsz), args.dtype, str(args.warmup),
                                        str(args.steps), str(args.threads)], args.threads)
        row[f"{variant}_step_ms"], row[f"{variant}_peak_mb"] = res["step_ms"], res["peak_mb"]
    return row


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"Device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, {meta['dtype']}, "
             f"{meta['date']}; memory: {meta['memory']}.", "",
             "| model | batch | px | plain ms | orepa ms | orepa (no cache) ms | folded ms | folded/plain | "
             "fold max abs err | params plain | params orepa | params folded |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["inference"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['imgsz']} | {r['plain_ms']:.2f} | {r['orepa_ms']:.2f} | "
                     f"{r['orepa_nocache_ms']:.2f} | {r['folded_ms']:.2f} | {r['folded_ms'] / r['plain_ms']:.3f} | "
                     f"{r['fold_max_abs_err']:.2e} | {r['params_plain']:,} | {r['params_orepa']:,} | {r['params_folded']:,} |")
    if results["training"]:
        lines += ["", "| model | batch | px | plain step ms | OREPA step ms (×) | offline step ms (×) | plain peak MB | "
                      "OREPA peak MB (×) | offline peak MB (×) | OREPA extra / offline extra (time, memory) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["training"]:
            p, o, f = r["plain_step_ms"], r["orepa_step_ms"], r["offline_step_ms"]
            pm, om, fm = r["plain_peak_mb"], r["orepa_peak_mb"], r["offline_peak_mb"]
            extra_t = (o - p) / (f - p) if f > p else float("nan")
            extra_m = (om - pm) / (fm - pm) if fm > pm else float("nan")
            lines.append(f"| {r['model']} | {r['batch']} | {r['imgsz']} | {p:.0f} | {o:.0f} ({o / p:.2f}×) | "
                         f"{f:.0f} ({f / p:.2f}×) | {pm:.0f} | {om:.0f} ({om / pm:.2f}×) | {fm:.0f} ({fm / pm:.2f}×) | "
                         f"{extra_t:.2f}, {extra_m:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inf = results["inference"]
    fig, axes = plt.subplots(1, 3 if results["training"] else 1, figsize=(15 if results["training"] else 6, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    labels = [f"{r['model']}\nb{r['batch']}" for r in inf]
    xs = range(len(inf))
    for i, (key, name) in enumerate((("plain_ms", "plain"), ("orepa_ms", "OREPA (unfolded)"), ("folded_ms", "folded"))):
        ax.bar([x + (i - 1) * 0.27 for x in xs], [r[key] for r in inf], 0.27, label=name)
    ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("inference latency (ms)")
    ax.set_title(f"Inference, {results['meta']['device_name']}")
    ax.legend()
    if results["training"]:
        tr = results["training"]
        labels = [f"{r['model']}\nb{r['batch']}" for r in tr]
        xs = range(len(tr))
        for ax, kind, title in ((axes[0][1], "step_ms", "training step time / plain"),
                                (axes[0][2], "peak_mb", "training peak memory / plain")):
            for i, variant in enumerate(("orepa", "offline")):
                ax.bar([x + (i - 0.5) * 0.38 for x in xs], [r[f"{variant}_{kind}"] / r[f"plain_{kind}"] for r in tr],
                       0.38, label="OREPA" if variant == "orepa" else "offline (DBB-style)")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=8)
            ax.set_title(title)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # internal: one training variant in a fresh process (CPU peak RSS)
        spec, variant, batch, imgsz, dtype, warmup, steps, threads = argv[1:9]
        torch.set_num_threads(int(threads))
        torch.set_flush_denormal(True)
        res = training_variant(spec, variant, int(batch), int(imgsz), DTYPES[dtype], torch.device("cpu"),
                               int(warmup), int(steps))
        print(json.dumps(res))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated model specs")
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (fixed)")
    parser.add_argument("--no-training", action="store_true", help="inference only")
    parser.add_argument("--quick", action="store_true", help="few iterations, for smoke runs")
    parser.add_argument("--warmup", type=int, help="warm-up runs (default 5; quick 1)")
    parser.add_argument("--iters", type=int, help="timed inference runs per pass (default 30; quick 3)")
    parser.add_argument("--steps", type=int, help="timed training steps (default 8; quick 2)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    quick = (1, 3, 2) if args.quick else (5, 30, 8)
    args.warmup, args.iters, args.steps = (v if v is not None else q for v, q in zip((args.warmup, args.iters, args.steps), quick))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.set_num_threads(args.threads)
    flush = torch.set_flush_denormal(True) if device.type == "cpu" else False
    from tqdm import tqdm

    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    results = {
        "meta": {
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch": torch.__version__,
            "dtype": args.dtype,
            "date": date.today().isoformat(),
            "memory": "cuda_max_allocated" if device.type == "cuda" else "rss",
            "threads": args.threads if device.type == "cpu" else None,
            "quick": args.quick,
            "flush_denormal": flush,
            "command": " ".join(["python", "benchmarks/latency.py", *argv]),
        },
        "inference": [],
        "training": [],
    }
    jobs = [(s, b) for s in specs for b in args.batch]
    for spec, batch in tqdm(jobs, desc="inference", unit="case"):
        results["inference"].append(inference(spec, batch, args.imgsz, DTYPES[args.dtype], device, args.warmup, args.iters))
    if not args.no_training:
        for spec, batch in tqdm(jobs, desc="training (plain / orepa / offline)", unit="case"):
            results["training"].append(training(spec, batch, args.imgsz, args, device))
    text = markdown(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
