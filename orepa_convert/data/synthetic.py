"""Tiny generated datasets on disk for every ultralytics task, so that training runs offline.

:func:`make_dataset`: each image holds 1-3 filled rectangles of class-dependent colour on a noisy background
(easy: for tests and the demo). :func:`make_detection_benchmark`: four shape classes in random colours, overlaps
and clutter (harder: for efficacy experiments). Labels are exact.
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
    return [
        (cx + dx * c - dy * s, cy + dx * s + dy * c)
        for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))
    ]


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


def make_dataset(
    root: str | Path, task: str = "detect", n_train: int = 8, n_val: int = 4, imgsz: int = 96, seed: int = 0
) -> Path:
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


SHAPES = {0: "rectangle", 1: "ellipse", 2: "triangle", 3: "cross"}


def _shape_points(kind: str, cx: float, cy: float, w: float, h: float, rng: random.Random) -> list[tuple[float, float]]:
    if kind == "triangle":
        up = rng.random() < 0.5
        y0, y1 = (cy + h / 2, cy - h / 2) if up else (cy - h / 2, cy + h / 2)
        return [(cx - w / 2, y0), (cx + w / 2, y0), (cx, y1)]
    if kind == "cross":
        a, b = w / 6, h / 6
        return [
            (cx - a, cy - h / 2),
            (cx + a, cy - h / 2),
            (cx + a, cy - b),
            (cx + w / 2, cy - b),
            (cx + w / 2, cy + b),
            (cx + a, cy + b),
            (cx + a, cy + h / 2),
            (cx - a, cy + h / 2),
            (cx - a, cy + b),
            (cx - w / 2, cy + b),
            (cx - w / 2, cy - b),
            (cx - a, cy - b),
        ]
    return _corners(cx, cy, w, h, 0.0)


def _draw_shapes_image(rng: random.Random, imgsz: int):
    """Task A: a noisy tinted background, lines and blobs as clutter, 1-5 shapes of :data:`SHAPES` in random colours."""
    from PIL import Image, ImageDraw

    tint = tuple(rng.randrange(0, 90) for _ in range(3))
    img = Image.new("RGB", (imgsz, imgsz))
    img.putdata([tuple(min(255, c + rng.randrange(0, 50)) for c in tint) for _ in range(imgsz * imgsz)])
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):  # clutter: thin lines and small blobs
        colour = tuple(rng.randrange(40, 256) for _ in range(3))
        if rng.random() < 0.5:
            draw.line([tuple(rng.uniform(0, imgsz) for _ in range(2)) for _ in range(2)], fill=colour, width=1)
        else:
            x, y, r = rng.uniform(0, imgsz), rng.uniform(0, imgsz), rng.uniform(1, imgsz * 0.05)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    labels = []
    for _ in range(rng.randint(1, 5)):
        cls = rng.randrange(len(SHAPES))
        w, h = rng.uniform(0.12, 0.5), rng.uniform(0.12, 0.5)
        cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
        colour = tuple(rng.randrange(60, 256) for _ in range(3))
        pts = [(x * imgsz, y * imgsz) for x, y in _shape_points(SHAPES[cls], cx, cy, w, h, rng)]
        if SHAPES[cls] == "ellipse":
            draw.ellipse([pts[0], pts[2]], fill=colour)
        else:
            draw.polygon(pts, fill=colour)
        labels.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return img, labels


#: Task B of the fine-tuning study: other classes than :data:`SHAPES`.
TARGET_SHAPES = {0: "ring", 1: "diamond", 2: "star", 3: "hexagon", 4: "bar"}


def _target_points(kind: str, cx: float, cy: float, w: float, h: float) -> list[tuple[float, float]]:
    if kind == "diamond":
        return [(cx, cy - h / 2), (cx + w / 2, cy), (cx, cy + h / 2), (cx - w / 2, cy)]
    if kind == "star":
        return [
            (
                cx + (w / 2 if i % 2 == 0 else w / 5) * math.sin(i * math.pi / 5),
                cy - (h / 2 if i % 2 == 0 else h / 5) * math.cos(i * math.pi / 5),
            )
            for i in range(10)
        ]
    if kind == "hexagon":
        return [(cx + w / 2 * math.cos(i * math.pi / 3), cy + h / 2 * math.sin(i * math.pi / 3)) for i in range(6)]
    if kind == "bar":  # a thin bar along the longer side of the box
        return _corners(cx, cy, w, h / 3, 0.0) if w >= h else _corners(cx, cy, w / 3, h, 0.0)
    return _corners(cx, cy, w, h, 0.0)


def _draw_target_image(rng: random.Random, imgsz: int):
    """Task B: a striped two-colour gradient background, dots as clutter, 1-5 shapes of :data:`TARGET_SHAPES`
    in a pastel or dark palette (other classes, colours and backgrounds than task A)."""
    from PIL import Image, ImageDraw

    a, b = (tuple(rng.randrange(0, 256) for _ in range(3)) for _ in range(2))
    period = rng.randint(4, 12)
    img = Image.new("RGB", (imgsz, imgsz))
    pixels = []
    for y in range(imgsz):
        for x in range(imgsz):
            t = (x + y) / (2 * imgsz)
            stripe = 25 if (x // period) % 2 else 0
            pixels.append(tuple(min(255, int(a[c] * (1 - t) + b[c] * t) // 2 + stripe) for c in range(3)))
    img.putdata(pixels)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 10)):  # clutter: small dots
        dx, dy, r = rng.uniform(0, imgsz), rng.uniform(0, imgsz), rng.uniform(0.5, imgsz * 0.03)
        draw.ellipse([dx - r, dy - r, dx + r, dy + r], fill=tuple(rng.randrange(0, 256) for _ in range(3)))
    pastel = rng.random() < 0.5
    labels = []
    for _ in range(rng.randint(1, 5)):
        cls = rng.randrange(len(TARGET_SHAPES))
        w, h = rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.5)
        cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
        colour = tuple(rng.randrange(170, 256) if pastel else rng.randrange(0, 90) for _ in range(3))
        kind = TARGET_SHAPES[cls]
        box = [((cx - w / 2) * imgsz, (cy - h / 2) * imgsz), ((cx + w / 2) * imgsz, (cy + h / 2) * imgsz)]
        if kind == "ring":
            draw.ellipse(box, outline=colour, width=max(1, int(min(w, h) * imgsz / 6)))
        else:
            draw.polygon([(x * imgsz, y * imgsz) for x, y in _target_points(kind, cx, cy, w, h)], fill=colour)
        labels.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return img, labels


def _write_detection(root: Path, splits: dict[str, int], draw, names: dict[int, str], imgsz: int, seed: int) -> Path:
    """Write ``splits`` (name -> image count) of images drawn by ``draw(rng, imgsz)`` and their labels; the data
    YAML lists every split with images (so a ``test`` entry appears only with test images)."""
    rng = random.Random(seed)
    for split, n in splits.items():
        if n <= 0:
            continue
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels = draw(rng, imgsz)
            img.save(root / "images" / split / f"{i:05d}.jpg")
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    lines = [f"path: {root.resolve()}"] + [f"{split}: images/{split}" for split, n in splits.items() if n > 0]
    lines += ["names:"] + [f"  {k}: {v}" for k, v in names.items()]
    data = root / "data.yaml"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


def make_detection_benchmark(
    root: str | Path, n_train: int = 240, n_val: int = 80, imgsz: int = 64, seed: int = 0, n_test: int = 0
) -> Path:
    """A harder detection dataset for efficacy experiments: four shape classes (the class is the shape, the colour
    is random), 1-5 objects per image at sizes 12-50 % of the image, overlaps allowed, random lines and blobs as
    clutter on a noisy, tinted background. With ``n_test`` a held-out ``test`` split too. Returns the data YAML."""
    splits = {"train": n_train, "val": n_val, "test": n_test}
    return _write_detection(Path(root), splits, _draw_shapes_image, SHAPES, imgsz, seed)


def make_finetune_target(
    root: str | Path, n_train: int = 240, n_val: int = 80, n_test: int = 80, imgsz: int = 64, seed: int = 1
) -> Path:
    """Task B of the fine-tuning study, unlike :func:`make_detection_benchmark` (task A) in classes (ring,
    diamond, star, hexagon, bar), colours (pastel or dark palettes) and backgrounds (striped gradients, dots),
    with train / val / test splits. Returns the data YAML."""
    splits = {"train": n_train, "val": n_val, "test": n_test}
    return _write_detection(Path(root), splits, _draw_target_image, TARGET_SHAPES, imgsz, seed)
