"""Train a small MLP on MNIST-1D with the hierarchical RNN learned optimizer, in plain Python.

    python examples/train_mnist1d.py --max-epochs 10

The lines that matter: ``configure_optimizers`` returns ``HierarchicalRNNOptimizer``, and the
Trainer gets the ``EvalWithTrueParameters`` callback, so that validation, testing and checkpoints
use the true parameters rather than the look-ahead point the optimizer trains at, and the
``TrainingProgress`` callback, which tells the optimizer the run's length (the learned step
decays over its last half).
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lopt import HierarchicalRNNOptimizer
from lightning_lopt.callbacks import EvalWithTrueParameters, TrainingProgress
from lightning_lopt.data import MNIST1DDataModule


class Classifier(pl.LightningModule):
    """A two-hidden-layer MLP for the 40-sample MNIST-1D signals."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> HierarchicalRNNOptimizer:
        # weights="default": the shipped meta-trained weights. lr scales the learned step.
        return HierarchicalRNNOptimizer(self.parameters(), weights="default", lr=1.0)


def main(max_epochs: int = 10, **trainer_kwargs: Any) -> float:
    """Train, then return the validation accuracy at the true parameters."""
    # A small model: one CPU thread is faster than torch's pool of all cores (lightning-lopt does the same).
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = MNIST1DDataModule(batch_size=128, seed=42)
    model = Classifier()
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[EvalWithTrueParameters(), TrainingProgress()], **trainer_kwargs)
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    print(f"validation accuracy: {metrics['val_acc']:.4f}")
    return metrics["val_acc"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=10)
    main(parser.parse_args().max_epochs)
