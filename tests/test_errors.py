"""One error family: every error orepa_convert raises on purpose is an OREPAError (and the built-in class Python
users expect), and the CLI turns any of them into one line and exit 2."""

from __future__ import annotations

import pytest
import torch
import torchvision

import orepa_convert as oc
from orepa_convert.cli import main
from orepa_convert.compare import CompareError
from orepa_convert.compare.pool import PoolError
from orepa_convert.errors import CompareRunError


@pytest.mark.parametrize(("cls", "builtin"), [(oc.OREPAStateError, ValueError), (oc.OREPALayoutError, RuntimeError),
                                              (CompareError, ValueError), (PoolError, ValueError),
                                              (CompareRunError, RuntimeError)])
def test_every_error_is_an_orepa_error_and_the_builtin_users_expect(cls, builtin):
    assert issubclass(cls, oc.OREPAError) and issubclass(cls, builtin)


def test_is_converted():
    model = torchvision.models.resnet18(num_classes=3)
    assert not oc.is_converted(model) and not oc.is_converted(None) and not oc.is_converted("resnet18")
    oc.convert_to_orepa(model)
    assert oc.is_converted(model) and oc.is_converted(torch.nn.DataParallel(model))
    oc.fold_orepa(model)
    assert not oc.is_converted(model)


def test_a_block_layout_error_is_one_cli_line(tmp_path, capsys):
    model = oc.convert_to_orepa(torchvision.models.resnet18(num_classes=3))
    sd = model.state_dict()
    key = next(k for k in sd if k.endswith("_extra_state"))
    sd[key] = torch.tensor([99, 63, 8, 8])  # a format this version does not know
    torch.save(sd, tmp_path / "sd.pt")
    code = main(["fold", str(tmp_path / "sd.pt"), "-o", str(tmp_path / "out.pt"), "--model", "torchvision:resnet18",
                 "--num-classes", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("orepa-convert: error:"), err
