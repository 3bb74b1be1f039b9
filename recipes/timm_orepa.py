"""Train or fine-tune a timm model with OREPA on an ImageFolder dataset, then fold it into a stock timm model.

    python recipes/timm_orepa.py --model resnet18 --data-dir DATA --epochs 10 --output runs/timm
    torchrun --nproc_per_node 2 recipes/timm_orepa.py --model resnet18 --data-dir DATA --device cpu   # DDP (gloo)

The recipe lives in the package (:mod:`orepa_convert.integrations.timm_recipe`: ``train_timm(TimmRecipe(...))``
from Python, ``orepa-convert train --timm NAME ...`` once installed), so that ``orepa-convert compare --timm``
trains with the same code; see its docstring for every option.
"""

from __future__ import annotations

import sys

from orepa_convert.integrations.timm_recipe import main

if __name__ == "__main__":
    sys.exit(main())
