"""The ``lightning-lopt`` command: a LightningCLI whose model and data are chosen by class path.

Examples::

    lightning-lopt fit -c configs/mnist1d_hrnn.yaml
    lightning-lopt fit -c configs/mnist1d_adam.yaml --trainer.max_epochs=5
    lightning-lopt fit --help
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_lopt import models
from lightning_lopt.checkpoint_io import AtomicCheckpointIO
from lightning_lopt.loggers import RecordLogVersion, ResumableCSVLogger
from lightning_lopt.quiet import quiet_third_party

__all__ = ["LightningLoptCLI", "build_cli", "main"]

# These models define a fallback configure_optimizers that the config's `optimizer:` section is
# meant to replace, so LightningCLI's "will be overridden" warning is noise for them.
_FALLBACK_OPTIMIZER_MODELS = "|".join(models.__all__)

SMALL_MODEL = 1_000_000
"""Models with fewer parameters train on one CPU thread under ``torch_num_threads: auto``."""


class LightningLoptCLI(LightningCLI):
    """LightningCLI that reports the final validation metrics after ``fit`` and writes checkpoints atomically.

    Unless the configuration names another checkpoint IO in ``trainer.plugins``, checkpoints are
    written by :class:`~lightning_lopt.checkpoint_io.AtomicCheckpointIO`, so that a run killed
    while saving still resumes with ``--ckpt_path last``.

    It adds one top-level option, ``torch_num_threads``. Its default, ``auto``, runs a CPU fit of a
    model under :data:`SMALL_MODEL` parameters on one thread: the operations of a small model are
    too short to split, and torch's intra-op pool then costs more than it gains (several times
    the run time on a busy 2-core machine, for Adam as for the learned optimizer).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--torch_num_threads``."""
        parser.add_argument(
            "--torch_num_threads",
            type=Union[int, Literal["auto"], None],
            default="auto",
            help="CPU threads for torch operations (torch.set_num_threads): a number; auto (one thread for a model "
                 f"under {SMALL_MODEL:,} parameters, else torch's default); null keeps torch's default.",
        )

    def before_instantiate_classes(self) -> None:
        """Apply a numeric ``torch_num_threads`` before anything is built."""
        threads = self._threads_setting()
        if isinstance(threads, int):
            torch.set_num_threads(threads)

    def _threads_setting(self) -> Any:
        return self.config.get(str(self.subcommand), self.config).get("torch_num_threads")

    def instantiate_classes(self) -> None:
        """Instantiate the classes, without the override warning for models with a fallback optimizer."""
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=rf"`({_FALLBACK_OPTIMIZER_MODELS})\.configure_optimizers` will be overridden"
            )
            super().instantiate_classes()
        if self._threads_setting() == "auto":
            count = sum(p.numel() for p in self.model.parameters())
            if count < SMALL_MODEL and self.trainer.strategy.root_device.type == "cpu":
                torch.set_num_threads(1)
        if any(isinstance(lg, ResumableCSVLogger) for lg in self.trainer.loggers) and \
                not any(isinstance(cb, RecordLogVersion) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(RecordLogVersion())
        strategy = self.trainer.strategy
        # Lightning's plain default writes the same files non-atomically; any other checkpoint IO is kept.
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def before_fit(self) -> None:
        """Start the clock that the final line reports; a resumed run's CSV logs continue its own folder."""
        self._fit_start = time.perf_counter()
        ckpt_path = self.config.get(str(self.subcommand), self.config).get("ckpt_path")
        if ckpt_path:
            # A resume rebuilds its callbacks from the same config and saves into the same folder, as
            # meant: Lightning's reminders of both are noise here (a fresh run still gets the second).
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, ResumableCSVLogger)]
        if ckpt_path and loggers:
            try:
                # How Trainer.fit itself resolves "last" and the other keywords.
                path = self.trainer._checkpoint_connector._select_ckpt_path(
                    TrainerFn.FITTING, ckpt_path, model_provided=True, model_connected=False)
            except Exception:  # noqa: BLE001 - without a resolvable path, fit reports the problem itself
                path = None
            if path and os.path.isfile(path):
                for logger in loggers:
                    logger.resume_from(path)

    def after_fit(self) -> None:
        """Validate the final model and print its validation accuracy (or other validation metrics) and the fit's time."""
        seconds = time.perf_counter() - getattr(self, "_fit_start", time.perf_counter())
        trainer = self.trainer
        if trainer.interrupted or not is_overridden("validation_step", self.model):
            return
        # The last validation may predate the last step (max_steps, val_check_interval), so
        # validate once more; EvalWithTrueParameters makes this run at the true parameters.
        results = trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if not trainer.is_global_zero or not results:
            return
        metrics = {k: float(v) for k, v in results[0].items()}
        line = _final_line(metrics, trainer.global_step, seconds)
        if line:
            print(line, flush=True)


def _final_line(metrics: dict[str, float], step: int, seconds: Optional[float] = None) -> Optional[str]:
    # The fit's wall time is printed so that run times quoted in the docs come from this line.
    took = "" if seconds is None else f" (fit: {seconds:.1f} s)"
    acc = {k: v for k, v in metrics.items() if "acc" in k}
    if acc:
        body = ", ".join(f"{k}={v:.4f}" for k, v in acc.items())
        return f"Final validation accuracy after {step} steps: {body}{took}"
    if metrics:
        body = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        return f"Final validation metrics after {step} steps: {body}{took}"
    return None


def build_cli(args: ArgsType = None, run: bool = True, **kwargs: Any) -> LightningLoptCLI:
    """Make (and by default run) the ``lightning-lopt`` LightningCLI.

    Args:
        args: Command-line arguments (default ``sys.argv[1:]``), a list of strings or a dict.
        run: Run the subcommand; with False, only parse and instantiate (no subcommand in ``args``).
        **kwargs: Further keyword arguments of :class:`~lightning.pytorch.cli.LightningCLI`.

    Returns:
        The CLI object, holding ``model``, ``datamodule``, ``trainer`` and ``config``.
    """
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    # No abbreviated options: argparse would take --trainer.max_epoch=3 for --trainer.max_epochs silently.
    kwargs.setdefault(
        "parser_kwargs",
        {"description": "Train a LightningModule with the hierarchical RNN learned optimizer (or any optimizer).",
         "allow_abbrev": False,
         **{sub: {"allow_abbrev": False} for sub in ("fit", "validate", "test", "predict")}},
    )
    return LightningLoptCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        **kwargs,
    )


TRACEBACK_ENV = "LIGHTNING_LOPT_TRACEBACK"
"""Set to 1 to see the full traceback of a bad value instead of its one-line message."""


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-lopt`` command (``fit``, ``validate``, ``test``, ``predict``).

    A bad value (an invalid option, a missing weights file) ends the command with one line saying
    what is wrong and what to do, and exit status 2; ``--traceback`` (or ``LIGHTNING_LOPT_TRACEBACK=1``)
    shows the full traceback instead.

    Args:
        args: Command-line arguments; default ``sys.argv[1:]``.
    """
    quiet_third_party()
    argv = sys.argv[1:] if args is None else list(args)
    show = "--traceback" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    while "--traceback" in argv:
        argv.remove("--traceback")  # from sys.argv itself when args is None: LightningCLI reads it there
    try:
        build_cli(args if args is None else argv)
    except (ValueError, FileNotFoundError) as err:
        if show:
            raise
        message = str(err).strip() or type(err).__name__
        print(f"lightning-lopt: error: {message}\n(--traceback or {TRACEBACK_ENV}=1 shows where it was raised)",
              file=sys.stderr)
        raise SystemExit(2) from None
    # torch asks every process to end its process groups itself (DDP meta-training): left to the
    # interpreter's exit, gloo's threads can abort it ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
