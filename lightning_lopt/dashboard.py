"""``lightning-lopt-dashboard``: a W&B workspace that shows a learned-optimizer run at a glance.

Built with ``wandb-workspaces`` from the keys :class:`~lightning_lopt.callbacks.LearnedOptimizerMonitor`
logs: one section each for loss and accuracy, momentum timescales, learning rates, attention and
updates, the RNN states, and the histograms. Per-tensor panels select their keys by regular
expression, so one workspace fits any model.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Optional, Sequence

from lightning_lopt.callbacks.monitor import quantile_name

__all__ = ["DEFAULT_ACCURACY_KEYS", "DEFAULT_LOSS_KEYS", "build_workspace", "main", "panel_keys"]

DEFAULT_LOSS_KEYS = ("train_loss_step", "train_loss_epoch", "val_loss")
DEFAULT_ACCURACY_KEYS = ("train_acc", "val_acc")
X_AXIS = "trainer/global_step"  # WandbLogger's step metric for every key


def build_workspace(
    entity: str,
    project: str,
    name: str = "Learned optimizer",
    loss_keys: Sequence[str] = DEFAULT_LOSS_KEYS,
    accuracy_keys: Sequence[str] = DEFAULT_ACCURACY_KEYS,
    prefix: str = "lopt",
    num_timescales: int = 4,
    global_units: int = 20,
    quantiles: Sequence[float] = (0.1, 0.5, 0.9),
) -> Any:
    """The workspace, built locally: nothing is sent until you call its ``save()``.

    Args:
        entity: W&B entity (user or team) that owns the project.
        project: W&B project the runs are in.
        name: Name of the saved view.
        loss_keys: Loss keys the model logs (``MLPClassifier``'s by default).
        accuracy_keys: Accuracy keys the model logs.
        prefix: The monitor's key prefix.
        num_timescales: ``K`` of the hierarchical RNN.
        global_units: Units of the global RNN.
        quantiles: The monitor's ``quantiles``.

    Returns:
        A ``wandb_workspaces.workspaces.Workspace``.
    """
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    p = prefix
    esc = re.escape(prefix)

    def line(title: str, y: Sequence[str] = (), regex: Optional[str] = None, log_y: Optional[bool] = None) -> Any:
        return wr.LinePlot(title=title, x=X_AXIS, y=list(y), metric_regex=regex, log_y=log_y)

    def section(title: str, panels: list[Any], is_open: bool = True) -> Any:
        return ws.Section(
            name=title,
            panels=panels,
            is_open=is_open,
            layout_settings=ws.SectionLayoutSettings(columns=3, rows=2),
            panel_settings=ws.SectionPanelSettings(x_axis=X_AXIS),
        )

    qnames = [quantile_name(q) for q in quantiles]
    timescale_panels = []
    for s in range(num_timescales):
        timescale_panels.append(
            line(
                f"timescale s={s} in steps: mean and quantiles",
                [f"{p}/timescale/s{s}_mean", *(f"{p}/timescale/s{s}_{qn}" for qn in qnames)],
                log_y=True,
            )
        )
    for s in range(num_timescales):
        timescale_panels.append(
            line(f"timescale s={s} per tensor (mean)", regex=rf"{esc}/timescale/.+/s{s}_mean", log_y=True)
        )
    timescale_panels += [
        line("scale decay beta_sc", [f"{p}/scale_decay/mean"]),
        line("scale-decay timescale in steps", [f"{p}/scale_decay/timescale_mean"], log_y=True),
    ]
    width = max(2, len(str(global_units - 1)))
    units = [f"{p}/global_rnn/unit_{j:0{width}d}" for j in range(global_units)]
    histograms = [f"{p}/hist/log10_timescale_s{s}" for s in range(num_timescales)]
    histograms += [f"{p}/hist/log10_lr", f"{p}/hist/log10_attention_offset", f"{p}/hist/tensor_rnn"]

    sections = [
        section(
            "Loss and accuracy",
            [
                line("loss", loss_keys),
                line("accuracy", accuracy_keys),
                line("skipped steps (non-finite gradients)", [f"{p}/skipped_steps"]),
            ],
        ),
        section("Momentum timescales", timescale_panels),
        section(
            "Learning rates",
            [
                line("applied learning rate", [f"{p}/lr/{k}" for k in ("mean", "median", "min", "max")], log_y=True),
                line("median learning rate per tensor", regex=rf"{esc}/lr/.+/median", log_y=True),
                line("mean learning rate per tensor", regex=rf"{esc}/lr/.+/mean", log_y=True),
            ],
        ),
        section(
            "Attention and updates",
            [
                line("attention offset ||phi-theta|| / ||theta||", [f"{p}/attention/offset_rel_param"], log_y=True),
                line("attention offset ||phi-theta|| / ||update||", [f"{p}/attention/offset_rel_step"]),
                line("offset / ||theta|| per tensor", regex=rf"{esc}/attention/.+/offset_rel_param", log_y=True),
                line("update-to-parameter ratio", [f"{p}/update/ratio"], log_y=True),
                line("update-to-parameter ratio per tensor", regex=rf"{esc}/update/.+/ratio", log_y=True),
                line("update RMS per tensor", regex=rf"{esc}/update/.+/rms", log_y=True),
            ],
        ),
        section(
            "Global and tensor RNN",
            [
                line("global RNN units", units),
                line("tensor RNN activations", [f"{p}/tensor_rnn/mean", f"{p}/tensor_rnn/rms"]),
                line("tensor RNN RMS per tensor", regex=rf"{esc}/tensor_rnn/.+/rms"),
            ],
        ),
        # A history line plot of a histogram key shows the distribution over steps.
        section("Histograms", [line(key.rsplit("/", 1)[-1], [key]) for key in histograms]),
    ]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis=X_AXIS, group_by_prefix="last"),
    )


def panel_keys(workspace: Any) -> list[tuple[str, str, list[str], Optional[str]]]:
    """``(section, panel title, y keys, y regex)`` of every panel of ``workspace``."""
    out = []
    for sec in workspace.sections:
        for panel in sec.panels:
            out.append((sec.name, panel.title, list(panel.y), panel.metric_regex))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``lightning-lopt-dashboard --entity E --project P``: build and save the W&B workspace."""
    parser = argparse.ArgumentParser(
        prog="lightning-lopt-dashboard",
        description="Save a W&B workspace showing the learned optimizer's internals (logged by "
        "LearnedOptimizerMonitor) for the runs of a project. Needs `wandb login` unless --dry-run.",
    )
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", required=True, help="W&B project")
    parser.add_argument("--name", default="Learned optimizer", help="name of the workspace view")
    parser.add_argument("--loss-keys", nargs="+", default=list(DEFAULT_LOSS_KEYS), help="loss keys the model logs")
    parser.add_argument(
        "--accuracy-keys", nargs="+", default=list(DEFAULT_ACCURACY_KEYS), help="accuracy keys the model logs"
    )
    parser.add_argument("--num-timescales", type=int, default=4, help="K of the hierarchical RNN")
    parser.add_argument("--global-units", type=int, default=20, help="units of the global RNN")
    parser.add_argument("--dry-run", action="store_true", help="print the sections and panels; save nothing")
    args = parser.parse_args(argv)
    workspace = build_workspace(
        args.entity,
        args.project,
        name=args.name,
        loss_keys=args.loss_keys,
        accuracy_keys=args.accuracy_keys,
        num_timescales=args.num_timescales,
        global_units=args.global_units,
    )
    if args.dry_run:
        current = None
        for sec, title, keys, regex in panel_keys(workspace):
            if sec != current:
                print(f"[{sec}]")
                current = sec
            print(f"  {title}: {', '.join(keys) if keys else 'regex ' + str(regex)}")
        return
    import wandb

    try:
        workspace.save()
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as err:
        # The usual first contact: no W&B account configured. One line, not a traceback.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "no api key" not in first.lower():
            # A key is configured, but W&B could not be asked to verify it (no network, say).
            parser.exit(1, f"{parser.prog}: could not reach W&B to verify the API key ({first}). Check the "
                           "network, or use --dry-run to print the workspace without saving it.\n")
        parser.exit(1, f"{parser.prog}: not logged in to W&B ({first}). Run `wandb login` first, "
                       "or use --dry-run to print the workspace without saving it.\n")
    except wandb.errors.CommError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        parser.exit(1, f"{parser.prog}: could not reach W&B to save the workspace ({first}).\n")
    print(workspace.url)


if __name__ == "__main__":
    main()
