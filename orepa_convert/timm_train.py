"""Train or fine-tune a timm model with OREPA on an ImageFolder dataset, then fold it into a stock timm model.

    python recipes/timm_orepa.py --model resnet18 --data-dir DATA --epochs 10 --output runs/timm
    torchrun --nproc_per_node 2 recipes/timm_orepa.py --model resnet18 --data-dir DATA --device cpu   # DDP (gloo)
    python recipes/timm_orepa.py ... --resume runs/timm/last.pth
    python -m orepa_convert.timm_train ...   # the same recipe, installed with the package

``--plain`` trains the same model without OREPA (the baseline of ``orepa-convert compare --timm``). With a
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
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from orepa_convert import OREPAConfig, OREPAConv, convert_to_orepa, fold_orepa, restore_from_orepa_state, save
from orepa_convert.compare.variants import parse_variant
from orepa_convert.config import INITS
from orepa_convert.errors import OREPAError
from orepa_convert.state import STATE_KEY
from orepa_convert.surgery import is_converted


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


def build(args: argparse.Namespace, num_classes: int, record: dict | None = None) -> tuple[nn.Module, int]:
    """The timm model, converted (or, when resuming, converted exactly as ``record`` says); its block count."""
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, num_classes=num_classes)
    if record is not None:
        restore_from_orepa_state(model, record)
    else:
        if args.pretrained_checkpoint:
            _load_plain_weights(model, args.pretrained_checkpoint)
        if not args.plain:
            options = dict(parse_variant(f"{args.init}:{','.join(args.orepa_option)}")[1]) if args.orepa_option else {}
            convert_to_orepa(model, OREPAConfig(init=args.init, seed=args.seed, **options))
    return model, sum(isinstance(m, OREPAConv) for m in model.modules())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="timm model name (built with random weights)")
    parser.add_argument("--data-dir", required=True, help="folder with train/ and val/ ImageFolder splits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--output", default="runs/timm_orepa")
    parser.add_argument(
        "--pretrained-checkpoint", help="a plain timm state_dict to start from (loaded before conversion)"
    )
    parser.add_argument("--init", choices=list(INITS), default="preserve")
    parser.add_argument(
        "--orepa-option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="an OREPAConfig block field for the conversion, e.g. live_scale=0.25 (repeatable)",
    )
    parser.add_argument("--plain", action="store_true", help="train without OREPA (the baseline of a comparison)")
    parser.add_argument("--resume", help="an OREPA checkpoint written by this recipe (last.pth)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--model-ema", action="store_true", help="keep a timm ModelEmaV3 copy; validate and export it")
    parser.add_argument("--model-ema-decay", type=float, default=0.998)
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP (CUDA)")
    parser.add_argument("--opt", default="sgd")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--warmup-epochs", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument(
        "--scale-min", type=float, default=0.08, help="smallest area fraction of the random resized crop (timm: 0.08)"
    )
    parser.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (timm: 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torchcompile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the training model (as timm's train.py; default backend inductor); "
        "evaluation, EMA and folding use the eager model",
    )
    args = parser.parse_args(argv)

    from timm.data import create_dataset, create_loader
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, random_seed
    from tqdm import tqdm

    device, rank, world = _setup_distributed(args.device)
    # timm's transforms draw from Python's and NumPy's generators: seed them as timm's train.py does, so that a
    # run (and every variant of a comparison seed) sees the same augmentations
    random_seed(args.seed, rank)
    main_process = rank == 0
    out_dir = Path(args.output)
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    train_set = create_dataset("", root=args.data_dir, split="train", is_training=True)
    val_set = create_dataset("", root=args.data_dir, split="val")
    num_classes = len(train_set.reader.class_to_idx)
    loader_args = dict(
        input_size=(3, args.img_size, args.img_size),
        batch_size=args.batch_size,
        num_workers=args.workers,
        use_prefetcher=False,
        device=device,
        persistent_workers=False,
    )
    augment = dict(scale=(args.scale_min, 1.0), hflip=args.hflip)
    train_loader = create_loader(train_set, is_training=True, distributed=world > 1, **augment, **loader_args)
    if len(train_loader) == 0:  # the training loader drops the last incomplete batch
        parser.error(
            f"{len(train_set)} training images make no full batch of --batch-size {args.batch_size} per "
            f"process ({world} process(es)): nothing would be trained; lower --batch-size"
        )
    val_loader = create_loader(val_set, is_training=False, distributed=False, crop_pct=1.0, **loader_args)

    resume = torch.load(args.resume, map_location="cpu", weights_only=True) if args.resume else None
    if resume is not None and STATE_KEY not in resume:
        parser.error(f"{args.resume} has no OREPA record ('{STATE_KEY}'): resume from a last.pth this recipe wrote")
    model, converted = build(args, num_classes, resume[STATE_KEY] if resume else None)
    if main_process:
        print(
            f"OREPA: converted {converted} convs of {args.model}"
            if not args.plain
            else f"plain {args.model} (no OREPA)"
        )
    model.to(device)
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr * world, weight_decay=args.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs
    )
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["orepa_model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if ema is not None and resume.get("ema") is not None:
            ema.module.load_state_dict(resume["ema"])
        start_epoch = resume["epoch"] + 1
    train_model: Any = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if args.torchcompile:
        train_model = torch.compile(train_model, backend=args.torchcompile)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(start_epoch, args.epochs):
        model.train()
        if world > 1:
            train_loader.sampler.set_epoch(epoch)
        t0 = time.time()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not main_process, leave=False)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
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
            print(f"epoch {epoch + 1}/{args.epochs}: val top-1 {acc:.4f} ({time.time() - t0:.1f}s)")
            # the record, the OREPA weights and the folded plain weights ("state_dict", which stock timm loads)
            save(
                model,
                out_dir / "last.pth",
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                epoch=epoch,
                ema=ema.module.state_dict() if ema is not None else None,
                args=vars(args),
            )

    final = copy.deepcopy(ema.module if ema is not None else model).eval()
    acc_orepa, logits_orepa = evaluate(final, val_loader, device)
    if not args.plain:
        fold_orepa(final)
    if is_converted(final):
        raise OREPAError(
            f"folding left {sum(isinstance(m, OREPAConv) for m in final.modules())} OREPA block(s) in the final model"
        )
    acc_folded, logits_folded = evaluate(final, val_loader, device)
    rel = ((logits_folded - logits_orepa).abs().max() / logits_orepa.abs().max().clamp_min(1e-12)).item()
    summary = {
        "model": args.model,
        "num_classes": num_classes,
        "converted": converted,
        "val_acc_orepa": acc_orepa,
        "val_acc_folded": acc_folded,
        "fold_rel_err": rel,
        "history": history,
        "world_size": world,
        "compiled": args.torchcompile,
    }
    if (Path(args.data_dir) / "test").is_dir():
        test_set = create_dataset("", root=args.data_dir, split="test")
        summary["test_acc"], _ = evaluate(
            final, create_loader(test_set, is_training=False, distributed=False, crop_pct=1.0, **loader_args), device
        )
    ok = acc_folded == acc_orepa and rel <= 1e-5
    if main_process:
        torch.save({k: v.detach().cpu() for k, v in final.state_dict().items()}, out_dir / "folded.pth")
        onnx_path = out_dir / "model.onnx"
        dummy = torch.randn(1, 3, args.img_size, args.img_size, device=device)
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
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"folded: val top-1 {acc_folded:.4f} (unfolded {acc_orepa:.4f}), fold error {rel:.2e}")
        print(f"wrote {out_dir / 'folded.pth'}, {out_dir / 'last.pth'}, {onnx_path}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
