"""Make a meta-training checkpoint portable: no path of the machine that wrote it.

Lightning's ModelCheckpoint state holds absolute paths (its ``dirpath``, best and last model
paths). Resumed on another machine, or from another folder, that state makes Lightning warn that
the dirpath changed and drop the top-k bookkeeping. This rewrites paths under ``root`` as paths
relative to it and removes ``dirpath`` (the resuming run's callback has its own). With
``--drop-tasks`` it also leaves out the tasks in flight, by far the largest part of an ES or PES
checkpoint: the copy resumes the meta-parameters, meta-optimizer and task stream, with fresh
tasks (not bit-exact).

Usage::

    python -m lightning_lopt.meta.portable runs/meta/checkpoints/last.ckpt meta_checkpoints/mine.ckpt
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lightning_lopt.checkpoint_io import atomic_torch_save

__all__ = ["make_portable", "main"]


def _relative(value: Any, root: str) -> Any:
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.relpath(value, root) if os.path.commonpath([value, root]) == root else os.path.basename(value)
    if isinstance(value, dict):
        return {_relative(k, root): _relative(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_relative(v, root) for v in value)
    return value


def make_portable(
    src: str | Path, dst: str | Path, root: Optional[str | Path] = None, drop_tasks: bool = False
) -> Path:
    """Write ``src`` to ``dst`` with every absolute path in its callbacks' states made relative.

    Args:
        src: A Lightning checkpoint.
        dst: Where to write the portable copy (may be ``src``).
        root: Paths under it become relative to it; others keep only their file name
            (default: the working directory).
        drop_tasks: Leave out every rank's tasks in flight (``meta_ranks``).

    Returns:
        ``dst``.
    """
    root = os.path.abspath(root if root is not None else os.getcwd())
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    callbacks = {}
    for key, state in ckpt.get("callbacks", {}).items():
        if isinstance(state, dict):
            state = {k: v for k, v in state.items() if k != "dirpath"}
        callbacks[key] = _relative(state, root)
    ckpt["callbacks"] = callbacks
    if drop_tasks:
        ckpt.pop("meta_ranks", None)
    for key in [k for k, v in ckpt.items() if isinstance(v, str)]:
        ckpt[key] = _relative(ckpt[key], root)
    atomic_torch_save(ckpt, dst)
    return Path(dst)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m lightning_lopt.meta.portable", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="Lightning .ckpt to read")
    parser.add_argument("output", help="where to write the portable copy")
    parser.add_argument("--root", default=None, help="paths under it become relative to it (default: here)")
    parser.add_argument(
        "--drop-tasks", action="store_true",
        help="leave out the tasks in flight: resumes with fresh tasks (not bit-exact), in a far smaller file",
    )
    args = parser.parse_args(argv)
    print(f"wrote {make_portable(args.checkpoint, args.output, args.root, args.drop_tasks)}")


if __name__ == "__main__":
    main()
