"""Generated datasets: valid labels, deterministic by seed."""

from __future__ import annotations

from orepa_convert.data.synthetic import SHAPES, make_detection_benchmark


def test_detection_benchmark_labels_are_valid_and_seeded(tmp_path):
    data = make_detection_benchmark(tmp_path / "a", n_train=6, n_val=2, imgsz=48, seed=3)
    again = make_detection_benchmark(tmp_path / "b", n_train=6, n_val=2, imgsz=48, seed=3)
    assert "names:" in data.read_text() and all(f"{k}: {v}" in data.read_text() for k, v in SHAPES.items())
    labels = sorted((tmp_path / "a" / "labels").rglob("*.txt"))
    assert len(labels) == 8 and len(list((tmp_path / "a" / "images").rglob("*.jpg"))) == 8
    classes = set()
    for path in labels:
        rows = [line.split() for line in path.read_text().splitlines()]
        assert 1 <= len(rows) <= 5
        for cls, *box in rows:
            classes.add(int(cls))
            cx, cy, w, h = map(float, box)
            eps = 1e-5  # labels are written with 6 decimals
            assert -eps <= cx - w / 2 and cx + w / 2 <= 1 + eps and -eps <= cy - h / 2 and cy + h / 2 <= 1 + eps
            assert min(w, h) >= 0.12 - eps
        assert path.read_text() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_text()
    assert classes <= set(SHAPES) and len(classes) > 1
    assert again.exists()
