"""Typed statuses and report serialisation."""

from __future__ import annotations

import json

from models import Variety
from orepa_convert import Status, convert_to_orepa, inspect_model


def test_statuses_are_an_enum_that_serialises_as_its_value():
    report = inspect_model(Variety(), exclude=["even.*"])
    statuses = {r.status for r in report.records}
    assert all(isinstance(s, Status) for s in statuses)
    assert Status.SELECTED in statuses and Status.NOT_SELECTED in statuses
    data = json.loads(json.dumps(report.to_dict()))
    assert {c["status"] for c in data["convs"]} == {s.value for s in statuses}
    assert report.paths() == report.paths(Status.SELECTED)


def test_converted_then_already_converted():
    model = Variety()
    _, first = convert_to_orepa(model, return_report=True)
    _, second = convert_to_orepa(model, return_report=True)
    assert first.paths(Status.CONVERTED) == second.paths(Status.ALREADY) != []
    assert all(s.is_block for s in (Status.CONVERTED, Status.ALREADY)) and not Status.INELIGIBLE.is_block
