"""Match conv -> batch norm (-> activation) patterns on the traced graphs and decide eligibility."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .block import OREPAConv, unsupported_reason
from .tracing import TraceResult, is_batchnorm, is_conv, iter_call_modules, join

_ACT_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.sigmoid,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.tanh,
}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


@dataclass
class CallSite:
    """One call of a conv module in a traced graph, and what consumes its output."""

    consumer: str
    bn_path: str | None = None
    bn: nn.Module | None = None
    act: str | None = None
    problem: str | None = None  # None when the output feeds exactly one batch norm


@dataclass
class ConvMatch:
    """A conv module (candidate), every path it is registered at, its call sites and its eligibility."""

    module: Any  # an eligible conv class (see block.unsupported_reason) or an OREPAConv already in place
    paths: list[str]
    sites: list[CallSite] = field(default_factory=list)
    reason: str | None = None  # why it is not eligible; None when eligible (or already an OREPA block)

    @property
    def path(self) -> str:
        return self.paths[0]

    @property
    def eligible(self) -> bool:
        return self.reason is None and not isinstance(self.module, OREPAConv)

    @property
    def bn_paths(self) -> list[str]:
        return [s.bn_path for s in self.sites if s.bn_path is not None]


def _describe(node: fx.Node, traced_path: str, root: nn.Module) -> str:
    if node.op == "call_module":
        target = cast(str, node.target)  # a call_module node's target is the module path
        return f"{type(root.get_submodule(target)).__name__} '{join(traced_path, target)}'"
    if node.op == "call_function":
        if node.target in (operator.add, operator.iadd, torch.add):
            return "an add"
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the output of its traced parent"
    return node.op


def _activation(bn_node: fx.Node, bn: nn.Module, traced_module: nn.Module) -> str | None:
    inner = getattr(bn, "act", None)  # BN+act modules (timm BatchNormAct2d)
    if isinstance(inner, nn.Module) and not isinstance(inner, nn.Identity):
        return type(inner).__name__
    users = list(bn_node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if user.op == "call_module":
        m = traced_module.get_submodule(cast(str, user.target))
        if type(m).__module__.startswith("torch.nn.modules.activation"):
            return type(m).__name__
    if user.op == "call_function" and user.target in _ACT_FUNCTIONS:
        return user.target.__name__
    if user.op == "call_method" and user.target in _ACT_METHODS:
        return user.target.rstrip("_")
    return None


def _call_site(node: fx.Node, traced) -> CallSite:
    users = list(node.users)
    if len(users) != 1:
        consumers = ", ".join(_describe(u, traced.path, traced.module) for u in users) or "nothing"
        return CallSite(consumer=consumers, problem=f"output has {len(users)} consumers ({consumers})")
    user = users[0]
    consumer = _describe(user, traced.path, traced.module)
    if user.op == "call_module":
        target = cast(str, user.target)
        bn = traced.module.get_submodule(target)
        if is_batchnorm(bn):
            return CallSite(
                consumer=consumer,
                bn_path=join(traced.path, target),
                bn=bn,
                act=_activation(user, bn, traced.module),
            )
    return CallSite(consumer=consumer, problem=f"output feeds {consumer}, not a batch norm")


def match_convs(model: nn.Module, trace: TraceResult, *, pointwise: bool = False) -> list[ConvMatch]:
    """Every conv module of ``model`` (in definition order) with its call sites and eligibility (1x1 convs only
    with ``pointwise``)."""
    matches: dict[int, ConvMatch] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if is_conv(module):
            if id(module) in matches:
                matches[id(module)].paths.append(path)
            else:
                matches[id(module)] = ConvMatch(module, [path])
    for traced in trace.graphs:
        for node, _, module in iter_call_modules(traced):
            match = matches.get(id(module))
            if match is not None:
                match.sites.append(_call_site(node, traced))
    for match in matches.values():
        match.reason = _eligibility_problem(match, trace, pointwise)
    return list(matches.values())


def _eligibility_problem(match: ConvMatch, trace: TraceResult, pointwise: bool) -> str | None:
    if not isinstance(match.module, OREPAConv):
        reason = unsupported_reason(match.module, pointwise=pointwise)
        if reason is not None:
            return reason
    if not match.sites:
        region = trace.region_of(match.path)
        if region is not None:
            return f"its parent '{region.label}' could not be traced ({region.reason})"
        return "not called as a module in any traced forward (unused, or used functionally)"
    problems = [s.problem for s in match.sites if s.problem]
    if problems:
        return problems[0] if len(match.sites) == 1 else f"one of its {len(match.sites)} calls: {problems[0]}"
    return None
