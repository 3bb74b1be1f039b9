"""`orepa-convert train key=value ...`: the console script as a user runs it, on a generated dataset (CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ultralytics")

from orepa_convert.state import carried_state, state_paths  # noqa: E402
from orepa_convert.data.synthetic import make_dataset  # noqa: E402

BIN = Path(sys.executable).parent
TINY = ["imgsz=64", "batch=4", "workers=0", "device=cpu", "plots=False", "amp=False", "exist_ok=True"]


def _run(*words: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    return subprocess.run([str(BIN / "orepa-convert"), *words], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_train_converts_trains_and_leaves_a_stock_run_folder(tmp_path):
    data = make_dataset(tmp_path / "data", "detect", n_train=4, n_val=2)
    proc = _run("train", "model=yolov8n.yaml", f"data={data}", "epochs=2", "save_period=1", f"project={tmp_path / 'runs'}",
                "name=cli", "init=preserve_live", "kernel_sizes=1,3", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "cli"
    from ultralytics import YOLO

    from orepa_convert import inspect_model

    n = inspect_model(YOLO("yolov8n.yaml"), kernel_sizes=(1, 3)).converted  # 57 (63 on ultralytics 8.3's YAML)
    assert n > inspect_model(YOLO("yolov8n.yaml")).converted
    assert f"OREPA: converted {n} blocks (init=preserve_live)" in proc.stdout, proc.stdout
    record = json.loads((run / "orepa.json").read_text())
    assert len(state_paths(record["orepa_state"])) == n
    assert {g["config"]["init"] for g in record["orepa_state"]["groups"]} == {"preserve_live"}
    assert record["fold_check"]["rel_err"] <= 1e-5 and record["report"]["summary"]["converted"] == n
    # stock ultralytics validates best.pt (its own console script: orepa_convert is never imported)
    val = subprocess.run([str(BIN / "yolo"), "val", f"model={run / 'weights' / 'best.pt'}", f"data={data}", "imgsz=64",
                          "batch=4", "device=cpu", "plots=False", f"project={tmp_path / 'val'}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "True"})
    assert val.returncode == 0 and "all" in val.stdout + val.stderr, val.stderr[-3000:]
    args = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)["train_args"]
    assert args["model"] == "yolov8n.yaml" and args["epochs"] == 2  # the run's arguments are the user's

    # resume an interrupted run (its epoch-1 checkpoint) from the command line
    shutil.copy(run / "weights" / "epoch0.pt", tmp_path / "interrupted.pt")
    proc = _run("train", f"model={tmp_path / 'interrupted.pt'}", "resume=True", "device=cpu", "workers=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"OREPA: resumed/restored {n} blocks" in proc.stdout, proc.stdout
    ckpt = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)
    assert len(state_paths(carried_state(ckpt.get("ema") or ckpt["model"])["orepa_state"])) == n


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["model=yolov8n.yaml", "epcohs=3"], "'epcohs' is not a valid YOLO argument"),
        (["model=yolov8n.yaml", "init=bogus"], "OREPAConfig.init must be one of"),
        (["data=x.yaml"], "give model="),
        (["model=yolov8n.yaml", "epochs"], "expected key=value"),
    ],
)
def test_train_mistakes_are_one_line_errors(words, message, tmp_path):
    proc = _run("train", *words, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_train_help_lists_the_orepa_keys_and_where_the_ultralytics_ones_are(tmp_path):
    proc = _run("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for key in ("init=", "kernel_sizes=", "include=", "exclude=", "orepa_seed=", "docs.ultralytics.com/usage/cfg"):
        assert key in proc.stdout


def test_train_timm_runs_the_timm_recipe(tmp_path):
    pytest.importorskip("timm")
    data = make_dataset(tmp_path / "imgs", "classify", n_train=8, n_val=4, imgsz=32)
    out = tmp_path / "timm"
    proc = _run("train", "--timm", "resnet10t", "--data-dir", str(data), "--epochs", "1", "--img-size", "32",
                "--batch-size", "4", "--device", "cpu", "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "folded.pth").is_file() and (out / "last.pth").is_file()
