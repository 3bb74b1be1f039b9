"""End-to-end demo: YOLOv8n from its YAML -> convert -> short training -> fold -> verify -> benchmark.

Runs offline on the CPU in about a minute: the model is built from the YAML that ships with ultralytics (no
weights are downloaded) and trained for a few steps with the real ultralytics detection loss on a tiny
generated dataset (bright rectangles on noise, with their boxes as labels).

    python recipes/demo.py [--model yolov8n.yaml] [--steps 20] [--imgsz 128] [--init preserve|paper]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch
from tqdm import tqdm

from orepa_convert import OREPAConv, convert_to_orepa, fold_orepa
from orepa_convert.models import build_model


def synthetic_batch(n: int, imgsz: int, generator: torch.Generator, nc: int) -> dict[str, torch.Tensor]:
    """``n`` images with 1-3 filled rectangles each, in the batch format of ultralytics' detection loss."""
    imgs = torch.rand(n, 3, imgsz, imgsz, generator=generator) * 0.3
    batch_idx, cls, boxes = [], [], []
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            w, h = (torch.rand(2, generator=generator) * 0.4 + 0.15).tolist()
            cx = float(torch.rand(1, generator=generator)) * (1 - w) + w / 2
            cy = float(torch.rand(1, generator=generator)) * (1 - h) + h / 2
            c = int(torch.randint(0, nc, (1,), generator=generator))
            x0, x1 = int((cx - w / 2) * imgsz), int((cx + w / 2) * imgsz)
            y0, y1 = int((cy - h / 2) * imgsz), int((cy + h / 2) * imgsz)
            imgs[i, c % 3, y0:y1, x0:x1] = 1.0
            batch_idx.append(i)
            cls.append(c)
            boxes.append([cx, cy, w, h])
    return {
        "img": imgs,
        "batch_idx": torch.tensor(batch_idx, dtype=torch.float32),
        "cls": torch.tensor(cls, dtype=torch.float32).view(-1, 1),
        "bboxes": torch.tensor(boxes, dtype=torch.float32),
    }


def flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat_outputs(v)]
    return []


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


def latency_ms(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolov8n.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--init", choices=["preserve", "paper"], default="preserve")
    parser.add_argument("--iters", type=int, default=10, help="latency iterations")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    from ultralytics.cfg import get_cfg

    print(f"[1/5] build {args.model} from its YAML (random weights) and convert")
    model = build_model(args.model)
    plain_reference = build_model(args.model)  # a second plain copy, for the state_dict check
    model.eval()
    x = torch.rand(1, 3, args.imgsz, args.imgsz)
    with torch.no_grad():
        before = [t.clone() for t in flat_outputs(model(x))]
    _, report = convert_to_orepa(model, init=args.init, return_report=True)
    print("      " + report.summary())
    with torch.no_grad():
        err_convert = rel_err(flat_outputs(model(x)), before)
    print(f"      outputs right after conversion: relative error {err_convert:.2e}")

    print(f"[2/5] train {args.steps} steps on a generated dataset (ultralytics detection loss, SGD)")
    model.args = get_cfg()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for step in (bar := tqdm(range(args.steps), unit="step")):
        batch = synthetic_batch(args.batch, args.imgsz, gen, nc=model.model[-1].nc)
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.sum().item():.3f}")
    moved = sum(int(torch.count_nonzero(b.scale_dws)) for b in model.modules() if isinstance(b, OREPAConv))

    print("[3/5] fold every OREPA block back into a plain conv")
    model.eval()
    unfolded = __import__("copy").deepcopy(model)
    with torch.no_grad():
        trained = flat_outputs(model(x))
    fold_orepa(model)

    print("[4/5] verify")
    with torch.no_grad():
        err_fold = rel_err(flat_outputs(model(x)), trained)
    same_layout = {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in plain_reference.state_dict().items()
    }
    n_plain = sum(p.numel() for p in plain_reference.parameters())
    n_folded = sum(p.numel() for p in model.parameters())
    n_orepa = sum(p.numel() for p in unfolded.parameters())
    checks = {
        "outputs unchanged by conversion (rel. err <= 1e-6)": err_convert <= 1e-6,
        "new branches trained (non-zero dws scales)": moved > 0,
        "folded == trained OREPA model (rel. err <= 1e-5)": err_fold <= 1e-5,
        "folded state_dict layout == plain model's": same_layout,
        "folded parameter count == plain model's": n_folded == n_plain,
        "no OREPA block left": not any(isinstance(m, OREPAConv) for m in model.modules()),
    }

    print(f"[5/5] CPU inference latency, batch 1 at {args.imgsz} px (median of {args.iters})")
    plain_reference.eval()
    rows = [
        ("plain", latency_ms(plain_reference, x, args.iters), n_plain),
        ("orepa (unfolded, eval cache)", latency_ms(unfolded, x, args.iters), n_orepa),
        ("folded", latency_ms(model, x, args.iters), n_folded),
    ]
    print(f"\n{'variant':32s} {'latency ms':>10s} {'params':>12s}")
    for name, ms, n in rows:
        print(f"{name:32s} {ms:10.2f} {n:12,d}")
    print(f"\nfold error {err_fold:.2e}  (conversion error {err_convert:.2e})")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
