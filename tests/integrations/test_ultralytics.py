"""The ultralytics workflow end to end, offline, on tiny generated datasets (imgsz 64, CPU)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("ultralytics")
from ultralytics import YOLO  # noqa: E402

from models import tensors  # noqa: E402
from offline import rel_err  # noqa: E402
from orepa_convert import OREPAConv, convert_to_orepa, fold_orepa, inspect_model  # noqa: E402
from orepa_convert.integrations import ultralytics as ul  # noqa: E402
from orepa_convert.state import carried_state, state_paths, unfold_carried  # noqa: E402
from orepa_convert.data.synthetic import make_dataset  # noqa: E402

TRAIN = dict(imgsz=64, batch=4, workers=0, device="cpu", plots=False, amp=False, exist_ok=True, verbose=False)


def _blocks(model) -> int:
    return sum(isinstance(m, OREPAConv) for m in model.modules())


def _reload(root: Path) -> YOLO:
    """The trained OREPA model from best.pt, OREPA-aware again (a YOLO object with a trainer cannot be deep-copied)."""
    model = YOLO(str(root / "runs" / "train" / "weights" / "best.pt"))
    convert_to_orepa(model)
    return model


def _outputs(model, x):
    """The primary prediction tensor(s) of an eval forward: the first element of every (nested) output."""
    model = copy.deepcopy(model).eval().float()
    with torch.no_grad():
        out = model(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    return torch.cat([t.flatten() for t in tensors(out)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """yolov8n converted, trained for 2 epochs; also keeps a resumable copy of last.pt after epoch 1."""
    root = tmp_path_factory.mktemp("yolo")
    data = make_dataset(root / "data", "detect")
    model = YOLO("yolov8n.yaml")
    convert_to_orepa(model)
    epoch1 = root / "epoch1.pt"

    def keep_epoch1(trainer):
        if trainer.epoch == 0 and not epoch1.exists():
            shutil.copy(trainer.last, epoch1)

    model.add_callback("on_model_save", keep_epoch1)
    model.train(data=str(data), epochs=2, project=str(root / "runs"), name="train", **TRAIN)
    return model, data, root, epoch1


def test_train_writes_stock_checkpoints_that_carry_the_orepa_state(trained):
    model, data, root, _ = trained
    weights = root / "runs" / "train" / "weights"
    assert type(model) is YOLO and "_smart_load" in model.__dict__  # no class swap; a per-object trainer router
    assert _blocks(model.model) == 0, "after training the object holds best.pt: the folded model"
    assert not (weights / "best_folded.pt").exists()
    for name in ("best.pt", "last.pt"):
        ckpt_model = torch.load(weights / name, weights_only=False)["model"]
        assert _blocks(ckpt_model) == 0 and "fuse" not in ckpt_model.__dict__
        state = carried_state(ckpt_model)
        assert state is not None and len(state_paths(state["orepa_state"])) == 39
    x = torch.rand(1, 3, 64, 64)
    folded_out = _outputs(model.model, x)
    restored = _reload(root)  # convert_to_orepa on a folded OREPA checkpoint restores its trained blocks
    assert _blocks(restored.model) == 39 and carried_state(restored.model) is None
    # best.pt stores fp16 tensors (as ultralytics does): the folded kernel and the branches were rounded apart
    assert rel_err(_outputs(restored.model, x), folded_out) <= 1e-2


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW", "MuSGD"])
def test_scales_get_no_weight_decay_with_every_optimizer(optimizer, tmp_path):
    """``model.train(optimizer=...)``: the optimizer ultralytics builds keeps every OREPA scale vector out of
    weight decay and still holds every parameter of the model it trains."""
    if optimizer == "MuSGD" and not hasattr(pytest.importorskip("ultralytics.optim"), "MuSGD"):
        pytest.skip("this ultralytics has no MuSGD")
    data = make_dataset(tmp_path / "data", "detect", n_train=4, n_val=2)
    model = YOLO("yolov8n.yaml")
    convert_to_orepa(model)
    seen = {}

    def inspect_optimizer(trainer):
        net = trainer.model
        seen["scales"] = {id(m.scales) for m in net.modules() if isinstance(m, OREPAConv)}
        seen["decayed"] = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] for p in g["params"]}
        seen["held"] = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
        seen["params"] = len(list(net.parameters()))

    model.add_callback("on_train_start", inspect_optimizer)
    model.train(data=str(data), epochs=1, optimizer=optimizer, weight_decay=5e-4, project=str(tmp_path / "runs"),
                name="opt", **TRAIN)
    assert len(seen["scales"]) == 39 and not seen["scales"] & seen["decayed"]
    assert seen["decayed"], "weight decay is on for the other weights"
    assert seen["held"] == seen["params"]


def test_val_and_predict_on_unfolded_model_use_a_cached_folded_copy_then_fold_gives_same_results(trained, tmp_path):
    _, data, root, _ = trained
    x = torch.rand(1, 3, 64, 64)
    unfolded, model = _reload(root), _reload(root)
    before = _outputs(model.model, x)
    fuse = unfolded.model.fuse
    assert isinstance(fuse, ul.FoldedFuse)
    m1 = unfolded.val(data=str(data), imgsz=64, batch=4, device="cpu", plots=False, verbose=False)
    copy1 = fuse._shared["folded"]
    unfolded.val(data=str(data), imgsz=64, batch=4, device="cpu", plots=False, verbose=False)
    assert fuse._shared["folded"] is copy1, "an unchanged model is folded once (validation deep-copies it first)"
    p1 = unfolded.predict(str(root / "data" / "images" / "val"), imgsz=64, device="cpu", conf=0.0, verbose=False)
    assert _blocks(unfolded.model) == 39, "val/predict must not fold the model in place"
    assert _blocks(copy1) == 0
    with torch.no_grad():
        next(unfolded.model.parameters()).mul_(1.0)  # any in-place change: the next deploy copy is fresh
    unfolded.model.fuse()
    assert fuse._shared["folded"] is not copy1
    fold_orepa(model)
    assert _blocks(model.model) == 0 and type(model) is YOLO and "_smart_load" not in model.__dict__
    assert rel_err(_outputs(model.model, x), before) <= 1e-5
    m2 = model.val(data=str(data), imgsz=64, batch=4, device="cpu", plots=False, verbose=False)
    p2 = model.predict(str(root / "data" / "images" / "val"), imgsz=64, device="cpu", conf=0.0, verbose=False)
    assert abs(m1.box.map - m2.box.map) <= 1e-4 and abs(m1.box.map50 - m2.box.map50) <= 1e-4
    for a, b in zip(p1, p2):
        assert a.boxes.data.shape == b.boxes.data.shape
        assert torch.allclose(a.boxes.data, b.boxes.data, atol=1e-3)
    path = tmp_path / "folded.pt"
    model.save(path)
    assert _blocks(torch.load(path, weights_only=False)["model"]) == 0


def test_converted_yolo_object_pickles_into_a_fresh_process(tmp_path):
    model = YOLO("yolov8n.yaml")
    convert_to_orepa(model)
    path = tmp_path / "yolo.pkl"
    path.write_bytes(pickle.dumps(model))
    code = ("import pickle, sys; m = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "from orepa_convert import OREPAConv; print(type(m).__name__, sum(isinstance(b, OREPAConv) for b in m.model.modules()))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "YOLO_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["YOLO", "39"]


STOCK = r"""
import json, sys
import onnxruntime as ort, numpy as np, torch
from ultralytics import YOLO
path, data, imgs = sys.argv[1:4]
m = YOLO(path)
metrics = m.val(data=data, imgsz=64, batch=4, device="cpu", plots=False, verbose=False)
res = m.predict(imgs, imgsz=64, device="cpu", verbose=False)
onnx = m.export(format="onnx", imgsz=64, simplify=False, device="cpu")
x = np.random.RandomState(0).rand(1, 3, 64, 64).astype(np.float32)
ort_out = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
model = m.model.float().eval()
with torch.no_grad():
    ref = model(torch.from_numpy(x))[0].numpy()
# fine-tuning from the file: what DetectionModel.load transfers into a freshly built model
from ultralytics.nn.tasks import DetectionModel
try:
    from ultralytics.nn.tasks import load_checkpoint
except ImportError:  # ultralytics < 8.4
    from ultralytics.nn.tasks import attempt_load_one_weight as load_checkpoint
from ultralytics.utils.torch_utils import intersect_dicts
fresh = DetectionModel(load_checkpoint(path)[0].yaml, nc=2, verbose=False)
moved = intersect_dicts(load_checkpoint(path)[0].float().state_dict(), fresh.state_dict())
print(json.dumps({"orepa_imported": any(k.startswith("orepa_convert") for k in sys.modules), "map": metrics.box.map,
                  "n_pred": len(res), "onnx": onnx, "ort_rel": float(np.abs(ort_out - ref).max() / np.abs(ref).max()),
                  "transferred": len(moved), "tensors": len(fresh.state_dict())}))
"""


def test_run_checkpoints_work_in_stock_ultralytics_and_onnx(trained, tmp_path):
    model, data, root, _ = trained
    folded = root / "runs" / "train" / "weights" / "best.pt"  # as the run wrote it
    env = {**os.environ, "YOLO_OFFLINE": "1"}  # PYTHONPATH kept: the ultralytics under test
    out = subprocess.run([sys.executable, "-c", STOCK, str(folded), str(data), str(root / "data" / "images" / "val")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["orepa_imported"] is False
    assert result["n_pred"] == 4
    assert result["ort_rel"] <= 1e-4
    assert result["transferred"] == result["tensors"], "fine-tuning from best.pt must transfer every tensor"
    # same ONNX graph as a plain model of the same architecture
    onnx = pytest.importorskip("onnx")
    plain = YOLO(str(folded))
    from ultralytics.nn.tasks import DetectionModel

    plain.model.load_state_dict(DetectionModel("yolov8n.yaml", nc=2, verbose=False).state_dict())
    plain_onnx = plain.export(format="onnx", imgsz=64, simplify=False, device="cpu")
    ops = lambda p: Counter(n.op_type for n in onnx.load(p).graph.node)  # noqa: E731
    assert ops(result["onnx"]) == ops(plain_onnx)


def test_resume_continues_with_orepa_structure_and_optimizer(trained, tmp_path):
    _, data, root, epoch1 = trained
    assert epoch1.exists()
    ckpt = torch.load(epoch1, weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["optimizer"] is not None
    resumed = YOLO(str(epoch1))
    assert _blocks(resumed.model) == 0 and carried_state(resumed.model) is not None
    convert_to_orepa(resumed)  # restores the OREPA model the checkpoint carries; converts nothing new
    assert _blocks(resumed.model) == 39
    expected = unfold_carried(copy.deepcopy(ckpt["ema"])).float().state_dict()
    at_start = {}
    resumed.add_callback("on_pretrain_routine_end", lambda t: at_start.update({k: v.clone() for k, v in t.ema.ema.state_dict().items()}))
    resumed.train(resume=True, **{k: v for k, v in TRAIN.items() if k in ("workers", "device")})
    assert at_start.keys() == expected.keys()
    assert all(torch.equal(at_start[k].float(), v.float()) for k, v in expected.items()), "resume restores the EMA exactly"
    assert _blocks(resumed.trainer.ema.ema) == 39
    assert resumed.trainer.start_epoch == 1 and resumed.trainer.epoch == 1


@pytest.mark.slow
@pytest.mark.parametrize("task, cfg", [("segment", "yolov8n-seg.yaml"), ("pose", "yolov8n-pose.yaml"),
                                       ("classify", "yolov8n-cls.yaml"), ("obb", "yolov8n-obb.yaml"),
                                       ("detect", "yolo11n.yaml"), ("detect", "yolo26n.yaml"),
                                       ("detect", "yolov10n.yaml")])
def test_every_task_trains_and_folds(task, cfg, tmp_path):
    from orepa_convert.cli.model_specs import is_shipped_yaml

    if not is_shipped_yaml(cfg):
        pytest.skip(f"this ultralytics does not ship {cfg}")
    data = make_dataset(tmp_path / "data", task)
    model = YOLO(cfg)
    _, report = convert_to_orepa(model, return_report=True)
    model.train(data=str(data), epochs=1, project=str(tmp_path / "runs"), name=task, **TRAIN)
    convert_to_orepa(model)  # the trained OREPA model back from the folded best.pt
    assert _blocks(model.model) == report.converted > 0
    x = torch.rand(1, 3, 64, 64)
    before = _outputs(model.model, x)
    fold_orepa(model)
    assert _blocks(model.model) == 0
    assert rel_err(_outputs(model.model, x), before) <= 1e-5
    model.model.fuse()  # ultralytics' own fuse (RepVGGDW in YOLOv10 included) works on the folded model


def test_train_with_ultralytics_compile_switch(tmp_path):
    """``model.train(compile=True)``: the trainer compiles the converted model (inductor, CPU) and trains it.

    The classification YOLO keeps this affordable: a cold inductor compile of its training step takes about 2
    minutes on 2 cores, yolov8n detection's about 7 (same trainer code path: compiled forward, eager loss)."""
    from ultralytics.utils import DEFAULT_CFG_DICT

    if "compile" not in DEFAULT_CFG_DICT:
        pytest.skip("this ultralytics has no compile= training option")
    data = make_dataset(tmp_path / "data", "classify", n_train=4, n_val=2, imgsz=32)
    model = YOLO("yolov8n-cls.yaml")
    _, report = convert_to_orepa(model, return_report=True)
    compiled: list[bool] = []
    model.add_callback("on_train_batch_end", lambda t: compiled.append(isinstance(t.model, torch._dynamo.eval_frame.OptimizedModule)))
    train = {**TRAIN, "imgsz": 32}
    model.train(data=str(data), epochs=1, compile=True, project=str(tmp_path / "runs"), name="compile", **train)
    assert compiled and all(compiled)
    convert_to_orepa(model)
    assert _blocks(model.model) == report.converted > 0
    x = torch.rand(1, 3, 32, 32)
    before = _outputs(model.model, x)
    fold_orepa(model)
    assert _blocks(model.model) == 0 and rel_err(_outputs(model.model, x), before) <= 1e-5


def test_rtdetr_fuse_of_unfolded_model_is_a_folded_copy_and_fold_then_fuse_works():
    from ultralytics import RTDETR

    model = RTDETR("rtdetr-l.yaml")
    _, report = convert_to_orepa(model, return_report=True)
    assert report.converted == _blocks(model.model) > 0
    x = torch.rand(1, 3, 160, 160)  # enough anchors for the decoder's 300 queries (older ultralytics needs them)

    def features(net):
        """Every layer's output before the decoder (whose top-k query selection is discontinuous)."""
        seen = []
        hooks = [layer.register_forward_hook(lambda m, i, o: seen.extend(tensors(o))) for layer in net.model[:-1]]
        _outputs(net, x)  # deep-copies the net: the hooks travel with it
        for h in hooks:
            h.remove()
        return seen

    before = features(model.model)
    deployed = model.model.fuse()  # what ultralytics predict/val/export run: folded and fused, the model untouched
    assert _blocks(deployed) == 0 and _blocks(model.model) == report.converted
    fold_orepa(model)
    model.model.fuse()
    for net in (deployed, model.model):
        after = features(net)
        assert len(after) == len(before) > 0
        assert max(rel_err(a, b) for a, b in zip(after, before)) <= 1e-4


def test_fold_checkpoint_cli(trained, tmp_path):
    from orepa_convert.cli import main

    _, _, root, _ = trained
    src = root / "runs" / "train" / "weights" / "best.pt"
    out = tmp_path / "stock.pt"
    assert main(["fold", str(src), "-o", str(out)]) == 0
    ckpt = torch.load(out, weights_only=False)
    assert _blocks(ckpt["model"]) == 0 and ckpt["optimizer"] is None and carried_state(ckpt["model"]) is None
    expected = torch.load(src, weights_only=False)["model"]  # already folded: the file's model, minus the OREPA state
    got = ckpt["model"].state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    assert main(["fold", str(tmp_path / "missing.pt"), "-o", str(out)]) == 2


def test_1x1_blocks_train_and_ride_in_stock_checkpoints(tmp_path):
    data = make_dataset(tmp_path / "data", "detect", n_train=4, n_val=2)
    model = YOLO("yolov8n.yaml")
    _, report = convert_to_orepa(model, kernel_sizes=(1, 3), return_report=True)
    kxk = inspect_model(YOLO("yolov8n.yaml")).converted  # 39 (ultralytics 8.4)
    assert report.converted > kxk  # 57 with ultralytics 8.4
    model.train(data=str(data), epochs=1, project=str(tmp_path / "runs"), name="pw", **TRAIN)
    best = torch.load(tmp_path / "runs" / "pw" / "weights" / "best.pt", weights_only=False)["model"]
    assert _blocks(best) == 0 and len(state_paths(carried_state(best)["orepa_state"])) == report.converted
    convert_to_orepa(model)
    pointwise = [m for m in model.model.modules() if isinstance(m, OREPAConv) and m.kernel_size == (1, 1)]
    assert _blocks(model.model) == report.converted and len(pointwise) == report.converted - kxk
    x = torch.rand(1, 3, 64, 64)
    before = _outputs(model.model, x)
    fold_orepa(model)
    assert rel_err(_outputs(model.model, x), before) <= 1e-5


@pytest.mark.parametrize("start", ["yaml", "pt"])
def test_pretrained_false_drops_the_start_weights_but_keeps_its_conversion(start, tmp_path):
    data = make_dataset(tmp_path / "data", "detect", n_train=4, n_val=2)
    model = YOLO("yolov8n.yaml")
    if start == "pt":
        torch.save({"model": copy.deepcopy(model.model).half(), "train_args": {}}, tmp_path / "plain.pt")
        model = YOLO(str(tmp_path / "plain.pt"))
    convert_to_orepa(model, init="scratch", branches=("origin", "pw", "dws"))
    model.train(data=str(data), epochs=1, pretrained=False, project=str(tmp_path / "runs"), name="scratch", **TRAIN)
    state = carried_state(torch.load(tmp_path / "runs" / "scratch" / "weights" / "last.pt", weights_only=False)["model"])
    (group,) = state["orepa_state"]["groups"]
    assert group["config"]["init"] == "scratch" and group["config"]["branches"] == ["origin", "pw", "dws"]
    assert len(group["paths"]) == 39


@pytest.fixture
def two_gpus(monkeypatch):
    """``model.train(...)`` as on a machine with two GPUs, replacing only what this one lacks.

    - The launcher decision: the trainer ``Model.train()`` builds (on ``device="cpu"``) is told it launches a
      2-process run, as ultralytics decides for ``device="0,1"``: ``ddp``/``world_size`` on 8.4, which decides in
      ``__init__``; ``args.device`` on 8.3, which decides in ``train()`` from it.
    - The launch: ultralytics' ``torch.distributed.run`` command for its generated worker script becomes one CPU
      process running that script (with ``device`` back to ``cpu`` where 8.3 wrote ``0,1`` into it). A real
      2-process gloo run is not possible unpatched: ultralytics' worker set-up calls ``torch.cuda.set_device``.

    Everything between (``Model.train()``, the trainer, ``generate_ddp_command`` deleting the run folder, the
    worker script rebuilding its trainer) is ultralytics' own code. Yields the finished worker processes."""
    from ultralytics.engine import trainer as engine

    launched: list[subprocess.CompletedProcess] = []
    base_init = engine.BaseTrainer.__init__

    def init(self, *args, **kwargs):
        base_init(self, *args, **kwargs)
        if hasattr(self, "ddp"):
            self.ddp, self.world_size = True, 2
        else:
            self.args.device = "0,1"

    def launch(cmd, check=False, **kwargs):
        assert "torch.distributed.run" in cmd and cmd[cmd.index("--nproc_per_node") + 1] == "2", cmd
        script = Path(cmd[-1])
        script.write_text(script.read_text().replace("'device': '0,1'", "'device': 'cpu'"))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
        launched.append(proc)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc

    monkeypatch.setattr(engine.BaseTrainer, "__init__", init)
    monkeypatch.setattr(engine, "subprocess", types.SimpleNamespace(run=launch))  # only the trainer's launch
    yield launched


def _record(checkpoint: Path) -> dict:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return carried_state(ckpt.get("ema") or ckpt["model"])


FROZEN = dict(optimizer="SGD", lr0=0.0, warmup_epochs=0, weight_decay=0.0)  # learning rate 0: the weights stay put


def _yaml_for(data: Path, folder: Path) -> str:
    """yolov8n's YAML with the dataset's number of classes (ultralytics would rebuild the head for it otherwise,
    and the rebuilt head's blocks start afresh in any run, DDP or not)."""
    import yaml
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load("yolov8n.yaml")
    cfg["nc"] = len(yaml.safe_load(data.read_text())["names"])
    path = folder / "yolov8n.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "yaml_file"}))
    return str(path)


def _perturbed_conversion(model: YOLO) -> dict[str, torch.Tensor]:
    """Convert with a non-default config (57 blocks; the default makes 39) and move every block tensor off what
    any conversion would initialise, so that only the user's own model can reproduce them; returns them."""
    convert_to_orepa(model, kernel_sizes=(1, 3), init="scratch")
    assert _blocks(model.model) > inspect_model(YOLO("yolov8n.yaml")).converted
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.model.modules():
            if isinstance(m, OREPAConv):
                for p in m.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    from orepa_convert.state import block_state_dict

    return {k: v.clone() for k, v in block_state_dict(model.model).items()}


def _assert_trained_blocks(record: dict, expected: dict[str, torch.Tensor]) -> None:
    """The run trained exactly the user's blocks: same paths and config, and (learning rate 0) the same tensors,
    up to the float16 rounding of ultralytics' checkpoints (relative 2**-11) and the EMA's float32 arithmetic."""
    paths = state_paths(record["orepa_state"])
    assert len(paths) == len({k.rsplit(".", 1)[0] for k in expected if k.endswith(".scales")})
    assert {g["config"]["init"] for g in record["orepa_state"]["groups"]} == {"scratch"}
    assert record["blocks"].keys() == expected.keys()
    for k, v in expected.items():
        if v.is_floating_point():
            torch.testing.assert_close(record["blocks"][k].float(), v, rtol=2.0**-10, atol=2.0**-24, msg=k)


@pytest.mark.parametrize("start", ["yaml", "pt"])
def test_multi_gpu_training_trains_the_users_conversion(start, tmp_path, two_gpus):
    """``model.train(...)`` launching ultralytics' DDP workers trains the model the user converted (blocks,
    config, weights), from a model built from a YAML and from a ``.pt``; ultralytics deletes the run folder
    before it launches, and the hand-off file does not live there."""
    data = make_dataset(tmp_path / "data", "detect", n_train=4, n_val=2)
    model = YOLO(_yaml_for(data, tmp_path))
    if start == "pt":
        torch.save({"model": copy.deepcopy(model.model).half(), "train_args": {}}, tmp_path / "plain.pt")  # as a .pt
        model = YOLO(str(tmp_path / "plain.pt"))
    expected = _perturbed_conversion(model)
    model.train(data=str(data), epochs=1, project=str(tmp_path / "runs"), name="ddp", **{**TRAIN, **FROZEN})
    assert len(two_gpus) == 1, "ultralytics launched its workers"
    wdir = tmp_path / "runs" / "ddp" / "weights"
    _assert_trained_blocks(_record(wdir / "last.pt"), expected)
    assert sorted(p.name for p in wdir.iterdir()) == ["best.pt", "last.pt"]  # nothing of ours left in the run
    args = torch.load(wdir / "last.pt", map_location="cpu", weights_only=False)["train_args"]
    assert Path(args["model"]).name == ("plain.pt" if start == "pt" else "yolov8n.yaml")  # the user's model name
    from ultralytics.utils import USER_CONFIG_DIR

    assert not list((Path(USER_CONFIG_DIR) / "DDP").glob(f"*{ul.HANDOFF_SUFFIX}")), "the hand-off file is removed"
    convert_to_orepa(model)  # the object holds best.pt: the trained OREPA model comes back
    assert _blocks(model.model) == len(state_paths(_record(wdir / "best.pt")["orepa_state"]))


def test_multi_gpu_resume_resumes_the_orepa_model(tmp_path, two_gpus):
    """An interrupted multi-GPU run (its epoch-1 checkpoint of 2), resumed as documented, with the workers
    launched again: they continue from the OREPA model the checkpoint carries."""
    data = make_dataset(tmp_path / "data", "detect", n_train=4, n_val=2)
    model = YOLO(_yaml_for(data, tmp_path))
    expected = _perturbed_conversion(model)
    model.train(data=str(data), epochs=2, save_period=1, project=str(tmp_path / "runs"), name="ddp",
                **{**TRAIN, **FROZEN})
    wdir = tmp_path / "runs" / "ddp" / "weights"
    interrupted = tmp_path / "interrupted.pt"
    shutil.copy(wdir / "epoch0.pt", interrupted)  # as if the run had stopped after epoch 1
    ckpt = torch.load(interrupted, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["optimizer"] is not None
    csv = tmp_path / "runs" / "ddp" / "results.csv"
    epochs = lambda: [int(float(r.split(",")[0])) for r in csv.read_text().strip().splitlines()[1:]]  # noqa: E731
    assert epochs() == [1, 2]
    resumed = YOLO(str(interrupted))
    convert_to_orepa(resumed)
    resumed.train(resume=True, **{k: v for k, v in TRAIN.items() if k in ("workers", "device")})
    assert len(two_gpus) == 2
    assert epochs() == [1, 2, 2]  # the resumed workers trained epoch 2 again, from the epoch-1 checkpoint
    _assert_trained_blocks(_record(wdir / "last.pt"), expected)


def test_multi_gpu_launch_rule_of_old_ultralytics():
    assert ul._world_size("0,1") == 2 and ul._world_size([0, 1, 2]) == 3
    assert ul._world_size("cpu") <= 1 and ul._world_size("0") == 1 and ul._world_size(None) <= 1


def test_convert_after_val_gives_the_trained_blocks_even_where_val_fuses_in_place(trained):
    """Ultralytics < 8.4 fuses the object's own model in val()/predict(); the documented convert_to_orepa(model)
    afterwards loads the checkpoint again (8.4 validates a copy, so nothing is reloaded there)."""
    _, data, root, _ = trained
    best = root / "runs" / "train" / "weights" / "best.pt"
    model = YOLO(str(best))
    model.val(data=str(data), imgsz=64, batch=4, device="cpu", plots=False, verbose=False)
    convert_to_orepa(model)
    expected = _reload(root)
    assert _blocks(model.model) == _blocks(expected.model) == 39
    x = torch.rand(1, 3, 64, 64)
    assert rel_err(_outputs(model.model, x), _outputs(expected.model, x)) <= 1e-6


def test_a_model_fused_after_saving_says_to_load_the_checkpoint_again(trained):
    from orepa_convert import OREPAStateError

    _, _, root, _ = trained
    plain = torch.load(root / "runs" / "train" / "weights" / "best.pt", weights_only=False)["model"].float()
    plain.fuse()  # ultralytics' own fuse, in place: every Conv takes in its BN
    with pytest.raises(OREPAStateError, match=r"fused in place .* load the checkpoint again"):
        convert_to_orepa(plain)
    assert _blocks(plain) == 0  # nothing was changed


def test_an_orepa_best_pt_is_restored_or_with_restore_false_converted_anew(trained):
    from orepa_convert import OREPAStateError

    _, _, root, _ = trained
    model = YOLO(str(root / "runs" / "train" / "weights" / "best.pt"))
    with pytest.raises(OREPAStateError, match=r"\(init differ\).*restore=False"):
        convert_to_orepa(model, init="preserve_live")  # the run trained init="preserve": not silently ignored
    assert _blocks(model.model) == 0 and carried_state(model.model) is not None
    _, report = convert_to_orepa(model, init="preserve_live", restore=False, return_report=True)
    assert not report.restored and report.converted == _blocks(model.model) == 39
    assert carried_state(model.model) is None
    assert {m.init for m in model.model.modules() if isinstance(m, OREPAConv)} == {"preserve_live"}
