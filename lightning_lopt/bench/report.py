"""The quality benchmark's report: the markdown tables of ``results.md`` and the loss-curve figures.

Everything here reads the ``results`` dict that :func:`lightning_lopt.bench.quality.run_benchmark`
writes to ``results.json``, so a report can be redrawn from that file without running anything.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["KIND_LABELS", "at_sweep_edge", "plot_task", "render_markdown"]

KIND_LABELS = {"learned": "learned", "adam": "Adam", "rmsprop": "RMSProp", "sgd": "SGD+m"}
# Baseline columns and legend entries in this order.
_BASELINE_ORDER = tuple(k for k in KIND_LABELS if k != "learned")


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def _fmt_loss(s: Optional[dict[str, Any]]) -> str:
    if s is None:
        return "-"
    st = s["final_loss"]
    n = len(st["values"])
    if not math.isfinite(st["mean"]):
        bad = sum(1 for v in st["values"] if not math.isfinite(v))
        return f"non-finite ({bad}/{n})"
    return _fmt(st["mean"]) if n == 1 else f"{_fmt(st['mean'])} ± {_fmt(st['std'], 2)}"


def _fmt_acc(s: Optional[dict[str, Any]]) -> str:
    if s is None or s.get("test_accuracy") is None:
        return "-"
    st = s["test_accuracy"]
    if not math.isfinite(st["mean"]):
        return "nan"
    return f"{100 * st['mean']:.1f}%" if len(st["values"]) == 1 else f"{100 * st['mean']:.1f} ± {100 * st['std']:.1f}%"


def at_sweep_edge(lr: float, sweep: Sequence[float]) -> bool:
    """Whether ``lr`` is the smallest or largest learning rate of ``sweep``."""
    return bool(sweep) and (math.isclose(lr, min(sweep)) or math.isclose(lr, max(sweep)))


def _with_lr(s: Optional[dict[str, Any]], sweep: Sequence[float]) -> str:
    if s is None:
        return "-"
    edge = " (edge)" if at_sweep_edge(s["lr"], sweep) else ""
    return f"{_fmt_loss(s)} @ {s['lr']:.3g}{edge}"


def _with_setting(s: Optional[dict[str, Any]]) -> str:
    """A baseline's final loss with its kind and learning rate, e.g. ``0.0221 ± 0.0025 (SGD+m 1)``."""
    return f"{_fmt_loss(s)} ({KIND_LABELS[s['kind']]} {s['lr']:.3g})" if s else "-"


def _label(summary: dict[str, Any]) -> str:
    if summary["kind"] == "learned":
        return "learned" if summary["variant"] == "default" else f"learned ({summary['variant']})"
    return f"{KIND_LABELS[summary['kind']]} {summary['lr']:.3g}"


def _learned_variant(summaries: dict[str, Any], variant: str) -> Optional[dict[str, Any]]:
    return next((s for s in summaries.values() if s["kind"] == "learned" and s["variant"] == variant), None)


def _lookup(summaries: dict[str, Any], key: Optional[str]) -> Optional[dict[str, Any]]:
    return summaries.get(key) if key else None


def render_markdown(results: dict[str, Any]) -> str:
    """The markdown report of a benchmark's ``results`` dict."""
    meta = results["meta"]
    sweeps = meta["sweeps"]
    lines = [
        "# Learned optimizer vs tuned baselines on held-out tasks",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}; total wall time {meta['wall_seconds'] / 60:.1f} min "
        f"({meta['runs_executed']} runs executed, {meta['runs_cached']} reused from the cache)",
        f"- learned optimizer weights: {meta['weights']['description']} (digest {meta['weights']['digest']}), "
        "untuned, lr multiplier 1.0"
        + (f", its step decaying linearly to 0 over the last {fraction:g} of each run (the weights' decay_fraction; "
           "the baselines' learning rates stay constant)" if (fraction := meta["weights"]["config"].get("decay_fraction"))
           else ""),
        f"- mode: {'quick' if meta['quick'] else 'full'}; seeds {meta['seeds']}; steps scale {meta['steps_scale']}; "
        "sweeps: " + "; ".join(f"{KIND_LABELS[k]} {', '.join(f'{v:.3g}' for v in vs)}" for k, vs in sweeps.items()),
        "- final training loss = mean over seeds ± std, at the true parameters on the whole training set "
        "(char LM: a fixed batch of 256 training windows); `@ lr` is the chosen learning rate, "
        "`(edge)` marks a choice at the end of the sweep",
        "",
    ]
    if meta["weights"]["untrained"]:
        lines += [
            "> **The learned optimizer here runs the untrained initialisation** (no meta-trained default weights "
            "exist yet); its numbers say nothing about meta-trained quality. Pass `--weights PATH`.",
            "",
        ]
    lines += [
        "## Final training loss",
        "",
        "| task | steps | learned | Adam 1e-3 | tuned Adam | tuned RMSProp | tuned SGD+m | best tuned "
        "| learned / Adam 1e-3 | learned / best |",
        "|---|---:|---|---|---|---|---|---|---:|---:|",
    ]
    for key, t in results["tasks"].items():
        s, a = t["summaries"], t["analysis"]
        get = functools.partial(_lookup, s)
        tuned = a["tuned"]
        best = get(tuned.get("best"))
        best_txt = f"{KIND_LABELS[best['kind']]} {best['lr']:.3g}" if best else "-"
        lines.append(
            f"| {key} {t['name']} | {t['steps']} | {_fmt_loss(get(a['learned']))} | "
            f"{_fmt_loss(get(a['adam_default']))} | "
            + "".join(f"{_with_lr(get(tuned.get(k)), sweeps[k])} | " for k in _BASELINE_ORDER)
            + f"{best_txt} | "
            f"{_fmt(a.get('ratio_to_adam_default'))} | {_fmt(a.get('ratio_to_best_tuned'))} |"
        )
    lines += [
        "",
        "## Held-out accuracy, steps to reach, time, divergence",
        "",
        "Steps to reach: first full-training-loss evaluation (every `interval` steps) at which the learned "
        "optimizer's seed-mean loss is at or below the best tuned baseline's mean final loss. Time: mean seconds "
        "of one run's training loop (without the evaluations), and per step.",
        "",
        "| task | test acc learned | test acc Adam 1e-3 | test acc best tuned | steps to reach best (interval) | "
        "s/run learned | s/run Adam 1e-3 | ms/step learned / Adam | learned diverged | sweep runs diverged |",
        "|---|---|---|---|---|---:|---:|---|---|---|",
    ]
    for key, t in results["tasks"].items():
        s, a = t["summaries"], t["analysis"]
        get = functools.partial(_lookup, s)
        learned, adam, best = get(a["learned"]), get(a["adam_default"]), get(a["tuned"].get("best"))
        reach = a.get("steps_to_best_tuned")
        reach_txt = "-" if not learned else ("never" if reach is None else str(reach))
        if learned and a.get("eval_interval"):
            reach_txt += f" ({a['eval_interval']})"
        div = a["diverged"]
        sweep_div = sum(len(v) for k, v in div.items() if not k.startswith("learned"))
        sweep_total = sum(len(x["seeds"]) for k, x in s.items() if not k.startswith("learned"))
        learned_div = "-"
        if learned:
            n_bad = len(learned["diverged_seeds"])
            learned_div = f"yes ({n_bad}/{len(learned['seeds'])})" if n_bad else "no"
        ms = " / ".join(_fmt(1e3 * x["seconds_per_step"]) if x else "-" for x in (learned, adam))
        secs = " | ".join(_fmt(x["train_seconds"]) if x else "-" for x in (learned, adam))
        lines.append(
            f"| {key} {t['name']} | {_fmt_acc(learned)} | {_fmt_acc(adam)} | {_fmt_acc(best)} | {reach_txt} | "
            f"{secs} | "
            f"{ms} | {learned_div} | {sweep_div}/{sweep_total} |"
        )
    diverged_lines = []
    for key, t in results["tasks"].items():
        s = t["summaries"]
        bad = [f"{_label(s[k])} ({len(v)}/{len(s[k]['seeds'])})" for k, v in t["analysis"]["diverged"].items()]
        if bad:
            diverged_lines.append(f"- {key} {t['name']}: " + ", ".join(bad))
    lines += [
        "",
        f"Diverged runs (non-finite loss, or final loss > {meta['divergence_factor']:g}x the initial loss):",
        "",
        *(diverged_lines or ["- none"]),
    ]
    bar = results["bar"]
    n = len(bar["rows"])
    verdicts = {True: "**met**", False: "**not met**", None: "not judged (only on the full benchmark of every task)"}
    verdict = verdicts[bar["bar_met"]]
    lines += [
        "",
        "## Summary",
        "",
        f"**Learned optimizer: lower final training loss than Adam 1e-3 on {len(bar['beats_adam_default'])}/{n} tasks "
        f"({', '.join(bar['beats_adam_default']) or 'none'}), than the best tuned baseline on "
        f"{len(bar['beats_best_tuned'])}/{n} ({', '.join(bar['beats_best_tuned']) or 'none'}); "
        f"learned-optimizer runs diverged: "
        + (", ".join(f"{k} seeds {v}" for k, v in bar["learned_diverged"].items()) or "none")
        + ".**",
        "",
        f"By task group (b and b' count as one, won only if both are won): beats Adam 1e-3 on "
        f"{len(bar['groups_beating_adam_default'])}/{len(bar['groups'])} groups, the best tuned baseline on "
        f"{len(bar['groups_beating_best_tuned'])}/{len(bar['groups'])}. Stalled learned runs (final loss above half "
        "the loss at 10% of the run and above twice Adam 1e-3's): "
        + (", ".join(f"{k} seeds {v}" for k, v in bar.get("learned_stalled", {}).items()) or "none")
        + ". Deep MLP (e), learned / Adam 1e-3: "
        + _fmt(bar.get("deep_mlp_ratio_to_adam_default"))
        + ".",
        "",
        f"Bar (lower than Adam 1e-3 on at least {bar['thresholds']['tasks_vs_adam_default']} of 7 tasks, than the "
        f"best tuned on at least {bar['thresholds']['groups_vs_best_tuned']} groups, no learned run diverges or "
        f"stalls, deep MLP at most {bar['thresholds']['deep_mlp_ratio_to_adam_default']:g}x Adam 1e-3): "
        + verdict + ".",
    ]
    ablation = results.get("ablation")
    if ablation:
        lines += ["", "## Ablation (learned optimizer variants, final training loss)", ""]
        names = list(ablation["plan"])
        lines.append("| task | full model | " + " | ".join(ablation["plan"][n]["title"] for n in names) + " | Adam 1e-3 |")
        lines.append("|---|---|" + "---|" * len(names) + "---|")
        for key, t in results["tasks"].items():
            s, a = t["summaries"], t["analysis"]
            cells = []
            for n in names:
                p = ablation["plan"][n]
                run = p["status"] == "run"
                cells.append(_fmt_loss(_learned_variant(s, n)) if run else "skipped")
            lines.append(
                f"| {key} {t['name']} | {_fmt_loss(s.get(a['learned']) if a['learned'] else None)} | "
                + " | ".join(cells)
                + f" | {_fmt_loss(s.get(a['adam_default']) if a['adam_default'] else None)} |"
            )
        lines.append("")
        for n, p in ablation["plan"].items():
            if p["status"] == "run":
                diff = p.get("other_differences") or {}
                extra = f"; also differs from the full model in {diff}" if diff else ""
                lines.append(f"- {p['title']}: weights {p['description']}{extra}")
            else:
                lines.append(f"- {p['title']}: skipped, {p['reason']}")
    if results.get("bf16_state"):
        lines += [
            "",
            "## bfloat16 optimizer state (learned optimizer, final training loss)",
            "",
            "The learned optimizer with the same weights, seeds and tasks, its hidden states and accumulators "
            "kept in bfloat16 (the true parameters stay float32). bf16 / fp32 is the ratio of mean final losses: "
            "above 1 means the bfloat16 state hurts.",
            "",
            "| task | learned, fp32 state | learned, bf16 state | bf16 / fp32 | bf16 diverged |",
            "|---|---|---|---:|---|",
        ]
        for key, t in results["tasks"].items():
            s, a = t["summaries"], t["analysis"]
            bf16 = _lookup(s, a.get("bf16_state"))
            bf16_div = "-"
            if bf16:
                n_bad = len(bf16["diverged_seeds"])
                bf16_div = f"yes ({n_bad}/{len(bf16['seeds'])})" if n_bad else "no"
            lines.append(
                f"| {key} {t['name']} | {_fmt_loss(_lookup(s, a['learned']))} | {_fmt_loss(bf16)} | "
                f"{_fmt(a.get('ratio_bf16_state_to_learned'))} | {bf16_div} |"
            )
        # What the runs' optimizers actually held, so a reader can tell the variant really ran in bfloat16.
        bf16_variant = results["bf16_state"]["variant"]
        held: dict[str, set[str]] = {"default": set(), bf16_variant: set()}
        for r in results["runs"]:
            variant = r.get("variant", "default")
            if r["kind"] == "learned" and variant in held:
                held[variant].add(r.get("state_dtype") or "not recorded")  # runs cached before the field existed
        lines += [
            "",
            "- state dtype read from the optimizer's buffers after each run: fp32 runs "
            f"{', '.join(sorted(held['default'])) or '-'}; bf16 runs {', '.join(sorted(held[bf16_variant])) or '-'}",
        ]
    if results.get("cosine"):
        lines += _cosine_section(results)
    if results.get("decayed_baselines"):
        lines += _decayed_section(results)
    lines += _step_size_section(results)
    lines += ["", "## Loss curves", ""]
    for key, t in results["tasks"].items():
        if t.get("figure"):
            lines.append(f"- {key} {t['name']}: [{t['figure']}]({t['figure']})")
    lines += ["", "## Tasks", ""]
    for key, t in results["tasks"].items():
        lines.append(f"- **{key} {t['name']}**: {t['title']} ({t['num_params']} parameters)")
    return "\n".join(lines) + "\n"


def _step_size_section(results: dict[str, Any]) -> list[str]:
    """Where the gap is: the learned optimizer with its lr multiplier tuned (``--tune-learned``) and
    the step size it applied, beside tuned Adam's learning rate."""
    tuned_rows = bool(results.get("tune_learned"))
    lines = [
        "",
        "## Step size: the learned optimizer tuned, and the step it applies",
        "",
        "Applied step: the RMS change of the true parameters per element in one step, averaged over the run "
        "(mean over seeds); for comparison, Adam's per-element step is at most about its learning rate."
        + (" Learned tuned: the best lr multiplier of the sweep "
           f"{', '.join(f'{v:g}' for v in results['tune_learned']['sweep'])} (as many points as Adam's); the bar "
           "counts only the untuned row." if tuned_rows else ""),
        "",
        "| task | learned (lr=1) | " + ("learned tuned | tuned / best tuned | " if tuned_rows else "")
        + "best tuned | applied step, learned | tuned Adam lr | applied step, tuned Adam |",
        "|---|---|" + ("---|---:|" if tuned_rows else "") + "---|---:|---:|---:|",
    ]
    beats_adam = beats_best = rows = 0
    for key, t in results["tasks"].items():
        s, a = t["summaries"], t["analysis"]
        get = functools.partial(_lookup, s)
        best = get(a["tuned"].get("best"))
        best_txt = _with_setting(best)
        cells = [f"{key} {t['name']}", _fmt_loss(get(a["learned"]))]
        if tuned_rows:
            tuned = get(a.get("learned_tuned"))
            edge = " (edge)" if a.get("learned_tuned_at_sweep_edge") else ""
            cells += [f"{_fmt_loss(tuned)} @ {a['learned_tuned_lr']:g}{edge}" if tuned else "-",
                      _fmt(a.get("ratio_learned_tuned_to_best_tuned"))]
            if tuned:
                rows += 1
                beats_adam += bool(a.get("learned_tuned_beats_adam_default"))
                beats_best += bool(a.get("learned_tuned_beats_best_tuned"))
        cells += [best_txt, _fmt(a.get("learned_update_rms")), _fmt(a.get("tuned_adam_lr")),
                  _fmt(a.get("tuned_adam_update_rms"))]
        lines.append("| " + " | ".join(cells) + " |")
    if tuned_rows:
        lines += ["", f"learned, lr multiplier tuned: lower final loss than Adam 1e-3 on {beats_adam}/{rows} tasks, "
                      f"than the best tuned baseline on {beats_best}/{rows}."]
    return lines


def _decayed_section(results: dict[str, Any]) -> list[str]:
    """The ``--decayed-baselines`` table: the learned optimizer against baselines given its schedule."""
    fraction = results["decayed_baselines"]["fraction"]
    lines = [
        "",
        "## At equal schedules: baselines whose learning rate decays too (final training loss)",
        "",
        f"Every baseline setting again, its learning rate decaying linearly to 0 over the last {fraction:g} of the "
        "run, as the learned default's step does when it knows the horizon; tuned over the same sweeps. The bar "
        "above compares constant learning rates; this table does not change it.",
        "",
        "| task | learned | tuned Adam + decay | tuned RMSProp + decay | tuned SGD+m + decay | best tuned, constant "
        "| learned / best + decay |",
        "|---|---|---|---|---|---|---:|",
    ]
    sweeps = results["meta"]["sweeps"]
    for key, t in results["tasks"].items():
        s, a = t["summaries"], t["analysis"]
        get = functools.partial(_lookup, s)
        decayed = a.get("tuned_decayed") or {}
        cells = [f"{key} {t['name']}", _fmt_loss(get(a["learned"]))]
        cells += [_with_lr(get(decayed.get(kind)), sweeps[kind]) for kind in _BASELINE_ORDER]
        cells += [_with_setting(get(a["tuned"].get("best"))), _fmt(a.get("ratio_to_best_decayed"))]
        lines.append("| " + " | ".join(cells) + " |")
    bar = results["bar"]
    lines += ["", f"learned: lower final loss than the best decaying baseline on {len(bar['beats_best_decayed'])}/"
                  f"{len(bar['rows'])} tasks ({', '.join(bar['beats_best_decayed']) or 'none'}), "
                  f"{len(bar['groups_beating_best_decayed'])}/{len(bar['groups'])} groups."]
    return lines


def _cosine_section(results: dict[str, Any]) -> list[str]:
    """The ``--cosine`` table: the learned optimizer with a cosine schedule on its lr multiplier."""
    lines = [
        "",
        "## Learned + cosine lr schedule (final training loss)",
        "",
        "The learned optimizer with the same weights, seeds and tasks, its lr multiplier annealed by torch's "
        "`CosineAnnealingLR` from 1 to 0 over the run. The ratios are of mean final losses: cosine / constant "
        "below 1 means the external schedule helps. The bar in the summary above counts only the constant "
        "lr=1 row; this variant does not change it.",
        "",
        "| task | learned (lr=1) | learned + cosine | Adam 1e-3 | best tuned | cosine / constant "
        "| cosine / Adam 1e-3 | cosine diverged |",
        "|---|---|---|---|---|---:|---:|---|",
    ]
    rows = beats_adam = beats_best = 0
    for key, t in results["tasks"].items():
        s, a = t["summaries"], t["analysis"]
        get = functools.partial(_lookup, s)
        cosine, best = get(a.get("cosine")), get(a["tuned"].get("best"))
        best_txt = _with_setting(best)
        cosine_div = "-"
        if cosine:
            rows += 1
            beats_adam += bool(a.get("cosine_beats_adam_default"))
            beats_best += bool(a.get("cosine_beats_best_tuned"))
            n_bad = len(cosine["diverged_seeds"])
            cosine_div = f"yes ({n_bad}/{len(cosine['seeds'])})" if n_bad else "no"
        lines.append(
            f"| {key} {t['name']} | {_fmt_loss(get(a['learned']))} | {_fmt_loss(cosine)} | "
            f"{_fmt_loss(get(a['adam_default']))} | {best_txt} | {_fmt(a.get('ratio_cosine_to_learned'))} | "
            f"{_fmt(a.get('ratio_cosine_to_adam_default'))} | {cosine_div} |"
        )
    lines += [
        "",
        f"learned + cosine: lower final loss than Adam 1e-3 on {beats_adam}/{rows} tasks, "
        f"than the best tuned on {beats_best}/{rows}.",
    ]
    return lines


_STYLE = {
    "learned": dict(color="black", lw=2.2),
    "adam_default": dict(color="tab:blue", ls="--", lw=1.6),
    "adam": dict(color="tab:blue", lw=1.2, alpha=0.8),
    "rmsprop": dict(color="tab:orange", lw=1.2, alpha=0.8),
    "sgd": dict(color="tab:green", lw=1.2, alpha=0.8),
    # Unlike the ablations (grey) this variant should overlay the learned curve; red shows where it does not.
    "bf16_state": dict(color="tab:red", lw=1.4, ls=":"),
    # Its own colour, not the ablations' grey: it is read against the black constant-lr curve.
    "cosine": dict(color="tab:purple", lw=1.6, ls="-."),
}

_VARIANT_LABELS = {"cosine": "learned + cosine lr (1 -> 0)"}


def plot_task(task_result: dict[str, Any], path: Path) -> Path:
    """Loss curves of one task (mean over seeds, log scale): minibatch loss and full training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, a = task_result["summaries"], task_result["analysis"]
    lines: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    if a["learned"]:
        lines.append(("learned (lr 1, untuned)", s[a["learned"]], _STYLE["learned"]))
    for summ in s.values():
        if summ["kind"] == "learned" and summ["variant"] != "default":
            style = _STYLE.get(summ["variant"], dict(color="grey", lw=1.4, ls=":"))
            lines.append((_VARIANT_LABELS.get(summ["variant"], f"learned: {summ['variant']}"), summ, style))
    if a["adam_default"]:
        lines.append(("Adam 1e-3 (default)", s[a["adam_default"]], _STYLE["adam_default"]))
    for kind in _BASELINE_ORDER:
        key = a["tuned"].get(kind)
        if key:
            best = " (best)" if key == a["tuned"].get("best") else ""
            lines.append((f"tuned {KIND_LABELS[kind]} {s[key]['lr']:.3g}{best}", s[key], _STYLE[kind]))
    decayed = (a.get("tuned_decayed") or {}).get("best")
    if decayed:
        d = s[decayed]
        lines.append((f"best tuned + decay: {KIND_LABELS[d['kind']]} {d['lr']:.3g}", d, dict(color="black", lw=1.2, ls="--")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, summ, style in lines:
        axes[0].plot(summ["curve_steps"], summ["curve_mean"], label=label, **style)
        axes[1].plot(summ["eval_steps"], summ["eval_mean"], label=label, **style)
    axes[0].set_title("minibatch training loss (where gradients are taken)")
    axes[1].set_title("training loss at the true parameters")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("loss (mean over seeds)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{task_result['key']} {task_result['name']}: {task_result['title']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
