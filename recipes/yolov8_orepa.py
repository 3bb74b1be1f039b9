"""Train an ultralytics YOLO model with OREPA, fold it, and check the deployable result end to end.

    python recipes/yolov8_orepa.py                                  # yolov8n.yaml on a generated dataset, offline
    python recipes/yolov8_orepa.py --model yolov8s.pt --data my_data.yaml --epochs 100 --imgsz 640 --device 0

Steps: convert (function-preserving by default) -> train with the real ultralytics trainer -> validate the OREPA
model (a folded copy) -> fold -> validate again (metrics must agree to 1e-4, outputs to 1e-5) -> save a stock
checkpoint -> export ONNX and compare onnxruntime with torch -> time plain / OREPA / folded inference.
With no --data a small synthetic dataset for the model's task is generated on disk, so it runs offline.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch

from orepa_convert import OREPAConv, convert_to_orepa, fold_orepa
from orepa_convert.config import INITS
from orepa_convert.data.synthetic import make_dataset


def _first_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(x)
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out.float()


def _latency_ms(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    model = model.eval()
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _scalar(text: str) -> int | float | bool | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolov8n.yaml", help="ultralytics model YAML or .pt (trusted files only)")
    parser.add_argument("--data", help="dataset YAML (or folder for classification); default: generate one")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--init", choices=list(INITS), default="preserve")
    parser.add_argument("--optimizer", default="SGD", help="SGD, AdamW, MuSGD, ... (pick explicitly; see docs/yolo.md)")
    parser.add_argument("--project", default="runs/orepa")
    parser.add_argument("--name", default="train")
    parser.add_argument("--iters", type=int, default=20, help="latency iterations")
    parser.add_argument("--min-map50", type=float, default=0.3,
                        help="on the generated dataset, the OREPA model must reach this mAP50 (0 disables the check)")
    parser.add_argument("--train-arg", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more ultralytics train arguments, e.g. nbs=16 warmup_epochs=0 lr0=0.02")
    args = parser.parse_args(argv)
    extra = {k: _scalar(v) for k, _, v in (a.partition("=") for a in args.train_arg)}

    from ultralytics import YOLO

    project = Path(args.project).resolve()
    model = YOLO(args.model)
    data = args.data
    synthetic = data is None
    if synthetic:
        data = str(make_dataset(project / f"synthetic-{model.task}", model.task, n_train=64, n_val=16, imgsz=args.imgsz))
        print(f"generated a synthetic {model.task} dataset: {data}")
        # small images, few steps: no mosaic (it shrinks the objects), no warmup, an optimizer step every batch
        for key, value in (("mosaic", 0.0), ("warmup_epochs", 0), ("lr0", 0.02), ("nbs", args.batch)):
            extra.setdefault(key, value)
    _, report = convert_to_orepa(model, init=args.init, return_report=True)
    print(report.summary())
    model.train(data=data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, device=args.device,
                workers=args.workers, optimizer=args.optimizer, project=str(project), name=args.name, exist_ok=True,
                plots=False, amp=args.device != "cpu", verbose=False, **extra)
    save_dir = Path(model.trainer.save_dir)
    best_is_stock = not any(isinstance(m, OREPAConv) for m in model.model.modules())  # best.pt holds the folded model
    convert_to_orepa(model)  # ... and carries the OREPA training state: this restores the trained OREPA model
    val_args = dict(data=data, imgsz=args.imgsz, batch=args.batch, device=args.device, plots=False, verbose=False)
    orepa_metrics = model.val(**val_args).results_dict  # validates a folded copy; the model stays OREPA
    orepa_model = copy.deepcopy(model.model).float().eval()
    moved = max(
        (m.scale(b).abs().max().item() for m in orepa_model.modules() if isinstance(m, OREPAConv)
         for b in m.branches if b != "origin"),
        default=0.0,
    )

    x = torch.rand(1, 3, args.imgsz, args.imgsz)
    before = _first_output(orepa_model, x)
    fold_orepa(model)
    folded_model = model.model.float().eval()
    fold_err = ((_first_output(folded_model, x) - before).abs().max() / before.abs().max()).item()
    folded_metrics = model.val(**val_args).results_dict
    metric_diff = max(abs(folded_metrics[k] - orepa_metrics[k]) for k in orepa_metrics)
    stock = save_dir / "weights" / "folded_stock.pt"
    model.save(stock)
    # a plain model of the trained architecture (same classes), for the latency and parameter comparison
    plain_cls = type(folded_model)
    plain = plain_cls(cfg=copy.deepcopy(folded_model.yaml), nc=len(model.names), verbose=False).float().eval()

    onnx_err, onnx_skipped = float("nan"), False
    try:
        import numpy as np
        import onnxruntime as ort

        onnx_path = YOLO(str(stock)).export(format="onnx", imgsz=args.imgsz, simplify=False, device="cpu")
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        ort_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        ref = _first_output(YOLO(str(stock)).model.float().eval(), x).numpy()
        onnx_err = float(np.abs(ort_out - ref).max() / np.abs(ref).max())
    except ImportError:
        onnx_skipped = True
        print("onnx / onnxruntime not installed: skipping the ONNX check (pip install 'orepa-convert[onnx]')")

    latency = {
        "plain": _latency_ms(plain, x, args.iters),
        "orepa (unfolded)": _latency_ms(orepa_model, x, args.iters),
        "folded": _latency_ms(folded_model, x, args.iters),
    }
    params = {"plain": _params(plain), "orepa (unfolded)": _params(orepa_model), "folded": _params(folded_model)}
    map50 = next((v for k, v in orepa_metrics.items() if "mAP50(" in k), None)
    checks = {
        "best.pt holds the folded (stock) model": best_is_stock,
        "the trainer trained the OREPA model": any(isinstance(m, OREPAConv) for m in orepa_model.modules()),
        # on the generated data the model must learn, so that the equality checks below can fail
        f"it learned: mAP50 >= {args.min_map50} on the generated data": (map50 >= args.min_map50) if synthetic and map50 is not None and args.min_map50 > 0 else None,
        "the new branches moved (largest non-origin scale > 0)": moved > 0,
        "folded outputs == OREPA outputs (rel. err <= 1e-5)": fold_err <= 1e-5,
        "validation metrics equal before/after folding (<= 1e-4)": metric_diff <= 1e-4,
        "no OREPA block left after folding": not any(isinstance(m, OREPAConv) for m in folded_model.modules()),
        "folded parameter count == plain": params["folded"] == params["plain"],
        # None: skipped (onnxruntime missing); a NaN error fails, as every comparison above does
        "onnxruntime == torch (rel. err <= 1e-4)": None if onnx_skipped else onnx_err <= 1e-4,
    }

    print(f"\nrun: {save_dir}\nstock checkpoint: {stock}")
    print(f"\n{'variant':20s} {'latency ms':>11s} {'params':>12s}   (batch 1, {args.imgsz} px, {args.device})")
    for name, ms in latency.items():
        print(f"{name:20s} {ms:11.2f} {params[name]:12,d}")
    key = next(iter(orepa_metrics))
    print(f"\nvalidation {key}: OREPA {orepa_metrics[key]:.5f}, folded {folded_metrics[key]:.5f}")
    if map50 is not None:
        print(f"validation mAP50: OREPA {map50:.4f}")
    print(f"largest non-origin branch scale after training: {moved:.3e}")
    print(f"fold error {fold_err:.2e}, largest metric difference {metric_diff:.2e}, onnxruntime error {onnx_err:.2e}")
    for name, ok in checks.items():
        print(f"  [{'skip' if ok is None else 'ok' if ok else 'FAIL'}] {name}")
    return 0 if all(ok is not False for ok in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
