"""The per-tensor step gain (``lr_adaptation``): the learned gain and the hypergradient baseline,
hand-checked against the rule without a gain, with and without the loss a closure returns."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer
from lightning_lopt.hrnn import LOSS_DECAY, HRNNState, Layout, _read_weights

SIZES = [40, 12]
PLAIN = "es_step350_bounded"  # shipped weights meta-trained without a gain


def _rule(mode, w_gain=None, **kwargs) -> HierarchicalRNN:
    config, tensors, source = _read_weights(PLAIN)
    lopt = HierarchicalRNN(**{**config, "max_update_ratio": None, "lr_adaptation": mode, **kwargs})
    lopt.load_weights(tensors, source=source)
    if w_gain is not None:
        with torch.no_grad():
            lopt.w_gain.copy_(torch.tensor(w_gain))
    return lopt


def _mid_run_state(
    lopt: HierarchicalRNN, layout: Layout, gen: torch.Generator, scale: float = 1.0
) -> tuple[HRNNState, Tensor]:
    """A state with non-zero momenta, so that the alignment is defined."""
    point = scale * torch.randn(layout.numel, generator=gen)
    state = lopt.init_state(layout, theta=point.clone(), generator=gen)
    k = lopt.num_timescales
    return state._replace(momentum=0.1 * torch.randn(layout.numel, k, generator=gen),
                          mean_square=0.01 + 0.1 * torch.rand(layout.numel, k, generator=gen)), point


def _alignment(grad: Tensor, state: HRNNState, sl: slice, s: int) -> float:
    x = state.momentum[sl, s] / torch.sqrt(state.mean_square[sl, s] + 1e-16)
    return float(torch.dot(grad[sl], x) / (grad[sl].norm() * x.norm()))


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_zero_gain_weights_leave_the_rule_unchanged(backend):
    """Weights without a gain loaded into a rule with a learned one (w_gain starts at zero) step
    exactly as the rule without one, with or without a loss."""
    gen = torch.Generator().manual_seed(0)
    layout = Layout.build(SIZES)
    plain, gained = _rule(None), _rule("learned")
    state, point = _mid_run_state(plain, layout, gen)
    wide = gained.init_state(layout, theta=point.clone())._replace(
        **{f: getattr(state, f) for f in HRNNState._fields if f not in ("h_tensor", "h_global")})
    grad = torch.randn(layout.numel, generator=gen)
    with torch.no_grad():
        a = plain.step(state, point.clone(), grad, layout, backend=backend)
        b = gained.step(wide, point.clone(), grad, layout, backend=backend, loss=2.5)
    torch.testing.assert_close(b.point, a.point, rtol=0, atol=0)
    torch.testing.assert_close(b.state.h_tensor[:, :-1], a.state.h_tensor, rtol=0, atol=0)
    assert torch.equal(b.state.h_tensor[:, -1], torch.zeros(2))  # log gain 0
    torch.testing.assert_close(b.state.h_global[:, -2:], torch.tensor([[(1 - LOSS_DECAY) * math.log(2.5), 1 - LOSS_DECAY]]))


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_hypergradient_gain_follows_the_alignment_by_hand(backend):
    """log g = hypergradient_lr * cos(grad, m_0 / sqrt(v_0)) per tensor, and each tensor's update is
    the rule's own times g."""
    gen = torch.Generator().manual_seed(1)
    layout = Layout.build(SIZES)
    plain, hyper = _rule(None), _rule("hypergradient", hypergradient_lr=0.5)
    # Small parameters, so that float32 rounding of theta + update stays far below the updates.
    state, point = _mid_run_state(plain, layout, gen, scale=1e-4)
    wide = hyper.init_state(layout, theta=point.clone())._replace(
        **{f: getattr(state, f) for f in HRNNState._fields if f not in ("h_tensor", "h_global")})
    # Along the fast momentum in the first tensor (too small a step), against it in the second.
    x0 = state.momentum[:, 0] / torch.sqrt(state.mean_square[:, 0] + 1e-16)
    grad = torch.cat([x0[:40] + 0.3 * torch.randn(40, generator=gen), -x0[40:]])
    with torch.no_grad():
        free = plain.step(state, point.clone(), grad, layout, backend=backend)
        out = hyper.step(wide, point.clone(), grad, layout, backend=backend)
    for t, sl in enumerate([slice(0, 40), slice(40, 52)]):
        expected = 0.5 * _alignment(grad, state, sl, 0)
        assert out.state.h_tensor[t, -1].item() == pytest.approx(expected, rel=1e-5)
        du_free = free.state.theta[sl] - point[sl]
        du = out.state.theta[sl] - point[sl]
        torch.testing.assert_close(du, du_free * math.exp(expected), rtol=1e-4, atol=1e-9)
    assert out.state.h_tensor[0, -1] > 0.3 and out.state.h_tensor[1, -1] == pytest.approx(-0.5, rel=1e-5)


def test_learned_gain_reads_alignment_and_loss_trend_by_hand():
    """With w_gain = (w_a, 0, 0, 0, w_r, w_s): log g += w_a * a_0 + w_r * r + w_s * max(r, 0), where r
    is log(loss) minus the running mean of the log loss (0 at the first loss)."""
    gen = torch.Generator().manual_seed(2)
    layout = Layout.build(SIZES)
    w_a, w_r, w_s = 0.3, -0.2, -0.5
    lopt = _rule("learned", [w_a, 0.0, 0.0, 0.0, w_r, w_s])
    state, point = _mid_run_state(lopt, layout, gen)
    losses = [1.0, 4.0, 0.5]
    log_gain = torch.zeros(2)
    mean = weight = 0.0
    with torch.no_grad():
        for loss in losses:
            grad = torch.randn(layout.numel, generator=gen)
            align = torch.tensor([_alignment(grad, state, sl, 0) for sl in (slice(0, 40), slice(40, 52))])
            r = 0.0 if weight == 0 else max(-3.0, min(3.0, math.log(loss) - mean / weight))
            log_gain = log_gain + w_a * align + w_r * r + w_s * max(r, 0.0)
            mean = LOSS_DECAY * mean + (1 - LOSS_DECAY) * math.log(loss)
            weight = LOSS_DECAY * weight + (1 - LOSS_DECAY)
            out = lopt.step(state, point, grad, layout, loss=torch.tensor(loss))
            state, point = out.state, out.point
            torch.testing.assert_close(state.h_tensor[:, -1], log_gain, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state.h_global[0, -2:], torch.tensor([mean, weight]), rtol=1e-5, atol=1e-7)


def test_unknown_loss_leaves_the_loss_statistics_and_the_gain_is_bounded():
    gen = torch.Generator().manual_seed(3)
    layout = Layout.build(SIZES)
    lopt = _rule("learned", [50.0, 0.0, 0.0, 0.0, 1.0, 1.0], log_gain_bounds=(-2.0, 1.0))
    state, point = _mid_run_state(lopt, layout, gen)
    x0 = state.momentum[:, 0] / torch.sqrt(state.mean_square[:, 0] + 1e-16)
    with torch.no_grad():
        for loss in (None, float("nan"), -1.0, 0.0):
            out = lopt.step(state, point, x0.clone(), layout, loss=loss)
            assert torch.equal(out.state.h_global[:, -2:], state.h_global[:, -2:])
            state, point = out.state, out.point
    assert torch.equal(state.h_tensor[:, -1], torch.ones(2))  # clipped at the upper bound


def _fit(opt: HierarchicalRNNOptimizer, model: torch.nn.Module, closure: bool, steps: int = 30) -> float:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 6, generator=gen), torch.randn(128, 2, generator=gen)

    def loss_fn() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


@pytest.mark.parametrize("closure", [True, False])
def test_optimizer_hypergradient_with_and_without_a_closure(closure):
    """The optimizer passes the closure's loss to the rule; without a closure the gain follows the
    alignment alone and the loss statistics stay empty. Either way it trains."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = HierarchicalRNNOptimizer(model.parameters(), lr_adaptation="hypergradient")
    before = _fit(opt, model, closure, steps=0)
    after = _fit(opt, model, closure, steps=100)
    assert after < 0.9 * before  # random targets: most of the loss cannot be fitted
    st = opt.hrnn_state
    assert st["h_tensor"].shape[1] == opt.lopt.tensor_units + 1
    assert bool((st["h_tensor"][:, -1] != 0).all())
    assert (st["h_global"][0, -1] > 0) == closure


def test_optimizer_state_saves_and_checks_the_gain():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2)
    opt = HierarchicalRNNOptimizer(model.parameters(), lr_adaptation="hypergradient", hypergradient_lr=0.05)
    _fit(opt, model, True, steps=5)
    saved = opt.state_dict()
    again = HierarchicalRNNOptimizer(model.parameters(), lr_adaptation="hypergradient", hypergradient_lr=0.05)
    again.load_state_dict(saved)
    torch.testing.assert_close(again.hrnn_state["h_tensor"], opt.hrnn_state["h_tensor"])
    with pytest.raises(ValueError, match="lr_adaptation"):
        HierarchicalRNNOptimizer(model.parameters(), lr_adaptation="none").load_state_dict(saved)


def test_bad_settings_are_refused():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="lr_adaptation"):
        HierarchicalRNNOptimizer(params, lr_adaptation="adam")
    with pytest.raises(ValueError, match="w_gain"):
        HierarchicalRNNOptimizer(params, weights=PLAIN, lr_adaptation="learned")  # no learned gain in them
    with pytest.raises(ValueError, match="hypergradient_lr"):
        HierarchicalRNNOptimizer(params, lr_adaptation="hypergradient", hypergradient_lr=0.0)
    with pytest.raises(ValueError, match="lr_adaptation"):
        HierarchicalRNN(lr_adaptation="sometimes")


def test_learned_gain_weights_save_and_load(tmp_path):
    lopt = _rule("learned", [0.1, 0.2, 0.0, 0.0, -0.1, 0.0])
    path = lopt.save_pretrained(tmp_path / "w.safetensors")
    back = HierarchicalRNN.from_pretrained(path)
    assert back.lr_adaptation == "learned"
    torch.testing.assert_close(back.w_gain, lopt.w_gain)
    opt = HierarchicalRNNOptimizer([torch.nn.Parameter(torch.ones(3))], weights=path)
    assert opt.lopt.lr_adaptation == "learned"


def test_default_weights_carry_a_learned_gain_that_a_user_can_swap():
    params = [torch.nn.Parameter(torch.ones(3))]
    assert HierarchicalRNNOptimizer(params).lopt.lr_adaptation == "learned"
    assert HierarchicalRNNOptimizer(params, lr_adaptation="hypergradient").lopt.lr_adaptation == "hypergradient"
    assert HierarchicalRNNOptimizer(params, lr_adaptation="none").lopt.lr_adaptation is None
