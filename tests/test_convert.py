"""convert_to_orepa / fold_orepa on a model zoo and on hand-made corner cases."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
import torchvision
from torch import nn

from models import DataDependent, OneAndThreeD, SharedConv, TwoConsumers, Variety, randomise_bn, tensors
from offline import rel_err
from orepa_convert import OREPAConfig, OREPAConv, convert_to_orepa, fold_orepa, inspect_model
from orepa_convert.cli.model_specs import build_model

ZOO = [
    # spec, expected eligible (= converted) k x k conv -> BN pairs
    ("yolov8n.yaml", 39),
    ("yolo11n.yaml", 42),
    ("yolov8n-seg.yaml", 47),
    ("yolov8n-pose.yaml", 45),
    ("yolov8n-cls.yaml", 17),
    ("timm:resnet18", 17),
    ("timm:tf_efficientnet_b0", 17),  # Conv2dSame ('same' padding at run time)
    ("timm:mobilenetv3_small_100", 12),
    ("timm:regnetx_002", 14),
    ("timm:vgg11_bn", 8),  # pre_logits is untraceable
    ("timm:ghostnet_100", 42),
    ("timm:repvgg_a0", 22),
    ("torchvision:resnet18", 17),
    ("torchvision:mobilenet_v3_small", 12),
    ("torchvision:shufflenet_v2_x0_5", 20),
    ("torchvision:googlenet", 20),
]


def _outputs(model, x):
    with torch.no_grad():
        return [t.clone() for t in tensors(model(x))]


def _assert_close(got, expected, tol):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert rel_err(a, b) <= tol


def _structure(model):
    return {name: type(m) for name, m in model.named_modules()}, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _sgd_steps(model, x, steps=2):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    for _ in range(steps):
        loss = sum(t.float().square().mean() for t in tensors(model(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()


def check_round_trip(model: nn.Module, x: torch.Tensor, expected: int, **config) -> None:
    """Convert -> outputs unchanged -> train -> fold exact -> structure restored -> idempotent."""
    randomise_bn(model).eval()
    types0, state0 = _structure(model)
    y0 = _outputs(model, x)
    rng = torch.get_rng_state()
    _, report = convert_to_orepa(model, return_report=True, **config)
    assert torch.equal(torch.get_rng_state(), rng), "conversion touched the global RNG"
    assert report.eligible == expected and report.converted == expected, report.summary()
    blocks = [m for m in model.modules() if isinstance(m, OREPAConv)]
    assert len(set(map(id, blocks))) == expected
    assert all(not b.training for b in blocks), "eval mode not preserved"
    _assert_close(_outputs(model, x), y0, 1e-6)
    _, again = convert_to_orepa(model, return_report=True)
    assert again.converted == 0 and again.already_converted == expected
    _sgd_steps(model, x)
    assert any(torch.count_nonzero(b.scale("dws")) for b in blocks), "the new branches did not move"
    model.eval()
    y_trained = _outputs(model, x)
    fold_orepa(model)
    assert not any(isinstance(m, OREPAConv) for m in model.modules())
    _assert_close(_outputs(model, x), y_trained, 1e-5)
    assert _structure(model) == (types0, state0)
    fold_orepa(model)  # folding a folded model changes nothing
    assert _structure(model) == (types0, state0)


@pytest.mark.slow
@pytest.mark.parametrize("spec, expected", ZOO, ids=[s for s, _ in ZOO])
def test_model_zoo(spec, expected):
    torch.manual_seed(0)
    model = build_model(spec)
    check_round_trip(model, torch.randn(2, 3, 64, 64), expected)


def test_ultralytics_framework_attributes_kept():
    model = build_model("yolov8n.yaml")
    before = [(m.i, m.f, m.type, m.np) for m in model.model]
    convert_to_orepa(model)
    assert [(m.i, m.f, m.type, m.np) for m in model.model] == before
    assert isinstance(model.model[0].conv, OREPAConv)
    assert model.model[0].conv.in_channels == 3  # attributes code like BaseModel.load inspects


def test_ultralytics_conv2_is_not_eligible():
    from ultralytics.nn.modules.conv import Conv2

    model = nn.Sequential(Conv2(4, 8, 3), Conv2(8, 8, 3))
    with pytest.warns(UserWarning, match="nothing converted"):
        _, report = convert_to_orepa(model, return_report=True)
    assert report.converted == 0
    reasons = {r.path: r.reason for r in report.records}
    assert reasons["0.conv"] == reasons["1.conv"] == "output feeds an add, not a batch norm"
    assert reasons["0.cv2"].startswith("single-tap (1x1) kernel")


def test_shared_conv_called_twice_is_converted_once():
    model = SharedConv()
    check_round_trip(model, torch.randn(2, 4, 8, 8), 1)
    convert_to_orepa(model)
    assert isinstance(model.conv, OREPAConv)


def test_conv_with_two_consumers_is_left_alone():
    model = TwoConsumers()
    with pytest.warns(UserWarning, match="no eligible conv"):
        _, report = convert_to_orepa(model, return_report=True)
    assert type(model.conv) is nn.Conv2d
    assert "2 consumers" in report.records[0].reason


def test_padding_dilation_groups_depthwise_nonsquare_even():
    check_round_trip(Variety(), torch.randn(2, 3, 12, 12), 6)


def test_conv1d_and_conv3d():
    check_round_trip(OneAndThreeD(), torch.randn(2, 3, 64), 2)


def test_untraceable_top_level_forward():
    model = DataDependent()
    report = inspect_model(model)
    assert [u.path for u in report.untraced] == [""] and report.untraced[0].label == "<root>"
    assert "TraceError" in report.untraced[0].reason or "control flow" in report.untraced[0].reason
    check_round_trip(model, torch.randn(2, 3, 8, 8), 2)


def test_timm_batchnorm_act_and_torchvision_frozen_bn():
    from timm.layers import ConvNormAct
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(ConvNormAct(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), FrozenBatchNorm2d(8))
    report = inspect_model(model)
    assert report.converted == 2
    assert report.records[0].act == "ReLU"
    check_round_trip(model, torch.randn(2, 3, 8, 8), 2)


def test_selection_rules_and_precedence():
    def paths(**cfg):
        model = Variety()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_to_orepa(model, **cfg)
        return sorted(n.split(".")[0] for n, m in model.named_modules() if isinstance(m, OREPAConv))

    everything = ["depthwise", "dilated", "even", "grouped", "nonsquare", "reflect"]
    assert paths() == everything
    assert paths(include=["grouped.*", "depthwise.*", "reflect.*"], exclude=["depthwise.*"]) == ["grouped", "reflect"]
    assert paths(kernel_sizes=3) == ["dilated", "grouped", "reflect"]
    assert paths(kernel_sizes=[(1, 3), 2]) == ["even", "nonsquare"]
    assert paths(min_channels=9) == ["depthwise"]
    assert paths(depthwise=False) == [p for p in everything if p != "depthwise"]
    assert paths(filter=lambda name, conv: conv.out_channels == 12) == ["depthwise", "grouped"]
    # the filter only narrows: it never brings back what exclude removed
    assert paths(exclude=["grouped.*"], filter=lambda name, conv: True) == [p for p in everything if p != "grouped"]


def test_config_object_and_overrides():
    model = Variety()
    convert_to_orepa(model, OREPAConfig(init="paper", branches=("origin", "pw")), seed=3)
    block = model.reflect[0]
    assert block.branches == ("origin", "pw") and block.init == "paper"


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: convert_to_orepa("yolov8n"), TypeError, "expected a torch.nn.Module"),
        (lambda: convert_to_orepa(Variety(), init="random"), ValueError, "init"),
        (lambda: convert_to_orepa(Variety(), colour="red"), TypeError, "unknown OREPAConfig field"),
        (lambda: convert_to_orepa(Variety(), config={"init": "paper"}), TypeError, "OREPAConfig"),
        (lambda: fold_orepa(42), TypeError, "expected a torch.nn.Module"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_nothing_eligible_warns_and_leaves_model_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"single-tap"):
        out = convert_to_orepa(model)
    assert out is model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_wrappers_are_unwrapped():
    model = Variety()
    compiled = torch.compile(model)  # not compiled until called
    assert convert_to_orepa(compiled) is compiled
    assert isinstance(model.reflect[0], OREPAConv)
    dp = nn.DataParallel(Variety())
    convert_to_orepa(dp)
    assert isinstance(dp.module.reflect[0], OREPAConv)
    fold_orepa(dp)
    fold_orepa(compiled)
    assert type(model.reflect[0]) is nn.Conv2d and type(dp.module.reflect[0]) is nn.Conv2d


def test_dtype_device_mode_and_hooks_preserved():
    model = Variety().double().train()
    seen = []
    model.reflect.register_forward_hook(lambda m, i, o: seen.append("parent"))
    model.dilated[0].register_forward_hook(lambda m, i, o: seen.append("conv"))
    convert_to_orepa(model)
    block = model.dilated[0]
    assert block.training and block.scales.dtype == torch.float64
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert seen == ["parent", "conv"]


def test_report_table_dict_and_logging(caplog):
    model = Variety()
    with caplog.at_level(logging.INFO, logger="orepa_convert"):
        _, report = convert_to_orepa(model, exclude=["even.*"], return_report=True)
    assert "converted 5/6 eligible convs" in caplog.text
    table = report.table()
    assert "dilated.0" in table and "excluded by 'even.*'" in table and "single-tap" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert data["summary"] == {
        "candidates": 7, "eligible": 6, "converted": 5, "already_converted": 0,
        "extra_params": report.extra_params, "applied": True, "restored": False,
    }
    grown = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in Variety().parameters())
    assert report.extra_params == grown > 0
    dry = inspect_model(Variety(), exclude=["even.*"])
    assert dry.extra_params == report.extra_params and not dry.applied


def test_import_and_plain_conversion_touch_no_rng_and_import_no_framework():
    """In a fresh process: importing the library leaves the global RNG where it was, and converting and folding a
    torchvision model imports neither ultralytics nor timm."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "torch.manual_seed(0); expected = torch.rand(4)\n"
        "torch.manual_seed(0)\n"
        "import orepa_convert, torchvision\n"
        "same = torch.equal(torch.rand(4), expected)\n"
        "m = torchvision.models.resnet18()\n"
        "_, report = orepa_convert.convert_to_orepa(m, return_report=True)\n"
        "orepa_convert.fold_orepa(m)\n"
        "print(same, report.converted, 'ultralytics' in sys.modules, 'timm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["True", "17", "False", "False"], out.stderr[-2000:]


def test_torchvision_video_models_convert_their_conv_subclasses_and_fold_to_them():
    from torchvision.models.video.resnet import Conv3DNoTemporal, Conv3DSimple
    model = randomise_bn(torchvision.models.video.mc3_18(num_classes=3)).eval()
    classes = {p: type(m) for p, m in model.named_modules()}
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        expected = model(x)
    _, report = convert_to_orepa(model, init="paper", return_report=True)
    assert report.converted == 17 and report.eligible == 17  # every conv -> BN, 16 of them Conv3DSimple
    with torch.no_grad():
        unfolded = model(x)
        fold_orepa(model)
        assert rel_err(model(x), unfolded) <= 1e-5
    assert {p: type(m) for p, m in model.named_modules()} == classes
    assert sum(type(m) in (Conv3DSimple, Conv3DNoTemporal) for m in model.modules()) == 16
    assert expected.shape == unfolded.shape


def test_conv_subclass_that_overrides_forward_is_reported_not_converted():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(ScaledConv(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    _, report = convert_to_orepa(model, return_report=True)
    assert report.converted == 1 and isinstance(model[2], OREPAConv) and type(model[0]) is ScaledConv
    reason = next(r.reason for r in report.records if r.path == "0")
    assert "ScaledConv overrides forward" in reason
