"""Tests of the task corpus, the task distribution and the held-out tasks."""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import pytest
import torch

from lightning_lopt.tasks import (
    FUNCTIONS_2D,
    HELDOUT_TASKS,
    DigitsConvNetTask,
    Function2DTask,
    GradientNoise,
    HeldOutClassificationTask,
    LogisticRegressionTask,
    LogObjective,
    MatMulAlgorithmTask,
    MLPTask,
    MNIST1DMLPTask,
    NegativeLossError,
    QuadraticTask,
    Rescaled,
    SparseGradients,
    SumOfTasks,
    Task,
    TaskDistribution,
)

PLAIN = TaskDistribution(gradient_noise_prob=0.0, log_objective_prob=0.0, rescale_prob=0.0, sparse_prob=0.0)
FAMILIES = PLAIN.families

WRAPPERS: dict[str, Callable[[int], Task]] = {
    "log_objective": lambda s: LogObjective(QuadraticTask(dim=20, seed=s)),
    "rescaled": lambda s: Rescaled(MLPTask(seed=s), scale=10.0),
    "sum_of_tasks": lambda s: SumOfTasks(
        [QuadraticTask(dim=20, seed=s), Function2DTask("rosenbrock"), LogisticRegressionTask(seed=s + 1)]
    ),
    "sparse_gradients": lambda s: SparseGradients(QuadraticTask(dim=30, seed=s)),
    "gradient_noise": lambda s: GradientNoise(Function2DTask("booth"), noise=1.0),
}

HELDOUT: dict[str, Callable[[int], Task]] = {
    # A smaller MNIST-1D than the default 5000 examples keeps its generation (seconds) out of the test time.
    "mnist1d_mlp": lambda s: MNIST1DMLPTask(num_samples=1000),
    "digits_convnet": lambda s: DigitsConvNetTask(),
}

CASES: dict[str, Callable[[int], Task]] = {
    **{f"family:{f}": (lambda s, f=f: PLAIN.sample_family(f, s)) for f in FAMILIES},
    **{f"wrapper:{w}": fn for w, fn in WRAPPERS.items()},
    **{f"heldout:{h}": fn for h, fn in HELDOUT.items()},
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _setup(make: Callable[[int], Task], seed: int) -> tuple[Task, list[torch.Tensor], object]:
    task = make(seed)
    g = _gen(seed)
    params = task.init_params(g)
    return task, params, task.sample_batch(g)


def _leaves(task: Task) -> Iterator[Task]:
    if hasattr(task, "tasks"):
        for t in task.tasks:
            yield from _leaves(t)
    elif hasattr(task, "task"):
        yield from _leaves(task.task)
    else:
        yield task


@pytest.mark.parametrize("case", list(CASES))
def test_loss_nonnegative_finite_and_grads_finite(case: str) -> None:
    task, params, batch = _setup(CASES[case], 3)
    assert params and all(p.dtype == torch.float32 for p in params)
    params = [p.requires_grad_() for p in params]
    loss = task.checked_loss(params, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss >= 0
    grads = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g).all() for g in grads)
    seen = task.transform_grads(grads, _gen(1))
    assert [s.shape for s in seen] == [p.shape for p in params]
    perturb = _gen(7)
    for scale in (0.1, 1.0):
        moved = [p.detach() + scale * torch.randn(p.shape, generator=perturb) for p in params]
        value = task.checked_loss(moved, task.sample_batch(perturb))
        assert torch.isfinite(value) and value >= 0


@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_from_seed(case: str) -> None:
    torch.manual_seed(123)
    task_a, params_a, batch_a = _setup(CASES[case], 11)
    torch.manual_seed(456)  # global RNG must not matter
    task_b, params_b, batch_b = _setup(CASES[case], 11)
    assert repr(task_a) == repr(task_b)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))
    flat_a, flat_b = _flatten(batch_a), _flatten(batch_b)
    assert len(flat_a) == len(flat_b) and all(torch.equal(a, b) for a, b in zip(flat_a, flat_b))
    assert torch.equal(task_a.loss(params_a, batch_a), task_b.loss(params_b, batch_b))
    _, params_c, _ = _setup(CASES[case], 12)
    assert any(not torch.equal(a, c) for a, c in zip(params_a, params_c))


def _flatten(batch: object) -> list[torch.Tensor]:
    if batch is None:
        return []
    if isinstance(batch, torch.Tensor):
        return [batch]
    return [t for b in batch for t in _flatten(b)]


@pytest.mark.parametrize("case", list(CASES))
def test_adam_lowers_loss(case: str) -> None:
    task, params, _ = _setup(CASES[case], 5)
    params = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.Adam(params, lr=0.02)
    g = _gen(5)
    with torch.no_grad():
        before = float(task.loss(params, None))
    for _ in range(40):
        loss = task.checked_loss(params, task.sample_batch(g))
        grads = task.transform_grads(torch.autograd.grad(loss, params), g)
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step()
    with torch.no_grad():
        after = float(task.loss(params, None))
    assert after < before, f"{task!r}: {before} -> {after}"


def test_negative_loss_raises_naming_the_task() -> None:
    class Broken(Task):
        family = "broken_family"

        def init_params(self, generator: torch.Generator) -> list[torch.Tensor]:
            return [torch.zeros(2)]

        def loss(self, params, batch=None):
            return params[0].sum() - 1.0

    for task in (Broken(), Rescaled(Broken(), scale=2.0)):
        with pytest.raises(NegativeLossError, match="broken_family") as info:
            task.checked_loss(task.init_params(_gen(0)), None)
        assert "Broken" in str(info.value)


# Textbook definitions, written independently of the task code, in float64.
_TEXTBOOK = {
    "ackley": lambda x, y: -20 * np.exp(-0.2 * np.sqrt(0.5 * (x**2 + y**2)))
    - np.exp(0.5 * (np.cos(2 * np.pi * x) + np.cos(2 * np.pi * y)))
    + np.e
    + 20,
    "beale": lambda x, y: (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2,
    "booth": lambda x, y: (x + 2 * y - 7) ** 2 + (2 * x + y - 5) ** 2,
    "branin": lambda x, y: (y - 5.1 / (4 * np.pi**2) * x**2 + 5 / np.pi * x - 6) ** 2
    + 10 * (1 - 1 / (8 * np.pi)) * np.cos(x)
    + 10,
    "logsumexp": lambda x, y: np.log(np.exp(x + 3 * y - 0.1) + np.exp(x - 3 * y - 0.1) + np.exp(-x - 0.1)),
    "matyas": lambda x, y: 0.26 * (x**2 + y**2) - 0.48 * x * y,
    "michalewicz": lambda x, y: -np.sin(x) * np.sin(x**2 / np.pi) ** 20 - np.sin(y) * np.sin(2 * y**2 / np.pi) ** 20,
    "rosenbrock": lambda x, y: (1 - x) ** 2 + 100 * (y - x**2) ** 2,
    "styblinski_tang": lambda x, y: 0.5 * (x**4 - 16 * x**2 + 5 * x + y**4 - 16 * y**2 + 5 * y),
}
# Published global minima (value, minimisers).
_KNOWN_MINIMA = {
    "ackley": (0.0, [(0, 0)]),
    "beale": (0.0, [(3, 0.5)]),
    "booth": (0.0, [(1, 3)]),
    "branin": (0.397887, [(-math.pi, 12.275), (math.pi, 2.275), (9.42478, 2.475)]),
    "logsumexp": (1.5 * math.log(2) - 0.1, [(-math.log(2) / 2, 0)]),
    "matyas": (0.0, [(0, 0)]),
    "michalewicz": (-1.8013, [(2.20290552, 1.57079633)]),
    "rosenbrock": (0.0, [(1, 1)]),
    "styblinski_tang": (-39.16617 * 2, [(-2.903534, -2.903534)]),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS_2D))
def test_2d_functions_match_textbook_and_vanish_at_minimum(name: str) -> None:
    task, spec, textbook = Function2DTask(name), FUNCTIONS_2D[name], _TEXTBOOK[name]
    value, minimisers = _KNOWN_MINIMA[name]
    assert spec.minimum == pytest.approx(value, abs=1e-3)
    for mx, my in minimisers:
        assert textbook(mx, my) == pytest.approx(value, abs=1e-3)
        assert float(task.loss([torch.tensor([mx, my], dtype=torch.float64)])) == pytest.approx(0.0, abs=1e-3)
    exact = torch.tensor(spec.minimizer, dtype=torch.float32, requires_grad=True)
    loss = task.checked_loss([exact], None)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-5)
    assert torch.isfinite(torch.autograd.grad(loss, exact)[0]).all()
    # Off the minimiser, the loss is exactly the textbook function minus its minimum (in the box).
    rng = np.random.default_rng(0)
    (x_lo, x_hi), (y_lo, y_hi) = spec.box
    for x, y in zip(rng.uniform(x_lo, x_hi, 20), rng.uniform(y_lo, y_hi, 20)):
        got = float(task.loss([torch.tensor([x, y], dtype=torch.float64)]))
        want = max(textbook(x, y) - spec.minimum, 0.0)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_michalewicz_stays_nonnegative_outside_its_box() -> None:
    task = Function2DTask("michalewicz")
    # Outside [0, pi] the raw function dips below its in-box minimum; the loss must not.
    points = 40.0 * torch.rand(2000, 2, generator=_gen(0)) - 20.0
    assert min(float(task.loss([p])) for p in points) >= 0


def test_matmul_strassen_has_zero_loss() -> None:
    # Rows: Strassen's 7 products; vec order (11, 12, 21, 22).
    u = [[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0], [-1, 0, 1, 0], [0, 1, 0, -1]]
    v = [[1, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, -1], [-1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]]
    w = [[1, 0, 0, 1, -1, 0, 1], [0, 0, 1, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0, 0], [1, -1, 1, 0, 0, 1, 0]]
    task = MatMulAlgorithmTask(n=2, rank=7)
    params = [torch.tensor(m, dtype=torch.float32) for m in (u, v, w)]
    assert float(task.loss(params, None)) == 0.0
    assert float(task.loss(params, task.sample_batch(_gen(0)))) == pytest.approx(0.0, abs=1e-9)
    # The exact expectation matches a large Monte-Carlo batch for random factors.
    rand = task.init_params(_gen(1))
    big = MatMulAlgorithmTask(n=2, rank=7, batch_size=20000)
    assert float(big.loss(rand, big.sample_batch(_gen(2)))) == pytest.approx(float(task.loss(rand, None)), rel=0.05)


def test_sparse_gradients_zero_about_99_percent() -> None:
    task = SparseGradients(QuadraticTask(dim=20))
    grads = [torch.ones(200, 100), torch.ones(100)]
    out = task.transform_grads(grads, _gen(0))
    zero = sum(int((o == 0).sum()) for o in out) / sum(g.numel() for g in grads)
    assert 0.985 < zero < 0.995
    kept = torch.cat([o.flatten() for o in out])
    assert torch.all((kept == 0) | (kept == 1))
    assert all(torch.equal(a, b) for a, b in zip(task.transform_grads(grads, None), grads))


def test_gradient_noise_and_rescaling_and_sum() -> None:
    noisy = GradientNoise(QuadraticTask(dim=20), noise=2.0)
    out = noisy.transform_grads([torch.zeros(100, 100)], _gen(0))[0]
    assert float(out.std()) == pytest.approx(2.0, rel=0.05)

    inner = MLPTask(seed=1)
    scaled = Rescaled(inner, scale=37.0)
    p_inner, p_scaled = inner.init_params(_gen(0)), scaled.init_params(_gen(0))
    batch = inner.sample_batch(_gen(1))
    assert all(torch.allclose(a / 37.0, b) for a, b in zip(p_inner, p_scaled))
    p_scaled = [p.requires_grad_() for p in p_scaled]
    p_inner = [p.requires_grad_() for p in p_inner]
    g_scaled = torch.autograd.grad(scaled.loss(p_scaled, batch), p_scaled)
    g_inner = torch.autograd.grad(inner.loss(p_inner, batch), p_inner)
    assert all(torch.allclose(a, 37.0 * b, rtol=1e-4, atol=1e-6) for a, b in zip(g_scaled, g_inner))

    parts = [QuadraticTask(dim=20, seed=0), Function2DTask("beale"), MatMulAlgorithmTask()]
    total = SumOfTasks(parts)
    params = total.init_params(_gen(0))
    assert len(params) == 1 + 1 + 3
    assert total.num_params == 20 + 2 + 3 * 28
    expected = sum(t.loss(p, None) for t, p in zip(parts, [params[:1], params[1:2], params[2:]]))
    assert torch.allclose(total.loss(params, None), expected)
    assert total.family == "sum"


def test_distribution_is_deterministic_and_leaves_global_rng_alone() -> None:
    dist = TaskDistribution()
    state = torch.get_rng_state()
    reprs = [repr(dist.sample(s)) for s in range(40)]
    assert torch.equal(state, torch.get_rng_state())
    assert reprs == [repr(TaskDistribution().sample(s)) for s in range(40)]
    assert len(set(reprs)) > 30
    a, b = dist.sample(7), dist.sample(7)
    pa, pb = a.init_params(_gen(0)), b.init_params(_gen(0))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert torch.equal(a.loss(pa, a.sample_batch(_gen(1))), b.loss(pb, b.sample_batch(_gen(1))))


def test_distribution_weights_and_wrappers() -> None:
    only = TaskDistribution(family_weights={"rosenbrock": 1.0, "quadratic": 0.0})
    assert {only.sample(s).family for s in range(30)} == {"rosenbrock"}
    wrapped = TaskDistribution(
        family_weights={"quadratic": 1.0},
        gradient_noise_prob=1.0,
        log_objective_prob=1.0,
        rescale_prob=1.0,
        sparse_prob=1.0,
    ).sample(0)
    chain = []
    node: Task = wrapped
    while hasattr(node, "task"):
        chain.append(type(node))
        node = node.task
    assert chain == [SparseGradients, Rescaled, LogObjective, GradientNoise]
    assert isinstance(node, QuadraticTask) and wrapped.family == "quadratic"


def test_unknown_family_raises_listing_valid_names() -> None:
    with pytest.raises(ValueError, match="quadratic") as info:
        TaskDistribution(family_weights={"not_a_family": 1.0})
    assert "not_a_family" in str(info.value) and "rosenbrock" in str(info.value)
    with pytest.raises(ValueError, match="valid"):
        TaskDistribution().sample_family("mnist1d_mlp", 0)
    with pytest.raises(ValueError, match="valid"):
        TaskDistribution(gradient_noise_levels={"nope": 1.0})
    with pytest.raises(ValueError):
        TaskDistribution(family_weights={"quadratic": 0.0})


def test_heldout_tasks_never_sampled() -> None:
    heldout_families = {cls.family for cls in HELDOUT_TASKS}
    assert heldout_families == {"mnist1d_mlp", "digits_convnet"}
    for dist in (TaskDistribution(), TaskDistribution(family_weights={f: 1.0 for f in FAMILIES if "large" not in f})):
        assert not heldout_families & set(dist.families)
        for seed in range(200):
            for leaf in _leaves(dist.sample(seed)):
                assert not isinstance(leaf, HeldOutClassificationTask)
                assert leaf.family not in heldout_families


def test_heldout_tasks_shapes_and_evaluation() -> None:
    mnist, digits = MNIST1DMLPTask(num_samples=1000), DigitsConvNetTask()
    assert mnist.x.shape == (800, 40) and mnist.x_test.shape == (200, 40)
    assert digits.x.shape[1:] == (1, 8, 8) and len(digits.x) + len(digits.x_test) == 1797
    for task in (mnist, digits):
        metrics = task.evaluate(task.init_params(_gen(0)))
        assert metrics["test_loss"] > 0 and 0 <= metrics["test_accuracy"] <= 1
    state = np.random.get_state()[1].copy()
    MNIST1DMLPTask(num_samples=300)  # a fresh (uncached) generation
    assert np.array_equal(state, np.random.get_state()[1])


def test_deep_relu_mlp_is_a_relu_network_and_opt_in():
    """The deep ReLU family computes ReLU layers (checked by hand) and leaves the default stream alone."""
    from lightning_lopt.tasks import DeepReLUMLPTask, MLPTask

    task = DeepReLUMLPTask(input_dim=5, hidden_sizes=(7, 6, 4), num_classes=3, num_samples=64, batch_size=8, seed=2)
    params = task.init_params(torch.Generator().manual_seed(0))
    h = task.x
    for i in range(0, len(params) - 2, 2):
        h = torch.relu(h @ params[i].T + params[i + 1])
    logits = h @ params[-2].T + params[-1]
    torch.testing.assert_close(task.loss(params, None), torch.nn.functional.cross_entropy(logits, task.y))
    sigmoid = MLPTask(input_dim=5, hidden_sizes=(7, 6, 4), num_classes=3, num_samples=64, batch_size=8, seed=2)
    assert not torch.allclose(sigmoid.loss(params, None), task.loss(params, None))
    assert TaskDistribution().family_weights["mlp_deep_relu"] == 0.0
    assert all(TaskDistribution().sample(s).family != "mlp_deep_relu" for s in range(200))
    assert TaskDistribution(family_weights={"mlp_deep_relu": 1.0}).sample(3).family == "mlp_deep_relu"


def test_conv_and_attention_families_compute_their_networks_and_are_opt_in():
    """The conv net equals torch.nn's layers with its weights; the attention task equals
    nn.MultiheadAttention's one-head arithmetic done by hand; labels use every class; both opt-in."""
    from lightning_lopt.tasks import AttentionTask, ConvNetTask

    conv = ConvNetTask(size=6, channels=(3, 5), num_classes=4, num_samples=64, batch_size=8, seed=1)
    w1, b1, w2, b2, w3, b3 = conv.init_params(torch.Generator().manual_seed(0))
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 4))
    with torch.no_grad():
        for (w, b), layer in zip([(w1, b1), (w2, b2), (w3, b3)], [net[0], net[2], net[6]]):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        expected = torch.nn.functional.cross_entropy(net(conv.x), conv.y)
    torch.testing.assert_close(conv.loss([w1, b1, w2, b2, w3, b3], None), expected)

    att = AttentionTask(length=5, dim=4, num_classes=3, num_samples=64, batch_size=8, seed=2)
    wq, wk, wv, wo, bo = att.init_params(torch.Generator().manual_seed(0))
    logits = []
    for seq in att.x:  # one sequence at a time, by hand
        scores = (seq @ wq.T) @ (seq @ wk.T).T / 2.0  # sqrt(dim) = 2
        logits.append(wo @ (torch.softmax(scores, -1) @ (seq @ wv.T)).mean(0) + bo)
    expected = torch.nn.functional.cross_entropy(torch.stack(logits), att.y)
    torch.testing.assert_close(att.loss([wq, wk, wv, wo, bo], None), expected)

    for task in (ConvNetTask(seed=3), AttentionTask(seed=3)):
        assert torch.bincount(task.y, minlength=task.num_classes).min() > 0.1 * task.num_samples / task.num_classes
    for family in ("conv", "attention"):
        assert TaskDistribution().family_weights[family] == 0.0
        assert TaskDistribution(family_weights={family: 1.0}).sample(3).family == family


@pytest.mark.parametrize("name", ["meta_train_corpus.yaml", "meta_train_steady.yaml", "meta_train_wide.yaml"])
def test_corpus_campaign_validates_on_a_deep_relu_net_a_conv_net_and_a_long_task(name):
    """The corpus campaigns' validation sets hold what selection must see."""
    from pathlib import Path

    import yaml

    from lightning_lopt.meta.data import TaskDataModule

    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / name).read_text())
    model = config["model"]["init_args"]
    tasks = TaskDistribution(**model["tasks"]["init_args"])
    data = TaskDataModule(**config["data"]["init_args"])
    lengths = model["validation_lengths"]

    def leaf(task):
        while hasattr(task, "task"):
            task = task.task
        return task.family

    found = [(leaf(tasks.sample(s)), lengths[i % len(lengths)]) for i, s in enumerate(data.validation_seeds())]
    assert ("mlp_deep_relu", 3000) in found
    assert any(f == "conv" for f, _ in found)
    if name == "meta_train_corpus.yaml":  # the later runs weigh attention models too little to draw one
        assert any(f == "attention" for f, _ in found)
