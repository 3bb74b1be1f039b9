"""The conversion record: read off the blocks, restored without tracing, saved with the weights, folded by the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from offline import rel_err
from orepa_convert import (
    OREPAStateError,
    convert_to_orepa,
    fold_orepa,
    load_state_dict,
    orepa_state,
    restore,
    restore_from_orepa_state,
    save,
    state_from_layout,
)
from orepa_convert.cli import main
from orepa_convert.state import carried_state, fold_carrying_state, state_paths, unfold_carried

CUSTOM = dict(branches=("origin", "pw", "dws"), dws_expansion=4, pw_kxk_width=2, seed=7, exclude=["layer4.*"])


def _custom():
    model = torchvision.models.resnet18(num_classes=10)
    convert_to_orepa(model, **CUSTOM)
    with torch.no_grad():  # trained-looking branches, so that a wrong restore shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_record_is_small_json_and_restores_the_same_structure_and_seeds():
    model = _custom()
    state = orepa_state(model)
    assert json.loads(json.dumps(state)) == state
    assert state["format"] == 2 and len(state["groups"]) == 1
    config = state["groups"][0]["config"]
    assert config["branches"] == ["origin", "pw", "dws"] and config["dws_expansion"] == 4 and config["seed"] == 7
    assert not any(p.startswith("layer4.") for p in state_paths(state)) and len(state_paths(state)) == 13
    torch.manual_seed(0)
    fresh = torchvision.models.resnet18(num_classes=10)
    restore_from_orepa_state(fresh, state)
    assert orepa_state(fresh) == state
    restore_from_orepa_state(fresh, state)  # restoring twice changes nothing
    assert orepa_state(fresh) == state
    # same seeds: the fresh blocks' random branch weights equal a fresh conversion's
    torch.manual_seed(0)
    again = torchvision.models.resnet18(num_classes=10)
    convert_to_orepa(again, **CUSTOM)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values()))


def test_save_restore_exact_and_the_file_loads_weights_only_into_stock_models(tmp_path):
    model = _custom()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "orepa.pth"
    save(model, path, epoch=3)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 3
    restored = restore(torchvision.models.resnet18(num_classes=10), path).eval()
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
        plain = torchvision.models.resnet18(num_classes=10).eval()
        plain.load_state_dict(ckpt["state_dict"])  # the folded plain weights
        assert rel_err(plain(x), model(x)) <= 1e-5


def test_record_rebuilt_from_saved_layouts_and_old_format_read():
    model = _custom()
    fresh = torchvision.models.resnet18(num_classes=10)
    restore_from_orepa_state(fresh, state_from_layout(fresh, model.state_dict()))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    v1 = {"format": 1, "config": {"init": "preserve", "branches": ["origin", "avg"]}, "paths": ["conv1"]}
    one = torchvision.models.resnet18()
    restore_from_orepa_state(one, v1)
    assert state_paths(orepa_state(one)) == ["conv1"]


@pytest.mark.parametrize("state, match", [
    ({"format": 9}, "format 9"),
    ({"format": 2, "groups": [{"config": {}, "paths": ["nope"]}]}, "does not have"),
    ({"format": 2, "groups": [{"config": {}, "paths": ["fc"]}]}, "cannot be converted"),
    ({"format": 2, "groups": [{"config": {"colour": 1}, "paths": []}]}, "unknown field"),
])
def test_bad_records_are_clear_errors(state, match):
    with pytest.raises(OREPAStateError, match=match):
        restore_from_orepa_state(torchvision.models.resnet18(), state)


def test_orepa_weights_into_a_plain_model_say_to_fold_first():
    model = _custom()
    with pytest.raises(OREPAStateError, match="fold the weights first"):
        load_state_dict(torchvision.models.resnet18(num_classes=10), model.state_dict())
    fold_orepa(model)
    load_state_dict(torchvision.models.resnet18(num_classes=10), model.state_dict())  # folded: loads


def test_folded_model_carrying_its_state_round_trips_exactly():
    model = _custom()
    folded = fold_carrying_state(model)
    assert carried_state(folded) is not None and not any(type(m).__name__ == "OREPAConv" for m in folded.modules())
    back = unfold_carried(folded)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))
    assert carried_state(back) is None
    again = fold_carrying_state(model)
    convert_to_orepa(again)  # convert_to_orepa restores instead of converting afresh
    assert orepa_state(again) == orepa_state(model)


@pytest.mark.parametrize("kind", ["state_dict", "orepa_save"])
def test_cli_folds_any_config_without_selection_flags(kind, tmp_path, capsys):
    model = _custom()
    src = tmp_path / "in.pth"
    if kind == "state_dict":
        torch.save(model.state_dict(), src)
    else:
        save(model, src)
    out = tmp_path / "out.pth"
    assert main(["fold", str(src), "-o", str(out), "--model", "torchvision:resnet18", "--num-classes", "10"]) == 0
    plain = torchvision.models.resnet18(num_classes=10).eval()
    plain.load_state_dict(torch.load(out, weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(plain(x), model(x)) <= 1e-5
    assert main(["fold", str(src), "-o", str(out)]) == 2
    assert "--model" in capsys.readouterr().err


def test_files_written_before_block_specs_load_and_compute_the_same():
    """tests/data/pre_blockspec_*: written by the block before it held a BlockSpec (a whole pickled model, and a
    state_dict with its record); both load into this version and compute the same float64 outputs."""
    from pathlib import Path

    from torch import nn

    from orepa_convert import OREPAConv

    data = Path(__file__).parent / "data"
    saved = torch.load(data / "pre_blockspec_state.pt", weights_only=True)
    pickled = torch.load(data / "pre_blockspec_model.pt", weights_only=False)
    blocks = [m for m in pickled.modules() if isinstance(m, OREPAConv)]
    assert len(blocks) == 3 and blocks[0].live_scale == 0.25 and blocks[2].branches == ("origin", "avg", "pw", "dws")
    with torch.no_grad():
        y = pickled.eval()(saved["x"])
    # float64 on another machine's kernels (the file's y came from one CPU): equal to float64 rounding
    assert rel_err(y, saved["y"]) <= 1e-12
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, (3, 5), padding=(1, 2)), nn.BatchNorm2d(6)).double()
    record = json.loads((data / "pre_blockspec_record.json").read_text())
    restore_from_orepa_state(fresh, record)
    fresh.load_state_dict(saved["state_dict"])
    assert orepa_state(fresh)["groups"] == record["groups"]
    assert [b.block_config() for b in blocks] == [m.block_config() for m in fresh.modules() if isinstance(m, OREPAConv)]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(saved["x"]), y)  # the same blocks, on this machine: bit for bit
        folded = fold_orepa(fresh)
        assert rel_err(folded(saved["x"]), saved["y"]) <= 1e-12
