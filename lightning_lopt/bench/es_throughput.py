"""Particle-steps per second of ES meta-training on a config's recipe: the per-task reference
unroll against the batched one, side by side.

Both modules are built from the same config (task distribution, tasks per step, pairs,
truncation, task lengths), start from the same meta-parameters and draw the same task seeds; they
run in alternating rounds on one process and thread, so that the machine's load affects both
alike. A particle-step is one inner optimizer step of one particle. Tasks end and restart as in
the campaign, so task construction is included.

    python -m lightning_lopt.bench.es_throughput --config configs/meta_train_campaign.yaml
"""

from __future__ import annotations

import argparse
import inspect
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from lightning_lopt.meta.module import MetaTrainingModule
from lightning_lopt.tasks import TaskDistribution

__all__ = ["detach_from_trainer", "module_from_config", "measure", "main"]


def module_from_config(config: str | Path, **overrides: Any) -> MetaTrainingModule:
    """The config's :class:`MetaTrainingModule` (its ``model.init_args``), with ``overrides``."""
    args = dict(yaml.safe_load(Path(config).read_text())["model"]["init_args"])
    tasks = args.pop("tasks", None)
    if tasks is not None:
        tasks = TaskDistribution(**tasks.get("init_args", {}))
    return MetaTrainingModule(**{**args, "tasks": tasks, **overrides})


def detach_from_trainer(module: MetaTrainingModule, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Let ``module.training_step`` run without a Trainer: its meta-optimizer (default Adam at the
    module's ``meta_lr``) stepped directly, and no logging."""
    opt = optimizer or torch.optim.Adam(module.lopt.parameters(), lr=module.hparams.meta_lr)
    module.optimizers = lambda: opt  # type: ignore[method-assign]
    module.manual_backward = lambda loss: loss.backward()  # type: ignore[method-assign]
    module.clip_gradients = lambda *a, **k: None  # type: ignore[method-assign]
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    module.log = lambda *a, **k: None  # type: ignore[method-assign]


def _round(module: MetaTrainingModule, first: int, meta_steps: int) -> tuple[float, int]:
    """Seconds and particle-steps of ``meta_steps`` training steps from stream position ``first``."""
    tasks = module.hparams.tasks_per_step
    particles = 2 * module.hparams.pes_pairs
    ran = 0
    start = time.perf_counter()
    for k in range(first, first + meta_steps):
        before = [None if s is None else (id(s), s.steps_done) for s in module.slots]
        seeds = torch.arange(10_000 + tasks * k, 10_000 + tasks * (k + 1))
        module.training_step({"index": torch.tensor(k), "seeds": seeds}, k)
        for b, s in zip(before, module.slots):
            ran += s.steps_done - (b[1] if b is not None and b[0] == id(s) else 0)
    return time.perf_counter() - start, ran * particles


def measure(
    config: str | Path, rounds: int = 3, meta_steps: int = 2, modes: Sequence[str] = ("per_task", "batched")
) -> dict[str, list[float]]:
    """Particle-steps per second of each unroll mode, one figure per round (alternating)."""
    torch.set_num_threads(1)
    modules = {}
    for mode in modes:
        torch.manual_seed(0)
        # An installation older than the batched unroll has only the per-task one, and no es_unroll.
        extra = {"es_unroll": mode} if "es_unroll" in inspect.signature(MetaTrainingModule).parameters else {}
        modules[mode] = module_from_config(config, num_threads=1, **extra)
        detach_from_trainer(modules[mode])
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode, module in modules.items():
            seconds, steps = _round(module, r * meta_steps, meta_steps)
            rates[mode].append(steps / seconds)
    return rates


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Print particle-steps/s of both unrolls and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/meta_train_campaign.yaml", help="meta-training config")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--meta-steps", type=int, default=2, help="meta-steps per round")
    parser.add_argument("--modes", default="per_task,batched", help="comma-separated unrolls to time")
    args = parser.parse_args(argv)
    rates = measure(args.config, args.rounds, args.meta_steps, args.modes.split(","))
    print(f"{args.config}; torch {torch.__version__}, 1 thread, {platform.processor() or platform.machine()}; "
          f"{args.rounds} alternating rounds of {args.meta_steps} meta-steps")
    print("| unroll | particle-steps/s (median) | rounds |")
    print("| --- | ---: | --- |")
    for mode, r in rates.items():
        print(f"| {mode} | {statistics.median(r):.0f} | {', '.join(f'{v:.0f}' for v in r)} |")
    if "per_task" in rates and "batched" in rates:
        print(f"batched / per_task: {statistics.median(rates['batched']) / statistics.median(rates['per_task']):.2f}x")


if __name__ == "__main__":
    main()
