"""Does OREPA help? Plain vs OREPA (preserve init) vs OREPA (paper init), same budget, same data order, several seeds.

    python benchmarks/efficacy.py --json docs/results/efficacy.json --markdown docs/results/efficacy.md

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

VARIANTS = ("plain", "orepa-preserve", "orepa-paper")


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


def load_data(n_train: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:n_train], perm[n_train:]
    x_test = _corrupt(x[test], torch.Generator().manual_seed(1234))
    return x[train], y[train], x_test, y[test]


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
def run(model_name: str, variant: str, seed: int, data, args: argparse.Namespace) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    if variant != "plain":
        convert_to_orepa(model, init=variant.split("-")[1], seed=seed)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(y_train) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.15)
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
    with torch.no_grad():
        logits = _logits(model(x_test.expand(-1, 3, -1, -1)))
        acc = (logits.argmax(1) == y_test).float().mean().item()
        folded = fold_orepa(copy.deepcopy(model))
        acc_folded = (_logits(folded(x_test.expand(-1, 3, -1, -1))).argmax(1) == y_test).float().mean().item()
    return {"model": model_name, "variant": variant, "seed": seed, "test_acc": acc, "test_acc_folded": acc_folded,
            "train_seconds": seconds}


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for model_name in dict.fromkeys(r["model"] for r in runs):
        base = [r["test_acc"] for r in runs if r["model"] == model_name and r["variant"] == "plain"]
        for variant in VARIANTS:
            accs = [r["test_acc"] for r in runs if r["model"] == model_name and r["variant"] == variant]
            secs = [r["train_seconds"] for r in runs if r["model"] == model_name and r["variant"] == variant]
            if not accs:
                continue
            mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
            bmean, bstd = statistics.mean(base), statistics.stdev(base) if len(base) > 1 else 0.0
            delta = mean - bmean
            se = math.sqrt(std**2 / len(accs) + bstd**2 / len(base)) if len(accs) > 1 else float("nan")
            rows.append({"model": model_name, "variant": variant, "n": len(accs), "mean_acc": mean, "std_acc": std,
                         "delta_vs_plain": delta, "welch_t": delta / se if se and variant != "plain" else None,
                         "exceeds_spread": variant != "plain" and abs(delta) > std + bstd,
                         "mean_train_seconds": statistics.mean(secs)})
    return rows


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [f"{meta['date']}, {meta['device']}, torch {meta['torch']}; {meta['epochs']} epochs, batch {meta['batch']}, "
             f"{meta['n_train']} training images, {meta['n_test']} test images, seeds {meta['seeds']}.", "",
             "| model | variant | test accuracy (mean ± std) | Δ vs plain | Welch t | exceeds spread? | train time per run |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        t = "" if r["welch_t"] is None else f"{r['welch_t']:+.2f}"
        delta = "" if r["variant"] == "plain" else f"{100 * r['delta_vs_plain']:+.2f} pt"
        exceeds = "" if r["variant"] == "plain" else ("yes" if r["exceeds_spread"] else "no")
        lines.append(f"| {r['model']} | {r['variant']} | {100 * r['mean_acc']:.2f} ± {100 * r['std_acc']:.2f} % | "
                     f"{delta} | {t} | {exceeds} | {r['mean_train_seconds']:.1f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small-resnet,yolov8n-cls")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    data = load_data(args.n_train)
    jobs = [(m, v, s) for m in args.models.split(",") for s in args.seeds for v in VARIANTS]
    runs = []
    for model_name, variant, seed in (bar := tqdm(jobs, unit="run")):
        bar.set_description(f"{model_name} {variant} seed {seed}")
        runs.append(run(model_name, variant, seed, data, args))
    meta = {"date": date.today().isoformat(), "device": "cpu", "torch": torch.__version__, "epochs": args.epochs,
            "batch": args.batch, "lr": args.lr, "n_train": args.n_train, "n_test": len(data[3]), "seeds": args.seeds,
            "threads": args.threads}
    summary = summarise(runs)
    text = markdown(summary, meta)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
