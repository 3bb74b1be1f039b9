"""The conversion record: what was converted, and how, as one small versioned JSON-friendly dict.

``orepa_state(model)`` reads it off the blocks themselves (the blocks are the single source of truth);
``restore_from_orepa_state(model, state)`` converts a freshly built original model exactly as recorded (same
paths, same block config and seeds) without tracing, so its state_dict then loads. ``save``/``restore`` put the
record and the state_dict in one file that loads with ``torch.load(weights_only=True)``. Every integration, recipe
and the CLI use this record; :func:`state_from_layout` rebuilds it from a state_dict's saved block layouts when
a file carries no record.

The record::

    {"format": 2, "producer": "orepa_convert 0.2.0",
     "groups": [{"config": {"init": ..., "branches": [...], "pw_kxk_width": ..., "dws_expansion": ...,
                            "seed": ..., "eval_cache": ...},
                 "paths": ["model.0.conv", ...]}]}

A block registered at several paths (a shared conv) is listed once, at its first path. Format 1 (one config,
``{"format": 1, "config": {...}, "paths": [...]}``, written into ultralytics ``model.yaml`` by the first releases) is read too.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import IO, Any, cast

import torch
from torch import nn

from . import ahead
from .block import OREPAConv, unsupported_reason
from .config import Init, OREPAConfig
from .errors import OREPAStateError
from .fold import fold_orepa
from .integrations import notify
from .surgery import CARRIED_ATTR, block_paths, convert_paths, is_converted, unwrap_model

FORMAT = 2
STATE_KEY = "orepa_state"  # the record's key in files written by save() and in checkpoints of our integrations
#: OREPAConfig fields that describe a block (selection fields are replaced by the exact list of paths).
BLOCK_FIELDS = ("init", "branches", "pw_kxk_width", "dws_expansion", "live_scale", "seed", "eval_cache")
#: block fields a record leaves out at their default (so records of blocks without them read as before)
_OMITTED_AT_DEFAULT = {"live_scale": 1.0}

FileLike = str | os.PathLike | IO[bytes]


def _producer() -> str:
    from . import __version__

    return f"orepa_convert {__version__}"


def config_to_dict(config: OREPAConfig) -> dict[str, Any]:
    """The block fields of ``config`` as JSON types."""
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in config.to_dict().items()
        if k in BLOCK_FIELDS and not (k in _OMITTED_AT_DEFAULT and v == _OMITTED_AT_DEFAULT[k])
    }


def config_from_dict(data: Mapping[str, Any]) -> OREPAConfig:
    """An :class:`OREPAConfig` from a record's config dict (unknown fields raise :class:`OREPAStateError`)."""
    unknown = sorted(set(data) - set(BLOCK_FIELDS))
    if unknown:
        raise OREPAStateError(
            f"OREPA record config has unknown field(s) {unknown}; it was written by a newer orepa_convert?"
        )
    try:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return OREPAConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise OREPAStateError(f"invalid config in OREPA record: {exc}") from exc


def blocks_by_path(root: nn.Module) -> dict[str, OREPAConv]:
    """Every OREPA block of ``root`` at its first path (definition order)."""
    return {paths[0]: block for block, paths in block_paths(root).items()}


def make_state(groups: Mapping[OREPAConfig, list[str]]) -> dict[str, Any]:
    """A record from ``{block config: [paths]}``."""
    return {
        "format": FORMAT,
        "producer": _producer(),
        "groups": [{"config": config_to_dict(c), "paths": list(p)} for c, p in groups.items() if p],
    }


def orepa_state(model: Any) -> dict[str, Any]:
    """The conversion record of ``model`` (any wrapper ``convert_to_orepa`` accepts), read off its blocks.

    A model without blocks gives a record with no groups.
    """
    groups: dict[OREPAConfig, list[str]] = {}
    for path, block in blocks_by_path(unwrap_model(model)).items():
        groups.setdefault(block.block_config(), []).append(path)
    return make_state(groups)


def read_state(state: Any) -> list[tuple[OREPAConfig, list[str]]]:
    """Validate a record (format 1 or 2) and return its ``(config, paths)`` groups."""
    if not isinstance(state, Mapping):
        raise OREPAStateError(f"an OREPA record is a dict, got {type(state).__name__}")
    version = state.get("format")
    if version == 1:  # record format 1 (ultralytics model.yaml): one config for every path
        raw: Any = [{"config": state.get("config") or {}, "paths": state.get("paths") or []}]
    elif version == FORMAT:
        raw = state.get("groups")
        if not isinstance(raw, list):
            raise OREPAStateError("OREPA record has no 'groups' list")
    else:
        raise OREPAStateError(
            f"OREPA record format {version!r} is not supported by this orepa_convert (reads 1 and {FORMAT}); "
            f"upgrade orepa_convert"
        )
    groups = []
    for group in raw:
        paths = group.get("paths") if isinstance(group, Mapping) else None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise OREPAStateError("each OREPA record group needs a 'paths' list of module paths")
        groups.append((config_from_dict(group.get("config") or {}), paths))
    return groups


def state_paths(state: Any) -> list[str]:
    """Every path a record converts."""
    return [p for _, paths in read_state(state) for p in paths]


def restore_from_orepa_state(model: Any, state: Any) -> Any:
    """Convert ``model`` (the original architecture, built fresh) exactly as ``state`` records, in place.

    No tracing: the recorded paths are converted as they are. A path that already holds a block with the same
    config is left alone, so restoring twice changes nothing. Returns ``model``.

    Raises:
        OREPAStateError: the record is unreadable, or a path is missing, is not a supported conv, or holds a
            block with another config (the model is not the one the record was made on).
    """
    root = unwrap_model(model)
    plan: list[tuple[OREPAConfig, list[str]]] = []
    for config, paths in read_state(state):
        todo = []
        for path in paths:
            try:
                module = root.get_submodule(path)
            except AttributeError:
                raise OREPAStateError(
                    f"OREPA record names '{path}', which {type(root).__name__} does not have; restore into the "
                    f"architecture the record was made on (same config, number of classes and framework version)"
                ) from None
            if isinstance(module, OREPAConv):
                if module.block_config() != config:
                    raise OREPAStateError(
                        f"'{path}' is already an OREPA block with another config; build the model fresh"
                    )
                continue
            reason = unsupported_reason(module, pointwise=True)
            if reason is not None:
                raise OREPAStateError(
                    f"OREPA record names '{path}', a {type(module).__name__} that cannot be converted: {reason}"
                )
            todo.append(path)
        plan.append((config, todo))
    for config, todo in plan:
        convert_paths(root, todo, config)
    if is_converted(root):
        ahead.attach(root)
        notify("after_convert", model, root)
    return model


def block_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The state_dict entries that belong to OREPA blocks (branch weights, scales, biases, layouts)."""
    root = unwrap_model(model)
    prefixes = tuple(f"{p}." for p in blocks_by_path(root))
    return {k: v for k, v in root.state_dict().items() if k.startswith(prefixes)}


def fold_carrying_state(model: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """A folded deep copy of ``model`` (a plain model of the original architecture, usable by any stock tool)
    that carries its OREPA training state as a plain-dict attribute (record plus block tensors): pickling it
    needs no ``orepa_convert``; :func:`unfold_carried` (and ``convert_to_orepa``) bring the OREPA model back.
    ``dtype`` stores the floating block tensors in that dtype (e.g. ``torch.half``, as ultralytics stores models)."""
    root = unwrap_model(model)
    blocks = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).clone()
        for k, v in block_state_dict(root).items()
    }
    carried = {STATE_KEY: orepa_state(root), "blocks": blocks}
    folded = copy.deepcopy(root)
    folded.__dict__.pop(CARRIED_ATTR, None)
    fold_orepa(folded)
    folded.__dict__[CARRIED_ATTR] = carried
    return folded


def carried_state(model: nn.Module) -> dict[str, Any] | None:
    """The OREPA training state a folded model carries (:func:`fold_carrying_state`), if any."""
    carried = model.__dict__.get(CARRIED_ATTR)
    return carried if isinstance(carried, dict) else None


def fused_since_saved(model: nn.Module) -> list[str]:
    """Recorded block paths of a model carrying its OREPA state whose conv has gained a bias the carried state
    lacks: the framework fused a batch norm into it in place after the state was saved (ultralytics < 8.4 does
    so in ``val()``/``predict()``). Such a model cannot be unfolded; its checkpoint file can."""
    carried = carried_state(model)
    if carried is None:
        return []
    fused = []
    for path in state_paths(carried[STATE_KEY]):
        try:
            conv = model.get_submodule(path)
        except AttributeError:
            continue
        if getattr(conv, "bias", None) is not None and f"{path}.bias" not in carried["blocks"]:
            fused.append(path)
    return fused


def unfold_carried(model: nn.Module) -> nn.Module:
    """Turn a folded model that carries its OREPA training state back into that OREPA model, in place (exactly:
    the block tensors are the carried ones, every other tensor is the model's own)."""
    carried = carried_state(model)
    if carried is None:
        raise OREPAStateError(f"{type(model).__name__} carries no OREPA training state")
    fused = fused_since_saved(model)
    if fused:
        raise OREPAStateError(
            f"{type(model).__name__} was fused in place after its OREPA state was saved ({len(fused)} conv(s) took in "
            f"their batch norm, e.g. '{fused[0]}'; ultralytics < 8.4 does this in val()/predict()): load the "
            f"checkpoint again (e.g. YOLO('runs/.../best.pt')) and convert that"
        )
    restore_from_orepa_state(model, carried[STATE_KEY])
    blocks = carried["blocks"]
    missing = sorted(set(block_state_dict(model)) - set(blocks))
    if missing:
        raise OREPAStateError(f"the carried OREPA state lacks {len(missing)} block tensor(s), e.g. '{missing[0]}'")
    model.load_state_dict(blocks, strict=False)
    del model.__dict__[CARRIED_ATTR]
    return model


def save(model: Any, f: FileLike, **extra: Any) -> None:
    """Write ``model``'s record (``"orepa_state"``), its OREPA state_dict (``"orepa_model"``) and its folded plain
    state_dict (``"state_dict"``, which stock tools such as timm's ``load_checkpoint`` load into the original
    architecture), plus JSON/tensor ``extra`` entries, to ``f``.

    The file loads with ``torch.load(f, weights_only=True)``; :func:`restore` reads it back.
    """
    root = unwrap_model(model)
    folded = copy.deepcopy(root)
    if block_paths(folded):
        fold_orepa(folded)
    torch.save(
        {STATE_KEY: orepa_state(root), "orepa_model": root.state_dict(), "state_dict": folded.state_dict(), **extra}, f
    )


def load_file(f: FileLike, *, weights_only: bool = True, expected: str = "an orepa_convert checkpoint") -> Any:
    """``torch.load(f)`` on the CPU, with one :class:`OREPAStateError` line that names the file and what was
    expected when it cannot be read (corrupt, not a torch file, or, with ``weights_only``, a pickle of objects)."""
    try:
        return torch.load(f, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...: many ways to be unreadable
        name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "the file")
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        hint = (
            " (it holds pickled objects: only files written by orepa_convert.save load safely)"
            if weights_only and "weights_only" in str(exc)
            else ""
        )
        raise OREPAStateError(
            f"{name} is not {expected} that torch.load can read{hint}: {type(exc).__name__}: {first}"
        ) from None


def restore(model: Any, f: FileLike | Mapping[str, Any], *, strict: bool = True) -> Any:
    """Convert the freshly built original ``model`` as the file written by :func:`save` records, then load its
    OREPA weights. ``f`` may also be the already loaded dict. Returns ``model``."""
    ckpt = f if isinstance(f, Mapping) else load_file(f)
    if not isinstance(ckpt, Mapping) or STATE_KEY not in ckpt or "orepa_model" not in ckpt:
        raise OREPAStateError(f"not an orepa_convert checkpoint: expected keys '{STATE_KEY}' and 'orepa_model'")
    restore_from_orepa_state(model, ckpt[STATE_KEY])
    unwrap_model(model).load_state_dict(ckpt["orepa_model"], strict=strict)
    return model


def load_state_dict(model: Any, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
    """``model.load_state_dict`` that says what to do when OREPA and plain weights meet: an OREPA state_dict
    into a model without blocks raises :class:`OREPAStateError` naming the fix (fold first, or restore the
    structure); everything else is torch's ``load_state_dict``. Returns its result."""
    root = unwrap_model(model)
    has_blocks = is_converted(root)
    if not has_blocks and is_orepa_state_dict(state_dict):
        paths = list(_layout_prefixes(state_dict))
        raise OREPAStateError(
            f"this state_dict holds {len(paths)} unfolded OREPA block(s) (e.g. '{paths[0]}') and {type(root).__name__} "
            f"is a plain model: fold the weights first (`orepa-convert fold FILE --model ARCH -o plain.pth`, or "
            f"fold_orepa(model) before saving), or rebuild the OREPA structure before loading: "
            f"orepa_convert.restore_from_orepa_state(model, orepa_convert.state_from_layout(model, state_dict))"
        )
    return root.load_state_dict(state_dict, strict=strict)


def _layout_prefixes(state_dict: Mapping[str, Any]) -> dict[str, list[int]]:
    """``{block path: saved layout}`` for every OREPA block in a state_dict."""
    found = {}
    for key, value in state_dict.items():
        if not key.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        prefix = key[: -len("_extra_state")]
        if prefix + "scales" in state_dict or any(k.startswith(prefix + "scale_") for k in state_dict):
            found[prefix.rstrip(".")] = [int(v) for v in value.flatten().tolist()]
    return found


def is_orepa_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state_dict holds OREPA block tensors (it loads only into a converted model)."""
    return bool(_layout_prefixes(state_dict))


def state_from_layout(
    model: Any, state_dict: Mapping[str, Any], *, seed: int = 0, init: str = "preserve"
) -> dict[str, Any]:
    """Rebuild the record of a converted model's ``state_dict`` from its blocks' saved layouts (branches and
    widths), for files that carry no record. ``model`` is the plain architecture (for channel counts); ``seed``
    and ``init`` only affect random initial values, which loading the state_dict overwrites."""
    from .block.spec import SavedLayout, config_from_layout

    root = unwrap_model(model)
    groups: dict[OREPAConfig, list[str]] = {}
    for path, raw in _layout_prefixes(state_dict).items():
        saved = SavedLayout.decode(raw)
        if saved is None or not saved.readable:
            raise OREPAStateError(f"'{path}': unreadable OREPA block layout {raw}")
        try:
            conv = root.get_submodule(path)
        except AttributeError:
            raise OREPAStateError(
                f"the state_dict has an OREPA block at '{path}', which the model does not have"
            ) from None
        in_channels = getattr(conv, "in_channels", None)
        config = (
            config_from_layout(saved, in_channels, init=cast(Init, init), seed=seed)
            if isinstance(in_channels, int)
            else None
        )
        if config is None:
            raise OREPAStateError(f"'{path}': the saved block does not fit a {type(conv).__name__} there")
        groups.setdefault(config, []).append(path)
    return make_state(groups)
