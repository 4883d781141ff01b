"""The learned optimizer on the benchmark's tasks under several trust-ratio bounds (``max_update_ratio``),
step gains (``lr_adaptation``) and decay phases (``decay_fraction``).

Each run is the quality benchmark's learned run (:func:`lightning_lopt.bench.quality.run_one`: the
same tasks, steps, seeds and final training loss at the true parameters), with the weights' own
bound replaced by each value of ``--ratios`` (``none``: no bound) and, for each of those, the step
gain set to each of ``--lr-adaptations`` (``weights``: the weights' own; ``none``; ``hypergradient``
or ``hypergradient=BETA``; ``learned``) and the decay phase to each of ``--decay-fractions``
(``weights``: the weights' own; a fraction of the run, 0 for none). Prints the mean final loss per task and setting, with Adam
at 1e-3 from the same runner for reference.

    python -m lightning_lopt.bench.trust_sweep --jobs 2
    python -m lightning_lopt.bench.trust_sweep --jobs 2 --ratios 0.01 --lr-adaptations none,hypergradient
    python -m lightning_lopt.bench.trust_sweep --jobs 2 --ratios 0.01 --decay-fractions 0,0.2,0.5,1
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


def bounded(
    weights: str, ratio: Optional[float], lr_adaptation: str = "weights", decay_fraction: str = "weights"
) -> HierarchicalRNN:
    """``weights`` with ``max_update_ratio`` set to ``ratio`` (None: no bound), the step gain set
    to ``lr_adaptation`` (``"weights"``: the weights' own; ``"none"``; ``"hypergradient[=BETA]"``;
    ``"learned"``) and the decay phase to ``decay_fraction`` (``"weights"``: the weights' own; a
    fraction, ``"0"`` for none)."""
    config, tensors, source = _read_weights(weights)
    config = {**config, "max_update_ratio": ratio}
    if decay_fraction != "weights":
        config["decay_fraction"] = float(decay_fraction)
    lopt = HierarchicalRNN(**config)
    lopt.load_weights(tensors, source=source)
    if lr_adaptation != "weights":
        mode, _, beta = lr_adaptation.partition("=")
        lopt.set_lr_adaptation(None if mode == "none" else mode, float(beta) if beta else None)
    return lopt


def _run(task: str, setting: Optional[tuple[Optional[float], str, str]], seed: int, weights: str,
         steps_scale: float) -> dict[str, Any]:
    torch.set_num_threads(1)
    steps = max(1, int(round(TASKS[task].steps * steps_scale)))
    if setting is None:  # Adam 1e-3, the reference
        record = run_one(build_task(task), OptimizerConfig("adam", 1e-3), seed, steps)
    else:
        record = run_one(build_task(task), OptimizerConfig("learned", 1.0), seed, steps, lopt=bounded(weights, *setting))
    return {"task": task, "setting": setting, "seed": seed, "final": record["final_loss"]}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the sweep and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="all", help="comma-separated benchmark task keys (default: all)")
    parser.add_argument("--ratios", default="none,0.003,0.006,0.01,0.03,0.1", help="bounds to try; none: no bound")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting")
    parser.add_argument("--lr-adaptations", default="weights",
                        help="step gains to try: weights (their own), none, hypergradient[=BETA], learned")
    parser.add_argument("--decay-fractions", default="weights",
                        help="decay phases to try: weights (their own), or fractions of the run (0: none)")
    parser.add_argument("--weights", default="default", help="weights whose bound is replaced")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every task's steps")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes")
    args = parser.parse_args(argv)
    tasks = resolve_task_keys(args.tasks)
    ratios: list[Optional[float]] = [None if r.strip() == "none" else float(r) for r in args.ratios.split(",")]
    gains = [g.strip() for g in args.lr_adaptations.split(",")]
    decays = [d.strip() for d in args.decay_fractions.split(",")]
    settings: list[Optional[tuple[Optional[float], str, str]]] = [None] + [
        (r, g, d) for r in ratios for g in gains for d in decays
    ]
    plan = [(t, x, s) for t in tasks for x in settings for s in range(args.seeds)]
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
        results = list(pool.map(_run, *zip(*[(t, r, s, args.weights, args.steps_scale) for t, r, s in plan])))
    finals: dict[tuple[str, Any], list[float]] = {}
    for res in results:
        finals.setdefault((res["task"], res["setting"]), []).append(res["final"])
    print(f"weights {args.weights}; {args.seeds} seeds; steps x{args.steps_scale}; {machine_description()}; "
          f"{(time.perf_counter() - start) / 60:.1f} min")
    names = [f"bound {'none' if r is None else f'{r:g}'}" + ("" if g == "weights" else f", gain {g}")
             + ("" if d == "weights" else f", decay {d}") for r, g, d in settings[1:]]  # type: ignore[misc]
    print("| task | Adam 1e-3 | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for t in tasks:
        cells = [f"{statistics.mean(finals[(t, x)]):.4g}" for x in settings]
        print(f"| {t} {TASKS[t].name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
