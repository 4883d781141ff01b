"""ES meta-gradients (PES, ES-Single): particles follow the update rule, the estimate is unbiased for
the whole horizon where truncated backprop is not, and PES meta-training resumes exactly."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_lopt import HierarchicalRNN
from lightning_lopt.meta import MetaTrainingModule, TaskDataModule, run_inner
from lightning_lopt.meta.bias import (
    es_derivatives,
    finite_difference,
    parameter_index,
    particles_of,
    start_task,
    summary,
    tbptt_derivative,
)
from lightning_lopt.meta.pes import (
    antithetic,
    clipped_meta_loss,
    draw_perturbations,
    flat_meta_parameters,
    pes_estimate,
    unroll_particles,
)
from lightning_lopt.tasks import GradientNoise, QuadraticTask, ReparamWeights, Task, TaskDistribution
from tests.processes import ended_well

sys.path.insert(0, str(Path(__file__).parent))
from test_meta import QuadDistribution, _meta_trainer  # noqa: E402


def _noisy_quadratic() -> Task:
    return GradientNoise(QuadraticTask(dim=20, seed=3), noise=1.0)


def test_unperturbed_particles_follow_the_update_rule():
    """Every particle at theta steps exactly as the reference unroll, gradient noise draws included."""
    lopt = HierarchicalRNN.from_pretrained("default")
    task = ReparamWeights(_noisy_quadratic(), seed=1)
    reference = start_task(lopt, task, 60)
    particles = particles_of(start_task(lopt, task, 60), 4)
    with torch.no_grad():
        _, hist, _ = run_inner(lopt, [reference], 30)
    theta = flat_meta_parameters(lopt)
    losses, ran, _ = unroll_particles(lopt, particles, antithetic(theta, torch.zeros(2, theta.numel())), 30, 1.0)
    assert ran == 30 == particles.steps_done
    for i in range(4):
        torch.testing.assert_close(particles.point[i], reference.point, rtol=1e-5, atol=1e-6)
    expected = clipped_meta_loss(torch.tensor(hist[0]), reference.initial_loss, 1.0).mean()
    torch.testing.assert_close(losses, expected.expand(4), rtol=1e-4, atol=1e-5)
    # The task's generator advanced as one task's would: the next batch and noise match.
    assert torch.equal(particles.generator.get_state(), reference.generator.get_state())


class _Cliff(Task):
    """``||x||^2`` that turns non-finite once any coordinate passes 10."""

    family = "cliff"

    def init_params(self, generator):
        return [torch.randn(8, generator=generator)]

    def loss(self, params, batch):
        x = params[0]
        return (x * x).sum() + torch.where((x.abs() > 10).any(), torch.tensor(float("inf")), torch.tensor(0.0))


def test_diverging_particles_score_the_maximum_and_never_nan():
    """A particle whose loss goes non-finite counts as meta_loss_max; the estimate stays finite."""
    lopt = HierarchicalRNN.from_pretrained("tbptt_step7250")  # no trust-ratio bound: a large step can diverge
    theta = flat_meta_parameters(lopt)
    # Perturb only the step offset c, hard: the + particle takes steps e^5 times larger and diverges.
    index = parameter_index(lopt, "step_offset")
    eps = torch.zeros(1, theta.numel())
    eps[0, index] = 8.0
    slot = particles_of(start_task(lopt, _Cliff(), 40), 2)
    losses, ran, _ = unroll_particles(lopt, slot, antithetic(theta, eps), 40, 1.0)
    assert ran == 40
    assert slot.dead.tolist() == [True, False]
    assert losses[0] > losses[1] and torch.isfinite(losses).all()
    assert losses[0] <= 1.0
    estimate = pes_estimate(eps, losses, 0.01)
    assert torch.isfinite(estimate).all() and estimate[index] > 0  # pushes c down, away from divergence


def test_pes_follows_the_whole_horizon_where_truncated_backprop_anneals():
    """The short-horizon bias and its cure, on a noisy quadratic with the truncated-backprop weights
    (``tbptt_step7250``, the default until the ES campaign's weights replaced them).

    d/d b_log_lr of the whole 300-step objective is negative (a slower decay of the learning rate
    helps), but 16-step truncated backprop says positive: it keeps teaching the rule to anneal.
    PES over the same horizon agrees with the finite difference in sign and within its interval.
    """
    lopt = HierarchicalRNN.from_pretrained("tbptt_step7250")
    name, horizon = "b_log_lr", 300
    fd = finite_difference(lopt, _noisy_quadratic, horizon, name, h=0.02)
    tbptt = tbptt_derivative(lopt, _noisy_quadratic, horizon, 16, name)
    mean, sem = summary(es_derivatives(lopt, _noisy_quadratic, horizon, 50, name, pairs=24, sigma=0.01))
    assert fd < 0 < tbptt, (fd, tbptt)
    assert mean < 0, (mean, sem, fd)
    assert abs(mean - fd) < 3 * sem, (mean, sem, fd)


def test_pes_and_es_single_are_unbiased_on_a_tiny_problem():
    """On a noise-free 2-D quadratic over 100 steps, the mean of many PES estimates (and of ES-Single's)
    lies within its 99.7% interval of the finite-difference derivative of the whole-horizon objective."""

    def task_fn():
        return QuadraticTask(dim=2, seed=5)

    lopt = HierarchicalRNN.from_pretrained("default")
    name, horizon = "step_offset", 100
    fd = finite_difference(lopt, task_fn, horizon, name, h=0.01)
    assert abs(fd) > 1e-3  # a derivative worth estimating
    for estimator in ("pes", "es_single"):
        mean, sem = summary(es_derivatives(lopt, task_fn, horizon, 25, name, pairs=64, sigma=0.01, estimator=estimator))
        assert abs(mean - fd) < 3 * sem, (estimator, mean, sem, fd)
        assert sem < abs(fd), (estimator, sem, fd)  # the interval is tight enough to mean something


def _pes_module(**kw) -> MetaTrainingModule:
    args = dict(tasks=QuadDistribution(), tasks_per_step=2, gradient_estimator="pes", pes_pairs=2,
                truncation_length=4, task_lengths=(6, 14), meta_lr=1e-3)
    return MetaTrainingModule(**{**args, **kw})


class _Recording(MetaTrainingModule):
    """Checks, after each meta-step, each slot's xi against perturbations redrawn from the noise stream."""

    def training_step(self, batch, batch_idx):
        mirror = torch.Generator()
        mirror.set_state(self._noise().get_state())
        before = [None if s is None else id(s) for s in self.slots]
        out = super().training_step(batch, batch_idx)
        dim = flat_meta_parameters(self.lopt).numel()
        for i, slot in enumerate(self.slots):
            eps = draw_perturbations(self.hparams.pes_pairs, dim, self.hparams.pes_sigma, mirror, torch.device("cpu"))
            restarted = before[i] != id(slot)
            self.sums[i] = eps if restarted else self.sums[i] + eps
            self.restarts += int(restarted and before[i] is not None)
            torch.testing.assert_close(slot.xi, self.sums[i], rtol=0, atol=0)
        return out


def test_pes_xi_sums_the_perturbations_since_the_task_started(tmp_path):
    """xi is the running sum of each pair's perturbations, and restarts with a new task."""
    pl.seed_everything(0)
    module = _Recording(tasks=QuadDistribution(), tasks_per_step=2, gradient_estimator="pes", pes_pairs=2,
                        truncation_length=4, task_lengths=(6, 14))
    module.sums, module.restarts = {}, 0
    _meta_trainer(tmp_path, 10, enable_checkpointing=False).fit(module, TaskDataModule(tasks_per_step=2))
    assert module.restarts >= 2  # tasks ended and xi started again


def test_task_lengths_are_log_uniform_within_bounds():
    module = MetaTrainingModule(tasks=QuadDistribution(), gradient_estimator="pes", max_task_length=5000)
    assert module.hparams.truncation_length == 50 and module.hparams.task_lengths == [100, 5000]
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([module._task_length(gen) for _ in range(4000)], dtype=torch.float64)
    assert 100 <= lengths.min() and lengths.max() <= 5000
    # Log-uniform: the median is the geometric mean of the bounds (about 707).
    assert 600 < float(lengths.median()) < 830
    assert MetaTrainingModule(tasks=QuadDistribution()).hparams.truncation_length == 16


def test_bad_estimator_settings_are_refused():
    with pytest.raises(ValueError, match="gradient_estimator"):
        MetaTrainingModule(tasks=QuadDistribution(), gradient_estimator="reinforce")
    with pytest.raises(ValueError, match="pes_pairs"):
        MetaTrainingModule(tasks=QuadDistribution(), gradient_estimator="pes", pes_pairs=0)


@pytest.mark.parametrize("estimator", ["pes", "es_single"])
def test_es_meta_training_resumes_exactly(tmp_path, estimator):
    """Fit N, resume to 2N == an uninterrupted 2N run: meta-parameters, particles, xi, noise."""
    pl.seed_everything(0)
    full = _pes_module(gradient_estimator=estimator)
    _meta_trainer(tmp_path / "full", 8, enable_checkpointing=False).fit(full, TaskDataModule(tasks_per_step=2))

    pl.seed_everything(0)
    first = _pes_module(gradient_estimator=estimator)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _meta_trainer(tmp_path / "a", 4, callbacks=[ckpt_cb]).fit(first, TaskDataModule(tasks_per_step=2))
    ckpt = next((tmp_path / "ckpt").glob("*step=4*.ckpt"))
    torch.load(ckpt, weights_only=True)

    pl.seed_everything(123)  # resume must not depend on the global seed
    resumed = _pes_module(gradient_estimator=estimator)
    _meta_trainer(tmp_path / "b", 8, enable_checkpointing=False).fit(resumed, TaskDataModule(tasks_per_step=2), ckpt_path=ckpt)
    moved = False
    start = _pes_module().lopt.state_dict()
    for (name, a), b in zip(full.lopt.state_dict().items(), resumed.lopt.state_dict().values()):
        assert torch.equal(a, b), name
        moved = moved or not torch.equal(a, start[name])
    assert moved
    for a, b in zip(full.slots, resumed.slots):
        assert a.seed == b.seed and a.steps_done == b.steps_done
        assert torch.equal(a.xi, b.xi) and torch.equal(a.point, b.point)


def test_reparam_weights_changes_units_not_the_problem():
    """Per-tensor scales in [1e-3, 1e3]; the loss at the scaled initialisation equals the original's."""
    inner = TaskDistribution().sample_family("mlp", 3)
    task = ReparamWeights(inner, seed=7)
    assert len(set(task.scales)) == len(task.scales) > 1
    assert all(1e-3 <= s <= 1e3 for s in task.scales)
    p_inner = inner.init_params(torch.Generator().manual_seed(0))
    p = task.init_params(torch.Generator().manual_seed(0))
    batch = inner.sample_batch(torch.Generator().manual_seed(1))
    torch.testing.assert_close(task.loss(p, batch), inner.loss(p_inner, batch))
    for a, b, scale in zip(p, p_inner, task.scales):
        torch.testing.assert_close(a * scale, b)
    grads = torch.autograd.grad(task.loss([t.requires_grad_() for t in p], batch), p)
    inner_grads = torch.autograd.grad(inner.loss([t.requires_grad_() for t in p_inner], batch), p_inner)
    for g, gi, scale in zip(grads, inner_grads, task.scales):
        torch.testing.assert_close(g, gi * scale, rtol=1e-4, atol=1e-6)  # the optimizer sees gradients in its own units
    wrapped = TaskDistribution(reparam_prob=1.0).sample(11)
    assert isinstance(wrapped, ReparamWeights)
    # Off by default, and the default stream of tasks is unchanged by the new option.
    assert repr(TaskDistribution().sample(11)) == repr(TaskDistribution(reparam_prob=0.0).sample(11))


@pytest.mark.parametrize("config", ["meta_train.yaml", "meta_train_pes.yaml"])
def test_meta_training_configs_accept_the_pes_estimator(tmp_path, monkeypatch, config):
    """``--model.init_args.gradient_estimator=pes`` on the shipped configs builds a PES module."""
    from lightning_lopt.cli import build_cli

    monkeypatch.setattr("sys.argv", ["lightning-lopt"])
    threads = torch.get_num_threads()
    root = Path(__file__).parents[1]
    cli = build_cli(
        [f"--config={root / 'configs' / config}", "--model.init_args.gradient_estimator=pes",
         "--model.init_args.pes_pairs=3", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
         "--trainer.callbacks=[]"],
        run=False,
    )
    torch.set_num_threads(threads)
    assert cli.model.hparams.gradient_estimator == "pes" and cli.model.hparams.pes_pairs == 3
    assert cli.model.hparams.truncation_length in (16, 50)


DDP_PES_SCRIPT = """
import sys, torch, lightning.pytorch as pl
sys.path.insert(0, {tests!r})
from test_meta import QuadDistribution
from lightning_lopt.meta import MetaTrainingModule, TaskDataModule

pl.seed_everything(0)
module = MetaTrainingModule(tasks=QuadDistribution(), tasks_per_step=2, gradient_estimator="pes", pes_pairs=2,
                            truncation_length=4, task_lengths=(6, 14), num_threads=1, meta_lr=1e-3)
trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                     enable_model_summary=False)
trainer.fit(module, TaskDataModule(tasks_per_step=2))
torch.save({{"params": module.lopt.state_dict(), "seeds": [s.seed for s in module.slots],
            "xi": [s.xi for s in module.slots]}}, {out!r} + f"/rank{{trainer.global_rank}}.pt")
torch.distributed.destroy_process_group()
"""


def test_pes_under_ddp_averages_the_estimate_across_ranks(tmp_path):
    """Two processes run different tasks and perturbations yet end with identical meta-parameters."""
    import os
    import subprocess

    from test_meta import _free_port

    script = tmp_path / "ddp_pes.py"
    script.write_text(DDP_PES_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    written = all((tmp_path / f"rank{r}.pt").exists() for r in (0, 1))
    assert ended_well(proc.returncode, proc.stderr, written), proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not set(r0["seeds"]) & set(r1["seeds"])
    assert not torch.equal(r0["xi"][0], r1["xi"][0])  # each rank draws its own perturbations
    start = _pes_module().lopt.state_dict()
    moved = False
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), name
        moved = moved or not torch.equal(value, start[name])
    assert moved


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_meta_parameters_restricts_what_meta_training_changes(tmp_path, estimator):
    """Only the named meta-parameters move; under PES only they are perturbed."""
    pl.seed_everything(0)
    kw = {} if estimator == "pes" else {"gradient_estimator": "tbptt", "task_lengths": None,
                                        "unroll_length_mean": 10, "unroll_length_min": 5, "num_unrolls_mean": 1}
    module = _pes_module(meta_parameters=["b_*", "step_offset"], **kw)
    start = {n: p.detach().clone() for n, p in module.lopt.named_parameters()}
    _meta_trainer(tmp_path, 4, enable_checkpointing=False).fit(module, TaskDataModule(tasks_per_step=2))
    moved = {n for n, p in module.lopt.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert moved and moved <= {"b_log_lr", "b_beta_sc", "b_beta_in", "step_offset"}, moved
    if estimator == "pes":
        offsets = {n: parameter_index(module.lopt, n) for n in start}
        j = offsets["step_offset"]
        xi = module.slots[0].xi
        assert bool((xi[:, j] != 0).all())
        assert int((xi != 0).any(0).sum()) == 4  # three b_* scalars and step_offset
    with pytest.raises(ValueError, match="match none"):
        _pes_module(meta_parameters=["nothing*"])


# ---------------------------------------------------------------------------- architecture switches


def _progress_lopt(progress_input: bool = True) -> HierarchicalRNN:
    lopt = HierarchicalRNN(progress_input=progress_input)
    with torch.no_grad():  # a global RNN that reads its inputs strongly, so that progress shows within 3 steps
        lopt.global_rnn.weight_gates.mul_(4.0)
        lopt.global_rnn.weight_candidate.mul_(4.0)
        lopt.global_to_param.weight.mul_(4.0)
    return lopt


@pytest.mark.parametrize("progress_input", [True, False])
def test_inner_unrolls_pass_each_tasks_progress(progress_input):
    """run_inner (TBPTT) and unroll_particles (PES) feed steps_done / length: the same task run as part of a
    short and of a long horizon takes different steps with the progress input, identical ones without."""
    lopt = _progress_lopt(progress_input)
    task = QuadraticTask(dim=10, seed=2)
    with torch.no_grad():
        short, long = start_task(lopt, task, 4), start_task(lopt, task, 400)
        run_inner(lopt, [short, long], 3)
    particles = [particles_of(start_task(lopt, task, n), 2) for n in (4, 400)]
    theta = flat_meta_parameters(lopt)
    for p in particles:
        unroll_particles(lopt, p, antithetic(theta, torch.zeros(1, theta.numel())), 3, 1.0)
    assert short.steps_done == long.steps_done == 3
    if progress_input:
        assert not torch.allclose(short.point, long.point)
        assert not torch.allclose(particles[0].point, particles[1].point)
    else:
        assert torch.equal(short.point, long.point)
        assert torch.equal(particles[0].point, particles[1].point)
    # Particles at the unperturbed meta-parameters follow the TBPTT unroll, progress included.
    torch.testing.assert_close(particles[0].point[0], short.point, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(particles[1].point[1], long.point, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
@pytest.mark.parametrize(
    "config", [{"progress_input": True}, {"hierarchy": False, "num_timescales": 1}], ids=["progress", "ablation"]
)
def test_meta_training_with_architecture_switches(tmp_path, estimator, config):
    """Meta-training steps run with the progress input and with the paper's ablation, under both estimators,
    and the checkpoint rebuilds the same architecture."""
    pl.seed_everything(0)
    module = _pes_module(gradient_estimator=estimator, lopt_config=config)
    before = flat_meta_parameters(module.lopt)
    trainer = _meta_trainer(tmp_path, 3, enable_checkpointing=False)
    trainer.fit(module, TaskDataModule(tasks_per_step=2))
    after = flat_meta_parameters(module.lopt)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = HierarchicalRNN.from_pretrained(tmp_path / "last.ckpt")
    assert {k: loaded.config[k] for k in config} == config and loaded.config == module.lopt.config
    assert torch.equal(flat_meta_parameters(loaded), after)


def test_curves_join_a_resumed_run_and_plot(tmp_path):
    """A run resumed into a second log reads as one curve: the later log replaces the repeated steps."""
    from lightning_lopt.meta.curves import plot_runs, read_validation

    first, second = tmp_path / "a" / "metrics.csv", tmp_path / "b" / "metrics.csv"
    for path in (first, second):
        path.parent.mkdir()
    first.write_text("step,meta/train_seconds,val/log_ratio_vs_adam\n9,10,\n9,,0.5\n19,20,\n19,,0.4\n29,30,\n29,,0.3\n")
    second.write_text("step,meta/train_seconds,val/log_ratio_vs_adam\n29,28,\n29,,0.2\n39,38,\n39,,0.1\n")
    rows = read_validation(f"{tmp_path / 'b'},{tmp_path / 'a'}")
    assert [(r["step"], r["score"], r["seconds"]) for r in rows] == [(9, 0.5, 10), (19, 0.4, 20), (29, 0.2, 28), (39, 0.1, 38)]
    out = plot_runs([("run", f"{tmp_path / 'a'},{tmp_path / 'b'}")], tmp_path / "fig.png")
    assert out.stat().st_size > 1000


def test_resume_under_another_task_distribution_starts_fresh_tasks(tmp_path):
    """Changing the corpus between runs keeps the meta-parameters and warns; tasks in flight restart."""
    def module(noise_prob):
        return _pes_module(gradient_estimator="es_single", tasks=TaskDistribution(
            family_weights={"quadratic": 1.0, "norm": 1.0}, gradient_noise_prob=noise_prob, quadratic_dims=(3, 9),
            norm_dims=(3, 9)), task_lengths=(20, 40))

    pl.seed_everything(0)
    first = module(0.0)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    _meta_trainer(tmp_path / "a", 2, callbacks=[ckpt_cb]).fit(first, TaskDataModule(tasks_per_step=2))
    ckpt = next((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    assert torch.load(ckpt, weights_only=True)["meta_task_distribution"] == first.tasks.settings()

    same = module(0.0)
    same.on_load_checkpoint(torch.load(ckpt, weights_only=True))
    same.trainer = first.trainer  # on_train_start reads the world size and rank
    same.on_train_start()
    assert [s.seed for s in same.slots] == [s.seed for s in first.slots]

    changed = module(1.0)
    with pytest.warns(UserWarning, match="task distribution differs"):
        _meta_trainer(tmp_path / "b", 4, enable_checkpointing=False).fit(changed, TaskDataModule(tasks_per_step=2), ckpt_path=ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert changed.global_step == 4 and any(not torch.equal(v, saved[f"lopt.{k}"]) for k, v in changed.lopt.state_dict().items())
