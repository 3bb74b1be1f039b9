"""The orepa-convert command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def test_version(capsys):
    import pytest

    from orepa_convert import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"orepa-convert {__version__}"


def test_unknown_models_are_one_line_errors(capsys):
    for spec, name in (("timm:not_a_model", "timm"), ("torchvision:not_a_model", "torchvision")):
        assert main(["inspect", spec]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"orepa-convert: error: {name} has no model 'not_a_model'")


def test_regions_traced_by_parts_are_one_quiet_line(capsys):
    assert main(["inspect", "yolov8n.yaml"]) == 0
    out = capsys.readouterr().out
    assert "region(s) traced by parts" in out and "\nTraced by parts: <root>, model.2, " in out
    assert "TraceError" not in out and "Proxy object" not in out
    assert main(["--verbose", "inspect", "yolov8n.yaml"]) == 0
    verbose = capsys.readouterr().out
    assert "TraceError: Proxy object cannot be iterated" in verbose
    assert max(len(line) for line in verbose.splitlines()) < 200


def test_closed_pipe_is_not_an_error():
    """`orepa-convert inspect MODEL | head -0`: the reader is gone before the report is written; no
    BrokenPipeError traceback, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "orepa_convert.cli", "inspect", "yolov8n.yaml"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the model is even built: every write hits a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "BrokenPipeError" not in err and "Traceback" not in err


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", bytes(range(256)) * 8])
def test_fold_of_an_unreadable_file_is_one_line(content, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(content)
    assert main(["fold", str(junk), "-o", str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(junk) in err[0] and "is not an ultralytics checkpoint, a pickled module" in err[0]
    assert not (tmp_path / "out.pt").exists()


def test_restore_of_an_unreadable_or_foreign_file_says_what_it_expected(tmp_path):
    import torch
    import torchvision

    from orepa_convert import OREPAStateError, restore

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(OREPAStateError, match=r"junk.pth is not an orepa_convert checkpoint that torch.load can read"):
        restore(torchvision.models.resnet18(), junk)
    pickled = tmp_path / "module.pth"
    torch.save(torch.nn.Conv2d(1, 1, 1), pickled)  # a pickled object, not a weights-only checkpoint
    with pytest.raises(OREPAStateError, match="holds pickled objects") as info:
        restore(torchvision.models.resnet18(), pickled)
    assert "\n" not in str(info.value)
    plain = tmp_path / "plain.pth"
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    with pytest.raises(OREPAStateError, match="not an orepa_convert checkpoint: expected keys"):
        restore(torchvision.models.resnet18(), plain)
