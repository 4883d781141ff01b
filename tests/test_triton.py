"""The Triton kernels of the step compute the same update as the eager reference.

Without a GPU they run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, which
tests/conftest.py sets before Triton is first imported). The interpreter takes tens of
milliseconds per tile, so the problems are small and the tiles are 32 elements, two per program:
sizes that are not a multiple of either, tensors of one element, several problems in one vector.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install 'lightning-lopt[gpu]')")

from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer, HRNNState, Layout  # noqa: E402
from lightning_lopt import hrnn  # noqa: E402
from lightning_lopt.kernels import dispatch, triton_step  # noqa: E402

DEVICE = torch.device("cpu" if triton_step.INTERPRETED else "cuda")
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError(
        "Triton was imported without TRITON_INTERPRET=1 on a machine without a GPU: its kernels cannot run. "
        "Set TRITON_INTERPRET=1 before anything imports triton (tests/conftest.py does)."
    )

RTOL, ATOL = 1e-5, 1e-6
PROBLEMS: dict[str, tuple[list[int], Optional[list[int]]]] = {
    # Three problems; 100 elements make two programs of two tiles, the last one partial.
    "mixed": ([7, 45, 1, 100, 33, 64], [0, 0, 1, 1, 1, 2]),
    "one": ([1], None),
    "odd": ([97], None),
}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(triton_step, "BLOCK", 32)
    monkeypatch.setattr(triton_step, "SPAN_BLOCKS", 2)


def _clone(state: HRNNState) -> HRNNState:
    return HRNNState(*(None if t is None else t.clone() for t in state))


def _run(
    lopt: HierarchicalRNN, problem: str, steps: int, backend: str, state_dtype: torch.dtype = torch.float32,
    diagnostics: bool = True,
) -> list[tuple[torch.Tensor, HRNNState, Any]]:
    """Steps in place, as the optimizer takes them (the eager path then runs chunk by chunk)."""
    sizes, problems = PROBLEMS[problem]
    layout = Layout.build(sizes, problems, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    point = torch.randn(layout.numel, generator=gen).to(DEVICE)
    state = lopt.init_state(layout, theta=point, generator=torch.Generator().manual_seed(1), dtype=state_dtype)
    if state.theta is not None:  # the optimizer keeps the true parameters in float32
        state = state._replace(theta=point.clone())
    lr = torch.linspace(0.5, 1.0, layout.num_tensors, device=DEVICE)
    trajectory = []
    with torch.no_grad():
        for i in range(steps):
            noise = torch.randn(point.shape, generator=torch.Generator().manual_seed(10 + i)).to(DEVICE)
            grad = 0.5 * point + 0.1 * noise
            out = lopt.step(state, point, grad, layout, lr=lr, weight_decay=0.01, diagnostics=diagnostics,
                            backend=backend, chunk_size=64, out=state, out_point=point)
            assert lopt.last_backend == backend
            assert out.state.h_param is state.h_param and out.point is point
            assert (out.diagnostics is not None) == diagnostics
            trajectory.append((point.clone(), _clone(out.state), out.diagnostics))
    return trajectory


def _assert_close(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype, name
    # bfloat16 state is compared as stored: both paths round the same float32 values to nearest even.
    a, b = a.float().cpu(), b.float().cpu()
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def _assert_same(a: list, b: list) -> None:
    for (pa, sa, da), (pb, sb, db) in zip(a, b, strict=True):
        _assert_close("point", pa, pb)
        for name, ta, tb in zip(HRNNState._fields, sa, sb):
            if ta is None:
                assert tb is None, name
            else:
                _assert_close(name, ta, tb)
        if da is not None:
            for name in ("beta_in", "beta_sc", "update", "attention_offset", "theta", "h_tensor", "h_global"):
                _assert_close(f"diagnostics.{name}", getattr(da, name), getattr(db, name))
            # Recovered from the smoothed log lr, which cancels digits: still ~1e-6 relative of ~10.
            torch.testing.assert_close(da.log_step_size, db.log_step_size, rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attention", [True, False], ids=["attention", "no_attention"])
def test_triton_step_equals_eager(attention: bool, state_dtype: torch.dtype) -> None:
    """Several problems in one flat vector, odd sizes, in-place steps, with diagnostics."""
    lopt = HierarchicalRNN(attention=attention).to(DEVICE)
    _assert_same(_run(lopt, "mixed", 3, "triton", state_dtype), _run(lopt, "mixed", 3, "eager", state_dtype))


@pytest.mark.parametrize("problem", ["one", "odd"])
def test_triton_step_without_diagnostics(problem: str) -> None:
    """One tensor of one element, and one of 97 (three full tiles and one of a single element)."""
    lopt = HierarchicalRNN().to(DEVICE)
    triton_run = _run(lopt, problem, 2, "triton", diagnostics=False)
    assert all(d is None for _, _, d in triton_run)
    _assert_same(triton_run, _run(lopt, problem, 2, "eager", diagnostics=False))


@pytest.mark.parametrize("feature_major", [False, True])
def test_triton_element_kernel_equals_reference(feature_major: bool) -> None:
    """The element kernel alone against ``_element_update`` from a state far from its initial one
    (decays, accumulators and hidden state all non-trivial), with its per-tensor sums."""
    lopt = HierarchicalRNN().to(DEVICE)
    layout = Layout.build(*PROBLEMS["mixed"], device=DEVICE)
    n, t = layout.numel, layout.num_tensors
    gen = torch.Generator().manual_seed(3)

    def rand(*shape: int, scale: float = 1.0, positive: bool = False) -> torch.Tensor:
        x = torch.rand(*shape, generator=gen) if positive else torch.randn(*shape, generator=gen)
        return (scale * x).to(DEVICE)

    state = lopt.init_state(layout, theta=rand(n))._replace(
        h_param=rand(n, 10, scale=0.5), momentum=rand(n, 4, scale=0.1), mean_square=rand(n, 4, scale=0.1, positive=True),
        beta_in=rand(n, positive=True), beta_sc=rand(n, positive=True),
    )
    if feature_major:
        state = state._replace(**{k: getattr(state, k).t().contiguous().t() for k in ("h_param", "momentum", "mean_square")})
    table = torch.cat([rand(t, 30, scale=0.3), rand(t, 1), rand(t, 1, positive=True) + 0.5], 1)
    grad = rand(n)
    cst = lopt._constants()
    with torch.no_grad():
        weights = lopt._element_weights(torch.float32)
        ref = hrnn._element_update(cst, weights, grad, state.h_param, state.momentum, state.mean_square, state.beta_in,
                                   state.beta_sc, state.log_lr, layout.tensor_ids, table, unrolled=False)
        new = hrnn._empty_like_state(state)
        ud, ua = torch.empty(n, device=DEVICE), torch.empty(n, device=DEVICE)
        sums = triton_step.element_update(layout.sizes, grad, state, new, ud, ua, table, weights, 10, 4, True,
                                          cst.ms_epsilon, cst.epsilon, cst.log_lr_low, cst.log_lr_high)
    got = [new.h_param, new.momentum, new.mean_square, new.beta_in, new.beta_sc, new.log_lr, None, ud, ua]
    for name, a, b in zip(["h", "momentum", "mean_square", "beta_in", "beta_sc", "log_lr", "", "ud", "ua"], got, ref):
        if a is not None:
            _assert_close(name, a, b)
    ref_sums = torch.zeros(t, ref[-1].shape[1], device=DEVICE).index_add_(0, layout.tensor_ids, ref[-1])
    torch.testing.assert_close(sums, ref_sums, rtol=RTOL, atol=1e-5)


def test_optimizer_triton_backend_bf16_state() -> None:
    """The optimizer's layout (feature-major bfloat16 state, float32 true parameters) on the
    Triton path equals its eager path."""

    def run(backend: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in ((5, 7), (3,), (41,))]
        opt = HierarchicalRNNOptimizer(params, weights=HierarchicalRNN(), backend=backend, state_dtype=torch.bfloat16)
        for i in range(3):
            for j, p in enumerate(params):
                p.grad = torch.sin(p.detach() * (i + j + 1))
            opt.step()
            assert opt.lopt.last_backend == backend
        return [p.detach().clone() for p in params] + [opt.hrnn_state[k].float() for k in ("h_param", "log_lr", "theta")]

    for a, b in zip(run("triton"), run("eager"), strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_auto_picks_triton_only_on_a_gpu() -> None:
    lopt = HierarchicalRNN()
    layout = Layout.build([5, 3])
    point = torch.randn(8)
    state = lopt.init_state(layout, theta=point)
    with torch.no_grad():
        lopt.step(state, point, torch.randn(8), layout, backend="auto")
    assert lopt.last_backend != "triton"


def test_triton_unavailable_falls_back_with_one_warning(monkeypatch) -> None:
    """Where Triton cannot be imported, "auto" on a GPU and "triton" anywhere run eagerly and warn once."""
    monkeypatch.setattr(triton_step, "AVAILABLE", False)
    monkeypatch.setattr(dispatch, "_TRITON_WARNED", set())

    class OnGpu:  # only the device is read before the fallback
        device = torch.device("cuda")

    state: Any = None
    with pytest.warns(RuntimeWarning, match="Triton is not installed"):
        assert dispatch._triton_kernels("auto", state, OnGpu(), OnGpu(), None, torch.float32) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch._triton_kernels("triton", state, OnGpu(), OnGpu(), None, torch.float32) is None
        assert dispatch._triton_kernels("eager", state, OnGpu(), OnGpu(), None, torch.float32) is None
    lopt = HierarchicalRNN()
    layout = Layout.build([4])
    point = torch.randn(4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lopt.step(lopt.init_state(layout, theta=point), point, point, layout, backend="triton")
    assert lopt.last_backend != "triton"


def test_triton_backend_is_listed() -> None:
    from lightning_lopt.optimizer import BACKENDS

    assert "triton" in BACKENDS and "triton" in dispatch._BACKENDS
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


_COMPILE_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lightning_lopt.kernels import triton_step as ts

target = GPUTarget("cuda", 90, 32)
state = {"h_ptr", "m_ptr", "v_ptr", "bi_ptr", "bs_ptr", "ll_ptr", "oh_ptr", "om_ptr", "ov_ptr", "obi_ptr", "obs_ptr",
         "oll_ptr"}
consts = dict(H=10, K=4, HP=16, FP=16, OP=16, ATTENTION=True, BF16=True, PRECISION=ts.DOT_PRECISION, BLOCK=ts.BLOCK)
sig = {}
for name in ts._element_kernel.arg_names:
    if name in consts:
        sig[name] = "constexpr"
    elif name.endswith("_ptr"):
        sig[name] = "*bf16" if name in state else "*i64" if name.startswith("span_") else "*fp32"
    else:
        sig[name] = "fp32" if name in ("keep", "offset", "ms_eps", "eps", "low", "high") else "i64"
k = triton.compile(ASTSource(fn=ts._element_kernel, signature=sig, constexprs=consts), target=target,
                   options={"num_warps": ts.NUM_WARPS})
assert k.asm["cubin"]
sig = {n: "constexpr" if n in ("ATTENTION", "BLOCK") else "*i64" if n.startswith("span_") else "*fp32"
       for n in ts._apply_kernel.arg_names}
k = triton.compile(ASTSource(fn=ts._apply_kernel, signature=sig, constexprs=dict(ATTENTION=True, BLOCK=ts.BLOCK)),
                   target=target)
assert k.asm["cubin"]
print("compiled")
"""


def test_kernels_compile_for_a_gpu() -> None:
    """The interpreter runs the kernels' Python; Triton's compiler (with the ptxas its wheel ships)
    must also accept them: compiled for sm_90 (H100/H200), which needs no GPU."""
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
