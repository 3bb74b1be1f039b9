"""Detection efficacy from scratch, with the comparison harness: plain yolov8n vs OREPA inits, each at its own
learning rate (selected on the validation split), paired seeds, reported on a held-out test split.

    python benchmarks/efficacy_detect.py --json docs/results/efficacy_detect.json

Data: :func:`orepa_convert.data.synthetic.make_detection_benchmark` (four shape classes whose colour is random, 1-5
objects per image at 12-50 % of the image, overlaps, clutter) with a test split. Every run is
``orepa-convert compare``'s (its own process, resumable: rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import export_study, yolo_study_train_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolov8n.yaml")
    parser.add_argument("--variants", nargs="+", default=["plain", "preserve", "scratch"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--select-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.04])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n-train", type=int, default=240)
    parser.add_argument("--n-val", type=int, default=80)
    parser.add_argument("--n-test", type=int, default=80)
    parser.add_argument("--project", type=Path, default=Path("runs/efficacy_detect"))
    parser.add_argument("--json", metavar="PATH", help="also write the study's runs here (docs/results format)")
    args = parser.parse_args(argv)

    from orepa_convert.compare import CompareSettings, run_all
    from orepa_convert.data.synthetic import make_detection_benchmark

    project = args.project.resolve()
    data_dir = project / "data"
    data = data_dir / "data.yaml"
    if not data.exists():
        make_detection_benchmark(data_dir, args.n_train, args.n_val, args.imgsz, n_test=args.n_test)
    settings = CompareSettings(
        backend="ultralytics", model=args.model, data=str(data), project=str(project / "compare"),
        variants=tuple(args.variants), seeds=tuple(args.seeds), epochs=args.epochs, imgsz=args.imgsz,
        lrs=tuple(args.lrs), select_seeds=tuple(args.select_seeds), train_args=yolo_study_train_args(args.batch),
    )
    result = run_all(settings)
    print((project / "compare" / "compare.md").read_text(encoding="utf-8"))
    if args.json:
        export_study(result, Path(args.json), {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test,
                                              "dataset": "synthetic.make_detection_benchmark (seed 0)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
