"""Detection efficacy with the real ultralytics trainer: plain yolov8n vs OREPA inits, same schedule, paired seeds.

    python benchmarks/efficacy_detect.py --json docs/results/efficacy_detect.json

Data: :func:`orepa_convert.synthetic.make_detection_benchmark` (four shape classes whose colour is random, 1-5
objects per image at 12-50 % of the image, overlaps, clutter). For each seed every variant starts from the same
plain initialisation (the trainer builds the model under the run's seed; ``pretrained=False``, and the OREPA
variants convert it as recorded) and sees the same data order. The reported mAP is the final validation of the
run's ``best.pt`` (the folded model; folding is exact).
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("plain", "orepa-preserve", "orepa-scratch")


def run(variant: str, seed: int, data: Path, args: argparse.Namespace) -> dict:
    import torch
    from ultralytics import YOLO

    from orepa_convert import convert_to_orepa

    torch.manual_seed(seed)
    model = YOLO(args.model)
    if variant != "plain":
        convert_to_orepa(model, init=variant.split("-")[1], seed=seed)
    t0 = time.perf_counter()
    metrics = model.train(
        data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, nbs=args.batch, lr0=args.lr,
        warmup_epochs=0, mosaic=0.0, optimizer="SGD", seed=seed, deterministic=True, pretrained=False, device="cpu",
        workers=0, plots=False, amp=False, verbose=False, project=str(args.project), name=f"{variant}-{seed}",
        exist_ok=True,
    )
    return {"variant": variant, "seed": seed, "map50_95": float(metrics.box.map), "map50": float(metrics.box.map50),
            "train_seconds": time.perf_counter() - t0}


def summarise(runs: list[dict]) -> list[dict]:
    base = {r["seed"]: r["map50_95"] for r in runs if r["variant"] == "plain"}
    rows = []
    for variant in VARIANTS:
        mine = {r["seed"]: r["map50_95"] for r in runs if r["variant"] == variant}
        if not mine:
            continue
        values = list(mine.values())
        row = {"variant": variant, "n": len(values), "mean_map50_95": statistics.mean(values),
               "std_map50_95": statistics.stdev(values) if len(values) > 1 else 0.0}
        if variant != "plain":
            diffs = [mine[s] - base[s] for s in sorted(set(mine) & set(base))]
            row.update(per_seed_delta=diffs, mean_delta=statistics.mean(diffs) if diffs else None,
                       seeds_better=sum(d > 0 for d in diffs))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolov8n.yaml")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--n-train", type=int, default=240)
    parser.add_argument("--n-val", type=int, default=80)
    parser.add_argument("--project", type=Path, default=Path("runs/efficacy_detect"))
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    import torch
    from tqdm import tqdm

    from orepa_convert.synthetic import make_detection_benchmark

    args.project = args.project.resolve()
    data = make_detection_benchmark(args.project / "data", args.n_train, args.n_val, args.imgsz)
    jobs = [(v, s) for s in args.seeds for v in variants]
    runs = []
    for variant, seed in (bar := tqdm(jobs, unit="run")):
        bar.set_description(f"{variant} seed {seed}")
        runs.append(run(variant, seed, data, args))
    meta = {"date": date.today().isoformat(), "device": "cpu", "torch": torch.__version__, "model": args.model,
            "epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch, "lr": args.lr, "n_train": args.n_train,
            "n_val": args.n_val, "seeds": args.seeds}
    summary = summarise(runs)
    for row in summary:
        extra = "" if row["variant"] == "plain" else (
            f"  delta {row['mean_delta']:+.4f} ({row['seeds_better']}/{row['n']} seeds better)")
        print(f"{row['variant']:16s} mAP50-95 {row['mean_map50_95']:.4f} ± {row['std_map50_95']:.4f}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
