"""Pool several comparisons (one per task) into one verdict: ``orepa-convert compare --pool DIR ...``.

Each study folder holds the ``compare.json`` that ``orepa-convert compare`` wrote. Per task and OREPA variant the
effect is the paired difference to plain over the task's seeds (its mean and the standard error of that mean).
Tasks are pooled with a random-effects model, because the effect is expected to differ between tasks:

- between-task variance ``tau^2`` by DerSimonian and Laird (1986): with weights ``w_i = 1 / v_i``,
  ``Q = sum w_i (y_i - y_fixed)^2`` and ``tau^2 = max(0, (Q - (k - 1)) / (sum w_i - sum w_i^2 / sum w_i))``;
- pooled effect ``mu = sum w*_i y_i / sum w*_i`` with ``w*_i = 1 / (v_i + tau^2)``;
- its 95 % interval by Hartung and Knapp / Sidik and Jonkman (``mu +- t_{k-1} * sqrt(q / sum w*_i)``,
  ``q = sum w*_i (y_i - mu)^2 / (k - 1)``), which keeps its coverage with few tasks where the normal interval
  is too narrow;
- a 95 % prediction interval for the effect on a new task, ``mu +- t_{k-2} * sqrt(tau^2 + SE(mu)^2)`` (k >= 3),
  and ``I^2 = max(0, (Q - (k - 1)) / Q)``: how much of the spread between tasks is more than seed noise.

The effect is either the raw difference in the study's metric (``raw``: mAP50-95 or top-1 accuracy, both
fractions) or the per-task standardised mean difference of the pairs (``standardised``: ``d = mean / sd`` with
variance ``1/n + d^2 / (2n)``), which puts tasks with different metrics or noise levels on one scale.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import CompareError
from .stats import t_quantile_975

logger = logging.getLogger(__name__)

EFFECTS = ("raw", "standardised")


class PoolError(CompareError):
    """A study folder or its ``compare.json`` cannot be pooled (one line, says what to do)."""


@dataclass(frozen=True)
class TaskEffect:
    """One task's paired effect of one variant against plain."""

    task: str
    variant: str
    budget: str
    metric: str
    deltas: tuple[float, ...]
    effect: str = "raw"

    @property
    def n(self) -> int:
        return len(self.deltas)

    @property
    def estimate(self) -> float:
        mean = statistics.fmean(self.deltas)
        return mean / statistics.stdev(self.deltas) if self.effect == "standardised" else mean

    @property
    def variance(self) -> float:
        """The sampling variance of :attr:`estimate`."""
        if self.effect == "standardised":
            return 1 / self.n + self.estimate**2 / (2 * self.n)
        return statistics.variance(self.deltas) / self.n

    @property
    def interval(self) -> tuple[float, float]:
        half = t_quantile_975(self.n - 1) * math.sqrt(self.variance)
        return self.estimate - half, self.estimate + half


@dataclass(frozen=True)
class Pooled:
    """The random-effects pooling of one variant's task effects (see the module docstring)."""

    variant: str
    budget: str
    effect: str
    tasks: tuple[TaskEffect, ...]
    mu: float
    se: float
    interval: tuple[float, float] | None  # Hartung-Knapp; None with one task
    tau2: float
    q: float
    i2: float
    prediction: tuple[float, float] | None  # None with fewer than three tasks

    @property
    def k(self) -> int:
        return len(self.tasks)


def pool_effects(tasks: Sequence[TaskEffect]) -> Pooled:
    """DerSimonian-Laird random-effects pooling with a Hartung-Knapp interval and a prediction interval."""
    if not tasks:
        raise PoolError("nothing to pool: no task has this variant")
    keys = {(t.variant, t.budget, t.effect) for t in tasks}
    if len(keys) != 1:
        raise PoolError(f"pool one variant, budget and effect at a time, got {sorted(keys)}")
    ((variant, budget, effect),) = keys
    y = [t.estimate for t in tasks]
    v = [t.variance for t in tasks]
    k = len(tasks)
    w = [1 / vi for vi in v]
    fixed = sum(wi * yi for wi, yi in zip(w, y)) / sum(w)
    q = sum(wi * (yi - fixed) ** 2 for wi, yi in zip(w, y))
    c = sum(w) - sum(wi * wi for wi in w) / sum(w)
    tau2 = max(0.0, (q - (k - 1)) / c) if k > 1 else 0.0
    ws = [1 / (vi + tau2) for vi in v]
    mu = sum(wi * yi for wi, yi in zip(ws, y)) / sum(ws)
    se = math.sqrt(1 / sum(ws))
    interval = prediction = None
    if k > 1:
        hk = sum(wi * (yi - mu) ** 2 for wi, yi in zip(ws, y)) / (k - 1)
        half = t_quantile_975(k - 1) * math.sqrt(hk / sum(ws))
        interval = (mu - half, mu + half)
    if k > 2:
        half = t_quantile_975(k - 2) * math.sqrt(tau2 + se**2)
        prediction = (mu - half, mu + half)
    i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    return Pooled(variant, budget, effect, tuple(tasks), mu, se, interval, tau2, q, i2, prediction)


def read_study(folder: str | Path, effect: str = "raw") -> list[TaskEffect]:
    """The task effects in one study folder's ``compare.json`` (one per OREPA variant with at least 2 seeds)."""
    if effect not in EFFECTS:
        raise PoolError(f"effect must be one of {EFFECTS}, got {effect!r}")
    path = Path(folder) / "compare.json"
    if not path.is_file():
        raise PoolError(f"{folder} has no compare.json: give folders that `orepa-convert compare --project` wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        settings, metric, rows = data["settings"], data["metric"], data["summary"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PoolError(
            f"{path} is not a finished comparison ({type(exc).__name__}: {exc}); rerun that "
            f"`orepa-convert compare` to finish it"
        ) from None
    task = str(data.get("meta", {}).get("task") or Path(folder).name)
    out = []
    for row in rows:
        deltas = tuple(float(d) for d in row.get("deltas") or ())
        if row.get("variant") == "plain" or not deltas:
            continue
        if len(deltas) < 2:
            raise PoolError(
                f"{path}: {row['variant']} has 1 paired seed; pooling needs at least 2 per task "
                f"(rerun it with more --seeds)"
            )
        if statistics.stdev(deltas) == 0:
            raise PoolError(
                f"{path}: {row['variant']}'s paired differences are all equal, so their variance is 0 "
                f"and the task cannot be weighted; check that the runs really differ"
            )
        out.append(TaskEffect(task, row["variant"], settings.get("budget", "epochs"), metric, deltas, effect))
    if not out:
        raise PoolError(f"{path} has no OREPA variant paired with plain yet; rerun that comparison to finish it")
    return out


def pool_studies(folders: Sequence[str | Path], effect: str = "raw") -> list[Pooled]:
    """Pool every (variant, budget) found in ``folders``; tasks are named by their folder (or ``meta.task``)."""
    if not folders:
        raise PoolError("--pool needs at least one study folder")
    effects = [e for folder in folders for e in read_study(folder, effect)]
    seen: set[tuple[str, str, str]] = set()
    for e in effects:
        key = (e.task, e.variant, e.budget)
        if key in seen:
            raise PoolError(f"task {e.task!r} appears twice for {e.variant} ({e.budget} budget); give each study once")
        seen.add(key)
    groups: dict[tuple[str, str], list[TaskEffect]] = {}
    for e in effects:
        groups.setdefault((e.variant, e.budget), []).append(e)
    return [pool_effects(groups[key]) for key in sorted(groups)]


def _fmt(interval: tuple[float, float] | None) -> str:
    return "n/a" if interval is None else f"{interval[0]:+.4f} to {interval[1]:+.4f}"


def verdict(p: Pooled) -> str:
    """The pooled finding in plain words: the effect, whether it is resolved, and how much it varies by task."""
    unit = "standardised effect" if p.effect == "standardised" else "metric points"
    head = f"{p.variant} ({p.budget} budget): pooled {p.mu:+.4f} {unit} over {p.k} task(s)"
    if p.interval is None:
        return f"{head}; one task gives no pooled interval: pool more tasks"
    lo, hi = p.interval
    better = sum(t.estimate > 0 for t in p.tasks)
    resolved = (
        "no evidence of a difference" if lo <= 0 <= hi else ("better than plain" if lo > 0 else "worse than plain")
    )
    spread = f"between-task SD {math.sqrt(p.tau2):.4f}, I^2 {100 * p.i2:.0f}%" + (
        f"; on a new task expect {_fmt(p.prediction)}" if p.prediction else ""
    )
    return f"{head} (95% CI {lo:+.4f} to {hi:+.4f}, {better}/{p.k} tasks better): {resolved}; {spread}"


def to_dict(pooled: Sequence[Pooled]) -> dict[str, Any]:
    return {
        "method": "DerSimonian-Laird random effects, Hartung-Knapp interval",
        "pooled": [
            {
                "variant": p.variant,
                "budget": p.budget,
                "effect": p.effect,
                "k": p.k,
                "mu": p.mu,
                "se": p.se,
                "ci95": list(p.interval) if p.interval else None,
                "tau2": p.tau2,
                "q": p.q,
                "i2": p.i2,
                "prediction95": list(p.prediction) if p.prediction else None,
                "verdict": verdict(p),
                "tasks": [
                    {
                        "task": t.task,
                        "metric": t.metric,
                        "n": t.n,
                        "deltas": list(t.deltas),
                        "estimate": t.estimate,
                        "variance": t.variance,
                        "ci95": list(t.interval),
                    }
                    for t in p.tasks
                ],
            }
            for p in pooled
        ],
    }


def render_markdown(pooled: Sequence[Pooled]) -> str:
    lines = [
        "# OREPA vs plain across tasks: pooled comparison",
        "",
        "Random effects (DerSimonian-Laird), 95% interval by Hartung-Knapp; the prediction interval is where "
        "the effect on a new task is expected to fall.",
        "",
    ]
    for p in pooled:
        lines += [
            f"## {p.variant}, {p.budget} budget ({p.effect} effect)",
            "",
            "| task | metric | seeds | effect | 95% CI |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {t.task} | {t.metric} | {t.n} | {t.estimate:+.4f} | {_fmt(t.interval)} |" for t in p.tasks]
        lines += [
            f"| **pooled** | | {sum(t.n for t in p.tasks)} | **{p.mu:+.4f}** | {_fmt(p.interval)} |",
            "",
            f"- {verdict(p)}",
            "",
        ]
    return "\n".join(lines)


def write_forest_plot(path: Path, pooled: Sequence[Pooled]) -> bool:
    """``pool.png``: per task its effect and interval, the pooled effect as a diamond; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("pool.png not written: it needs matplotlib (pip install 'orepa-convert[bench]')")
        return False
    rows = sum(p.k + 2 for p in pooled)
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.32 * rows))
    ticks: list[tuple[float, str]] = []
    y = 0.0
    for p in pooled:
        for t in p.tasks:
            lo, hi = t.interval
            ax.errorbar(
                [t.estimate], [y], xerr=[[t.estimate - lo], [hi - t.estimate]], fmt="s", color="tab:blue", capsize=3
            )
            ticks.append((y, f"{t.task} (n={t.n})"))
            y -= 1
        lo, hi = p.interval if p.interval else (p.mu, p.mu)
        ax.fill([lo, p.mu, hi, p.mu], [y, y + 0.3, y, y - 0.3], color="black")
        if p.prediction:
            ax.plot(list(p.prediction), [y, y], color="gray", lw=1)
        ticks.append((y, f"pooled: {p.variant}, {p.budget}"))
        y -= 2
    ax.axvline(0, color="gray", ls="--", lw=1)
    ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=8)
    ax.set_xlabel(
        "effect vs plain ("
        + ("standardised" if pooled and pooled[0].effect == "standardised" else "metric points")
        + ")"
    )
    ax.set_title("OREPA vs plain by task (95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_pool(folders: Sequence[str | Path], project: str | Path, effect: str = "raw") -> dict[str, Any]:
    """Pool ``folders`` and write ``pool.json``, ``pool.md`` and ``pool.png`` into ``project``."""
    pooled = pool_studies(folders, effect)
    out = Path(project)
    out.mkdir(parents=True, exist_ok=True)
    data = {**to_dict(pooled), "studies": [str(f) for f in folders]}
    (out / "pool.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (out / "pool.md").write_text(render_markdown(pooled), encoding="utf-8")
    write_forest_plot(out / "pool.png", pooled)
    return data
