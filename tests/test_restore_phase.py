"""convert_to_orepa on a model that carries a trained OREPA state (a folded checkpoint model of an OREPA run):
restore what it carries, or, told so, convert its folded weights anew; never silently ignore a config."""

from __future__ import annotations

import copy

import pytest
import torch

from models import Variety, randomise_bn
from offline import rel_err
from orepa_convert import OREPAConv, OREPAStateError, convert_to_orepa, inspect_model
from orepa_convert.state import carried_state, fold_carrying_state, state_paths


def _blocks(model) -> int:
    return sum(isinstance(m, OREPAConv) for m in model.modules())


@pytest.fixture
def carried():
    """A trained-looking OREPA model (init 'paper', one conv excluded), folded and carrying its state."""
    torch.manual_seed(0)
    model = randomise_bn(Variety())
    convert_to_orepa(model, init="paper", exclude=("dilated*",))
    n = _blocks(model)
    return fold_carrying_state(model).eval(), n


def test_no_config_restores_and_the_report_says_so(carried):
    model, n = carried
    _, report = convert_to_orepa(model, return_report=True)
    assert report.restored and report.converted == 0 and report.already_converted == n == _blocks(model)
    assert "restored the" in report.summary() and report.to_dict()["summary"]["restored"] is True


def test_a_config_that_describes_the_record_restores(carried):
    model, n = carried
    convert_to_orepa(model, init="paper", exclude=("dilated*",), restore=True)
    assert _blocks(model) == n and carried_state(model) is None


@pytest.mark.parametrize(("overrides", "what"), [({"init": "preserve_live"}, "init"), ({"exclude": ()}, "selection"),
                                                 ({"seed": 3}, "seed")])
def test_a_config_that_differs_from_the_record_is_a_one_line_error_naming_both_ways_out(carried, overrides, what):
    model, _ = carried
    for call in (convert_to_orepa, inspect_model):
        with pytest.raises(OREPAStateError, match=rf"\({what} differ\).*no config to restore.*restore=False") as info:
            call(model, **overrides)
        assert "\n" not in str(info.value)
    assert _blocks(model) == 0 and carried_state(model) is not None  # nothing was changed


def test_restore_false_converts_the_folded_weights_anew(carried):
    model, _ = carried
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        folded = model(x)
    report = inspect_model(model, init="preserve_live", restore=False)
    assert not report.restored and report.converted > 0 and carried_state(model) is not None
    _, done = convert_to_orepa(model, init="preserve_live", restore=False, return_report=True)
    assert done.converted == report.converted == _blocks(model) and carried_state(model) is None
    assert {b.init for b in model.modules() if isinstance(b, OREPAConv)} == {"preserve_live"}
    with torch.no_grad():
        assert rel_err(model(x), folded) <= 1e-5  # preserve_live starts from the folded function


def test_inspect_reports_what_convert_would_do_without_changing_the_model(carried):
    model, n = carried
    before = copy.deepcopy(model.state_dict())
    report = inspect_model(model)
    assert report.restored and not report.applied and report.already_converted == n
    assert "would restore" in report.summary()
    assert _blocks(model) == 0 and carried_state(model) is not None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(state_paths(carried_state(model)["orepa_state"])) == n


def test_restore_true_on_a_plain_model_is_an_error():
    with pytest.raises(OREPAStateError, match="carries no trained OREPA state"):
        convert_to_orepa(Variety(), restore=True)
