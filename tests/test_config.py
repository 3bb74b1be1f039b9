"""OREPAConfig: validation, canonical forms, and its JSON form in the conversion record."""

from __future__ import annotations

import json

import pytest

from orepa_convert import BRANCHES, OREPAConfig
from orepa_convert.state import config_from_dict, config_to_dict


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init="random"), "init"),
        (dict(branches=("origin", "foo")), "branches"),
        (dict(branches=()), "branches"),
        (dict(branches=("avg", "pw")), "needs the 'origin' branch"),
        (dict(pw_kxk_width=0), "pw_kxk_width"),
        (dict(dws_expansion=-1), "dws_expansion"),
        (dict(min_channels=-1), "min_channels"),
        (dict(kernel_sizes=("x",)), "kernel_sizes"),
        (dict(filter=3), "filter"),
        (dict(init="preserve_live", live_scale=0), "live_scale must be a positive number"),
        (dict(init="preserve_live", live_scale="0.5"), "live_scale must be a positive number"),
        (dict(init="preserve", live_scale=0.5), "applies to init='preserve_live' only"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OREPAConfig(**kwargs)


def test_config_replace_and_kernel_filter():
    cfg = OREPAConfig(kernel_sizes=(3, (1, 3)), branches=["pw", "origin"])
    assert cfg.branches == ("origin", "pw")
    assert cfg.allows_kernel((3, 3)) and cfg.allows_kernel((1, 3)) and not cfg.allows_kernel((5, 5))
    with pytest.raises(TypeError, match="unknown OREPAConfig field"):
        cfg.replace(colour="red")
    assert cfg.replace(seed=4).seed == 4


def test_equal_configs_hash_equal_and_filters_do_not_count():
    a = OREPAConfig(branches=["pw", "origin"], filter=lambda n, m: True)
    b = OREPAConfig(branches=("origin", "pw"))
    assert a == b and hash(a) == hash(b)
    assert OREPAConfig().branches == BRANCHES


def test_block_fields_round_trip_through_json():
    cfg = OREPAConfig(init="paper", branches=("avg", "dws"), pw_kxk_width=2, dws_expansion=4, seed=9, eval_cache=False,
                      exclude=["head.*"])
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert set(data) == {"init", "branches", "pw_kxk_width", "dws_expansion", "seed", "eval_cache"}
    assert config_from_dict(data) == cfg.replace(exclude=())


def test_live_scale_is_in_the_record_only_when_set():
    plain = config_to_dict(OREPAConfig(init="preserve_live"))
    assert "live_scale" not in plain  # records of default blocks read exactly as before
    quiet = OREPAConfig(init="preserve_live", live_scale=0.25)
    data = json.loads(json.dumps(config_to_dict(quiet)))
    assert data["live_scale"] == 0.25 and config_from_dict(data) == quiet
