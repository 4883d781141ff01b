"""torch.optim contracts of HierarchicalRNNOptimizer: copies, frozen parameters, foreign state,
non-finite updates, and a fuzz test over random parameter sets."""

import copy
import io
import pickle
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer
from lightning_lopt.callbacks import EvalWithTrueParameters

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lopt() -> HierarchicalRNN:
    return HierarchicalRNN()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) + 0.5 * p.detach()


# ---------------------------------------------------------------------------------- copy and pickle


def _pickled(opt: HierarchicalRNNOptimizer) -> HierarchicalRNNOptimizer:
    return pickle.loads(pickle.dumps(opt))


@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("steps_before", [0, 3])
def test_copy_steps_exactly_like_the_original(copier, attention: bool, steps_before: int) -> None:
    params = list(_model().parameters())
    opt = HierarchicalRNNOptimizer(params, weights=HierarchicalRNN(attention=attention), lr=0.7, backend="eager")
    for i in range(steps_before):
        _set_grads(params, i)
        opt.step()
    twin = copier(opt)
    twin_params = twin.params
    assert all(a is not b for a, b in zip(params, twin_params))  # a copy, with its own parameters
    assert twin.training == opt.training and twin.skipped_steps == opt.skipped_steps
    for i in range(steps_before, steps_before + 4):
        _set_grads(params, i)
        _set_grads(twin_params, i)
        opt.step()
        twin.step()
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)
    opt.eval()
    twin.eval()
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)
    # The copy does not share state with the original: stepping one leaves the other alone.
    before = [p.detach().clone() for p in params]
    _set_grads(twin_params, 99)
    twin.train()
    twin.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_copy_in_eval_mode_keeps_the_mode(lopt) -> None:
    params = list(_model().parameters())
    opt = HierarchicalRNNOptimizer(params, weights=lopt, backend="eager")
    _set_grads(params, 0)
    opt.step()
    opt.eval()
    twin = copy.deepcopy(opt)
    assert not twin.training
    with pytest.raises(RuntimeError, match="eval mode"):
        twin.step()
    twin.train()
    opt.train()
    _set_grads(params, 1)
    _set_grads(twin.params, 1)
    opt.step()
    twin.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin.params))


# ---------------------------------------------------------------------------------- frozen parameters


def _state_bytes(opt: HierarchicalRNNOptimizer) -> int:
    st = opt.hrnn_state or {}
    return sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))


def test_frozen_parameters_hold_no_state(lopt) -> None:
    torch.manual_seed(0)
    frozen = nn.Linear(1000, 1000)  # 1,001,000 parameters
    trainable = nn.Linear(100, 100)  # 10,100 parameters
    frozen.requires_grad_(False)
    params = list(frozen.parameters()) + list(trainable.parameters())
    opt = HierarchicalRNNOptimizer(params, weights=lopt, backend="eager")
    alone = HierarchicalRNNOptimizer(
        [p.detach().clone().requires_grad_() for p in trainable.parameters()], weights=lopt, backend="eager"
    )
    for o, ps in ((opt, list(trainable.parameters())), (alone, alone.params)):
        _set_grads(ps, 0)
        o.step()
    assert opt.hrnn_state["held"] == [2, 3]
    assert _state_bytes(opt) == _state_bytes(alone) < 2_000_000
    assert all(torch.equal(a, b) for a, b in zip(trainable.parameters(), alone.params))


def _split_model(frozen: bool) -> tuple[nn.Module, list[nn.Parameter], list[nn.Parameter]]:
    """A model whose first layer may be frozen: the frozen tensors come first in the flat order."""
    model = _model()
    first, last = list(model[0].parameters()), list(model[2].parameters())
    if frozen:
        model[0].requires_grad_(False)
    return model, first, last


def _step(opt: HierarchicalRNNOptimizer, params: list[torch.Tensor], i: int) -> None:
    _set_grads(params, i)
    opt.step()
    for p in params:
        p.grad = None


@pytest.mark.parametrize("attention", [True, False])
def test_frozen_parameters_are_never_modified(attention: bool) -> None:
    lopt = HierarchicalRNN(attention=attention)
    model, first, last = _split_model(frozen=True)
    start = [p.detach().clone() for p in first]
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt, lr=0.5, backend="eager")
    ref_params = [p.detach().clone().requires_grad_() for p in last]
    ref = HierarchicalRNNOptimizer(ref_params, weights=lopt, lr=0.5, backend="eager")
    for i in range(6):
        _step(opt, last, i)
        _step(ref, ref_params, i)
        if i % 2:
            opt.eval()
            ref.eval()
            assert all(torch.equal(a, b) for a, b in zip(first, start))
            assert all(torch.equal(a, b) for a, b in zip(last, ref_params))
            opt.train()
            ref.train()
        assert all(torch.equal(a, b) for a, b in zip(first, start))
        assert all(torch.equal(a, b) for a, b in zip(last, ref_params))
    assert opt.hrnn_state["held"] == [2, 3]


@pytest.mark.parametrize("attention", [True, False])
def test_unfrozen_parameters_get_fresh_state_in_place(attention: bool) -> None:
    """Unfreezing the first layer mid-training: it starts moving from a fresh state, and every tensor
    follows an optimizer that held only the trainable ones and got the unfrozen ones by add_param_group."""
    lopt = HierarchicalRNN(attention=attention)
    model, first, last = _split_model(frozen=True)
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt, lr=0.5, backend="eager")
    ref_last = [p.detach().clone().requires_grad_() for p in last]
    ref_first = [p.detach().clone().requires_grad_() for p in first]
    ref = HierarchicalRNNOptimizer(ref_last, weights=lopt, lr=0.5, backend="eager")
    start = [p.detach().clone() for p in first]
    for i in range(3):
        _step(opt, last, i)
        _step(ref, ref_last, i)
    assert all(torch.equal(a, b) for a, b in zip(last, ref_last))
    h_tensor_before = opt.hrnn_state["h_tensor"].clone()

    model[0].requires_grad_(True)
    ref.add_param_group({"params": ref_first})
    _step(opt, first + last, 3)
    _step(ref, ref_first + ref_last, 3)  # the same gradients: drawn in the model's order
    st = opt.hrnn_state
    assert st["held"] == [0, 1, 2, 3] and st["sizes"] == [30, 5, 15, 3]
    assert not any(torch.equal(a, b) for a, b in zip(first, start))
    # The unfrozen tensors' state sits before the others', as the reference's sits after them.
    ref_st = ref.hrnn_state
    torch.testing.assert_close(st["h_tensor"][:2], ref_st["h_tensor"][2:], rtol=1e-6, atol=1e-6)
    assert not torch.equal(st["h_tensor"][2:], h_tensor_before)  # stepped on from where they were

    # The last layer frozen again: it keeps its state and waits (the partial path).
    for i in range(4, 9):
        stepped = first + last if i % 2 else first
        ref_stepped = ref_first + ref_last if i % 2 else ref_first
        _step(opt, stepped, i)
        _step(ref, ref_stepped, i)
    opt.eval()
    ref.eval()
    for a, b in zip(first + last, ref_first + ref_last):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _frozen_run(steps: int, seed: int, opt: HierarchicalRNNOptimizer, stepped: list[torch.Tensor]) -> None:
    for i in range(steps):
        _step(opt, stepped, seed + i)


@pytest.mark.parametrize("per_parameter", [False, True])
@pytest.mark.parametrize("unfreeze", [False, True])
def test_state_dict_with_frozen_parameters_resumes_exactly(lopt, per_parameter: bool, unfreeze: bool) -> None:
    model, first, last = _split_model(frozen=True)
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt, backend="eager")
    opt.per_parameter_state_dict = per_parameter
    _frozen_run(2, 0, opt, last)
    if unfreeze:  # the middle tensor of three held ones: the held indices are [1, 2, 3]
        first[1].requires_grad_(True)
        _frozen_run(1, 10, opt, [first[1]] + last)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    if per_parameter:
        assert sorted(saved["state"]) == ([1, 2, 3] if unfreeze else [2, 3])

    twin_model, twin_first, twin_last = _split_model(frozen=True)
    twin_model.load_state_dict(model.state_dict())
    twin = HierarchicalRNNOptimizer(twin_model.parameters(), weights=lopt, backend="eager")
    twin.load_state_dict(saved)
    assert twin.hrnn_state["held"] == opt.hrnn_state["held"]
    stepped, twin_stepped = last, twin_last
    if unfreeze:
        twin_first[1].requires_grad_(True)
        stepped, twin_stepped = [first[1]] + last, [twin_first[1]] + twin_last
    _frozen_run(3, 20, opt, stepped)
    _frozen_run(3, 20, twin, twin_stepped)
    opt.eval()
    twin.eval()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))


def test_state_dict_from_before_frozen_parameters_loads(lopt) -> None:
    """A state dict without "held" (written when every parameter held state) loads when it covers them all."""
    params = list(_model().parameters())
    opt = HierarchicalRNNOptimizer(params, weights=lopt, backend="eager")
    _frozen_run(2, 0, opt, params)
    sd = copy.deepcopy(opt.state_dict())  # state_dict() holds the live buffers, as torch.optim's do
    del sd["state"]["hrnn"]["held"]
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = HierarchicalRNNOptimizer(twin_params, weights=lopt, backend="eager")
    twin.load_state_dict(sd)
    assert twin.hrnn_state["held"] == [0, 1, 2, 3]
    _frozen_run(2, 5, opt, params)
    _frozen_run(2, 5, twin, twin_params)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    fewer = HierarchicalRNNOptimizer(list(_model().parameters())[:3], weights=lopt)
    with pytest.raises(ValueError, match="sizes"):
        fewer.load_state_dict(sd)


# ---------------------------------------------------------------------------------- foreign state, state_dtype


def _adam_state_dict(params: list[torch.Tensor], steps: int) -> dict:
    adam = torch.optim.Adam(params, lr=1e-3)
    for i in range(steps):
        _set_grads(params, i)
        adam.step()
    return adam.state_dict()


@pytest.mark.parametrize("adam_steps", [0, 2])
@pytest.mark.parametrize("own_steps", [0, 2])
def test_load_state_dict_refuses_another_optimizers_state(lopt, adam_steps: int, own_steps: int) -> None:
    params = list(_model().parameters())
    foreign = _adam_state_dict(list(_model(1).parameters()), adam_steps)
    opt = HierarchicalRNNOptimizer(params, weights=lopt, lr=0.5, backend="eager")
    for i in range(own_steps):
        _set_grads(params, i)
        opt.step()
    before = opt.state_dict()
    match = "not written by HierarchicalRNNOptimizer" + (".*exp_avg" if adam_steps else "") + ".*betas"
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(foreign)
    # Nothing changed: the lr multiplier is still ours, not Adam's 0.001.
    assert [g["lr"] for g in opt.param_groups] == [0.5]
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()


def test_load_state_dict_accepts_its_own_state_through_torch_save(lopt) -> None:
    params = list(_model().parameters())
    opt = HierarchicalRNNOptimizer(params, weights=lopt, lr=0.5, backend="eager")
    fresh = HierarchicalRNNOptimizer(list(_model().parameters()), weights=lopt, lr=0.9, backend="eager")
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # before the first step: no flat state yet, only the marker says whose it is
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="found keys"):
        fresh.load_state_dict({"model": {}})


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8, torch.float16])
def test_state_dtype_must_be_floating(dtype: torch.dtype) -> None:
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"Invalid state_dtype=torch\.\w+.*torch\.bfloat16"):
        HierarchicalRNNOptimizer([p], weights=HierarchicalRNN(), state_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_accepted_state_dtype_steps(dtype: torch.dtype) -> None:
    params = list(_model().parameters())
    opt = HierarchicalRNNOptimizer(params, weights=HierarchicalRNN(), state_dtype=dtype, backend="eager")
    start = [p.detach().clone() for p in params]
    for i in range(3):
        _set_grads(params, i)
        opt.step()
    assert opt.hrnn_state["h_param"].dtype == dtype
    assert all(torch.isfinite(p).all() and not torch.equal(p, s) for p, s in zip(params, start))


# ---------------------------------------------------------------------------------- non-finite updates


def _mse(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return nn.functional.mse_loss(model(torch.randn(8, 6, generator=gen)), torch.randn(8, 3, generator=gen))


@pytest.mark.parametrize("lr", [1e30, 1e38, float("inf")])
@pytest.mark.parametrize("attention", [True, False])
def test_huge_lr_never_writes_nonfinite_parameters(lr: float, attention: bool) -> None:
    model = _model()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=HierarchicalRNN(attention=attention), lr=lr)
    # lr=1e30 takes a finite first step to about 1e27, after which the gradients overflow instead.
    with pytest.warns(RuntimeWarning, match="non-finite gradient|update was not finite") as record:
        for i in range(6):
            opt.zero_grad()
            _mse(model, i).backward()
            opt.step()
            assert all(torch.isfinite(p).all() for p in model.parameters()), f"step {i}"
            assert all(torch.isfinite(v).all() for v in opt.hrnn_state.values() if isinstance(v, torch.Tensor))
    assert opt.skipped_steps >= 1
    for kind in ("non-finite gradient", "update was not finite"):
        assert len([w for w in record if kind in str(w.message)]) <= 1  # once, then counted
    opt.eval()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skipped_update_is_as_if_the_step_never_happened(lopt) -> None:
    params = list(_model().parameters())
    opt = HierarchicalRNNOptimizer(params, weights=lopt, backend="eager")
    for i in range(2):
        _set_grads(params, i)
        opt.step()
    twin = copy.deepcopy(opt)
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    opt.param_groups[0]["lr"] = float("inf")
    _set_grads(params, 2)
    with pytest.warns(RuntimeWarning, match="update was not finite"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    after = opt.state_dict()
    for k, v in before["state"]["hrnn"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(after["state"]["hrnn"][k], v), k
    # Back to a sane lr, the optimizer continues exactly like one that never saw the skipped step.
    opt.param_groups[0]["lr"] = 1.0
    for i in range(3, 6):
        _set_grads(params, i)
        _set_grads(twin.params, i)
        opt.step()
        twin.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin.params))


@pytest.mark.parametrize("dtype, lr", [(torch.float16, 1e30), (torch.bfloat16, float("inf"))])
def test_update_past_a_half_precision_limit_is_skipped(dtype: torch.dtype, lr: float) -> None:
    limit = torch.finfo(dtype).max
    p = nn.Parameter(torch.full((4, 5), limit * 0.99, dtype=dtype))
    q = nn.Parameter(torch.randn(5))  # a float32 parameter next to it: mixed precision
    opt = HierarchicalRNNOptimizer([p, q], weights=HierarchicalRNN(), lr=lr)
    p.grad = torch.ones_like(p)
    q.grad = torch.ones_like(q)
    with pytest.warns(RuntimeWarning, match="update was not finite"):
        opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(p, torch.full_like(p, limit * 0.99)) and torch.isfinite(q).all()


def test_gradients_too_large_for_the_mean_squares_are_skipped(lopt) -> None:
    params = list(_model().parameters())
    opt = HierarchicalRNNOptimizer(params, weights=lopt)
    values = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 1e30)  # finite, but its square is not in float32
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(p, v) for p, v in zip(params, values))
    assert all(torch.isfinite(v).all() for v in opt.hrnn_state.values() if isinstance(v, torch.Tensor))


def test_an_unforeseen_nonfinite_in_place_step_restarts_the_state(lopt, monkeypatch) -> None:
    params = list(_model().parameters())
    opt = HierarchicalRNNOptimizer(params, weights=lopt, backend="eager")
    _set_grads(params, 0)
    opt.step()
    monkeypatch.setattr(HierarchicalRNNOptimizer, "_may_overflow", lambda self, *args: False)
    values = [p.detach().clone() for p in params]
    opt.param_groups[0]["lr"] = float("inf")
    _set_grads(params, 1)
    with pytest.warns(RuntimeWarning, match="update was not finite"):
        opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(p, v) for p, v in zip(params, values))
    assert all(torch.isfinite(v).all() for v in opt.hrnn_state.values() if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------------------------- EvalWithTrueParameters forgotten


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 2)
        gen = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(32, 4, generator=gen), torch.randn(32, 2, generator=gen))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=16)

    def configure_optimizers(self):
        return HierarchicalRNNOptimizer(self.parameters(), weights=HierarchicalRNN())


def _fit(tmp_path, callbacks: list, precision: str = "32-true") -> list[str]:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=callbacks, precision=precision,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(_Tiny())
    return [str(w.message) for w in record if "EvalWithTrueParameters" in str(w.message)]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_trainer_without_eval_callback_warns_once_saying_what_to_add(tmp_path, precision: str) -> None:
    messages = _fit(tmp_path, [], precision)
    assert len(messages) == 1  # eight steps, one warning
    assert "callbacks=[EvalWithTrueParameters()]" in messages[0]


def test_trainer_with_eval_callback_does_not_warn(tmp_path) -> None:
    assert _fit(tmp_path, [EvalWithTrueParameters()]) == []


def test_plain_torch_closure_does_not_warn(lopt) -> None:
    model = _model()
    opt = HierarchicalRNNOptimizer(model.parameters(), weights=lopt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(2):
            opt.zero_grad()
            opt.step(lambda: _mse(model, i).backward())


# ---------------------------------------------------------------------------------- fuzz

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_WEIGHTS = {True: HierarchicalRNN(), False: HierarchicalRNN(attention=False)}
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_SHAPES = [(), (0,), (3, 0), (1,), (7,), (4, 5), (2, 3, 4, 5)]


@st.composite
def _tensor_specs(draw: Any) -> dict:
    shape = draw(st.sampled_from(_SHAPES))
    layouts = ["contiguous"]
    if len(shape) == 2:
        layouts.append("transposed")
    if len(shape) == 4:
        layouts.append("channels_last")
    if len(shape) >= 1 and shape[0] > 1:
        layouts.append("strided")
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(_DTYPES)),
        layout=draw(st.sampled_from(layouts)),
        grad_log10=draw(st.floats(-30, 30)),
        zero_grad=draw(st.booleans()),
        has_grad=draw(st.sampled_from([True, True, True, False])),
    )


def _make_param(spec: dict, gen: torch.Generator) -> nn.Parameter:
    shape, dtype = spec["shape"], spec["dtype"]
    if spec["layout"] == "transposed":
        value = torch.randn(shape[::-1], generator=gen).to(dtype).t()
    elif spec["layout"] == "channels_last":
        value = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    elif spec["layout"] == "strided":
        value = torch.randn((2 * shape[0],) + shape[1:], generator=gen).to(dtype)[::2]
    else:
        value = torch.randn(shape, generator=gen).to(dtype)
    return nn.Parameter(value)


def _grad_for(p: torch.Tensor, spec: dict, gen: torch.Generator) -> torch.Tensor:
    if spec["zero_grad"]:
        return torch.zeros_like(p)
    sign = torch.randn(p.shape, generator=gen).sign()
    scale = 10.0 ** spec["grad_log10"]
    return (sign * scale * (1 + torch.rand(p.shape, generator=gen))).to(p.dtype)  # may round to 0 or inf


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(_tensor_specs(), min_size=1, max_size=4),
    attention=st.booleans(),
    lr=st.sampled_from([0.0, 1e-3, 1.0, 1e3, 1e30]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    two_groups=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_never_writes_a_nonfinite_parameter(specs, attention, lr, weight_decay, two_groups, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = [_make_param(s, gen) for s in specs]
    half = len(params) // 2
    groups = [{"params": params[:half]}, {"params": params[half:], "lr": lr / 2}] if two_groups and half else [
        {"params": params}
    ]
    opt = HierarchicalRNNOptimizer(groups, weights=_WEIGHTS[attention], lr=lr, weight_decay=weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip warnings
        for _ in range(3):
            for p, s in zip(params, specs):
                p.grad = _grad_for(p, s, gen) if s["has_grad"] else None
            before = [p.detach().clone() for p in params]
            opt.step()
            for p, b, s in zip(params, before, specs):
                assert torch.isfinite(p).all(), s
                assert p.dtype == s["dtype"] and p.shape == s["shape"]
                if p.grad is None:
                    assert torch.equal(p, b)
                if s["layout"] == "channels_last":
                    assert p.is_contiguous(memory_format=torch.channels_last)
        opt.eval()
        assert all(torch.isfinite(p).all() for p in params)
        opt.train()


def test_a_thousand_all_zero_gradients_keep_parameters_finite() -> None:
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5, dtype=torch.float16))]
    opt = HierarchicalRNNOptimizer(params, weights=_WEIGHTS[True], backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip: zero gradients are finite
        for _ in range(1000):
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(v).all() for v in opt.hrnn_state.values() if isinstance(v, torch.Tensor))


def test_a_parameter_in_two_groups_is_a_clear_error() -> None:
    p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        HierarchicalRNNOptimizer([{"params": [p, q]}, {"params": [p]}], weights=_WEIGHTS[True])
    opt = HierarchicalRNNOptimizer([q], weights=_WEIGHTS[True])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [q]})


def test_zero_dim_parameters_step_and_zero_element_ones_hold_no_state() -> None:
    scalar = nn.Parameter(torch.tensor(2.0))
    empty = nn.Parameter(torch.zeros(3, 0))
    late = nn.Parameter(torch.zeros(0))
    opt = HierarchicalRNNOptimizer([empty, scalar], weights=_WEIGHTS[True])
    opt.add_param_group({"params": [late]})
    for _ in range(2):
        scalar.grad, empty.grad, late.grad = torch.tensor(1.0), torch.zeros(3, 0), torch.zeros(0)
        opt.step()
    assert scalar.shape == () and torch.isfinite(scalar) and scalar.item() != 2.0
    assert opt.hrnn_state["held"] == [1] and opt.hrnn_state["sizes"] == [1]
    opt.eval()
    opt.train()
    assert empty.shape == (3, 0) and late.shape == (0,)
    only_empty = HierarchicalRNNOptimizer([empty], weights=_WEIGHTS[True])
    only_empty.step()
    assert only_empty.hrnn_state is None


def test_true_parameters_outside_a_half_precision_range_are_never_swapped_in() -> None:
    """Found by the fuzz test: the true parameters (kept in float32) grew past float16's range while
    the attended point stayed inside it, and eval() then wrote infinity into the model."""
    p = nn.Parameter(torch.tensor(0.5, dtype=torch.float16))
    opt = HierarchicalRNNOptimizer([p], weights=_WEIGHTS[True], lr=1000.0, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(4):
            p.grad = torch.tensor(1.3, dtype=torch.float16)
            opt.step()
            assert torch.isfinite(p)
    assert opt.skipped_steps >= 1
    opt.eval()
    assert torch.isfinite(p)
