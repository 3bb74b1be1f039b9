"""How a block starts: one function per ``init``, each ``f(spec, weight, generator)`` giving the block's
parameters by name (:meth:`BlockSpec.parameter_shapes` order), from the wrapped conv's ``weight``.

Random branch weights are drawn from ``generator`` in branch order, so a seed fixes every block's values; the
global RNG is never used. Tensors come in ``weight``'s dtype and device; ``"preserve"`` hands back ``weight``
itself as the origin, so the wrapped conv's parameter object lives on in the block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import PAPER_SCALE_INIT, PAPER_SCALE_INIT_1X1
from .runtime import autocast_off, generate_kernels
from .spec import PARAMETER_NAMES, BlockSpec

Initialiser = Callable[[BlockSpec, Tensor, torch.Generator], dict[str, Tensor]]


def _draw(spec: BlockSpec, weight: Tensor, generator: torch.Generator, *, origin: bool) -> dict[str, Tensor]:
    """The branch weights: Kaiming-uniform draws (``pw_kxk``'s learned first factor at zero), in branch order;
    the origin drawn too with ``origin``, else ``weight`` itself."""
    shapes = spec.parameter_shapes()
    kk, ig, g, t, e = spec.kernel_taps, spec.in_per_group, spec.groups, spec.width, spec.expansion

    def random(shape: tuple[int, ...], fan_in: int) -> Tensor:
        bound = math.sqrt(6.0 / fan_in)  # Kaiming-uniform with a = 0
        data = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        return data.to(device=weight.device, dtype=weight.dtype)

    params: dict[str, Tensor] = {}
    taps = spec.tap_branches
    for branch in spec.branches:
        if branch == "origin":
            params["weight_origin"] = random(shapes["weight_origin"], ig * kk) if origin else weight
        elif branch in taps[:1]:
            o, b, _ = shapes["weight_taps"]
            params["weight_taps"] = torch.cat([random((o, 1, ig), ig) for _ in range(b)], 1)  # a draw per branch
        elif branch == "pw_kxk":
            params["weight_pw_kxk_in"] = torch.zeros(
                shapes["weight_pw_kxk_in"], device=weight.device, dtype=weight.dtype
            )
            params["weight_pw_kxk"] = random(shapes["weight_pw_kxk"], t // g * kk)
        elif branch == "dws":
            params["weight_dws_dw"] = random(shapes["weight_dws_dw"], kk)
            params["weight_dws_pw"] = random(shapes["weight_dws_pw"], e * ig)
    return params


def _scales(spec: BlockSpec, values: list[float], like: Tensor) -> Tensor:
    """The ``scales`` vector: ``values[j]`` for every output channel of branch ``j``."""
    scales = torch.tensor(values, dtype=torch.float64).repeat_interleave(spec.out_channels)
    return scales.to(device=like.device, dtype=like.dtype)


def _paper_scales(spec: BlockSpec, like: Tensor) -> Tensor:
    table = PAPER_SCALE_INIT_1X1 if spec.kernel_taps == 1 else PAPER_SCALE_INIT
    return _scales(spec, [table[b] for b in spec.branches], like)


@dataclass
class _Draft:
    """Parameters not yet in a block, in the form generation takes them (:class:`.runtime.Generating`)."""

    spec: BlockSpec
    params: dict[str, Tensor]

    def __post_init__(self) -> None:
        scales = self.params["scales"]
        constants = torch.float64 if scales.dtype == torch.float64 else torch.float32  # as the block's buffers
        self.tap_filters, self.pw_kxk_identity = self.spec.fixed_tensors(constants, scales.device)

    def generation_inputs(self) -> list[Tensor]:
        return [self.params[PARAMETER_NAMES[kind]] for kind in self.spec.plan().kinds]

    def kernel(self) -> Tensor:
        """The kernel the block will generate, computed in float64, in the parameters' dtype."""
        scales = self.params["scales"]
        with autocast_off(scales.device):
            kernel = generate_kernels(self.spec.plan(), [self], torch.float64)[0]
        return kernel.to(scales.dtype)


def _match_kernel_norm(spec: BlockSpec, params: dict[str, Tensor], target: Tensor) -> None:
    """Rescale each output channel's scales (the kernel is linear in them) so that the generated kernel's channel
    norms equal ``target``."""
    norm = _Draft(spec, params).kernel().flatten(1).norm(dim=1)
    factor = torch.where(norm > 0, target.to(norm.device) / norm, torch.ones_like(norm))
    scales = params["scales"]
    params["scales"] = (scales.view(len(spec.branches), -1).double() * factor).flatten().to(scales.dtype)


@torch.no_grad()
def preserve(spec: BlockSpec, weight: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
    """The origin is the wrapped weight at scale 1, every other branch at scale 0: the block computes the wrapped
    conv exactly, and training moves the other branches away from zero."""
    params = _draw(spec, weight, generator, origin=False)
    params["scales"] = _scales(spec, [1.0 if b == "origin" else 0.0 for b in spec.branches], weight)
    return params


@torch.no_grad()
def paper(spec: BlockSpec, weight: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
    """The authors' start: random branches at the paper's scales (the wrapped weight is discarded)."""
    params = _draw(spec, weight, generator, origin=True)
    params["scales"] = _paper_scales(spec, weight)
    return params


@torch.no_grad()
def scratch(spec: BlockSpec, weight: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
    """``"paper"`` rescaled per output channel so that the generated kernel has the wrapped weight's norms."""
    params = paper(spec, weight, generator)
    _match_kernel_norm(spec, params, weight.detach().flatten(1).norm(dim=1).double())
    return params


@torch.no_grad()
def preserve_live(spec: BlockSpec, weight: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
    """Every branch live, the function preserved: ``"scratch"`` at ``live_scale`` of the wrapped norms, then
    the origin (at scale 1) set to the wrapped weight minus what the other branches generate."""
    wrapped = weight.detach().double()
    params = paper(spec, weight, generator)
    _match_kernel_norm(spec, params, weight.detach().flatten(1).norm(dim=1).double() * spec.live_scale)
    origin_row = spec.branches.index("origin")
    rows = params["scales"].view(len(spec.branches), -1)
    scale = rows[origin_row].double().view(-1, *([1] * (wrapped.dim() - 1)))
    others = _Draft(spec, params).kernel() - params["weight_origin"].double() * scale
    rows[origin_row].fill_(1.0)
    params["weight_origin"] = (wrapped.to(others.device) - others).to(weight.dtype)
    return params


#: The initialiser of each ``OREPAConfig.init`` (:data:`orepa_convert.config.INITS`).
INITIALISERS: dict[str, Initialiser] = {
    "preserve": preserve,
    "paper": paper,
    "scratch": scratch,
    "preserve_live": preserve_live,
}
