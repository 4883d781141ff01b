"""Bias and variance of the meta-gradient estimators on one meta-parameter.

For the shipped weights on a noisy quadratic, prints the derivative of the whole-horizon
meta-objective in ``b_log_lr`` (the learning rate's drift, which sets how fast the rule anneals)
four ways: the finite difference (the truth), truncated backprop's mean gradient, and the PES and
ES-Single estimates perturbing only that meta-parameter, with their per-pair spread. The ES
estimate's standard deviation per pair says how many pairs an update needs.

    python -m lightning_lopt.bench.estimators
    python -m lightning_lopt.bench.estimators --families mlp,quadratic,rosenbrock   # the finite difference per task family

The second form shows which parts of the training distribution reward a faster or slower decay of
the learning rate over the whole horizon.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import torch

from lightning_lopt.hrnn import HierarchicalRNN
from lightning_lopt.meta.bias import es_derivatives, finite_difference, summary, tbptt_derivative
from lightning_lopt.tasks import GradientNoise, QuadraticTask, TaskDistribution

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Print the table of derivative estimates."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--horizons", default="300,1000", help="comma-separated whole-horizon lengths")
    parser.add_argument("--pairs", type=int, default=32, help="antithetic pairs of the ES estimates")
    parser.add_argument("--seeds", type=int, default=2, help="task seeds (initialisations and noise) to average over")
    parser.add_argument("--noise", type=float, default=1.0, help="gradient noise of the quadratic")
    parser.add_argument("--param", default="b_log_lr", help="the scalar meta-parameter")
    parser.add_argument("--weights", default="tbptt_step7250",
                        help="meta-parameters to measure at (default: the truncated-backprop weights, whose bias this shows)")
    parser.add_argument("--families", default=None,
                        help="comma-separated task families: print only the finite difference on tasks of each")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lopt = HierarchicalRNN.from_pretrained(args.weights)
    if args.families:
        _by_family(lopt, args)
        return

    def task_fn() -> GradientNoise:
        return GradientNoise(QuadraticTask(dim=20, seed=3), noise=args.noise)

    print(f"torch {torch.__version__}, 1 thread; weights {args.weights}; d/d {args.param} of the whole-horizon "
          f"mean log(f_t/f_0) on a 20-D quadratic with gradient noise {args.noise}; {args.pairs} pairs; "
          f"means over {args.seeds} seeds (per-pair std: pooled over seeds)")
    print("| horizon | finite difference | TBPTT-16 | PES (truncation 50) | PES std/pair | "
          "ES-Single | ES-Single std/pair | seconds |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for horizon in (int(h) for h in args.horizons.split(",")):
        start = time.perf_counter()
        fd = tb = 0.0
        per_pair: dict[str, list[torch.Tensor]] = {"pes": [], "es_single": []}
        for seed in range(args.seeds):
            fd += finite_difference(lopt, task_fn, horizon, args.param, h=0.02, seed=seed) / args.seeds
            tb += tbptt_derivative(lopt, task_fn, horizon, 16, args.param, seed=seed) / args.seeds
            for est in per_pair:
                per_pair[est].append(es_derivatives(lopt, task_fn, horizon, 50, args.param, args.pairs, 0.01, est, seed))
        cells = []
        for est in ("pes", "es_single"):
            values = torch.cat(per_pair[est])
            mean, sem = summary(values)
            cells += [f"{mean:+.3f} ± {sem:.3f}", f"{float(values.std()):.3f}"]
        print(f"| {horizon} | {fd:+.3f} | {tb:+.3f} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


def _by_family(lopt: HierarchicalRNN, args: argparse.Namespace) -> None:
    dist = TaskDistribution()
    print(f"torch {torch.__version__}, 1 thread; weights {args.weights}; finite difference (h = 0.05) of the "
          f"whole-horizon mean log(f_t/f_0) in {args.param}, tasks of the training distribution's families "
          "(seeds 77, 78, ...; wrappers drawn as in training)")
    print("| family | horizon | per task | tasks |")
    print("| --- | ---: | --- | --- |")
    for family in args.families.split(","):
        for horizon in (int(h) for h in args.horizons.split(",")):
            values, names = [], []
            for s in range(args.seeds):
                values.append(finite_difference(lopt, lambda s=s: dist.sample_family(family, 77 + s), horizon,
                                                args.param, h=0.05, seed=s))
                names.append(repr(dist.sample_family(family, 77 + s)).split("(")[0])
            print(f"| {family} | {horizon} | {', '.join(f'{v:+.2f}' for v in values)} | {', '.join(names)} |", flush=True)


if __name__ == "__main__":
    main()
