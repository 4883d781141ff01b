"""Figures of the learned optimizer's internals from a monitor history, and ``lightning-lopt-plot``.

:class:`~lightning_lopt.callbacks.LearnedOptimizerMonitor` writes ``lopt_history.json`` and these
figures at the end of fit; ``lightning-lopt-plot RUN_DIR`` makes them again from the file. Only
matplotlib's object API is used (no pyplot), so the process-wide backend is left alone.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

__all__ = ["FIGURES", "HISTORY_FILE", "HISTORY_FORMAT", "find_histories", "load_history", "main", "plot_history"]

FIGURES = ("timescales.png", "learning_rates.png", "attention.png", "global_rnn.png")
HISTORY_FILE = "lopt_history.json"
"""Name of the history file the monitor writes beside the figures (and this module reads)."""
HISTORY_FORMAT = "lightning_lopt.monitor_history"
"""The ``format`` entry of a history file."""


def load_history(path: Union[str, Path]) -> dict[str, Any]:
    """Read a history file written by the monitor."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != HISTORY_FORMAT:
        raise ValueError(f"{path} is not a LearnedOptimizerMonitor history file.")
    return data


def find_histories(run_dir: Union[str, Path]) -> list[Path]:
    """History files at ``run_dir`` (a file, or a directory searched recursively)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return [run_dir]
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir} does not exist.")
    return sorted(run_dir.rglob(HISTORY_FILE))


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        v = r["metrics"].get(key)
        if v is not None and math.isfinite(v):
            steps.append(r["step"])
            values.append(v)
    return steps, values


def _keys_matching(records: list[dict[str, Any]], pattern: str) -> list[re.Match]:
    rx = re.compile(pattern)
    seen: dict[str, re.Match] = {}
    for r in records:
        for k in r["metrics"]:
            if k not in seen:
                m = rx.fullmatch(k)
                if m:
                    seen[k] = m
    return list(seen.values())


def _new_figure(rows: int, cols: int, width: float = 5.0, height: float = 3.6) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _plot_timescales(records: list[dict[str, Any]], prefix: str, out: Path) -> Path:
    p = re.escape(prefix)
    per_tensor = _keys_matching(records, rf"{p}/timescale/(.+)/s(\d+)_mean")
    overall = _keys_matching(records, rf"{p}/timescale/s(\d+)_mean")
    k = 1 + max([int(m.group(1)) for m in overall] + [0])
    cols = min(k, 2)
    fig, axes = _new_figure(-(-k // cols), cols)
    for ax in axes[k:]:
        ax.set_visible(False)
    for s, ax in enumerate(axes[:k]):
        for m in per_tensor:
            if int(m.group(2)) == s:
                ax.plot(*_series(records, m.group(0)), label=m.group(1), lw=1.0)
        steps, mean = _series(records, f"{prefix}/timescale/s{s}_mean")
        ax.plot(steps, mean, color="black", lw=2.0, label="all (mean)")
        ax.set_yscale("log")
        ax.set_title(f"momentum timescale s={s}")
        ax.set_xlabel("step")
        ax.set_ylabel("steps, 1/(1-beta)")
    axes[0].legend(fontsize="x-small")
    path = out / "timescales.png"
    fig.savefig(path, dpi=100)
    return path


def _plot_learning_rates(records: list[dict[str, Any]], prefix: str, out: Path) -> Path:
    fig, (ax_hist, ax_time) = _new_figure(1, 2)
    hist_key = f"{prefix}/hist/log10_lr"
    last = [r for r in records if hist_key in r.get("histograms", {})]
    if last:
        first, final = last[0], last[-1]
        for rec, style in ((first, dict(alpha=0.4)), (final, dict(alpha=0.8))):
            h = rec["histograms"][hist_key]
            edges, counts = h["edges"], h["counts"]
            ax_hist.stairs(counts, edges, fill=True, label=f"step {rec['step']}", **style)
        ax_hist.legend(fontsize="x-small")
    ax_hist.set_title("distribution of the applied learning rate")
    ax_hist.set_xlabel("log10 step size")
    ax_hist.set_ylabel("parameters")
    for m in _keys_matching(records, rf"{re.escape(prefix)}/lr/(.+)/median"):
        name = m.group(1)
        line = ax_time.plot(*_series(records, m.group(0)), label=name, lw=1.0)[0]
        lo_steps, lo = _series(records, f"{prefix}/lr/{name}/min")
        hi_steps, hi = _series(records, f"{prefix}/lr/{name}/max")
        if lo_steps == hi_steps and lo:
            ax_time.fill_between(lo_steps, lo, hi, color=line.get_color(), alpha=0.12)
    ax_time.plot(*_series(records, f"{prefix}/lr/median"), color="black", lw=2.0, label="all (median)")
    ax_time.set_yscale("log")
    ax_time.set_title("applied learning rate: median, min-max")
    ax_time.set_xlabel("step")
    ax_time.legend(fontsize="x-small")
    path = out / "learning_rates.png"
    fig.savefig(path, dpi=100)
    return path


def _plot_attention(records: list[dict[str, Any]], prefix: str, out: Path) -> Path:
    fig, axes = _new_figure(1, 2)
    for ax, what, title in (
        (axes[0], "offset_rel_param", "||phi - theta|| / ||theta||"),
        (axes[1], "offset_rel_step", "||phi - theta|| / ||update||"),
    ):
        for m in _keys_matching(records, rf"{re.escape(prefix)}/attention/(.+)/{what}"):
            ax.plot(*_series(records, m.group(0)), label=m.group(1), lw=1.0)
        ax.plot(*_series(records, f"{prefix}/attention/{what}"), color="black", lw=2.0, label="all")
        ax.set_yscale("log", nonpositive="mask")  # no attention: offsets are zero, nothing to draw
        ax.set_title(f"attention offset: {title}")
        ax.set_xlabel("step")
    axes[0].legend(fontsize="x-small")
    path = out / "attention.png"
    fig.savefig(path, dpi=100)
    return path


def _plot_global_rnn(records: list[dict[str, Any]], prefix: str, out: Path) -> Path:
    units = sorted(m.group(0) for m in _keys_matching(records, rf"{re.escape(prefix)}/global_rnn/unit_(\d+)"))
    rows = [r for r in records if units and units[0] in r["metrics"]]
    fig, (ax,) = _new_figure(1, 1, width=9.0, height=4.0)
    if rows:
        grid = [[r["metrics"].get(u, float("nan")) for r in rows] for u in units]
        steps = [r["step"] for r in rows]
        # Bin edges halfway between logged steps, so each column covers its own step.
        if len(steps) > 1:
            mids = [(a + b) / 2 for a, b in zip(steps[:-1], steps[1:])]
            x = [2 * steps[0] - mids[0], *mids, 2 * steps[-1] - mids[-1]]
        else:
            x = [steps[0] - 0.5, steps[0] + 0.5]
        mesh = ax.pcolormesh(x, [u - 0.5 for u in range(len(units) + 1)], grid, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
        fig.colorbar(mesh, ax=ax, label="activation")
        ax.set_yticks(range(0, len(units), max(1, len(units) // 10)))
    ax.set_title("global RNN activations over training")
    ax.set_xlabel("step")
    ax.set_ylabel("unit")
    path = out / "global_rnn.png"
    fig.savefig(path, dpi=100)
    return path


def plot_history(history: Union[dict[str, Any], str, Path], out_dir: Union[str, Path]) -> list[Path]:
    """Write the figures of a monitor history.

    Args:
        history: The history (as :meth:`LearnedOptimizerMonitor.history_record` returns it) or its file.
        out_dir: Directory for the PNG files; with several optimizers, each one's figures get its
            prefix in front of the file name.

    Returns:
        The paths written.
    """
    if not isinstance(history, dict):
        history = load_history(history)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = history.get("records", [])
    prefixes = list(dict.fromkeys(r["prefix"] for r in records))
    written = []
    for prefix in prefixes:
        recs = [r for r in records if r["prefix"] == prefix]
        target = out if prefix == "lopt" else out / prefix
        target.mkdir(parents=True, exist_ok=True)
        for plot in (_plot_timescales, _plot_learning_rates, _plot_attention, _plot_global_rnn):
            written.append(plot(recs, prefix, target))
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``lightning-lopt-plot RUN_DIR``: figures from the monitor's ``lopt_history.json`` files."""
    parser = argparse.ArgumentParser(
        prog="lightning-lopt-plot",
        description="Make PNG figures of the learned optimizer's internals (timescales, learning rates, "
        "attention offsets, global RNN) from the lopt_history.json that LearnedOptimizerMonitor writes.",
    )
    parser.add_argument("run_dir", help="a history file, or a directory searched recursively for lopt_history.json")
    parser.add_argument("--out", default=None, help="output directory (default: beside each history file)")
    args = parser.parse_args(argv)
    try:
        paths = find_histories(args.run_dir)
    except FileNotFoundError as err:
        parser.exit(1, f"{err}\n")
    if not paths:
        parser.exit(1, f"No lopt_history.json under {args.run_dir}.\n")
    for path in paths:
        out = Path(args.out) if args.out else path.parent
        if args.out and len(paths) > 1:
            out = out / path.parent.relative_to(Path(args.run_dir))
        for written in plot_history(path, out):
            print(written)


if __name__ == "__main__":
    main()
