"""Ctrl-C and SIGTERM end a run at the end of the current step, with a checkpoint that resumes it exactly."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["CheckpointOnInterrupt"]


class CheckpointOnInterrupt(Checkpoint):
    """A checkpoint where a run was stopped, as Lightning's ``OnExceptionCheckpoint``, with Ctrl-C made graceful.

    On SIGTERM, Lightning finishes the current step and stops with an exception that this callback
    answers with a checkpoint. The first Ctrl-C (SIGINT) now does the same, instead of interrupting
    the step half-way (which would leave the tasks in flight, their random streams and the
    meta-parameters out of step with each other); a second Ctrl-C interrupts at once, as usual.
    A fit that stops early without an exception (the trainer's ``max_time``, early stopping) also
    leaves this checkpoint, at the step where it stopped: ``ModelCheckpoint`` writes its
    ``last.ckpt`` only every so many steps. The file is named like ``ModelCheckpoint``'s last
    checkpoints (``last-interrupted.ckpt``), so ``--ckpt_path last`` picks the newest of the two
    and a run resumes from where it was stopped; it is removed when a fit runs to its end. (Unlike
    ``OnExceptionCheckpoint``, this does not make every ``fit`` resume from ``last`` by itself.)

    Args:
        dirpath: Directory of the checkpoint (the ``ModelCheckpoint``'s, so that ``last`` finds it).
        filename: Its name, without ``.ckpt``.
    """

    def __init__(self, dirpath: str, filename: str = "last-interrupted") -> None:
        super().__init__()
        if not filename:
            raise ValueError("The filename cannot be empty.")
        self.dirpath = dirpath
        self.filename = filename
        self._previous: Optional[Any] = None
        self._keep = False

    @property
    def ckpt_path(self) -> str:
        """Where the checkpoint is written."""
        return os.path.join(self.dirpath, self.filename + ".ckpt")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Route the first Ctrl-C to Lightning's end-of-step stop."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous = signal.getsignal(signal.SIGINT)

        def stop_after_this_step(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            rank_zero_info("\nCtrl-C: stopping after this step and saving a checkpoint (again to stop at once) ...")
            trainer._signal_connector.received_sigterm = True

        signal.signal(signal.SIGINT, stop_after_this_step)

    def on_exception(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """Save the checkpoint and say where it is."""
        trainer.save_checkpoint(self.ckpt_path)
        rank_zero_info(f"Saved {self.ckpt_path}; continue with --ckpt_path last.")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save where a fit stopped before ``max_steps`` (a time limit, early stopping)."""
        self._keep = trainer.should_stop and 0 < trainer.max_steps and trainer.global_step < trainer.max_steps
        if self._keep:
            trainer.save_checkpoint(self.ckpt_path)
            rank_zero_info(f"Stopped at step {trainer.global_step}: saved {self.ckpt_path}; continue with --ckpt_path last.")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Restore the Ctrl-C handler; remove the checkpoint of an earlier stop unless this fit stopped early."""
        self._restore()
        if not self._keep:
            trainer.strategy.remove_checkpoint(self.ckpt_path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
