"""Ultralytics integration: recognise ``YOLO``-style wrapper objects and build models from YAML / .pt files."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


def is_ultralytics_wrapper(obj: object) -> bool:
    """Whether ``obj`` is an ultralytics ``Model`` (``YOLO``, ``RTDETR``, ...) holding a task model in ``.model``."""
    try:
        from ultralytics.engine.model import Model
    except ImportError:
        return False
    return isinstance(obj, Model) and isinstance(getattr(obj, "model", None), nn.Module)


def load_model(source: str | os.PathLike) -> nn.Module:
    """Build the task model (e.g. ``DetectionModel``) from an ultralytics YAML (no weights) or load a ``.pt``.

    Loading a ``.pt`` unpickles it (``weights_only=False`` inside ultralytics): only use trusted files.
    """
    try:
        from ultralytics import RTDETR, YOLO
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("loading ultralytics models needs ultralytics: pip install 'orepa-convert[yolo]'") from exc
    wrapper = RTDETR if "rtdetr" in Path(source).name.lower() else YOLO
    model = wrapper(str(source)).model
    if not isinstance(model, nn.Module):
        raise ValueError(f"{source} did not give an ultralytics model")
    return model


def is_shipped_yaml(name: str) -> bool:
    """Whether ultralytics ships a model config for ``name`` (e.g. ``yolov8n`` or ``yolo11s-seg.yaml``)."""
    try:
        from ultralytics.nn.tasks import yaml_model_load
    except ImportError:
        return False
    stem = name[:-5] if name.endswith(".yaml") else name
    try:
        yaml_model_load(f"{stem}.yaml")
    except (FileNotFoundError, OSError, ValueError):
        return False
    return True
