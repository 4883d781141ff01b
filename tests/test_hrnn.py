"""The update rule of the hierarchical RNN against independent references written with plain torch ops."""

import json
import math

import pytest
import torch

from lightning_lopt import HierarchicalRNN, HRNNState, Layout
from lightning_lopt.hrnn import BiasGRU

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
MS_EPS = 1e-12
EPS = 1e-16


# ---------------------------------------------------------------------------- helpers


def make_lopt(seed=0, dtype=F64, scale=0.3, **kwargs):
    """A HierarchicalRNN whose meta-parameters are all perturbed, so that every term matters
    (w_log_lr and b_log_lr start at zero, w_attention starts equal to w_direction)."""
    lopt = HierarchicalRNN(seed=seed, **kwargs).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in lopt.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return lopt


def make_state(lopt, sizes, problems=None, seed=1, dtype=F64):
    """A deterministic, non-trivial state (non-zero accumulators and decays, spread-out log lr)."""
    layout = Layout.build(sizes, problems)
    n, t, p = layout.numel, layout.num_tensors, layout.num_problems
    k = lopt.num_timescales
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=F64)

    state = HRNNState(
        h_param=torch.tanh(randn(n, lopt.param_units)),
        momentum=randn(n, k),
        mean_square=0.1 + 2.0 * rand(n, k),
        beta_in=0.05 + 0.9 * rand(n),
        beta_sc=0.05 + 0.9 * rand(n),
        log_lr=-5.0 + 1.5 * randn(n),
        theta=randn(n) if lopt.attention else None,
        h_tensor=torch.tanh(randn(t, lopt.tensor_units)),
        h_global=torch.tanh(randn(p, lopt.global_units)),
    )
    return layout, HRNNState(*(None if v is None else v.to(dtype) for v in state))


def affine(linear, x):
    return x @ linear.weight.T + linear.bias


def reference_gru(cell, x, h, injected=None):
    """BiasGRU from the specification, section 1 (u is the keep gate)."""
    hs = h.shape[-1]
    if injected is None:
        injected = torch.zeros(3 * hs, dtype=h.dtype)
    lin = torch.cat([x, h], -1) @ cell.weight_gates + cell.bias_gates
    r = torch.sigmoid(lin[..., :hs] + injected[..., :hs])
    u = torch.sigmoid(lin[..., hs : 2 * hs] + injected[..., hs : 2 * hs])
    c = torch.tanh(torch.cat([x, r * h], -1) @ cell.weight_candidate + cell.bias_candidate + injected[..., 2 * hs :])
    return u * h + (1 - u) * c


def reference_progress(lopt, progress, p):
    """The progress features of problem ``p``: tanh(10 (x - c)) per centre, zeros for an unknown horizon."""
    x = None if progress is None else float(progress if not torch.is_tensor(progress) or progress.dim() == 0 else progress[p])
    return torch.tensor([0.0 if x is None or math.isnan(x) else math.tanh(10.0 * (x - c)) for c in lopt.progress_centers],
                        dtype=F64)


def reference_step(lopt, state, point, grad, sizes, problems=None, lr=1.0, wd=0.0, progress=None):
    """One step of the update rule written as a per-tensor loop, straight from the specification
    (with ``hierarchy=False``: no injected biases, tensor and global states unchanged)."""
    t_count = len(sizes)
    problems = [0] * t_count if problems is None else list(problems)
    lr = [float(lr)] * t_count if not isinstance(lr, (list, tuple)) else list(lr)
    wd = [float(wd)] * t_count if not isinstance(wd, (list, tuple)) else list(wd)
    k = lopt.num_timescales
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    low, high = lopt.log_lr_bounds

    mean_eta = {}
    for p in sorted(set(problems)):
        vals = torch.cat([state.log_lr[offs[t] : offs[t + 1]] for t in range(t_count) if problems[t] == p])
        mean_eta[p] = vals.sum() / vals.numel()

    out = {key: [] for key in ("point", "h_param", "momentum", "mean_square", "beta_in", "beta_sc", "log_lr", "theta")}
    out.update(log_step_size=[], z=[])
    h_tensor_new = []
    for t in range(t_count):
        sl = slice(offs[t], offs[t + 1])
        p = problems[t]
        g = grad[sl]
        a_list, v_list = [], []
        for s in range(k):
            beta = state.beta_in[sl] ** (2.0 ** (-s))
            a = (1 - beta) * g + beta * state.momentum[sl, s]
            bsc = state.beta_sc[sl]
            v = (1 - bsc) * (a * a + MS_EPS) + bsc * state.mean_square[sl, s]
            a_list.append(a)
            v_list.append(v)
        xs = [torch.asinh(a / torch.sqrt(v + EPS)) for a, v in zip(a_list, v_list)]
        prods = [xs[s] * xs[s + 1] for s in range(k - 1)]
        logs = [torch.log(v + EPS) for v in v_list]
        mean_log = sum(logs) / k
        rels = [lg - mean_log for lg in logs]
        eta = state.log_lr[sl]
        z = torch.stack(xs + prods + rels + [eta - mean_eta[p]], dim=1)
        x = torch.stack(xs, dim=1)

        if lopt.hierarchy:
            inj = affine(lopt.tensor_to_param, state.h_tensor[t]) + affine(lopt.global_to_param, state.h_global[p])
        else:
            inj = None
        h = reference_gru(lopt.param_rnn, z, state.h_param[sl], inj)

        d = h @ lopt.w_direction + x @ lopt.shortcut_direction
        d_hat = d / torch.sqrt((d * d).mean() + EPS)
        eta_step = (eta + h @ lopt.w_log_lr + lopt.b_log_lr).clamp(low, high)
        keep = torch.sigmoid(lopt.lr_smoothing)
        theta_old = state.theta[sl] if lopt.attention else point[sl]
        theta_new = theta_old - lr[t] * torch.exp(eta_step + lopt.step_offset) * d_hat - lr[t] * wd[t] * theta_old
        if lopt.attention:
            att = h @ lopt.w_attention + x @ lopt.shortcut_attention
            a_hat = att / torch.sqrt((att * att).mean() + EPS)
            phi = theta_old - lr[t] * torch.exp(eta_step) * a_hat
        else:
            phi = theta_new
        out["point"].append(phi)
        out["h_param"].append(h)
        out["momentum"].append(torch.stack(a_list, 1))
        out["mean_square"].append(torch.stack(v_list, 1))
        out["beta_in"].append(torch.sigmoid(h @ lopt.w_beta_in + lopt.b_beta_in))
        out["beta_sc"].append(torch.sigmoid(h @ lopt.w_beta_sc + lopt.b_beta_sc))
        out["log_lr"].append(keep * eta + (1 - keep) * eta_step)
        out["theta"].append(theta_new)
        out["log_step_size"].append(eta_step + lopt.step_offset + math.log(lr[t]) if lr[t] > 0 else eta_step)
        out["z"].append(z)

        tensor_in = torch.cat([h, z], 1).mean(0)
        h_tensor_new.append(
            reference_gru(lopt.tensor_rnn, tensor_in, state.h_tensor[t], affine(lopt.global_to_tensor, state.h_global[p]))
        )
    h_global_new = []
    for p in range(len(set(problems))):
        global_in = torch.stack([h_tensor_new[t] for t in range(t_count) if problems[t] == p]).mean(0)
        if lopt.progress_input:
            global_in = torch.cat([global_in, reference_progress(lopt, progress, p).to(global_in.dtype)])
        h_global_new.append(reference_gru(lopt.global_rnn, global_in, state.h_global[p]))
    res = {key: torch.cat(vals) for key, vals in out.items()}
    res["h_tensor"] = torch.stack(h_tensor_new)
    res["h_global"] = torch.stack(h_global_new)
    if not lopt.hierarchy:
        res["h_tensor"], res["h_global"] = state.h_tensor, state.h_global
    if not lopt.attention:
        res["theta"] = None
    return res


def ref_as_state(ref):
    return HRNNState(*(ref[k] for k in HRNNState._fields))


def assert_state_close(state, ref, rtol=1e-10, atol=1e-12):
    for key in HRNNState._fields:
        got, want = getattr(state, key), ref[key]
        if want is None:
            assert got is None, key
            continue
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def grad_fn(point):
    """A gradient that depends on where it is taken (so multi-step runs feed back)."""
    return torch.sin(3.0 * point) + 0.5 * point


# ---------------------------------------------------------------------------- the cell


def test_bias_gru_matches_scalar_hand_loop():
    """BiasGRU computes r, u (keep), c and h' = u h + (1-u) c exactly as the specification, with the injected bias."""
    gen = torch.Generator().manual_seed(3)
    cell = BiasGRU(2, 3, gate_bias=2.2, generator=gen).double()
    with torch.no_grad():
        cell.bias_gates.add_(torch.randn(6, generator=gen, dtype=F64))
        cell.bias_candidate.add_(torch.randn(3, generator=gen, dtype=F64))
    x = torch.tensor([0.3, -1.2], dtype=F64)
    h = torch.tensor([0.5, -0.25, 0.9], dtype=F64)
    inj = torch.tensor([0.1, -0.2, 0.3, 0.4, -0.5, 0.6, -0.7, 0.8, -0.9], dtype=F64)
    wg, bg, wc, bc = (v.tolist() for v in (cell.weight_gates, cell.bias_gates, cell.weight_candidate, cell.bias_candidate))
    xh = x.tolist() + h.tolist()

    def sig(v):
        return 1.0 / (1.0 + math.exp(-v))

    r = [sig(sum(xh[i] * wg[i][j] for i in range(5)) + bg[j] + inj[j].item()) for j in range(3)]
    u = [sig(sum(xh[i] * wg[i][3 + j] for i in range(5)) + bg[3 + j] + inj[3 + j].item()) for j in range(3)]
    xrh = x.tolist() + [r[j] * h[j].item() for j in range(3)]
    c = [math.tanh(sum(xrh[i] * wc[i][j] for i in range(5)) + bc[j] + inj[6 + j].item()) for j in range(3)]
    want = torch.tensor([u[j] * h[j].item() + (1 - u[j]) * c[j] for j in range(3)], dtype=F64)

    torch.testing.assert_close(cell(x, h, inj), want, rtol=1e-12, atol=1e-14)
    # Without an injected bias it is the same cell with a zero bias.
    torch.testing.assert_close(cell(x, h), cell(x, h, torch.zeros(9, dtype=F64)), rtol=0, atol=0)


def test_bias_gru_keep_gate_holds_state():
    """A large keep-gate bias makes the state stay put (u is the keep gate, not the update gate)."""
    cell = BiasGRU(2, 3, gate_bias=2.2, generator=torch.Generator().manual_seed(0)).double()
    x = torch.tensor([[0.3, -1.2]], dtype=F64)
    h = torch.tensor([[0.5, -0.25, 0.9]], dtype=F64)
    inj = torch.zeros(1, 9, dtype=F64)
    inj[:, 3:6] = 50.0
    torch.testing.assert_close(cell(x, h, inj), h, rtol=0, atol=1e-12)
    inj[:, 3:6] = -50.0  # u = 0: the state becomes the candidate
    assert not torch.allclose(cell(x, h, inj), h, atol=1e-3)


# ---------------------------------------------------------------------------- the features


def test_features_match_scalar_hand_computation():
    """Each of the 12 features, the accumulators and the mean squares, element by element with math."""
    lopt = make_lopt()
    grad = torch.tensor([2.0, -0.5, 1e-3], dtype=F64)
    momentum = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.2, -0.3, 0.4, -0.5], [1e-4, 2e-4, -3e-4, 0.0]], dtype=F64)
    mean_square = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4], [1e-8, 2e-8, 3e-8, 4e-8]], dtype=F64)
    beta_in = torch.tensor([0.81, 0.5, 0.99], dtype=F64)
    beta_sc = torch.tensor([0.5, 0.9, 0.0], dtype=F64)
    rel_log_lr = torch.tensor([0.25, -1.5, 3.0], dtype=F64)

    z, x, mom, ms = lopt.features(grad, momentum, mean_square, beta_in, beta_sc, rel_log_lr)
    assert z.shape == (3, 12) and x.shape == (3, 4) and mom.shape == (3, 4) and ms.shape == (3, 4)
    for i in range(3):
        g, bi, bs = grad[i].item(), beta_in[i].item(), beta_sc[i].item()
        a = [(1 - bi ** (2.0**-s)) * g + bi ** (2.0**-s) * momentum[i, s].item() for s in range(4)]
        v = [(1 - bs) * (a[s] ** 2 + 1e-12) + bs * mean_square[i, s].item() for s in range(4)]
        xs = [math.asinh(a[s] / math.sqrt(v[s] + 1e-16)) for s in range(4)]
        logs = [math.log(v[s] + 1e-16) for s in range(4)]
        ls = [lg - sum(logs) / 4 for lg in logs]
        want = xs + [xs[0] * xs[1], xs[1] * xs[2], xs[2] * xs[3]] + ls + [rel_log_lr[i].item()]
        torch.testing.assert_close(mom[i], torch.tensor(a, dtype=F64), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ms[i], torch.tensor(v, dtype=F64), rtol=1e-12, atol=1e-20)
        torch.testing.assert_close(x[i], torch.tensor(xs, dtype=F64), rtol=1e-12, atol=1e-13)
        for j in range(12):
            assert z[i, j].item() == pytest.approx(want[j], rel=1e-10, abs=1e-12), (i, j)


def test_features_at_first_step():
    """With zero decays (first step) every accumulator is g, v = g^2 + 1e-12, x = asinh(g / sqrt(v + 1e-16)),
    and the relative log magnitudes are 0."""
    lopt = make_lopt()
    grad = torch.tensor([3.0, -2e-6, 0.0], dtype=F64)
    zeros = torch.zeros(3, 4, dtype=F64)
    z, x, mom, ms = lopt.features(grad, zeros, zeros, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64))
    torch.testing.assert_close(mom, grad[:, None].expand(3, 4), rtol=0, atol=0)
    torch.testing.assert_close(ms, (grad**2 + 1e-12)[:, None].expand(3, 4), rtol=1e-14, atol=0)
    want_x = torch.asinh(grad / torch.sqrt(grad**2 + 1e-12 + 1e-16))
    torch.testing.assert_close(x, want_x[:, None].expand(3, 4), rtol=1e-12, atol=0)
    # a gradient far above sqrt(1e-12) is rescaled to asinh(+-1); a zero gradient gives 0
    assert x[0, 0].item() == pytest.approx(math.asinh(1.0), rel=1e-9)
    assert x[1, 0].item() == pytest.approx(math.asinh(-2e-6 / math.sqrt(4e-12 + 1e-12 + 1e-16)), rel=1e-9)
    assert x[2, 0].item() == 0.0
    torch.testing.assert_close(z[:, 7:11], torch.zeros(3, 4, dtype=F64), rtol=0, atol=1e-12)


def test_timescale_rule_doubles_each_timescale():
    """beta_s = beta_in ** 2**-s: from zero accumulators and a unit gradient, a_s = 1 - beta_in ** 2**-s,
    so each timescale -1/log(beta_s) is twice the one before."""
    lopt = make_lopt()
    beta_in = torch.tensor([0.9, 0.5, 0.999], dtype=F64)
    zeros = torch.zeros(3, 4, dtype=F64)
    _, _, mom, _ = lopt.features(torch.ones(3, dtype=F64), zeros, zeros + 1.0, beta_in, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64))
    for i, b in enumerate(beta_in.tolist()):
        betas = [b, b**0.5, b**0.25, b**0.125]
        torch.testing.assert_close(mom[i], torch.tensor([1 - v for v in betas], dtype=F64), rtol=1e-12, atol=0)
        timescales = [-1.0 / math.log(1 - mom[i, s].item()) for s in range(4)]
        for s in range(3):
            assert timescales[s + 1] == pytest.approx(2 * timescales[s], rel=1e-6)


def test_init_state_shapes_and_ranges():
    """A fresh state: broadcast learned initial hidden states, zero accumulators and decays, a copy of theta,
    and initial log lr = per-element + per-tensor offsets, each in [ln(1e-6)/2, ln(1e-2)/2]."""
    lopt = HierarchicalRNN()
    layout = Layout.build([3, 5, 2], problems=[0, 1, 1])
    theta = torch.randn(10)
    st = lopt.init_state(layout, theta=theta, generator=torch.Generator().manual_seed(0))
    assert st.h_param.shape == (10, 10) and torch.equal(st.h_param, lopt.h0_param.detach().expand(10, -1))
    assert st.h_tensor.shape == (3, 30) and torch.equal(st.h_tensor[2], lopt.h0_tensor.detach())
    assert st.h_global.shape == (2, 20) and torch.equal(st.h_global[1], lopt.h0_global.detach())
    for key in ("momentum", "mean_square", "beta_in", "beta_sc"):
        assert not getattr(st, key).any(), key
    assert torch.equal(st.theta, theta)
    theta.add_(1.0)
    assert not torch.equal(st.theta, theta), "init_state must copy theta, not alias it"
    low, high = math.log(1e-6), math.log(1e-2)
    assert st.log_lr.min() >= low and st.log_lr.max() <= high
    assert st.log_lr.std() > 0.1
    with pytest.raises(ValueError, match="theta"):
        lopt.init_state(layout)


def test_invalid_layouts_and_bounds_raise():
    """Empty layouts, empty tensors, gaps in problem indices and inverted log-lr bounds are refused."""
    with pytest.raises(ValueError):
        Layout.build([])
    with pytest.raises(ValueError):
        Layout.build([3, 0])
    with pytest.raises(ValueError, match="gaps"):
        Layout.build([3, 2], problems=[0, 2])
    with pytest.raises(ValueError):
        Layout.build([3, 2], problems=[0])
    with pytest.raises(ValueError, match="log_lr_bounds"):
        HierarchicalRNN(log_lr_bounds=(1.0, -1.0))
    layout = Layout.build([3, 2, 4], problems=[1, 0, 1])
    assert layout.numel == 9 and layout.num_tensors == 3 and layout.num_problems == 2
    assert layout.problem_elements.tolist() == [2.0, 7.0] and layout.problem_tensors.tolist() == [1.0, 2.0]
    assert layout.tensor_ids.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


# ---------------------------------------------------------------------------- one full step


def test_step_matches_hand_reference_two_tensors():
    """Tensors of 3 and 2 elements, a state set by hand: every output and state field, and the diagnostics,
    equal the specification's formulas (shortcut direction, RMS normalisation, eta_step, smoothing,
    theta_new with decoupled decay, attention point, next decays, tensor and global RNN inputs)."""
    lopt = make_lopt()
    sizes = [3, 2]
    layout, state = make_state(lopt, sizes)
    # overwrite part of the state with hand-picked values
    state = state._replace(
        beta_in=torch.tensor([0.9, 0.5, 0.0, 0.99, 0.7], dtype=F64),
        beta_sc=torch.tensor([0.95, 0.0, 0.5, 0.8, 0.3], dtype=F64),
        log_lr=torch.tensor([-4.0, -6.0, -5.0, -3.0, -8.0], dtype=F64),
        theta=torch.tensor([1.0, -2.0, 0.5, 3.0, -0.25], dtype=F64),
    )
    point = torch.tensor([1.1, -2.1, 0.4, 3.2, -0.2], dtype=F64)
    grad = torch.tensor([0.7, -1.3, 2e-3, -0.4, 5.0], dtype=F64)
    out = lopt.step(state, point, grad, layout, lr=0.7, weight_decay=0.1, diagnostics=True)
    ref = reference_step(lopt, state, point, grad, sizes, lr=0.7, wd=0.1)
    assert_state_close(out.state, ref)
    torch.testing.assert_close(out.point, ref["point"], rtol=1e-10, atol=1e-12)
    diag = out.diagnostics
    torch.testing.assert_close(diag.theta, ref["theta"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag.update, ref["theta"] - state.theta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag.attention_offset, ref["point"] - ref["theta"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag.log_step_size, ref["log_step_size"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag.beta_in, ref["beta_in"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag.beta_sc, ref["beta_sc"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag.h_tensor, ref["h_tensor"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag.h_global, ref["h_global"], rtol=1e-10, atol=1e-12)
    # the hand-made state makes every term of the update visible
    assert (diag.attention_offset.abs() > 1e-6).all()
    assert (diag.update.abs() > 1e-6).all()


def test_relative_log_lr_is_element_weighted_problem_mean():
    """The 12th feature is eta minus the element-weighted mean of eta over the problem: shifting all eta of a
    problem by a constant changes no hidden state, shifts the new eta by it and scales the step by exp of it."""
    lopt = make_lopt(attention=False)
    sizes = [4, 1]
    layout, state = make_state(lopt, sizes)
    point = torch.randn(5, dtype=F64, generator=torch.Generator().manual_seed(5))
    grad = grad_fn(point)
    a = lopt.step(state, point, grad, layout, diagnostics=True)
    b = lopt.step(state._replace(log_lr=state.log_lr + 2.0), point, grad, layout, diagnostics=True)
    torch.testing.assert_close(a.state.h_param, b.state.h_param, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.state.h_tensor, b.state.h_tensor, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.state.log_lr, a.state.log_lr + 2.0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.diagnostics.update, a.diagnostics.update * math.exp(2.0), rtol=1e-10, atol=1e-14)
    # The mean is over elements, not tensors: with sizes 4 and 1 the two differ, and the reference uses elements.
    ref = reference_step(lopt, state, point, grad, sizes)
    torch.testing.assert_close(a.state.h_param, ref["h_param"], rtol=1e-10, atol=1e-12)
    eta = state.log_lr
    torch.testing.assert_close(ref["z"][:, 11], eta - eta.mean(), rtol=0, atol=1e-12)
    tensor_weighted = (eta[:4].mean() + eta[4]) / 2
    assert abs(tensor_weighted - eta.mean()) > 0.1


def test_log_lr_smoothing():
    """eta_new = sigmoid(rho) eta + (1 - sigmoid(rho)) eta_step with eta_step = eta + h w_eta + b_eta: with
    w_eta = 0 and b_eta = beta, eta moves by exactly (1 - sigmoid(rho)) beta."""
    lopt = make_lopt()
    with torch.no_grad():
        lopt.w_log_lr.zero_()
        lopt.b_log_lr.fill_(1.5)
        lopt.lr_smoothing.fill_(0.7)
    layout, state = make_state(lopt, [3, 2])
    point = torch.zeros(5, dtype=F64)
    out = lopt.step(state, point, grad_fn(state.theta), layout, diagnostics=True)
    keep = 1 / (1 + math.exp(-0.7))
    torch.testing.assert_close(out.state.log_lr, state.log_lr + (1 - keep) * 1.5, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        out.diagnostics.log_step_size, state.log_lr + 1.5 + lopt.step_offset.detach(), rtol=1e-12, atol=1e-12
    )


def test_log_lr_clip_is_straight_through():
    """eta_step is clamped to log_lr_bounds in the forward pass (step and smoothing use the clamped value),
    but the gradient passes through the clip as if it were the identity."""
    lopt = make_lopt(log_lr_bounds=(-6.0, -4.0))
    layout, state = make_state(lopt, [3, 2])
    state = state._replace(log_lr=torch.tensor([-20.0, 10.0, -30.0, 5.0, -9.0], dtype=F64))
    grad = grad_fn(state.theta)
    out = lopt.step(state, state.theta, grad, layout, lr=0.5, diagnostics=True)
    ref = reference_step(lopt, state, state.theta, grad, [3, 2], lr=0.5)
    c = lopt.step_offset.detach()
    eta_step = out.diagnostics.log_step_size - c - math.log(0.5)
    assert set(torch.round(eta_step.detach(), decimals=9).tolist()) == {-6.0, -4.0}
    torch.testing.assert_close(out.state.theta, ref["theta"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.state.log_lr, ref["log_lr"], rtol=1e-10, atol=1e-12)

    # d theta_new / d b_eta = -lr exp(eta_step + c) d_hat, d phi / d b_eta = -lr exp(eta_step) a_hat,
    # d eta_new / d b_eta = 1 - sigmoid(rho): all non-zero although every element is clipped.
    update = (out.state.theta - state.theta).detach()
    offset = (out.point - state.theta).detach()
    (g_theta,) = torch.autograd.grad(out.state.theta.sum(), lopt.b_log_lr, retain_graph=True)
    (g_point,) = torch.autograd.grad(out.point.sum(), lopt.b_log_lr, retain_graph=True)
    (g_eta,) = torch.autograd.grad(out.state.log_lr.sum(), lopt.b_log_lr)
    torch.testing.assert_close(g_theta, update.sum(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_point, offset.sum(), rtol=1e-10, atol=1e-14)
    keep = torch.sigmoid(lopt.lr_smoothing.detach())
    torch.testing.assert_close(g_eta, 5 * (1 - keep), rtol=1e-12, atol=0)
    assert g_theta.abs() > 1e-8 and g_point.abs() > 1e-8


def test_log_lr_clip_is_exact_far_out_of_bounds():
    """In float32, an eta_step far outside the bounds (a run-away or collapsed learning rate, which is what the
    bounds are for) is clamped exactly to the bound in the forward pass."""
    lopt = make_lopt(dtype=torch.float32)
    layout, state = make_state(lopt, [3, 2], dtype=torch.float32)
    state = state._replace(log_lr=torch.tensor([1e9, -1e9, 1e10, -1e10, 3e8]))
    out = lopt.step(state, state.theta, torch.ones(5), layout, diagnostics=True)
    eta_step = out.diagnostics.log_step_size - lopt.step_offset.detach()
    torch.testing.assert_close(eta_step, torch.tensor([33.0, -33.0, 33.0, -33.0, 33.0]), rtol=0, atol=1e-5)


def test_directions_have_unit_rms_per_tensor():
    """theta_new = theta - lr exp(eta_step + c) d_hat and phi = theta - lr exp(eta_step) a_hat, where d_hat and
    a_hat have unit RMS over each tensor; the weight decay term is -lr wd theta_old."""
    lopt = make_lopt()
    sizes = [6, 1, 3]
    layout, state = make_state(lopt, sizes)
    lr, wd = torch.tensor([0.5, 2.0, 1.0], dtype=F64), torch.tensor([0.1, 0.0, 0.3], dtype=F64)
    out = lopt.step(state, state.theta + 0.01, grad_fn(state.theta), layout, lr=lr, weight_decay=wd, diagnostics=True)
    lr_e, wd_e = lr.repeat_interleave(torch.tensor(sizes)), wd.repeat_interleave(torch.tensor(sizes))
    step = out.diagnostics.log_step_size.exp()
    d_hat = -(out.state.theta - state.theta + lr_e * wd_e * state.theta).detach() / step
    eta_step = out.diagnostics.log_step_size - lopt.step_offset.detach() - lr_e.log()
    a_hat = -(out.point - state.theta).detach() / (lr_e * eta_step.exp())
    for part_d, part_a in zip(d_hat.split(sizes), a_hat.split(sizes)):
        assert part_d.square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-9)
        assert part_a.square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-9)
    assert not torch.allclose(d_hat, a_hat, atol=1e-3)


# ---------------------------------------------------------------------------- vectorised vs per-tensor loop


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("steps", [1, 3])
def test_vectorised_step_equals_per_tensor_loop(attention, steps):
    """The vectorised step over several tensors and problems equals the per-tensor reference loop, step after
    step, with per-tensor lr and weight decay."""
    lopt = make_lopt(attention=attention)
    sizes, problems = [3, 1, 4, 2, 5], [0, 1, 0, 2, 1]  # problems need not be contiguous
    layout, state = make_state(lopt, sizes, problems)
    gen = torch.Generator().manual_seed(7)
    point = state.theta + 0.01 if attention else torch.randn(15, generator=gen, dtype=F64)
    lr_list, wd_list = [1.0, 0.5, 2.0, 1.0, 0.25], [0.0, 0.1, 0.0, 0.2, 0.05]
    lr, wd = torch.tensor(lr_list, dtype=F64), torch.tensor(wd_list, dtype=F64)
    ref_state, ref_point = state, point
    for _ in range(steps):
        out = lopt.step(state, point, grad_fn(point), layout, lr=lr, weight_decay=wd)
        ref = reference_step(lopt, ref_state, ref_point, grad_fn(ref_point), sizes, problems, lr=lr_list, wd=wd_list)
        assert_state_close(out.state, ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out.point, ref["point"], rtol=1e-9, atol=1e-11)
        state, point = out.state, out.point
        ref_state, ref_point = ref_as_state(ref), ref["point"]


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("mode", ["no_grad", "chunked", "chunked_in_place"])
def test_step_paths_without_autograd_equal_reference(attention, mode):
    """Without autograd the step may run over fixed-size chunks (here 4 elements, so chunks cut through tensors)
    and write into given buffers (the state itself and the point): every path equals the per-tensor reference,
    step after step."""
    lopt = make_lopt(attention=attention)
    sizes, problems = [3, 1, 6, 2, 5], [0, 1, 0, 2, 1]
    layout, state = make_state(lopt, sizes, problems, seed=12)
    point = state.theta + 0.01 if attention else torch.linspace(-1.0, 1.0, 17, dtype=F64)
    lr_list, wd_list = [1.0, 0.5, 2.0, 1.0, 0.25], [0.0, 0.1, 0.0, 0.2, 0.05]
    lr, wd = torch.tensor(lr_list, dtype=F64), torch.tensor(wd_list, dtype=F64)
    kwargs = {"chunk_size": 4} if mode != "no_grad" else {}
    for _ in range(3):
        ref = reference_step(lopt, state, point, grad_fn(point), sizes, problems, lr=lr_list, wd=wd_list)
        with torch.no_grad():
            if mode == "chunked_in_place":
                state = HRNNState(*(None if v is None else v.clone() for v in state))
                point = point.clone()
                out = lopt.step(state, point, grad_fn(point), layout, lr=lr, weight_decay=wd, out=state, out_point=point, **kwargs)
            else:
                out = lopt.step(state, point, grad_fn(point), layout, lr=lr, weight_decay=wd, **kwargs)
        assert_state_close(out.state, ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out.point, ref["point"], rtol=1e-9, atol=1e-11)
        if mode == "chunked_in_place":
            assert out.point is point or torch.equal(out.point, point)
        state, point = out.state, out.point


@pytest.mark.parametrize("attention", [True, False])
def test_compiled_kernel_path_equals_reference(monkeypatch, attention):
    """The element-level kernel that backend="compiled" hands to torch.compile (run here eagerly, torch.compile
    replaced by a pass-through so the test stays fast) computes the same step as the reference."""
    from lightning_lopt.kernels import dispatch

    calls = []

    def fake_compile(fn, **kwargs):
        def run(*args):
            calls.append(1)
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(dispatch, "_KERNELS", {})
    lopt = make_lopt(attention=attention)
    sizes, problems = [3, 1, 6, 2, 5], [0, 1, 0, 2, 1]
    layout, state = make_state(lopt, sizes, problems, seed=13)
    point = state.theta + 0.01 if attention else torch.linspace(-1.0, 1.0, 17, dtype=F64)
    for _ in range(2):
        ref = reference_step(lopt, state, point, grad_fn(point), sizes, problems, lr=0.7, wd=0.1)
        with torch.no_grad():
            out = lopt.step(state, point, grad_fn(point), layout, lr=0.7, weight_decay=0.1, chunk_size=4, backend="compiled")
        assert_state_close(out.state, ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out.point, ref["point"], rtol=1e-9, atol=1e-11)
        state, point = out.state, out.point
    assert calls, "the kernel meant for torch.compile never ran"


def test_vectorised_step_float32_matches_reference():
    """The default float32 step agrees with the float64 reference to float32 tolerance."""
    lopt64 = make_lopt()
    lopt32 = make_lopt(dtype=torch.float32)
    sizes = [7, 3]
    layout, state = make_state(lopt64, sizes)
    grad = grad_fn(state.theta)
    ref = reference_step(lopt64, state, state.theta, grad, sizes, lr=0.9)
    state32 = HRNNState(*(v.float() for v in state))
    out = lopt32.step(state32, state.theta.float(), grad.float(), layout, lr=0.9)
    for key in HRNNState._fields:
        torch.testing.assert_close(getattr(out.state, key), ref[key].float(), rtol=2e-4, atol=2e-5, msg=key)
    torch.testing.assert_close(out.point, ref["point"].float(), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("attention", [True, False])
def test_problems_in_one_vector_are_independent(attention):
    """Several problems in one flat vector step exactly as each problem stepped on its own."""
    lopt = make_lopt(attention=attention)
    sizes, problems = [3, 2, 4, 1, 2], [0, 0, 1, 1, 1]
    layout, state = make_state(lopt, sizes, problems)
    gen = torch.Generator().manual_seed(11)
    point = torch.randn(12, generator=gen, dtype=F64)
    splits = [(0, 5, [0, 1], [3, 2]), (5, 12, [2, 3, 4], [4, 1, 2])]
    alone = []
    for p, (lo, hi, tensors, sub_sizes) in enumerate(splits):
        sub = HRNNState(
            h_param=state.h_param[lo:hi],
            momentum=state.momentum[lo:hi],
            mean_square=state.mean_square[lo:hi],
            beta_in=state.beta_in[lo:hi],
            beta_sc=state.beta_sc[lo:hi],
            log_lr=state.log_lr[lo:hi],
            theta=state.theta[lo:hi] if attention else None,
            h_tensor=state.h_tensor[tensors],
            h_global=state.h_global[p : p + 1],
        )
        alone.append([Layout.build(sub_sizes), sub, point[lo:hi]])
    for _ in range(3):
        out = lopt.step(state, point, grad_fn(point), layout, lr=0.8, weight_decay=0.05)
        state, point = out.state, out.point
        for item in alone:
            sub_layout, sub_state, sub_point = item
            sub_out = lopt.step(sub_state, sub_point, grad_fn(sub_point), sub_layout, lr=0.8, weight_decay=0.05)
            item[1], item[2] = sub_out.state, sub_out.point
    for p, (lo, hi, tensors, _) in enumerate(splits):
        _, sub_state, sub_point = alone[p]
        torch.testing.assert_close(point[lo:hi], sub_point, rtol=1e-12, atol=1e-14)
        for key in ("h_param", "momentum", "mean_square", "beta_in", "beta_sc", "log_lr"):
            torch.testing.assert_close(getattr(state, key)[lo:hi], getattr(sub_state, key), rtol=1e-12, atol=1e-14)
        if attention:
            torch.testing.assert_close(state.theta[lo:hi], sub_state.theta, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.h_tensor[tensors], sub_state.h_tensor, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.h_global[p : p + 1], sub_state.h_global, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------- differentiability


def _unrolled_objective(lopt, weights, steps=2):
    layout, state = make_state(lopt, [3, 2], [0, 0], seed=4)
    # start from the learned initial hidden states so that they take part too
    state = state._replace(
        h_param=lopt.h0_param.expand(5, -1), h_tensor=lopt.h0_tensor.expand(2, -1), h_global=lopt.h0_global.expand(1, -1)
    )
    point = state.theta + 0.02
    total = 0.0
    for _ in range(steps):
        out = lopt.step(state, point, grad_fn(point), layout, lr=0.9, weight_decay=0.05)
        state, point = out.state, out.point
        total = total + (weights["point"] * point).sum()
        for key in HRNNState._fields:
            total = total + (weights[key] * getattr(state, key)).sum()
    return total


def test_step_is_differentiable_wrt_meta_parameters():
    """Backpropagation through two steps gives every meta-parameter the gradient that central finite
    differences give (float64), and none of them a zero or non-finite one."""
    lopt = make_lopt(param_units=3, tensor_units=4, global_units=2, num_timescales=3)
    layout, state = make_state(lopt, [3, 2], [0, 0], seed=4)
    gen = torch.Generator().manual_seed(9)
    weights = {key: torch.randn(getattr(state, key).shape, generator=gen, dtype=F64) for key in HRNNState._fields}
    weights["point"] = torch.randn(5, generator=gen, dtype=F64)
    objective = _unrolled_objective(lopt, weights)
    params = dict(lopt.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(objective, list(params.values()), allow_unused=True)))
    eps = 1e-6
    for name, param in params.items():
        g = grads[name]
        assert g is not None, f"{name} does not influence the step"
        assert torch.isfinite(g).all(), name
        direction = torch.randn(param.shape, generator=gen, dtype=F64)
        with torch.no_grad():
            param.add_(eps * direction)
            plus = _unrolled_objective(lopt, weights).item()
            param.sub_(2 * eps * direction)
            minus = _unrolled_objective(lopt, weights).item()
            param.add_(eps * direction)
        numeric = (plus - minus) / (2 * eps)
        analytic = (g * direction).sum().item()
        assert abs(analytic) > 1e-9, f"{name} has a zero gradient"
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8), name


def test_step_gradcheck_wrt_gradient_and_state():
    """gradcheck (float64) of one step w.r.t. the gradient, the momenta and the log learning rates."""
    lopt = make_lopt(param_units=2, tensor_units=3, global_units=2, num_timescales=2)
    layout, state = make_state(lopt, [2, 1], seed=6)

    def fn(grad, momentum, log_lr):
        out = lopt.step(state._replace(momentum=momentum, log_lr=log_lr), state.theta, grad, layout, lr=0.7)
        return out.point, out.state.theta, out.state.h_tensor, out.state.h_global, out.state.log_lr

    inputs = (
        torch.tensor([0.3, -1.1, 0.6], dtype=F64, requires_grad=True),
        state.momentum.clone().requires_grad_(True),
        state.log_lr.clone().requires_grad_(True),
    )
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_step_runs_under_no_grad():
    """Under torch.no_grad the step gives the same results and builds no graph."""
    lopt = make_lopt()
    layout, state = make_state(lopt, [3, 2])
    grad = grad_fn(state.theta)
    with_grad = lopt.step(state, state.theta, grad, layout)
    assert with_grad.point.requires_grad
    with torch.no_grad():
        out = lopt.step(state, state.theta, grad, layout)
    assert not out.point.requires_grad
    for key in HRNNState._fields:
        assert not getattr(out.state, key).requires_grad, key
        torch.testing.assert_close(getattr(out.state, key), getattr(with_grad.state, key).detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.point, with_grad.point.detach(), rtol=1e-12, atol=1e-14)


def test_state_detach_cuts_graph():
    """HRNNState.detach keeps the values and drops the graph (truncated backpropagation)."""
    lopt = make_lopt(attention=False)
    layout, state = make_state(lopt, [3, 2])
    out = lopt.step(state, torch.zeros(5, dtype=F64), grad_fn(torch.zeros(5, dtype=F64)), layout)
    detached = out.state.detach()
    assert detached.theta is None
    for key in ("h_param", "log_lr", "h_tensor", "h_global"):
        assert getattr(out.state, key).requires_grad and not getattr(detached, key).requires_grad
        assert torch.equal(getattr(out.state, key), getattr(detached, key))


# ---------------------------------------------------------------------------- save / load


def test_save_pretrained_round_trip(tmp_path):
    """save_pretrained writes safetensors plus a JSON card with the config; from_pretrained restores weights that
    give bit-identical steps."""
    lopt = make_lopt(dtype=torch.float32, param_units=6, attention=False, log_lr_bounds=(-20.0, 2.0))
    path = lopt.save_pretrained(tmp_path / "mine", card={"steps": 123})
    assert path == tmp_path / "mine.safetensors" and path.exists()
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["config"] == lopt.config
    assert card["config"]["param_units"] == 6 and card["config"]["attention"] is False
    assert card["steps"] == 123
    loaded = HierarchicalRNN.from_pretrained(path)
    assert loaded.config == lopt.config and loaded.log_lr_bounds == (-20.0, 2.0)
    for (name, a), (_, b) in zip(lopt.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    layout, state = make_state(lopt, [3, 2], dtype=torch.float32)
    point = torch.linspace(-1, 1, 5)
    a = lopt.step(state, point, grad_fn(point), layout)
    b = loaded.step(state, point, grad_fn(point), layout)
    assert torch.equal(a.point, b.point)
    for key in ("h_param", "h_tensor", "h_global", "log_lr"):
        assert torch.equal(getattr(a.state, key), getattr(b.state, key)), key
    # loading by a string path works too, and overrides that agree are accepted
    assert HierarchicalRNN.from_pretrained(str(path), param_units=6).config == lopt.config


def test_from_pretrained_rejects_mismatched_architecture(tmp_path):
    """Asking for another architecture than the file's raises an error naming the argument."""
    path = HierarchicalRNN().save_pretrained(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="param_units"):
        HierarchicalRNN.from_pretrained(path, param_units=8)
    with pytest.raises(ValueError, match="attention"):
        HierarchicalRNN.from_pretrained(path, attention=False)
    with pytest.raises(ValueError, match="no_such_argument"):
        HierarchicalRNN.from_pretrained(path, no_such_argument=1)
    with pytest.raises(ValueError, match=r"param_rnn\.weight_gates"):
        HierarchicalRNN(param_units=8).load_weights(HierarchicalRNN().state_dict())


def _write_hrnn_file(path, tensors, config):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "lightning_lopt.hrnn", "config": json.dumps(config)})


def test_from_pretrained_names_missing_or_reshaped_tensor(tmp_path):
    """A weights file with a tensor removed, reshaped or extra raises an error naming that tensor."""
    lopt = HierarchicalRNN()
    tensors = {k: v.contiguous() for k, v in lopt.state_dict().items()}

    missing = dict(tensors)
    del missing["w_direction"]
    _write_hrnn_file(tmp_path / "missing.safetensors", missing, lopt.config)
    with pytest.raises(ValueError, match=r"missing.*w_direction"):
        HierarchicalRNN.from_pretrained(tmp_path / "missing.safetensors")

    reshaped = dict(tensors, **{"tensor_rnn.weight_gates": tensors["tensor_rnn.weight_gates"][:-1].contiguous()})
    _write_hrnn_file(tmp_path / "reshaped.safetensors", reshaped, lopt.config)
    with pytest.raises(ValueError, match=r"tensor_rnn\.weight_gates"):
        HierarchicalRNN.from_pretrained(tmp_path / "reshaped.safetensors")

    extra = dict(tensors, bogus=torch.zeros(2))
    _write_hrnn_file(tmp_path / "extra.safetensors", extra, lopt.config)
    with pytest.raises(ValueError, match="bogus"):
        HierarchicalRNN.from_pretrained(tmp_path / "extra.safetensors")

    # a config that disagrees with the tensors (card says 8 parameter units, tensors have 10)
    _write_hrnn_file(tmp_path / "config.safetensors", tensors, dict(lopt.config, param_units=8))
    with pytest.raises(ValueError, match="param_rnn"):
        HierarchicalRNN.from_pretrained(tmp_path / "config.safetensors")


def test_from_pretrained_rejects_foreign_files(tmp_path):
    """A safetensors file that lightning_lopt did not write, or a corrupt one, is refused with a clear error."""
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a lightning_lopt"):
        HierarchicalRNN.from_pretrained(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        HierarchicalRNN.from_pretrained(tmp_path / "junk.safetensors")


def test_from_pretrained_unknown_name_lists_available():
    """An unknown shipped name raises FileNotFoundError that names the available weights."""
    with pytest.raises(FileNotFoundError, match="available") as info:
        HierarchicalRNN.from_pretrained("no_such_name")
    assert "no_such_name" in str(info.value)
    with pytest.raises(FileNotFoundError):
        HierarchicalRNN.from_pretrained("/nonexistent/dir/w.safetensors")


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_step_follows_in_place_changes_of_the_weights(backend):
    """Without autograd the packed meta-parameters are reused between steps; an in-place change of a
    weight (a meta-optimizer step, load_state_dict) must still take effect on the next step."""
    import copy

    lopt = HierarchicalRNN()
    layout = Layout.build([30, 7])
    point = torch.randn(layout.numel, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(layout.numel, generator=torch.Generator().manual_seed(1))
    state = lopt.init_state(layout, theta=point, generator=torch.Generator().manual_seed(2))

    def run(module):
        with torch.no_grad():
            return module.step(state, point, grad, layout, backend=backend).point

    before = run(lopt)
    with torch.no_grad():
        lopt.w_direction.add_(0.5)
        lopt.param_rnn.weight_gates.mul_(1.5)
    after = run(lopt)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, run(copy.deepcopy(lopt)), rtol=0, atol=0)
    lopt.load_state_dict(HierarchicalRNN().state_dict())
    torch.testing.assert_close(run(lopt), before, rtol=0, atol=0)


# ---------------------------------------------------------------------------- architecture switches


SWITCHES = [
    dict(hierarchy=False),
    dict(hierarchy=False, num_timescales=1, attention=False),
    dict(num_timescales=1),
    dict(progress_input=True),
    dict(progress_input=True, attention=False, progress_centers=(0.1, 0.5, 0.9)),
]


@pytest.mark.parametrize("config", SWITCHES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("mode", ["autograd", "chunked"])
def test_switches_step_matches_reference(config, mode):
    """The ablation (no tensor/global RNN), one timescale and the training-progress input: each step, on the
    autograd path and the chunked one, equals the per-tensor reference, with progress per problem (one
    horizon unknown, NaN), shared, or unknown."""
    lopt = make_lopt(**config)
    sizes, problems = [3, 1, 6, 2, 5], [0, 1, 0, 2, 1]
    layout, state = make_state(lopt, sizes, problems, seed=5)
    point = state.theta + 0.01 if lopt.attention else torch.linspace(-1.0, 1.0, 17, dtype=F64)
    for progress in (torch.tensor([0.05, float("nan"), 0.7], dtype=F64), 0.4, None):
        ref = reference_step(lopt, state, point, grad_fn(point), sizes, problems, lr=0.5, progress=progress)
        if mode == "autograd":
            out = lopt.step(state, point, grad_fn(point), layout, lr=0.5, progress=progress)
        else:
            with torch.no_grad():
                out = lopt.step(state, point, grad_fn(point), layout, lr=0.5, chunk_size=4, progress=progress)
        assert_state_close(out.state, ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out.point, ref["point"], rtol=1e-9, atol=1e-11)
        state, point = out.state, out.point


def test_hierarchy_off_ignores_tensor_and_global_parts():
    """With hierarchy=False the tensor and global states and weights have no effect and never change; the
    parameter RNN sees zero injected biases."""
    lopt = make_lopt(hierarchy=False)
    layout, state = make_state(lopt, [4, 3], [0, 1])
    point = state.theta + 0.01
    out = lopt.step(state, point, grad_fn(point), layout)
    assert torch.equal(out.state.h_tensor, state.h_tensor) and torch.equal(out.state.h_global, state.h_global)
    with torch.no_grad():
        for module in (lopt.tensor_rnn, lopt.global_rnn, lopt.tensor_to_param, lopt.global_to_param, lopt.global_to_tensor):
            for p in module.parameters():
                p.add_(1.0)
    other = lopt.step(state._replace(h_tensor=-state.h_tensor, h_global=state.h_global + 1), point, grad_fn(point), layout)
    assert torch.equal(other.point, out.point) and torch.equal(other.state.h_param, out.state.h_param)
    # The same step as the full architecture with zero tensor and global read-ins.
    full = make_lopt()
    with torch.no_grad():
        for module in (full.tensor_to_param, full.global_to_param):
            for p in module.parameters():
                p.zero_()
    ref = full.step(state, point, grad_fn(point), layout)
    torch.testing.assert_close(out.point, ref.point, rtol=0, atol=0)
    torch.testing.assert_close(out.state.h_param, ref.state.h_param, rtol=0, atol=0)


def test_progress_features_and_their_effect():
    """Progress enters as tanh(10 (x - c)); with random global-RNN weights, progress 0.05 and 0.95 give different
    global states, hence different updates at the next step; without progress_input it is ignored."""
    lopt = make_lopt(progress_input=True)
    feats = lopt.progress_features(torch.tensor([0.05, float("nan")], dtype=F64), 2, torch.zeros(1, dtype=F64))
    expected = torch.tensor([math.tanh(10 * (0.05 - c)) for c in lopt.progress_centers], dtype=F64)
    torch.testing.assert_close(feats[0], expected, rtol=0, atol=1e-15)
    assert torch.equal(feats[1], torch.zeros_like(feats[1]))
    assert torch.equal(lopt.progress_features(None, 3, feats), torch.zeros(3, len(lopt.progress_centers), dtype=F64))
    assert lopt.global_rnn.input_size == lopt.tensor_units + len(lopt.progress_centers)

    layout, state = make_state(lopt, [4, 3])
    point = state.theta + 0.01

    def two_steps(module, progress):
        with torch.no_grad():
            first = module.step(state, point, grad_fn(point), layout, progress=progress)
            second = module.step(first.state, first.point, grad_fn(first.point), layout, progress=progress)
        return first, second

    early, late = two_steps(lopt, 0.05), two_steps(lopt, 0.95)
    assert torch.equal(early[0].point, late[0].point)  # the global RNN runs after this step's update
    assert not torch.allclose(early[0].state.h_global, late[0].state.h_global)
    assert not torch.allclose(early[1].point, late[1].point)

    plain = make_lopt()
    layout, state = make_state(plain, [4, 3])
    point = state.theta + 0.01
    a = plain.step(state, point, grad_fn(point), layout, progress=0.3)
    b = plain.step(state, point, grad_fn(point), layout)
    assert torch.equal(a.point, b.point) and torch.equal(a.state.h_global, b.state.h_global)


def test_switches_are_validated_and_default_is_the_paper_architecture():
    """The default is the paper's architecture without a progress input; progress needs the global RNN."""
    lopt = HierarchicalRNN()
    assert lopt.config["hierarchy"] is True and lopt.config["progress_input"] is False
    assert lopt.global_rnn.input_size == lopt.tensor_units
    shipped = HierarchicalRNN.from_pretrained("default")
    assert shipped.hierarchy and not shipped.progress_input
    with pytest.raises(ValueError, match="hierarchy"):
        HierarchicalRNN(hierarchy=False, progress_input=True)
    with pytest.raises(ValueError, match="progress_centers"):
        HierarchicalRNN(progress_input=True, progress_centers=())


@pytest.mark.parametrize("config", [dict(hierarchy=False, num_timescales=1), dict(progress_input=True)])
def test_switches_round_trip_through_save_pretrained(tmp_path, config):
    """The switches are part of the config: a saved file rebuilds the same architecture and steps identically."""
    lopt = make_lopt(dtype=torch.float32, **config)
    path = lopt.save_pretrained(tmp_path / "w")
    loaded = HierarchicalRNN.from_pretrained(path)
    assert loaded.config == lopt.config
    assert {k: loaded.config[k] for k in config} == config
    with pytest.raises(ValueError, match=next(iter(config))):
        HierarchicalRNN.from_pretrained(path, **{k: not v if isinstance(v, bool) else v + 1 for k, v in config.items()})
    layout, state = make_state(lopt, [3, 2], dtype=torch.float32)
    point = state.theta + 0.01
    a = lopt.step(state, point, grad_fn(point), layout, progress=0.2)
    b = loaded.step(state, point, grad_fn(point), layout, progress=0.2)
    assert torch.equal(a.point, b.point) and torch.equal(a.state.h_global, b.state.h_global)
