"""The learned optimizer on the benchmark's tasks under several trust-ratio bounds (``max_update_ratio``).

Each run is the quality benchmark's learned run (:func:`lightning_lopt.bench.quality.run_one`: the
same tasks, steps, seeds and final training loss at the true parameters), with the weights' own
bound replaced by each value of ``--ratios`` (``none``: no bound). Prints the mean final loss per
task and bound, with Adam at 1e-3 from the same runner for reference.

    python -m lightning_lopt.bench.trust_sweep --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import statistics
import time
from typing import Any, Optional, Sequence

import torch

from lightning_lopt.bench.quality import OptimizerConfig, machine_description, run_one
from lightning_lopt.hrnn import HierarchicalRNN, _read_weights
from lightning_lopt.tasks.benchmark import TASKS, build_task, resolve_task_keys

__all__ = ["bounded", "main"]


def bounded(weights: str, ratio: Optional[float]) -> HierarchicalRNN:
    """``weights`` with ``max_update_ratio`` set to ``ratio`` (None: no bound)."""
    config, tensors, source = _read_weights(weights)
    lopt = HierarchicalRNN(**{**config, "max_update_ratio": ratio})
    lopt.load_weights(tensors, source=source)
    return lopt


def _run(task: str, ratio: Optional[float], seed: int, weights: str, steps_scale: float) -> dict[str, Any]:
    torch.set_num_threads(1)
    steps = max(1, int(round(TASKS[task].steps * steps_scale)))
    if ratio is not None and ratio < 0:  # Adam 1e-3, the reference
        record = run_one(build_task(task), OptimizerConfig("adam", 1e-3), seed, steps)
    else:
        record = run_one(build_task(task), OptimizerConfig("learned", 1.0), seed, steps, lopt=bounded(weights, ratio))
    return {"task": task, "ratio": ratio, "seed": seed, "final": record["final_loss"]}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the sweep and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="all", help="comma-separated benchmark task keys (default: all)")
    parser.add_argument("--ratios", default="none,0.003,0.006,0.01,0.03,0.1", help="bounds to try; none: no bound")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting")
    parser.add_argument("--weights", default="default", help="weights whose bound is replaced")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every task's steps")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes")
    args = parser.parse_args(argv)
    tasks = resolve_task_keys(args.tasks)
    ratios: list[Optional[float]] = [None if r.strip() == "none" else float(r) for r in args.ratios.split(",")]
    plan = [(t, r, s) for t in tasks for r in [-1.0, *ratios] for s in range(args.seeds)]
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
        results = list(pool.map(_run, *zip(*[(t, r, s, args.weights, args.steps_scale) for t, r, s in plan])))
    finals: dict[tuple[str, Optional[float]], list[float]] = {}
    for res in results:
        finals.setdefault((res["task"], res["ratio"]), []).append(res["final"])
    print(f"weights {args.weights}; {args.seeds} seeds; steps x{args.steps_scale}; {machine_description()}; "
          f"{(time.perf_counter() - start) / 60:.1f} min")
    names = ["none" if r is None else f"{r:g}" for r in ratios]
    print("| task | Adam 1e-3 | " + " | ".join(f"bound {n}" for n in names) + " |")
    print("|---|---:|" + "---:|" * len(ratios))
    for t in tasks:
        cells = [f"{statistics.mean(finals[(t, r)]):.4g}" for r in [-1.0, *ratios]]
        print(f"| {t} {TASKS[t].name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
