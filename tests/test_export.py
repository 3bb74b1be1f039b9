"""Exporting an unfolded converted model: TorchScript-based ONNX export and jit.trace record each block as its folded
conv (the model's own numbers); jit.script refuses with one error that says to fold; torch.export and the default
(dynamo) ONNX exporter, which cannot record the folded conv, warn to fold first."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torchvision

from offline import rel_err
from orepa_convert import OREPAConv, convert_to_orepa, fold_orepa


def _converted_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    convert_to_orepa(model, init="paper")
    with torch.no_grad():  # every branch contributes, as after training
        for block in model.modules():
            if isinstance(block, OREPAConv):
                block.scales.normal_(0.0, 0.5)
    return model.eval()


def _onnx(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(model, x, buffer, dynamo=False, input_names=["x"], output_names=["y"])
    return buffer.getvalue()


def test_legacy_onnx_export_of_unfolded_model_is_the_folded_graph_with_its_numbers():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _converted_resnet18()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    exported = _onnx(model, x)
    out = ort.InferenceSession(exported, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert rel_err(torch.from_numpy(out), expected) <= 1e-4
    folded = fold_orepa(copy.deepcopy(model))
    ops = [n.op_type for n in onnx.load_from_string(exported).graph.node]
    assert ops == [n.op_type for n in onnx.load_from_string(_onnx(folded, x)).graph.node]
    assert "MatMul" not in ops and ops.count("Conv") == 20


def test_jit_trace_of_unfolded_model_passes_its_checks_and_matches():
    model = _converted_resnet18()
    x = torch.randn(2, 3, 64, 64)
    traced = torch.jit.trace(model, x)  # check_trace=True: runs the sanity checks that used to fail
    with torch.no_grad():
        assert rel_err(traced(x), model(x)) <= 1e-6
    assert "aten::bmm" not in str(traced.inlined_graph)


def test_jit_script_of_unfolded_model_says_to_fold_and_changes_nothing():
    model = _converted_resnet18()
    blocks = sum(isinstance(m, OREPAConv) for m in model.modules())
    with pytest.raises(RuntimeError, match=r"fold_orepa\(model\) first"):
        torch.jit.script(model)
    assert sum(isinstance(m, OREPAConv) for m in model.modules()) == blocks
    scripted = torch.jit.script(fold_orepa(copy.deepcopy(model)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(scripted(x), model(x)) <= 1e-5


def test_torch_export_of_unfolded_eval_model_warns_to_fold_and_is_exact():
    model = _converted_resnet18()
    x = torch.randn(2, 3, 64, 64)
    with pytest.warns(UserWarning, match=r"fold_orepa\(model\) before torch.export"):
        program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert rel_err(program.module()(x), model(x)) <= 1e-5
    folded = fold_orepa(copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the folded model exports without the warning
        folded_program = torch.export.export(folded, (x,))
    convs = [n for n in folded_program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 20 and len(folded_program.graph.nodes) < len(program.graph.nodes)


def test_torch_export_of_training_mode_model_records_the_generation_without_warning():
    model = _converted_resnet18().train()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(deprecat|pin_memory).*")
        program = torch.export.export(model, (x,))
    params = dict(program.named_parameters())
    assert any(name.endswith("weight_taps") for name in params)  # the branches are the program's parameters


def test_default_dynamo_onnx_export_of_unfolded_model_warns_to_fold():
    """torch.onnx.export's default (dynamo) exporter goes through torch.export: it warns, and the folded model
    exports the plain graph without a warning."""
    pytest.importorskip("onnxscript")
    model = _converted_resnet18()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"torch.onnx.export\(dynamo=True\)"):
        unfolded = torch.onnx.export(model, (x,), dynamo=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*unfolded OREPA.*")
        folded = torch.onnx.export(fold_orepa(copy.deepcopy(model)), (x,), dynamo=True)
    assert len(folded.model.graph) < len(unfolded.model.graph)
