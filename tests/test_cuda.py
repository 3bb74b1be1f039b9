"""CUDA: convert/fold on the device, fp32 / TF32 / AMP (float16 + GradScaler, bfloat16) training, no host
synchronisation in a training step, torch.compile (default and CUDA graphs), channels_last, and the ultralytics
trainer with amp=True and compile=True. Skipped without CUDA; `python benchmarks/gpu_suite.py` runs it first."""

from __future__ import annotations

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available (these tests run on a GPU machine)", allow_module_level=True)

from amp_checks import (  # noqa: E402
    autocast_finite,
    batch,
    blocks_under_autocast_are_plain_convs,
    converted_pair,
    fold_error,
    train_with_scaler,
)
from models import randomise_bn  # noqa: E402
from offline import rel_err  # noqa: E402
from orepa_convert import OREPAConv, convert_to_orepa, fold_orepa  # noqa: E402

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _highest_precision():
    """Every test starts with full-precision float32 matmuls and convolutions, and leaves it so."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def test_convert_and_fold_on_the_device_and_buffers_follow_to():
    _, model = converted_pair("cpu")
    model = randomise_bn(model).to(DEVICE)
    blocks = [m for m in model.modules() if isinstance(m, OREPAConv)]
    assert blocks and all(t.device.type == torch.device(DEVICE).type for b in blocks for t in (*b.buffers(), *b.parameters()))
    x, _ = batch(DEVICE)
    assert fold_error(model, x) <= 1e-5
    plain = randomise_bn(converted_pair(DEVICE)[0])
    convert_to_orepa(plain)  # conversion of a model that lives on the GPU
    assert all(p.device.type == torch.device(DEVICE).type for p in plain.parameters())


def test_fp32_and_tf32_training_steps_fold_exactly():
    for tf32 in (False, True):
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        _, model = converted_pair(DEVICE)
        x, y = batch(DEVICE)
        train_with_scaler(model, x, y, torch.float32, steps=2)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        # TF32 rounds each convolution's inputs, so the check that the fold is exact runs at full precision.
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        assert fold_error(model, x) <= 1e-5, f"tf32={tf32}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_amp_blocks_are_plain_convs_of_fp32_kernels_and_training_folds_exactly(dtype):
    """Under CUDA autocast each block is bitwise the plain conv of its float32 kernel (cuDNN deterministic), a step
    is finite, and AMP training folds exactly (see tests/test_amp.py for why no bound comes from a measured error)."""
    plain, orepa = converted_pair(DEVICE)
    x, y = batch(DEVICE)
    assert blocks_under_autocast_are_plain_convs(orepa, x, dtype) == 17
    assert autocast_finite(orepa, x, y, dtype) and autocast_finite(plain, x, y, dtype)
    train_with_scaler(orepa, x, y, dtype, steps=3)
    assert fold_error(orepa, x) <= 1e-5


def test_fp16_scaler_skip_leaves_blocks_untouched():
    _, model = converted_pair(DEVICE)
    x, y = batch(DEVICE)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = train_with_scaler(model, x, y, torch.float16, steps=1, init_scale=2.0**120)
    assert scaler.get_scale() < 2.0**120
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_training_step_reads_nothing_back_to_the_host():
    _, model = converted_pair(DEVICE)
    x, y = batch(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # lazy initialisation (cuBLAS handles, optimizer state) may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_equals_eager(mode):
    """Each of three SGD steps of the compiled model (inductor; CUDA graphs with reduce-overhead) gives the loss
    and gradients eager mode gives from the same state: a kernel generated once and replayed would not."""
    _, eager = converted_pair(DEVICE)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, mode=mode)
    opt = torch.optim.SGD(compiled_model.parameters(), lr=0.01, momentum=0.9)
    x, y = batch(DEVICE)

    def step(run, owner):
        owner.train()
        loss = torch.nn.functional.cross_entropy(run(x), y)
        owner.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach().clone(), {n: p.grad.detach().clone() for n, p in owner.named_parameters()}

    for i in range(3):
        eager.load_state_dict(compiled_model.state_dict())  # the same parameters and BN statistics
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        loss, grads = step(compiled, compiled_model)
        want_loss, want_grads = step(eager, eager)
        assert rel_err(loss, want_loss) <= 1e-4, f"step {i}"
        for name, grad in want_grads.items():
            assert rel_err(grads[name], grad) <= 1e-3, f"step {i}: {name}"
        opt.step()


def test_channels_last_trains_and_folds():
    _, model = converted_pair(DEVICE)
    reference = copy.deepcopy(model)
    model = model.to(memory_format=torch.channels_last)
    x, y = batch(DEVICE)
    xl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model.eval(), reference.eval()
        assert rel_err(model(xl), reference(x)) <= 1e-5
    train_with_scaler(model, xl, y, torch.float32, steps=2)
    assert fold_error(model, xl) <= 1e-5


def test_ultralytics_amp_and_compile_training_folds_to_the_trained_model(tmp_path):
    pytest.importorskip("ultralytics")
    from ultralytics import YOLO
    from ultralytics.utils import DEFAULT_CFG_DICT

    from orepa_convert.data.synthetic import make_dataset

    data = make_dataset(tmp_path / "data", "detect", n_train=8, n_val=4)
    model = YOLO("yolov8n.yaml")
    convert_to_orepa(model)
    used_amp = []
    model.add_callback("on_train_start", lambda trainer: used_amp.append(bool(trainer.amp)))
    extra = {"compile": True} if "compile" in DEFAULT_CFG_DICT else {}
    model.train(data=str(data), epochs=1, imgsz=64, batch=4, workers=0, device=0, amp=True, plots=False,
                project=str(tmp_path / "runs"), name="cuda", exist_ok=True, verbose=False, **extra)
    assert used_amp == [True], "ultralytics' AMP check turned AMP off (see the log), so AMP was not exercised"
    best = tmp_path / "runs" / "cuda" / "weights" / "best.pt"
    from_file = YOLO(str(best)).model.float().to(DEVICE).eval()  # folded on save, stored in float16
    trained = YOLO(str(best))
    convert_to_orepa(trained)  # the trained OREPA model the file's record carries
    unfolded = trained.model.float().to(DEVICE).eval()
    assert sum(isinstance(m, OREPAConv) for m in unfolded.modules()) > 0
    x = torch.rand(2, 3, 64, 64, device=DEVICE)
    first = lambda t: t[0] if isinstance(t, (list, tuple)) else t  # noqa: E731
    with torch.no_grad():
        reference = first(unfolded(x))
        folded_here = first(fold_orepa(copy.deepcopy(unfolded))(x))
        stored = first(from_file(x))
    assert rel_err(folded_here, reference) <= 1e-5
    assert rel_err(stored, reference) <= 5e-3  # the file's weights are float16
