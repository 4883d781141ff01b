"""Where a meta-step of ES meta-training spends its time, and what each task family costs.

Runs a config's recipe (default: the campaign's) in one process and thread under
:mod:`torch.profiler`, for each unroll (``per_task``, the reference, and ``batched``), and prints
the share of the meta-step in each part: the tasks' gradients and losses, the gradient
transforms (noise, sparsity), the update rule, the perturbations, new tasks, the meta-update and
logging. Validation (every ``val_check_interval`` meta-steps) is timed on its own and amortised.
Then, per task family, the FLOPs of one particle-step (:class:`torch.utils.flop_counter.FlopCounterMode`
on the task's gradient and loss, plus the rule's products) and the batched path's particle-steps/s
on tasks of that family alone.

    python -m lightning_lopt.bench.es_profile
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from lightning_lopt.bench.es_throughput import _round, detach_from_trainer, module_from_config
from lightning_lopt.bench.quality import machine_description
from lightning_lopt.meta import TaskDataModule
from lightning_lopt.meta.module import MetaTrainingModule
from lightning_lopt.tasks import TaskDistribution

__all__ = ["RULE_FLOPS_PER_PARAMETER", "main"]

RULE_FLOPS_PER_PARAMETER = 1436
"""FLOPs of the update rule's products per parameter (parameter GRU and read-outs; docs/speed.md)."""

PARTS = ("es/task_gradients", "es/task_losses", "es/gradient_transform", "es/rule_step", "es/perturbations",
         "es/new_tasks", "es/meta_update", "es/logging")


def profile_split(module: MetaTrainingModule, first: int, meta_steps: int) -> tuple[dict[str, float], float, int]:
    """Seconds in each part of :data:`PARTS` over ``meta_steps`` meta-steps, the total, and particle-steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds, steps = _round(module, first, meta_steps)
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in PARTS}
    return {p: totals.get(p, 0.0) for p in PARTS}, seconds, steps


def family_costs(config: str | Path, families: Sequence[str], meta_steps: int) -> list[dict[str, float]]:
    """Per family: mean parameters, FLOPs per particle-step, and the batched path's particle-steps/s."""
    args = dict(yaml.safe_load(Path(config).read_text())["model"]["init_args"])
    tasks_args = dict(args.get("tasks", {}).get("init_args", {}))
    rows = []
    for family in families:
        dist = TaskDistribution(**{**tasks_args, "family_weights": {family: 1.0}})
        torch.manual_seed(0)
        module = module_from_config(config, tasks=dist, es_unroll="batched", num_threads=1)
        detach_from_trainer(module)
        _round(module, 0, 1)  # warm-up: kernel, first tasks
        seconds, steps = _round(module, 1, meta_steps)
        flops, params = [], []
        for seed in range(10_000, 10_008):
            task = dist.sample(seed)
            init = task.init_params(torch.Generator().manual_seed(seed))
            x = [p.detach().clone().requires_grad_(True) for p in init]
            batch = task.sample_batch(torch.Generator().manual_seed(seed))
            with FlopCounterMode(display=False) as counter:
                loss = task.loss(x, batch)
                torch.autograd.grad(loss, x)
                with torch.no_grad():
                    task.loss(x, batch)  # the meta-loss at the true parameters
            n = sum(p.numel() for p in init)
            params.append(n)
            flops.append(counter.get_total_flops() + RULE_FLOPS_PER_PARAMETER * n)
        rows.append({"family": family, "params": statistics.mean(params), "flops": statistics.mean(flops),
                     "rate": steps / seconds})
    return rows


def _data_args(config: str | Path) -> dict:
    return dict(yaml.safe_load(Path(config).read_text()).get("data", {}).get("init_args", {}))


def _matmul_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 1024**3 / best / 1e9


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Print the split of both unrolls and the per-family table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/meta_train_campaign.yaml")
    parser.add_argument("--meta-steps", type=int, default=3, help="profiled meta-steps per unroll")
    parser.add_argument("--families", default="mlp,mlp_deep_relu,logistic_regression,quadratic,norm,bowl,matmul,sum")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{args.config}; {machine_description()}; 1 thread; one fp32 1024^3 matmul: {_matmul_gflops():.0f} GFLOP/s")
    print("\n| part of a meta-step | per_task (reference) | batched |")
    print("| --- | ---: | ---: |")
    splits = {}
    for mode in ("per_task", "batched"):
        torch.manual_seed(0)
        module = module_from_config(args.config, es_unroll=mode, num_threads=1)
        detach_from_trainer(module)
        _round(module, 0, 1)  # warm-up
        splits[mode] = profile_split(module, 1, args.meta_steps)
        seeds = TaskDataModule(**_data_args(args.config)).validation_seeds()
        module._validate(seeds)  # Adam's reference losses, computed once per run
        start = time.perf_counter()
        module._validate(seeds)
        splits[mode] += (time.perf_counter() - start,)
    every = yaml.safe_load(Path(args.config).read_text()).get("trainer", {}).get("val_check_interval", 50)
    for part in PARTS:
        cells = [f"{100 * splits[m][0][part] / splits[m][1]:.1f}%" for m in ("per_task", "batched")]
        print(f"| {part.removeprefix('es/')} | {cells[0]} | {cells[1]} |")
    for m in ("per_task", "batched"):
        rest = splits[m][1] - sum(splits[m][0].values())
        splits[m] = (*splits[m], rest)
    print(f"| other (Python between the parts) | {100 * splits['per_task'][4] / splits['per_task'][1]:.1f}% | "
          f"{100 * splits['batched'][4] / splits['batched'][1]:.1f}% |")
    print("| meta-step, seconds | " + " | ".join(f"{splits[m][1] / args.meta_steps:.2f}" for m in ("per_task", "batched"))
          + " |")
    print("| particle-steps/s (under the profiler) | " + " | ".join(f"{splits[m][2] / splits[m][1]:.0f}"
                                                          for m in ("per_task", "batched")) + " |")
    print("| validation, amortised over its interval | " + " | ".join(
        f"{100 * splits[m][3] / every / (splits[m][1] / args.meta_steps):.1f}%" for m in ("per_task", "batched")) + " |")
    print("\n| family | parameters (mean) | FLOP per particle-step | batched particle-steps/s | GFLOP/s achieved |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in family_costs(args.config, args.families.split(","), args.meta_steps):
        print(f"| {row['family']} | {row['params']:.0f} | {row['flops'] / 1e3:.0f} k | {row['rate']:.0f} | "
              f"{row['flops'] * row['rate'] / 1e9:.2f} |")


if __name__ == "__main__":
    main()
