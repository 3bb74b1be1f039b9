"""Readable and machine-readable reports of a conversion or a fold."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from .config import OREPAConfig
from .tracing import UntracedRegion


class Status(str, Enum):
    """What happened to a candidate conv. A ``str`` enum: it compares equal to, and serialises as, its value."""

    CONVERTED = "converted"
    SELECTED = "to convert"  # in a dry run (inspect), or before the swap
    ALREADY = "already converted"
    NOT_SELECTED = "not selected"
    INELIGIBLE = "ineligible"

    def __str__(self) -> str:
        return self.value

    @property
    def is_block(self) -> bool:
        """Whether the conv is (or, in a dry run, would be) an OREPA block after the call."""
        return self in (Status.CONVERTED, Status.SELECTED, Status.ALREADY)


CONVERTED, SELECTED, ALREADY = Status.CONVERTED, Status.SELECTED, Status.ALREADY
NOT_SELECTED, INELIGIBLE = Status.NOT_SELECTED, Status.INELIGIBLE


@dataclass
class ConvRecord:
    """One candidate conv: where it is, what it is, what it feeds, and what happened to it."""

    path: str
    conv_class: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    bn: str | None
    act: str | None
    status: Status
    reason: str = ""
    extra_params: int = 0


def _first_line(text: str, limit: int = 100) -> str:
    """The first line of ``text``, cut to ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _dims(t: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in t)


@dataclass
class ConversionReport:
    """What ``convert_to_orepa`` (or ``inspect_model``) found and did."""

    records: list[ConvRecord]
    untraced: list[UntracedRegion]
    config: OREPAConfig
    applied: bool = True  # False for a dry run (inspect)
    restored: bool = False  # the blocks were restored from the trained OREPA state the model carried

    @property
    def candidates(self) -> int:
        return len(self.records)

    @property
    def converted(self) -> int:
        """Convs converted by this call (for a dry run: that it would convert)."""
        return sum(r.status in (CONVERTED, SELECTED) for r in self.records)

    @property
    def already_converted(self) -> int:
        return sum(r.status == ALREADY for r in self.records)

    @property
    def eligible(self) -> int:
        return sum(r.status in (CONVERTED, SELECTED, NOT_SELECTED) for r in self.records)

    @property
    def extra_params(self) -> int:
        """Extra training parameters of the blocks this call created (or would create)."""
        return sum(r.extra_params for r in self.records if r.status in (CONVERTED, SELECTED))

    def paths(self, *statuses: Status) -> list[str]:
        """Paths of the convs with any of ``statuses`` (default: every conv that is a block after the call)."""
        wanted = statuses or (Status.CONVERTED, Status.SELECTED, Status.ALREADY)
        return [r.path for r in self.records if r.status in wanted]

    def reasons(self) -> Counter[str]:
        """Why candidates were left alone, counted (reasons shortened to their kind)."""
        return Counter(r.reason.split(" (")[0] for r in self.records if r.status in (INELIGIBLE, NOT_SELECTED))

    def summary(self) -> str:
        if self.restored:
            verb = "restored" if self.applied else "would restore"
            return (
                f"OREPA: {verb} the {self.already_converted} trained blocks the model carried (its recorded "
                f"conversion; nothing converted anew)"
            )
        verb = "converted" if self.applied else "would convert"
        text = (
            f"OREPA: {verb} {self.converted}/{self.eligible} eligible convs ({self.candidates} candidates, "
            f"{self.already_converted} already converted), +{self.extra_params:,} training parameters"
        )
        if self.untraced:
            text += f"; {len(self.untraced)} region(s) traced by parts"
        return text

    def table(self, verbose: bool = False) -> str:
        """One line per conv; then the regions traced by parts (their own forward could not be traced, so their
        children were traced one by one): their paths, or with ``verbose`` a table with the first line of why."""
        rows = [
            [
                r.path,
                r.conv_class,
                _dims(r.kernel_size),
                _dims(r.stride),
                str(r.groups),
                f"{r.in_channels}->{r.out_channels}",
                r.bn or "-",
                r.act or "-",
                r.status.value + (f": {r.reason}" if r.reason else ""),
            ]
            for r in self.records
        ]
        text = _table(["path", "conv", "kernel", "stride", "groups", "channels", "bn", "act", "status"], rows)
        if self.untraced and verbose:
            text += "\n\nTraced by parts (the region's own forward could not be traced; its children were):\n"
            text += _table(["path", "why"], [[u.label, _first_line(u.reason)] for u in self.untraced])
        elif self.untraced:
            text += "\n\nTraced by parts: " + ", ".join(u.label for u in self.untraced)
        return text

    def __str__(self) -> str:
        return f"{self.summary()}\n{self.table()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": {
                "candidates": self.candidates,
                "eligible": self.eligible,
                "converted": self.converted,
                "already_converted": self.already_converted,
                "extra_params": self.extra_params,
                "applied": self.applied,
                "restored": self.restored,
            },
            "config": self.config.to_dict(),
            "convs": [{**asdict(r), "status": r.status.value} for r in self.records],
            "untraced": [asdict(u) for u in self.untraced],
        }


@dataclass
class FoldRecord:
    """One folded OREPA block and what happened to the batch norm after it."""

    path: str
    conv_class: str
    bn: str | None = None
    bn_fused: bool = False
    note: str = ""


@dataclass
class FoldReport:
    """What ``fold_orepa`` did."""

    records: list[FoldRecord] = field(default_factory=list)
    fuse_bn: bool = False

    @property
    def folded(self) -> int:
        return len(self.records)

    @property
    def bn_fused(self) -> int:
        return sum(r.bn_fused for r in self.records)

    def summary(self) -> str:
        text = f"OREPA: folded {self.folded} block(s) into plain convs"
        if self.fuse_bn:
            text += f", fused {self.bn_fused} batch norm(s)"
        return text

    def table(self) -> str:
        rows = [[r.path, r.conv_class, r.bn or "-", "yes" if r.bn_fused else "no", r.note] for r in self.records]
        return _table(["path", "conv", "bn", "bn fused", "note"], rows)

    def __str__(self) -> str:
        return f"{self.summary()}\n{self.table()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": {"folded": self.folded, "bn_fused": self.bn_fused, "fuse_bn": self.fuse_bn},
            "blocks": [asdict(r) for r in self.records],
        }
