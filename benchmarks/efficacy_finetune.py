"""Fine-tuning efficacy, with the comparison harness: a plain yolov8n pretrained on generated task A is fine-tuned
on a different generated task B, plain vs OREPA ``preserve`` and ``preserve_live``, each at its own learning rate
(selected on the validation split), paired seeds, reported on B's held-out test split.

    python benchmarks/efficacy_finetune.py --json docs/results/efficacy_finetune.json

1. Pretraining (once; reproducible from ``--pretrain-seed``): plain yolov8n from its YAML on
   :func:`orepa_convert.data.synthetic.make_detection_benchmark` (task A: rectangles, ellipses, triangles, crosses in
   random colours on noisy tinted backgrounds), saved as ``PROJECT/pretrained_A.pt`` (a stock checkpoint).
2. Fine-tuning: ``orepa-convert compare pretrained_A.pt --data B.yaml`` on
   :func:`orepa_convert.data.synthetic.make_finetune_target` (task B: rings, diamonds, stars, hexagons, bars in pastel
   or dark palettes on striped gradients). Every variant of a seed starts from the same pretrained weights.
Resumable: rerun the same command to continue.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import export_study, yolo_study_train_args  # noqa: E402


def pretrain(project: Path, args: argparse.Namespace) -> Path:
    """The plain task-A checkpoint (trained once; an existing one is reused)."""
    target = project / "pretrained_A.pt"
    if target.exists():
        return target
    import torch
    from ultralytics import YOLO

    from orepa_convert.data.synthetic import make_detection_benchmark

    data = make_detection_benchmark(project / "data_A", args.pretrain_n_train, args.pretrain_n_val, args.imgsz)
    torch.manual_seed(args.pretrain_seed)
    model = YOLO(args.model)
    model.train(data=str(data), epochs=args.pretrain_epochs, imgsz=args.imgsz, lr0=args.pretrain_lr,
                seed=args.pretrain_seed, deterministic=True, pretrained=False, project=str(project), name="pretrain_A",
                exist_ok=True, plots=False, verbose=False, **yolo_study_train_args(args.batch))
    shutil.copy(project / "pretrain_A" / "weights" / "best.pt", target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolov8n.yaml", help="architecture pretrained on task A")
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--pretrain-lr", type=float, default=0.02)
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--pretrain-n-train", type=int, default=600)
    parser.add_argument("--pretrain-n-val", type=int, default=100)
    parser.add_argument("--variants", nargs="+", default=["plain", "preserve", "preserve_live"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--select-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.04])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=80)
    parser.add_argument("--n-test", type=int, default=80)
    parser.add_argument("--project", type=Path, default=Path("runs/efficacy_finetune"))
    parser.add_argument("--json", metavar="PATH", help="also write the study's runs here (docs/results format)")
    args = parser.parse_args(argv)

    from orepa_convert.compare import CompareSettings, run_all
    from orepa_convert.data.synthetic import make_finetune_target

    project = args.project.resolve()
    project.mkdir(parents=True, exist_ok=True)
    start = pretrain(project, args)
    data = project / "data_B" / "data.yaml"
    if not data.exists():
        make_finetune_target(data.parent, args.n_train, args.n_val, args.n_test, args.imgsz)
    settings = CompareSettings(
        backend="ultralytics", model=str(start), data=str(data), project=str(project / "compare"),
        variants=tuple(args.variants), seeds=tuple(args.seeds), epochs=args.epochs, imgsz=args.imgsz,
        lrs=tuple(args.lrs), select_seeds=tuple(args.select_seeds), train_args=yolo_study_train_args(args.batch),
    )
    result = run_all(settings)
    print((project / "compare" / "compare.md").read_text(encoding="utf-8"))
    if args.json:
        export_study(result, Path(args.json), {
            "pretrain": {"model": args.model, "epochs": args.pretrain_epochs, "lr0": args.pretrain_lr,
                         "seed": args.pretrain_seed, "n_train": args.pretrain_n_train, "n_val": args.pretrain_n_val,
                         "dataset": "synthetic.make_detection_benchmark (seed 0)"},
            "n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test,
            "dataset": "synthetic.make_finetune_target (seed 1)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
