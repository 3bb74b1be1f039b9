"""Build a model from a short spec: ``timm:NAME``, ``torchvision:NAME``, an ultralytics YAML / ``.pt``, or a
bare name (an ultralytics model if ultralytics ships a YAML of that name, else a timm model). Never
downloads weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn


def is_shipped_yaml(name: str) -> bool:
    """Whether ultralytics is installed and ships a model config for ``name`` (e.g. ``yolov8n``, ``yolo11s-seg.yaml``)."""
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


def load_ultralytics_model(source: str) -> nn.Module:
    """The task model (e.g. ``DetectionModel``) of an ultralytics YAML (random weights) or ``.pt`` (unpickled
    by ultralytics: trusted files only)."""
    try:
        from ultralytics import RTDETR, YOLO
    except ImportError as exc:
        raise ImportError("ultralytics models need ultralytics: pip install 'orepa-convert[yolo]'") from exc
    wrapper = RTDETR if "rtdetr" in Path(source).name.lower() else YOLO
    model = wrapper(str(source)).model
    if not isinstance(model, nn.Module):
        raise ValueError(f"{source} did not give an ultralytics model")
    return model


def build_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build the model named by ``spec`` with random weights (``.pt`` files are loaded as they are)."""
    kind, _, name = spec.partition(":")
    if name and kind == "timm":
        try:
            import timm
        except ImportError as exc:
            raise ImportError("timm models need timm: pip install 'orepa-convert[timm]'") from exc
        kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
        if not timm.is_model(name):
            raise ValueError(f"timm has no model {name!r}; list them with timm.list_models('{name[:4]}*')")
        return timm.create_model(name, pretrained=False, **kwargs)
    if name and kind == "torchvision":
        import torchvision

        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        if name.lower() not in torchvision.models.list_models():
            raise ValueError(f"torchvision has no model {name!r}; list them with torchvision.models.list_models()")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if name and kind in ("ultralytics", "yolo"):
        spec = name
    path = Path(spec)
    if path.suffix in (".yaml", ".yml", ".pt") or is_shipped_yaml(spec):
        return load_ultralytics_model(spec if path.suffix else f"{spec}.yaml")
    return build_model(f"timm:{spec}", num_classes)
