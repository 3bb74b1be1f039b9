"""Deprecated import path of the generated datasets (orepa_convert 0.2); use :mod:`orepa_convert.data.synthetic`."""

from __future__ import annotations

import warnings

from .data.synthetic import *  # noqa: F403

warnings.warn(
    "orepa_convert.synthetic moved to orepa_convert.data.synthetic; this path goes away in 0.4",
    FutureWarning,
    stacklevel=2,
)
