"""The Lightning callback with real ``lightning.Trainer`` runs (CPU): conversion before the optimizer, the record
in every checkpoint, resume, loading outside a Trainer, folding, bf16-mixed and a 2-process DDP run (gloo)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from integrations.lightning_module import Classifier, loader  # noqa: E402
from offline import rel_err  # noqa: E402
from orepa_convert import OREPAConv, OREPAStateError  # noqa: E402
from orepa_convert.integrations.lightning import OREPA  # noqa: E402
from orepa_convert.state import state_paths  # noqa: E402

HERE = Path(__file__).parent


class Probe(Callback):
    """What the run looks like when training starts."""

    def on_train_start(self, trainer, module):
        opt = trainer.optimizers[0]
        self.scales = {id(m.scales) for m in module.modules() if isinstance(m, OREPAConv)}
        self.decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
        self.optimised = {id(p) for g in opt.param_groups for p in g["params"]}
        self.start = {k: v.clone() for k, v in module.state_dict().items()}


def _trainer(tmp_path, epochs, *callbacks, **kwargs):
    # Checkpoints only where a test asks for them (resnet18 with every branch: ~300 MB each).
    kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks), **kwargs)


def _blocks(module) -> list[OREPAConv]:
    return [m for m in module.modules() if isinstance(m, OREPAConv)]


def test_fit_trains_the_branches_records_the_conversion_and_folds_exactly(tmp_path):
    module, probe = Classifier(), Probe()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last="link")
    _trainer(tmp_path, 2, OREPA(init="paper", module_attr="model"), probe, ckpt).fit(module, loader())
    blocks = _blocks(module)
    assert len(blocks) == 17  # every kxk conv of resnet18
    assert probe.scales and not probe.scales & probe.decayed  # the usual 1-D split keeps the scales out of decay
    assert {id(p) for b in blocks for p in b.parameters()} <= probe.optimised  # the optimizer holds the branches
    assert all(not torch.equal(b.weight_taps, probe.start[f"model.{n}.weight_taps"])
               for n, b in module.model.named_modules() if isinstance(b, OREPAConv))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["orepa_state"]["module_attr"] == "model"
    assert len(state_paths(saved["orepa_state"]["record"])) == 17
    module.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = module(x)
        OREPA.fold(module, "model")
        assert not _blocks(module) and rel_err(module(x), before) <= 1e-5


def test_resume_continues_from_the_saved_orepa_state_and_load_from_checkpoint_gives_the_orepa_module(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last="link")
    trained = Classifier()
    _trainer(tmp_path, 1, OREPA(init="paper"), ckpt).fit(trained, loader())
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    probe = Probe()
    resumed = Classifier()  # plain: the callback converts it as the saving run did, then the weights load
    with pytest.raises(OREPAStateError, match="another OREPA conversion"):
        _trainer(tmp_path, 2, OREPA(init="preserve")).fit(Classifier(), loader(), ckpt_path=last)
    trainer = _trainer(tmp_path, 2, OREPA(init="paper"), probe)
    trainer.fit(resumed, loader(), ckpt_path=last)
    assert probe.start.keys() == saved["state_dict"].keys()
    assert all(torch.equal(probe.start[k], v) for k, v in saved["state_dict"].items()), "resume starts from the file"
    assert trainer.global_step == 2 * saved["global_step"] and len(_blocks(resumed)) == 17
    loaded = OREPA.load_from_checkpoint(Classifier, last)
    assert len(_blocks(loaded)) == 17
    x = torch.randn(2, 3, 32, 32)
    trained.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))


def test_bf16_mixed_trains_finite_and_folds_exactly(tmp_path):
    module = Classifier()
    _trainer(tmp_path, 1, OREPA(init="paper"), precision="bf16-mixed").fit(module, loader())
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in module.parameters())
    module.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = module(x)
        folded = OREPA.fold(copy.deepcopy(module))
        assert rel_err(folded(x), before) <= 1e-5


def test_fold_on_end(tmp_path):
    module = Classifier()
    _trainer(tmp_path, 1, OREPA(fold_on_end=True)).fit(module, loader())
    assert not _blocks(module) and type(module.model.conv1) is torch.nn.Conv2d


def test_ddp_two_cpu_processes(tmp_path):
    """``strategy="ddp"`` with 2 CPU processes (gloo), launched by Lightning itself from a script."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "lightning_module.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["blocks"] for r in ranks] == [17, 17] and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["digest"] == ranks[1]["digest"], "DDP kept both processes' OREPA parameters in sync"
