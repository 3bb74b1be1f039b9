"""Module surgery: find the module inside a wrapper, and swap OREPA blocks in at exact paths."""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from .block import OREPAConv
from .config import OREPAConfig
from .integrations import first_answer

#: Attribute of a folded model that carries its OREPA training state (see :func:`orepa_convert.state.fold_carrying_state`).
CARRIED_ATTR = "orepa_training_state"

# Attributes every conv module has; anything else on a conv (e.g. ultralytics' i, f, type, np on a
# top-level layer) is framework state that the block carries while it stands in the conv's place. Built on the
# meta device: no initialisation runs, so importing the library leaves the global RNG untouched.
_CONV_ATTRIBUTES = frozenset(nn.Conv2d(1, 1, 1, device="meta").__dict__)


def unwrap_model(model: Any) -> nn.Module:
    """The module to work on inside DDP/DataParallel (``.module``), ``torch.compile`` (``._orig_mod``) and
    framework wrappers that a plugin knows (e.g. ultralytics ``YOLO``: ``.model``)."""
    for _ in range(16):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            inner = first_answer("unwrap", model)
            if inner is None:
                break
            model = inner
    else:
        raise TypeError("could not unwrap the model: too many nested wrappers")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected a torch.nn.Module (or a DDP / torch.compile / ultralytics YOLO wrapper of one), "
            f"got {type(model).__name__}"
        )
    return model


def is_converted(model: Any) -> bool:
    """Whether ``model`` (a module, or any wrapper :func:`~orepa_convert.convert_to_orepa` accepts) holds OREPA
    blocks; ``False`` for anything that is not a model."""
    try:
        root = unwrap_model(model)
    except TypeError:
        return False
    return any(isinstance(m, OREPAConv) for m in root.modules())


def block_seed(seed: int, path: str) -> int:
    """Seed of the block at ``path``: depends only on the config seed and the path, so a block's random
    branch weights do not change when other convs are included or excluded."""
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63)


def replace_at(root: nn.Module, paths: list[str], new: nn.Module) -> None:
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        setattr(root.get_submodule(parent_path), name, new)


def aliases(root: nn.Module, module: nn.Module) -> list[str]:
    """Every path at which ``module`` is registered in ``root``."""
    return [p for p, m in root.named_modules(remove_duplicate=False) if m is module]


def convert_conv(root: nn.Module, conv: Any, paths: list[str], config: OREPAConfig) -> int:
    """Swap an :class:`OREPAConv` (seeded from ``config.seed`` and the first path) in at every path of ``conv``;
    return the number of parameters it added."""
    before = sum(p.numel() for p in conv.parameters())
    framework_state = {k: v for k, v in conv.__dict__.items() if k not in _CONV_ATTRIBUTES and not k.startswith("_")}
    block = OREPAConv(conv, config, generator=torch.Generator().manual_seed(block_seed(config.seed, paths[0])))
    for key, value in framework_state.items():
        if not hasattr(type(block), key):
            block.__dict__[key] = value
    replace_at(root, paths, block)
    return sum(p.numel() for p in block.parameters()) - before


def block_paths(root: nn.Module) -> dict[OREPAConv, list[str]]:
    """Every OREPA block of ``root`` with every path it is registered at (definition order)."""
    found: dict[OREPAConv, list[str]] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        if isinstance(module, OREPAConv):
            found.setdefault(module, []).append(path)
    return found


def convert_paths(root: nn.Module, paths: list[str], config: OREPAConfig) -> None:
    """Convert the convs at exactly these ``paths`` of ``root`` (no tracing, no selection; a conv registered at
    several paths is replaced at all of them). Used to rebuild a recorded conversion (:mod:`.state`)."""
    for path in paths:
        conv = root.get_submodule(path)
        if not isinstance(conv, OREPAConv):
            convert_conv(root, conv, aliases(root, conv), config)
