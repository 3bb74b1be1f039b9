"""The orepa-convert command line."""

from __future__ import annotations

import json
import subprocess
import sys

from orepa_convert.cli import main


def test_inspect_prints_report(capsys):
    assert main(["inspect", "timm:resnet18", "--exclude", "layer4.*"]) == 0
    out = capsys.readouterr().out
    assert "would convert 13/17 eligible convs" in out
    assert "excluded by 'layer4.*'" in out


def test_inspect_json_and_yolo_yaml(capsys):
    assert main(["inspect", "yolov8n.yaml", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["eligible"] == 39 and data["summary"]["applied"] is False
    assert data["convs"][0]["path"] == "model.0.conv"


def test_bad_model_is_a_clear_error(capsys):
    assert main(["inspect", "does-not-exist.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "orepa_convert.cli", "inspect", "torchvision:resnet18"],
                         capture_output=True, text=True, check=True).stdout
    assert "would convert 17/17" in out
