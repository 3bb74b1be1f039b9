"""One comparison run per framework: train one variant at one learning rate and seed, evaluate it, measure it.

Called in the worker process (:mod:`.worker`); each function returns one record per evaluated split.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from ..config import Init
from ..errors import CompareError, CompareRunError, RecipeError
from .variants import parse_variant

if TYPE_CHECKING:
    from ..integrations.timm_recipe import TimmRecipe

#: ultralytics results_dict key of the metric a comparison reports, by task
_ULTRALYTICS_METRICS = {
    "detect": ("map50_95", "metrics/mAP50-95(B)"),
    "obb": ("map50_95", "metrics/mAP50-95(B)"),
    "segment": ("mask_map50_95", "metrics/mAP50-95(M)"),
    "pose": ("pose_map50_95", "metrics/mAP50-95(P)"),
    "classify": ("top1", "metrics/accuracy_top1"),
}


def _ultralytics_task(model: str) -> str:
    stem = Path(model).stem.lower()
    for task, suffix in (("segment", "-seg"), ("pose", "-pose"), ("obb", "-obb"), ("classify", "-cls")):
        if stem.endswith(suffix):
            return task
    return "detect"


def ultralytics_metric_name(model: str) -> str:
    """The name a comparison gives the reported metric of an ultralytics model (by its file name's task suffix)."""
    return _ULTRALYTICS_METRICS[_ultralytics_task(model)][0]


def _snake(key: str) -> str:
    """``metrics/mAP50-95(B)`` -> ``map50_95_b``."""
    key = key.removeprefix("metrics/").replace("-", "_")
    key = re.sub(r"\((\w)\)$", r"_\1", key)
    return re.sub(r"[^0-9a-zA-Z_]", "_", key).lower()


class PeakMemory:
    """Peak memory of the training: CUDA's allocator peak on a CUDA device, else this process's peak resident
    set (reset at the start on Linux, through /proc/self/clear_refs; unknown elsewhere)."""

    def __init__(self, device: str | None) -> None:
        self.cuda = torch.cuda.is_available() and str(device or "").lower() not in ("cpu", "mps")
        self.kind = "cuda_allocated" if self.cuda else "rss"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        except OSError:
            self.kind = "unknown"

    def peak_mb(self) -> float | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.kind != "rss":
            return None
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return None


def run_ultralytics(
    settings: dict[str, Any], job: dict[str, Any], run_dir: Path, has_test: bool
) -> list[dict[str, Any]]:
    """Train ``job`` with the ultralytics trainer; evaluate ``best.pt`` (folded) on val and, if any, test."""
    from ultralytics import YOLO

    from ..convert import convert_to_orepa

    seed, variant = job["seed"], job["variant"]
    torch.manual_seed(seed)
    model = YOLO(settings["model"])
    init, options = parse_variant(variant)
    if init != "plain":
        convert_to_orepa(model, init=init, seed=seed, restore=False, **options)  # an OREPA best.pt: its folded weights
    args: dict[str, Any] = {"plots": False, "verbose": False, **settings["train_args"]}
    args.update(
        data=settings["data"],
        epochs=job["epochs"],
        seed=seed,
        deterministic=True,
        project=str(run_dir),
        name="train",
        exist_ok=True,
    )
    if settings.get("imgsz"):
        args["imgsz"] = settings["imgsz"]
    if job["lr"] is not None:
        args["lr0"] = job["lr"]
    if Path(settings["model"]).suffix != ".pt":
        args.setdefault("pretrained", False)  # a YAML: the trainer builds the start weights under the run's seed
    memory = PeakMemory(args.get("device"))
    memory.start()
    start = time.perf_counter()
    metrics = model.train(**args)
    wall = time.perf_counter() - start
    peak = memory.peak_mb()
    name, key = _ULTRALYTICS_METRICS[_ultralytics_task(settings["model"])]
    evaluated = {"val": metrics.results_dict}
    if has_test:
        val_args = {k: args[k] for k in ("imgsz", "batch", "device", "workers", "half") if k in args}
        evaluated["test"] = model.val(
            data=settings["data"],
            split="test",
            plots=False,
            verbose=False,
            project=str(run_dir),
            name="test",
            exist_ok=True,
            **val_args,
        ).results_dict
    return [
        {
            "variant": variant,
            "lr": job["lr"],
            "seed": seed,
            "split": split,
            "epochs": job["epochs"],
            name: float(values[key]),
            "metrics": {_snake(k): float(v) for k, v in values.items()},
            "wall_seconds": wall,
            "peak_memory_mb": peak,
            "memory_kind": memory.kind,
        }
        for split, values in evaluated.items()
    ]


def timm_recipe(settings: dict[str, Any], job: dict[str, Any], output: Path) -> TimmRecipe:
    """The timm recipe (:mod:`orepa_convert.integrations.timm_recipe`) of one comparison run: the job's variant,
    seed, epochs and learning rate, then the comparison's ``train_args`` (which win, as later flags do)."""
    from ..integrations.timm_recipe import TimmRecipe

    init, options = parse_variant(job["variant"])
    recipe = TimmRecipe(
        model=settings["model"],
        data_dir=str(settings["data"]),
        epochs=int(job["epochs"]),
        seed=int(job["seed"]),
        output=str(output),
        plain=init == "plain",
        init=cast(Init, "preserve" if init == "plain" else init),
        orepa_options=options,
    )
    own = {"lr": job["lr"], "img_size": settings.get("imgsz")}  # None: the recipe's default
    try:
        return recipe.with_options({**own, **settings["train_args"]})
    except RecipeError as exc:
        raise CompareError(f"--train-arg: {exc}") from None


def run_timm(settings: dict[str, Any], job: dict[str, Any], run_dir: Path, has_test: bool) -> list[dict[str, Any]]:
    """Train ``job`` with the timm recipe; top-1 of the folded model on val and, if the dataset has one, test. The
    time is the recipe's training epochs (each with its validation)."""
    from ..integrations.timm_recipe import train_timm

    output = run_dir / "train"
    memory = PeakMemory(settings["train_args"].get("device"))
    memory.start()
    summary = train_timm(timm_recipe(settings, job, output))
    peak = memory.peak_mb()
    if not summary["checks_passed"]:
        raise CompareRunError(f"the timm recipe failed its checks: {summary}")
    wall = sum(h["seconds"] for h in summary["history"])
    evaluated = {"val": summary["val_acc_folded"]}
    if has_test:
        evaluated["test"] = summary["test_acc"]
    return [
        {
            "variant": job["variant"],
            "lr": job["lr"],
            "seed": job["seed"],
            "split": split,
            "epochs": job["epochs"],
            "top1": float(value),
            "metrics": {"top1": float(value)},
            "wall_seconds": wall,
            "peak_memory_mb": peak,
            "memory_kind": memory.kind,
        }
        for split, value in evaluated.items()
    ]
