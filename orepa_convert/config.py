"""`OREPAConfig`: one frozen, validated description of what to convert and how."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

if TYPE_CHECKING:
    from .block.spec import BlockSpec

#: The six linear branches of an OREPA block, in canonical order (also the order of a block's scale rows).
BRANCHES: tuple[str, ...] = ("origin", "avg", "prior", "pw", "pw_kxk", "dws")

#: Per-branch scale initialisation of the paper ("paper" init).
PAPER_SCALE_INIT: dict[str, float] = {
    "origin": 0.25,
    "avg": 0.25,
    "prior": 0.0,
    "pw": 1.0,
    "pw_kxk": 0.5,
    "dws": 0.5,
}

#: Branches of the 1x1 OREPA block (the paper's ``OREPA_1x1``): the origin 1x1 and the 1x1 -> 1x1 chain whose
#: first (square) factor starts at the identity. The other branches collapse to a plain 1x1 for a 1x1 kernel.
POINTWISE_BRANCHES: tuple[str, ...] = ("origin", "pw_kxk")

#: Per-branch scale initialisation of the reference ``OREPA_1x1`` ("paper" init of a 1x1 block).
PAPER_SCALE_INIT_1X1: dict[str, float] = {"origin": 1.0, "pw_kxk": 0.5}

Init = Literal["preserve", "paper", "scratch", "preserve_live"]
#: The initialisations an OREPA block offers (see :class:`OREPAConfig`).
INITS: tuple[str, ...] = ("preserve", "paper", "scratch", "preserve_live")
ModuleFilter = Callable[[str, nn.Module], bool]


def _as_tuple(value: Any, name: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        return tuple(value)
    raise ValueError(f"OREPAConfig.{name} must be a string or a sequence of strings, got {value!r}")


def _kernel_spec(value: Any) -> tuple[int, ...] | int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) and v >= 1 for v in value):
        return tuple(value)
    raise ValueError(
        f"OREPAConfig.kernel_sizes entries must be positive ints (e.g. 3) or tuples of them (e.g. (1, 3)), got {value!r}"
    )


@dataclass(frozen=True)
class OREPAConfig:
    """How OREPA blocks are built and which convs are converted.

    Block construction:
        init: ``"preserve"`` (default) keeps the wrapped conv's function exactly (origin weight = the conv's
            weight, origin scale 1, every other scale 0); ``"paper"`` is the paper's initialisation, exactly as the
            reference; ``"scratch"`` is the paper's, with each output channel's scales rescaled so that the
            generated kernel has the norm of the wrapped conv's (default-initialised) weight: for training from
            scratch (the paper init's kernels are ~3x larger, which slows training behind a BN; docs/efficacy.md);
            ``"preserve_live"`` keeps the function too (to float rounding) but with every branch live from the first
            step: the other branches as in ``"scratch"`` (random weights, paper proportions, the wrapped weight's
            norm), origin scale 1 and origin weight = the conv's weight minus their contribution. With
            ``"preserve"`` the extra branches get no gradient until their zero scales move. Fine-tuning evidence
            (docs/efficacy.md, four task pairs pooled): no init gave a resolved gain over plain, so the default
            stays the exact ``"preserve"``; measure yours with ``orepa-convert compare``.
        live_scale: ``init="preserve_live"`` only: the norm of the kernel the live branches start from, as a
            fraction of ``"scratch"``'s (1, the default: the wrapped weight's norm; 0.25: a quarter of it, the
            origin carrying the rest).
        branches: subset of :data:`BRANCHES` to build (default: all six).
        pw_kxk_width: internal width of the 1x1->kxk branch as a multiple of ``in_channels``; ``None``
            follows the paper (1 if ``groups <= 4`` else 2).
        dws_expansion: depthwise filters per input channel in the depthwise-separable branch (paper: 8).
        seed: seed of the local generator that draws the random branch weights (the global RNG is never used).
        eval_cache: cache the generated kernel in eval mode while autograd is not recording, and in every mode
            for frozen blocks (no parameter requires grad).

    Selection (a conv is converted only if it is eligible and passes *every* rule below, so ``exclude``
    always wins over ``include`` and ``filter`` can only narrow the selection):
        include: module-path globs (``fnmatch``); empty means every path.
        exclude: module-path globs that are never converted.
        kernel_sizes: allowed kernels: ints (``k`` along every spatial axis) or exact shapes as tuples,
            e.g. ``(3, 5)`` or ``((1, 3), 3)``; ``None`` allows every kernel with more than one tap. Listing
            ``1`` (e.g. ``(1, 3)``) opts 1x1 convs in: they become 1x1 OREPA blocks (:data:`POINTWISE_BRANCHES`).
        min_channels: convert only if ``min(in_channels, out_channels) >= min_channels``.
        depthwise: whether depthwise convs (``groups == in_channels > 1``) are converted.
        filter: a callable ``filter(name, conv) -> bool`` applied last.
    """

    init: Init = "preserve"
    branches: tuple[str, ...] = BRANCHES
    pw_kxk_width: int | None = None
    dws_expansion: int = 8
    live_scale: float = 1.0
    seed: int = 0
    eval_cache: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kernel_sizes: tuple[tuple[int, ...] | int, ...] | None = None
    min_channels: int = 0
    depthwise: bool = True
    filter: ModuleFilter | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.init not in INITS:
            raise ValueError(f"OREPAConfig.init must be one of {INITS}, got {self.init!r}")
        branches = _as_tuple(self.branches, "branches")
        unknown = [b for b in branches if b not in BRANCHES]
        if unknown or not branches:
            raise ValueError(f"OREPAConfig.branches must be a non-empty subset of {BRANCHES}, got {self.branches!r}")
        if len(set(branches)) != len(branches):
            raise ValueError(f"OREPAConfig.branches has duplicates: {self.branches!r}")
        # Canonical order, so that equal sets give equal configs and equal state_dict layouts.
        set_(self, "branches", tuple(b for b in BRANCHES if b in branches))
        if self.init in ("preserve", "preserve_live") and "origin" not in self.branches:
            raise ValueError(
                f"OREPAConfig(init={self.init!r}) needs the 'origin' branch (it carries the existing conv weight); "
                "add 'origin' to branches or use init='paper'"
            )
        if self.pw_kxk_width is not None and (
            not isinstance(self.pw_kxk_width, int) or isinstance(self.pw_kxk_width, bool) or self.pw_kxk_width < 1
        ):
            raise ValueError(f"OREPAConfig.pw_kxk_width must be None or a positive int, got {self.pw_kxk_width!r}")
        if not isinstance(self.dws_expansion, int) or isinstance(self.dws_expansion, bool) or self.dws_expansion < 1:
            raise ValueError(f"OREPAConfig.dws_expansion must be a positive int, got {self.dws_expansion!r}")
        if (
            isinstance(self.live_scale, bool)
            or not isinstance(self.live_scale, (int, float))
            or not self.live_scale > 0
        ):
            raise ValueError(f"OREPAConfig.live_scale must be a positive number, got {self.live_scale!r}")
        set_(self, "live_scale", float(self.live_scale))
        if self.live_scale != 1.0 and self.init != "preserve_live":
            raise ValueError(
                f"OREPAConfig.live_scale={self.live_scale} applies to init='preserve_live' only (init={self.init!r}); "
                "leave it at 1 or use init='preserve_live'"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"OREPAConfig.seed must be an int, got {self.seed!r}")
        for name in ("include", "exclude"):
            globs = _as_tuple(getattr(self, name), name)
            if not all(isinstance(g, str) and g for g in globs):
                raise ValueError(f"OREPAConfig.{name} must hold non-empty glob strings, got {globs!r}")
            set_(self, name, globs)
        if self.kernel_sizes is not None:
            # A bare int is one size; a sequence lists sizes (ints) or exact shapes (nested tuples).
            specs = (self.kernel_sizes,) if isinstance(self.kernel_sizes, int) else self.kernel_sizes
            if not isinstance(specs, (tuple, list)) or not specs:
                raise ValueError(f"OREPAConfig.kernel_sizes must be None or a non-empty sequence, got {specs!r}")
            set_(self, "kernel_sizes", tuple(_kernel_spec(s) for s in specs))
        if self.pointwise and "pw_kxk" not in self.branches:
            raise ValueError(
                "OREPAConfig.kernel_sizes opts 1x1 convs in, but the 1x1 OREPA block needs the 'pw_kxk' branch (the "
                f"1x1 chain); add it to branches={self.branches!r} or leave 1 out of kernel_sizes"
            )
        if not isinstance(self.min_channels, int) or isinstance(self.min_channels, bool) or self.min_channels < 0:
            raise ValueError(f"OREPAConfig.min_channels must be a non-negative int, got {self.min_channels!r}")
        if not isinstance(self.depthwise, bool):
            raise ValueError(f"OREPAConfig.depthwise must be a bool, got {self.depthwise!r}")
        if not isinstance(self.eval_cache, bool):
            raise ValueError(f"OREPAConfig.eval_cache must be a bool, got {self.eval_cache!r}")
        if self.filter is not None and not callable(self.filter):
            raise ValueError(f"OREPAConfig.filter must be a callable (name, module) -> bool, got {self.filter!r}")

    def replace(self, **overrides: Any) -> OREPAConfig:
        """Return a copy with ``overrides`` applied (unknown names raise ``TypeError``)."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(f"unknown OREPAConfig field(s) {unknown}; valid fields are {sorted(valid)}")
        return dataclasses.replace(self, **overrides)

    @property
    def pointwise(self) -> bool:
        """Whether ``kernel_sizes`` opts single-tap (1x1) convs in."""
        return self.kernel_sizes is not None and any(
            spec == 1 if isinstance(spec, int) else all(v == 1 for v in spec) for spec in self.kernel_sizes
        )

    def spec_for(self, conv: nn.Module) -> BlockSpec:
        """The :class:`~orepa_convert.block.BlockSpec` of the block this config builds around ``conv``."""
        from .block.spec import BlockSpec

        return BlockSpec.for_conv(conv, self)

    def branches_for(self, kernel_size: tuple[int, ...]) -> tuple[str, ...]:
        """The branches a block with this kernel has: :data:`POINTWISE_BRANCHES` of ``branches`` for a 1x1 kernel,
        ``branches`` otherwise."""
        if all(k == 1 for k in kernel_size):
            return tuple(b for b in self.branches if b in POINTWISE_BRANCHES)
        return self.branches

    def branch_width(self, in_channels: int, groups: int) -> int:
        """Internal width ``t`` of the 1x1->kxk branch for a conv with these channels and groups."""
        mult = self.pw_kxk_width if self.pw_kxk_width is not None else (1 if groups <= 4 else 2)
        return mult * in_channels

    def allows_kernel(self, kernel_size: tuple[int, ...]) -> bool:
        """Whether ``kernel_sizes`` admits this kernel shape."""
        if self.kernel_sizes is None:
            return True
        return any(
            all(k == spec for k in kernel_size) if isinstance(spec, int) else tuple(kernel_size) == spec
            for spec in self.kernel_sizes
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (the filter callable is shown by name)."""
        out = dataclasses.asdict(self)
        out["filter"] = None if self.filter is None else getattr(self.filter, "__qualname__", repr(self.filter))
        return out


def resolve_config(config: OREPAConfig | None, overrides: dict[str, Any]) -> OREPAConfig:
    """Combine an optional config with keyword overrides, validating both."""
    if config is not None and not isinstance(config, OREPAConfig):
        raise TypeError(f"config must be an OREPAConfig or None, got {type(config).__name__}")
    base = config if config is not None else OREPAConfig()
    return base.replace(**overrides) if overrides else base
