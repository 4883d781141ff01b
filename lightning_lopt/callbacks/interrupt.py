"""Ctrl-C and SIGTERM end a run at the end of the current step, with a checkpoint that resumes it exactly."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["CheckpointOnInterrupt"]


class CheckpointOnInterrupt(Checkpoint):
    """A checkpoint where a run was stopped, as Lightning's ``OnExceptionCheckpoint``, with Ctrl-C made graceful.

    On SIGTERM, the run finishes the current step and stops with an exception that this callback
    answers with a checkpoint. The first Ctrl-C (SIGINT) does the same, instead of interrupting
    the step half-way (which would leave the tasks in flight, their random streams and the
    meta-parameters out of step with each other); a second Ctrl-C interrupts at once, as usual.
    Under DDP only rank 0's signal counts (it forwards SIGTERM to the processes it launched, as
    Lightning does), and every rank learns of it at the end of each step from one broadcast, so
    all of them stop after the same step. Lightning's own SIGTERM handler broadcasts from inside
    the handler, which deadlocks when the signal lands while the ranks are in another collective
    (a signal to every process, as ``kill`` of the process group sends).
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
        self._previous_term: Optional[Any] = None
        self._requested = False
        self._keep = False

    @property
    def ckpt_path(self) -> str:
        """Where the checkpoint is written."""
        return os.path.join(self.dirpath, self.filename + ".ckpt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Route the first Ctrl-C, and SIGTERM, to Lightning's end-of-step stop.

        Installed when training starts, after the Trainer has set its own SIGTERM handler, which this
        one replaces (the Trainer restores the original handlers when the fit ends).
        """
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous = signal.getsignal(signal.SIGINT)
        self._previous_term = signal.getsignal(signal.SIGTERM)
        connector = trainer._signal_connector

        def stop_after_this_step(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            if trainer.global_rank != 0:
                return  # rank 0's stop reaches this rank at the end of the step
            if signum == signal.SIGINT:
                rank_zero_info("\nCtrl-C: stopping after this step and saving a checkpoint (again to stop at once) ...")
            else:
                rank_zero_info("\nSIGTERM: stopping after this step and saving a checkpoint ...")
                launcher = trainer.strategy.launcher
                if not self._requested and launcher is not None:
                    launcher.kill(signum)
            self._requested = True

        self._requested = False
        signal.signal(signal.SIGINT, stop_after_this_step)
        signal.signal(signal.SIGTERM, stop_after_this_step)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """Stop after this step on every rank when rank 0 was signalled (one small broadcast under DDP)."""
        requested = self._requested
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(requested)], device=trainer.strategy.root_device)
            torch.distributed.broadcast(flag, src=0)
            requested = bool(flag.item())
        if requested:
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """Save the checkpoint and say where it is."""
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)  # a full checkpoint: it resumes
        rank_zero_info(f"Saved {self.ckpt_path}; continue with --ckpt_path last.")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save where a fit stopped before ``max_steps`` (a time limit, early stopping)."""
        self._keep = trainer.should_stop and 0 < trainer.max_steps and trainer.global_step < trainer.max_steps
        if self._keep:
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
            rank_zero_info(f"Stopped at step {trainer.global_step}: saved {self.ckpt_path}; continue with --ckpt_path last.")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Restore the Ctrl-C handler; remove the checkpoint of an earlier stop unless this fit stopped early."""
        self._restore()
        if not self._keep:
            trainer.strategy.remove_checkpoint(self.ckpt_path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if self._previous_term is not None:
            signal.signal(signal.SIGTERM, self._previous_term)
            self._previous_term = None
