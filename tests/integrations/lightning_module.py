"""A small LightningModule for the Lightning tests (also run as a script by the DDP test)."""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Classifier(L.LightningModule):
    """torchvision resnet18 with the usual weight-decay split (1-D tensors out of decay)."""

    def __init__(self, num_classes: int = 3, lr: float = 0.05, decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = torchvision.models.resnet18(num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.parameters())
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": self.hparams.decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=self.hparams.lr, momentum=0.9)


def loader(n: int = 16, batch: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch)


if __name__ == "__main__":  # the DDP test: python lightning_module.py OUT_DIR
    from orepa_convert.integrations.lightning import OREPA

    out = sys.argv[1]
    module = Classifier()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", callbacks=[OREPA(init="paper")],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    trainer.fit(module, loader())
    blocks = sum(type(m).__name__ == "OREPAConv" for m in module.modules())
    digest = float(sum(p.double().sum() for p in module.parameters()))
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"blocks": blocks, "digest": digest, "world_size": trainer.world_size}, fh)
