"""``EvalWithTrueParameters``: evaluate and save at the true parameters, train at the attended point."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lightning_lopt.optimizer import HierarchicalRNNOptimizer

__all__ = ["EvalWithTrueParameters", "hrnn_optimizers"]


def hrnn_optimizers(trainer: "pl.Trainer") -> list[HierarchicalRNNOptimizer]:
    """Every :class:`HierarchicalRNNOptimizer` among ``trainer.optimizers`` (unwrapping Lightning's wrappers)."""
    found = []
    for opt in trainer.optimizers:
        inner = getattr(opt, "optimizer", opt)  # LightningOptimizer wraps the user's optimizer
        if isinstance(inner, HierarchicalRNNOptimizer):
            found.append(inner)
    return found


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


class EvalWithTrueParameters(Callback):
    """Switch :class:`~lightning_lopt.HierarchicalRNNOptimizer` to the true parameters outside training.

    With attention, the model holds the attended (look-ahead) point while it trains. This callback
    calls ``optimizer.eval()`` for validation, test and predict, and ``optimizer.train()`` when
    training resumes. Checkpoints always hold the true parameters in ``state_dict`` and the matching
    eval-mode optimizer state, so a model loaded for inference is the trained one and resuming
    from the checkpoint continues the same trajectory.
    """

    def _set(self, trainer: "pl.Trainer", training: bool) -> None:
        for opt in hrnn_optimizers(trainer):
            opt.train() if training else opt.eval()

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set(trainer, True)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set(trainer, True)

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set(trainer, False)

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._set(trainer, True)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._set(trainer, True)

    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set(trainer, False)

    def on_predict_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set(trainer, False)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After fit, the user's model holds the trained (true) parameters.
        self._set(trainer, False)

    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        opts = hrnn_optimizers(trainer)
        if not opts or "optimizer_states" not in checkpoint:
            return
        modes = [opt.training for opt in opts]
        for opt in opts:
            opt.eval()
        try:
            # state_dict tensors share storage with the live parameters: clone before switching back.
            params = {id(p): name for name, p in pl_module.named_parameters()}
            live = pl_module.state_dict()
            for name in params.values():
                if name in checkpoint.get("state_dict", {}):
                    checkpoint["state_dict"][name] = live[name].detach().clone()
            for i, opt in enumerate(trainer.optimizers):
                inner = getattr(opt, "optimizer", opt)
                if isinstance(inner, HierarchicalRNNOptimizer):
                    # Through the strategy: ModelParallelStrategy keys it by name for torch.distributed.checkpoint.
                    checkpoint["optimizer_states"][i] = _clone(trainer.strategy.optimizer_state(inner))
        finally:
            for opt, training in zip(opts, modes):
                opt.train() if training else opt.eval()
