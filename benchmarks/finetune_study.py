"""The multi-task fine-tuning benchmark (issue 30): per task pair, a plain model pretrained on task A is fine-tuned on
task B, plain against OREPA variants, with ``orepa-convert compare``'s harness (paired seeds, each variant's
learning rate selected on B's validation split, reported on B's held-out test split), at equal epochs and at equal
wall time (``--budget time``); then the tasks are pooled (``orepa-convert compare --pool``).

    python benchmarks/finetune_study.py      # every phase on every task: baseline, candidates, equal time
    python benchmarks/finetune_study.py --phases --export docs/results/finetune_tasks.json

Tasks (:data:`TASKS`): digits and shapes, each as detection (yolov8n from its YAML, ultralytics) and as
classification (timm resnet18); digits are scikit-learn's bundled handwriting scans (real data), shapes are
generated. Everything is rebuilt from fixed seeds by this script: datasets by :mod:`benchmarks.finetune_tasks`
and :mod:`orepa_convert.data.synthetic`, pretrained checkpoints by a deterministic plain training on A
(``pretrain.json`` records a hash of the checkpoint's tensors; ``--verify-pretrain`` trains A again in a
scratch folder and compares). Resumable: every study is a ``compare.json``; rerun the same command to go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import finetune_tasks as ft  # noqa: E402
from benchmarks.common import cpu_name, yolo_study_train_args  # noqa: E402

BASELINE = ("plain", "preserve", "preserve_live")
#: candidates tried to make the gain robust (docs/efficacy.md): live branches at a quarter of preserve_live's
#: magnitude, and preserve_live without the two costliest branches (a cheaper step, for equal-time budgets)
CANDIDATES = ("preserve_live:live_scale=0.25", "preserve_live:branches=origin+avg+prior+pw")


@dataclass(frozen=True)
class Task:
    name: str
    backend: str  # "ultralytics" or "timm"
    real_data: bool
    source: str
    make_a: Callable[[Path], Path]  # folder -> data (YAML or ImageFolder)
    make_b: Callable[[Path], Path]
    model: str
    imgsz: int
    pretrain_epochs: int
    pretrain_lr: float
    epochs: int
    lrs: tuple[float, ...]


def _digits_source(kind: str) -> str:
    return (f"scikit-learn load_digits scans (1797 real handwritten digits), {kind}; A: digits 0-4, B: digits 5-9; "
            "train/val and test from disjoint scans (benchmarks/finetune_tasks.py, seeds 0 and 1)")


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("digits_det", "ultralytics", True, _digits_source("pasted as 1-3 objects on textured 64 px backgrounds"),
         lambda d: ft.make_digits_detection(d, ft.PRETRAIN_DIGITS, n_train=480, n_val=80, n_test=0, seed=0),
         lambda d: ft.make_digits_detection(d, ft.FINETUNE_DIGITS, n_train=160, n_val=80, n_test=80, seed=1),
         "yolov8n.yaml", 64, 30, 0.02, 10, (0.005, 0.02)),
    Task("shapes_det", "ultralytics", False,
         "generated: A orepa_convert.data.synthetic.make_detection_benchmark (seed 0), B make_finetune_target (seed 1)",
         lambda d: _synthetic("make_detection_benchmark", d, n_train=480, n_val=80, seed=0),
         lambda d: _synthetic("make_finetune_target", d, n_train=160, n_val=80, n_test=80, seed=1),
         "yolov8n.yaml", 64, 30, 0.02, 10, (0.005, 0.02)),
    Task("digits_cls", "timm", True, _digits_source("one scan per 32 px image on a textured background"),
         lambda d: ft.make_digits_classification(d, ft.PRETRAIN_DIGITS, n_train=600, n_val=100, n_test=0, seed=0),
         lambda d: ft.make_digits_classification(d, ft.FINETUNE_DIGITS, n_train=300, n_val=100, n_test=100, seed=1),
         "resnet18", 32, 40, 0.05, 12, (0.01, 0.04)),
    Task("shapes_cls", "timm", False,
         "generated: crops of orepa_convert.data.synthetic scenes; A: task A's 4 shapes (seed 0), B: task B's 5 shapes "
         "(seed 1) (benchmarks/finetune_tasks.make_shapes_classification)",
         lambda d: ft.make_shapes_classification(d, "shapes", n_train=600, n_val=100, n_test=0, seed=0),
         lambda d: ft.make_shapes_classification(d, "targets", n_train=300, n_val=100, n_test=100, seed=1),
         "resnet18", 32, 40, 0.05, 12, (0.01, 0.04)),
)}

TIMM_BATCH = 64
TIMM_PRETRAIN_BATCH = 32  # more steps from scratch (A reaches top-1 ~0.9 on digits)
#: timm augmentation of both phases: a 32 px digit or shape survives the crop, and is not mirrored
TIMM_AUGMENT = {"scale_min": 0.5, "hflip": 0.0}
YOLO_BATCH = 16


def _synthetic(name: str, root: Path, **kw: Any) -> Path:
    from orepa_convert.data import synthetic

    return getattr(synthetic, name)(root, **kw)


def tensor_hash(state: dict[str, Any]) -> str:
    """sha256 over a state_dict's names, dtypes, shapes and bytes (a checkpoint file also holds dates)."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _checkpoint_state(task: Task, path: Path) -> dict[str, Any]:
    import torch

    if task.backend == "timm":
        return torch.load(path, map_location="cpu", weights_only=True)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    return model.float().state_dict()


def _train_a(task: Task, data: Path, out: Path) -> Path:
    """Train plain on A into ``out``; the checkpoint fine-tuning starts from."""
    import torch

    if task.backend == "timm":
        import timm

        from orepa_convert.integrations.timm_recipe import TimmRecipe, train_timm

        recipe = TimmRecipe(
            model=task.model,
            data_dir=str(data),
            epochs=task.pretrain_epochs,
            img_size=task.imgsz,
            batch_size=TIMM_PRETRAIN_BATCH,
            device="cpu",
            scale_min=TIMM_AUGMENT["scale_min"],
            hflip=TIMM_AUGMENT["hflip"],
            lr=task.pretrain_lr,
            seed=0,
            plain=True,
            output=str(out / "run"),
        )
        if not train_timm(recipe)["checks_passed"]:
            raise SystemExit(f"pretraining {task.name} failed its checks")
        state = torch.load(out / "run" / "folded.pth", map_location="cpu", weights_only=True)
        head = timm.create_model(task.model, pretrained=False).pretrained_cfg["classifier"]
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}  # B has its own classes
        target = out / "pretrained_A.pth"
        torch.save(state, target)
        return target
    from ultralytics import YOLO

    torch.manual_seed(0)
    YOLO(task.model).train(data=str(data), epochs=task.pretrain_epochs, imgsz=task.imgsz, lr0=task.pretrain_lr,
                           seed=0, deterministic=True, pretrained=False, project=str(out), name="run", exist_ok=True,
                           plots=False, verbose=False, **yolo_study_train_args(YOLO_BATCH))
    target = out / "pretrained_A.pt"
    shutil.copy(out / "run" / "weights" / "best.pt", target)
    return target


def pretrain(task: Task, folder: Path) -> Path:
    """Task A's plain checkpoint (trained once; ``pretrain.json`` records its tensor hash)."""
    record = folder / "pretrain.json"
    suffix = ".pth" if task.backend == "timm" else ".pt"
    target = folder / f"pretrained_A{suffix}"
    if target.exists() and record.exists():
        return target
    data = task.make_a(folder / "data_A")
    target = _train_a(task, data, folder)
    record.write_text(json.dumps({"task": task.name, "checkpoint": target.name,
                                  "tensor_sha256": tensor_hash(_checkpoint_state(task, target))}, indent=2) + "\n")
    return target


def verify_pretrain(task: Task, folder: Path) -> dict[str, Any]:
    """Train A again in a scratch folder (same command, same seeds) and compare the tensor hashes."""
    recorded = json.loads((folder / "pretrain.json").read_text())["tensor_sha256"]
    with tempfile.TemporaryDirectory() as tmp:
        again = _train_a(task, task.make_a(Path(tmp) / "data_A"), Path(tmp))
        fresh = tensor_hash(_checkpoint_state(task, again))
    out = {"task": task.name, "recorded": recorded, "retrained": fresh, "bit_identical": fresh == recorded}
    print(json.dumps(out))
    return out


def settings_for(task: Task, folder: Path, start: Path, budget: str, variants: tuple[str, ...]):
    from orepa_convert.compare import CompareSettings

    data = folder / "data_B"
    b = (data / "data.yaml") if task.backend == "ultralytics" else data
    if not b.exists():
        task.make_b(data)
    if task.backend == "timm":
        train_args = {"batch": TIMM_BATCH, "device": "cpu", "pretrained_checkpoint": str(start), **TIMM_AUGMENT}
    else:
        train_args = yolo_study_train_args(YOLO_BATCH)
    return CompareSettings(
        backend=task.backend, model=task.model if task.backend == "timm" else str(start), data=str(b),
        project=str(folder / budget), variants=variants, seeds=(0, 1, 2, 3, 4), epochs=task.epochs,
        imgsz=task.imgsz, lrs=task.lrs, select_seeds=(0,), budget=budget, train_args=train_args,
    )


def seed_time_study(epochs_settings, time_settings) -> None:
    """Give a new equal-time study the runs it shares with the equal-epochs one (every OREPA run, and plain at
    equal epochs, its timing run): the same jobs compute the same thing, so they are not trained twice."""
    from orepa_convert.compare.harness import RESULTS

    src, dst = Path(epochs_settings.project) / RESULTS, Path(time_settings.project) / RESULTS
    if dst.exists() or not src.exists():
        return
    runs = json.loads(src.read_text())["runs"]
    shared = [r for r in runs if r["variant"] != "plain" or r["epochs"] == epochs_settings.epochs]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps({"settings": dataclasses.asdict(time_settings),
                               "meta": {"shared_from": str(src)}, "runs": shared}, indent=2) + "\n")


#: the studies, in the order they run (each over every task before the next, so partial results are whole phases)
PHASES = {
    "baseline": ("epochs", BASELINE),
    **{f"candidate{i}": ("epochs", ("plain", c)) for i, c in enumerate(CANDIDATES, 1)},
    "time": ("time", BASELINE),
}


def run_phase(task: Task, root: Path, phase: str) -> None:
    from orepa_convert.compare import run_all

    folder = root / task.name
    folder.mkdir(parents=True, exist_ok=True)
    start = pretrain(task, folder)
    budget, variants = PHASES[phase]
    settings = settings_for(task, folder, start, budget, variants)
    if budget == "time":
        seed_time_study(settings_for(task, folder, start, "epochs", BASELINE), settings)
    run_all(settings)
    if budget == "epochs":  # the summary of every variant the equal-epochs study has run (nothing is trained)
        done = json.loads((folder / "epochs" / "compare.json").read_text())["runs"]
        ran = tuple(v for v in (*BASELINE, *CANDIDATES) if any(r["variant"] == v for r in done))
        if len(ran) > 1 and "plain" in ran:
            run_all(settings_for(task, folder, start, "epochs", ran), progress=False)


def _named_copies(folders: list[Path], scratch: Path) -> list[Path]:
    """Each ``TASK/BUDGET/compare.json`` copied to ``scratch/TASK/`` (read only, so running studies are safe)."""
    out = []
    for folder in folders:
        (scratch / folder.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "compare.json", scratch / folder.parent.name / "compare.json")
        out.append(scratch / folder.parent.name)
    return out


def export(root: Path, path: Path, tasks: list[Task]) -> dict[str, Any]:
    """``docs/results/finetune_tasks.json``: the tasks, every run, the pooled estimates per budget."""
    import torch

    from orepa_convert.compare import pool

    path.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    pooled: dict[str, Any] = {}
    studies: dict[str, Any] = {}
    markdown = ["# Multi-task fine-tuning benchmark", "", f"`python benchmarks/finetune_study.py`; {cpu_name()}, "
                f"torch {torch.__version__}. Test-split metric (mAP50-95 for detection, top-1 for classification); "
                "each variant at its own learning rate (chosen on seed 0's validation split); differences paired "
                "by seed against plain at plain's rate.", ""]
    for budget in ("epochs", "time"):
        folders = [root / t.name / budget for t in tasks if (root / t.name / budget / "compare.json").exists()]
        for folder in folders:
            data = json.loads((folder / "compare.json").read_text())
            task = folder.parent.name

            metric = data.get("metric")
            studies[f"{task}/{budget}"] = {"chosen_lr": data.get("chosen_lr"), "epochs_of": data.get("epochs_of"),
                                          "metric": metric, "summary": data.get("summary")}
            for r in data["runs"]:
                runs.append({"task": task, "variant": r["variant"], "lr": r["lr"], "seed": r["seed"],
                             "split": r["split"], "budget": budget, "epochs": r["epochs"], "role": r.get("role"),
                             "metric": metric or next(k for k in ("map50_95", "top1") if k in r),
                             "value": r.get(metric) if metric else r.get("map50_95", r.get("top1")),
                             "wall_s": r["wall_seconds"]})
        markdown += [f"## Budget: {budget}", "", "| task | variant | lr | epochs | test mean | Δ vs plain (95% CI) "
                     "| seeds better | time × plain |", "|---|---|---|---|---|---|---|---|"]
        for key, study in studies.items():
            if not key.endswith("/" + budget):
                continue
            for row in study["summary"] or []:
                ci = row.get("ci95")
                delta = (f"{row['mean_delta']:+.4f} ({ci[0]:+.4f} to {ci[1]:+.4f})" if ci else
                         "" if row["variant"] == "plain" else f"{row.get('mean_delta', 0):+.4f}")
                better = f"{row['seeds_better']}/{len(row['seeds'])}" if row.get("seeds") else ""
                ratio = f"{row['time_ratio']:.2f}" if row.get("time_ratio") else ""
                markdown.append(f"| {key.split('/')[0]} | {row['variant']} | {row['lr']:g} | {row['epochs']} | "
                                f"{row['mean']:.4f} ± {row['std'] or 0:.4f} | {delta} | {better} | {ratio} |")
        markdown.append("")
        finished = [f for f in folders if "summary" in json.loads((f / "compare.json").read_text())]
        if len(finished) >= 2:
            pooled[budget] = {"tasks": [f.parent.name for f in finished]}
            named = _named_copies(finished, Path(tempfile.mkdtemp()))  # pool names each task by its folder
            for effect in pool.EFFECTS:
                found = pool.pool_studies(named, effect=effect)
                pooled[budget][effect] = pool.to_dict(found)
                if effect == "raw":
                    markdown += [f"### Pooled ({budget} budget, raw effect)", ""]
                    markdown += [f"- {pool.verdict(p)}" for p in found] + [""]
                    pool.write_forest_plot(path.with_name(f"{path.stem}_{budget}.png"), found)
    out = {
        "meta": {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "command": "python benchmarks/finetune_study.py (see its docstring)"},
        "tasks": [{"name": t.name, "backend": t.backend, "real_data": t.real_data, "source": t.source,
                   "model": t.model, "imgsz": t.imgsz, "epochs": t.epochs, "lrs": list(t.lrs),
                   "pretrain": json.loads((root / t.name / "pretrain.json").read_text())
                   if (root / t.name / "pretrain.json").exists() else None} for t in tasks],
        "studies": studies,
        "runs": runs,
        "pooled": pooled,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    path.with_suffix(".md").write_text("\n".join(markdown) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs/finetune_study"))
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--phases", nargs="*", choices=list(PHASES), default=list(PHASES),
                        help="studies to run (default: all, in this order; none: only --verify-pretrain / --export)")
    parser.add_argument("--verify-pretrain", action="store_true", help="retrain each task's A and compare hashes")
    parser.add_argument("--export", type=Path, metavar="JSON", help="write the results file (after the studies)")
    args = parser.parse_args(argv)
    tasks = [TASKS[name] for name in args.tasks]
    root = args.root.resolve()
    for phase in args.phases:
        for task in tasks:
            run_phase(task, root, phase)
    if args.verify_pretrain:
        checks = [verify_pretrain(t, root / t.name) for t in tasks]
        (root / "pretrain_checks.json").write_text(json.dumps(checks, indent=2) + "\n")
    if args.export:
        export(root, args.export, tasks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
