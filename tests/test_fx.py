"""torch.fx symbolic traces of converted models (torchvision feature extraction, FX QAT, timm's fx features):
every block stays one opaque call whose module the GraphModule keeps, so its parameters stay trainable."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from models import randomise_bn
from offline import rel_err
from orepa_convert import OREPAConv, convert_to_orepa, fold_orepa


def _converted_resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=5)
    convert_to_orepa(model, init="paper")  # every branch live, so every branch parameter gets a gradient
    return model


def _params(module: nn.Module) -> dict[int, nn.Parameter]:
    return {id(p): p for p in module.parameters()}


def _sgd_steps(model: nn.Module, head, steps: int = 3, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """A few SGD steps (momentum, so updates compound) on ``head(model(x))``; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=gen, dtype=dtype)
        loss = head(model(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def test_feature_extractor_keeps_every_block_and_trains_like_the_eager_model():
    """The graph trains what the eager model trains. Checked in float64: momentum SGD compounds each step's
    rounding (in float32, three steps of two equally valid orderings drift apart by ~1e-5 on some CPUs), while
    in float64 the same drift stays near 1e-14, so 1e-10 separates rounding from a real difference on any CPU."""
    eager = _converted_resnet18().double().train()
    graph_source = copy.deepcopy(eager)
    graph = create_feature_extractor(graph_source, return_nodes={"fc": "out"})
    blocks = [m for m in graph_source.modules() if isinstance(m, OREPAConv)]
    assert len(blocks) == 17
    # every parameter of the converted model is in the graph (the very same tensors), none baked as constants
    assert set(_params(graph)) == set(_params(graph_source))
    assert sum(isinstance(m, OREPAConv) for m in graph.modules()) == 17
    assert not any(name.startswith("_tensor_constant") for name, _ in graph.named_buffers())

    initial = [b.weight_taps.detach().clone() for b in blocks]
    eager_losses = _sgd_steps(eager, lambda y: y, dtype=torch.float64)
    graph_losses = _sgd_steps(graph, lambda y: y["out"], dtype=torch.float64)
    for a, b in zip(graph_losses, eager_losses):
        assert rel_err(a, b) <= 1e-10
    for (name, p), q in zip(eager.named_parameters(), graph_source.parameters()):
        assert rel_err(q, p) <= 1e-10, name
    assert all(not torch.equal(t, b.weight_taps) for t, b in zip(initial, blocks))  # the graph trained the branches

    # the trained graph folds to the same numbers, and so does the model it shares its parameters with
    graph.eval(), graph_source.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = graph(x)["out"]
        source_folded = fold_orepa(copy.deepcopy(graph_source))(x)
        fold_orepa(graph)  # the graph calls whatever module is at each block's path: a plain conv now
        after = graph(x)["out"]
    assert sum(isinstance(m, OREPAConv) for m in graph.modules()) == 0
    assert rel_err(after, before) <= 1e-5 and rel_err(source_folded, before) <= 1e-5


def test_feature_extractor_in_eval_mode_records_blocks_and_matches():
    model = randomise_bn(_converted_resnet18()).double().eval()  # float64: one forward, two equal computations
    graph = create_feature_extractor(model, return_nodes={"layer3": "mid", "fc": "out"})
    assert set(_params(graph)) == set(_params(model))
    targets = [n.target for n in graph.graph.nodes if n.op == "call_module"]
    assert "layer1.0.conv1" in targets  # the block, opaque
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = graph(x)
        assert rel_err(out["out"], model(x)) <= 1e-12


def test_symbolic_trace_keeps_gradients_for_every_branch_parameter():
    model = _converted_resnet18().double().train()  # float64: momentum steps compound rounding (see above)
    eager = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    steps = dict(steps=2, dtype=torch.float64)
    for a, b in zip(_sgd_steps(traced, lambda y: y, **steps), _sgd_steps(eager, lambda y: y, **steps)):
        assert rel_err(a, b) <= 1e-10  # the second step sees the first step's branch updates
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_qat_prepare_fx_keeps_every_parameter_and_moves_the_branches():
    quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")
    from torch.ao.quantization import get_default_qat_qconfig_mapping

    model = _converted_resnet18().train()
    count = sum(p.numel() for p in model.parameters())
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, OREPAConv)}
    before = {n: b.weight_taps.detach().clone() for n, b in blocks.items()}
    with pytest.warns(Warning):  # torch announces FX quantization's deprecation; the call itself works
        prepared = quantize_fx.prepare_qat_fx(model, get_default_qat_qconfig_mapping("fbgemm"), (torch.randn(1, 3, 32, 32),))
    assert sum(p.numel() for p in prepared.parameters()) == count
    kept = {n: m for n, m in prepared.named_modules() if isinstance(m, OREPAConv)}
    assert kept.keys() == blocks.keys()
    _sgd_steps(prepared, lambda y: y, steps=2)
    for name, block in kept.items():
        assert not torch.equal(block.weight_taps, before[name]), name
        assert block.weight_taps.grad is not None and block.scales.grad is not None


def test_timm_fx_features_of_a_conv2d_same_model():
    timm = pytest.importorskip("timm")
    from timm.models import create_feature_extractor as timm_feature_extractor

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4)
    _, report = convert_to_orepa(model, init="paper", return_report=True)
    same = [m for m in model.modules() if isinstance(m, OREPAConv) and type(m.conv).__name__ == "Conv2dSame"]
    assert same, "the model should have blocks around timm's Conv2dSame"
    model.train()
    graph = timm_feature_extractor(model, return_nodes={"bn2": "head"})  # timm's fx leaf rules
    graph(torch.randn(2, 3, 64, 64))["head"].square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("classifier")]  # the head is not on the path
    assert missing == []
    model.double().eval()  # float64: the graph and the model compute the same thing
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        graph = timm_feature_extractor(model, return_nodes={"global_pool": "pool"})
        assert rel_err(graph(x)["pool"].flatten(1), expected) <= 1e-12
