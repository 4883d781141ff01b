"""``TrainingProgress`` tells the learned optimizer the training horizon; ``MetaTrainingProgressBar`` counts meta-steps."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from lightning_lopt.callbacks.eval_mode import hrnn_optimizers

__all__ = ["MetaTrainingProgressBar", "TrainingProgress"]


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


class MetaTrainingProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting meta-steps against ``max_steps``.

    Meta-training reads an endless stream of task seeds, so Lightning's bar knows no total and,
    after ``--ckpt_path last``, shows the resumed step over ``?`` with a rate measured from zero.
    This bar shows ``global_step / max_steps`` and a rate over the steps this run has made.
    """

    def on_train_epoch_start(self, trainer: "pl.Trainer", *args: Any) -> None:
        """Start the bar at the resumed step, with ``max_steps`` as its total."""
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if trainer.max_steps is not None and trainer.max_steps > 0 and not bar.disable:
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step
            bar.refresh()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        """Move the bar to the current meta-step."""
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
