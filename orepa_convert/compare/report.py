"""``compare.md`` and ``compare.png``: what a comparison found, in a table, a verdict and a paired plot."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .stats import VariantSummary, verdict

logger = logging.getLogger(__name__)


def _lr(lr: float | None) -> str:
    return "default" if lr is None else f"{lr:g}"


def _ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _selection_table(data: dict[str, Any], metric: str) -> list[str]:
    settings = data["settings"]
    if len(settings.get("lrs") or ()) < 2:
        return []
    seeds = settings.get("select_seeds") or settings["seeds"][:1]
    lines = [
        f"## Learning-rate selection (mean validation {metric} over seeds {seeds})",
        "",
        "| variant | " + " | ".join(f"lr {_lr(lr)}" for lr in settings["lrs"]) + " | chosen |",
        "|---|" + "---|" * (len(settings["lrs"]) + 1),
    ]
    for variant in settings["variants"]:
        cells = []
        for lr in settings["lrs"]:
            values = [
                r[metric]
                for r in data["runs"]
                if r["variant"] == variant
                and r["lr"] == lr
                and r["split"] == "val"
                and r["seed"] in seeds
                and r["epochs"] == data["epochs_of"][variant]
            ]
            cells.append(f"{sum(values) / len(values):.4f}" if values else "-")
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {_lr(data['chosen_lr'].get(variant))} |")
    return lines + [""]


def render_markdown(data: dict[str, Any], summary: Sequence[VariantSummary]) -> str:
    """The comparison as Markdown: settings, learning-rate selection, the paired table and a verdict per variant."""
    settings, meta, metric, split = data["settings"], data.get("meta", {}), data["metric"], data["reported_split"]
    lines = ["# OREPA vs plain training: paired comparison", ""]
    lines.append(
        f"- model `{settings['model']}` ({settings['backend']}), data `{settings['data']}`, "
        f"{settings['epochs']} epochs"
        + (f", image size {settings['imgsz']}" if settings.get("imgsz") else "")
        + f", seeds {list(settings['seeds'])}, date {meta.get('date', '?')}"
    )
    if settings["budget"] == "time":
        lines.append(
            f"- budget: equal wall time; plain trained {meta.get('plain_epochs')} epochs to match the OREPA "
            f"variants' measured time at {settings['epochs']} epochs (the table shows both time and metric)"
        )
    else:
        lines.append("- budget: equal epochs (OREPA runs take longer; see the time column)")
    selecting = len(settings.get("lrs") or ()) > 1
    if split == "test":
        lines.append(
            f"- reported metric: {metric} on the **test** split"
            + (" (learning rates were selected on the validation split)" if selecting else "")
        )
    else:
        selected = " and the same split selected the learning rates, which flatters every variant" if selecting else ""
        lines.append(
            f"- reported metric: {metric} on the **validation** split: the dataset has no test split{selected}"
        )
    lines.append("")
    lines += _selection_table(data, metric)
    lines += [
        "## Results",
        "",
        f"| variant | lr | epochs | seeds | {metric} mean ± std | Δ vs plain | 95% CI of Δ | seeds better | "
        "wall s (mean) | time vs plain | peak MB | memory vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        p = s.paired
        delta = "-" if p is None or p.mean is None else f"{p.mean:+.4f}"
        ci = (
            "-"
            if p is None
            else ("n/a (1 seed)" if p.interval is None else f"{p.interval[0]:+.4f} to {p.interval[1]:+.4f}")
        )
        better = "-" if p is None else f"{p.better}/{p.n}"
        mem = "n/a" if s.mean_memory_mb is None else f"{s.mean_memory_mb:.0f}"
        lines.append(
            f"| {s.variant} | {_lr(s.lr)} | {s.epochs} | {s.n} | {s.mean:.4f} ± {s.std:.4f} | {delta} | {ci} | "
            f"{better} | {s.mean_seconds:.1f} | {_ratio(s.time_ratio) if p else '1.00x'} | {mem} | "
            f"{_ratio(s.memory_ratio) if p else '1.00x'} |"
        )
    lines += ["", "## Verdict", ""]
    lines += [f"- {verdict(s, metric)}" for s in summary if s.paired is not None]
    if not any(s.paired is not None for s in summary):
        lines.append("- no OREPA variant has a reported run yet")
    lines += ["", "Every run's numbers are in `compare.json`; the per-seed pairs are plotted in `compare.png`.", ""]
    return "\n".join(lines)


def write_markdown(path: Path, data: dict[str, Any], summary: Sequence[VariantSummary]) -> None:
    path.write_text(render_markdown(data, summary), encoding="utf-8")


def write_plot(path: Path, summary: Sequence[VariantSummary], metric: str, split: str) -> bool:
    """Per-seed paired plot (one line per seed across the variants); ``False`` if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("compare.png not written: it needs matplotlib (pip install 'orepa-convert[bench]')")
        return False
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(summary), 4.2))
    names = [f"{s.variant}\nlr {_lr(s.lr)}" for s in summary]
    seeds = sorted({k for s in summary for k in s.values})
    for seed in seeds:
        xs = [i for i, s in enumerate(summary) if seed in s.values]
        ax.plot(xs, [summary[i].values[seed] for i in xs], marker="o", alpha=0.7, label=f"seed {seed}")
    ax.errorbar(
        range(len(summary)),
        [s.mean for s in summary],
        yerr=[s.std for s in summary],
        fmt="s",
        color="black",
        capsize=6,
        label="mean ± std",
        zorder=5,
    )
    ax.set_xticks(range(len(summary)), names)
    ax.set_xlim(-0.5, len(summary) - 0.5)
    ax.set_ylabel(f"{metric} ({split})")
    ax.set_title("OREPA vs plain, paired by seed")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
