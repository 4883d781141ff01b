"""Overhead of :class:`~lightning_lopt.callbacks.LearnedOptimizerMonitor` on the MNIST-1D example.

Run ``python -m lightning_lopt.bench.monitor_overhead`` (``--help`` for options). It trains the
MNIST-1D MLP of ``configs/mnist1d_hrnn.yaml`` with the learned optimizer, without and with the
monitor, in alternating runs, and prints the mean training step time of each (wall time between
consecutive batch starts after a warm-up, so the monitor's logging, histograms and logger writes
are included) in wall clock and in process CPU time, the slowdown, and the time spent inside the
monitor's hooks. Bar: at most 5% slower at ``logging_interval=50``. On a shared machine judge by
CPU time and hook time: the wall clock there mostly measures the other processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_lopt.callbacks import EvalWithTrueParameters, LearnedOptimizerMonitor
from lightning_lopt.data import MNIST1DDataModule
from lightning_lopt.models import MLPClassifier
from lightning_lopt.optimizer import HierarchicalRNNOptimizer

__all__ = ["main", "measure"]

BAR = 0.05


class _StepTimer(Callback):
    """Wall and process CPU time between consecutive batch starts, after ``warmup`` batches."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.starts: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.starts.append((time.perf_counter(), time.process_time()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append((time.perf_counter(), time.process_time()))

    def mean_step(self) -> tuple[float, float]:
        times = self.starts[self.warmup :]
        steps = len(times) - 1
        return (times[-1][0] - times[0][0]) / steps, (times[-1][1] - times[0][1]) / steps


class _TimedMonitor(LearnedOptimizerMonitor):
    """The monitor, also counting the time spent in its per-batch hooks."""

    hook_time = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        t = time.perf_counter()
        super().on_train_batch_start(*args)
        self.hook_time += time.perf_counter() - t

    def on_train_batch_end(self, *args: Any) -> None:
        t = time.perf_counter()
        super().on_train_batch_end(*args)
        self.hook_time += time.perf_counter() - t


class _Model(MLPClassifier):
    def configure_optimizers(self) -> HierarchicalRNNOptimizer:
        return HierarchicalRNNOptimizer(self.parameters(), weights="default")


def _logger(kind: str, root: str) -> Any:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if kind == "csv":
        return CSVLogger(root)
    if kind == "tensorboard":
        return TensorBoardLogger(root)
    if kind == "wandb":
        return WandbLogger(save_dir=root, project="lopt-monitor-overhead", offline=True)
    raise ValueError(f"Unknown logger {kind!r}.")


def _run(
    data: MNIST1DDataModule, monitor: Optional[_TimedMonitor], steps: int, warmup: int, logger: str, root: str
) -> tuple[float, float]:
    pl.seed_everything(0, verbose=False)
    timer = _StepTimer(warmup)
    callbacks: list[Callback] = [EvalWithTrueParameters(), timer]
    if monitor is not None:
        callbacks.append(monitor)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        log_every_n_steps=50,
        logger=_logger(logger, root),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_Model(hidden_dims=(100, 100)), data)
    if logger == "wandb":
        import wandb

        wandb.finish()
    return timer.mean_step()


def diagnostics_step_cost(repeats: int = 30) -> tuple[float, float]:
    """Median time of one optimizer step of the example model without and with diagnostics (s).

    A logged step pays for the diagnostics inside the optimizer step, outside the monitor's hooks.
    """
    torch.manual_seed(0)
    model = _Model(hidden_dims=(100, 100))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = model.configure_optimizers()
    x, y = torch.randn(128, 40), torch.randint(0, 10, (128,))

    def step(diag: bool) -> float:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if diag:
            opt.request_diagnostics()
        t = time.perf_counter()
        opt.step()
        return time.perf_counter() - t

    for _ in range(5):
        step(False)
    plain, diag = [], []
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        plain.append(step(False))
        diag.append(step(True))
    return statistics.median(plain), statistics.median(diag)


def measure(
    steps: int = 300, repeats: int = 5, interval: int = 50, warmup: int = 10, logger: str = "tensorboard"
) -> dict[str, Any]:
    """Mean step time without and with the monitor, in alternating runs.

    Args:
        steps: Optimizer steps per run.
        repeats: Runs of each kind (in pairs, alternating which goes first).
        interval: The monitor's ``logging_interval``.
        warmup: Steps left out at the start of each run.
        logger: ``"tensorboard"`` (scalars and histograms), ``"csv"`` or ``"wandb"`` (offline).

    Returns:
        Per-run mean step times in seconds, wall clock and process CPU time (``without``,
        ``with_monitor``, ``cpu_without``, ``cpu_with_monitor``), their medians, the slowdowns
        (median over the pairs of consecutive runs),
        and the time inside the monitor's hooks per step.
    """
    data = MNIST1DDataModule(batch_size=128)
    data.setup()
    without, with_, hooks = [], [], []
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(repeats):
            monitor = _TimedMonitor(logging_interval=interval, plots=False)
            # Alternate which kind goes first, so a drift in the machine's load cancels out.
            for kind in ("without", "with") if i % 2 == 0 else ("with", "without"):
                if kind == "without":
                    without.append(_run(data, None, steps, warmup, logger, root))
                else:
                    with_.append(_run(data, monitor, steps, warmup, logger, root))
            hooks.append(monitor.hook_time / steps)
    plain_step, diag_step = diagnostics_step_cost()
    wall0, wall1 = statistics.median(w for w, _ in without), statistics.median(w for w, _ in with_)
    cpu0, cpu1 = statistics.median(c for _, c in without), statistics.median(c for _, c in with_)
    # Each with-run is compared with the run next to it (the load drifts less between the two).
    paired_wall = statistics.median(b[0] / a[0] - 1.0 for a, b in zip(without, with_))
    paired_cpu = statistics.median(b[1] / a[1] - 1.0 for a, b in zip(without, with_))
    return dict(
        without=[w for w, _ in without],
        with_monitor=[w for w, _ in with_],
        cpu_without=[c for _, c in without],
        cpu_with_monitor=[c for _, c in with_],
        median_without=wall0,
        median_with=wall1,
        slowdown=paired_wall,
        cpu_median_without=cpu0,
        cpu_median_with=cpu1,
        cpu_slowdown=paired_cpu,
        hook_time_per_step=statistics.median(hooks),
        hook_fraction=statistics.median(hooks) / wall0,
        optimizer_step=plain_step,
        optimizer_step_with_diagnostics=diag_step,
        # What one logged step costs, spread over the interval: hooks plus the diagnostics step.
        amortised_fraction=(statistics.median(hooks) + (diag_step - plain_step) / interval) / wall0,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Print the monitor's overhead on the MNIST-1D example."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each kind, alternating")
    parser.add_argument("--interval", type=int, default=50, help="the monitor's logging_interval")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out at the start of each run")
    parser.add_argument("--logger", choices=("tensorboard", "csv", "wandb"), default="tensorboard")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one fit per run: keep the output to the table
    if args.logger == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
    r = measure(args.steps, args.repeats, args.interval, args.warmup, args.logger)
    ms = lambda xs: ", ".join(f"{1e3 * x:.2f}" for x in xs)  # noqa: E731
    print(f"MNIST-1D MLP (40-100-100-10, batch 128), HierarchicalRNNOptimizer, {args.steps} steps per run, "
          f"{args.logger} logger, {torch.get_num_threads()} threads")
    for label, key, runs in (("wall clock", "", ""), ("process CPU time", "cpu_", "cpu_")):
        print(f"  {label}:")
        print(f"    without monitor: {1e3 * r[key + 'median_without']:.2f} ms/step (runs: {ms(r[runs + 'without'])})")
        print(f"    with monitor (logging_interval={args.interval}): {1e3 * r[key + 'median_with']:.2f} ms/step "
              f"(runs: {ms(r[runs + 'with_monitor'])})")
        print(f"    slowdown, median over pairs of runs: {100 * r[key + 'slowdown']:+.2f}% (bar: at most {100 * BAR:.0f}%)")
    print(f"  time inside the monitor's hooks: {1e3 * r['hook_time_per_step']:.3f} ms/step "
          f"= {100 * r['hook_fraction']:.2f}% of a step")
    print(f"  optimizer step alone: {1e3 * r['optimizer_step']:.2f} ms, with diagnostics "
          f"{1e3 * r['optimizer_step_with_diagnostics']:.2f} ms (once per {args.interval} steps)")
    print(f"  amortised cost (hooks + diagnostics step) / step time: {100 * r['amortised_fraction']:.2f}% "
          f"(bar: at most {100 * BAR:.0f}%)")
    # On a shared machine the run-to-run noise is larger than the effect: the amortised cost is
    # the steadier measure, the paired runs are its cross-check.
    verdict = "PASS" if r["amortised_fraction"] <= BAR else "ABOVE BAR"
    print(f"  {verdict} (on the amortised cost)")


if __name__ == "__main__":
    main()
