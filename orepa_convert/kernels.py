"""Where blocks pickled by orepa_convert 0.1 and 0.2 find their generation plan (whole-model checkpoints such
as ultralytics' ``best.pt`` name ``orepa_convert.kernels.GenerationPlan``). The maths is in
:mod:`orepa_convert.block.generation`."""

from .block.generation import GenerationPlan

__all__ = ["GenerationPlan"]
