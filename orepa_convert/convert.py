"""`convert_to_orepa`: find every eligible conv -> BN in a model and swap in OREPA blocks, in place."""

from __future__ import annotations

import fnmatch
import importlib
import logging
import sys
import warnings
from types import ModuleType
import zlib
from typing import Any, overload, Literal

import torch
from torch import nn

from . import ahead
from .block import OREPAConv, branch_parameter_count
from .config import OREPAConfig, resolve_config
from .patterns import ConvMatch, match_convs
from .report import ALREADY, CONVERTED, INELIGIBLE, NOT_SELECTED, SELECTED, ConvRecord, ConversionReport
from .tracing import trace_model

logger = logging.getLogger(__name__)

# Attributes every conv module has; anything else on a conv (e.g. ultralytics' i, f, type, np on a
# top-level layer) is framework state that the block carries while it stands in the conv's place. Built on the
# meta device: no initialisation runs, so importing the library leaves the global RNG untouched.
_CONV_ATTRIBUTES = frozenset(nn.Conv2d(1, 1, 1, device="meta").__dict__)


def ultralytics_integration() -> ModuleType | None:
    """Our ultralytics integration, only if the user has imported ultralytics (an ultralytics object cannot
    exist otherwise, and converting any other model must not import it)."""
    if "ultralytics" not in sys.modules:
        return None
    return importlib.import_module(".integrations.ultralytics", __package__)


def unwrap_model(model: Any) -> nn.Module:
    """The module to work on inside DDP/DataParallel (``.module``), ``torch.compile`` (``._orig_mod``) and
    ultralytics ``YOLO``-style wrappers (``.model``)."""
    ul = ultralytics_integration()
    seen = 0
    while True:
        seen += 1
        if seen > 16:
            raise TypeError("could not unwrap the model: too many nested wrappers")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif ul is not None and ul.is_ultralytics_wrapper(model):
            model = model.model
        else:
            break
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected a torch.nn.Module (or a DDP / torch.compile / ultralytics YOLO wrapper of one), "
            f"got {type(model).__name__}"
        )
    return model


def _selection_problem(match: ConvMatch, config: OREPAConfig) -> str | None:
    """Why an eligible conv is not selected by ``config`` (every rule must pass; exclude always wins)."""
    conv, path = match.module, match.path
    if config.include and not any(fnmatch.fnmatchcase(p, g) for p in match.paths for g in config.include):
        return "matches no include glob"
    excluded = [g for g in config.exclude if any(fnmatch.fnmatchcase(p, g) for p in match.paths)]
    if excluded:
        return f"excluded by '{excluded[0]}'"
    if not config.allows_kernel(tuple(conv.kernel_size)):
        return f"kernel {tuple(conv.kernel_size)} not in kernel_sizes"
    if min(conv.in_channels, conv.out_channels) < config.min_channels:
        return f"fewer than min_channels={config.min_channels} channels"
    if not config.depthwise and conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise (depthwise=False)"
    if config.filter is not None and not config.filter(path, conv):
        return "rejected by filter"
    return None


def _warn_unmatched_globs(matches: list[ConvMatch], config: OREPAConfig) -> None:
    """Warn about ``include``/``exclude`` globs that match no conv path (a typo selects silently otherwise)."""
    paths = [p for m in matches for p in m.paths]
    for name in ("include", "exclude"):
        for glob in getattr(config, name):
            if not any(fnmatch.fnmatchcase(p, glob) for p in paths):
                examples = ", ".join(paths[:3]) or "none"
                warnings.warn(
                    f"convert_to_orepa: {name} glob {glob!r} matches no conv path (conv paths look like: {examples}); "
                    f"globs match whole paths, e.g. 'model.2.*'",
                    stacklevel=3,
                )


def block_seed(seed: int, path: str) -> int:
    """Seed of the block at ``path``: depends only on the config seed and the path, so a block's random
    branch weights do not change when other convs are included or excluded."""
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63)


def _record(match: ConvMatch, status: str, reason: str = "", extra: int = 0) -> ConvRecord:
    conv = match.module
    site = next((s for s in match.sites if s.bn_path), None)
    return ConvRecord(
        path=match.path,
        conv_class=type(conv.conv if isinstance(conv, OREPAConv) else conv).__name__,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        groups=conv.groups,
        bn=", ".join(dict.fromkeys(match.bn_paths)) or None,
        act=site.act if site else None,
        status=status,
        reason=reason,
        extra_params=extra,
    )


def _replace(root: nn.Module, paths: list[str], new: nn.Module) -> None:
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        setattr(root.get_submodule(parent_path), name, new)


def _convert_one(match: ConvMatch, config: OREPAConfig, root: nn.Module) -> int:
    conv = match.module
    before = sum(p.numel() for p in conv.parameters())
    framework_state = {k: v for k, v in conv.__dict__.items() if k not in _CONV_ATTRIBUTES and not k.startswith("_")}
    block = OREPAConv(conv, config, generator=torch.Generator().manual_seed(block_seed(config.seed, match.path)))
    for key, value in framework_state.items():
        if not hasattr(type(block), key):
            block.__dict__[key] = value
    _replace(root, match.paths, block)
    return sum(p.numel() for p in block.parameters()) - before


def _plan(root: nn.Module, config: OREPAConfig) -> tuple[list[ConvMatch], ConversionReport]:
    trace = trace_model(root)
    matches = match_convs(root, trace)
    records = []
    for m in matches:
        if isinstance(m.module, OREPAConv):
            records.append(_record(m, ALREADY))
        elif not m.eligible:
            records.append(_record(m, INELIGIBLE, m.reason or ""))
        else:
            problem = _selection_problem(m, config)
            if problem:
                records.append(_record(m, NOT_SELECTED, problem))
            else:
                records.append(_record(m, SELECTED, extra=branch_parameter_count(m.module, config)))
    return matches, ConversionReport(records, trace.untraced, config)


def inspect_model(model: Any, config: OREPAConfig | None = None, **overrides: Any) -> ConversionReport:
    """The report ``convert_to_orepa`` would give, without changing anything."""
    config = resolve_config(config, overrides)
    _, report = _plan(unwrap_model(model), config)
    report.applied = False
    return report


@overload
def convert_to_orepa(model: Any, config: OREPAConfig | None = ..., *, return_report: Literal[False] = ..., **overrides: Any) -> Any: ...
@overload
def convert_to_orepa(model: Any, config: OREPAConfig | None = ..., *, return_report: Literal[True], **overrides: Any) -> tuple[Any, ConversionReport]: ...


def convert_to_orepa(
    model: Any, config: OREPAConfig | None = None, *, return_report: bool = False, **overrides: Any
) -> Any:
    """Replace every eligible conv -> batch norm in ``model`` by an :class:`OREPAConv`, in place.

    Eligible: an ``nn.Conv1d/2d/3d`` (exact class) or timm ``Conv2dSame`` with more than one tap and a
    non-parametrized weight whose traced output has exactly one consumer, a batch norm (a conv called
    several times must feed a batch norm at every call; it is converted once). Selection rules come from
    ``config`` / ``overrides`` (field names of :class:`OREPAConfig`). With the default ``init="preserve"``
    the model computes exactly what it computed before.

    Args:
        model: any ``nn.Module``, also inside DDP, ``torch.compile`` or an ultralytics ``YOLO`` object.
        config: an :class:`OREPAConfig`; ``overrides`` replace its fields.
        return_report: also return the :class:`ConversionReport`.

    Returns:
        ``model`` itself (and the report if asked). Converting a converted model changes nothing.
    """
    config = resolve_config(config, overrides)
    root = unwrap_model(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        warnings.warn(
            "convert_to_orepa on a DistributedDataParallel model: the existing DDP wrapper does not know the new "
            "parameters; convert before wrapping in DDP (or wrap again)",
            stacklevel=2,
        )
    matches, report = _plan(root, config)
    _warn_unmatched_globs(matches, config)
    for match, record in zip(matches, report.records):
        if record.status == SELECTED:
            record.extra_params = _convert_one(match, config, root)
            record.status = CONVERTED
    if report.converted or report.already_converted:
        ahead.attach(root)
    ul = ultralytics_integration()
    if ul is not None and ul.is_ultralytics_wrapper(model):  # make the next .train() train this OREPA model
        ul.record_conversion(model, config, report)
    logger.info("%s\n%s", report.summary(), report.table())
    if report.converted == 0 and report.already_converted == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in report.reasons().most_common(4)) or "no conv modules"
        what = "no eligible conv" if report.eligible == 0 else f"{report.eligible} eligible conv(s), none selected"
        warnings.warn(
            f"convert_to_orepa: nothing converted in {type(root).__name__}: {what} "
            f"({report.candidates} candidate convs: {reasons}); the model is unchanged",
            stacklevel=2,
        )
    return (model, report) if return_report else model
