"""The recipes run end to end (they are the engine of `make demo`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_yolov8_recipe_all_checks_pass(tmp_path, capsys):
    pytest.importorskip("ultralytics")
    recipe = _load("yolov8_orepa")
    code = recipe.main(["--project", str(tmp_path), "--epochs", "2", "--batch", "4", "--imgsz", "64", "--iters", "2",
                         "--train-arg", "nbs=4", "warmup_epochs=0"])
    out = capsys.readouterr().out
    assert "[FAIL]" not in out and code == 0, out[-2000:]
    assert (tmp_path / "train" / "weights" / "folded_stock.pt").exists()
