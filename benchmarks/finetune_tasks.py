"""Real-data fine-tuning tasks for the multi-task benchmark (issue 30): scikit-learn's bundled handwritten digits
(1797 scans of 8x8 pixels, 16 grey levels, shipped with scikit-learn: nothing is downloaded).

A task pair is a pretraining task A and a different fine-tuning task B: digits 0-4 then digits 5-9, as
detection (digit scans pasted as objects on textured backgrounds, YOLO labels and a data YAML with a held-out
``test`` split) or as classification (one scan per image, an ImageFolder with ``train/ val/ test/`` for the timm
backend). The scans are split once, by a fixed permutation, into a pool for train/val and a pool for test, so
the test split shows other people's handwriting than training did. Everything is drawn from ``seed``: the same
call writes the same files, byte for byte.

    python benchmarks/finetune_tasks.py --root data/finetune   # writes the four folders below
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
FINETUNE_DIGITS = (5, 6, 7, 8, 9)
TEST_FRACTION = 0.25
_SPLIT_SEED = 1797  # the fixed permutation that separates train/val scans from test scans


def digit_scans(digits: Sequence[int], pool: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 8, 8] in 0..1, labels as indices into ``digits``) of the ``pool`` ("fit" or "test") scans."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(data.target))
    cut = int(len(order) * (1 - TEST_FRACTION))
    chosen = order[:cut] if pool == "fit" else order[cut:]
    keep = [i for i in chosen if data.target[i] in digits]
    images = data.images[keep] / 16.0
    labels = np.array([list(digits).index(int(data.target[i])) for i in keep])
    return images, labels


def _background(rng: random.Random, size: int) -> np.ndarray:
    """A textured RGB background: a smooth random field, a tint and stripes, in 0..1."""
    coarse = np.array([[rng.random() for _ in range(5)] for _ in range(5)], dtype=np.float32)
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR),
                       dtype=np.float32) / 255.0
    tint = np.array([rng.uniform(0.3, 1.0) for _ in range(3)], dtype=np.float32)
    period, phase = rng.uniform(4, 16), rng.uniform(0, 6.3)
    stripes = 0.08 * np.sin(np.arange(size, dtype=np.float32)[None, :] * 6.283 / period + phase)
    img = 0.35 + 0.4 * field[..., None] * tint + stripes[..., None]
    noise = np.array([[rng.gauss(0, 0.03) for _ in range(size)] for _ in range(size)], dtype=np.float32)
    return np.clip(img + noise[..., None], 0, 1)


def _paste(img: np.ndarray, scan: np.ndarray, x: int, y: int, px: int, ink: tuple[float, float, float]) -> None:
    glyph = np.asarray(Image.fromarray((scan * 255).astype(np.uint8)).resize((px, px), Image.BILINEAR),
                       dtype=np.float32)[..., None] / 255.0
    region = img[y:y + px, x:x + px]
    region[:] = region * (1 - glyph) + glyph * np.array(ink, dtype=np.float32)


def _to_image(img: np.ndarray) -> Image.Image:
    return Image.fromarray((img * 255).round().astype(np.uint8))


def make_digits_detection(root: str | Path, digits: Sequence[int], n_train: int = 240, n_val: int = 80,
                          n_test: int = 80, imgsz: int = 64, seed: int = 0) -> Path:
    """Write a detection dataset of ``digits`` (1-3 scans per image, 14-26 px, random ink) and return its data
    YAML; test images use the held-out scans."""
    root = Path(root)
    rng = random.Random(seed)
    pools = {"fit": digit_scans(digits, "fit"), "test": digit_scans(digits, "test")}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        images, labels = pools["test" if split == "test" else "fit"]
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = _background(rng, imgsz)
            boxes: list[tuple[int, int, int]] = []
            rows = []
            for _ in range(rng.randint(1, 3)):
                px = rng.randint(14, 26)
                for _attempt in range(20):  # no overlapping digits
                    x, y = rng.randint(0, imgsz - px), rng.randint(0, imgsz - px)
                    if all(x + px <= bx or bx + bp <= x or y + px <= by or by + bp <= y for bx, by, bp in boxes):
                        break
                else:
                    continue
                k = rng.randrange(len(labels))
                dark = rng.random() < 0.5
                ink = tuple(rng.uniform(0.0, 0.2) if dark else rng.uniform(0.85, 1.0) for _ in range(3))
                _paste(img, images[k], x, y, px, ink)  # type: ignore[arg-type]
                boxes.append((x, y, px))
                rows.append(f"{labels[k]} {(x + px / 2) / imgsz:.6f} {(y + px / 2) / imgsz:.6f} {px / imgsz:.6f} {px / imgsz:.6f}")
            _to_image(img).save(root / "images" / split / f"{i:05d}.png")
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    lines = [f"path: {root.resolve()}", "train: images/train", "val: images/val", "test: images/test", "names:"]
    lines += [f"  {j}: digit{d}" for j, d in enumerate(digits)]
    (root / "data.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "data.yaml"


def make_digits_classification(root: str | Path, digits: Sequence[int], n_train: int = 300, n_val: int = 100,
                               n_test: int = 100, imgsz: int = 32, seed: int = 0) -> Path:
    """Write an ImageFolder (``train/ val/ test/<digitN>/*.png``) of ``digits``: one scan per image, centred with
    a random offset and size on a textured background; test images use the held-out scans."""
    root = Path(root)
    rng = random.Random(seed)
    pools = {"fit": digit_scans(digits, "fit"), "test": digit_scans(digits, "test")}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        images, labels = pools["test" if split == "test" else "fit"]
        if n <= 0:
            continue
        for name in (f"digit{d}" for d in digits):
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            k = rng.randrange(len(labels)) if i >= len(digits) else int(np.flatnonzero(labels == i)[0])
            img = _background(rng, imgsz)
            px = rng.randint(int(imgsz * 0.55), int(imgsz * 0.85))
            x, y = rng.randint(0, imgsz - px), rng.randint(0, imgsz - px)
            dark = rng.random() < 0.5
            ink = tuple(rng.uniform(0.0, 0.2) if dark else rng.uniform(0.85, 1.0) for _ in range(3))
            _paste(img, images[k], x, y, px, ink)  # type: ignore[arg-type]
            _to_image(img).save(root / split / f"digit{digits[labels[k]]}" / f"{i:05d}.png")
    return root


def make_shapes_classification(root: str | Path, family: str, n_train: int = 300, n_val: int = 100,
                               n_test: int = 100, imgsz: int = 32, seed: int = 0) -> Path:
    """Write an ImageFolder (``train/ val/ test/<class>/*.png``) of generated shapes: each image is the first
    object of a :mod:`orepa_convert.data.synthetic` detection scene (``family`` "shapes": task A's rectangles,
    ellipses, triangles, crosses; "targets": task B's rings, diamonds, stars, hexagons, bars), cropped with a
    margin of its own background and resized to ``imgsz``. Other objects may overlap the crop, as in real crops."""
    from orepa_convert.data import synthetic

    draw, names = {"shapes": (synthetic._draw_shapes_image, synthetic.SHAPES),
                   "targets": (synthetic._draw_target_image, synthetic.TARGET_SHAPES)}[family]
    root = Path(root)
    rng = random.Random(seed)
    scene = 2 * imgsz
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n <= 0:
            continue
        for name in names.values():
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels = draw(rng, scene)
            cls, cx, cy, w, h = (float(v) for v in labels[0].split())
            half = max(w, h) * 0.6 * scene
            box = (cx * scene - half, cy * scene - half, cx * scene + half, cy * scene + half)
            crop = img.crop(tuple(round(v) for v in box)).resize((imgsz, imgsz), Image.BILINEAR)
            crop.save(root / split / names[int(cls)] / f"{i:05d}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/finetune"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, make, digits in (("digits_det_A", make_digits_detection, PRETRAIN_DIGITS),
                               ("digits_det_B", make_digits_detection, FINETUNE_DIGITS),
                               ("digits_cls_A", make_digits_classification, PRETRAIN_DIGITS),
                               ("digits_cls_B", make_digits_classification, FINETUNE_DIGITS)):
        print(name, make(args.root / name, digits, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
