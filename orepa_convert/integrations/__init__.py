"""Framework plugins. The core imports no framework: a plugin module is imported only once the user has imported
its framework (an object of that framework cannot exist otherwise), and it never imports it on their behalf.

Model plugins (listed in :data:`MODEL_PLUGINS`) are modules that implement :class:`ModelPlugin`; the core
calls their hooks through :func:`first_answer` and :func:`notify`.

``timm`` is a tracing plugin (leaf modules, conv classes): :mod:`.timm` answers empty until timm is imported.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from torch import nn

#: framework (top-level package name) -> plugin module
MODEL_PLUGINS: dict[str, str] = {"ultralytics": f"{__name__}.ultralytics"}


def active_plugins() -> Iterator[ModuleType]:
    """The model plugins whose framework the user has imported."""
    for framework, module in MODEL_PLUGINS.items():
        if framework in sys.modules:
            yield importlib.import_module(module)


@runtime_checkable
class ModelPlugin(Protocol):
    """The hooks a model plugin module defines (all four; a hook with nothing to do returns ``None``)."""

    def unwrap(self, obj: object) -> nn.Module | None:
        """The module inside a framework wrapper object (e.g. ultralytics ``YOLO``), else ``None``."""

    def reload_changed(self, obj: object, root: nn.Module) -> nn.Module | None:
        """A replacement for ``root`` when the framework changed it in place beyond what its carried OREPA state
        describes (e.g. fused it): the same checkpoint loaded again, already installed in ``obj``; else ``None``."""

    def after_convert(self, obj: object, root: nn.Module) -> None:
        """``root`` (inside ``obj``) now has OREPA blocks."""

    def after_fold(self, obj: object, root: nn.Module) -> None:
        """``root`` (inside ``obj``) has no OREPA blocks any more."""


def _plugins() -> Iterator[ModelPlugin]:
    for plugin in active_plugins():
        if not isinstance(plugin, ModelPlugin):
            raise TypeError(f"{plugin.__name__} does not implement every hook of orepa_convert's ModelPlugin")
        yield plugin


def first_answer(hook: str, *args: object) -> Any:
    """The first non-``None`` answer of ``hook`` over the active plugins, in plugin order; ``None`` if none."""
    for plugin in _plugins():
        answer = getattr(plugin, hook)(*args)
        if answer is not None:
            return answer
    return None


def notify(hook: str, *args: object) -> None:
    """Call ``hook`` of every active plugin."""
    for plugin in _plugins():
        getattr(plugin, hook)(*args)
