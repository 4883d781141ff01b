"""``TrainingProgress``: tell the learned optimizer the training horizon, from the Trainer."""

from __future__ import annotations

import math
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_lopt.callbacks.eval_mode import hrnn_optimizers

__all__ = ["TrainingProgress"]


class TrainingProgress(Callback):
    """Set ``total_steps`` of every :class:`~lightning_lopt.HierarchicalRNNOptimizer` when training starts.

    Weights meta-trained with a training-progress input (``progress_input``) read
    ``steps taken / total_steps`` at each step. This callback sets the horizon to ``total_steps``
    if given, else to ``trainer.estimated_stepping_batches`` (which accounts for ``max_steps``,
    ``max_epochs``, gradient accumulation and devices); an unbounded run (infinite estimate) leaves
    the horizon unknown. A horizon the optimizer was built with is kept unless ``override``.
    Weights without that input ignore the horizon, so the callback is harmless with them.

    Args:
        total_steps: The horizon in optimizer steps; None: the Trainer's estimate.
        override: Replace a horizon the optimizer already has.
    """

    def __init__(self, total_steps: Optional[int] = None, override: bool = False) -> None:
        self.total_steps = total_steps
        self.override = override

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        horizon = self.total_steps
        if horizon is None:
            estimate = float(trainer.estimated_stepping_batches)
            horizon = int(estimate) if math.isfinite(estimate) and estimate >= 1 else None
        if horizon is None:
            return
        for opt in hrnn_optimizers(trainer):
            if opt.total_steps is None or self.override:
                opt.total_steps = horizon
