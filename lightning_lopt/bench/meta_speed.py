"""Inner task-steps per second of meta-training: truncated backprop against the ES estimators.

Both estimators run the same tasks (the same seeds of the training distribution, the same
lengths) from the same meta-parameters, one process and one thread, in alternating rounds so that
a machine's load affects both alike. A task-step is one inner optimizer step on one task instance:
one task of TBPTT's flat batch, or one particle under PES.

    python -m lightning_lopt.bench.meta_speed
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional, Sequence

import torch

from lightning_lopt.bench.es_throughput import detach_from_trainer
from lightning_lopt.meta.module import MetaTrainingModule

__all__ = ["measure", "main"]


def _module(estimator: str, tasks: int, pairs: int, truncation: int, weights: Optional[str]) -> MetaTrainingModule:
    return MetaTrainingModule(
        init_weights=weights,
        gradient_estimator=estimator,
        tasks_per_step=tasks,
        pes_pairs=pairs,
        truncation_length=truncation,
        task_lengths=(100_000, 100_000),  # no task ends inside the measurement
        max_task_length=100_000,
        num_threads=None,
    )


def _one_round(module: MetaTrainingModule, seeds: Sequence[int], truncations: int) -> float:
    """Task-steps per second of ``truncations`` meta-steps (gradient estimate and meta-update)."""
    detach_from_trainer(module, torch.optim.Adam(module.lopt.parameters(), lr=1e-4))
    module.slots = [None] * len(seeds)
    start = time.perf_counter()
    for k in range(truncations):
        module.training_step({"index": torch.tensor(k), "seeds": torch.tensor(list(seeds))}, k)
    elapsed = time.perf_counter() - start
    particles = 2 * module.hparams.pes_pairs if module.hparams.gradient_estimator != "tbptt" else 1
    return sum(slot.steps_done for slot in module.slots) * particles / elapsed


def measure(
    tasks: int = 8,
    pairs: int = 8,
    truncation: int = 50,
    truncations: int = 2,
    rounds: int = 3,
    estimators: Sequence[str] = ("tbptt", "pes"),
    seed: int = 0,
    weights: Optional[str] = "default",
) -> dict[str, list[float]]:
    """Task-steps per second of each estimator, one figure per round.

    Args:
        tasks: Tasks per meta-step (TBPTT's flat batch; each has ``2 * pairs`` particles under ES).
        pairs: Antithetic pairs per task under the ES estimators.
        truncation: Inner steps per meta-step.
        truncations: Meta-steps per round.
        rounds: Alternating rounds.
        estimators: Which estimators to time.
        seed: First task seed.
        weights: Meta-parameters to start from.
    """
    torch.set_num_threads(1)
    seeds = [seed + i for i in range(tasks)]
    modules = {e: _module(e, tasks, pairs, truncation, weights) for e in estimators}
    rates: dict[str, list[float]] = {e: [] for e in estimators}
    for _ in range(rounds):
        for e, m in modules.items():
            rates[e].append(_one_round(m, seeds, truncations))
    return rates


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Print task-steps per second of TBPTT and PES on the same tasks, and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8, help="tasks per meta-step")
    parser.add_argument("--pairs", type=int, default=8, help="antithetic pairs per task under PES")
    parser.add_argument("--truncation", type=int, default=50, help="inner steps per meta-step")
    parser.add_argument("--truncations", type=int, default=2, help="meta-steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--estimators", default="tbptt,pes", help="comma-separated estimators to time")
    args = parser.parse_args(argv)
    estimators = args.estimators.split(",")
    rates = measure(args.tasks, args.pairs, args.truncation, args.truncations, args.rounds, estimators)
    print(f"torch {torch.__version__}, 1 thread; {args.tasks} tasks, {args.pairs} pairs, truncation {args.truncation}")
    print("| estimator | inner task-steps/s (median) | rounds |")
    print("| --- | ---: | --- |")
    for e in estimators:
        print(f"| {e} | {statistics.median(rates[e]):.0f} | {', '.join(f'{r:.0f}' for r in rates[e])} |")
    if "tbptt" in rates:
        for e in estimators:
            if e != "tbptt":
                print(f"{e} / tbptt: {statistics.median(rates[e]) / statistics.median(rates['tbptt']):.2f}x")


if __name__ == "__main__":
    main()
