"""Framework plugins. The core imports no framework: a plugin module is imported only once the user has imported
its framework (an object of that framework cannot exist otherwise), and it never imports it on their behalf.

Model plugins (listed in :data:`MODEL_PLUGINS`) may define any of these hooks, which the core calls in order:

- ``unwrap(obj) -> nn.Module | None``: the module inside a framework wrapper object (e.g. ultralytics ``YOLO``).
- ``reload_changed(obj, root) -> nn.Module | None``: a replacement for ``root`` when the framework changed it in
  place beyond what its carried OREPA state describes (e.g. fused it): the same checkpoint loaded again, already
  installed in ``obj``; ``None`` when ``root`` is fine.
- ``after_convert(obj, root)``: ``root`` (inside ``obj``) now has OREPA blocks.
- ``after_fold(obj, root)``: ``root`` (inside ``obj``) has no OREPA blocks any more.

``timm`` is a tracing plugin (leaf modules, conv classes): :mod:`.timm` answers empty until timm is imported.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

#: framework (top-level package name) -> plugin module
MODEL_PLUGINS: dict[str, str] = {"ultralytics": f"{__name__}.ultralytics"}


def active_plugins() -> Iterator[ModuleType]:
    """The model plugins whose framework the user has imported."""
    for framework, module in MODEL_PLUGINS.items():
        if framework in sys.modules:
            yield importlib.import_module(module)


def call_hook(name: str, *args: object) -> list[object]:
    """Call hook ``name`` of every active plugin that defines it; their results, in plugin order."""
    return [getattr(p, name)(*args) for p in active_plugins() if hasattr(p, name)]
