"""Export a meta-training checkpoint as a safetensors weights file with its JSON card.

Usage::

    python -m lightning_lopt.meta.export runs/meta_train/checkpoints/last.ckpt my_lopt.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lightning_lopt.hrnn import HierarchicalRNN

__all__ = ["export_checkpoint", "main"]


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    card: Optional[dict[str, Any]] = None,
    validate: bool = False,
    num_validation_tasks: int = 6,
    decay_fraction: Optional[float] = None,
) -> Path:
    """Write the meta-parameters of a :class:`~lightning_lopt.meta.MetaTrainingModule` checkpoint.

    Args:
        ckpt: The Lightning checkpoint.
        out: Target ``.safetensors`` path (a ``.json`` card is written beside it).
        card: Extra card entries; the checkpoint's meta-step, hyper-parameters and its logged
            validation score are added.
        validate: Also score the weights on the validation tasks of
            :func:`~lightning_lopt.meta.select.score_checkpoints` and record every task's log ratio
            to Adam 1e-3 and verdict in the card (``validation``).
        num_validation_tasks: How many validation tasks ``validate`` scores.
        decay_fraction: Written into the weights' config: the optimizer's decay phase with a known
            run length (see :class:`~lightning_lopt.HierarchicalRNNOptimizer`). None: none.

    The card records no score from the checkpoint's callbacks: a ``ModelCheckpoint``'s
    ``current_score`` is the last monitored value when the file was written, which for
    ``last.ckpt`` may belong to another step. ``validate`` scores the exported weights themselves.

    Returns:
        The safetensors path.
    """
    lopt = HierarchicalRNN.from_pretrained(ckpt)
    if decay_fraction is not None:  # a setting of the optimizer, not of the trained tensors
        decaying = HierarchicalRNN(**{**lopt.config, "decay_fraction": decay_fraction})
        decaying.load_state_dict(lopt.state_dict())
        lopt = decaying
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in raw.get("hyper_parameters", {}).items() if k != "lopt_config"}
    info: dict[str, Any] = {
        "source_checkpoint": Path(ckpt).name,
        "meta_steps": int(raw.get("global_step", 0)),
        "meta_training": json.loads(json.dumps(hparams, default=str)),
    }
    if validate:
        from lightning_lopt.meta.select import score_checkpoints, validation_tasks

        _, score, ratios, verdicts = score_checkpoints([str(ckpt)], num_validation_tasks)[0]
        info["validation"] = {
            "selection_score": score,
            "tasks": [
                {"seed": seed, "steps": steps, "log_ratio_vs_adam": r, "verdict": v}
                for (seed, steps), r, v in zip(validation_tasks(num_validation_tasks), ratios, verdicts)
            ],
            "command": "python -m lightning_lopt.meta.select",
        }
    return lopt.save_pretrained(out, card={**info, **(card or {})})


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="MetaTrainingModule .ckpt")
    parser.add_argument("output", help="target .safetensors file")
    parser.add_argument("--card", default=None, help="JSON file with extra card entries")
    parser.add_argument(
        "--validate", action="store_true",
        help="score the weights on the validation tasks (as python -m lightning_lopt.meta.select) into the card",
    )
    parser.add_argument(
        "--decay-fraction", type=float, default=None,
        help="the optimizer's decay phase, written into the weights' config (the last fraction of a run of known "
        "length over which the learned step decays to 0)",
    )
    args = parser.parse_args(argv)
    card = json.loads(Path(args.card).read_text()) if args.card else None
    path = export_checkpoint(args.checkpoint, args.output, card, validate=args.validate,
                             decay_fraction=args.decay_fraction)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    if args.validate:
        validation = json.loads(path.with_suffix(".json").read_text())["validation"]
        print(format_validation(validation))


def format_validation(validation: dict[str, Any]) -> str:
    """The card's ``validation`` entry as a table: each task's log ratio to Adam and verdict, then the score."""
    lines = ["| task seed | steps | log(final / Adam's final) | verdict |", "| --- | ---: | ---: | --- |"]
    for task in validation["tasks"]:
        lines.append(f"| {task['seed']} | {task['steps']} | {task['log_ratio_vs_adam']:+.3f} | {task['verdict'] or 'ok'} |")
    lines.append(f"selection score: {validation['selection_score']:.3f} (lower is better; +100 per stalled or "
                 "diverged task)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
