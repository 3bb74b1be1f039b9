"""`fold_orepa`: turn every OREPA block back into its original conv (optionally with the BN fused in)."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal, overload

import torch
from torch import nn

from . import ahead
from .block import OREPAConv, generation
from .integrations import notify
from .patterns import ConvMatch, match_convs
from .report import FoldRecord, FoldReport
from .surgery import CARRIED_ATTR, block_paths, replace_at, unwrap_model
from .tracing import trace_model

logger = logging.getLogger(__name__)


def _bn_replacement(bn: nn.Module) -> nn.Module:
    """What stands in a fused batch norm's place: ``Identity``, or its drop/act for BN+act modules."""
    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
    parts = [m for m in parts if not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _bn_fuse_problem(match: ConvMatch, bn_uses: dict[int, int]) -> str | None:
    if len(match.sites) != 1:
        return f"shared conv called {len(match.sites)} times; its batch norms are kept"
    site = match.sites[0]
    if site.bn is None:
        return site.problem or "no batch norm after it"
    if bn_uses.get(id(site.bn), 0) != 1:
        return f"batch norm '{site.bn_path}' is shared; kept"
    if getattr(site.bn, "running_mean", None) is None or getattr(site.bn, "running_var", None) is None:
        return f"batch norm '{site.bn_path}' has no running statistics; kept"
    return None


@torch.no_grad()
def _fuse_bn(conv: Any, bn: Any) -> None:  # a conv with its weight, and the batch norm it feeds
    weight, bias = generation.fold_batchnorm(
        conv.weight,
        conv.bias,
        bn.running_mean,
        bn.running_var,
        getattr(bn, "weight", None),
        getattr(bn, "bias", None),
        bn.eps,
    )
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)


@overload
def fold_orepa(model: Any, fuse_bn: bool = ..., *, return_report: Literal[False] = ...) -> Any: ...
@overload
def fold_orepa(model: Any, fuse_bn: bool = ..., *, return_report: Literal[True]) -> tuple[Any, FoldReport]: ...


def fold_orepa(model: Any, fuse_bn: bool = False, *, return_report: bool = False) -> Any:
    """Replace every :class:`OREPAConv` in ``model`` by its original conv holding the generated kernel, in place.

    Afterwards every module path has the class it had before conversion and the state_dict has the
    original keys and shapes, so it loads into a freshly built original model. Folding twice, or folding a
    model without blocks, changes nothing.

    Args:
        model: any ``nn.Module``, also inside DDP, ``torch.compile`` (recompile after folding) or a ``YOLO`` object.
        fuse_bn: also fold each block's batch norm into the conv (the conv gains a bias; the BN becomes
            ``Identity``, or its activation/drop for BN+act modules). For inference only: it uses the running
            statistics. Shared convs, shared batch norms and norms without running statistics are kept.
        return_report: also return the :class:`FoldReport`.
    """
    root = unwrap_model(model)
    report = FoldReport(fuse_bn=fuse_bn)
    blocks = (
        [m for m in match_convs(root, trace_model(root)) if isinstance(m.module, OREPAConv)]
        if fuse_bn
        else [ConvMatch(b, paths) for b, paths in block_paths(root).items()]
    )
    if not blocks and CARRIED_ATTR in root.__dict__:
        logger.info("fold_orepa: %s is already folded (it carries its OREPA training state)", type(root).__name__)
    elif not blocks:
        what = (
            "fuse_bn=True only fuses the batch norms after OREPA blocks; for a plain model use "
            "torch.fx.experimental.optimization.fuse or the framework's own fuse()"
            if fuse_bn
            else "it was never converted, or is already folded"
        )
        warnings.warn(
            f"fold_orepa: {type(root).__name__} has no OREPA blocks, nothing was folded ({what})", stacklevel=2
        )
    bn_uses: dict[int, int] = {}
    for match in blocks:
        for site in match.sites:
            if site.bn is not None:
                bn_uses[id(site.bn)] = bn_uses.get(id(site.bn), 0) + 1
    for match in blocks:
        block: OREPAConv = match.module  # type: ignore[assignment]
        conv = block.fold()
        replace_at(root, match.paths, conv)
        record = FoldRecord(match.path, type(conv).__name__)
        if fuse_bn:
            problem = _bn_fuse_problem(match, bn_uses)
            first = match.sites[0] if match.sites else None
            record.bn = first.bn_path if first else None
            if problem is None and first is not None and first.bn is not None:
                _fuse_bn(conv, first.bn)
                replace_at(
                    root,
                    [p for p, m in root.named_modules(remove_duplicate=False) if m is first.bn],
                    _bn_replacement(first.bn),
                )
                record.bn_fused = True
            else:
                record.note = problem or ""
        report.records.append(record)
    ahead.detach(root)
    notify("after_fold", model, root)  # e.g. ultralytics: the checkpoint a YOLO object carries is folded too
    logger.info("%s\n%s", report.summary(), report.table() if report.records else "")
    return (model, report) if return_report else model
