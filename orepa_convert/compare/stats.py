"""Paired statistics for plain-vs-OREPA runs: pure functions over run records, no framework."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

Rate = TypeVar("Rate")

# Two-sided 95 % quantiles of Student's t (t_{0.975, df}) for df = 1..30.
_T975 = (
    12.7062047, 4.30265273, 3.18244631, 2.77644511, 2.57058184, 2.44691185, 2.36462425, 2.30600414, 2.26215716,
    2.22813885, 2.20098516, 2.17881283, 2.16036866, 2.14478669, 2.13144955, 2.11990530, 2.10981558, 2.10092204,
    2.09302405, 2.08596345, 2.07961384, 2.07387307, 2.06865761, 2.06389856, 2.05953855, 2.05552944, 2.05183052,
    2.04840714, 2.04522964, 2.04227246,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: a table up to 30 degrees of freedom, a Cornish-Fisher expansion beyond (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def best_lr(scores: Mapping[Rate, Sequence[float]]) -> Rate | None:
    """The learning rate whose runs have the best mean (validation) metric, the first listed on a tie; ``None``
    when no rate has runs."""
    means = {lr: sum(values) / len(values) for lr, values in scores.items() if values}
    return max(means, key=means.__getitem__) if means else None


@dataclass
class Paired:
    """Differences ``variant - plain`` over the seeds both have, with a 95 % t interval of their mean."""

    seeds: list[int]
    deltas: list[float]

    @property
    def n(self) -> int:
        return len(self.deltas)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.deltas) if self.deltas else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95 % confidence interval of the mean difference; ``None`` with fewer than two seeds."""
        if self.n < 2:
            return None
        half = t_quantile_975(self.n - 1) * statistics.stdev(self.deltas) / math.sqrt(self.n)
        return self.mean - half, self.mean + half  # type: ignore[operator]

    @property
    def better(self) -> int:
        return sum(d > 0 for d in self.deltas)


@dataclass
class VariantSummary:
    """One variant at its reported learning rate: metric over seeds, cost, and the pairing with plain."""

    variant: str
    lr: float | None
    values: dict[int, float]  # seed -> metric
    seconds: dict[int, float]
    memory_mb: dict[int, float | None]
    epochs: int
    paired: Paired | None = None  # None for plain itself
    time_ratio: float | None = None  # mean wall time / plain's
    memory_ratio: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.values.values()) if self.n > 1 else 0.0

    @property
    def mean_seconds(self) -> float:
        return statistics.fmean(self.seconds.values())

    @property
    def mean_memory_mb(self) -> float | None:
        known = [m for m in self.memory_mb.values() if m is not None]
        return statistics.fmean(known) if known else None


def summarise(
    runs: Sequence[Mapping], metric: str, split: str, chosen: Mapping[str, tuple[float | None, int]]
) -> list[VariantSummary]:
    """Summaries of the ``split`` records of ``runs`` for each variant at its chosen ``(lr, epochs)``, plain
    first, paired by seed with plain's. A run record has ``variant``, ``lr``, ``seed``, ``split``, ``epochs``,
    ``wall_seconds``, ``peak_memory_mb`` and the metric under its name."""
    out: list[VariantSummary] = []
    for variant in sorted(chosen, key=lambda v: v != "plain"):
        lr, epochs = chosen[variant]
        mine = [r for r in runs if (r["variant"], r["lr"], r["epochs"], r["split"]) == (variant, lr, epochs, split)]
        if not mine:
            continue
        out.append(
            VariantSummary(
                variant=variant,
                lr=lr,
                values={r["seed"]: float(r[metric]) for r in mine},
                seconds={r["seed"]: float(r["wall_seconds"]) for r in mine},
                memory_mb={r["seed"]: r.get("peak_memory_mb") for r in mine},
                epochs=epochs,
            )
        )
    plain = next((s for s in out if s.variant == "plain"), None)
    if plain is None:
        return out
    for s in out:
        if s is plain:
            continue
        seeds = sorted(set(s.values) & set(plain.values))
        s.paired = Paired(seeds, [s.values[k] - plain.values[k] for k in seeds])
        s.time_ratio = s.mean_seconds / plain.mean_seconds if plain.mean_seconds > 0 else None
        mem, base = s.mean_memory_mb, plain.mean_memory_mb
        s.memory_ratio = mem / base if mem is not None and base else None
    return out


def verdict(summary: VariantSummary, metric: str) -> str:
    """One plain-words sentence on ``summary`` against plain."""
    p = summary.paired
    if p is None or p.n == 0:
        return f"{summary.variant}: no seed in common with plain, nothing to compare"
    if p.n == 1:
        return (
            f"{summary.variant}: {p.mean:+.4f} {metric} vs plain on 1 seed; one seed cannot give an interval, so "
            f"this says nothing about a difference: run more seeds (e.g. --seeds 0 1 2)"
        )
    lo, hi = p.interval  # type: ignore[misc]
    head = f"{summary.variant}: {p.mean:+.4f} {metric} vs plain (95% CI {lo:+.4f} to {hi:+.4f}, {p.better}/{p.n} seeds better)"
    if lo <= 0 <= hi:
        return f"{head}: no evidence of a difference at {p.n} seeds"
    return f"{head}: {'better' if lo > 0 else 'worse'} than plain"
