"""fold_orepa: exact folding, restored state_dicts, BN fusion for deployment."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import SharedConv, Variety, randomise_bn, tensors
from offline import rel_err
from orepa_convert import OREPAConv, convert_to_orepa, fold_orepa
from orepa_convert.cli.model_specs import build_model


def _train_a_little(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        loss = sum(t.square().mean() for t in tensors(model(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_folded_state_dict_loads_into_fresh_original_model():
    torch.manual_seed(0)
    model = randomise_bn(build_model("timm:resnet18"))
    x = torch.randn(2, 3, 64, 64)
    convert_to_orepa(model)
    _train_a_little(model, x)
    with torch.no_grad():
        y = model(x)
    fold_orepa(model)
    fresh = build_model("timm:resnet18").eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(fresh(x), y) <= 1e-5


def test_fold_plain_model_changes_nothing():
    model = Variety()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, report = fold_orepa(model, return_report=True)
    assert report.folded == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_fuse_bn_gives_exact_deploy_form():
    model = randomise_bn(Variety())
    x = torch.randn(2, 3, 12, 12)
    convert_to_orepa(model)
    _train_a_little(model, x)
    with torch.no_grad():
        y = model(x)
    _, report = fold_orepa(model, fuse_bn=True, return_report=True)
    assert report.folded == 6 and report.bn_fused == 6
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.reflect[0].bias is not None
    with torch.no_grad():
        assert rel_err(model(x), y) <= 1e-5


def test_fuse_bn_keeps_act_of_batchnorm_act_and_handles_frozen_bn():
    from timm.layers import ConvNormAct
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(ConvNormAct(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), FrozenBatchNorm2d(8)).eval()
    randomise_bn(model)
    with torch.no_grad():
        model[2].running_var.uniform_(0.5, 1.5)
        model[2].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    convert_to_orepa(model)
    with torch.no_grad():
        y = model(x)
    fold_orepa(model, fuse_bn=True)
    assert type(model[0].bn) is nn.ReLU  # BatchNormAct2d -> its activation
    assert type(model[2]) is nn.Identity
    with torch.no_grad():
        assert rel_err(model(x), y) <= 1e-5


def test_fuse_bn_keeps_shared_and_statless_bns_and_says_why():
    shared = randomise_bn(SharedConv()).eval()
    convert_to_orepa(shared)
    _, report = fold_orepa(shared, fuse_bn=True, return_report=True)
    assert report.bn_fused == 0 and "shared conv" in report.records[0].note
    assert isinstance(shared.bn1, nn.BatchNorm2d) and type(shared.conv) is nn.Conv2d
    nostats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    convert_to_orepa(nostats)
    _, report = fold_orepa(nostats, fuse_bn=True, return_report=True)
    assert report.bn_fused == 0 and "no running statistics" in report.records[0].note
    assert "fused 0 batch norm" in str(report)


def test_block_survives_and_timm_reparameterize_model_folds():
    timm_utils = pytest.importorskip("timm.utils")
    model = randomise_bn(build_model("timm:repvgg_a0")).eval()
    x = torch.randn(1, 3, 64, 64)
    convert_to_orepa(model)
    with torch.no_grad():
        for b in (m for m in model.modules() if isinstance(m, OREPAConv)):
            b.scale("avg").fill_(0.3)
        y = model(x)
    deployed = timm_utils.reparameterize_model(model)  # calls fuse() on the blocks
    assert not any(isinstance(m, OREPAConv) for m in deployed.modules())
    with torch.no_grad():
        assert rel_err(deployed(x), y) <= 1e-5


def test_silent_no_ops_warn_with_the_reason():
    model = Variety()
    with pytest.warns(UserWarning, match=r"no OREPA blocks, nothing was folded \(it was never converted"):
        fold_orepa(model)
    with pytest.warns(UserWarning, match="fuse_bn=True only fuses the batch norms after OREPA blocks"):
        fold_orepa(model, fuse_bn=True)
    with pytest.warns(UserWarning, match="exclude glob 'dilatd.*' matches no conv path"):
        convert_to_orepa(model, exclude=["dilatd.*"])
    assert sum(isinstance(m, OREPAConv) for m in model.modules()) == 6  # the typo excluded nothing
