"""Train or fine-tune a timm model with OREPA on an ImageFolder dataset, then fold it into a stock timm model.

    python recipes/timm_orepa.py --model resnet18 --data-dir DATA --epochs 10 --output runs/timm
    torchrun --nproc_per_node 2 recipes/timm_orepa.py --model resnet18 --data-dir DATA --device cpu   # DDP (gloo)
    python recipes/timm_orepa.py ... --resume runs/timm/last.pth
    orepa-convert train --timm resnet18 --data-dir DATA ...   # the same recipe, installed with the package

From Python: ``train_timm(TimmRecipe(model="resnet18", data_dir="DATA", epochs=10))`` returns the run's summary.

``--plain`` (``plain=True``) trains the same model without OREPA (the baseline of ``orepa-convert compare --timm``). With a
``test/`` split in DATA the final model is also evaluated on it (``test_acc`` in ``summary.json``).

DATA holds ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``. The recipe uses timm's building blocks:
``create_model``, ``create_dataset`` / ``create_loader`` (timm transforms, distributed sampler under torchrun),
``create_optimizer_v2`` (weight decay skips every 1-D tensor, so the OREPA scale vectors and norm weights get
none), ``create_scheduler_v2`` and ``ModelEmaV3``. Plain weights given with ``--pretrained-checkpoint`` load
before the (function-preserving) conversion. After training it folds the model, checks that the folded
accuracy equals the unfolded accuracy, and writes to OUTPUT (rank 0 only):

- ``folded.pth``: a plain state_dict for ``timm.create_model(NAME, num_classes=N, checkpoint_path=...)``;
- ``last.pth``: a resumable OREPA checkpoint (model, optimizer, scheduler, epoch, EMA, conversion record);
- ``model.onnx``: an ONNX export of the folded model (checked with onnxruntime when installed).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..block import OREPAConv
from ..config import INITS, Init, OREPAConfig
from ..convert import convert_to_orepa
from ..errors import OREPAError, RecipeError
from ..fold import fold_orepa
from ..state import STATE_KEY, restore_from_orepa_state, save
from ..surgery import is_converted


@dataclass(frozen=True)
class TimmRecipe:
    """One run of the recipe: every option, as the command line's flags name them (``--data-dir``: ``data_dir``).

    ``orepa_options`` are :class:`~orepa_convert.OREPAConfig` block fields for the conversion (e.g.
    ``{"live_scale": 0.25}``); ``plain`` trains without OREPA; ``resume`` is a ``last.pth`` this recipe wrote.
    """

    data_dir: str
    model: str = "resnet18"
    epochs: int = 10
    batch_size: int = 32
    img_size: int = 224
    device: str = "auto"
    output: str = "runs/timm_orepa"
    pretrained_checkpoint: str | None = None
    init: Init = "preserve"
    orepa_options: dict[str, Any] = field(default_factory=dict)
    plain: bool = False
    resume: str | None = None
    amp: bool = False
    model_ema: bool = False
    model_ema_decay: float = 0.998
    sync_bn: bool = False
    opt: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    workers: int = 0
    scale_min: float = 0.08
    hflip: float = 0.5
    seed: int = 0
    torchcompile: str | None = None

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise RecipeError(f"init={self.init!r} is not one of {list(INITS)}")
        for name in ("epochs", "batch_size", "img_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.plain:
            self.orepa_config()  # a bad option fails here, before any data is read

    def orepa_config(self) -> OREPAConfig:
        """The conversion's config: ``init``, ``seed`` and ``orepa_options``."""
        try:
            return OREPAConfig(init=self.init, seed=self.seed, **self.orepa_options)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"orepa_options={self.orepa_options!r}: {exc}") from None

    def with_options(self, options: dict[str, Any]) -> TimmRecipe:
        """A copy with ``options`` (field names, or ``batch`` / ``imgsz`` as ultralytics calls them) set, each
        value read as its field's type; ``None`` and ``False`` leave a field as it is."""
        settable = {f.name for f in dataclasses.fields(self)} - _NOT_OPTIONS
        changes: dict[str, Any] = {}
        for key, value in options.items():
            name = _ALIASES.get(key, key)
            if name not in settable:
                raise RecipeError(f"the timm recipe has no option {key!r}; its options: {', '.join(sorted(settable))}")
            if value is None or value is False:
                continue
            default = getattr(self, name)
            kind = type(default) if default is not None else str
            if kind is bool and value is not True:
                raise RecipeError(f"timm recipe option {key}={value!r}: expected True or False")
            try:
                changes[name] = kind(value)
            except (TypeError, ValueError):
                raise RecipeError(f"timm recipe option {key}={value!r}: expected {kind.__name__}") from None
        return dataclasses.replace(self, **changes)


#: fields a run's options do not set (the data, where results go, and the block options, which have their own form)
_NOT_OPTIONS = {"data_dir", "output", "orepa_options"}
#: ultralytics' names of recipe options (as ``compare --train-arg`` may give them)
_ALIASES = {"batch": "batch_size", "imgsz": "img_size"}


def _setup_distributed(device_arg: str) -> tuple[torch.device, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local}" if cuda and world > 1 else ("cuda" if cuda else "cpu"))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(device)
    return device, rank, world


def _load_plain_weights(model: nn.Module, path: str) -> None:
    state: Any = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    model.load_state_dict(usable, strict=False)
    if skipped:
        print(f"pretrained checkpoint: skipped {len(skipped)} tensors with another shape or name (e.g. {skipped[0]})")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy and the concatenated logits over the whole loader."""
    model.eval()
    logits = []
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        logits.append(out.float().cpu())
        correct += (out.argmax(1) == y).sum().item()
        total += y.numel()
    return correct / max(total, 1), torch.cat(logits)


def build(recipe: TimmRecipe, num_classes: int, record: dict | None = None) -> tuple[nn.Module, int]:
    """The timm model, converted (or, when resuming, converted exactly as ``record`` says); its block count."""
    import timm

    torch.manual_seed(recipe.seed)
    model = timm.create_model(recipe.model, pretrained=False, num_classes=num_classes)
    if record is not None:
        restore_from_orepa_state(model, record)
    else:
        if recipe.pretrained_checkpoint:
            _load_plain_weights(model, recipe.pretrained_checkpoint)
        if not recipe.plain:
            convert_to_orepa(model, recipe.orepa_config())
    return model, sum(isinstance(m, OREPAConv) for m in model.modules())


def train_timm(recipe: TimmRecipe) -> dict[str, Any]:
    """Run ``recipe``: train, fold, check, export. Returns the run's summary (also ``summary.json`` in
    ``recipe.output``, rank 0); ``summary["checks_passed"]`` says whether the folded model matched the unfolded
    one (accuracy equal, fold error <= 1e-5, ONNX error <= 1e-4)."""
    from timm.data import create_dataset, create_loader
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, random_seed
    from tqdm import tqdm

    device, rank, world = _setup_distributed(recipe.device)
    # timm's transforms draw from Python's and NumPy's generators: seed them as timm's train.py does, so that a
    # run (and every variant of a comparison seed) sees the same augmentations
    random_seed(recipe.seed, rank)
    main_process = rank == 0
    out_dir = Path(recipe.output)
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    train_set = create_dataset("", root=recipe.data_dir, split="train", is_training=True)
    val_set = create_dataset("", root=recipe.data_dir, split="val")
    num_classes = len(train_set.reader.class_to_idx)
    loader_args: dict[str, Any] = dict(
        input_size=(3, recipe.img_size, recipe.img_size),
        batch_size=recipe.batch_size,
        num_workers=recipe.workers,
        use_prefetcher=False,
        device=device,
        persistent_workers=False,
    )
    augment: dict[str, Any] = dict(scale=(recipe.scale_min, 1.0), hflip=recipe.hflip)
    train_loader = create_loader(train_set, is_training=True, distributed=world > 1, **augment, **loader_args)
    if len(train_loader) == 0:  # the training loader drops the last incomplete batch
        raise RecipeError(
            f"{len(train_set)} training images make no full batch of {recipe.batch_size} per process ({world} "
            f"process(es)): nothing would be trained; lower the batch size (--batch-size)"
        )
    val_loader = create_loader(val_set, is_training=False, distributed=False, crop_pct=1.0, **loader_args)

    resume = torch.load(recipe.resume, map_location="cpu", weights_only=True) if recipe.resume else None
    if resume is not None and STATE_KEY not in resume:
        raise RecipeError(
            f"{recipe.resume} has no OREPA record ('{STATE_KEY}'): resume from a last.pth this recipe wrote"
        )
    model, converted = build(recipe, num_classes, resume[STATE_KEY] if resume else None)
    if main_process:
        print(
            f"OREPA: converted {converted} convs of {recipe.model}"
            if not recipe.plain
            else f"plain {recipe.model} (no OREPA)"
        )
    model.to(device)
    if recipe.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = create_optimizer_v2(model, opt=recipe.opt, lr=recipe.lr * world, weight_decay=recipe.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=recipe.epochs, warmup_epochs=recipe.warmup_epochs
    )
    ema = ModelEmaV3(model, decay=recipe.model_ema_decay) if recipe.model_ema else None
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["orepa_model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if ema is not None and resume.get("ema") is not None:
            ema.module.load_state_dict(resume["ema"])
        start_epoch = resume["epoch"] + 1
    train_model: Any = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if recipe.torchcompile:
        train_model = torch.compile(train_model, backend=recipe.torchcompile)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.amp and device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        if world > 1:
            train_loader.sampler.set_epoch(epoch)
        t0 = time.time()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not main_process, leave=False)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=recipe.amp):
                loss = loss_fn(train_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        scheduler.step(epoch + 1)
        acc, _ = evaluate(ema.module if ema is not None else model, val_loader, device)
        history.append({"epoch": epoch, "val_acc": acc, "seconds": time.time() - t0})
        if main_process:
            print(f"epoch {epoch + 1}/{recipe.epochs}: val top-1 {acc:.4f} ({time.time() - t0:.1f}s)")
            # the record, the OREPA weights and the folded plain weights ("state_dict", which stock timm loads)
            save(
                model,
                out_dir / "last.pth",
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                epoch=epoch,
                ema=ema.module.state_dict() if ema is not None else None,
                args=dataclasses.asdict(recipe),
            )

    final = copy.deepcopy(ema.module if ema is not None else model).eval()
    acc_orepa, logits_orepa = evaluate(final, val_loader, device)
    if not recipe.plain:
        fold_orepa(final)
    if is_converted(final):
        raise OREPAError(
            f"folding left {sum(isinstance(m, OREPAConv) for m in final.modules())} OREPA block(s) in the final model"
        )
    acc_folded, logits_folded = evaluate(final, val_loader, device)
    rel = ((logits_folded - logits_orepa).abs().max() / logits_orepa.abs().max().clamp_min(1e-12)).item()
    summary: dict[str, Any] = {
        "model": recipe.model,
        "num_classes": num_classes,
        "converted": converted,
        "val_acc_orepa": acc_orepa,
        "val_acc_folded": acc_folded,
        "fold_rel_err": rel,
        "history": history,
        "world_size": world,
        "compiled": recipe.torchcompile,
    }
    if (Path(recipe.data_dir) / "test").is_dir():
        test_set = create_dataset("", root=recipe.data_dir, split="test")
        summary["test_acc"], _ = evaluate(
            final, create_loader(test_set, is_training=False, distributed=False, crop_pct=1.0, **loader_args), device
        )
    ok = acc_folded == acc_orepa and rel <= 1e-5
    if main_process:
        torch.save({k: v.detach().cpu() for k, v in final.state_dict().items()}, out_dir / "folded.pth")
        onnx_path = out_dir / "model.onnx"
        dummy = torch.randn(1, 3, recipe.img_size, recipe.img_size, device=device)
        torch.onnx.export(
            final, (dummy,), str(onnx_path), dynamo=False, input_names=["images"], output_names=["logits"]
        )
        try:
            import onnxruntime as ort

            ort_out = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
                None, {"images": dummy.cpu().numpy()}
            )[0]
            with torch.no_grad():
                ref = final(dummy).float().cpu().numpy()
            summary["onnx_rel_err"] = float(abs(ort_out - ref).max() / abs(ref).max())
            ok = ok and summary["onnx_rel_err"] <= 1e-4
        except ImportError:
            summary["onnx_rel_err"] = None
    summary["checks_passed"] = ok
    if main_process:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"folded: val top-1 {acc_folded:.4f} (unfolded {acc_orepa:.4f}), fold error {rel:.2e}")
        print(f"wrote {out_dir / 'folded.pth'}, {out_dir / 'last.pth'}, {out_dir / 'model.onnx'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def parser() -> argparse.ArgumentParser:
    """The recipe's command line; each flag sets the :class:`TimmRecipe` field of its name."""
    d = TimmRecipe(data_dir="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="timm model name (built with random weights)")
    p.add_argument("--data-dir", required=True, help="folder with train/ and val/ ImageFolder splits")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--img-size", type=int, default=d.img_size)
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--output", default=d.output)
    p.add_argument("--pretrained-checkpoint", help="a plain timm state_dict to start from (loaded before conversion)")
    p.add_argument("--init", choices=list(INITS), default=d.init)
    p.add_argument(
        "--orepa-option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="an OREPAConfig block field for the conversion, e.g. live_scale=0.25 (repeatable)",
    )
    p.add_argument("--plain", action="store_true", help="train without OREPA (the baseline of a comparison)")
    p.add_argument("--resume", help="an OREPA checkpoint written by this recipe (last.pth)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--model-ema", action="store_true", help="keep a timm ModelEmaV3 copy; validate and export it")
    p.add_argument("--model-ema-decay", type=float, default=d.model_ema_decay)
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP (CUDA)")
    p.add_argument("--opt", default=d.opt)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument(
        "--scale-min",
        type=float,
        default=d.scale_min,
        help="smallest area fraction of the random resized crop (timm: 0.08)",
    )
    p.add_argument("--hflip", type=float, default=d.hflip, help="horizontal flip probability (timm: 0.5)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--torchcompile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the training model (as timm's train.py; default backend inductor); "
        "evaluation, EMA and folding use the eager model",
    )
    return p


def recipe_from_args(argv: list[str] | None = None) -> TimmRecipe:
    """The :class:`TimmRecipe` a command line asks for (argparse's usage error for a malformed one)."""
    from ..compare.variants import parse_variant

    p = parser()
    args = vars(p.parse_args(argv))
    words = args.pop("orepa_option")
    try:
        options = dict(parse_variant(f"{args['init']}:{','.join(words)}")[1]) if words else {}
        return TimmRecipe(orepa_options=options, **args)
    except OREPAError as exc:
        p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    """The command line: exit 0 when the run's checks pass, 1 when they fail, 2 (one line on stderr) when the
    options cannot run."""
    recipe = recipe_from_args(argv)
    try:
        summary = train_timm(recipe)
    except OREPAError as exc:
        print(f"timm recipe: error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
