"""Robust torch.fx tracing: a call that cannot be traced becomes a leaf, and the rest of its parent is still traced.

Every conv and batch-norm module is kept as a leaf (``call_module`` node) so that patterns are matched on
modules, and timm's registered leaf modules/functions are honoured when timm is imported. When a submodule's
forward fails under tracing, only that call becomes a leaf and the trace of its parent is repeated, so the
parent's own conv -> BN pairs are kept; the failed module is then traced on its own (if its own code fails
there, its children are). The true reason of every failure is kept for the report. Containers without a
forward (``ModuleList``, ``ModuleDict``) are never traced and never reported: their children are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .block import OREPAConv
from .integrations import timm as timm_integration
from .registry import registered_batchnorm_types

logger = logging.getLogger(__name__)

ROOT_LABEL = "<root>"  # how the model itself (path "") is shown in reports


def batchnorm_types() -> tuple[type[nn.Module], ...]:
    """Classes treated as batch norms: every ``_BatchNorm`` (incl. ``SyncBatchNorm`` and timm's
    ``BatchNormAct2d``) plus the frozen variants of torchvision and timm and the classes users register
    (:func:`orepa_convert.register_batchnorm_type`)."""
    types: list[type[nn.Module]] = [_BatchNorm]
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d

        types.append(FrozenBatchNorm2d)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    types.extend(timm_integration.frozen_batchnorm_types())
    types.extend(registered_batchnorm_types())
    return tuple(types)


def is_conv(module: nn.Module) -> bool:
    """Whether a module is a conv candidate (any ``_ConvNd`` subclass, or an OREPA block)."""
    return isinstance(module, (_ConvNd, OREPAConv))


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, batchnorm_types())


def is_container(module: nn.Module) -> bool:
    """A module without a forward of its own (``ModuleList``, ``ModuleDict``, ...): only its children run."""
    return type(module).forward is nn.Module.forward


class _RetryWithLeaf(BaseException):
    """Raised out of a failed submodule call to restart the trace with that module as a leaf (a BaseException,
    so that a forward's own ``except Exception`` cannot swallow it)."""


class _LeafTracer(fx.Tracer):
    """FX tracer keeping convs, batch norms, OREPA blocks, timm's leaf modules and failed modules opaque."""

    def __init__(self, failed: dict[int, str]) -> None:
        super().__init__(autowrap_functions=timm_integration.fx_autowrap_functions(), param_shapes_constant=True)
        self._leaves = (_ConvNd, OREPAConv, *batchnorm_types(), *timm_integration.fx_leaf_modules())
        self._failed = failed

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._failed or isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self.is_leaf_module(m, ""):
            return super().call_module(m, forward, args, kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _RetryWithLeaf:
            raise
        except Exception as exc:  # the innermost failing call: make it a leaf and trace the parent again
            self._failed[id(m)] = _reason(exc)
            raise _RetryWithLeaf from exc


@dataclass
class TracedGraph:
    """One successfully traced part of the model: its path and graph (node targets are relative to it)."""

    path: str
    module: nn.Module
    graph: fx.Graph


@dataclass
class UntracedRegion:
    """A module whose forward could not be traced; ``path`` is ``""`` for the model itself.

    Its calls are opaque in its parent's graph; it was traced on its own, and where its own code failed, its
    children were traced one by one. ``reason`` is the first line of the error that made it fail.
    """

    path: str
    reason: str

    @property
    def label(self) -> str:
        return self.path or ROOT_LABEL


@dataclass
class TraceResult:
    graphs: list[TracedGraph] = field(default_factory=list)
    untraced: list[UntracedRegion] = field(default_factory=list)

    def region_of(self, path: str) -> UntracedRegion | None:
        """The innermost untraceable region that contains the module at ``path`` (the model itself included)."""
        regions = {r.path: r for r in self.untraced}
        parent = path
        while parent:
            parent = parent.rpartition(".")[0]
            if parent in regions:
                return regions[parent]
        return None


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


def _trace_one(module: nn.Module, failed: dict[int, str]) -> fx.Graph:
    """Trace ``module``; each submodule call that fails becomes a leaf (recorded in ``failed``) and the trace
    restarts, until it succeeds or the module's own code fails (that error propagates)."""
    while True:
        snapshot = _snapshot(module)
        try:
            return _LeafTracer(failed).trace(module)
        except _RetryWithLeaf:
            continue
        finally:
            _restore(snapshot)


def trace_model(model: nn.Module) -> TraceResult:
    """Trace ``model`` robustly (see the module docstring)."""
    result = TraceResult()
    with_convs = {id(m) for m in model.modules() if any(is_conv(s) for s in m.modules())}
    failed: dict[int, str] = {}  # id(module) -> why its forward could not be traced as a call
    regions: dict[str, str] = {}  # path -> reason, in the order found
    visited: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        if id(module) in visited or id(module) not in with_convs:
            return
        visited.add(id(module))
        if is_conv(module):  # a conv reached on its own: its consumers are in an opaque parent
            return
        if is_container(module):
            for name, child in module.named_children():
                visit(child, join(path, name))
            return
        try:
            graph = _trace_one(module, failed)
        except Exception as exc:  # the module's own code cannot be traced: trace its children one by one
            regions[path] = _reason(exc)
            logger.debug("could not trace %s: %s", path or ROOT_LABEL, exc)
            for name, child in module.named_children():
                visit(child, join(path, name))
            return
        result.graphs.append(TracedGraph(path, module, graph))
        # Opaque non-conv, non-BN calls that contain convs (failed calls, timm's registered leaves): their
        # insides never appear in this graph, so trace them on their own.
        for node in graph.nodes:
            if node.op == "call_module":
                sub = module.get_submodule(node.target)
                full = join(path, node.target)
                if id(sub) in failed and id(sub) in with_convs:
                    regions.setdefault(full, failed[id(sub)])
                if not is_conv(sub) and not is_batchnorm(sub):
                    visit(sub, full)

    visit(model, "")
    result.untraced = [UntracedRegion(p, r) for p, r in regions.items()]
    return result


def iter_call_modules(traced: TracedGraph) -> Iterator[tuple[fx.Node, str, nn.Module]]:
    """``(node, full path, module)`` for every ``call_module`` node of a traced part."""
    for node in traced.graph.nodes:
        if node.op == "call_module":
            yield node, join(traced.path, node.target), traced.module.get_submodule(node.target)
