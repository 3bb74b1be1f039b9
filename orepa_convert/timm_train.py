"""Deprecated import path of the timm recipe, kept so that ``python -m orepa_convert.timm_train`` and
``from orepa_convert.timm_train import main`` (orepa_convert 0.2) still run; use
:mod:`orepa_convert.integrations.timm_recipe` (``train_timm(TimmRecipe(...))``) or ``orepa-convert train --timm``."""

from __future__ import annotations

import sys
import warnings

from .integrations.timm_recipe import TimmRecipe, build, main, train_timm

__all__ = ["TimmRecipe", "build", "main", "train_timm"]

warnings.warn(
    "orepa_convert.timm_train moved to orepa_convert.integrations.timm_recipe (train_timm(TimmRecipe(...)), or "
    "`orepa-convert train --timm NAME ...`); this path goes away in 0.4",
    FutureWarning,
    stacklevel=2,
)

if __name__ == "__main__":
    sys.exit(main())
