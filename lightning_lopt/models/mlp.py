"""``MLPClassifier``: a small multi-layer perceptron classifier (the first-run model)."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["MLPClassifier"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLPClassifier(pl.LightningModule):
    """A fully connected classifier trained with cross-entropy; logs loss and accuracy per split.

    The optimizer is not part of the model: with ``lightning-lopt`` / LightningCLI it comes from
    the config's ``optimizer:`` section, and a subclass may define its own
    ``configure_optimizers``. Without either, :meth:`configure_optimizers` falls back to Adam.

    Args:
        input_dim: Number of input features (40 for MNIST-1D).
        hidden_dims: Widths of the hidden layers (the MNIST-1D reference MLP has two of 100);
            empty gives a linear classifier.
        num_classes: Number of classes.
        activation: Non-linearity after each hidden layer.
    """

    def __init__(
        self,
        input_dim: int = 40,
        hidden_dims: Sequence[int] = (100, 100),
        num_classes: int = 10,
        activation: Literal["relu", "gelu", "tanh", "silu"] = "relu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}.")
        hidden_dims = [int(h) for h in hidden_dims]
        # Saved after the conversion: a list, not the default tuple, is plain YAML in hparams.yaml.
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden_dims:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes)
        self.test_acc = MulticlassAccuracy(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(batch, num_classes)`` of inputs ``(batch, input_dim)``."""
        return self.net(x.flatten(1))

    def _shared_step(self, batch: tuple[Tensor, Tensor], split: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        # Cross-entropy in float32 even under autocast, so 16-bit runs compare with 32-bit ones.
        loss = F.cross_entropy(logits.float(), y)
        metric(logits.detach(), y)
        on_step = split == "train"
        self.log(f"{split}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=split != "test")
        self.log(f"{split}_acc", metric, on_step=False, on_epoch=True, prog_bar=split == "val")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of a training batch; logs ``train_loss`` and ``train_acc``."""
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Logs ``val_loss`` and ``val_acc`` (shown in the progress bar)."""
        return self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Logs ``test_loss`` and ``test_acc``."""
        return self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class indices of a batch (``(x, y)`` or just ``x``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Fallback when nothing injects an optimizer: ``torch.optim.Adam(lr=1e-3)``.

        LightningCLI's ``optimizer:`` section replaces this method on the instance; to train with
        the learned optimizer in plain Python, override it (see ``examples/train_mnist1d.py``).
        """
        return torch.optim.Adam(self.parameters(), lr=1e-3)
