"""Tests of the held-out quality benchmark harness (``lightning_lopt.bench.quality``) on tiny settings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from lightning_lopt.bench import quality as q
from lightning_lopt.hrnn import HierarchicalRNN
from lightning_lopt.optimizer import HierarchicalRNNOptimizer

# Tiny versions of every task: the same code paths, a fraction of the data and width.
TINY: dict[str, dict[str, Any]] = {
    "a": dict(hidden_sizes=(8,), num_samples=200, batch_size=16),
    "b": dict(channels=(2, 4), batch_size=8),
    "b2": dict(channels=(2, 4), batch_size=8),
    "c": dict(width=8, heads=2, context=8, batch_size=4, eval_sequences=8, max_chars=4000),
    "d": dict(batch_size=8),
    "e": dict(hidden_sizes=(4, 4, 4, 4), num_samples=200, batch_size=16),
    "f": dict(dim=40),
}
KINDS = [
    q.OptimizerConfig("learned", 1.0),
    q.OptimizerConfig("adam", 1e-3),
    q.OptimizerConfig("rmsprop", 1e-3),
    q.OptimizerConfig("sgd", 1e-2),
]
TINY_SWEEPS = {"adam": (1e-3, 1e-2), "rmsprop": (1e-3,), "sgd": (1e-2,)}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny tensors: on a busy 2-core machine a second intra-op thread only adds waiting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def untrained() -> HierarchicalRNN:
    return HierarchicalRNN()


@pytest.mark.parametrize("key", list(q.TASKS))
def test_every_task_trains_with_every_optimizer_kind(key: str, untrained: HierarchicalRNN) -> None:
    task = q.build_task(key, **TINY[key])
    for config in KINDS:
        r = q.run_one(task, config, seed=0, steps=6, lopt=untrained, eval_points=3, curve_points=3)
        assert r["steps_done"] == 6
        assert math.isfinite(r["initial_loss"]) and math.isfinite(r["final_loss"]), (key, config)
        assert all(math.isfinite(v) for v in r["curve"] + r["eval_curve"])
        assert r["curve_steps"][-1] == 6 and len(r["curve"]) == 3
        assert r["eval_steps"] == [0, 2, 4, 6]
        assert r["eval_curve"][-1] == r["final_loss"]
        if key == "f":  # the quadratic has no test split
            assert r["test_accuracy"] is None
        else:
            assert 0.0 <= r["test_accuracy"] <= 1.0
        assert not r["diverged"]


def test_seed_changes_init_and_batches_but_is_reproducible() -> None:
    task = q.build_task("d", **TINY["d"])
    cfg = q.OptimizerConfig("adam", 1e-2)
    a, b, c = (q.run_one(task, cfg, seed=s, steps=5, eval_points=1) for s in (0, 0, 1))
    assert a["curve"] == b["curve"] and a["final_loss"] == b["final_loss"]
    assert a["initial_loss"] != c["initial_loss"]


def _replay_learned(task, lopt, steps, total_steps=None):
    """Seed 0 of ``run_one`` for the learned optimizer, by hand: its parameters and optimizer after ``steps``."""
    params = [p.detach().clone().requires_grad_(True) for p in task.init_params(q.make_generator(1_000_003))]
    opt = q.make_optimizer(q.OptimizerConfig("learned", 1.0), params, lopt, seed=0, total_steps=total_steps)
    gen, noise = q.make_generator(2_000_003), q.make_generator(3_000_017)
    for _ in range(steps):
        loss = task.loss(params, task.sample_batch(gen))
        for p, g in zip(params, task.transform_grads(torch.autograd.grad(loss, params), noise)):
            p.grad = g
        opt.step()
    return params, opt


def test_learned_final_loss_is_measured_at_the_true_parameters(untrained: HierarchicalRNN) -> None:
    task = q.build_task("f", **TINY["f"])
    r = q.run_one(task, q.OptimizerConfig("learned", 1.0), seed=0, steps=4, lopt=untrained, eval_points=1)
    # Replay the run and read the loss at theta (eval mode), not at the attended point.
    params, opt = _replay_learned(task, untrained, steps=4)
    with torch.no_grad():
        at_phi = float(task.loss(params, None))
        opt.eval()
        at_theta = float(task.loss(params, None))
    assert r["final_loss"] == pytest.approx(at_theta, rel=1e-6)
    assert at_phi != pytest.approx(at_theta, rel=1e-9)


def _fake_summary(kind: str, lr: float, finals: list[float]) -> dict[str, Any]:
    return {"optimizer": f"{kind}@{lr:.3g}", "kind": kind, "lr": lr, "final_loss": q._stats(finals)}


def test_select_tuned_picks_the_lowest_mean_final_loss() -> None:
    summaries = [
        _fake_summary("adam", 1e-3, [1.0, 1.0, 1.0]),
        _fake_summary("adam", 1e-2, [0.1, 0.9, 0.8]),  # mean 0.6: best Adam, although not the best single seed
        _fake_summary("adam", 1e-1, [0.05, 0.05, float("nan")]),  # a non-finite seed disqualifies
        _fake_summary("rmsprop", 1e-3, [0.7, 0.7, 0.7]),
        _fake_summary("sgd", 1.0, [float("inf")] * 3),
        _fake_summary("sgd", 0.1, [0.5, 0.5, 0.5]),
        _fake_summary("learned", 1.0, [0.01, 0.01, 0.01]),  # not a baseline
    ]
    tuned = q.select_tuned(summaries)
    assert tuned["adam"]["lr"] == 1e-2
    assert tuned["rmsprop"]["lr"] == 1e-3
    assert tuned["sgd"]["lr"] == 0.1
    assert tuned["best"]["kind"] == "sgd" and tuned["best"]["lr"] == 0.1
    assert q.select_tuned([_fake_summary("sgd", 1.0, [float("inf")])])["best"] is None


def test_steps_to_reach() -> None:
    steps = [0, 10, 20, 30]
    assert q.steps_to_reach(steps, [5.0, 3.0, 1.0, 0.5], 1.0) == 20
    assert q.steps_to_reach(steps, [5.0, 3.0, 1.0, 0.5], 0.4) is None
    assert q.steps_to_reach(steps, [5.0, 3.0, 1.0, 0.5], 9.0) == 0
    assert q.steps_to_reach(steps, [5.0, float("nan"), 1.0, 0.5], 2.0) == 20
    assert q.steps_to_reach(steps, [5.0, 3.0, 1.0, 0.5], float("nan")) is None


def test_divergence_detection() -> None:
    assert not q.is_diverged(1.0, 9.9)
    assert q.is_diverged(1.0, 10.1)
    assert q.is_diverged(1.0, float("nan"))
    assert q.is_diverged(1.0, 0.5, nonfinite=True)
    task = q.build_task("f", **TINY["f"])
    r = q.run_one(task, q.OptimizerConfig("sgd", 1e3), seed=0, steps=30, eval_points=3)
    assert r["diverged"]
    assert r["nonfinite"] and r["steps_done"] < 30  # stopped early
    ok = q.run_one(task, q.OptimizerConfig("adam", 1e-2), seed=0, steps=30, eval_points=3)
    assert not ok["diverged"]


def test_task_selection_and_parsing() -> None:
    assert q.resolve_task_keys("a,b',char_lm,a") == ["a", "b2", "c"]
    assert q.resolve_task_keys("all") == list(q.TASKS)
    with pytest.raises(ValueError, match="Unknown task"):
        q.resolve_task_keys("z")
    assert q.parse_ablation_weights("no_attention=x.safetensors, one_timescale=y.ckpt") == {
        "no_attention": "x.safetensors",
        "one_timescale": "y.ckpt",
    }
    with pytest.raises(ValueError):
        q.parse_ablation_weights("bogus=x")
    assert q.main(["--tasks", "nope"]) == 2


def test_ablation_plan_never_substitutes_untrained_weights(tmp_path: Path) -> None:
    full = HierarchicalRNN().config
    plan = q.plan_ablations({}, full)
    assert all(p["status"] == "skipped" for p in plan.values())
    assert "no meta-trained weights" in plan["no_attention"]["reason"]
    assert q.Ablation("x", "a switch HierarchicalRNN lacks", "no_such_switch", 1).unsupported().startswith("HierarchicalRNN has no")
    assert all(ab.unsupported() is None for ab in q.ABLATIONS.values())
    no_att = HierarchicalRNN(attention=False).save_pretrained(tmp_path / "no_att.safetensors")
    with_att = HierarchicalRNN().save_pretrained(tmp_path / "att.safetensors")
    flat = HierarchicalRNN(hierarchy=False).save_pretrained(tmp_path / "flat.safetensors")
    plan = q.plan_ablations(
        {"no_attention": str(no_att), "one_timescale": str(with_att), "param_rnn_only": str(flat)}, full
    )
    assert plan["no_attention"]["status"] == "run"
    assert plan["param_rnn_only"]["status"] == "run" and plan["param_rnn_only"]["other_differences"] == {}
    assert plan["one_timescale"]["status"] == "skipped" and "num_timescales=4" in plan["one_timescale"]["reason"]


def test_benchmark_writes_markdown_json_and_pngs(tmp_path: Path) -> None:
    no_att = HierarchicalRNN(attention=False).save_pretrained(tmp_path / "no_att.safetensors")
    kwargs = dict(
        task_keys=["d", "f"],
        out=tmp_path / "out",
        seeds=2,
        steps_scale=0.02,
        ablation=True,
        ablation_weights={"no_attention": str(no_att)},
        show_progress=False,
        task_overrides={"d": TINY["d"], "f": TINY["f"]},
        sweeps=TINY_SWEEPS,
        eval_points=5,
    )
    results = q.run_benchmark(**kwargs)
    out = tmp_path / "out"
    md = (out / "results.md").read_text()
    assert "| d breast_cancer_logreg |" in md and "| f noisy_quadratic |" in md
    assert "lower final training loss than Adam 1e-3 on" in md
    assert "attention off" in md and "skipped" in md  # the ablation table and its skipped variants
    data = json.loads((out / "results.json").read_text())
    assert set(data["tasks"]) == {"d", "f"}
    # learned + no_attention + 4 baseline settings (Adam 1e-3 is in the sweep), 2 seeds, 2 tasks
    assert len(data["runs"]) == 2 * 2 * 6
    d = data["tasks"]["d"]
    tuned = d["analysis"]["tuned"]
    means = {k: s["final_loss"]["mean"] for k, s in d["summaries"].items() if s["kind"] != "learned"}
    assert means[tuned["best"]] == min(means.values())
    assert data["meta"]["runs_executed"] == 24
    for name in ("breast_cancer_logreg", "noisy_quadratic"):
        png = out / f"curves_{name}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not results["bar"]["bar_applicable"]
    # A second call reuses every finished run.
    again = q.run_benchmark(**kwargs)
    assert again["meta"]["runs_executed"] == 0
    assert again["tasks"]["d"]["summaries"].keys() == results["tasks"]["d"]["summaries"].keys()


def test_bf16_state_variant_runs_in_bfloat16_and_is_reported(tmp_path: Path) -> None:
    assert q.build_parser().parse_args(["--bf16-state"]).bf16_state
    sweeps = {"adam": (1e-3,), "rmsprop": (1e-3,), "sgd": (1e-2,)}
    results = q.run_benchmark(
        ["f"], tmp_path, seeds=2, steps_scale=0.02, bf16_state=True, show_progress=False,
        task_overrides={"f": TINY["f"]}, sweeps=sweeps, eval_points=5,
    )  # fmt: skip
    bf16_key = q.OptimizerConfig("learned", 1.0, q.BF16_STATE).key
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["bf16_state"]["variant"] == q.BF16_STATE and data["bf16_state"]["optimizer"] == bf16_key
    f = data["tasks"]["f"]
    bf16, fp32 = f["summaries"][bf16_key], f["summaries"][f["analysis"]["learned"]]
    assert bf16["variant"] == q.BF16_STATE and bf16["seeds"] == fp32["seeds"] == [0, 1]
    assert math.isfinite(bf16["final_loss"]["mean"]) and math.isfinite(bf16["final_loss"]["std"])
    ratio = f["analysis"]["ratio_bf16_state_to_learned"]
    assert ratio == pytest.approx(bf16["final_loss"]["mean"] / fp32["final_loss"]["mean"])
    # The records read the dtype off the optimizer's state buffers: an ignored flag leaves float32 here.
    dtypes = {(r["variant"], r["state_dtype"]) for r in data["runs"] if r["kind"] == "learned"}
    assert dtypes == {("default", "float32"), (q.BF16_STATE, "bfloat16")}
    assert (tmp_path / "runs" / "noisy_quadratic" / "learned-bf16_state_lr1_seed1.json").exists()  # cached
    md = (tmp_path / "results.md").read_text()
    section = md.split("## bfloat16 optimizer state", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| f noisy_quadratic |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert " ± " in cells[2] and math.isfinite(float(cells[3])) and cells[4] == "no"
    assert "bf16 runs bfloat16" in section
    assert results["meta"]["runs_executed"] == 2 * 5  # learned, bf16 state, 3 baseline settings



def _lr_hooked(monkeypatch: pytest.MonkeyPatch, hook: Any) -> None:
    """Make ``q.run_one`` build its optimizers with ``hook`` as a step pre-hook."""
    make = q.make_optimizer

    def hooked(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        opt = make(*args, **kwargs)
        opt.register_step_pre_hook(hook)
        return opt

    monkeypatch.setattr(q, "make_optimizer", hooked)


def test_cosine_variant_anneals_the_lr_multiplier_from_1_to_0(
    monkeypatch: pytest.MonkeyPatch, untrained: HierarchicalRNN
) -> None:
    steps = 16
    task = q.build_task("f", **TINY["f"])
    expected = [0.5 * (1.0 + math.cos(math.pi * t / steps)) for t in range(steps)]
    seen: list[float] = []
    _lr_hooked(monkeypatch, lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    cosine = q.run_one(task, q.OptimizerConfig("learned", 1.0, q.COSINE), 0, steps, lopt=untrained, eval_points=4)
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-12)  # the lr each step actually ran with
    seen.clear()
    constant = q.run_one(task, q.OptimizerConfig("learned", 1.0), 0, steps, lopt=untrained, eval_points=4)
    assert seen == [1.0] * steps

    # Reference: the default variant with the closed-form cosine written into its lr before every step.
    # Matching it shows the scheduled lr reaches the learned step, not just the param group.
    def by_hand(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        opt.param_groups[0]["lr"] = expected[len(seen)]
        seen.append(opt.param_groups[0]["lr"])

    seen.clear()
    monkeypatch.undo()  # the recording hook would append to ``seen`` as well
    _lr_hooked(monkeypatch, by_hand)
    reference = q.run_one(task, q.OptimizerConfig("learned", 1.0), 0, steps, lopt=untrained, eval_points=4)
    assert len(seen) == steps
    for field in ("final_loss", "curve", "eval_curve"):
        torch.testing.assert_close(cosine[field], reference[field])
    assert cosine["variant"] == q.COSINE and cosine["optimizer"] == "learned:cosine@1"
    # Not vacuous: the annealed lr changes the run.
    assert abs(cosine["final_loss"] - constant["final_loss"]) > 1e-4 * abs(constant["final_loss"])


def _tiny_benchmark(out: Path, seeds: int) -> dict[str, Any]:
    """``run_benchmark`` arguments for a few-second run on tasks d and f with one baseline setting per kind."""
    return dict(
        task_keys=["d", "f"], out=out, seeds=seeds, steps_scale=0.02, show_progress=False,
        task_overrides={"d": TINY["d"], "f": TINY["f"]}, sweeps={"adam": (1e-3,), "rmsprop": (1e-3,), "sgd": (1e-2,)},
        eval_points=5,
    )  # fmt: skip


def test_decayed_baselines_run_the_learned_defaults_ramp(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decayed baseline's lr each step is the ramp that the learned optimizer applies with
    decay_fraction=0.5 and a known horizon: constant, then linear to 0 over the last half."""
    steps = 16
    task = q.build_task("f", **TINY["f"])
    seen: list[float] = []
    _lr_hooked(monkeypatch, lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    run = q.run_one(task, q.OptimizerConfig("adam", 1e-2, q.DECAYED), 0, steps, eval_points=4)
    learned = HierarchicalRNNOptimizer([torch.nn.Parameter(torch.ones(3))], weights=HierarchicalRNN(decay_fraction=0.5),
                                       total_steps=steps)
    factors = []
    for _ in range(steps):
        factors.append(learned.decay_factor)
        for p in learned.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        learned.step()
    assert factors == [min(1.0, (1 - t / steps) / 0.5) for t in range(steps)]
    assert seen == pytest.approx([1e-2 * f for f in factors], rel=1e-12, abs=1e-15)
    assert run["optimizer"] == "adam:decayed@0.01" and run["variant"] == q.DECAYED


def test_decayed_baselines_are_tuned_apart_and_leave_the_bar_alone(tmp_path: Path) -> None:
    summaries = [
        _fake_summary("adam", 1e-3, [1.0, 1.0]),
        {**_fake_summary("adam", 1e-2, [0.1, 0.1]), "variant": q.DECAYED, "optimizer": "adam:decayed@0.01"},
    ]
    assert q.select_tuned(summaries)["best"]["lr"] == 1e-3
    assert q.select_tuned(summaries, variant=q.DECAYED)["best"]["optimizer"] == "adam:decayed@0.01"
    kwargs = _tiny_benchmark(tmp_path, seeds=1)
    results = q.run_benchmark(**kwargs, decayed_baselines=True)
    assert results["meta"]["runs_executed"] == 2 * 7  # learned, 3 constant and 3 decayed baseline settings
    plain = q.run_benchmark(**kwargs)
    for key in ("d", "f"):
        a = results["tasks"][key]["analysis"]
        assert a["tuned"] == plain["tasks"][key]["analysis"]["tuned"]  # the constant baselines alone
        best = results["tasks"][key]["summaries"][a["tuned_decayed"]["best"]]
        learned = results["tasks"][key]["summaries"][a["learned"]]
        assert best["variant"] == q.DECAYED
        assert a["ratio_to_best_decayed"] == pytest.approx(learned["final_loss"]["mean"] / best["final_loss"]["mean"])
    assert results["bar"]["bar_met"] == plain["bar"]["bar_met"]
    section = results["markdown"].split("## At equal schedules", 1)[1].split("\n## ", 1)[0]
    assert section.count("| d breast_cancer_logreg |") == 1 and "groups." in section
    assert "## At equal schedules" not in plain["markdown"]


def test_cosine_variant_is_reported_and_leaves_the_bar_alone(tmp_path: Path) -> None:
    kwargs = _tiny_benchmark(tmp_path, seeds=2)
    results = q.run_benchmark(**kwargs, cosine=True)
    assert results["meta"]["runs_executed"] == 2 * 2 * 5  # learned, cosine, 3 baseline settings
    cos_key = q.OptimizerConfig("learned", 1.0, q.COSINE).key
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["cosine"] == {"variant": q.COSINE, "optimizer": cos_key}
    assert sorted((r["task"], r["seed"]) for r in data["runs"] if r["variant"] == q.COSINE) == [
        ("d", 0), ("d", 1), ("f", 0), ("f", 1)
    ]  # fmt: skip
    assert (tmp_path / "runs" / "noisy_quadratic" / "learned-cosine_lr1_seed1.json").exists()
    md = (tmp_path / "results.md").read_text()
    section = md.split("## Learned + cosine lr schedule", 1)[1].split("\n## ", 1)[0]
    assert "only the constant lr=1 row" in section
    beats_adam = beats_best = 0
    for key, t in data["tasks"].items():
        s, a = t["summaries"], t["analysis"]
        cos, learned = s[cos_key], s[a["learned"]]
        adam, best = s[a["adam_default"]], s[a["tuned"]["best"]]
        assert a["cosine"] == cos_key and cos["seeds"] == learned["seeds"] == [0, 1]
        cm = cos["final_loss"]["mean"]
        assert math.isfinite(cm)
        assert a["ratio_cosine_to_learned"] == pytest.approx(cm / learned["final_loss"]["mean"])
        assert a["ratio_cosine_to_adam_default"] == pytest.approx(cm / adam["final_loss"]["mean"])
        assert a["ratio_cosine_to_best_tuned"] == pytest.approx(cm / best["final_loss"]["mean"])
        beats_adam += cm < adam["final_loss"]["mean"]
        beats_best += cm < best["final_loss"]["mean"]
        row = next(line for line in section.splitlines() if line.startswith(f"| {key} {t['name']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 8 and " ± " in cells[2]
        assert float(cells[5]) == pytest.approx(a["ratio_cosine_to_learned"], rel=1e-2)
        assert float(cells[6]) == pytest.approx(a["ratio_cosine_to_adam_default"], rel=1e-2)
        assert cells[7] == ("no" if not cos["diverged_seeds"] else f"yes ({len(cos['diverged_seeds'])}/2)")
    count = f"lower final loss than Adam 1e-3 on {beats_adam}/2 tasks, than the best tuned on {beats_best}/2"
    assert f"learned + cosine: {count}" in section
    # The same runs without the variant (all from the cache): the bar and the learned analysis are unchanged.
    plain = q.run_benchmark(**kwargs)
    assert plain["meta"]["runs_executed"] == 0
    assert plain["bar"] == results["bar"]
    for key in ("d", "f"):
        with_cos = {k: v for k, v in results["tasks"][key]["analysis"].items() if "cosine" not in k}
        assert plain["tasks"][key]["analysis"] == with_cos
    assert "cosine" not in plain and "Learned + cosine" not in plain["markdown"]


def test_cli_cosine_flag_reaches_the_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert q.build_parser().parse_args(["--cosine"]).cosine
    assert not q.build_parser().parse_args([]).cosine
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(q, "run_benchmark", lambda *args, **kwargs: calls.append(kwargs) or {"markdown": ""})
    assert q.main(["--cosine", "--tasks", "f", "--out", str(tmp_path), "--no-progress"]) == 0
    assert calls[0]["cosine"] is True


def test_bar_summary_counts_tasks_groups_stalls_and_the_deep_mlp() -> None:
    def analysis(adam: bool, best: bool, diverged: tuple[int, ...] = (), stalled: tuple[int, ...] = (),
                 ratio: float = 0.9) -> dict[str, Any]:
        return {
            "learned": "learned@1",
            "beats_adam_default": adam,
            "beats_best_tuned": best,
            "learned_diverged_seeds": list(diverged),
            "learned_stalled_seeds": list(stalled),
            "ratio_to_adam_default": ratio,
        }

    wins = {k: analysis(True, k in ("a", "c")) for k in q.TASKS}
    wins["e"] = analysis(True, False, ratio=0.4)
    wins["b2"] = analysis(False, False)  # b' lost: group b is not won although row b is
    bar = q.bar_summary(wins, list(q.TASKS))
    assert len(bar["beats_adam_default"]) == 6 and bar["groups_beating_adam_default"] == ["a", "c", "d", "e", "f"]
    assert bar["groups_beating_best_tuned"] == ["a", "c"]
    assert bar["deep_mlp_ratio_to_adam_default"] == 0.4
    assert bar["bar_met"] is True
    for broken in (
        {"e": analysis(True, False, ratio=0.6)},  # deep MLP above 0.5x Adam
        {"e": analysis(True, False, diverged=(2,), ratio=0.4)},
        {"d": analysis(True, False, stalled=(0,))},
        {"f": analysis(False, False)},  # 5 of 7 against Adam
        {"c": analysis(True, False)},  # one group against the best tuned
    ):
        assert q.bar_summary({**wins, **broken}, list(q.TASKS))["bar_met"] is False, broken
    assert q.bar_summary(wins, list(q.TASKS), full=False)["bar_met"] is None
    assert q.bar_summary(wins, ["a", "b"])["bar_met"] is None


def test_a_learned_run_that_stops_learning_is_marked_stalled() -> None:
    """Stall: final loss above half the loss at 10% of the run and above twice Adam 1e-3's final loss."""
    def run(optimizer: str, seed: int, curve: list[float], final: float) -> dict[str, Any]:
        kind, lr = optimizer.split("@")
        return {"optimizer": optimizer, "kind": kind, "lr": float(lr), "variant": "default", "seed": seed,
                "steps": 100, "eval_steps": [0, 10, 50, 100], "eval_curve": curve + [final], "curve_steps": [100],
                "curve": [final], "final_loss": final, "initial_loss": curve[0], "nonfinite": False,
                "diverged": False, "test_accuracy": None, "seconds": 1.0, "train_seconds": 1.0,
                "seconds_per_step": 0.01}

    adam = q.summarize([run("adam@0.001", s, [10.0, 5.0, 2.0], 1.0) for s in range(2)])
    # Seed 0 stalls: 3.0 > 0.5 * 4.0 (its loss at step 10) and 3.0 > 2 * 1.0. Seed 1 kept learning (1.5 < 2.0).
    learned = q.summarize([run("learned@1", 0, [10.0, 4.0, 3.2], 3.0), run("learned@1", 1, [10.0, 4.0, 2.5], 1.5)])
    a = q.analyse_task({adam["optimizer"]: adam, learned["optimizer"]: learned}, {"adam": [1e-3]})
    assert a["learned_stalled_seeds"] == [0]
    # Far from Adam's final loss but still learning is no stall: 2.5 < 0.5 * 6.0.
    slow = q.summarize([run("learned@1", 0, [10.0, 6.0, 4.0], 2.5)])
    assert q.analyse_task({adam["optimizer"]: adam, slow["optimizer"]: slow}, {"adam": [1e-3]})["learned_stalled_seeds"] == []


def test_a_progress_input_optimizer_is_told_the_run_length() -> None:
    """Weights meta-trained with the progress input see step / steps in the benchmark, as under TrainingProgress."""
    lopt = HierarchicalRNN(progress_input=True, seed=3)
    task = q.build_task("f", **TINY["f"])
    r = q.run_one(task, q.OptimizerConfig("learned", 1.0), seed=0, steps=6, lopt=lopt, eval_points=1)

    def replay(total_steps):
        params, opt = _replay_learned(task, lopt, steps=6, total_steps=total_steps)
        opt.eval()
        with torch.no_grad():
            return float(task.loss(params, None))

    assert r["final_loss"] == pytest.approx(replay(6), rel=1e-6)
    assert r["final_loss"] != pytest.approx(replay(None), rel=1e-6)


def test_applied_step_size_is_the_rms_change_of_the_parameters() -> None:
    """Adam's first step moves every parameter with a non-zero gradient by exactly its lr."""
    task = q.build_task("f", **TINY["f"])
    r = q.run_one(task, q.OptimizerConfig("adam", 0.01), seed=0, steps=1, eval_points=1)
    assert r["update_rms"] == pytest.approx(0.01, rel=1e-4)


def test_tuned_learned_rows_pick_the_best_multiplier_and_leave_the_bar_alone(tmp_path: Path) -> None:
    kwargs = _tiny_benchmark(tmp_path, seeds=1)
    results = q.run_benchmark(**kwargs, tune_learned=True)
    assert results["meta"]["runs_executed"] == 2 * (len(q.LEARNED_SWEEP) + 3)
    md = results["markdown"].split("## Step size", 1)[1].split("\n## ", 1)[0]
    for key, t in results["tasks"].items():
        s, a = t["summaries"], t["analysis"]
        sweep = [v for v in s.values() if v["kind"] == "learned"]
        assert sorted(v["lr"] for v in sweep) == sorted(q.LEARNED_SWEEP)
        best = min(sweep, key=lambda v: v["final_loss"]["mean"])
        assert a["learned_tuned"] == best["optimizer"] and a["learned_tuned_lr"] == best["lr"]
        assert a["learned_update_rms"] == pytest.approx(s[a["learned"]]["update_rms"]) and a["learned_update_rms"] > 0
        assert a["tuned_adam_lr"] == 1e-3
        row = next(line for line in md.splitlines() if line.startswith(f"| {key} {t['name']} |"))
        assert f"@ {best['lr']:g}" in row
    assert "learned, lr multiplier tuned: lower final loss than Adam 1e-3 on" in md
    plain = q.run_benchmark(**kwargs)
    assert plain["meta"]["runs_executed"] == 0 and plain["bar"] == results["bar"]
    assert "learned tuned" not in plain["markdown"]
