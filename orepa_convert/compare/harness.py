"""The comparison harness: plan the paired runs, run each in its own process, resume, select learning rates.

Every run trains one variant (``plain`` or an OREPA init) at one learning rate and seed, in a fresh Python
process (:mod:`.worker`), so runs do not share framework state and each has its own peak memory. For one seed,
every variant starts from the same plain weights and sees the same data order (the framework's seed). Results go
to ``PROJECT/compare.json`` after every run; a run already there is not run again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from ..errors import CompareError, CompareRunError
from .stats import best_lr, summarise
from .variants import parse_variant

logger = logging.getLogger(__name__)

RESULTS = "compare.json"
BACKENDS = ("ultralytics", "timm")
BUDGETS = ("epochs", "time")


@dataclass(frozen=True)
class CompareSettings:
    """What to compare. ``lrs`` empty: the framework's default learning rate; several: each variant picks its
    own on the validation split of ``select_seeds`` (default: the first seed)."""

    backend: str
    model: str
    data: str
    project: str
    variants: tuple[str, ...] = ("plain", "preserve")
    seeds: tuple[int, ...] = (0,)
    epochs: int = 10
    imgsz: int | None = None
    lrs: tuple[float, ...] = ()
    select_seeds: tuple[int, ...] = ()
    budget: str = "epochs"
    train_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise CompareError(f"unknown backend {self.backend!r}; choose from {list(BACKENDS)}")
        for variant in self.variants:
            parse_variant(variant)
        if len(set(self.variants)) != len(self.variants):
            raise CompareError(f"variants repeat: {list(self.variants)}")
        if "plain" not in self.variants:
            raise CompareError("--variants needs 'plain': every OREPA variant is compared with plain training")
        if len(self.variants) < 2:
            raise CompareError("--variants needs at least one OREPA init besides 'plain' (e.g. plain preserve)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CompareError(f"--seeds must be distinct seeds, got {list(self.seeds)}")
        if self.epochs < 1:
            raise CompareError(f"--epochs must be >= 1, got {self.epochs}")
        if any(lr <= 0 for lr in self.lrs) or len(set(self.lrs)) != len(self.lrs):
            raise CompareError(f"--lr0 must be distinct positive rates, got {list(self.lrs)}")
        if self.budget not in BUDGETS:
            raise CompareError(f"--budget must be one of {list(BUDGETS)}, got {self.budget!r}")

    @property
    def selecting(self) -> bool:
        return len(self.lrs) > 1

    @property
    def selection_seeds(self) -> tuple[int, ...]:
        return self.select_seeds or self.seeds[:1]

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change what a run computes (a resumed comparison must keep them)."""
        keep = ("backend", "model", "data", "epochs", "imgsz", "budget", "train_args")
        return {k: v for k, v in dataclasses.asdict(self).items() if k in keep}


@dataclass(frozen=True)
class Job:
    variant: str
    lr: float | None
    seed: int
    epochs: int
    role: str  # why it first ran: "select" (learning rates), "report", "timing" (plain at equal epochs, --budget time)

    def key(self) -> tuple:
        return (self.variant, self.lr, self.seed, self.epochs)

    def name(self) -> str:
        lr = "default" if self.lr is None else f"{self.lr:g}"
        return f"{self.variant}-lr{lr}-s{self.seed}-e{self.epochs}"


class Results:
    """``compare.json``: the settings, every run record (one per evaluated split), the selections made."""

    def __init__(self, settings: CompareSettings) -> None:
        self.path = Path(settings.project) / RESULTS
        self.settings = settings
        self.data: dict[str, Any] = {"settings": dataclasses.asdict(settings), "meta": {}, "runs": []}
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise CompareError(
                    f"{self.path} is not a compare.json this tool wrote ({exc}); use another --project"
                ) from None
            before = (
                CompareSettings(**{**old["settings"], "variants": tuple(old["settings"]["variants"])}).fingerprint()
                if isinstance(old, dict) and "settings" in old
                else None
            )
            if before != settings.fingerprint():
                raise CompareError(
                    f"{self.path} holds runs made with other settings ({before}); resume with the same model, data, "
                    f"epochs, image size, budget and training options, or use another --project"
                )
            self.data["runs"] = old.get("runs", [])
            self.data["meta"] = old.get("meta", {})

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.data["runs"]

    def done(self, job: Job) -> bool:
        return any(_key(r) == job.key() for r in self.runs)

    def records(self, job: Job) -> list[dict[str, Any]]:
        return [r for r in self.runs if _key(r) == job.key()]

    def add(self, records: list[dict[str, Any]]) -> None:
        self.runs.extend(records)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, self.path)


def _key(record: dict[str, Any]) -> tuple:
    return (record["variant"], record["lr"], record["seed"], record["epochs"])


Runner = Callable[[CompareSettings, Job, Path], list[dict[str, Any]]]


def run_in_subprocess(settings: CompareSettings, job: Job, run_dir: Path) -> list[dict[str, Any]]:
    """Run one job in a fresh Python process (:mod:`.worker`); its records (one per evaluated split)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"settings": dataclasses.asdict(settings), "job": dataclasses.asdict(job), "run_dir": str(run_dir)}
    (run_dir / "job.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    out = run_dir / "result.json"
    out.unlink(missing_ok=True)
    log = run_dir / "log.txt"
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", "orepa_convert.compare.worker", str(run_dir / "job.json"), str(out)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise CompareRunError(f"run {job.name()} failed (exit {proc.returncode}): {tail[0]} -- full log: {log}")
    return json.loads(out.read_text(encoding="utf-8"))


def choose_lrs(
    settings: CompareSettings, results: Results, metric: str, epochs_of: dict[str, int]
) -> dict[str, float | None]:
    """Each variant's learning rate: the one with the best mean validation metric over the selection seeds (the
    only one when there is no selection)."""
    if not settings.selecting:
        return {v: (settings.lrs[0] if settings.lrs else None) for v in settings.variants}
    chosen: dict[str, float | None] = {}
    for variant in settings.variants:
        scores = {
            lr: [
                r[metric]
                for r in results.runs
                if (r["variant"], r["lr"], r["epochs"], r["split"]) == (variant, lr, epochs_of[variant], "val")
                and r["seed"] in settings.selection_seeds
            ]
            for lr in settings.lrs
        }
        chosen[variant] = best_lr(scores)
    return chosen


def run_compare(
    settings: CompareSettings,
    *,
    runner: Runner = run_in_subprocess,
    has_test: bool = False,
    metric: str = "map50_95",
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the comparison and write ``compare.json``, ``compare.md`` and ``compare.png`` in the
    project folder; return the ``compare.json`` content."""
    from tqdm import tqdm

    from .report import write_markdown, write_plot

    results = Results(settings)
    project = Path(settings.project)
    first_lr = settings.lrs[0] if settings.lrs else None
    variants, epochs = settings.variants, settings.epochs
    orepa = [v for v in variants if v != "plain"]
    bar = tqdm(desc="compare", unit="run", disable=not progress, total=_planned(settings))
    counted: set[tuple] = set()  # a job asked for again (a selection run that is also a reported run) counts once

    def execute(job: Job) -> list[dict[str, Any]]:
        if not results.done(job):
            bar.set_postfix_str(job.name())
            results.add([{**r, "role": job.role} for r in runner(settings, job, project / "runs" / job.name())])
        if job.key() not in counted:
            counted.add(job.key())
            bar.update(1)
        return results.records(job)

    plain_epochs = epochs
    if settings.budget == "time":  # plain trains as long (wall time) as OREPA does at equal epochs
        seed = settings.selection_seeds[0] if settings.selecting else settings.seeds[0]
        timing = execute(Job("plain", first_lr, seed, epochs, "timing"))[0]["wall_seconds"]
        orepa_seconds = [
            execute(Job(v, first_lr, seed, epochs, "select" if settings.selecting else "report"))[0]["wall_seconds"]
            for v in orepa
        ]
        plain_epochs = max(1, round(epochs * (sum(orepa_seconds) / len(orepa_seconds)) / timing))
        results.data["meta"]["plain_epochs"] = plain_epochs
        if plain_epochs == epochs:  # the timing run is also a run of the comparison
            bar.total -= 1
    epochs_of = {v: (plain_epochs if v == "plain" else epochs) for v in variants}

    if settings.selecting:
        for seed in settings.selection_seeds:
            for lr in settings.lrs:
                for v in variants:
                    execute(Job(v, lr, seed, epochs_of[v], "select"))
    chosen = choose_lrs(settings, results, metric, epochs_of)
    for seed in settings.seeds:
        for v in variants:
            execute(Job(v, chosen[v], seed, epochs_of[v], "report"))
    bar.close()

    split = "test" if has_test else "val"
    summary = summarise(results.runs, metric, split, {v: (chosen[v], epochs_of[v]) for v in variants})
    results.data.update(metric=metric, reported_split=split, chosen_lr=chosen, epochs_of=epochs_of)
    results.data["meta"].setdefault("date", date.today().isoformat())
    results.data["summary"] = [_summary_dict(s) for s in summary]
    results.save()
    write_markdown(project / "compare.md", results.data, summary)
    write_plot(project / "compare.png", summary, metric, split)
    return results.data


def _planned(settings: CompareSettings) -> int:
    """How many distinct runs the comparison makes (fresh or resumed)."""
    n = len(settings.variants)
    total = len(settings.seeds) * n
    if settings.selecting:  # a selection seed's run at the chosen rate is also its reported run
        total += (
            len(settings.selection_seeds) * len(settings.lrs) - len(set(settings.selection_seeds) & set(settings.seeds))
        ) * n
    if settings.budget == "time":
        total += 1  # plain at equal epochs (the OREPA timing runs are runs of the comparison)
    return total


def _summary_dict(s: Any) -> dict[str, Any]:
    row = {
        "variant": s.variant,
        "lr": s.lr,
        "n": s.n,
        "mean": s.mean,
        "std": s.std,
        "epochs": s.epochs,
        "mean_wall_seconds": s.mean_seconds,
        "mean_peak_memory_mb": s.mean_memory_mb,
    }
    if s.paired is not None:
        row.update(
            seeds=s.paired.seeds,
            deltas=s.paired.deltas,
            mean_delta=s.paired.mean,
            ci95=list(s.paired.interval) if s.paired.interval else None,
            seeds_better=s.paired.better,
            time_ratio=s.time_ratio,
            memory_ratio=s.memory_ratio,
        )
    return row


def check_paths(settings: CompareSettings) -> None:
    """One-line errors for a missing dataset or model file before anything runs."""
    data = Path(settings.data)
    if not data.exists():
        what = "dataset folder" if settings.backend == "timm" else "dataset YAML"
        raise CompareError(f"{what} {settings.data} does not exist")
    if settings.backend == "timm":
        missing = [s for s in ("train", "val") if not (data / s).is_dir()]
        if missing:
            raise CompareError(
                f"{settings.data} needs train/ and val/ ImageFolder splits (missing: {', '.join(missing)})"
            )
    model = Path(settings.model)
    if settings.backend == "ultralytics" and model.suffix == ".pt" and not model.exists():
        raise CompareError(f"model file {settings.model} does not exist (nothing is downloaded)")


def has_test_split(settings: CompareSettings) -> bool:
    """Whether the dataset has a ``test`` split to report on."""
    data = Path(settings.data)
    if settings.backend == "timm" or data.is_dir():
        return (data / "test").is_dir()
    import yaml

    try:
        spec = yaml.safe_load(data.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CompareError(f"cannot read dataset YAML {data}: {exc}") from None
    return bool(spec.get("test")) if isinstance(spec, dict) else False


def default_metric(settings: CompareSettings) -> str:
    """The metric a comparison reports: top-1 accuracy for classification, else the task's mAP50-95."""
    if settings.backend == "timm":
        return "top1"
    from .runners import ultralytics_metric_name

    return ultralytics_metric_name(settings.model)


def run_all(settings: CompareSettings, *, progress: bool = True) -> dict[str, Any]:
    """Validate paths, then :func:`run_compare` with the dataset's test split and the task's metric."""
    check_paths(settings)
    return run_compare(settings, has_test=has_test_split(settings), metric=default_metric(settings), progress=progress)


__all__: Sequence[str] = ("CompareError", "CompareSettings", "Job", "run_all", "run_compare")
