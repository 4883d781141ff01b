"""Every execution path of the step (unchunked, chunked, in place, compiled, bf16 state) computes
the same update as the unchunked eager reference (the C++ kernel: tests/test_kernel.py)."""

from __future__ import annotations

import shutil
import warnings
from typing import Optional

import pytest
import torch

from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer, HRNNState, Layout
from lightning_lopt import hrnn as hrnn_module
from lightning_lopt.kernels import dispatch

SIZES = [7, 130, 1, 45, 300, 12, 64]
PROBLEMS = [0, 0, 1, 1, 1, 2, 2]


def _setup(lopt: HierarchicalRNN, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Layout, HRNNState, torch.Tensor]:
    layout = Layout.build(SIZES, PROBLEMS)
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(layout.numel, generator=gen, dtype=torch.float64).to(dtype)
    state = lopt.init_state(layout, theta=theta, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return layout, state, theta


def _grad(point: torch.Tensor, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    noise = torch.randn(point.shape, generator=gen, dtype=torch.float64).to(point.dtype)
    return 0.5 * point + 0.1 * noise


def _run(
    lopt: HierarchicalRNN,
    steps: int,
    dtype: torch.dtype = torch.float32,
    in_place: bool = False,
    **kwargs,
) -> list[tuple[torch.Tensor, HRNNState]]:
    kwargs.setdefault("backend", "eager")  # the C++ kernel has its own tests (test_kernel.py)
    layout, state, point = _setup(lopt, dtype)
    state = HRNNState(*(None if t is None else t.clone() for t in state))
    lr = torch.linspace(0.5, 1.0, layout.num_tensors, dtype=dtype)
    trajectory = []
    with torch.no_grad():
        for i in range(steps):
            extra = dict(out=state, out_point=torch.empty_like(point)) if in_place else {}
            out = lopt.step(state, point, _grad(point, i), layout, lr=lr, weight_decay=0.01, **kwargs, **extra)
            point, state = out.point, out.state
            trajectory.append((point.clone(), HRNNState(*(None if t is None else t.clone() for t in state))))
    return trajectory


def _assert_same(a: list, b: list, rtol: float, atol: float) -> None:
    for (pa, sa), (pb, sb) in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol)
        for name, ta, tb in zip(HRNNState._fields, sa, sb):
            if ta is None:
                assert tb is None, name
                continue
            torch.testing.assert_close(ta.float(), tb.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("chunk_size", [7, 37, 1000])
def test_chunked_equals_unchunked(attention: bool, chunk_size: int) -> None:
    lopt = HierarchicalRNN(attention=attention).double()
    reference = _run(lopt, 4, torch.float64, chunk_size=0)
    chunked = _run(lopt, 4, torch.float64, chunk_size=chunk_size)
    _assert_same(reference, chunked, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attention", [True, False])
def test_in_place_equals_functional(attention: bool) -> None:
    lopt = HierarchicalRNN(attention=attention)
    reference = _run(lopt, 4, chunk_size=0)
    in_place = _run(lopt, 4, in_place=True, chunk_size=50)
    _assert_same(reference, in_place, rtol=1e-5, atol=1e-6)
    unchunked_in_place = _run(lopt, 4, in_place=True, chunk_size=0)
    _assert_same(reference, unchunked_in_place, rtol=1e-5, atol=1e-6)


def test_autograd_path_equals_no_grad_path() -> None:
    lopt = HierarchicalRNN().double()
    layout, state, point = _setup(lopt, torch.float64)
    grad = _grad(point, 0)
    with torch.no_grad():
        fast = lopt.step(state, point, grad, layout, chunk_size=33)
    slow = lopt.step(state, point, grad, layout)
    assert slow.point.requires_grad
    torch.testing.assert_close(fast.point, slow.point.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(fast.state, slow.state):
        if a is not None:
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_unrolled_products_equal_matmul() -> None:
    """The compiled kernel's written-out products are the same function as the matmul form."""
    lopt = HierarchicalRNN().double()
    layout, state, point = _setup(lopt, torch.float64)
    cst = lopt._constants()
    w = lopt._element_weights(torch.float64)
    table = torch.randn(layout.num_tensors, 3 * lopt.param_units + 2, dtype=torch.float64)
    args = (_grad(point, 0), state.h_param, state.momentum, state.mean_square, state.beta_in + 0.3,
            state.beta_sc + 0.2, state.log_lr, layout.tensor_ids, table)
    with torch.no_grad():
        a = hrnn_module._element_update(cst, w, *args, unrolled=False)
        b = hrnn_module._element_update(cst, w, *args, unrolled=True)
    for x, y in zip(a, b):
        x = torch.stack(x, 1) if isinstance(x, list) else x
        y = torch.stack(y, 1) if isinstance(y, list) else y
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def _compiler_available() -> bool:
    return shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.skipif(not _compiler_available(), reason="inductor's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("attention", [True, False])
def test_compiled_equals_eager(attention: bool) -> None:
    """One small compilation per case: a narrow architecture keeps the unrolled kernel small."""
    lopt = HierarchicalRNN(param_units=3, num_timescales=2, tensor_units=5, global_units=4, attention=attention)
    reference = _run(lopt, 3, chunk_size=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback to eager would not test compile
        compiled = _run(lopt, 3, in_place=True, chunk_size=64, backend="compiled")
    assert not dispatch._CompiledKernel.failed
    _assert_same(reference, compiled, rtol=1e-4, atol=1e-5)


def test_compile_failure_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(dispatch, "_KERNELS", {})
    monkeypatch.setattr(dispatch._CompiledKernel, "failed", False)
    lopt = HierarchicalRNN()
    reference = _run(lopt, 2, chunk_size=0)
    with pytest.warns(RuntimeWarning, match="falling back") as record:
        fallback = _run(lopt, 2, in_place=True, chunk_size=64, backend="compiled")
    assert len([w for w in record if "falling back" in str(w.message)]) == 1
    _assert_same(reference, fallback, rtol=1e-5, atol=1e-6)


def _optimizer_run(state_dtype: Optional[torch.dtype], steps: int = 5, **kwargs) -> tuple[HierarchicalRNNOptimizer, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(20, 30), (30,), (5, 7)]]
    opt = HierarchicalRNNOptimizer(params, weights=HierarchicalRNN(), state_dtype=state_dtype, **kwargs)
    for i in range(steps):
        for p in params:
            p.grad = 0.3 * p.detach() + 0.05 * torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, [p.detach().clone() for p in params]


def test_bf16_state_is_bf16_and_close() -> None:
    opt32, p32 = _optimizer_run(None)
    opt16, p16 = _optimizer_run(torch.bfloat16)
    st = opt16.hrnn_state
    for key in ("h_param", "momentum", "mean_square", "beta_in", "beta_sc", "log_lr", "h_tensor", "h_global"):
        assert st[key].dtype == torch.bfloat16, key
    assert st["theta"].dtype == torch.float32
    n = sum(p.numel() for p in p16)
    state_bytes = sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    assert state_bytes / n <= 48
    for a, b in zip(p32, p16):
        # bf16 keeps 8 bits of mantissa: the trajectories agree to about that over a few steps.
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)


def test_optimizer_chunked_equals_unchunked() -> None:
    _, a = _optimizer_run(None, chunk_size=0, backend="eager")
    _, b = _optimizer_run(None, chunk_size=97, backend="eager")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_fast_paths_return_the_reference_diagnostics(attention, backend):
    """Diagnostics from the chunked, in-place and C++ paths equal the one-chunk reference's."""
    lopt = HierarchicalRNN(attention=attention, seed=2)
    with torch.no_grad():
        lopt.w_log_lr.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    layout, state, point = _setup(lopt)
    lr = torch.linspace(0.5, 1.0, layout.num_tensors)
    grad = _grad(point, 0)
    with torch.no_grad():
        ref = lopt.step(state, point, grad, layout, lr=lr, weight_decay=0.01, diagnostics=True, chunk_size=0,
                        backend="eager").diagnostics
        work = HRNNState(*(None if t is None else t.clone() for t in state))
        fast = lopt.step(work, point.clone(), grad, layout, lr=lr, weight_decay=0.01, diagnostics=True, chunk_size=37,
                         backend=backend, out=work, out_point=torch.empty_like(point)).diagnostics
    assert fast is not None
    for name in ref.__dataclass_fields__:
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=1e-4, atol=2e-5, msg=name)
