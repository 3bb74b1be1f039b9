"""Robust torch.fx tracing: trace the whole model, and where that fails trace each child, recursively.

Every conv and batch-norm module is kept as a leaf (``call_module`` node) so that patterns are matched on
modules, and timm's registered leaf modules/functions are honoured when timm is installed. A part that cannot
be traced never stops the rest; the reason is recorded for the report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .block import OREPAConv
from .integrations import timm as timm_integration

logger = logging.getLogger(__name__)


def batchnorm_types() -> tuple[type[nn.Module], ...]:
    """Classes treated as batch norms: every ``_BatchNorm`` (incl. ``SyncBatchNorm`` and timm's
    ``BatchNormAct2d``) plus the frozen variants of torchvision and timm."""
    types: list[type[nn.Module]] = [_BatchNorm]
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d

        types.append(FrozenBatchNorm2d)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    types.extend(timm_integration.frozen_batchnorm_types())
    return tuple(types)


def is_conv(module: nn.Module) -> bool:
    """Whether a module is a conv candidate (any ``_ConvNd`` subclass, or an OREPA block)."""
    return isinstance(module, (_ConvNd, OREPAConv))


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, batchnorm_types())


class _LeafTracer(fx.Tracer):
    """FX tracer keeping convs, batch norms, OREPA blocks and timm's leaf modules opaque."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=timm_integration.fx_autowrap_functions(), param_shapes_constant=True)
        self._leaves = (_ConvNd, OREPAConv, *batchnorm_types(), *timm_integration.fx_leaf_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class TracedGraph:
    """One successfully traced part of the model: its path and graph (node targets are relative to it)."""

    path: str
    module: nn.Module
    graph: fx.Graph


@dataclass
class UntracedRegion:
    """A part of the model that could not be traced as a whole; its children were traced separately."""

    path: str
    reason: str


@dataclass
class TraceResult:
    graphs: list[TracedGraph] = field(default_factory=list)
    untraced: list[UntracedRegion] = field(default_factory=list)

    def untraced_parent(self, path: str) -> UntracedRegion | None:
        """The innermost untraceable region whose direct child is at ``path``."""
        parent = path.rpartition(".")[0]
        return next((r for r in self.untraced if r.path == parent), None)


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")


def _snapshot(module: nn.Module) -> list[tuple[nn.Module, dict]]:
    """Remember every module's attributes, and silence forward hooks while tracing (they would run on
    Proxies); :func:`_restore` puts both back."""
    snapshot = [(m, m.__dict__.copy()) for m in module.modules()]
    for m, _ in snapshot:
        for name in _HOOK_DICTS:
            if m.__dict__.get(name):
                m.__dict__[name] = type(m.__dict__[name])()
    return snapshot


def _restore(snapshot: list[tuple[nn.Module, dict]]) -> None:
    """Undo attribute side effects of a trace (a forward that stores a Proxy on ``self``) and restore hooks."""
    for m, before in snapshot:
        if m.__dict__.keys() != before.keys() or any(m.__dict__[k] is not v for k, v in before.items()):
            m.__dict__.clear()
            m.__dict__.update(before)


def trace_model(model: nn.Module) -> TraceResult:
    """Trace ``model`` with the leaf policy above, falling back to its children where tracing fails."""
    result = TraceResult()
    with_convs = {id(m) for m in model.modules() if any(is_conv(s) for s in m.modules())}
    visited: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        if id(module) in visited or id(module) not in with_convs:
            return
        visited.add(id(module))
        if is_conv(module):  # a conv reached on its own: its consumers are in the untraceable parent
            return
        snapshot = _snapshot(module)
        try:
            graph = _LeafTracer().trace(module)
        except Exception as exc:  # any failure of user code under tracing: record it and go one level down
            result.untraced.append(UntracedRegion(path or "<root>", _reason(exc)))
            logger.debug("could not trace %s: %s", path or "<root>", exc)
            for name, child in module.named_children():
                visit(child, join(path, name))
            return
        finally:
            _restore(snapshot)
        result.graphs.append(TracedGraph(path, module, graph))
        # Leaves that are not convs or batch norms but contain convs (e.g. timm's registered leaves):
        # their insides never appear in this graph, so trace them on their own.
        for node in graph.nodes:
            if node.op == "call_module":
                sub = module.get_submodule(node.target)
                if not is_conv(sub) and not is_batchnorm(sub):
                    visit(sub, join(path, node.target))

    visit(model, "")
    return result


def iter_call_modules(traced: TracedGraph) -> Iterator[tuple[fx.Node, str, nn.Module]]:
    """``(node, full path, module)`` for every ``call_module`` node of a traced part."""
    for node in traced.graph.nodes:
        if node.op == "call_module":
            yield node, join(traced.path, node.target), traced.module.get_submodule(node.target)
