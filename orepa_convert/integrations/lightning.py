"""PyTorch Lightning: the :class:`OREPA` callback trains a LightningModule's network with OREPA blocks.

.. code-block:: python

    from orepa_convert.integrations.lightning import OREPA

    trainer = lightning.Trainer(callbacks=[OREPA(init="preserve_live")])
    trainer.fit(module)                         # the network trains with OREPA blocks
    trainer.fit(module, ckpt_path="last.ckpt")  # resumes the OREPA model
    module = OREPA.load_from_checkpoint(MyModule, "last.ckpt")  # the trained OREPA module, outside a Trainer
    OREPA.fold(module)                          # plain convs again, for export

- ``setup``: converts the network (the module itself, or ``module_attr``) before Lightning configures the
  optimizers, so they optimise the branches; the per-channel scale vectors are 1-D, so a module that keeps 1-D
  tensors out of weight decay (the usual split) keeps them out too. The conversion is deterministic, so
  resuming with the same callback (``trainer.fit(module, ckpt_path=...)``) rebuilds the structure the checkpoint's
  weights load into; a checkpoint recorded with another conversion is a one-line error.
- ``on_save_checkpoint``: every checkpoint carries the conversion record under ``"orepa_state"``.
- ``on_fit_end``: with ``fold_on_end=True`` the network is folded into plain convs.

Works with any strategy (DDP included: conversion runs in every process before the model is wrapped) and
precision (generation runs in float32 with autocast off). Needs ``lightning`` (``pip install
"orepa-convert[lightning]"``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from ..config import OREPAConfig
from ..convert import convert_to_orepa
from ..errors import OREPAStateError
from ..fold import fold_orepa
from ..state import orepa_state, restore_from_orepa_state
from ..surgery import is_converted

logger = logging.getLogger(__name__)

#: checkpoint key holding ``{"module_attr": ..., "record": orepa_state(network)}``
CHECKPOINT_KEY = "orepa_state"


def _network(module: nn.Module, attr: str | None) -> nn.Module:
    return module if attr is None else module.get_submodule(attr)


def _read_record(path: str | Path) -> dict[str, Any] | None:
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None


class OREPA(Callback):
    """Convert the LightningModule's network to OREPA at ``setup``; see the module docstring.

    Args:
        config: an :class:`~orepa_convert.OREPAConfig`; ``overrides`` (its field names, e.g. ``init``) replace
            its fields.
        module_attr: the submodule to convert (e.g. ``"model"``); default the whole LightningModule.
        fold_on_end: fold the network into plain convs when ``fit`` ends.
    """

    def __init__(
        self,
        config: OREPAConfig | None = None,
        *,
        module_attr: str | None = None,
        fold_on_end: bool = False,
        **overrides: Any,
    ) -> None:
        self.config = config.replace(**overrides) if config is not None else OREPAConfig(**overrides)
        self.module_attr = module_attr
        self.fold_on_end = fold_on_end

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        net = _network(pl_module, self.module_attr)
        if is_converted(net):
            return  # converted already (an earlier stage, or by the user)
        _, report = convert_to_orepa(net, self.config, return_report=True)
        logger.info("%s", report.summary())

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        net = _network(pl_module, self.module_attr)
        if is_converted(net):
            checkpoint[CHECKPOINT_KEY] = {"module_attr": self.module_attr, "record": orepa_state(net)}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        net = _network(pl_module, self.module_attr)
        if saved is not None and orepa_state(net)["groups"] != saved["record"]["groups"]:
            raise OREPAStateError(
                "the checkpoint was written with another OREPA conversion than this callback's: "
                "resume with the OREPA callback (same config) of the run that wrote it"
            )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.fold_on_end:
            self.fold(pl_module, self.module_attr)

    @staticmethod
    def fold(module: nn.Module, module_attr: str | None = None) -> nn.Module:
        """Fold ``module``'s OREPA blocks into plain convs (in place; e.g. before export); returns ``module``."""
        fold_orepa(_network(module, module_attr))
        return module

    @staticmethod
    def load_from_checkpoint(cls: type[LightningModule], path: str | Path, **kwargs: Any) -> LightningModule:
        """``cls.load_from_checkpoint(path, **kwargs)`` for a checkpoint of an OREPA run: the module is built, its
        network converted as recorded, and then every weight loaded (strictly), so it is the trained OREPA module."""
        saved = _read_record(path)
        if saved is None:
            raise OREPAStateError(f"{path} has no OREPA record; load it with {cls.__name__}.load_from_checkpoint")
        module = cls.load_from_checkpoint(path, strict=False, **kwargs)  # the plain weights; OREPA's load below
        restore_from_orepa_state(_network(module, saved["module_attr"]), saved["record"])
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state, strict=True)
        return module
