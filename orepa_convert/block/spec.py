"""`BlockSpec`: the one place that knows an OREPA block's layout.

A spec is what a block is, as plain values: the kernel it generates, its branches and widths, and how it starts
(init, seed). From it come the block's parameter names and storage shapes, the number of parameters it adds,
its generation plan, the layout it saves in the state_dict (encoded here, and older layouts decoded here only)
and the block fields of the record. :class:`~orepa_convert.OREPAConfig` stays the user's knob and produces
specs (:meth:`OREPAConfig.spec_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import BRANCHES, Init, OREPAConfig
from . import generation

#: The saved layout a block writes (its ``_extra_state``): ``[LAYOUT_VERSION, branch mask, t, e]``.
LAYOUT_VERSION = 2
#: Bit order of the branch mask in layout version 1 (which also kept one tensor per branch and scale).
_V1_BRANCH_BITS = ("origin", "avg", "prior", "pw_kxk", "pw", "dws")

#: The block's parameter name of each tensor kind of :data:`generation.PARAMETER_KINDS` (generation order).
PARAMETER_NAMES: dict[str, str] = {
    "scales": "scales",
    "origin": "weight_origin",
    "taps": "weight_taps",
    "pw_in": "weight_pw_kxk_in",
    "pw": "weight_pw_kxk",
    "dws_dw": "weight_dws_dw",
    "dws_pw": "weight_dws_pw",
}


@dataclass(frozen=True)
class SavedLayout:
    """A block's saved layout: the branches and widths its tensors were stored with."""

    version: int
    branches: tuple[str, ...]  # in BRANCHES order
    width: int  # t of the 1x1->kxk branch
    expansion: int  # e of the depthwise-separable branch

    @classmethod
    def decode(cls, state: Any) -> SavedLayout | None:
        """The layout in a block's ``_extra_state`` (this version or version 1), or ``None`` if unreadable."""
        try:
            saved = [int(v) for v in torch.as_tensor(state).flatten().tolist()]
        except (TypeError, ValueError, RuntimeError):
            return None
        if len(saved) != 4 or saved[0] not in (1, LAYOUT_VERSION):
            return cls(saved[0], (), -1, -1) if saved else None
        bits = _V1_BRANCH_BITS if saved[0] == 1 else BRANCHES
        mask = saved[1]
        branches = tuple(b for b in BRANCHES if mask >> bits.index(b) & 1)
        return cls(saved[0], branches, saved[2], saved[3])

    @property
    def readable(self) -> bool:
        return self.version in (1, LAYOUT_VERSION) and self.width >= 0

    def encode(self) -> torch.Tensor:
        """The current version's ``_extra_state`` (int64, tensor-valued so that EMA and checkpoint tools that
        iterate state_dict values keep working)."""
        mask = sum(1 << BRANCHES.index(b) for b in self.branches)
        return torch.tensor([LAYOUT_VERSION, mask, self.width, self.expansion], dtype=torch.int64)


@dataclass(frozen=True)
class BlockSpec:
    """One block's layout and start. ``shape`` is the generated kernel ``[O, I/g, *K]``; ``width`` the
    1x1->kxk internal width ``t``; ``pw_kxk_multiplier`` the configured ``pw_kxk_width`` (``None``: the paper's
    rule), kept so that the record says what the user asked for."""

    shape: tuple[int, ...]
    groups: int
    branches: tuple[str, ...]
    width: int
    expansion: int
    init: Init = "preserve"
    seed: int = 0
    live_scale: float = 1.0
    eval_cache: bool = True
    pw_kxk_multiplier: int | None = None

    @classmethod
    def for_conv(cls, conv: nn.Module, config: OREPAConfig) -> BlockSpec:
        """The spec of the block ``config`` builds around ``conv`` (any conv with ``weight`` and ``groups``)."""
        weight = conv.weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{type(conv).__name__} has no weight tensor to build an OREPA block from")
        shape = tuple(int(s) for s in weight.shape)
        groups = int(getattr(conv, "groups", 1))
        branches = config.branches_for(shape[2:])
        if generation.num_taps(shape[2:]) == 1 and "pw_kxk" not in branches:
            raise ValueError(
                f"a 1x1 OREPA block needs the 'pw_kxk' branch (the 1x1 chain); config.branches={config.branches!r}"
            )
        return cls(
            shape=shape,
            groups=groups,
            branches=branches,
            width=config.branch_width(shape[1] * groups, groups),
            expansion=config.dws_expansion,
            init=config.init,
            seed=config.seed,
            live_scale=config.live_scale,
            eval_cache=config.eval_cache,
            pw_kxk_multiplier=config.pw_kxk_width,
        )

    # -------------------------------------------------------------- sizes
    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def in_per_group(self) -> int:
        return self.shape[1]

    @property
    def in_channels(self) -> int:
        return self.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.shape[2:]

    @property
    def kernel_taps(self) -> int:
        """Positions of the kernel (``kk``)."""
        return generation.num_taps(self.kernel_size)

    @property
    def tap_branches(self) -> list[str]:
        """The fixed-filter 1x1 branches, in the order of their rows in ``weight_taps`` and ``scales``."""
        return generation.tap_branches(self.branches)

    # -------------------------------------------------------------- parameters
    def plan(self) -> generation.GenerationPlan:
        """The generation plan (blocks with equal plans generate together)."""
        return generation.generation_plan(self.shape, self.groups, self.branches, self.expansion, self.width)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Storage shape of each parameter, by its name on the block, in generation order."""
        o, ig, g, e, k = self.out_channels, self.in_per_group, self.groups, self.expansion, self.kernel_size
        t = self.width
        shapes = {
            "scales": (len(self.branches) * o,),  # row j of its [n, O] view scales branch j
            "origin": self.shape,
            "taps": (o, len(self.tap_branches), ig),  # [O, B, I/g]
            "pw_in": (t, ig),
            "pw": (o, *k, t // g),  # conv layout: generation.natural_pw_kxk
            "dws_dw": (e * ig * g, 1, *k),
            "dws_pw": (ig * g, e, o // g),  # conv layout: generation.natural_dws_pointwise
        }
        return {PARAMETER_NAMES[kind]: shapes[kind] for kind in self.plan().kinds}

    def fixed_tensors(
        self, dtype: torch.dtype, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The constants generation uses besides the parameters, from their exact float64 values: the tap
        filters ``[O, B, kk]`` of the fixed-filter branches and the 1x1->kxk identity ``[t, I/g]`` (``None``
        without those branches)."""
        taps = self.tap_branches
        filters = identity = None
        if taps:
            rows = [generation.tap_filter(b, self.out_channels, self.kernel_size).flatten(1) for b in taps]
            filters = torch.stack(rows, 1).to(device=device, dtype=dtype)
        if "pw_kxk" in self.branches:
            identity = generation.stacked_identity(self.width, self.in_channels, self.groups)
            identity = identity.to(device=device, dtype=dtype)
        return filters, identity

    def added_parameters(self) -> int:
        """Parameters the block has beyond the wrapped conv's own (its weight; the bias moves over unchanged)."""
        return sum(math.prod(s) for s in self.parameter_shapes().values()) - math.prod(self.shape)

    # -------------------------------------------------------------- saved forms
    def layout(self) -> SavedLayout:
        return SavedLayout(LAYOUT_VERSION, self.branches, self.width, self.expansion)

    def layout_problem(self, state: Any) -> str | None:
        """Why a saved ``_extra_state`` does not fit this block (``None`` when it does)."""
        saved = SavedLayout.decode(state)
        if saved is None or (saved.version == LAYOUT_VERSION and not saved.readable):
            return f"unreadable OREPA block state {state!r}"
        if saved.version != LAYOUT_VERSION:
            return (
                f"OREPA block state has format version {saved.version}, this orepa_convert reads version "
                f"{LAYOUT_VERSION} (and upgrades 1); fold the model with the orepa_convert version that trained it"
            )
        if saved == self.layout():
            return None
        return (
            f"OREPA block was saved with branches={list(saved.branches)}, pw_kxk_width={saved.width}, "
            f"dws_expansion={saved.expansion} but this model has branches={list(self.branches)}, "
            f"pw_kxk_width={self.width}, dws_expansion={self.expansion}; convert with the same OREPAConfig "
            f"before loading"
        )

    def config(self) -> OREPAConfig:
        """The :class:`OREPAConfig` (block fields only) that builds this block again."""
        return OREPAConfig(
            init=self.init,
            branches=self.branches,
            pw_kxk_width=self.pw_kxk_multiplier,
            dws_expansion=self.expansion,
            live_scale=self.live_scale,
            seed=self.seed,
            eval_cache=self.eval_cache,
        )


def upgrade_v1_state(state_dict: dict[str, Any], prefix: str, saved: SavedLayout) -> None:
    """Rewrite a layout-1 block state in place: ``weight_avg/prior/pw`` -> ``weight_taps``, ``scale_<branch>``
    -> ``scales`` and ``weight_dws_pw`` from ``[I, O/g, e]`` to ``[I, e, O/g]`` (same values, so the loaded block
    computes exactly what the saved one did)."""
    taps = generation.tap_branches(saved.branches)
    if taps and all(prefix + f"weight_{b}" in state_dict for b in taps):
        state_dict[prefix + "weight_taps"] = torch.stack([state_dict.pop(prefix + f"weight_{b}") for b in taps], 1)
    if prefix + "weight_dws_pw" in state_dict:  # layout 1 stored [I, O/g, e]
        state_dict[prefix + "weight_dws_pw"] = state_dict[prefix + "weight_dws_pw"].transpose(1, 2).contiguous()
    if all(prefix + f"scale_{b}" in state_dict for b in saved.branches):
        state_dict[prefix + "scales"] = torch.cat([state_dict.pop(prefix + f"scale_{b}") for b in saved.branches])
    current = SavedLayout(LAYOUT_VERSION, saved.branches, saved.width, saved.expansion)
    state_dict[prefix + "_extra_state"] = current.encode()


def config_from_layout(saved: SavedLayout, in_channels: int, *, init: Init, seed: int) -> OREPAConfig | None:
    """The block fields of a config that builds a block with ``saved``'s layout around a conv with
    ``in_channels`` (``None`` when the widths cannot come from such a conv)."""
    if not saved.readable or saved.width % in_channels:
        return None
    return OREPAConfig(
        init=init if "origin" in saved.branches else "paper",
        branches=saved.branches,
        pw_kxk_width=saved.width // in_channels,
        dws_expansion=saved.expansion,
        seed=seed,
    )
