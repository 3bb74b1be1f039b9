"""Ultralytics integration: train, validate, save and export OREPA models with the stock ultralytics workflow.

How it hooks in (no ultralytics class or function is patched globally):

- ``convert_to_orepa(yolo)`` converts ``yolo.model`` in place, records what it converted in
  ``yolo.model.yaml["orepa"]`` (a plain dict, so it travels inside checkpoints), and swaps the class of *that
  one* ``YOLO`` object for a subclass (as ``torch.nn.utils.parametrize`` does for modules). The subclass passes
  an OREPA trainer to ``.train()`` and folds a copy of the model for ``.val()``, ``.predict()``,
  ``.export()`` and ``.benchmark()``.
- The OREPA trainers (:class:`OREPADetectionTrainer`, ... , one per task trainer ultralytics ships, all
  importable by module path for ``model.train(trainer=...)``) rebuild the OREPA structure whenever ultralytics
  rebuilds the model. They load plain weights *before* converting and OREPA weights *after*. They keep the
  per-channel scales out of weight decay for every optimizer ultralytics builds, and they validate a folded copy
  of ``best.pt`` at the end of training (also written as ``best_folded.pt``).
- ``fold_orepa(yolo)`` folds the model, the checkpoint it carries and the yaml record, and restores the
  object's original class, so ``yolo.save()`` writes a stock checkpoint.

Loading a ``.pt`` unpickles it (``weights_only=False``, as ultralytics itself does): only load trusted files.
"""

from __future__ import annotations

import copy
import functools
import glob
import importlib
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

OREPA_KEY = "orepa"  # key in model.yaml (and trainer overrides) that carries the conversion record
SPEC_FORMAT = 1

# Selection fields are replaced by the exact list of converted paths; the filter callable cannot be stored.
_SPEC_CONFIG_FIELDS = ("init", "branches", "pw_kxk_width", "dws_expansion", "seed", "eval_cache")


# ---------------------------------------------------------------------------------------------- loading


def is_ultralytics_wrapper(obj: object) -> bool:
    """Whether ``obj`` is an ultralytics ``Model`` (``YOLO``, ``RTDETR``, ...) holding a task model in ``.model``."""
    try:
        from ultralytics.engine.model import Model
    except ImportError:
        return False
    return isinstance(obj, Model) and isinstance(getattr(obj, "model", None), nn.Module)


def load_model(source: str | os.PathLike) -> nn.Module:
    """Build the task model (e.g. ``DetectionModel``) from an ultralytics YAML (no weights) or load a ``.pt``.

    Loading a ``.pt`` unpickles it (``weights_only=False`` inside ultralytics): only use trusted files.
    """
    try:
        from ultralytics import RTDETR, YOLO
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("loading ultralytics models needs ultralytics: pip install 'orepa-convert[yolo]'") from exc
    wrapper = RTDETR if "rtdetr" in Path(source).name.lower() else YOLO
    model = wrapper(str(source)).model
    if not isinstance(model, nn.Module):
        raise ValueError(f"{source} did not give an ultralytics model")
    return model


def is_shipped_yaml(name: str) -> bool:
    """Whether ultralytics ships a model config for ``name`` (e.g. ``yolov8n`` or ``yolo11s-seg.yaml``)."""
    try:
        from ultralytics.nn.tasks import yaml_model_load
    except ImportError:
        return False
    stem = name[:-5] if name.endswith(".yaml") else name
    try:
        yaml_model_load(f"{stem}.yaml")
    except (FileNotFoundError, OSError, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------------- the record


def make_spec(config: Any, converted_paths: list[str]) -> dict[str, Any]:
    """The conversion record stored in ``model.yaml["orepa"]``: block config and the exact converted paths."""
    return {
        "format": SPEC_FORMAT,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.to_dict().items() if k in _SPEC_CONFIG_FIELDS},
        "paths": list(converted_paths),
    }


def spec_of(obj: Any) -> dict[str, Any] | None:
    """The conversion record of a model, a yaml dict or a yaml path, if it has one."""
    yaml = getattr(obj, "yaml", obj)
    if isinstance(yaml, (str, Path)) and str(yaml).endswith((".yaml", ".yml")):
        from ultralytics.nn.tasks import yaml_model_load

        try:
            yaml = yaml_model_load(yaml)
        except (FileNotFoundError, OSError):
            return None
    spec = yaml.get(OREPA_KEY) if isinstance(yaml, dict) else None
    if spec is not None and spec.get("format") != SPEC_FORMAT:
        raise ValueError(
            f"OREPA record format {spec.get('format')} is not supported by this orepa_convert (reads {SPEC_FORMAT})"
        )
    return spec


def has_blocks(model: Any) -> bool:
    from ..block import OREPAConv

    return isinstance(model, nn.Module) and any(isinstance(m, OREPAConv) for m in model.modules())


def apply_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Convert a freshly built plain task model exactly as recorded (same paths, same config and seeds)."""
    from ..config import OREPAConfig
    from ..convert import convert_to_orepa

    paths = spec.get("paths") or []
    config = OREPAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    _, report = convert_to_orepa(model, config, include=[glob.escape(p) for p in paths] or (), return_report=True)
    got = {r.path for r in report.records if r.status in ("converted", "already converted")}
    missing = sorted(set(paths) - got)
    if missing:
        raise RuntimeError(
            f"could not rebuild the OREPA structure: {len(missing)} recorded conv(s) are not eligible in this model "
            f"(first: {missing[0]}); was the checkpoint made with another architecture or ultralytics version?"
        )
    model.yaml[OREPA_KEY] = make_spec(config, sorted(got))
    return model


def record_conversion(wrapper: Any, config: Any, report: Any) -> None:
    """After ``convert_to_orepa(yolo)``: store the record in ``yolo.model.yaml`` and make this object OREPA-aware."""
    from ..report import ALREADY, CONVERTED

    model = wrapper.model
    paths = sorted(r.path for r in report.records if r.status in (CONVERTED, ALREADY))
    if not paths:
        return
    previous = spec_of(model)
    if not isinstance(getattr(model, "yaml", None), dict):
        model.yaml = {}
    if previous is None or report.converted:
        model.yaml[OREPA_KEY] = make_spec(config, paths)
    # else: an OREPA checkpoint converted again changes nothing and keeps its own record
    _make_orepa_aware(wrapper)


# ---------------------------------------------------------------------------------------------- trainers


class OREPATrainerMixin:
    """Mixed into each ultralytics task trainer; see the module docstring."""

    def __init__(self, cfg: Any = None, overrides: dict | None = None, _callbacks: Any = None) -> None:
        overrides = dict(overrides or {})
        self.orepa_spec = overrides.pop(OREPA_KEY, None)
        self._orepa_start = overrides.pop("orepa_start", None)
        if cfg is None:
            from ultralytics.utils import DEFAULT_CFG

            cfg = DEFAULT_CFG
        super().__init__(cfg, overrides, _callbacks)  # type: ignore[call-arg]

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        """Build the plain model, then load plain weights and convert, or convert and load OREPA weights."""
        if weights is None and self._orepa_start is not None and self.args.pretrained is not False:
            weights = self._orepa_start  # the in-memory model the user converted (e.g. built from a YAML)
        spec = self.orepa_spec or spec_of(weights) or spec_of(cfg)
        if spec is None:  # a plain model given to an OREPA trainer: convert every eligible conv with defaults
            from ..config import OREPAConfig

            spec = make_spec(OREPAConfig(), [])
        if isinstance(cfg, dict):
            cfg = {k: v for k, v in cfg.items() if k != OREPA_KEY}
        if has_blocks(weights):
            model = super().get_model(cfg=cfg, weights=None, verbose=verbose)  # type: ignore[misc]
            apply_spec(model, spec)
            _load_orepa_weights(model, weights)
        else:
            model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)  # type: ignore[misc]
            apply_spec(model, spec)
        return model

    def build_optimizer(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Ultralytics' optimizer, with every OREPA scale vector moved into a no-decay group (like BN weights)."""
        optimizer = super().build_optimizer(model, *args, **kwargs)  # type: ignore[misc]
        exempt_scales_from_weight_decay(optimizer, model)
        return optimizer

    def final_eval(self) -> None:
        """Validate a folded copy of ``best.pt`` (ultralytics fuses the model it validates; blocks must not be fused)."""
        best = self.best
        folded = best.with_name(f"{best.stem}_folded{best.suffix}")
        from ultralytics.utils import RANK

        if best.exists() and RANK in {-1, 0}:
            fold_checkpoint(best, folded)
        if not folded.exists():
            return super().final_eval()  # type: ignore[misc]
        self.best = folded
        try:
            super().final_eval()  # type: ignore[misc]
        finally:
            self.best = best
        if best.exists() and RANK in {-1, 0}:
            from ultralytics.utils.torch_utils import strip_optimizer

            strip_optimizer(best)


def _load_orepa_weights(model: nn.Module, weights: nn.Module) -> None:
    from ..block import OREPAConv

    source = weights.float().state_dict()
    target = model.state_dict()
    usable = {
        k: v for k, v in source.items()
        if k in target and v.shape == target[k].shape and (not k.endswith("_extra_state") or torch.equal(v, target[k]))
    }
    model.load_state_dict(usable, strict=False)
    block_keys = {f"{p}.{k}" for p, m in model.named_modules() if isinstance(m, OREPAConv) for k in m.state_dict()}
    missed = sorted(block_keys - set(usable))
    if missed:
        logger.warning(
            "OREPA: %d block tensor(s) were not in the checkpoint or changed shape (e.g. a head rebuilt for another "
            "number of classes) and keep their fresh initialisation; first: %s", len(missed), missed[0]
        )


def exempt_scales_from_weight_decay(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Move OREPA per-channel scales out of every param group with weight decay into a matching no-decay group."""
    from ..block import OREPAConv

    scales = {id(m.scales) for m in model.modules() if isinstance(m, OREPAConv)}
    moved = 0
    for group in list(optimizer.param_groups):
        if not group.get("weight_decay"):
            continue
        keep = [p for p in group["params"] if id(p) not in scales]
        out = [p for p in group["params"] if id(p) in scales]
        if not out:
            continue
        group["params"] = keep
        target = next(
            (g for g in optimizer.param_groups if not g.get("weight_decay") and g.get("lr") == group.get("lr")
             and g.get("param_group") == "bn" and not g.get("use_muon")),
            None,
        )
        if target is None:
            new = {k: v for k, v in group.items() if k != "params"}
            new.update(params=out, weight_decay=0.0, param_group="bn")
            if "use_muon" in group:
                new["use_muon"] = False
            optimizer.add_param_group(new)
        else:
            target["params"].extend(out)
        moved += len(out)
    return moved


def _trainer_classes() -> dict[str, type]:
    """Every task trainer of the installed ultralytics, by name."""
    found: dict[str, type] = {}
    for module in (
        "ultralytics.models.yolo.detect", "ultralytics.models.yolo.segment", "ultralytics.models.yolo.pose",
        "ultralytics.models.yolo.classify", "ultralytics.models.yolo.obb", "ultralytics.models.yolo.depth",
        "ultralytics.models.yolo.semantic", "ultralytics.models.yolo.world", "ultralytics.models.yolo.yoloe",
        "ultralytics.models.rtdetr",
    ):
        try:
            mod = importlib.import_module(module)
        except Exception:  # a task this ultralytics version does not have
            continue
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, type) and name.endswith("Trainer") and hasattr(obj, "get_model"):
                found[name] = obj
    return found


def _define_trainers() -> dict[type, type]:
    """``OREPA<Name>`` for each ultralytics trainer, defined at import so that they are importable by path."""
    made: dict[type, type] = {}
    try:
        classes = _trainer_classes()
    except ImportError:
        return made
    for name, base in classes.items():
        cls = type(f"OREPA{name}", (OREPATrainerMixin, base), {"__module__": __name__, "__doc__": f"{name} with OREPA."})
        globals()[cls.__name__] = cls
        made[base] = cls
    return made


_TRAINERS: dict[type, type] = _define_trainers()


def orepa_trainer(base: type) -> type:
    """The OREPA version of an ultralytics trainer class (``base`` itself if it already is one)."""
    if issubclass(base, OREPATrainerMixin):
        return base
    if base in _TRAINERS:
        return _TRAINERS[base]
    raise TypeError(
        f"no OREPA trainer for {base.__module__}.{base.__qualname__}; define one importable by module path as "
        f"`class MyTrainer(orepa_convert.integrations.ultralytics.OREPATrainerMixin, {base.__name__})`"
    )


# ---------------------------------------------------------------------------------------------- the YOLO object


class OREPAModelMixin:
    """Per-instance class of a converted ``YOLO`` object (see the module docstring)."""

    def train(self, trainer: type | None = None, **kwargs: Any) -> Any:
        base = trainer if trainer is not None else self._smart_load("trainer")  # type: ignore[attr-defined]
        kwargs.setdefault(OREPA_KEY, spec_of(self.model))  # type: ignore[attr-defined]
        if not self.ckpt and not kwargs.get("resume"):  # type: ignore[attr-defined]
            kwargs.setdefault("orepa_start", self.model)  # type: ignore[attr-defined]
        return super().train(trainer=orepa_trainer(base), **kwargs)  # type: ignore[misc]

    @contextmanager
    def _folded(self):
        from ..fold import fold_orepa

        original = self.model  # type: ignore[attr-defined]
        self.model = fold_orepa(copy.deepcopy(original))  # type: ignore[attr-defined]
        self.model.yaml = {k: v for k, v in getattr(self.model, "yaml", {}).items() if k != OREPA_KEY}
        try:
            yield
        finally:
            self.model = original  # type: ignore[attr-defined]

    def val(self, *args: Any, **kwargs: Any) -> Any:
        with self._folded():
            return super().val(*args, **kwargs)  # type: ignore[misc]

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self._folded():
            self.predictor = None  # type: ignore[attr-defined]  # never keep a predictor around a stale copy
            return super().predict(*args, **kwargs)  # type: ignore[misc]

    def export(self, *args: Any, **kwargs: Any) -> Any:
        with self._folded():
            return super().export(*args, **kwargs)  # type: ignore[misc]

    def benchmark(self, *args: Any, **kwargs: Any) -> Any:
        with self._folded():
            return super().benchmark(*args, **kwargs)  # type: ignore[misc]

    def fuse(self, *args: Any, **kwargs: Any) -> Any:
        from ..fold import fold_orepa

        fold_orepa(self)  # folding is what fusing an OREPA model means; afterwards this is a plain model
        return self.fuse(*args, **kwargs)  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=None)
def _orepa_class(base: type) -> type:
    cls = type(f"OREPA{base.__name__}", (OREPAModelMixin, base), {"__module__": __name__})
    globals()[cls.__name__] = cls
    return cls


def _make_orepa_aware(wrapper: Any) -> None:
    if not isinstance(wrapper, OREPAModelMixin):
        wrapper.__class__ = _orepa_class(type(wrapper))


def finish_fold(wrapper: Any) -> None:
    """After ``fold_orepa(yolo)``: fold the checkpoint the object carries, drop the record, restore the class."""
    from ..fold import fold_orepa

    model = wrapper.model
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml.pop(OREPA_KEY, None)
    ckpt = getattr(wrapper, "ckpt", None)
    if isinstance(ckpt, dict):
        for key in ("model", "ema"):
            if has_blocks(ckpt.get(key)):
                fold_orepa(ckpt[key])
                if isinstance(getattr(ckpt[key], "yaml", None), dict):
                    ckpt[key].yaml.pop(OREPA_KEY, None)
        ckpt.pop("optimizer", None)  # OREPA optimizer state does not fit the folded model
    if isinstance(wrapper, OREPAModelMixin):
        wrapper.__class__ = next(c for c in type(wrapper).__mro__[1:] if not issubclass(c, OREPAModelMixin))
    wrapper.predictor = None


# ---------------------------------------------------------------------------------------------- files


def fold_checkpoint(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Write a stock ultralytics checkpoint with every OREPA block of ``source`` folded (unpickles: trusted files only)."""
    from ..fold import fold_orepa

    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema") or ckpt.get("model"), nn.Module):
        raise ValueError(f"{source} is not an ultralytics checkpoint (a dict with a 'model' or 'ema' module)")
    model = ckpt.get("ema") or ckpt["model"]
    fold_orepa(model)
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml.pop(OREPA_KEY, None)
    ckpt.update(model=model, ema=None, optimizer=None, updates=None, scaler=None, epoch=-1)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=destination.parent, suffix=".pt")[1])
    torch.save(ckpt, tmp)
    tmp.replace(destination)
    return destination
