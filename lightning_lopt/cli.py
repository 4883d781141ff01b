"""The ``lightning-lopt`` command: a LightningCLI whose model and data are chosen by class path.

Examples::

    lightning-lopt fit -c configs/mnist1d_hrnn.yaml
    lightning-lopt fit -c configs/mnist1d_adam.yaml --trainer.max_epochs=5
    lightning-lopt fit --help
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_lopt import models
from lightning_lopt.checkpoint_io import AtomicCheckpointIO

__all__ = ["LightningLoptCLI", "build_cli", "main"]

# These models define a fallback configure_optimizers that the config's `optimizer:` section is
# meant to replace, so LightningCLI's "will be overridden" warning is noise for them.
_FALLBACK_OPTIMIZER_MODELS = "|".join(models.__all__)


class LightningLoptCLI(LightningCLI):
    """LightningCLI that reports the final validation metrics after ``fit`` and writes checkpoints atomically.

    Unless the configuration names another checkpoint IO in ``trainer.plugins``, checkpoints are
    written by :class:`~lightning_lopt.checkpoint_io.AtomicCheckpointIO`, so that a run killed
    while saving still resumes with ``--ckpt_path last``.

    It adds one top-level option, ``torch_num_threads``: small models gain little from several
    CPU threads, and on a busy machine the threads of each operation wait for one another, which
    can make a run several times slower.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--torch_num_threads``."""
        parser.add_argument(
            "--torch_num_threads",
            type=Optional[int],
            default=None,
            help="CPU threads for torch operations (torch.set_num_threads); null keeps torch's default.",
        )

    def before_instantiate_classes(self) -> None:
        """Apply ``torch_num_threads`` before anything is built."""
        threads = self.config.get(str(self.subcommand), self.config).get("torch_num_threads")
        if threads is not None:
            torch.set_num_threads(threads)

    def instantiate_classes(self) -> None:
        """Instantiate the classes, without the override warning for models with a fallback optimizer."""
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=rf"`({_FALLBACK_OPTIMIZER_MODELS})\.configure_optimizers` will be overridden"
            )
            super().instantiate_classes()
        strategy = self.trainer.strategy
        # Lightning's plain default writes the same files non-atomically; any other checkpoint IO is kept.
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def before_fit(self) -> None:
        """Start the clock that the final line reports."""
        self._fit_start = time.perf_counter()

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
    kwargs.setdefault(
        "parser_kwargs",
        {"description": "Train a LightningModule with the hierarchical RNN learned optimizer (or any optimizer)."},
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


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-lopt`` command (``fit``, ``validate``, ``test``, ``predict``).

    Args:
        args: Command-line arguments; default ``sys.argv[1:]``.
    """
    build_cli(args)


if __name__ == "__main__":
    main()
