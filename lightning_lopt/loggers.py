"""Lightning's loggers with what a lightning-lopt run needs: a CSV logger whose run continues in its
own folder when training resumes from a checkpoint, and a W&B logger without W&B's spurious warnings."""

from __future__ import annotations

import csv
import os
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = ["ResumableCSVLogger", "RecordLogVersion", "WandbLogger", "LOG_VERSION_KEY"]

LOG_VERSION_KEY = "csv_log_version"
"""Checkpoint entry that holds the version folder of the run's :class:`ResumableCSVLogger`."""


class _ContinuingWriter(ExperimentWriter):
    """Keeps the rows of an existing ``metrics.csv`` logged before ``resume_step`` (Lightning's writer
    deletes the file), so that the resumed run's rows follow them."""

    def __init__(self, log_dir: str, resume_step: int) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            # Rows past the checkpoint were logged by the interrupted run after it saved; the
            # resumed run logs those steps again.
            rows = [r for r in reader if r.get("step") in (None, "") or int(float(r["step"])) < self._resume_step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys


class ResumableCSVLogger(CSVLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.CSVLogger`, for runs that resume.

    A run continued from a checkpoint (``--ckpt_path``) logs on into the ``version_N`` folder it
    started in, after the rows logged up to the checkpoint's step, so that one run's curves stay in
    one ``metrics.csv``. The folder is recorded in every checkpoint the run saves
    (:data:`LOG_VERSION_KEY`) and found again by :meth:`resume_from`, which ``lightning-lopt fit``
    calls; a fresh run takes a new version folder as the CSVLogger does.

    Args:
        save_dir: Root folder of the logs.
        name: Experiment name (a sub-folder of ``save_dir``).
        version: Version folder; None: the next free one (or, on resume, the checkpoint's).
        prefix: Prefix of the metric keys.
        flush_logs_every_n_steps: How often rows are written to disk.
    """

    def __init__(
        self,
        save_dir: str,
        name: str = "lightning_logs",
        version: Optional[int | str] = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._resume_step: Optional[int] = None

    def resume_from(self, checkpoint_path: str) -> bool:
        """Continue the run that saved ``checkpoint_path``: its version folder, from its step.

        Returns False (and changes nothing) when the checkpoint names no version folder or the
        logger has already started writing.
        """
        if self._experiment is not None:
            return False
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        version = saved.get(LOG_VERSION_KEY)
        if version is None:
            return False
        self._version = version
        self._resume_step = int(saved.get("global_step", 0))
        return True

    @property
    def experiment(self) -> Any:
        """The writer; on resume, one that keeps the rows logged before the checkpoint."""
        if self._experiment is None and self._resume_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._resume_step)
        return super().experiment


class RecordLogVersion(Callback):
    """Writes the version folder of the trainer's :class:`ResumableCSVLogger` into every checkpoint
    (``lightning-lopt fit`` adds it wherever such a logger is configured)."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Record the version."""
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                checkpoint[LOG_VERSION_KEY] = logger.version
                return


class WandbLogger(_LightningWandbLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.WandbLogger`, without two warnings W&B prints on
    every run: "The anonymous setting has no effect" (Lightning passes ``anonymous=None``, which W&B
    0.31 treats as set) and "git root ... does not exist" (W&B looks for a git repository in
    ``save_dir`` before it creates that folder). Every argument is Lightning's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        if self._save_dir:
            os.makedirs(self._save_dir, exist_ok=True)
