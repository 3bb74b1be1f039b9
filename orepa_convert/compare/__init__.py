"""Does OREPA pay off on my data? Paired plain-vs-OREPA runs on the user's data and hardware.

``orepa-convert compare MODEL --data DATA`` (ultralytics) or ``orepa-convert compare --timm NAME --data-dir DIR``;
in Python, :func:`run_all` with a :class:`CompareSettings`. Phases as modules: :mod:`.harness` (plan, resume,
learning-rate selection), :mod:`.runners` (one run per framework), :mod:`.worker` (a run's process),
:mod:`.stats` (paired statistics), :mod:`.report` (``compare.md``, ``compare.png``), :mod:`.pool` (several
comparisons, one per task, pooled by random effects: ``orepa-convert compare --pool DIR ...``).
"""

from .harness import CompareError, CompareSettings, Job, run_all, run_compare
from .stats import Paired, VariantSummary, summarise, t_quantile_975, verdict

__all__ = [
    "CompareError",
    "CompareSettings",
    "Job",
    "Paired",
    "VariantSummary",
    "run_all",
    "run_compare",
    "summarise",
    "t_quantile_975",
    "verdict",
]
