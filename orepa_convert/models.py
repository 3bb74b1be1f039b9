"""Build a model from a short spec: ``timm:NAME``, ``torchvision:NAME``, an ultralytics YAML / ``.pt``, or a
bare name (an ultralytics model if ultralytics ships a YAML of that name, else a timm model). Never
downloads weights."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def build_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build the model named by ``spec`` with random weights (``.pt`` files are loaded as they are)."""
    kind, _, name = spec.partition(":")
    if name and kind == "timm":
        try:
            import timm
        except ImportError as exc:
            raise ImportError("timm models need timm: pip install 'orepa-convert[timm]'") from exc
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
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
    from .integrations import ultralytics as ul

    path = Path(spec)
    if path.suffix in (".yaml", ".yml", ".pt") or ul.is_shipped_yaml(spec):
        source = spec if path.suffix else f"{spec}.yaml"
        return ul.load_model(source)
    return build_model(f"timm:{spec}", num_classes)
