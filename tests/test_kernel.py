"""The fused C++ kernel of the step computes the same update as the eager reference."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import pytest
import torch

from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer, HRNNState, Layout
from lightning_lopt import kernels

# Built once per test session (and cached on disk across sessions by torch's extension loader).
_KERNEL = kernels.cpu_kernel(warn=False)
pytestmark = pytest.mark.skipif(_KERNEL is None, reason="the C++ kernel could not be built here (no compiler?)")

PROBLEMS: dict[str, tuple[list[int], Optional[list[int]]]] = {
    "mixed": ([7, 130, 1, 45, 300, 12, 64], [0, 0, 1, 1, 1, 2, 2]),
    "one": ([1], None),
    "seven": ([7], None),
    "tiles": ([16, 17, 15, 1, 33, 2000], [0, 1, 0, 1, 0, 1]),
}


def _clone(state: HRNNState) -> HRNNState:
    return HRNNState(*(None if t is None else t.clone() for t in state))


def _run(
    lopt: HierarchicalRNN, problem: str, steps: int, backend: str, in_place: bool = False,
    state_dtype: torch.dtype = torch.float32, feature_major: bool = False, **kwargs: Any,
) -> list[tuple[torch.Tensor, HRNNState]]:
    sizes, problems = PROBLEMS[problem]
    layout = Layout.build(sizes, problems)
    gen = torch.Generator().manual_seed(0)
    point = torch.randn(layout.numel, generator=gen)
    state = lopt.init_state(layout, theta=point, generator=torch.Generator().manual_seed(1), dtype=state_dtype)
    if state.theta is not None:
        state = state._replace(theta=point.clone())
    if feature_major:
        state = state._replace(**{k: getattr(state, k).t().contiguous().t() for k in ("h_param", "momentum", "mean_square")})
    lr = torch.linspace(0.5, 1.0, layout.num_tensors)
    trajectory = []
    with torch.no_grad():
        for i in range(steps):
            grad = 0.5 * point + 0.1 * torch.randn(point.shape, generator=torch.Generator().manual_seed(10 + i))
            extra: dict[str, Any] = dict(out=state, out_point=point) if in_place else {}
            out = lopt.step(state, point, grad, layout, lr=lr, weight_decay=0.01, backend=backend, **extra, **kwargs)
            assert lopt.last_backend == backend
            if in_place:
                assert out.state.h_param is state.h_param and out.point is point
            point, state = out.point, out.state
            trajectory.append((point.clone(), _clone(state)))
    return trajectory


def _assert_same(a: list, b: list, rtol: float = 2e-5, atol: float = 2e-5) -> None:
    for (pa, sa), (pb, sb) in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol)
        for name, ta, tb in zip(HRNNState._fields, sa, sb):
            if ta is None:
                assert tb is None, name
                continue
            assert ta.dtype == tb.dtype, name
            torch.testing.assert_close(ta.float(), tb.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("attention", [True, False])
def test_kernel_equals_eager(problem: str, attention: bool) -> None:
    lopt = HierarchicalRNN(attention=attention)
    _assert_same(_run(lopt, problem, 5, "eager", chunk_size=0), _run(lopt, problem, 5, "cpp"))


@pytest.mark.parametrize("problem", ["mixed", "tiles"])
def test_kernel_with_trust_ratio_equals_eager(problem: str) -> None:
    """The bound's per-tensor norms come from the kernel's segment sums on the fast path."""
    bound, free = HierarchicalRNN(max_update_ratio=1e-6), HierarchicalRNN()
    cpp = _run(bound, problem, 4, "cpp")
    _assert_same(_run(bound, problem, 4, "eager", chunk_size=0), cpp)
    assert not torch.allclose(_run(free, problem, 4, "cpp")[-1][0], cpp[-1][0])  # the bound binds here


def test_segment_sums_equal_a_scatter() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 0, 17, 1, 40, 0, 2]  # empty segments, as a shard of a tensor may be
    x, y = torch.randn(sum(sizes), generator=gen), torch.randn(sum(sizes), generator=gen)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    starts = torch.tensor([0] + sizes).cumsum(0)
    for square in (True, False):
        f = (lambda v: v.square()) if square else (lambda v: v)
        expected = torch.zeros(len(sizes), 2).index_add(0, ids, torch.stack([f(x), f(y)], 1))
        torch.testing.assert_close(_KERNEL.segment_sums([x, y], starts, square), expected)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature_major", [False, True])
def test_alignment_sums_equal_a_double_precision_reference(state_dtype: torch.dtype, feature_major: bool) -> None:
    """The step gain's per-tensor sums: sum g x_s, sum x_s^2 and sum g^2 with x_s = m_s / sqrt(v_s + eps),
    for every timescale, in either layout of the state and with empty tensors."""
    gen = torch.Generator().manual_seed(0)
    sizes, k, eps = [5, 0, 33, 1, 70], 4, 1e-16
    n = sum(sizes)
    g = torch.randn(n, generator=gen)
    m = (0.1 * torch.randn(n, k, generator=gen)).to(state_dtype)
    v = (0.01 + torch.rand(n, k, generator=gen)).to(state_dtype)
    if feature_major:
        m, v = m.t().contiguous().t(), v.t().contiguous().t()
    starts = torch.tensor([0] + sizes).cumsum(0)
    x = m.double() / torch.sqrt(v.double() + eps)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    gd = g.double()
    expected = torch.zeros(len(sizes), 2 * k + 1, dtype=torch.float64).index_add(
        0, ids, torch.cat([gd.unsqueeze(1) * x, x.square(), gd.square().unsqueeze(1)], 1))
    got = _KERNEL.alignment_sums(g, m, v, starts, eps)
    assert got.shape == (len(sizes), 2 * k + 1) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)  # float32 products
    assert torch.equal(got[1], torch.zeros(2 * k + 1))


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("problem", ["tiles", "one", "mixed"])
def test_kernel_feature_major_state(problem: str, in_place: bool, state_dtype: torch.dtype) -> None:
    """The optimizer keeps each column of the per-element matrices contiguous; the kernel reads and
    writes that layout to the same values as the row-major one, and keeps the layout."""
    lopt = HierarchicalRNN()
    rows = _run(lopt, problem, 4, "cpp", state_dtype=state_dtype)
    cols = _run(lopt, problem, 4, "cpp", in_place=in_place, state_dtype=state_dtype, feature_major=True)
    _assert_same(rows, cols, rtol=0.0, atol=0.0)
    for name in ("h_param", "momentum", "mean_square"):
        t = getattr(cols[-1][1], name)
        assert t.t().is_contiguous() and (t.shape[0] == 1 or t.stride(0) == 1), name
    if state_dtype == torch.float32:
        _assert_same(_run(lopt, problem, 4, "eager", chunk_size=0, feature_major=True), cols)


@pytest.mark.parametrize("attention", [True, False])
def test_kernel_in_place_equals_eager(attention: bool) -> None:
    lopt = HierarchicalRNN(attention=attention)
    _assert_same(_run(lopt, "tiles", 4, "eager", chunk_size=0), _run(lopt, "tiles", 4, "cpp", in_place=True))


@pytest.mark.parametrize(
    "config",
    [
        dict(num_timescales=1),
        dict(num_timescales=4, param_units=10, attention=False),
        dict(param_units=3, num_timescales=2, tensor_units=5, global_units=4),
        dict(param_units=16, num_timescales=3),
        dict(param_units=10, num_timescales=5),
    ],
)
def test_kernel_other_sizes(config: dict[str, Any]) -> None:
    lopt = HierarchicalRNN(**config)
    for problem in ("mixed", "seven"):
        _assert_same(_run(lopt, problem, 4, "eager", chunk_size=0), _run(lopt, problem, 4, "cpp"))


def test_kernel_with_trained_like_weights() -> None:
    """Larger read-outs than the initialisation: learning rates and decays move every step."""
    lopt = HierarchicalRNN()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (lopt.w_log_lr, lopt.w_beta_in, lopt.w_beta_sc, lopt.b_log_lr):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    _assert_same(_run(lopt, "mixed", 6, "eager", chunk_size=0), _run(lopt, "mixed", 6, "cpp"), rtol=1e-4, atol=1e-4)


def test_kernel_bf16_state_equals_eager() -> None:
    """bf16 state: the same rounding of every stored value, so the paths agree to bf16 precision."""
    lopt = HierarchicalRNN()
    eager = _run(lopt, "mixed", 3, "eager", state_dtype=torch.bfloat16, chunk_size=0)
    cpp = _run(lopt, "mixed", 3, "cpp", state_dtype=torch.bfloat16)
    _assert_same(eager, cpp, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_threads_equal(threads: int) -> None:
    """Large enough to split over threads; every thread count gives the eager result."""
    lopt = HierarchicalRNN()
    PROBLEMS["large"] = ([5000, 3, 20000, 9001], [0, 0, 1, 1])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        _assert_same(_run(lopt, "large", 2, "eager", chunk_size=0), _run(lopt, "large", 2, "cpp"))
    finally:
        torch.set_num_threads(before)
        PROBLEMS.pop("large")


def test_kernel_result_does_not_depend_on_thread_count() -> None:
    lopt = HierarchicalRNN()
    PROBLEMS["large"] = ([5000, 3, 20000, 9001], [0, 0, 1, 1])
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(_run(lopt, "large", 2, "cpp"))
    finally:
        torch.set_num_threads(before)
        PROBLEMS.pop("large")
    _assert_same(runs[0], runs[1], rtol=0.0, atol=0.0)


def test_auto_picks_kernel_only_where_it_applies() -> None:
    lopt = HierarchicalRNN()
    layout = Layout.build([10, 5])
    point = torch.randn(15)
    state = lopt.init_state(layout, theta=point)
    with torch.no_grad():
        lopt.step(state, point, point, layout)
        assert lopt.last_backend == "cpp"
        assert lopt.step(state, point, point, layout, diagnostics=True).diagnostics is not None
        assert lopt.last_backend == "cpp"  # diagnostics no longer force the slow reference
        lopt.double().step(HRNNState(*(None if t is None else t.double() for t in state)), point.double(),
                           point.double(), layout, backend="cpp")
        assert lopt.last_backend == "eager"
    with pytest.raises(ValueError, match="backend"):
        lopt.step(state, point, point, layout, backend="fast")


@pytest.mark.parametrize("cached", [False, True])
def test_auto_backend_does_not_depend_on_the_cache(monkeypatch: pytest.MonkeyPatch, cached: bool) -> None:
    """A small model steps with the same backend, so to the same result, on a fresh machine and a warm one."""
    monkeypatch.setattr(kernels, "cpu_kernel_cached", lambda: cached)
    lopt = HierarchicalRNN()
    layout = Layout.build([100, 20])
    point = torch.randn(120, generator=torch.Generator().manual_seed(0))

    def fresh() -> HRNNState:
        return lopt.init_state(layout, theta=point, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        out = lopt.step(fresh(), point, point, layout)
        assert lopt.last_backend == "cpp"
        reference = lopt.step(fresh(), point, point, layout, backend="cpp")
    assert torch.equal(out.point, reference.point)


def test_build_failure_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.cpp_extension as cpp_extension

    def broken_load(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken_load)
    monkeypatch.setattr(kernels, "cpu_kernel_cached", lambda: False)  # else the cached build is imported
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failed", False)
    lopt = HierarchicalRNN()
    reference = _run(lopt, "mixed", 2, "eager", chunk_size=0)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ kernel") as record:
        sizes, problems = PROBLEMS["mixed"]
        layout = Layout.build(sizes, problems)
        point = torch.randn(layout.numel, generator=torch.Generator().manual_seed(0))
        state = lopt.init_state(layout, theta=point, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for _ in range(2):
                out = lopt.step(state, point, point, layout, backend="cpp")
                assert lopt.last_backend == "eager"
                state, point = out.state, out.point
    assert len([w for w in record if "C++ kernel" in str(w.message)]) == 1
    assert kernels.cpu_kernel_failed()
    del reference


def _optimizer_run(backend: str, state_dtype: Optional[torch.dtype] = None, steps: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(20, 30), (30,), (5, 7), (1,)]]
    opt = HierarchicalRNNOptimizer(params, weights=HierarchicalRNN(), backend=backend, state_dtype=state_dtype)
    for i in range(steps):
        for j, p in enumerate(params):
            # Tensor 2 has no gradient at step 2: the optimizer then steps a sub-layout.
            p.grad = None if (i == 2 and j == 2) else 0.3 * p.detach() + 0.05 * torch.randn(p.shape, generator=gen)
        opt.step()
        assert opt.lopt.last_backend == backend
    opt.eval()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_optimizer_kernel_equals_eager(state_dtype: Optional[torch.dtype]) -> None:
    eager = _optimizer_run("eager", state_dtype)
    cpp = _optimizer_run("cpp", state_dtype)
    tol = 1e-5 if state_dtype is None else 2e-2
    for a, b in zip(eager, cpp):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_optimizer_backend_argument() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert HierarchicalRNNOptimizer([p], weights=HierarchicalRNN(), backend="eager").backend == "eager"
        assert HierarchicalRNNOptimizer([p], weights=HierarchicalRNN()).backend == "auto"
        with pytest.raises(TypeError, match="compile"):
            HierarchicalRNNOptimizer([p], weights=HierarchicalRNN(), compile=True)
        with pytest.raises(ValueError, match="backend"):
            HierarchicalRNNOptimizer([p], weights=HierarchicalRNN(), backend="gpu")
