"""Score meta-training checkpoints on the validation tasks and print them, best first.

Usage::

    python -m lightning_lopt.meta.select runs/meta_default/checkpoints/*.ckpt
"""

from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

import torch

from lightning_lopt.hrnn import HierarchicalRNN
from lightning_lopt.meta.data import TaskDataModule
from lightning_lopt.meta.module import DISQUALIFIED_PENALTY, MetaTrainingModule, validation_verdict

__all__ = ["score_checkpoints", "validation_tasks", "main"]


def validation_tasks(
    num_tasks: int = 6, lengths: Sequence[int] = (200, 1000, 3000), validation_seed: int = 0
) -> list[tuple[int, int]]:
    """``(seed, steps)`` of each validation task: seeds the training distribution never draws."""
    seeds = TaskDataModule(num_validation_tasks=num_tasks, validation_seed=validation_seed).validation_seeds()
    return [(s, lengths[i % len(lengths)]) for i, s in enumerate(seeds)]


def score_checkpoints(
    paths: Sequence[str], num_tasks: int = 6, lengths: Sequence[int] = (200, 1000, 3000), validation_seed: int = 0
) -> list[tuple[str, float, list[float], list[Optional[str]]]]:
    """Score each checkpoint on the validation tasks, best first.

    Returns:
        ``(path, score, ratios, verdicts)``: the selection score (the mean log ratio of final loss
        to Adam's, lower is better, plus a penalty for each task the rule stalls or diverges on),
        the per-task ratios, and each task's verdict (``"stalled"``, ``"diverged"`` or None).
    """
    seeds, task_lengths = map(list, zip(*validation_tasks(num_tasks, lengths, validation_seed)))
    module = MetaTrainingModule(validation_lengths=lengths)
    adam = [module._adam_final_loss(s, n) for s, n in zip(seeds, task_lengths)]
    results = []
    for path in paths:
        module.lopt = HierarchicalRNN.from_pretrained(path)
        mine = module.learned_losses(seeds, task_lengths)
        ratios = [min(math.log((m + 1e-12) / (a + 1e-12)), 50.0) if math.isfinite(m) else 50.0
                  for (m, _), a in zip(mine, adam)]
        verdicts = [validation_verdict(m, early, a) for (m, early), a in zip(mine, adam)]
        penalty = DISQUALIFIED_PENALTY * sum(v is not None for v in verdicts)
        results.append((path, sum(ratios) / len(ratios) + penalty, ratios, verdicts))
    return sorted(results, key=lambda r: r[1])


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_lopt.meta.select",
        description=__doc__.splitlines()[0] + " Each line: the selection score, the path, then one score per "
        "validation task; a score is log(final loss / Adam 1e-3's final loss), lower is better. A task the "
        f"rule stalls on (final loss above half its loss at 10%% of the run and above twice Adam's) or diverges "
        f"on is marked and adds {DISQUALIFIED_PENALTY:g} to the selection score.",
    )
    parser.add_argument(
        "checkpoints", nargs="+", metavar="CHECKPOINT",
        help="meta-training .ckpt files (or .safetensors exports) to score",
    )
    parser.add_argument(
        "--num-tasks", type=int, default=6,
        help="validation tasks: seeds the training distribution never draws, 200 to 3,000 steps (default: 6)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for path, score, ratios, verdicts in score_checkpoints(args.checkpoints, args.num_tasks):
        cells = [f"{r:+.2f}" + ("" if v is None else f"({v})") for r, v in zip(ratios, verdicts)]
        print(f"{score:+.3f}  {path}  " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
