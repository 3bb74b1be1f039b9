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
    code = recipe.main(["--project", str(tmp_path), "--epochs", "2", "--batch", "4", "--imgsz", "64", "--iters", "2", "--min-map50", "0",
                         "--train-arg", "nbs=4", "warmup_epochs=0"])
    out = capsys.readouterr().out
    assert "[FAIL]" not in out and code == 0, out[-2000:]
    assert (tmp_path / "train" / "weights" / "folded_stock.pt").exists()


TIMM_STOCK = r"""
import json, sys, torch, timm
name, ckpt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = timm.create_model(name, num_classes=n, checkpoint_path=ckpt).eval()
torch.manual_seed(0)
with torch.no_grad():
    out = model(torch.rand(2, 3, 32, 32))
print(json.dumps({"orepa_imported": any(k.startswith("orepa_convert") for k in sys.modules), "logits": out.tolist()}))
"""


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from orepa_convert.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("imgs"), "classify", n_train=12, n_val=6, imgsz=32)


def _timm_args(data, out, *extra):
    return ["--model", "resnet10t", "--data-dir", str(data), "--img-size", "32", "--batch-size", "4",
            "--device", "cpu", "--output", str(out), *extra]


def test_timm_recipe_trains_folds_and_stock_timm_loads_it(image_folder, tmp_path):
    pytest.importorskip("timm")
    import json
    import os
    import subprocess
    import sys

    import torch

    recipe = _load("timm_orepa")
    out = tmp_path / "run"
    assert recipe.main(_timm_args(image_folder, out, "--epochs", "2", "--model-ema", "--amp")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["converted"] > 0 and summary["val_acc_folded"] == summary["val_acc_orepa"]
    assert summary["fold_rel_err"] <= 1e-5 and summary["onnx_rel_err"] <= 1e-4
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert (out / "model.onnx").exists()
    env = {**os.environ, "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", TIMM_STOCK, "resnet10t", str(out / "folded.pth"), "2"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    stock = json.loads(res.stdout.strip().splitlines()[-1])
    assert stock["orepa_imported"] is False
    import timm

    ours = timm.create_model("resnet10t", num_classes=2).eval()
    ours.load_state_dict(torch.load(out / "folded.pth", weights_only=True))
    torch.manual_seed(0)
    with torch.no_grad():
        expected = ours(torch.rand(2, 3, 32, 32))
    assert torch.allclose(torch.tensor(stock["logits"]), expected, rtol=1e-5, atol=1e-6)


def test_timm_recipe_resume_continues_from_last_epoch(image_folder, tmp_path):
    pytest.importorskip("timm")
    import json

    recipe = _load("timm_orepa")
    out = tmp_path / "run"
    assert recipe.main(_timm_args(image_folder, out, "--epochs", "1")) == 0
    assert recipe.main(_timm_args(image_folder, out, "--epochs", "2", "--resume", str(out / "last.pth"))) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1]


def test_timm_recipe_torchcompile_trains_and_folds(image_folder, tmp_path):
    pytest.importorskip("timm")
    import json

    recipe = _load("timm_orepa")
    out = tmp_path / "compiled"
    assert recipe.main(_timm_args(image_folder, out, "--epochs", "1", "--torchcompile")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compiled"] == "inductor" and summary["converted"] > 0
    assert summary["fold_rel_err"] <= 1e-5 and summary["val_acc_folded"] == summary["val_acc_orepa"]


def test_timm_recipe_under_torchrun_two_cpu_ranks(image_folder, tmp_path):
    pytest.importorskip("timm")
    import json
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(RECIPES / "timm_orepa.py"), *_timm_args(image_folder, out, "--epochs", "1")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_acc_folded"] == summary["val_acc_orepa"]
    assert (out / "folded.pth").exists() and (out / "last.pth").exists()


def test_timm_recipe_refuses_a_dataset_smaller_than_a_batch(image_folder, tmp_path, capsys):
    pytest.importorskip("timm")
    recipe = _load("timm_orepa")
    args = _timm_args(image_folder, tmp_path / "none", "--epochs", "1")
    args[args.index("--batch-size") + 1] = "64"  # 12 training images
    assert recipe.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("timm recipe: error: 12 training images make no full batch of 64 per process")
    assert not (tmp_path / "none" / "summary.json").exists()
