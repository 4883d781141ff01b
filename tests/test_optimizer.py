"""HierarchicalRNNOptimizer as a plain torch optimizer, outside a Lightning Trainer."""

import io
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer
from lightning_lopt.hrnn import HRNNState, Layout

pytestmark = pytest.mark.usefixtures("single_thread")

STATE_FIELDS = HRNNState._fields
UNTRAINED = "ignore:.*not meta-trained:UserWarning"


@pytest.fixture(scope="module")
def lopt():
    return HierarchicalRNN()


@pytest.fixture(scope="module")
def lopt_noatt():
    return HierarchicalRNN(attention=False)


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def mlp_loss(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=gen)
    y = torch.randn(8, 2, generator=gen)
    return nn.functional.mse_loss(model(x), y)


def train(model, opt, steps, loss_fn=mlp_loss):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()


def least_squares(params, scale=1.0):
    """0.5 * mean((X w + b - y)^2) * scale with y far from the model and each column of X of one sign, so every
    gradient entry stays O(1) (between about 3 and 30 in magnitude, of either sign) for tens of small steps."""
    w, b = params
    gen = torch.Generator().manual_seed(123)
    col_scale = torch.tensor([0.3, -1.0, 3.0, -0.5, 1.5])
    x = (1.0 + 0.5 * torch.rand(16, 5, generator=gen)) * col_scale
    y = 10.0 + torch.rand(16, generator=gen)
    return scale * 0.5 * ((x @ w + b - y) ** 2).mean()


def zero_params():
    return [nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(1))]


def snapshot(opt):
    st_ = opt.hrnn_state
    return {k: (None if st_[k] is None else st_[k].clone()) for k in STATE_FIELDS}


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


# ---------------------------------------------------------------------------- construction


def test_weights_none_warns_not_meta_trained():
    """weights=None uses the untrained initialisation and says so."""
    with pytest.warns(UserWarning, match="not meta-trained"):
        opt = HierarchicalRNNOptimizer([nn.Parameter(torch.zeros(2))], weights=None)
    assert isinstance(opt.lopt, HierarchicalRNN)


@pytest.mark.parametrize("kwargs", [dict(lr=-0.1), dict(lr=float("nan")), dict(weight_decay=-1.0)])
def test_invalid_hyperparameters_raise(lopt, kwargs):
    """A negative (or NaN) lr or weight decay is refused at construction."""
    with pytest.raises(ValueError, match="lr|weight_decay"):
        HierarchicalRNNOptimizer([nn.Parameter(torch.zeros(2))], weights=lopt, **kwargs)


def test_factory_builds_optimizer_with_these_weights():
    """HierarchicalRNN().optimizer(params, ...) returns an optimizer that uses that very module."""
    hrnn = HierarchicalRNN(attention=False)
    model = make_mlp()
    opt = hrnn.optimizer(model.parameters(), lr=0.5, weight_decay=0.01)
    assert isinstance(opt, HierarchicalRNNOptimizer) and opt.lopt is hrnn
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.01
    before = flat(model.parameters())
    train(model, opt, 2)
    assert not torch.equal(before, flat(model.parameters()))


def test_given_weights_module_is_not_altered():
    """Passing a HierarchicalRNN (e.g. the one being meta-trained) does not switch off its gradients."""
    hrnn = HierarchicalRNN()
    model = make_mlp()
    opt = hrnn.optimizer(model.parameters())
    train(model, opt, 1)
    assert all(p.requires_grad for p in hrnn.parameters())
    layout = Layout.build([2])
    state = hrnn.init_state(layout, theta=torch.zeros(2))
    out = hrnn.step(state, torch.zeros(2), torch.ones(2), layout)
    assert out.point.requires_grad


def test_weights_from_saved_file(tmp_path, lopt):
    """weights= a .safetensors path gives the same trajectory as passing the module itself."""
    path = lopt.save_pretrained(tmp_path / "w.safetensors")
    runs = []
    for weights in (lopt, str(path)):
        model = make_mlp()
        train(model, HierarchicalRNNOptimizer(model.parameters(), weights=weights), 3)
        runs.append(flat(model.parameters()))
    assert torch.equal(runs[0], runs[1])


def test_optimizer_is_the_pure_step_on_flattened_parameters(lopt):
    """The optimizer applies HierarchicalRNN.step to the parameters flattened in group order, with each
    group's lr and weight decay per tensor and the state from init_state seeded by `seed`."""
    model = make_mlp()
    groups = [dict(params=list(model[2].parameters()), lr=2.0), dict(params=list(model[0].parameters()), lr=0.5, weight_decay=0.1)]
    params = groups[0]["params"] + groups[1]["params"]
    theta0 = flat(params).clone()
    opt = HierarchicalRNNOptimizer(groups, weights=lopt, seed=5)
    layout = Layout.build([p.numel() for p in params])
    state = lopt.init_state(layout, theta=theta0, generator=torch.Generator().manual_seed(5))
    point = theta0
    lr = torch.tensor([2.0, 2.0, 0.5, 0.5])
    wd = torch.tensor([0.0, 0.0, 0.1, 0.1])
    for _ in range(3):
        opt.zero_grad()
        mlp_loss(model).backward()
        grad = flat(p.grad for p in params)
        opt.step()
        with torch.no_grad():
            point, state, _ = lopt.step(state, point, grad, layout, lr=lr, weight_decay=wd)
        torch.testing.assert_close(flat(params), point, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.hrnn_state["theta"], state.theta, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.hrnn_state["h_global"], state.h_global, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- lr and weight decay


def test_lr_zero_group_does_not_move(lopt):
    """A parameter group with lr=0 keeps its values (train and eval mode), while the other group moves."""
    model = make_mlp()
    frozen, moving = list(model[0].parameters()), list(model[2].parameters())
    f0, m0 = flat(frozen).clone(), flat(moving).clone()
    opt = HierarchicalRNNOptimizer(
        [dict(params=frozen, lr=0.0, weight_decay=0.5), dict(params=moving, lr=1.0)], weights=lopt
    )
    train(model, opt, 3)
    assert torch.equal(flat(frozen), f0)
    assert not torch.allclose(flat(moving), m0)
    opt.eval()
    assert torch.equal(flat(frozen), f0)
    assert not torch.allclose(flat(moving), m0)


@pytest.mark.parametrize("attention", [False, True])
def test_lr_scales_first_update_exactly(attention):
    """lr multiplies the learned step: the first update of a group with lr=3 is three times the one with lr=1
    (attention off: the parameters; attention on: both the attended point and the true parameters)."""
    hrnn = HierarchicalRNN(attention=attention)
    results = []
    for lr_b in (1.0, 3.0):
        params = zero_params()
        opt = HierarchicalRNNOptimizer([dict(params=[params[0]], lr=1.0), dict(params=[params[1]], lr=lr_b)], weights=hrnn)
        least_squares(params).backward()
        opt.step()
        point = flat(params).clone()
        opt.eval()
        results.append((point, flat(params).clone()))
    (p1, t1), (p3, t3) = results
    assert (p1.abs() > 1e-7).all() and (t1.abs() > 1e-7).all()
    torch.testing.assert_close(p3[:5], p1[:5], rtol=1e-6, atol=0)
    torch.testing.assert_close(p3[5:], 3.0 * p1[5:], rtol=1e-5, atol=0)
    torch.testing.assert_close(t3[5:], 3.0 * t1[5:], rtol=1e-5, atol=0)
    if attention:
        assert not torch.allclose(p1, t1)


def test_doubling_lr_doubles_first_update(lopt_noatt):
    """With attention off, doubling lr doubles the first update of every parameter."""
    updates = []
    for lr in (0.5, 1.0):
        params = zero_params()
        opt = HierarchicalRNNOptimizer(params, weights=lopt_noatt, lr=lr)
        least_squares(params).backward()
        opt.step()
        updates.append(flat(params).clone())
    assert (updates[0].abs() > 1e-7).all()
    torch.testing.assert_close(updates[1], 2.0 * updates[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("attention", [False, True])
def test_decoupled_weight_decay_one_step(attention):
    """Weight decay is decoupled: one step with weight_decay=wd moves the true parameters by an extra
    -lr * wd * theta compared with wd=0, whatever the gradient; the attended point of the first step is
    unaffected."""
    hrnn = HierarchicalRNN(attention=attention)
    lr, wd = 0.5, 0.1
    out = {}
    for decay in (0.0, wd):
        model = make_mlp()
        theta0 = flat(model.parameters()).clone()
        opt = HierarchicalRNNOptimizer(model.parameters(), weights=hrnn, lr=lr, weight_decay=decay)
        train(model, opt, 1)
        point = flat(model.parameters()).clone()
        opt.eval()
        out[decay] = (point, flat(model.parameters()).clone())
    torch.testing.assert_close(out[wd][1] - out[0.0][1], -lr * wd * theta0, rtol=1e-4, atol=1e-6)
    if attention:
        torch.testing.assert_close(out[wd][0], out[0.0][0], rtol=0, atol=0)
    else:
        torch.testing.assert_close(out[wd][0], out[wd][1], rtol=0, atol=0)


# ---------------------------------------------------------------------------- step and closure


def test_step_with_and_without_closure(lopt):
    """step(closure) calls the closure with gradients enabled (even under no_grad), returns its loss, and moves
    the parameters exactly as backward() followed by step(); step() without a closure returns None."""
    model_a, model_b = make_mlp(), make_mlp()
    opt_a = HierarchicalRNNOptimizer(model_a.parameters(), weights=lopt)
    opt_b = HierarchicalRNNOptimizer(model_b.parameters(), weights=lopt)
    for i in range(3):
        losses = []

        def closure():
            opt_a.zero_grad()
            loss = mlp_loss(model_a)
            loss.backward()
            losses.append(loss)
            return loss

        if i == 1:
            with torch.no_grad():
                returned = opt_a.step(closure)
        else:
            returned = opt_a.step(closure)
        assert returned is losses[0] and len(losses) == 1

        opt_b.zero_grad()
        mlp_loss(model_b).backward()
        assert opt_b.step() is None
        assert torch.equal(flat(model_a.parameters()), flat(model_b.parameters()))


def test_no_grads_at_all_is_a_no_op(lopt):
    """A step when no parameter has a gradient changes nothing."""
    model = make_mlp()
    before = flat(model.parameters()).clone()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt)
    opt.step()
    assert torch.equal(before, flat(model.parameters()))


def test_params_without_grad_are_left_alone(lopt):
    """Parameters whose grad is None keep their values and their slice of the state; the others move."""
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    opt = HierarchicalRNNOptimizer([a, b], weights=lopt)

    def loss_fn():
        return (a.sin().sum() + (b**2).sum()) * 2

    loss_fn().backward()
    opt.step()
    before_state, a0, b0 = snapshot(opt), a.detach().clone(), b.detach().clone()
    opt.zero_grad()
    (a.sin().sum() * 2).backward()
    assert b.grad is None
    opt.step()
    after = snapshot(opt)
    assert torch.equal(b.detach(), b0)
    assert not torch.allclose(a.detach(), a0)
    for key in ("h_param", "momentum", "mean_square", "beta_in", "beta_sc", "log_lr", "theta"):
        assert torch.equal(after[key][4:], before_state[key][4:]), key
        if key != "log_lr":  # the untrained log-lr read-out is zero, so eta stays put
            assert not torch.equal(after[key][:4], before_state[key][:4]), key
    assert torch.equal(after["h_tensor"][1], before_state["h_tensor"][1])
    assert not torch.equal(after["h_tensor"][0], before_state["h_tensor"][0])
    assert opt.hrnn_state["step"] == 2


def test_sparse_gradient_raises():
    """A sparse gradient (nn.Embedding(sparse=True)) raises a RuntimeError saying it is not supported."""
    emb = nn.Embedding(5, 3, sparse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = HierarchicalRNNOptimizer(emb.parameters(), weights=None)
    emb(torch.tensor([1, 3])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


def test_complex_parameter_raises(lopt):
    """A complex parameter raises a RuntimeError saying complex parameters are not supported, without first
    emitting a 'discards the imaginary part' warning."""
    p = nn.Parameter(torch.randn(3, dtype=torch.cfloat))
    opt = HierarchicalRNNOptimizer([p], weights=lopt)
    (p.abs() ** 2).sum().backward()
    before = p.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="does not support complex"):
            opt.step()
    assert not [w for w in caught if "imaginary" in str(w.message)]
    assert torch.equal(p.detach(), before)


def test_nonfinite_gradient_skips_step_and_warns_once(lopt):
    """A step with an inf or nan gradient changes neither parameters nor any state tensor, counts the skip in
    optimizer.skipped_steps and warns only the first time; finite steps then proceed normally."""
    model = make_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt)
    train(model, opt, 2)
    params0, state0 = flat(model.parameters()).clone(), snapshot(opt)
    assert opt.skipped_steps == 0

    opt.zero_grad()
    mlp_loss(model).backward()
    model[0].weight.grad[1, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert opt.skipped_steps == 1

    opt.zero_grad()
    mlp_loss(model).backward()
    model[2].bias.grad[0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert not [w for w in caught if "non-finite" in str(w.message)]
    assert opt.skipped_steps == 2

    assert torch.equal(flat(model.parameters()), params0)
    after = snapshot(opt)
    for key in STATE_FIELDS:
        assert torch.equal(after[key], state0[key]), key
    assert opt.hrnn_state["step"] == 2
    assert opt.state_dict()["state"]["hrnn"]["skipped"] == 2

    train(model, opt, 1)
    assert not torch.equal(flat(model.parameters()), params0)
    assert opt.skipped_steps == 2 and opt.hrnn_state["step"] == 3


def test_nonfinite_first_step_is_as_if_it_never_happened(lopt):
    """A skipped first step leaves the trajectory identical to a run that never saw it."""
    runs = []
    for skip_first in (False, True):
        model = make_mlp()
        opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt)
        if skip_first:
            mlp_loss(model).backward()
            model[0].bias.grad[0] = float("nan")
            with pytest.warns(RuntimeWarning):
                opt.step()
        train(model, opt, 3)
        runs.append(flat(model.parameters()))
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------------------- train / eval


def test_train_eval_swap_between_point_and_true_parameters(lopt):
    """eval() puts the true parameters theta of the state into the model, train() restores the attended point;
    both are idempotent; step() in eval mode raises a clear error."""
    model = make_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt)
    opt.eval()
    opt.train()  # no state yet: nothing to swap, nothing breaks
    train(model, opt, 3)
    phi = flat(model.parameters()).clone()
    theta = opt.hrnn_state["theta"].clone()
    assert not torch.allclose(phi, theta)
    assert opt.training
    opt.eval()
    assert not opt.training
    assert torch.equal(flat(model.parameters()), theta)
    opt.eval()
    assert torch.equal(flat(model.parameters()), theta)
    mlp_loss(model).backward()
    with pytest.raises(RuntimeError, match=r"eval mode.*train\(\)"):
        opt.step()
    assert torch.equal(flat(model.parameters()), theta)
    opt.train()
    opt.train()
    assert opt.training
    assert torch.equal(flat(model.parameters()), phi)
    assert torch.equal(opt.hrnn_state["theta"], theta)


def test_eval_without_attention_keeps_parameters(lopt_noatt):
    """Without attention the model always holds the true parameters; eval()/train() change nothing."""
    model = make_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt_noatt)
    train(model, opt, 2)
    before = flat(model.parameters()).clone()
    assert opt.hrnn_state["theta"] is None
    opt.eval()
    assert torch.equal(flat(model.parameters()), before)
    opt.train()
    assert torch.equal(flat(model.parameters()), before)


# ---------------------------------------------------------------------------- state dict


@pytest.mark.parametrize("save_in_eval", [False, True])
def test_state_dict_resume_is_bit_identical(lopt, save_in_eval):
    """state_dict() survives torch.save / torch.load(weights_only=True), and a fresh model and optimizer loaded
    from it continue the exact trajectory of an uninterrupted run (also when saved in eval mode, as a
    checkpoint taken at the true parameters)."""
    model_ref = make_mlp()
    opt_ref = HierarchicalRNNOptimizer(
        [dict(params=model_ref[0].parameters(), lr=0.7), dict(params=model_ref[2].parameters(), weight_decay=0.01)],
        weights=lopt,
    )
    train(model_ref, opt_ref, 6)

    model = make_mlp()
    groups = [dict(params=model[0].parameters(), lr=0.7), dict(params=model[2].parameters(), weight_decay=0.01)]
    opt = HierarchicalRNNOptimizer(groups, weights=lopt)
    train(model, opt, 3)
    if save_in_eval:
        opt.eval()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2 = make_mlp(seed=99)
    model2.load_state_dict(ckpt["model"])
    groups2 = [dict(params=model2[0].parameters(), lr=0.1), dict(params=model2[2].parameters(), weight_decay=0.5)]
    opt2 = HierarchicalRNNOptimizer(groups2, weights=lopt)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["lr"] == 0.7 and opt2.param_groups[1]["weight_decay"] == 0.01
    assert opt2.training is (not save_in_eval)
    if save_in_eval:
        opt2.train()
    train(model2, opt2, 3)
    assert torch.equal(flat(model2.parameters()), flat(model_ref.parameters()))
    ref_state, state2 = snapshot(opt_ref), snapshot(opt2)
    for key in STATE_FIELDS:
        assert torch.equal(ref_state[key], state2[key]), key
    assert opt2.hrnn_state["step"] == 6


def _feature_major(t):
    return t.shape[0] == 1 or (t.stride(0) == 1 and t.t().is_contiguous())


def test_state_kept_feature_major_and_row_major_state_loads(lopt):
    """The per-element matrices are kept column by column (the fused kernel's fast layout) from the first
    step, after add_param_group and after loading a state saved row-major; the layout changes no value."""
    model_ref = make_mlp()
    opt_ref = HierarchicalRNNOptimizer(model_ref.parameters(), weights=lopt)
    train(model_ref, opt_ref, 6)
    for key in ("h_param", "momentum", "mean_square"):
        assert _feature_major(opt_ref.hrnn_state[key]), key

    model = make_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt)
    train(model, opt, 3)
    saved = opt.state_dict()
    row_major = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in saved["state"]["hrnn"].items()}
    assert not _feature_major(row_major["h_param"])
    model2 = make_mlp(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = HierarchicalRNNOptimizer(model2.parameters(), weights=lopt)
    opt2.load_state_dict(dict(saved, state={"hrnn": row_major}))
    for key in ("h_param", "momentum", "mean_square"):
        assert _feature_major(opt2.hrnn_state[key]), key
    train(model2, opt2, 3)
    assert torch.equal(flat(model2.parameters()), flat(model_ref.parameters()))

    extra = nn.Parameter(torch.randn(7, 2))
    opt2.add_param_group({"params": [extra]})
    extra.grad = torch.randn_like(extra)
    opt2.step()
    for key in ("h_param", "momentum", "mean_square"):
        assert _feature_major(opt2.hrnn_state[key]), key


def test_state_dict_holds_only_tensors_and_primitives(lopt):
    """The state dict is made of tensors and Python primitives only (weights_only checkpoints)."""
    model = make_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt)
    train(model, opt, 1)

    def check(value):
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, (str, int)), k
                check(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                check(v)
        else:
            assert value is None or isinstance(value, (torch.Tensor, bool, int, float, str)), type(value)

    check(opt.state_dict())


def test_load_state_dict_into_other_shapes_raises(lopt):
    """Loading a state made for parameters of other sizes raises an error naming the sizes."""
    model = make_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt)
    train(model, opt, 1)
    other = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    opt_other = HierarchicalRNNOptimizer(other.parameters(), weights=lopt)
    with pytest.raises(ValueError, match="sizes"):
        opt_other.load_state_dict(opt.state_dict())
    fewer = HierarchicalRNNOptimizer(nn.Linear(4, 3).parameters(), weights=lopt)
    with pytest.raises(ValueError):
        fewer.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "saved_kw, loaded_kw, match",
    [({}, dict(param_units=8), "h_param"), ({}, dict(attention=False), "attention"), (dict(attention=False), {}, "attention")],
)
def test_load_state_dict_from_other_architecture_raises(saved_kw, loaded_kw, match):
    """A state made with weights of another architecture is refused at load time with an error naming the
    mismatch, rather than failing obscurely at the next step."""
    model = make_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=HierarchicalRNN(**saved_kw))
    train(model, opt, 1)
    model2 = make_mlp()
    opt2 = HierarchicalRNNOptimizer(model2.parameters(), weights=HierarchicalRNN(**loaded_kw))
    with pytest.raises(ValueError, match=match):
        opt2.load_state_dict(opt.state_dict())


# ---------------------------------------------------------------------------- state dtype


def test_bf16_state_keeps_theta_fp32(lopt):
    """state_dtype=bfloat16 keeps the hidden states and statistics in bf16 but the true parameters in fp32."""
    model = make_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt, state_dtype=torch.bfloat16)
    before = flat(model.parameters()).clone()
    train(model, opt, 3)
    st_ = opt.hrnn_state
    for key in ("h_param", "momentum", "mean_square", "beta_in", "beta_sc", "log_lr", "h_tensor", "h_global"):
        assert st_[key].dtype == torch.bfloat16, key
    assert st_["theta"].dtype == torch.float32
    after = flat(model.parameters())
    assert after.dtype == torch.float32 and torch.isfinite(after).all()
    assert not torch.equal(after, before)


def test_bf16_state_does_not_round_parameters(lopt):
    """With a bf16 state the parameters are not rounded to bf16: an lr=0 step leaves them (and theta)
    bit-identical."""
    p = nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(0)))
    p0 = p.detach().clone()
    assert not torch.equal(p0, p0.bfloat16().float())
    opt = HierarchicalRNNOptimizer([p], weights=lopt, lr=0.0, state_dtype=torch.bfloat16)
    (p**2).sum().backward()
    opt.step()
    assert torch.equal(opt.hrnn_state["theta"], p0)
    assert torch.equal(p.detach(), p0)


# ---------------------------------------------------------------------------- scale invariance


_TRAJECTORIES = {}


def _scale_test_weights():
    """Untrained weights with every meta-parameter perturbed, so that the learning rate and the hidden states
    respond to the features (the plain initialisation has a zero log-lr read-out)."""
    if "lopt" not in _TRAJECTORIES:
        hrnn = HierarchicalRNN(seed=3)
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in hrnn.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        _TRAJECTORIES["lopt"] = hrnn
    return _TRAJECTORIES["lopt"]


def _trajectory(scale, weights, steps=30):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        params = zero_params()
        opt = HierarchicalRNNOptimizer(params, weights=weights)
    points, thetas, grads = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        least_squares(params, scale).backward()
        grads.append(flat(p.grad for p in params) / scale)
        opt.step()
        points.append(flat(params).clone())
        thetas.append(opt.hrnn_state["theta"].clone())
    return torch.stack(points), torch.stack(thetas), torch.stack(grads)


def _check_same_trajectory(c, weights_name):
    weights = None if weights_name is None else _scale_test_weights()
    if weights_name not in _TRAJECTORIES:
        _TRAJECTORIES[weights_name] = _trajectory(1.0, weights)
    ref_points, ref_thetas, ref_grads = _TRAJECTORIES[weights_name]
    # every gradient entry stays O(1) and away from zero, where the 1e-12 epsilon is negligible at any c
    assert ref_grads.abs().min() > 1.0
    points, thetas, _ = _trajectory(c, weights)
    for got, want in ((points, ref_points), (thetas, ref_thetas)):
        scale = want.abs().max()
        assert scale > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale.item())


@settings(max_examples=4, deadline=None, derandomize=True)
@given(log10_c=st.floats(min_value=-4.0, max_value=4.0))
@example(log10_c=-4.0)
@example(log10_c=4.0)
def test_scale_invariance(log10_c):
    """Multiplying the loss by c in [1e-4, 1e4] gives the same parameter trajectory over 30 steps (the update
    rule sees only rescaled gradient statistics, never the raw gradient)."""
    _check_same_trajectory(10.0**log10_c, "perturbed")


@pytest.mark.filterwarnings(UNTRAINED)
@pytest.mark.parametrize("c", [1e-4, 1e4])
def test_scale_invariance_untrained_weights(c):
    """The same with weights=None (the specification's initialisation)."""
    _check_same_trajectory(c, None)


def test_add_param_group_after_first_step_gives_new_parameters_a_fresh_state():
    """Fine-tuning that unfreezes layers (add_param_group) keeps training the old parameters and starts the new."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = HierarchicalRNNOptimizer([a], weights=None)
    a.grad = torch.randn_like(a)
    opt.step()
    h_before = opt.hrnn_state["h_param"].clone()
    opt.add_param_group({"params": [b], "lr": 0.5})
    b_start = b.detach().clone()
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    st = opt.hrnn_state
    assert st["sizes"] == [12, 5]
    assert st["h_param"].shape[0] == 17 and st["h_tensor"].shape[0] == 2
    assert not torch.equal(b.detach(), b_start)
    assert not torch.equal(st["h_param"][:12], h_before)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.param_groups[0]["params"] = [torch.nn.Parameter(torch.randn(7))]
        opt.step()


@pytest.mark.parametrize("attention", [True, False])
def test_float64_parameters_are_stepped_in_float64(attention):
    """An update far below float32's resolution at the parameter's magnitude still lands, and equals the
    pure step computed in float64."""
    lopt = HierarchicalRNN(attention=attention)
    start = torch.full((6,), 1e8, dtype=torch.float64) + torch.arange(6, dtype=torch.float64)
    p = nn.Parameter(start.clone())
    opt = HierarchicalRNNOptimizer([p], weights=lopt)
    grad = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    p.grad = grad.clone()
    opt.step()
    assert opt.hrnn_state["theta"] is None or opt.hrnn_state["theta"].dtype == torch.float64
    assert p.dtype == torch.float64 and not torch.equal(p.detach(), start)
    assert torch.equal(p.detach().float().double(), start.float().double())  # float32 could not tell them apart

    layout = Layout.build([6])
    state = lopt.init_state(layout, theta=start, generator=torch.Generator().manual_seed(0))
    if attention:
        state = state._replace(theta=start.clone())
    with torch.no_grad():
        ref = lopt.step(state, start.clone(), grad, layout, backend="eager", chunk_size=0)
    torch.testing.assert_close(p.detach(), ref.point, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- training progress (the horizon)


@pytest.fixture(scope="module")
def lopt_progress():
    lopt = HierarchicalRNN(progress_input=True)
    with torch.no_grad():  # a global RNN that reads its progress inputs strongly
        lopt.global_rnn.weight_gates.mul_(3.0)
        lopt.global_rnn.weight_candidate.mul_(3.0)
    return lopt


def _run_with_horizon(weights, total_steps, steps=6, backend="auto"):
    model = make_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=weights, total_steps=total_steps, backend=backend)
    seen = []
    for _ in range(steps):
        seen.append(opt.progress)
        train(model, opt, 1)
    return flat(model.parameters()), opt, seen


def test_optimizer_passes_progress_when_the_horizon_is_known(lopt_progress):
    """With a horizon, step k passes k / total_steps: the trajectory equals the pure step fed those values, and
    differs from the one without a horizon, which also trains."""
    with_horizon, opt, seen = _run_with_horizon(lopt_progress, 8, backend="eager")
    assert seen == [k / 8 for k in range(6)] and opt.progress == 6 / 8
    unknown, opt_none, seen_none = _run_with_horizon(lopt_progress, None, backend="eager")
    assert seen_none == [None] * 6 and opt_none.progress is None
    assert torch.isfinite(unknown).all() and not torch.allclose(with_horizon, unknown)
    # The pure step, fed step / total_steps by hand.
    model = make_mlp()
    params = list(model.parameters())
    layout = Layout.build([p.numel() for p in params])
    point = flat(params)
    state = lopt_progress.init_state(layout, theta=point, generator=torch.Generator().manual_seed(0))
    for k in range(6):
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], [v.view_as(p) for v, p in zip(point.split(layout.sizes), params)])
        model.zero_grad()
        mlp_loss(model).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        with torch.no_grad():
            out = lopt_progress.step(state, point, grad, layout, progress=k / 8, backend="eager")
        state, point = out.state, out.point
    torch.testing.assert_close(with_horizon, point, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("total_steps", [None, 10])
def test_progress_cpp_kernel_equals_eager(lopt_progress, total_steps):
    """The global RNN runs in torch after the element-level kernel: the C++ backend equals eager with progress."""
    cpp, opt, _ = _run_with_horizon(lopt_progress, total_steps, backend="cpp")
    assert lopt_progress.last_backend == "cpp"
    eager, _, _ = _run_with_horizon(lopt_progress, total_steps, backend="eager")
    torch.testing.assert_close(cpp, eager, rtol=1e-5, atol=1e-6)


def test_horizon_is_ignored_without_progress_input(lopt):
    """Weights without the progress input step identically with or without a horizon."""
    a, _, _ = _run_with_horizon(lopt, 5)
    b, _, _ = _run_with_horizon(lopt, None)
    assert torch.equal(a, b)


def _run_decaying(weights, total_steps, steps=8, scheduler=None, **kwargs):
    model = make_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=weights, total_steps=total_steps, weight_decay=0.01,
                                   **kwargs)
    sched = None if scheduler is None else torch.optim.lr_scheduler.LambdaLR(opt, scheduler)
    factors = []
    for _ in range(steps):
        factors.append(opt.decay_factor)
        train(model, opt, 1)
        if sched is not None:
            sched.step()
    return flat(model.parameters()), factors


def test_decay_phase_equals_the_same_schedule_on_lr():
    """With a horizon, the last decay_fraction of training multiplies lr by a linear ramp to 0: the trajectory
    equals torch's LambdaLR with that ramp on weights without the decay (weight decay included)."""
    decaying = HierarchicalRNN(decay_fraction=0.5)
    plain = HierarchicalRNN()
    plain.load_state_dict(decaying.state_dict())
    got, factors = _run_decaying(decaying, total_steps=8)
    assert factors == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]  # step k: min(1, (1 - k/8) / 0.5)
    want, _ = _run_decaying(plain, total_steps=8, scheduler=lambda k: min(1.0, (1 - k / 8) / 0.5))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    undecayed, ones = _run_decaying(plain, total_steps=8)
    assert ones == [1.0] * 8 and not torch.allclose(got, undecayed)


def test_decay_needs_a_horizon_and_can_be_turned_off():
    """Without total_steps there is no decay; decay_fraction=0 turns the weights' decay off."""
    decaying = HierarchicalRNN(decay_fraction=0.5)
    plain = HierarchicalRNN()
    plain.load_state_dict(decaying.state_dict())
    reference, _ = _run_decaying(plain, total_steps=None)
    no_horizon, factors = _run_decaying(decaying, total_steps=None)
    assert factors == [1.0] * 8 and torch.equal(no_horizon, reference)
    off, factors = _run_decaying(decaying, total_steps=8, decay_fraction=0.0)
    assert factors == [1.0] * 8 and torch.equal(off, reference)


def test_a_step_past_the_horizon_is_zero_and_warns_once():
    decaying = HierarchicalRNN(decay_fraction=0.5, attention=False)  # the model holds the true parameters
    model = make_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=decaying, total_steps=2)
    train(model, opt, 2)
    before = flat(model.parameters())
    with pytest.warns(UserWarning, match="past the run's length") as caught:
        train(model, opt, 2)
    assert len([w for w in caught if "past the run's length" in str(w.message)]) == 1
    assert torch.equal(flat(model.parameters()), before)  # a step of 0


def test_shipped_weights_decay_over_the_last_half():
    opt = HierarchicalRNNOptimizer([nn.Parameter(torch.zeros(2))])
    assert opt.decay_fraction == 0.5 and opt.decay_factor == 1.0
    opt.total_steps = 4
    assert opt.decay_factor == 1.0  # no step taken yet


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_invalid_decay_fraction_raises(lopt, bad):
    with pytest.raises(ValueError, match="decay_fraction"):
        HierarchicalRNNOptimizer(make_mlp().parameters(), weights=lopt, decay_fraction=bad)
    with pytest.raises(ValueError, match="decay_fraction"):
        HierarchicalRNN(decay_fraction=bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, float("inf")])
def test_invalid_total_steps_raise(lopt, bad):
    with pytest.raises(ValueError, match="total_steps"):
        HierarchicalRNNOptimizer(make_mlp().parameters(), weights=lopt, total_steps=bad)
    opt = HierarchicalRNNOptimizer(make_mlp().parameters(), weights=lopt)
    with pytest.raises(ValueError, match="total_steps"):
        opt.total_steps = bad
