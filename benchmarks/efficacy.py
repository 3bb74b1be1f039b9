"""Does OREPA help? Plain vs OREPA (preserve, paper and scratch inits), each at its own tuned learning rate.

    python benchmarks/efficacy.py --json docs/results/efficacy.json --markdown docs/results/efficacy.md

Protocol: for every model and variant, a learning-rate sweep (``--lrs``) on ``--select-seeds``; each variant's
rate is the one with the best mean accuracy on a validation split carved from the training images (never the test
set). At that rate, ``--seeds`` runs, paired by seed with plain, report validation, test and INT8 test accuracy
(the folded model after onnxruntime static quantization: QDQ, per-channel, calibrated on 200 training images).

Data: scikit-learn's bundled 8x8 digits (real handwritten digits shipped inside the package, nothing is
downloaded), made hard enough not to saturate: upsampled to 32x32, a fixed training subset, random affine
(rotation, scale, shift), a random occluding square and Gaussian noise; the test images are corrupted the same way
once, with a fixed seed. Models: a small ResNet-style network and ultralytics' yolov8n-cls (from its YAML).
For each seed every variant starts from the same plain initialisation (the paper init re-draws the branches) and
sees exactly the same batches and augmentations. Weight decay applies to tensors with more than one dimension
only, for every variant, so the OREPA scale vectors are treated like BN weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from orepa_convert import convert_to_orepa, fold_orepa  # noqa: E402
from orepa_convert.compare.stats import VariantSummary, best_lr  # noqa: E402
from orepa_convert.compare.stats import summarise as paired_summaries  # noqa: E402

VARIANTS = ("plain", "orepa-preserve", "orepa-paper", "orepa-scratch")


# ------------------------------------------------------------------------------------------------ data
def _corrupt(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine, an occluding square and Gaussian noise, per image ([N, 1, 32, 32] in [0, 1])."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=gen) - 0.5) * math.radians(60)
    scale = 0.8 + 0.4 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.3
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, align_corners=False)
    size = 11
    ys = torch.randint(0, 32 - size, (n,), generator=gen)
    xs = torch.randint(0, 32 - size, (n,), generator=gen)
    occlude = torch.rand(n, generator=gen) < 0.6
    rows = torch.arange(32)
    mask = ((rows[None, :, None] >= ys[:, None, None]) & (rows[None, :, None] < ys[:, None, None] + size)
            & (rows[None, None, :] >= xs[:, None, None]) & (rows[None, None, :] < xs[:, None, None] + size))
    out = out.masked_fill((mask & occlude[:, None, None]).unsqueeze(1), 0.0)
    return (out + 0.35 * torch.randn(out.shape, generator=gen)).clamp(-1, 2)


def load_data(n_train: int, n_val: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train", "val", "test"}`` splits; ``val`` is carved from the ``n_train`` training images. Validation and
    test images are corrupted once, with fixed seeds; training images anew in every batch."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val, test = perm[: n_train - n_val], perm[n_train - n_val : n_train], perm[n_train:]
    return {
        "train": (x[train], y[train]),
        "val": (_corrupt(x[val], torch.Generator().manual_seed(4321)), y[val]),
        "test": (_corrupt(x[test], torch.Generator().manual_seed(1234)), y[test]),
    }


# ------------------------------------------------------------------------------------------------ models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


def small_resnet(num_classes: int = 10) -> nn.Module:
    """A small ResNet-style network: 3x3 stem, three stages of basic blocks (16/32/64), GAP, linear."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


def yolov8n_cls(num_classes: int = 10) -> nn.Module:
    from ultralytics.nn.tasks import ClassificationModel

    return ClassificationModel("yolov8n-cls.yaml", nc=num_classes, verbose=False)


MODELS = {"small-resnet": small_resnet, "yolov8n-cls": yolov8n_cls}


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ------------------------------------------------------------------------------------------------ training
def _accuracy(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = split
    with torch.no_grad():
        return (_logits(model(x.expand(-1, 3, -1, -1))).argmax(1) == y).float().mean().item()


def int8_accuracy(folded: nn.Module, calibration: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Accuracy of ``folded`` after onnxruntime static INT8 quantization (QDQ, per-channel weights, activations
    calibrated on ``calibration``), run by onnxruntime on the CPU."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": b.expand(-1, 3, -1, -1).numpy()} for b in calibration.split(20)])

        def get_next(self):
            return next(self.batches, None)

    x, y = split
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        torch.onnx.export(folded, (x[:2].expand(-1, 3, -1, -1),), str(fp32), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
        quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
        session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"x": x.expand(-1, 3, -1, -1).numpy()})[0]
    return float((torch.from_numpy(logits).argmax(1) == y).float().mean())


def run(model_name: str, variant: str, seed: int, lr: float, data: dict, args: argparse.Namespace,
        int8: bool = True) -> dict:
    x_train, y_train = data["train"]
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    if variant != "plain":
        convert_to_orepa(model, init=variant.split("-")[1], seed=seed)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(y_train) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15)
    data_gen = torch.Generator().manual_seed(10_000 + seed)  # same order and augmentations for every variant
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=data_gen)
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            xb = _corrupt(x_train[idx], data_gen).expand(-1, 3, -1, -1)
            loss = F.cross_entropy(_logits(model(xb)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    folded = fold_orepa(copy.deepcopy(model)) if variant != "plain" else copy.deepcopy(model)
    result = {"model": model_name, "variant": variant, "lr": lr, "seed": seed, "val_acc": _accuracy(model, data["val"]),
              "test_acc": _accuracy(model, data["test"]), "test_acc_folded": _accuracy(folded, data["test"]),
              "int8_test_acc": None, "train_seconds": seconds}
    if int8:
        calibration = _corrupt(x_train[:200], torch.Generator().manual_seed(99))
        result["int8_test_acc"] = int8_accuracy(folded, calibration, data["test"])
    return result


def select_rates(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Each (model, variant)'s learning rate: best mean validation accuracy over the selection runs (the
    comparison harness' rule, :func:`orepa_convert.compare.stats.best_lr`)."""
    chosen: dict[str, dict[str, float]] = {}
    for r in runs:
        chosen.setdefault(r["model"], {}).setdefault(r["variant"], None)
    for model_name, variants in chosen.items():
        for variant in variants:
            by_lr: dict[float, list[float]] = {}
            for r in runs:
                if r["model"] == model_name and r["variant"] == variant:
                    by_lr.setdefault(r["lr"], []).append(r["val_acc"])
            variants[variant] = best_lr(by_lr)
    return chosen


def _paired(runs: list[dict], key: str) -> list[VariantSummary]:
    """The harness' paired-by-seed summaries of one model's ``runs`` on the test metric ``key``."""
    records = [
        {**r, "split": "test", "epochs": 0, "value": r[key], "wall_seconds": r["train_seconds"], "peak_memory_mb": None}
        for r in runs
        if r[key] is not None
    ]
    chosen = {r["variant"]: (r["lr"], 0) for r in sorted(records, key=lambda r: VARIANTS.index(r["variant"]))}
    return paired_summaries(records, "value", "test", chosen)


def summarise(runs: list[dict]) -> list[dict]:
    """Per model and variant, at its chosen rate: test / INT8 accuracy and the paired-by-seed difference to plain
    with its 95 % t interval (as ``orepa-convert compare`` reports it)."""
    rows = []
    for model_name in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model_name]
        int8 = {s.variant: s for s in _paired(mine, "int8_test_acc")}
        for s in _paired(mine, "test_acc"):
            row: dict = {
                "model": model_name,
                "variant": s.variant,
                "lr": s.lr,
                "n": s.n,
                "mean_acc": s.mean,
                "std_acc": s.std,
                "mean_int8_acc": int8[s.variant].mean if s.variant in int8 else None,
                "mean_train_seconds": s.mean_seconds,
            }
            if s.paired is not None and s.paired.n:
                row.update(
                    delta_vs_plain=s.paired.mean,
                    delta_ci95=s.paired.interval,
                    per_seed_delta=s.paired.deltas,
                    seeds_better=s.paired.better,
                )
                q = int8.get(s.variant)
                if q is not None and q.paired is not None and q.paired.n:
                    row["int8_delta_vs_plain"] = q.paired.mean
            rows.append(row)
    return rows


def markdown(summary: list[dict], selection_runs: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['date']}, {meta['device']}, torch {meta['torch']}; {meta['epochs']} epochs, batch {meta['batch']}, "
        f"{meta['n_train']} training images ({meta['n_val']} of them held out for validation), "
        f"{meta['n_test']} test images; rates {meta['lrs']} swept on seeds {meta['select_seeds']}, "
        f"reported on seeds {meta['seeds']}.",
        "",
        "Learning-rate sweep (validation accuracy, mean over the selection seeds; ✓ = chosen):",
        "",
        "| model | variant | " + " | ".join(f"lr {lr:g}" for lr in meta["lrs"]) + " |",
        "|---|---|" + "---|" * len(meta["lrs"]),
    ]
    for model_name, variants in meta["selection"].items():
        for variant, chosen in variants.items():
            cells = []
            for lr in meta["lrs"]:
                vals = [
                    r["val_acc"]
                    for r in selection_runs
                    if r["model"] == model_name and r["variant"] == variant and r["lr"] == lr
                ]
                mark = " ✓" if lr == chosen else ""
                cells.append(f"{100 * statistics.mean(vals):.1f}{mark}" if vals else "")
            lines.append(f"| {model_name} | {variant} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "At each variant's chosen rate (test accuracy; Δ paired by seed against plain at plain's rate, with its 95 % "
        "t interval):",
        "",
        "| model | variant | lr | test accuracy (mean ± std) | Δ vs plain | 95 % interval | seeds better | "
        "INT8 test accuracy | INT8 Δ | train time per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        plain = r["variant"] == "plain"
        delta = "" if plain else f"{100 * r['delta_vs_plain']:+.2f} pt"
        ci = r.get("delta_ci95")
        t = "" if plain or ci is None else f"{100 * ci[0]:+.2f} to {100 * ci[1]:+.2f} pt"
        better = "" if plain else f"{r['seeds_better']}/{r['n']}"
        int8 = "" if r["mean_int8_acc"] is None else f"{100 * r['mean_int8_acc']:.2f} %"
        int8_delta = (
            "" if plain or r.get("int8_delta_vs_plain") is None else f"{100 * r['int8_delta_vs_plain']:+.2f} pt"
        )
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['lr']:g} | {100 * r['mean_acc']:.2f} ± {100 * r['std_acc']:.2f} % | "
            f"{delta} | {t} | {better} | {int8} | {int8_delta} | {r['mean_train_seconds']:.1f} s |"
        )
    return "\n".join(lines) + "\n"


def init_statistics(model_name: str, variants: tuple[str, ...] | list[str] = VARIANTS, seed: int = 0) -> dict[str, dict[str, float]]:
    """How each init's generated kernels compare with a default-initialised conv's (the paper-init mechanism):
    mean per-output-channel norm ratio, share of the energy in the centre tap, and kurtosis of the weights."""
    out = {}
    for variant in variants:
        torch.manual_seed(seed)
        model = MODELS[model_name]()
        default = {n: m.weight.detach().clone() for n, m in model.named_modules()
                   if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
        if variant != "plain":
            convert_to_orepa(model, init=variant.split("-")[1], seed=seed)
            fold_orepa(model)
        weights = {n: m.weight.detach() for n, m in model.named_modules() if n in default}
        ratios, centre, flat = [], [], []
        for name, w in weights.items():
            ratios.append((w.flatten(1).norm(dim=1) / default[name].flatten(1).norm(dim=1)).mean().item())
            centre.append((w[..., 1, 1].square().sum() / w.square().sum()).item())
            flat.append(w.flatten())
        values = torch.cat(flat).double()
        z = (values - values.mean()) / values.std()
        out[variant] = {"norm_ratio": statistics.mean(ratios), "centre_share": statistics.mean(centre),
                        "kurtosis": z.pow(4).mean().item()}
    return out


_SETTINGS = ("epochs", "batch", "weight_decay", "n_train", "n_val")


def _reusable(args: argparse.Namespace) -> dict[tuple, dict]:
    """Runs of an earlier output whose training settings equal these (keyed by model, variant, lr, seed)."""
    old = json.loads(Path(args.reuse).read_text())
    meta = old["meta"]
    if any(meta.get(k, getattr(args, k)) != getattr(args, k) for k in _SETTINGS):
        raise SystemExit(f"--reuse {args.reuse}: its settings differ ({ {k: meta.get(k) for k in _SETTINGS} })")
    if (args.no_int8) != any(r.get("int8_test_acc") is None for r in old["runs"]):
        raise SystemExit(f"--reuse {args.reuse}: its INT8 evaluation setting differs")
    return {(r["model"], r["variant"], r["lr"], r["seed"]): r for r in [*old.get("selection_runs", []), *old["runs"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small-resnet,yolov8n-cls")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.02, 0.1, 0.5])
    parser.add_argument("--select-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-val", type=int, default=120, help="held out of the training images for lr selection")
    parser.add_argument("--no-int8", action="store_true", help="skip the INT8 (onnxruntime) evaluation")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reuse", metavar="JSON", help="take runs of the same settings from an earlier --json output")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    models, variants = args.models.split(","), [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s)/variant(s) {unknown}; models: {sorted(MODELS)}, variants: {list(VARIANTS)}")
    data = load_data(args.n_train, args.n_val)
    sweep = [(m, v, lr, s) for m in models for v in variants for lr in args.lrs for s in args.select_seeds]
    done: dict[tuple, dict] = _reusable(args) if args.reuse else {}
    for model_name, variant, lr, seed in (bar := tqdm([k for k in sweep if k not in done], unit="run", desc="lr sweep")):
        bar.set_postfix_str(f"{model_name} {variant} lr {lr:g} seed {seed}")
        done[(model_name, variant, lr, seed)] = run(model_name, variant, seed, lr, data, args, int8=not args.no_int8)
    selection_runs = [done[k] for k in sweep]
    selection = select_rates(selection_runs)
    final = [(m, v, selection[m][v], s) for m in models for v in variants for s in args.seeds]
    for key in (bar := tqdm([k for k in final if k not in done], unit="run", desc="seeds at the chosen rates")):
        bar.set_postfix_str(f"{key[0]} {key[1]} lr {key[2]:g} seed {key[3]}")
        done[key] = run(key[0], key[1], key[3], key[2], data, args, int8=not args.no_int8)
    runs = [done[k] for k in final]
    meta = {"date": date.today().isoformat(), "device": "cpu", "torch": torch.__version__, "epochs": args.epochs,
            "batch": args.batch, "lrs": args.lrs, "select_seeds": args.select_seeds, "seeds": args.seeds,
            "n_train": args.n_train, "n_val": args.n_val, "n_test": len(data["test"][1]), "threads": args.threads,
            "weight_decay": args.weight_decay, "selection": selection}
    summary = summarise(runs)
    stats = {m: init_statistics(m, variants) for m in models}
    text = markdown(summary, selection_runs, meta)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "init_statistics": stats, "runs": runs,
                                               "selection_runs": selection_runs}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
