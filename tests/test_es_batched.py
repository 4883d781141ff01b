"""The batched ES unroll: every particle of every task through one update-rule step with its own
meta-parameters computes what the per-task reference computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from lightning_lopt import HierarchicalRNN
from lightning_lopt.bench.es_throughput import detach_from_trainer
from lightning_lopt.hrnn import HRNNState, Layout
from lightning_lopt.meta import MetaTrainingModule
from lightning_lopt.meta.pes import (
    _stacked_parameters,
    antithetic,
    flat_meta_parameters,
    unroll_particle_slots,
    unroll_particles,
)
from lightning_lopt.tasks import TaskDistribution

try:
    from lightning_lopt import kernels

    _KERNEL = kernels.cpu_kernel(warn=False)
except Exception:  # pragma: no cover - no compiler
    _KERNEL = None


def _lane_state(lopt: HierarchicalRNN, sizes: list[int], lanes: int, gen: torch.Generator) -> tuple[HRNNState, Tensor]:
    """A mid-run state for ``lanes`` problems of the same tensor sizes, as one flat vector."""
    layout = Layout.build(sizes)
    n = layout.numel
    states, points = [], []
    for _ in range(lanes):
        point = torch.randn(n, generator=gen)
        st = lopt.init_state(layout, theta=point + 0.01 * torch.randn(n, generator=gen), generator=gen)
        st = st._replace(
            h_param=0.3 * torch.randn(n, lopt.param_units, generator=gen),
            momentum=0.1 * torch.randn(n, lopt.num_timescales, generator=gen),
            mean_square=0.1 * torch.rand(n, lopt.num_timescales, generator=gen),
            beta_in=0.9 * torch.rand(n, generator=gen),
            beta_sc=0.9 * torch.rand(n, generator=gen),
            # The RNNs' columns mid-run; a step gain's columns (if any) as they start.
            h_tensor=torch.cat([torch.randn(len(sizes), lopt.tensor_units, generator=gen).tanh(),
                                st.h_tensor[:, lopt.tensor_units:]], 1),
            h_global=torch.cat([torch.randn(1, lopt.global_units, generator=gen).tanh(),
                                st.h_global[:, lopt.global_units:]], 1),
        )
        states.append(st)
        points.append(point)
    flat = HRNNState(*(torch.cat([getattr(s, f) for s in states]) for f in HRNNState._fields))
    return flat, torch.cat(points)



@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_per_problem_meta_parameters_step_each_problem_with_its_own_rule(backend):
    """A layout of problems with per-problem meta-parameters (three of one task's shape, two of
    another's) steps each problem exactly as a HierarchicalRNN holding that problem's
    meta-parameters steps it alone."""
    if backend == "cpp" and _KERNEL is None:
        pytest.skip("the C++ kernel could not be built here")
    from torch.nn.utils.stateless import _reparametrize_module

    gen = torch.Generator().manual_seed(0)
    lopt = HierarchicalRNN.from_pretrained("default")
    theta = flat_meta_parameters(lopt)
    shapes = [[30, 7, 50]] * 3 + [[12, 3]] * 2
    lanes = len(shapes)
    perturbed = theta + 0.05 * torch.randn(lanes, theta.numel(), generator=gen)
    parts = [_lane_state(lopt, sz, 1, gen) for sz in shapes]
    state = HRNNState(*(torch.cat([getattr(p[0], f) for p in parts]) for f in HRNNState._fields))
    point = torch.cat([p[1] for p in parts])
    grad = torch.randn(point.shape, generator=gen)
    layout = Layout.build([n for sz in shapes for n in sz], problems=[i for i, sz in enumerate(shapes) for _ in sz])
    params = {k[len("lopt."):]: v for k, v in _stacked_parameters(lopt, perturbed).items()}
    with torch.no_grad(), _reparametrize_module(lopt, params):
        out = lopt.step(state, point, grad, layout, backend=backend)
    assert lopt.last_backend == backend
    e0 = t0 = 0
    for i, sizes in enumerate(shapes):
        own = copy.deepcopy(lopt)
        torch.nn.utils.vector_to_parameters(perturbed[i], own.parameters())
        sl, st = slice(e0, e0 + sum(sizes)), slice(t0, t0 + len(sizes))
        e0, t0 = e0 + sum(sizes), t0 + len(sizes)
        one = HRNNState(
            *(v[sl] if f not in ("h_tensor", "h_global") else (v[st] if f == "h_tensor" else v[i : i + 1])
              for f, v in zip(HRNNState._fields, state))
        )
        with torch.no_grad():
            ref = own.step(one, point[sl], grad[sl], Layout.build(sizes), backend="eager")
        torch.testing.assert_close(out.point[sl], ref.point, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.state.log_lr[sl], ref.state.log_lr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.state.h_param[sl], ref.state.h_param, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.state.h_tensor[st], ref.state.h_tensor, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.state.h_global[i : i + 1], ref.state.h_global, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_per_problem_meta_parameters_swapped_in_anew_are_read_anew(backend):
    """The packed meta-parameters are kept between steps: each meta-step's new per-particle tensors
    (which may reuse a freed tensor's memory and id) must still be the ones the step reads."""
    if backend == "cpp" and _KERNEL is None:
        pytest.skip("the C++ kernel could not be built here")
    from torch.nn.utils.stateless import _reparametrize_module

    gen = torch.Generator().manual_seed(0)
    lopt = HierarchicalRNN.from_pretrained("default")
    theta = flat_meta_parameters(lopt)
    state, point = _lane_state(lopt, [20, 5], 2, gen)
    layout = Layout.build([20, 5, 20, 5], problems=[0, 0, 1, 1])
    grad = torch.randn(point.shape, generator=gen)

    def run(seed: int) -> Tensor:
        noise = torch.randn(2, theta.numel(), generator=torch.Generator().manual_seed(seed))
        params = {k[len("lopt."):]: v for k, v in _stacked_parameters(lopt, theta + 0.3 * noise).items()}
        with torch.no_grad(), _reparametrize_module(lopt, params):
            return lopt.step(state, point, grad, layout, backend=backend).point

    first, second = run(1), run(2)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(run(1), first, rtol=0, atol=0)


def _module(mode: str, estimator: str, **kwargs) -> MetaTrainingModule:
    tasks = TaskDistribution(
        family_weights={"mlp": 1.0, "quadratic": 1.0, "norm": 1.0, "logistic_regression": 1.0},
        gradient_noise_prob=0.5,
    )
    torch.manual_seed(0)
    module = MetaTrainingModule(
        tasks=tasks, init_weights="default", tasks_per_step=3,
        gradient_estimator=estimator, pes_pairs=2, truncation_length=12, task_lengths=(8, 30),
        meta_lr=1e-3, es_unroll=mode, **kwargs,
    )
    # Plain SGD: the meta-parameters move by the estimates themselves (Adam's normalisation would
    # turn rounding-level differences of near-zero entries into whole steps).
    detach_from_trainer(module, torch.optim.SGD(module.lopt.parameters(), lr=1e-3))
    return module


@pytest.mark.parametrize("estimator", ["es_single", "pes"])
def test_batched_unroll_gives_the_per_task_estimate(estimator):
    """The same seeds through both paths: the same meta-parameters after several meta-steps (tasks of
    8 to 30 steps ending inside 12-step truncations, gradient noise on half of them), the same
    particles, to float tolerance."""
    modules = {mode: _module(mode, estimator) for mode in ("per_task", "batched")}
    restarts = 0
    for k in range(5):
        seeds = torch.arange(100 + 3 * k, 103 + 3 * k)
        before = [id(s) for s in modules["batched"].slots]
        for m in modules.values():
            m.training_step({"index": torch.tensor(k), "seeds": seeds}, k)
        restarts += sum(a != id(s) for a, s in zip(before, modules["batched"].slots))
    assert restarts > 3  # tasks ended and restarted inside the run
    ref, fast = modules["per_task"], modules["batched"]
    torch.testing.assert_close(flat_meta_parameters(fast.lopt), flat_meta_parameters(ref.lopt), rtol=1e-5, atol=1e-6)
    assert not torch.equal(flat_meta_parameters(fast.lopt), flat_meta_parameters(_module("per_task", estimator).lopt))
    for a, b in zip(ref.slots, fast.slots):
        assert (a.seed, a.steps_done) == (b.seed, b.steps_done)
        torch.testing.assert_close(b.point, a.point, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.state.log_lr, a.state.log_lr, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.dead, b.dead)


def test_batched_unroll_gives_the_per_task_estimate_with_a_learned_step_gain():
    """The gain's weights start at zero on the default weights, get estimates, and both paths agree."""
    modules = {mode: _module(mode, "es_single", lopt_config={"lr_adaptation": "learned"},
                             meta_parameters=["w_*", "b_*"]) for mode in ("per_task", "batched")}
    for k in range(3):
        seeds = torch.arange(200 + 3 * k, 203 + 3 * k)
        for m in modules.values():
            m.training_step({"index": torch.tensor(k), "seeds": seeds}, k)
    ref, fast = modules["per_task"].lopt, modules["batched"].lopt
    assert bool((ref.w_gain != 0).all())
    torch.testing.assert_close(flat_meta_parameters(fast), flat_meta_parameters(ref), rtol=1e-5, atol=1e-6)


def test_batched_unroll_gives_the_per_task_estimate_on_conv_and_attention_tasks():
    """Tasks without a particle loss (their loss vmapped over the particles) in both paths."""
    tasks = TaskDistribution(family_weights={"conv": 1.0, "attention": 1.0}, gradient_noise_prob=0.0)
    modules = {}
    for mode in ("per_task", "batched"):
        torch.manual_seed(0)
        modules[mode] = MetaTrainingModule(
            tasks=tasks, init_weights="default", tasks_per_step=2, gradient_estimator="es_single", pes_pairs=2,
            truncation_length=6, task_lengths=(8, 20), meta_lr=1e-3, es_unroll=mode)
        detach_from_trainer(modules[mode], torch.optim.SGD(modules[mode].lopt.parameters(), lr=1e-3))
    for k in range(2):
        seeds = torch.arange(300 + 2 * k, 302 + 2 * k)
        for m in modules.values():
            m.training_step({"index": torch.tensor(k), "seeds": seeds}, k)
    assert {s.task.family for s in modules["batched"].slots} <= {"conv", "attention"}
    torch.testing.assert_close(flat_meta_parameters(modules["batched"].lopt),
                               flat_meta_parameters(modules["per_task"].lopt), rtol=1e-5, atol=1e-6)


def test_batched_unroll_with_progress_input_and_diagnostics():
    """Per-particle training progress and the first step's diagnostics match the reference."""
    lopt = HierarchicalRNN(progress_input=True, log_lr_bounds=(-14.0, 0.0))
    ref_mod, fast_mod = _module("per_task", "es_single"), _module("batched", "es_single")
    slots_ref = [ref_mod.new_particle_slot(s) for s in (7, 8)]
    slots_fast = [fast_mod.new_particle_slot(s) for s in (7, 8)]
    theta = flat_meta_parameters(lopt)
    eps = [0.01 * torch.randn(2, theta.numel(), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    perturbed = [antithetic(theta, e) for e in eps]
    ref = [unroll_particles(lopt, s, p, 6, 1.0, diagnostics=i == 0) for i, (s, p) in enumerate(zip(slots_ref, perturbed))]
    losses, steps, diag = unroll_particle_slots(lopt, slots_fast, perturbed, 6, 1.0, diagnostics=True)
    for (l_ref, ran, _), l_fast, ran_fast in zip(ref, losses, steps):
        assert ran == ran_fast
        torch.testing.assert_close(l_fast, l_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(slots_ref, slots_fast):
        torch.testing.assert_close(b.point, a.point, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diag.log_step_size, ref[0][2].log_step_size)
    torch.testing.assert_close(diag.h_global, ref[0][2].h_global)


def test_es_unroll_is_validated():
    with pytest.raises(ValueError, match="es_unroll"):
        MetaTrainingModule(gradient_estimator="es_single", es_unroll="fast")


def test_throughput_benchmark_runs_both_unrolls_on_a_config(tmp_path, capsys):
    """The benchmark builds both modules from a config and prints their rates and ratio."""
    from lightning_lopt.bench import es_throughput

    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model:\n  init_args:\n    tasks:\n      init_args:\n        family_weights: {quadratic: 1.0, mlp: 1.0}\n"
        "    tasks_per_step: 2\n    gradient_estimator: es_single\n    pes_pairs: 1\n"
        "    truncation_length: 5\n    task_lengths: [4, 12]\n"
    )
    es_throughput.main(["--config", str(config), "--rounds", "2", "--meta-steps", "2"])
    out = capsys.readouterr().out
    assert "| per_task |" in out and "| batched |" in out and "batched / per_task:" in out


def test_shared_gradient_draws_equal_the_per_particle_transform():
    """Noise and sparsity drawn once for all particles equal each particle's own transform run from
    the same generator state, and leave the generator where one transform leaves it."""
    from lightning_lopt.meta.pes import ParticleSlot, _transform_particle_grads
    from lightning_lopt.tasks import GradientNoise, QuadraticTask, SparseGradients

    task = SparseGradients(GradientNoise(QuadraticTask(dim=6, seed=1), noise=0.5), drop_prob=0.5)
    shapes = [p.shape for p in task.init_params(torch.Generator().manual_seed(0))]
    grads = torch.randn(4, sum(s.numel() for s in shapes))
    gen = torch.Generator().manual_seed(3)
    slot = ParticleSlot(seed=0, task=task, length=10, shapes=shapes, generator=gen, point=grads.clone(),
                        state=None, initial_loss=torch.tensor(1.0))  # type: ignore[arg-type]
    start = gen.get_state()
    shared = _transform_particle_grads(slot, grads)
    after = gen.get_state()
    rows = []
    for i in range(4):
        gen.set_state(start)
        parts = task.transform_grads([v.view(s) for v, s in zip(grads[i].split([s.numel() for s in shapes]), shapes)], gen)
        rows.append(torch.cat([p.reshape(-1) for p in parts]))
    assert torch.equal(shared, torch.stack(rows))
    assert torch.equal(after, gen.get_state())
    assert (shared == 0).any() and not torch.equal(shared, grads)


@pytest.mark.parametrize("wrap", ["rescaled", "reparam", "log"])
def test_wrappers_particle_losses_and_shared_draws_equal_the_per_particle_ones(wrap):
    """Rescaled, ReparamWeights and LogObjective: the batched loss equals the vmapped one, and the
    shared gradient draws equal each particle's own transform."""
    from torch.func import vmap

    from lightning_lopt.meta.pes import ParticleSlot, _transform_particle_grads
    from lightning_lopt.tasks import GradientNoise, LogObjective, MLPTask, ReparamWeights, Rescaled

    base = GradientNoise(MLPTask(seed=2), noise=0.3)
    task = {"rescaled": lambda: Rescaled(base, scale=7.0), "reparam": lambda: ReparamWeights(base, seed=3),
            "log": lambda: LogObjective(base)}[wrap]()
    params = task.init_params(torch.Generator().manual_seed(0))
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    flat = torch.cat([p.reshape(-1) for p in params]).repeat(4, 1) + 0.1 * torch.randn(4, sum(sizes))
    batch = task.sample_batch(torch.Generator().manual_seed(1))
    direct = task.particle_loss([v.reshape(4, *s) for v, s in zip(flat.split(sizes, dim=1), shapes)], batch)
    ref = vmap(lambda f: task.loss([v.view(s) for v, s in zip(f.split(sizes), shapes)], batch))(flat)
    torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-6)
    gen = torch.Generator().manual_seed(5)
    slot = ParticleSlot(seed=0, task=task, length=10, shapes=shapes, generator=gen, point=flat,
                        state=None, initial_loss=torch.tensor(1.0))  # type: ignore[arg-type]
    grads = torch.randn(4, sum(sizes))
    start = gen.get_state()
    shared = _transform_particle_grads(slot, grads)
    rows = []
    for i in range(4):
        gen.set_state(start)
        parts = task.transform_grads([v.view(s) for v, s in zip(grads[i].split(sizes), shapes)], gen)
        rows.append(torch.cat([p.reshape(-1) for p in parts]))
    torch.testing.assert_close(shared, torch.stack(rows), rtol=1e-6, atol=1e-6)


def test_batched_unroll_scores_diverging_particles_as_the_reference_does():
    """A particle driven to a non-finite loss is dead and scores meta_loss_max in both unrolls."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_pes import _Cliff  # noqa: E402

    from lightning_lopt.meta.bias import parameter_index, particles_of, start_task

    lopt = HierarchicalRNN.from_pretrained("tbptt_step7250")
    theta = flat_meta_parameters(lopt)
    eps = torch.zeros(1, theta.numel())
    eps[0, parameter_index(lopt, "step_offset")] = 8.0
    ref_slot = particles_of(start_task(lopt, _Cliff(), 40), 2)
    fast_slot = particles_of(start_task(lopt, _Cliff(), 40), 2)
    ref, _, _ = unroll_particles(lopt, ref_slot, antithetic(theta, eps), 40, 1.0)
    (fast,), _, _ = unroll_particle_slots(lopt, [fast_slot], [antithetic(theta, eps)], 40, 1.0)
    assert ref_slot.dead.tolist() == fast_slot.dead.tolist() == [True, False]
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["mlp_sigmoid", "mlp_deep_relu", "logistic", "rescaled", "reparam", "log",
                                  "noisy", "overridden_loss"])
def test_hand_written_gradients_equal_autograd(case):
    """particle_loss_and_grad (the batched unroll's gradients without autograd) gives the loss and the
    gradient that autograd takes of each particle's loss; a task whose loss a subclass or wrapper
    changes returns None, so that the unroll falls back to autograd."""
    from lightning_lopt.tasks import GradientNoise, LogisticRegressionTask, LogObjective, MLPTask, ReparamWeights, Rescaled
    from lightning_lopt.tasks.synthetic import DeepReLUMLPTask

    class SquaredLoss(MLPTask):
        def loss(self, params, batch=None):
            return super().loss(params, batch) ** 2

    mlp = MLPTask(hidden_sizes=(6, 5), seed=2)
    task = {
        "mlp_sigmoid": lambda: mlp,
        "mlp_deep_relu": lambda: DeepReLUMLPTask(hidden_sizes=(7, 7, 7), seed=1),
        "logistic": lambda: LogisticRegressionTask(features=9, seed=3),
        "rescaled": lambda: Rescaled(mlp, scale=7.0),
        "reparam": lambda: ReparamWeights(LogisticRegressionTask(features=5, seed=1), seed=3),
        "log": lambda: LogObjective(mlp),
        "noisy": lambda: GradientNoise(mlp, noise=0.3),  # noise is a transform: the gradient itself is exact
        "overridden_loss": lambda: SquaredLoss(seed=0),
    }[case]()
    gen = torch.Generator().manual_seed(0)
    params = [torch.stack(ps) for ps in zip(*[task.init_params(gen) for _ in range(4)])]
    params = [p + 0.3 * torch.randn(p.shape, generator=gen) for p in params]  # away from the zero biases
    batch = task.sample_batch(torch.Generator().manual_seed(1))
    by_hand = task.particle_loss_and_grad(params, batch)
    if case == "overridden_loss":
        assert by_hand is None
        return
    leaves = [p.clone().requires_grad_(True) for p in params]
    losses = task.particle_loss(leaves, batch)
    grads = torch.autograd.grad(losses.sum(), leaves)
    torch.testing.assert_close(by_hand[0], losses.detach(), rtol=1e-6, atol=1e-7)
    assert len(by_hand[1]) == len(grads)
    for mine, ref in zip(by_hand[1], grads):
        assert mine.shape == ref.shape
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-7)
    assert all(bool(g.abs().sum() > 0) for g in grads)
