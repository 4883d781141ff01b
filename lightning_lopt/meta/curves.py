"""Validation curves of meta-training runs, from their CSV logs.

    python -m lightning_lopt.meta.curves runs/cmp_pes=PES runs/cmp_tbptt=TBPTT --out docs/meta/pes_vs_tbptt.png

Each run is a ``CSVLogger`` save directory (or a ``metrics.csv`` file), or several joined with
commas: a run resumed into new log versions or directories is read in the order of the steps its
files start at, a later file's rows replacing an earlier one's from the step it starts at.
The figure shows
``val/log_ratio_vs_adam`` (mean log of the final loss relative to Adam's; lower is better) over
meta-steps and, where the run logged it, over training seconds.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["read_validation", "plot_runs", "main"]

KEY = "val/log_ratio_vs_adam"


def _metrics_files(spec: str) -> list[Path]:
    found: list[Path] = []
    for part in str(spec).split(","):
        path = Path(part)
        files = [path] if path.is_file() else list(path.rglob("metrics.csv"))
        if not files:
            raise FileNotFoundError(f"No metrics.csv under {path}: pass a CSVLogger save directory or a metrics.csv file.")
        found += files
    return found


def _first_step(rows: list[dict[str, str]]) -> int:
    return min((int(r["step"]) for r in rows if r.get("step")), default=0)


def _merged_rows(spec: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    # A resumed run's log starts at its checkpoint's step; file times do not survive a git checkout.
    logs = sorted((list(csv.DictReader(open(path))) for path in _metrics_files(spec)), key=_first_step)
    for new in logs:
        if new:
            # A resumed run repeats the steps after its checkpoint: the later log replaces them.
            first = _first_step(new)
            rows = [r for r in rows if int(r["step"]) < first] + new
    return rows


def read_validation(path: str | Path) -> list[dict[str, float]]:
    """Rows ``{"step", "score", "seconds"}`` of each validation in a run (``seconds`` NaN if not logged).

    ``seconds`` is the run's training time at that step, from ``meta/train_seconds``.
    """
    rows = _merged_rows(str(path))
    seconds: dict[int, float] = {}
    for r in rows:
        if r.get("meta/train_seconds"):
            seconds[int(r["step"])] = float(r["meta/train_seconds"])
    out = []
    for r in rows:
        if r.get(KEY):
            step = int(r["step"])
            earlier = [s for s in seconds if s <= step]
            out.append({"step": step, "score": float(r[KEY]),
                        "seconds": seconds[max(earlier)] if earlier else math.nan})
    return out


def plot_runs(runs: Sequence[tuple[str, str | Path]], out: Path, title: Optional[str] = None) -> Path:
    """Plot each run's validation score over meta-steps (and training seconds) into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(label, read_validation(path)) for label, path in runs]
    with_time = any(not math.isnan(r["seconds"]) for _, rows in data for r in rows)
    fig, axes = plt.subplots(1, 2 if with_time else 1, figsize=(11 if with_time else 6, 4), squeeze=False)
    for label, rows in data:
        axes[0, 0].plot([r["step"] for r in rows], [r["score"] for r in rows], marker="o", label=label)
        if with_time:
            timed = [r for r in rows if not math.isnan(r["seconds"])]
            axes[0, 1].plot([r["seconds"] / 60 for r in timed], [r["score"] for r in timed], marker="o", label=label)
    axes[0, 0].set_xlabel("meta-step")
    if with_time:
        axes[0, 1].set_xlabel("training minutes")
    for ax in axes[0]:
        ax.set_ylabel("validation: mean log(final loss / Adam's)")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Plot runs given as ``PATH`` or ``PATH=LABEL``, and print each validation's score."""
    parser = argparse.ArgumentParser(description="Validation curves of meta-training runs from their CSV logs.")
    parser.add_argument("runs", nargs="+", help="CSVLogger save directories or metrics.csv files, as PATH, PATH=LABEL or PATH1,PATH2=LABEL")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.runs:
        path, _, label = spec.partition("=")
        runs.append((label or Path(path.split(",")[0]).name, path))
    for label, path in runs:
        print(f"{label}: " + ", ".join(f"step {r['step']}: {r['score']:+.3f}" for r in read_validation(path)))
    print(f"wrote {plot_runs(runs, Path(args.out), args.title)}")


if __name__ == "__main__":
    main()
