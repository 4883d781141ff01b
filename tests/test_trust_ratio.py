"""The trust-ratio bound ``max_update_ratio``: each tensor's update is at most that fraction of the
tensor's norm, and otherwise the step is the rule's own."""

from __future__ import annotations

import pytest
import torch

from lightning_lopt import HierarchicalRNN
from lightning_lopt.hrnn import Layout, _read_weights


def _rule(ratio):
    config, tensors, source = _read_weights("es_step350_bounded")  # the bound, on weights without a gain
    lopt = HierarchicalRNN(**{**config, "max_update_ratio": ratio})
    lopt.load_weights(tensors, source=source)
    return lopt


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_updates_are_bounded_per_tensor_and_scaled_not_reshaped(backend):
    """A tensor whose update would exceed the bound gets the same update scaled to norm ratio * ||theta||;
    a tensor within the bound, and a tensor of norm zero, get the rule's own update."""
    gen = torch.Generator().manual_seed(0)
    sizes = [64, 32, 16]
    layout = Layout.build(sizes)
    theta = torch.cat([torch.randn(64, generator=gen), 1e-4 * torch.randn(32, generator=gen), torch.zeros(16)])
    free, bound = _rule(None), _rule(0.01)
    state = free.init_state(layout, theta=theta, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(theta.shape, generator=gen)
    with torch.no_grad():
        a = free.step(state, theta.clone(), grad, layout, backend=backend)
        b = bound.step(state, theta.clone(), grad, layout, backend=backend)
    assert bound.last_backend == backend or backend == "cpp" and bound.last_backend == "eager"
    spans = [slice(0, 64), slice(64, 96), slice(96, 112)]
    for i, sl in enumerate(spans):
        du_free = a.state.theta[sl] - theta[sl]
        du = b.state.theta[sl] - theta[sl]
        limit = 0.01 * theta[sl].norm()
        if i == 0:
            assert du_free.norm() < limit  # the weights' step is small against a unit-scale tensor
            torch.testing.assert_close(du, du_free)
        elif i == 1:
            assert du_free.norm() > 10 * limit  # a tiny tensor: the rule's step would swamp it
            torch.testing.assert_close(du.norm(), limit, rtol=1e-4, atol=0)
            torch.testing.assert_close(du, du_free * (limit / du_free.norm()), rtol=1e-4, atol=1e-12)
        else:
            torch.testing.assert_close(du, du_free)  # zero-initialised: not bound
    # The rest of the state (the RNNs, accumulators) is the rule's own.
    torch.testing.assert_close(b.state.log_lr, a.state.log_lr)
    torch.testing.assert_close(b.state.h_tensor, a.state.h_tensor)


def test_ratio_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="max_update_ratio"):
        HierarchicalRNN(max_update_ratio=0.0)
    path = _rule(0.05).save_pretrained(tmp_path / "w")
    assert HierarchicalRNN.from_pretrained(path).max_update_ratio == 0.05


def test_optimizer_sets_or_lifts_the_bound():
    """HierarchicalRNNOptimizer(max_update_ratio=r) bounds each step of a tiny tensor; inf lifts it."""
    from lightning_lopt import HierarchicalRNNOptimizer

    def step_norm(**kw):
        p = torch.nn.Parameter(1e-4 * torch.randn(50, generator=torch.Generator().manual_seed(0)))
        opt = HierarchicalRNNOptimizer([p], **kw)
        p.grad = torch.randn(50, generator=torch.Generator().manual_seed(1))
        before = p.detach().clone()
        opt.step()
        opt.eval()
        return float((p.detach() - before).norm() / before.norm())

    free = step_norm(max_update_ratio=float("inf"))
    assert free > 0.2
    assert step_norm(max_update_ratio=0.05) == pytest.approx(0.05, rel=1e-4)
    with pytest.raises(ValueError, match="max_update_ratio"):
        HierarchicalRNNOptimizer([torch.nn.Parameter(torch.ones(2))], max_update_ratio=-1.0)


def test_sweep_prints_a_row_per_task_with_each_bound(capsys):
    from lightning_lopt.bench import trust_sweep

    trust_sweep.main(["--tasks", "d", "--ratios", "none,0.01", "--seeds", "1", "--steps-scale", "0.02"])
    out = capsys.readouterr().out
    assert "| task | Adam 1e-3 | bound none | bound 0.01 |" in out
    row = next(line for line in out.splitlines() if line.startswith("| d "))
    assert len(row.split("|")) == 6 and all(float(c) > 0 for c in row.split("|")[2:5])


def test_sweep_sets_the_step_gain(capsys):
    from lightning_lopt.bench import trust_sweep

    assert trust_sweep.bounded("default", 0.01, "hypergradient=0.05").lr_adaptation == "hypergradient"
    assert trust_sweep.bounded("default", 0.01, "hypergradient=0.05").hypergradient_lr == 0.05
    trust_sweep.main(["--tasks", "d", "--ratios", "0.01", "--lr-adaptations", "none,hypergradient", "--seeds", "1",
                      "--steps-scale", "0.02"])
    out = capsys.readouterr().out
    assert "| task | Adam 1e-3 | bound 0.01, gain none | bound 0.01, gain hypergradient |" in out
    row = next(line for line in out.splitlines() if line.startswith("| d "))
    first, second = (float(c) for c in row.split("|")[3:5])
    assert first > 0 and second > 0 and first != second  # the gain changed the run


def test_sweep_sets_the_decay_phase(capsys):
    from lightning_lopt.bench import trust_sweep

    assert trust_sweep.bounded("default", 0.01, decay_fraction="0.2").decay_fraction == 0.2
    assert trust_sweep.bounded("default", 0.01).decay_fraction == HierarchicalRNN.from_pretrained(
        "lightning_lopt/weights/default.safetensors").decay_fraction
    trust_sweep.main(["--tasks", "d", "--ratios", "0.01", "--decay-fractions", "0,1", "--seeds", "1",
                      "--steps-scale", "0.2"])
    out = capsys.readouterr().out
    assert "| task | Adam 1e-3 | bound 0.01, decay 0 | bound 0.01, decay 1 |" in out
    row = next(line for line in out.splitlines() if line.startswith("| d "))
    assert all(float(c) > 0 for c in row.split("|")[2:5])
    # The table prints 4 digits; the runs themselves must differ.
    finals = [trust_sweep._run("d", (0.01, "weights", d), 0, "default", 0.2)["final"] for d in ("0", "1")]
    assert finals[0] != finals[1]
