"""Tiny generated datasets on disk for every ultralytics task, so that training runs offline.

Each image holds 1-3 filled rectangles of class-dependent colour on a noisy background; labels are exact.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

TASKS = ("detect", "segment", "pose", "obb", "classify")
NAMES = {0: "red", 1: "green"}
_COLOURS = {0: (220, 40, 40), 1: (40, 200, 60)}


def _corners(cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + dx * c - dy * s, cy + dx * s + dy * c) for dx, dy in
            ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))]


def _image(rng: random.Random, imgsz: int, task: str):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (imgsz, imgsz))
    img.putdata([tuple(rng.randrange(0, 60) for _ in range(3)) for _ in range(imgsz * imgsz)])
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(rng.randint(1, 3) if task != "classify" else 1):
        cls = rng.randrange(len(NAMES))
        w, h = rng.uniform(0.2, 0.45), rng.uniform(0.2, 0.45)
        cx, cy = rng.uniform(w / 2 + 0.05, 1 - w / 2 - 0.05), rng.uniform(h / 2 + 0.05, 1 - h / 2 - 0.05)
        angle = rng.uniform(-0.5, 0.5) if task == "obb" else 0.0
        pts = _corners(cx, cy, w, h, angle)
        draw.polygon([(x * imgsz, y * imgsz) for x, y in pts], fill=_COLOURS[cls])
        objects.append((cls, cx, cy, w, h, pts))
    return img, objects


def _label(task: str, obj) -> str:
    cls, cx, cy, w, h, pts = obj
    flat = " ".join(f"{min(max(v, 0.0), 1.0):.6f}" for p in pts for v in p)
    if task == "detect":
        return f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"
    if task in ("segment", "obb"):
        return f"{cls} {flat}"
    if task == "pose":
        kpts = " ".join(f"{x:.6f} {y:.6f} 2" for x, y in pts)
        return f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f} {kpts}"
    raise ValueError(task)


def make_dataset(root: str | Path, task: str = "detect", n_train: int = 8, n_val: int = 4, imgsz: int = 96,
                 seed: int = 0) -> Path:
    """Write a dataset for ``task`` under ``root``; return what ``model.train(data=...)`` takes (a data YAML,
    or for ``classify`` the dataset folder)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    root = Path(root)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            img, objects = _image(rng, imgsz, task)
            if task == "classify":
                folder = root / split / NAMES[objects[0][0]]
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"{i:04d}.jpg")
                continue
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            img.save(root / "images" / split / f"{i:04d}.jpg")
            text = "\n".join(_label(task, o) for o in objects)
            (root / "labels" / split / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
    if task == "classify":
        for split in ("train", "val"):  # every class present in every split
            for name in NAMES.values():
                folder = root / split / name
                if not folder.exists() or not any(folder.iterdir()):
                    folder.mkdir(parents=True, exist_ok=True)
                    img, _ = _image(rng, imgsz, "classify")
                    img.save(folder / "extra.jpg")
        return root
    lines = [f"path: {root.resolve()}", "train: images/train", "val: images/val", "names:"]
    lines += [f"  {k}: {v}" for k, v in NAMES.items()]
    if task == "pose":
        lines += ["kpt_shape: [4, 3]", "flip_idx: [1, 0, 3, 2]"]
    data = root / "data.yaml"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data
