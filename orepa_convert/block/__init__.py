"""The OREPA block, one reason to change per file.

- :mod:`.spec`: :class:`BlockSpec`, a block's layout as plain values (parameter names and shapes, the saved
  layout and its older versions, the record's fields).
- :mod:`.generation`: the branch maths: fixed tap filters, the generation plan, the fused stacked generation.
- :mod:`.inits`: how a block starts, one function per ``init``.
- :mod:`.runtime`: how the current call records the forward (eager, compiled, functorch, generated ahead) and
  generation dispatched on it.
- :mod:`.support`: which convs a block can stand in for.
- :mod:`.module`: :class:`OREPAConv`, the ``nn.Module``: forward, fold, state hooks.
"""

from .module import OREPAConv
from .runtime import generation_dtype
from .spec import BlockSpec
from .support import branch_parameter_count, runs_plain_forward, unsupported_reason

__all__ = [
    "BlockSpec",
    "OREPAConv",
    "branch_parameter_count",
    "generation_dtype",
    "runs_plain_forward",
    "unsupported_reason",
]
