"""`convert_to_orepa`: find every eligible conv -> BN in a model and swap in OREPA blocks, in place."""

from __future__ import annotations

import copy
import fnmatch
import logging
import warnings
from typing import Any, Literal, overload

from torch import nn

from . import ahead
from .block import OREPAConv, branch_parameter_count
from .config import OREPAConfig, resolve_config
from .integrations import first_answer, notify
from .patterns import ConvMatch, match_convs
from .report import ConversionReport, ConvRecord, Status
from .state import BLOCK_FIELDS, OREPAStateError, carried_state, read_state, state_paths, unfold_carried
from .surgery import CARRIED_ATTR, convert_conv, unwrap_model
from .tracing import trace_model

logger = logging.getLogger(__name__)


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


def _record(match: ConvMatch, status: Status, reason: str = "", extra: int = 0) -> ConvRecord:
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


def _plan(root: nn.Module, config: OREPAConfig) -> tuple[list[ConvMatch], ConversionReport]:
    trace = trace_model(root)
    matches = match_convs(root, trace, pointwise=config.pointwise)
    records = []
    for m in matches:
        if isinstance(m.module, OREPAConv):
            records.append(_record(m, Status.ALREADY))
        elif not m.eligible:
            records.append(_record(m, Status.INELIGIBLE, m.reason or ""))
        else:
            problem = _selection_problem(m, config)
            if problem:
                records.append(_record(m, Status.NOT_SELECTED, problem))
            else:
                records.append(_record(m, Status.SELECTED, extra=branch_parameter_count(m.module, config)))
    return matches, ConversionReport(records, trace.untraced, config)


def _check_matches_record(root: nn.Module, config: OREPAConfig, given: set[str]) -> None:
    """Raise unless the explicitly ``given`` fields of ``config`` describe the trained state ``root`` carries:
    the same block settings as every recorded group, and a selection that picks exactly the recorded convs."""
    record = carried_state(root)["orepa_state"]  # type: ignore[index]
    recorded = [c for c, _ in read_state(record)]
    differ = sorted({f for f in given & set(BLOCK_FIELDS) for c in recorded if getattr(c, f) != getattr(config, f)})
    if given - set(BLOCK_FIELDS):  # selection rules: compare what they select on the folded (plain) model
        _, report = _plan(root, config)
        if set(report.paths(Status.SELECTED)) != set(state_paths(record)):
            differ.append("selection")
    if differ:
        raise OREPAStateError(
            f"{type(root).__name__} carries a trained OREPA state ({len(state_paths(record))} blocks, init="
            f"{recorded[0].init!r}) that your config does not describe ({', '.join(differ)} differ): call "
            f"convert_to_orepa(model) with no config to restore the trained blocks, or pass restore=False to "
            f"convert its folded weights anew with your config"
        )


def _restored_report(root: nn.Module, config: OREPAConfig) -> ConversionReport:
    """The report of a restore: the recorded blocks are already converted, and nothing else is converted."""
    _, report = _plan(root, config)
    for r in report.records:
        if r.status == Status.SELECTED:
            r.status, r.reason, r.extra_params = Status.NOT_SELECTED, "not in the restored OREPA record", 0
    report.restored = True
    return report


def _restores(root: nn.Module, config: OREPAConfig, given: set[str], restore: bool | None) -> bool:
    """Whether ``convert_to_orepa`` restores the trained state ``root`` carries (see its ``restore`` argument);
    raises where the arguments contradict that state or ask for one that is not there."""
    if carried_state(root) is not None and restore is not False:
        _check_matches_record(root, config, given)
        return True
    if restore:
        raise OREPAStateError(f"{type(root).__name__} carries no trained OREPA state to restore")
    return False


def _given_fields(config: OREPAConfig | None, overrides: dict[str, Any]) -> set[str]:
    return set(config.to_dict()) if config is not None else set(overrides)


def inspect_model(
    model: Any, config: OREPAConfig | None = None, *, restore: bool | None = None, **overrides: Any
) -> ConversionReport:
    """The report ``convert_to_orepa`` would give (same arguments), without changing anything."""
    resolved = resolve_config(config, overrides)
    root = unwrap_model(model)
    if _restores(root, resolved, _given_fields(config, overrides), restore):
        report = _restored_report(unfold_carried(copy.deepcopy(root)), resolved)
    else:
        plain = root
        if carried_state(root) is not None:  # restore=False: the folded weights as a plain model
            plain = copy.copy(root)
            plain.__dict__ = {k: v for k, v in root.__dict__.items() if k != CARRIED_ATTR}
        _, report = _plan(plain, resolved)
    report.applied = False
    return report


@overload
def convert_to_orepa(
    model: Any,
    config: OREPAConfig | None = ...,
    *,
    return_report: Literal[False] = ...,
    restore: bool | None = ...,
    **overrides: Any,
) -> Any: ...
@overload
def convert_to_orepa(
    model: Any,
    config: OREPAConfig | None = ...,
    *,
    return_report: Literal[True],
    restore: bool | None = ...,
    **overrides: Any,
) -> tuple[Any, ConversionReport]: ...


def convert_to_orepa(
    model: Any,
    config: OREPAConfig | None = None,
    *,
    return_report: bool = False,
    restore: bool | None = None,
    **overrides: Any,
) -> Any:
    """Replace every eligible conv -> batch norm in ``model`` by an :class:`OREPAConv`, in place.

    Eligible: an ``nn.Conv1d/2d/3d`` (or a subclass that keeps its forward) or timm ``Conv2dSame`` with more than one tap and a
    non-parametrized weight whose traced output has exactly one consumer, a batch norm (a conv called
    several times must feed a batch norm at every call; it is converted once). Selection rules come from
    ``config`` / ``overrides`` (field names of :class:`OREPAConfig`). With the default ``init="preserve"``
    the model computes exactly what it computed before.

    Args:
        model: any ``nn.Module``, also inside DDP, ``torch.compile`` or an ultralytics ``YOLO`` object.
        config: an :class:`OREPAConfig`; ``overrides`` replace its fields.
        return_report: also return the :class:`ConversionReport`.
        restore: what to do with a model that carries a trained OREPA state (a folded checkpoint model of an OREPA
            run, e.g. an ultralytics ``best.pt``). ``None`` (default): restore its trained blocks, if ``config`` and
            ``overrides`` are absent or describe that state; otherwise raise :class:`OREPAStateError` rather than
            ignore them. ``False``: drop the carried state and convert the folded weights anew with ``config``.
            ``True``: restore, and raise if there is no state to restore.

    Returns:
        ``model`` itself (and the report if asked). Converting a converted model changes nothing.
    """
    given_config, config = config, resolve_config(config, overrides)
    root = unwrap_model(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        warnings.warn(
            "convert_to_orepa on a DistributedDataParallel model: the existing DDP wrapper does not know the new "
            "parameters; convert before wrapping in DDP (or wrap again)",
            stacklevel=2,
        )
    reloaded = first_answer("reload_changed", model, root)
    root = root if reloaded is None else reloaded
    if _restores(root, config, _given_fields(given_config, overrides), restore):  # a folded model carrying its state
        unfold_carried(root)  # restores the blocks and attaches the generation hooks
        report = _restored_report(root, config)
        notify("after_convert", model, root)  # for the wrapper too (e.g. a YOLO object's trainer router)
        logger.info("%s", report.summary())
        return (model, report) if return_report else model
    if root.__dict__.pop(CARRIED_ATTR, None) is not None:  # restore=False: the folded weights are the start
        logger.info(
            "OREPA: dropped the trained OREPA state %s carried; converting its folded weights anew", type(root).__name__
        )
    matches, report = _plan(root, config)
    _warn_unmatched_globs(matches, config)
    for match, record in zip(matches, report.records):
        if record.status == Status.SELECTED:
            record.extra_params = convert_conv(root, match.module, match.paths, config)
            record.status = Status.CONVERTED
    if report.converted or report.already_converted:
        ahead.attach(root)
        notify("after_convert", model, root)
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
