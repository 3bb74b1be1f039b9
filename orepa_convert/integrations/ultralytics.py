"""Ultralytics plugin: train, validate, predict, export and checkpoint OREPA models with the stock workflow.

The core imports this module only after the user has imported ultralytics. Nothing here is created at import
time beyond ordinary class statements, no class of a user object is changed, and no ultralytics function is
patched. How it hooks in:

- **Training.** ``convert_to_orepa(yolo)`` gives that one ``YOLO`` object a :class:`TrainerRouter` in place of
  its ``_smart_load`` lookup, so ``yolo.train()`` builds the OREPA version of the task's trainer
  (:class:`OREPADetectionTrainer`, ...: plain class statements, importable by path, which ultralytics' DDP
  launcher needs). An OREPA trainer rebuilds the OREPA structure whenever ultralytics rebuilds the model, from
  the conversion record (:mod:`orepa_convert.state`) of the model it starts from; it keeps the per-channel
  scales out of weight decay for every optimizer ultralytics builds. A multi-GPU launch hands its workers the
  model it built in a file (:class:`WorkerHandOff`), so every worker trains exactly the user's conversion.
- **Checkpoints stock tools can use.** The trainer saves the *folded* EMA model in ``last.pt``/``best.pt``, so
  ``yolo val/predict/export model=best.pt`` and ``YOLO("best.pt").train(...)`` work without orepa_convert
  (every tensor transfers: the file's model is the plain architecture). The OREPA training state rides along as
  a plain dict on that model (:func:`orepa_convert.state.fold_carrying_state`); ``resume=True``, our trainers
  and ``convert_to_orepa(YOLO("best.pt"))`` restore the exact OREPA model from it.
- **Inference on an unfolded model.** Ultralytics calls ``model.fuse()`` before it predicts, validates,
  exports or benchmarks, and uses what it returns. A converted task model gets a :class:`FoldedFuse` there:
  it returns a folded, fused copy, cached until a parameter or buffer changes, and leaves the OREPA model as it
  is. So ``predict``/``val`` cost what they cost on the folded model after the first call.
- ``fold_orepa(yolo)`` removes both, and folds the checkpoint the object carries, so ``yolo.save()`` is stock.

Loading a ``.pt`` unpickles it (``weights_only=False``, as ultralytics itself does): only load trusted files.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import tempfile
import weakref
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.engine.model import Model
from ultralytics.models.rtdetr.train import RTDETRTrainer
from ultralytics.models.yolo.classify import ClassificationTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.models.yolo.world import WorldTrainer
from ultralytics.nn.tasks import BaseModel

from ..block import OREPAConv
from ..config import OREPAConfig
from ..convert import convert_to_orepa
from ..errors import OREPAStateError
from ..fold import fold_orepa
from ..state import (
    carried_state,
    fold_carrying_state,
    fused_since_saved,
    orepa_state,
    restore_from_orepa_state,
    unfold_carried,
)
from ..surgery import CARRIED_ATTR, is_converted

logger = logging.getLogger(__name__)

LEGACY_KEY = "orepa"  # record format 1 lived in model.yaml["orepa"]; dropped wherever it is seen


# ---------------------------------------------------------------------------------------------- core hooks


def unwrap(obj: object) -> nn.Module | None:
    """The task model inside an ultralytics ``Model`` (``YOLO``, ``RTDETR``, ...)."""
    model = getattr(obj, "model", None)
    return model if isinstance(obj, Model) and isinstance(model, nn.Module) else None


def reload_changed(obj: object, root: nn.Module) -> nn.Module | None:
    """A ``YOLO`` object whose model carries its OREPA state but was fused in place since (ultralytics < 8.4 fuses
    the object's own model in ``val()``/``predict()``): load its checkpoint file (``pt_path``) again into the
    object and return that model; ``None`` when nothing was fused."""
    if not isinstance(obj, Model) or not fused_since_saved(root):
        return None
    path = getattr(root, "pt_path", None)
    if not path or not Path(path).is_file():
        return None  # unfold_carried then says to load the checkpoint again
    try:
        from ultralytics.nn.tasks import load_checkpoint as load
    except ImportError:  # ultralytics < 8.4
        from ultralytics.nn.tasks import attempt_load_one_weight as load  # type: ignore[attr-defined,no-redef]
    fresh, _ = load(path)
    if carried_state(fresh) is None or fused_since_saved(fresh):
        return None
    obj.model = fresh
    logger.info("OREPA: %s was fused in place by ultralytics; loaded %s again", type(root).__name__, path)
    return fresh


def after_convert(obj: object, root: nn.Module) -> None:
    """``root`` has OREPA blocks: give a task model its :class:`FoldedFuse`, a ``YOLO`` object its router."""
    if isinstance(root, BaseModel) and not isinstance(root.__dict__.get("fuse"), FoldedFuse):
        root.__dict__["fuse"] = FoldedFuse(root)
    if isinstance(obj, Model):
        if not isinstance(obj.__dict__.get("_smart_load"), TrainerRouter):
            obj.__dict__["_smart_load"] = TrainerRouter(obj)
        obj.predictor = None  # a cached predictor wraps the model as it was


def after_fold(obj: object, root: nn.Module) -> None:
    """``root`` has no blocks any more: drop what :func:`after_convert` added; fold the checkpoint ``obj`` carries."""
    if isinstance(root.__dict__.get("fuse"), FoldedFuse):
        del root.__dict__["fuse"]
    _drop_legacy_record(root)
    if not isinstance(obj, Model):
        return
    obj.__dict__.pop("_smart_load", None)
    ckpt = getattr(obj, "ckpt", None)
    if isinstance(ckpt, dict):
        for key in ("model", "ema"):
            if has_blocks(ckpt.get(key)):
                fold_orepa(ckpt[key])
        ckpt.pop("optimizer", None)  # OREPA optimizer state does not fit the folded model
    obj.predictor = None


def has_blocks(model: Any) -> bool:
    return isinstance(model, nn.Module) and is_converted(model)


def count_blocks(model: nn.Module) -> int:
    return sum(isinstance(m, OREPAConv) for m in model.modules())


def _drop_legacy_record(model: Any) -> None:
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml.pop(LEGACY_KEY, None)


# ---------------------------------------------------------------------------------------------- inference


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors keep no version counter


def _version_key(model: nn.Module) -> tuple:
    return tuple(
        (id(t), t.data_ptr(), _version(t), t.dtype, t.device) for t in chain(model.parameters(), model.buffers())
    )


class FoldedFuse:
    """Stands in for ``fuse`` on one unfolded ultralytics task model: returns a folded, fused copy (what
    ultralytics deploys), cached until a parameter or buffer of the model changes; the model itself stays OREPA.

    Ultralytics deep-copies the model before it validates. A deep copy shares this cache while its source is
    unchanged and its own tensors still equal the source's (compared by value: far cheaper than folding).
    Picklable (a pickled copy starts with an empty cache).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._shared: dict[str, Any] = {}  # {"key": version key, "folded": the deployable copy}
        self._source: weakref.ref[FoldedFuse] | None = None  # for a deep copy: the instance it was copied from
        self._source_key: tuple | None = None

    def _key(self) -> tuple:
        source = self._source() if self._source is not None else None
        if source is not None and source._key() == self._source_key:
            pairs = zip(
                chain(self.model.parameters(), self.model.buffers()),
                chain(source.model.parameters(), source.model.buffers()),
            )
            if all(a.shape == b.shape and torch.equal(a, b) for a, b in pairs):
                return self._source_key
        return _version_key(self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        key = self._key()
        if self._shared.get("key") != key:
            folded: Any = copy.deepcopy(self.model)
            fold_orepa(folded)  # removes the copy's FoldedFuse: fuse() below is ultralytics' own
            self._shared.clear()
            self._shared.update(key=key, folded=folded.fuse(*args, **kwargs))
        return self._shared["folded"]

    def __deepcopy__(self, memo: dict) -> FoldedFuse:
        new = FoldedFuse.__new__(FoldedFuse)
        memo[id(self)] = new
        new._shared, new._source, new._source_key = self._shared, weakref.ref(self), self._key()
        new.model = copy.deepcopy(self.model, memo)
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "_shared": {}, "_source": None, "_source_key": None}


# ---------------------------------------------------------------------------------------------- trainers


class OREPATrainerMixin:
    """Mixed into each ultralytics task trainer; see the module docstring."""

    model: Any  # the trainer's model (ultralytics' BaseTrainer sets it)

    def __init__(
        self,
        cfg: Any = None,
        overrides: dict | None = None,
        _callbacks: Any = None,
        orepa_start: nn.Module | None = None,
    ) -> None:
        overrides = {k: v for k, v in (overrides or {}).items() if k != LEGACY_KEY}
        self._orepa_start = orepa_start  # the in-memory model the user converted (e.g. built from a YAML)
        self._orepa_handoff: WorkerHandOff | None = None
        if is_handoff_file(overrides.get("model")):  # a DDP worker: train exactly what the launching process built
            self._orepa_handoff = WorkerHandOff.read(overrides["model"])
            self._orepa_start = self._orepa_handoff.model
            overrides["model"] = self._orepa_handoff.user_model  # args, args.yaml and checkpoints name the user's model
        if cfg is None:
            from ultralytics.utils import DEFAULT_CFG

            cfg = DEFAULT_CFG
        super().__init__(cfg, overrides, _callbacks)  # type: ignore[call-arg]

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> Any:
        """Build the plain model, then load plain weights and convert, or convert as recorded and load OREPA weights.

        The conversion follows the record of the model training starts from (the OREPA weights, or the in-memory
        model the user converted, also with ``pretrained=False``, which only drops its weights); without one,
        every eligible conv is converted with the default config."""
        start = self._orepa_start
        if weights is None and start is not None and self.args.pretrained is not False:  # type: ignore[attr-defined]
            weights = start
        if isinstance(weights, nn.Module) and carried_state(weights) is not None:
            weights = unfold_carried(copy.deepcopy(weights))  # a folded OREPA checkpoint: its trained blocks
        if isinstance(cfg, dict):
            cfg = {k: v for k, v in cfg.items() if k != LEGACY_KEY}
        if has_blocks(weights):
            model = super().get_model(cfg=cfg, weights=None, verbose=verbose)  # type: ignore[misc]
            restore_from_orepa_state(model, orepa_state(weights))
            _load_orepa_weights(model, weights)
        else:  # plain weights (or none): convert as the start model was converted, else with the default config
            model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)  # type: ignore[misc]
            if has_blocks(start):
                restore_from_orepa_state(model, orepa_state(start))
            else:
                convert_to_orepa(model, OREPAConfig())
        _drop_legacy_record(model)
        return model

    def setup_model(self) -> Any:
        """Ultralytics' model set-up; a DDP worker takes the model the launching process handed over as it is."""
        handoff = self._orepa_handoff
        if handoff is None:
            return super().setup_model()  # type: ignore[misc]
        self.args.model = handoff.user_model  # type: ignore[attr-defined]  # old worker scripts set it to the file
        self.model = handoff.model
        return None

    def train(self) -> Any:
        """Ultralytics' training. A process about to launch multi-GPU workers first builds the model they must
        train, exactly as a single process would, and hands it to them in a file (:class:`WorkerHandOff`)."""
        handoff = self._hand_off_to_workers() if self.launches_workers() else None
        try:
            return super().train()  # type: ignore[misc]
        finally:
            if handoff is not None:
                self.args.model = handoff.user_model  # type: ignore[attr-defined]
                handoff.remove()

    def launches_workers(self) -> bool:
        """Whether ``train()`` will start DDP worker processes (this is the launching process of a multi-GPU run)."""
        if "LOCAL_RANK" in os.environ:
            return False
        if hasattr(self, "ddp"):  # ultralytics >= 8.4 decides in __init__
            return bool(self.ddp)
        return _world_size(self.args.device) > 1  # type: ignore[attr-defined]  # < 8.4 decides in train()

    def _hand_off_to_workers(self) -> WorkerHandOff | None:
        """Build the model this run trains (what a single process would build: the user's conversion and
        weights, ``pretrained`` applied), write it for the workers and point ``args.model`` at the file.

        Workers are rebuilt from the trainer's arguments: older ultralytics (8.3.0, 8.4.100) passes nothing else,
        newer (8.4.190) also passes ``trainer.model``, which for a model built from a YAML is still its file name. So the
        arguments must name the model, and the file lives outside the run folder, which the launch deletes.
        A resumed run needs nothing: its checkpoint carries the OREPA state."""
        if self.resume:  # type: ignore[attr-defined]
            return None
        given = self.model  # type: ignore[has-type]
        built = given if isinstance(given, nn.Module) else None
        if built is None:
            self.setup_model()
            built, self.model = self.model, given  # type: ignore[has-type]
        if not has_blocks(built):
            return None
        handoff = WorkerHandOff.write(built, user_model=self.args.model)  # type: ignore[attr-defined]
        self.args.model = str(handoff.path)  # type: ignore[attr-defined]
        logger.info("OREPA: DDP workers start from %s (%d blocks)", handoff.path, count_blocks(built))
        return handoff

    def build_optimizer(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Ultralytics' optimizer, with every OREPA scale vector moved into a no-decay group (like BN weights)."""
        optimizer = super().build_optimizer(model, *args, **kwargs)  # type: ignore[misc]
        exempt_scales_from_weight_decay(optimizer, model)
        keep_muon_to_shapes_it_takes(optimizer)
        return optimizer

    def save_model(self) -> Any:
        """Ultralytics' checkpoints, holding the folded EMA model that carries its OREPA training state."""
        live = self.ema.ema  # type: ignore[attr-defined]
        self.ema.ema = fold_carrying_state(live, torch.half)  # type: ignore[attr-defined]  # ultralytics saves fp16
        try:
            return super().save_model()  # type: ignore[misc]
        finally:
            self.ema.ema = live  # type: ignore[attr-defined]

    def resume_training(self, ckpt: dict | None) -> Any:
        """Resume from a checkpoint of ours: the EMA state is the OREPA model the folded one carries."""
        ema = ckpt.get("ema") if isinstance(ckpt, dict) else None
        if isinstance(ckpt, dict) and isinstance(ema, nn.Module) and carried_state(ema) is not None:
            ckpt = {**ckpt, "ema": unfold_carried(copy.deepcopy(ema))}
        return super().resume_training(ckpt)  # type: ignore[misc]


def _world_size(device: Any) -> int:
    """The number of processes ultralytics < 8.4 trains on for ``device`` (its ``BaseTrainer.train`` rule)."""
    if isinstance(device, str) and device:
        return len(device.split(","))
    if isinstance(device, (tuple, list)):
        return len(device)
    if device in ("cpu", "mps"):
        return 0
    return 1 if torch.cuda.is_available() else 0


def _load_orepa_weights(model: nn.Module, weights: nn.Module) -> None:
    source = weights.float().state_dict()
    target = model.state_dict()
    usable = {
        k: v
        for k, v in source.items()
        if k in target and v.shape == target[k].shape and (not k.endswith("_extra_state") or torch.equal(v, target[k]))
    }
    model.load_state_dict(usable, strict=False)
    block_keys = {f"{p}.{k}" for p, m in model.named_modules() if isinstance(m, OREPAConv) for k in m.state_dict()}
    missed = sorted(block_keys - set(usable))
    if missed:
        logger.warning(
            "OREPA: %d block tensor(s) were not in the checkpoint or changed shape (e.g. a head rebuilt for another "
            "number of classes) and keep their fresh initialisation; first: %s",
            len(missed),
            missed[0],
        )


def exempt_scales_from_weight_decay(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Move OREPA per-channel scales out of every param group with weight decay into a matching no-decay group."""
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
            (
                g
                for g in optimizer.param_groups
                if not g.get("weight_decay")
                and g.get("lr") == group.get("lr")
                and g.get("param_group") == "bn"
                and not g.get("use_muon")
            ),
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


@functools.cache
def _muon_takes(ndim: int) -> bool:
    """Whether this ultralytics' Muon update handles a tensor of ``ndim`` dimensions (8.4.100 asserts 2-D after
    flattening only 4-D conv filters; later versions flatten any rank)."""
    try:
        from ultralytics.optim.muon import muon_update
    except ImportError:
        return False
    try:
        muon_update(torch.ones((2,) * ndim), torch.zeros((2,) * ndim))
    except (AssertionError, RuntimeError, ValueError, TypeError):
        return False
    return True


def keep_muon_to_shapes_it_takes(optimizer: torch.optim.Optimizer) -> int:
    """Move tensors this ultralytics' MuSGD cannot orthogonalise (OREPA's 3-D branch weights on older versions)
    from its Muon groups into the same settings' SGD part (``use_muon=False``); returns how many moved."""
    moved = 0
    for group in list(optimizer.param_groups):
        if not group.get("use_muon"):
            continue
        out = [p for p in group["params"] if not _muon_takes(p.ndim)]
        if not out:
            continue
        group["params"] = [p for p in group["params"] if _muon_takes(p.ndim)]
        optimizer.add_param_group(
            {**{k: v for k, v in group.items() if k != "params"}, "params": out, "use_muon": False}
        )
        moved += len(out)
    return moved


class OREPADetectionTrainer(OREPATrainerMixin, DetectionTrainer):
    """``DetectionTrainer`` with OREPA."""


class OREPASegmentationTrainer(OREPATrainerMixin, SegmentationTrainer):
    """``SegmentationTrainer`` with OREPA."""


class OREPAPoseTrainer(OREPATrainerMixin, PoseTrainer):
    """``PoseTrainer`` with OREPA."""


class OREPAClassificationTrainer(OREPATrainerMixin, ClassificationTrainer):
    """``ClassificationTrainer`` with OREPA."""


class OREPAOBBTrainer(OREPATrainerMixin, OBBTrainer):
    """``OBBTrainer`` with OREPA."""


class OREPARTDETRTrainer(OREPATrainerMixin, RTDETRTrainer):
    """``RTDETRTrainer`` with OREPA."""


class OREPAWorldTrainer(OREPATrainerMixin, WorldTrainer):
    """``WorldTrainer`` with OREPA."""


#: ultralytics trainer -> its OREPA version
TRAINERS: dict[type, type] = {
    DetectionTrainer: OREPADetectionTrainer,
    SegmentationTrainer: OREPASegmentationTrainer,
    PoseTrainer: OREPAPoseTrainer,
    ClassificationTrainer: OREPAClassificationTrainer,
    OBBTrainer: OREPAOBBTrainer,
    RTDETRTrainer: OREPARTDETRTrainer,
    WorldTrainer: OREPAWorldTrainer,
}


def orepa_trainer(base: type) -> type:
    """The OREPA version of an ultralytics trainer class (``base`` itself if it already is one)."""
    if issubclass(base, OREPATrainerMixin):
        return base
    if base in TRAINERS:
        return TRAINERS[base]
    raise TypeError(
        f"no OREPA trainer for {base.__module__}.{base.__qualname__}; define one importable by module path, "
        f"`class MyTrainer(orepa_convert.integrations.ultralytics.OREPATrainerMixin, {base.__name__})`, and pass "
        f"it: model.train(trainer=MyTrainer, ...)"
    )


class TrainerRouter:
    """Stands in for ``_smart_load`` on one converted ``YOLO`` object: the trainer it finds is the OREPA
    version, started from the object's in-memory OREPA model (its conversion is kept with ``pretrained=False``,
    whether the object was built from a YAML or loaded from a checkpoint)."""

    def __init__(self, wrapper: Model) -> None:
        self.wrapper = wrapper

    def __call__(self, key: str) -> Any:
        found = type(self.wrapper)._smart_load(self.wrapper, key)
        if key != "trainer":
            return found
        start = self.wrapper.model if has_blocks(self.wrapper.model) else None
        return functools.partial(orepa_trainer(found), orepa_start=start)


# ---------------------------------------------------------------------------------------------- files


HANDOFF_SUFFIX = ".orepa-ddp-start.pt"


def is_handoff_file(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and str(model).endswith(HANDOFF_SUFFIX)


class WorkerHandOff:
    """The model a multi-GPU run trains, passed from the launching process to its DDP workers in a file.

    The file sits beside ultralytics' own worker scripts (``USER_CONFIG_DIR/DDP``), outside the run folder,
    holds the model folded and carrying its OREPA state (exact float32 weights) and the model name the user gave,
    and is removed by the launching process when the workers are done."""

    def __init__(self, path: Path, model: nn.Module, user_model: Any) -> None:
        self.path, self.model, self.user_model = path, model, user_model

    @classmethod
    def write(cls, model: nn.Module, user_model: Any) -> WorkerHandOff:
        from ultralytics.utils import USER_CONFIG_DIR

        folder = Path(USER_CONFIG_DIR) / "DDP"
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix="_orepa_", suffix=HANDOFF_SUFFIX)
        os.close(fd)
        path = Path(name)
        torch.save({"model": fold_carrying_state(model), "user_model": user_model}, path)
        return cls(path, model, user_model)

    @classmethod
    def read(cls, path: str | os.PathLike) -> WorkerHandOff:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"OREPA: the model handed to this DDP worker is gone ({path}); the launching process removes it "
                f"when its workers end: start the run again from the launching process"
            )
        data = torch.load(path, map_location="cpu", weights_only=False)  # written by this process' launcher
        return cls(path, unfold_carried(data["model"]), data["user_model"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def fold_checkpoint(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Write a stock ultralytics checkpoint of ``source`` with no OREPA blocks and no OREPA state (unpickles:
    trusted files only). Reads checkpoints that carry their OREPA state (folded) and unfolded ones (record format 1)."""
    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema") or ckpt.get("model"), nn.Module):
        raise OREPAStateError(f"{source} is not an ultralytics checkpoint (a dict with a 'model' or 'ema' module)")
    model = ckpt.get("ema") or ckpt["model"]
    model.__dict__.pop(CARRIED_ATTR, None)
    if has_blocks(model):
        fold_orepa(model)
    _drop_legacy_record(model)
    ckpt.update(model=model, ema=None, optimizer=None, updates=None, scaler=None, epoch=-1)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=destination.parent, suffix=".pt")[1])
    torch.save(ckpt, tmp)
    tmp.replace(destination)
    return destination
