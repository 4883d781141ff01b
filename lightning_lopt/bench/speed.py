"""Speed and memory benchmark of the hierarchical RNN optimizer step against Adam.

Run ``python -m lightning_lopt.bench.speed`` (``--help`` for options). It prints markdown tables:

* the optimizer step time (median), optimizer-state bytes per parameter and the step's transient
  peak memory (resident-set growth during one step) for
  :class:`~lightning_lopt.HierarchicalRNNOptimizer` and ``torch.optim.Adam`` (``foreach`` and
  ``fused``), at 1e5, 1e6 and 1e7 parameters, for a realistic mix of tensor shapes and for one big
  tensor;
* the step's achieved GFLOP/s, counting the parameter-level GRU and read-outs (the FLOP count per
  parameter is derived from the architecture and printed), as a fraction of this machine's fp32
  matrix-multiply throughput measured in the same run, round by round (see :func:`time_steps`);
* the MNIST-1D example's whole training step with this optimizer against Adam;
* the meta-training throughput: inner steps per second of the differentiable step, with the
  backward pass through an unroll, on a batch of small problems held in one layout;
* with ``--kernel-times``, the C++ kernel's cold build and warm load times.

Timings on a shared machine are noisy; every figure is a median over interleaved repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import inspect
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from lightning_lopt.hrnn import HierarchicalRNN, Layout
from lightning_lopt.optimizer import HierarchicalRNNOptimizer

__all__ = ["flops_per_parameter", "main", "matmul_peak_gflops", "mixed_shapes", "meta_training_throughput"]


# ---------------------------------------------------------------------------- helpers


def flops_per_parameter(lopt: HierarchicalRNN) -> int:
    """FLOPs per parameter per step in the products of the parameter-level GRU and its read-outs.

    Counts the multiply-adds of the gate and candidate products, the direction, attention, log
    learning rate and decay read-outs and the momentum shortcuts (2 FLOPs each). Element-wise work
    (features, activations) is not counted: it is what the fraction of peak must absorb.
    """
    hp, nf, k = lopt.param_units, lopt.num_features, lopt.num_timescales
    gru = 2 * (nf + hp) * 3 * hp
    readouts = 2 * hp * (4 + int(lopt.attention)) + 2 * k * (1 + int(lopt.attention))
    return gru + readouts


def mixed_shapes(n: int, blocks: int = 4) -> list[tuple[int, ...]]:
    """Parameter shapes of a small transformer-like model with about ``n`` parameters.

    ``blocks`` blocks of width ``w`` (fused qkv, projection, layer norms, a 4x MLP, with biases)
    and a classifier head: about ``12 w^2`` parameters per block in 12 tensors of very different
    sizes, as in real models.
    """
    w = max(4, int(round((-13 + math.sqrt(169 + 48 * n / blocks)) / 24)))
    shapes: list[tuple[int, ...]] = []
    for _ in range(blocks):
        shapes += [(3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,), (4 * w, w), (4 * w,), (w, 4 * w), (w,), (w,), (w,)]
    shapes += [(10, w), (10,)]
    return shapes


def matmul_peak_gflops(size: int = 2048, repeats: int = 7, dtype: torch.dtype = torch.float32) -> float:
    """Best achieved GFLOP/s of a square ``torch.mm`` (all threads): this machine's practical peak."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    return max(_matmul_gflops(a, b) for _ in range(repeats))


def _matmul_gflops(a: torch.Tensor, b: torch.Tensor) -> float:
    """GFLOP/s of one ``a @ b`` of square matrices."""
    t0 = time.perf_counter()
    torch.mm(a, b)
    return 2 * a.shape[0] ** 3 / (time.perf_counter() - t0) / 1e9


def _memory_kib() -> tuple[int, int]:
    """(peak, current) resident set size of this process in KiB (Linux)."""
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return 0, 0
    hwm = re.search(r"VmHWM:\s+(\d+)", text)
    rss = re.search(r"VmRSS:\s+(\d+)", text)
    return (int(hwm.group(1)) if hwm else 0), (int(rss.group(1)) if rss else 0)


_M_MMAP_THRESHOLD = -3  # mallopt parameter of glibc


def _mallopt_mmap_threshold(nbytes: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):
        pass


def _reset_peak_memory() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so one process can measure many peaks.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def step_peak_mib(opt: torch.optim.Optimizer) -> float:
    """Growth of the resident set during one ``opt.step()``, in MiB (Linux and glibc; else 0).

    The kernel raises VmHWM when memory is unmapped, not when heap memory is freed, so for this
    one step every allocation from 128 KiB up is served by its own mapping; afterwards the
    threshold returns to 32 MiB, glibc's ceiling when it adapts it by itself.
    """
    _mallopt_mmap_threshold(128 * 1024)
    try:
        _reset_peak_memory()
        _, rss_before = _memory_kib()
        opt.step()
        peak, _ = _memory_kib()
    finally:
        _mallopt_mmap_threshold(32 * 1024 * 1024)
    return max(0, peak - rss_before) / 1024


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = value.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(opt.state)
    return total


@dataclass
class StepResult:
    """One row of the step table."""

    name: str
    case: str
    numel: int
    num_tensors: int
    step_ms: float
    first_step_s: float
    state_bytes_per_param: float
    peak_mib: float
    gflops: Optional[float] = None
    fraction_of_peak: Optional[float] = None
    matmul_gflops: Optional[float] = None


def _accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def _make_hrnn(**kwargs: Any) -> Optional[Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    lopt = HierarchicalRNN()
    for key in kwargs:
        if not _accepts(HierarchicalRNNOptimizer, key):
            return None  # this version of the optimizer has no such option

    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return HierarchicalRNNOptimizer(params, weights=lopt, **kwargs)

    return make


def optimizer_factories(compile_modes: Sequence[str]) -> list[tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]]:
    """The optimizers to compare, by row name."""
    rows: list[tuple[str, Any]] = [
        ("Adam foreach", lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True)),
        ("Adam fused", lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)),
    ]
    for mode in compile_modes:
        if mode == "default":
            rows.append(("HRNN", _make_hrnn()))
            rows.append(("HRNN bf16 state", _make_hrnn(state_dtype=torch.bfloat16)))
        elif mode == "eager":
            rows.append(("HRNN eager", _make_hrnn(backend="eager") or _make_hrnn(compile=False)))
        elif mode == "cpp":
            rows.append(("HRNN cpp", _make_hrnn(backend="cpp")))
            rows.append(("HRNN cpp bf16 state", _make_hrnn(backend="cpp", state_dtype=torch.bfloat16)))
        elif mode == "compiled":
            if _accepts(HierarchicalRNNOptimizer, "backend"):
                rows.append(("HRNN compiled", _make_hrnn(backend="compiled")))
                rows.append(("HRNN compiled bf16 state", _make_hrnn(backend="compiled", state_dtype=torch.bfloat16)))
            else:
                rows.append(("HRNN compiled", _make_hrnn(compile=True)))
                rows.append(("HRNN compiled bf16 state", _make_hrnn(compile=True, state_dtype=torch.bfloat16)))
        elif mode == "unchunked":
            rows.append(("HRNN eager unchunked", _make_hrnn(backend="eager", chunk_size=0)
                         or _make_hrnn(compile=False, chunk_size=0)))
    return [(name, make) for name, make in rows if make is not None]


def time_steps(
    factories: Sequence[tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]],
    shapes: Sequence[tuple[int, ...]],
    case: str,
    warmup: int,
    rounds: int,
    flops_per_param: int,
    matmul_size: int = 2048,
    seed: int = 0,
) -> list[StepResult]:
    """Step times of several optimizers on the same shapes, measured in interleaved rounds.

    Each optimizer gets its own copy of the parameters and fixed random gradients. After the
    first (timed) step and ``warmup`` more, the step's transient memory is measured one optimizer
    at a time. Then every round times one ``matmul_size``-cubed fp32 ``torch.mm`` and one step of
    each optimizer, in an order that alternates between rounds. On a shared machine the speed
    drifts by tens of percent within a minute; pairing each step with a matrix product taken
    moments apart makes the fraction of peak (the median over rounds of the step's GFLOP/s over
    that round's matmul GFLOP/s) a property of the step, not of the machine's load.
    """
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    numel = sum(v.numel() for v in values)
    runs = []
    for name, make in factories:
        params = [torch.nn.Parameter(v.clone()) for v in values]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = make(params)
        t0 = time.perf_counter()
        opt.step()
        first = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            opt.step()
        runs.append((name, opt, params, first, step_peak_mib(opt)))

    a = torch.randn(matmul_size, matmul_size, generator=gen)
    b = torch.randn(matmul_size, matmul_size, generator=gen)
    torch.mm(a, b)
    times: list[list[float]] = [[] for _ in runs]
    mm_gflops: list[float] = []
    for r in range(rounds):
        mm_gflops.append(_matmul_gflops(a, b))
        order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            t0 = time.perf_counter()
            runs[i][1].step()
            times[i].append(time.perf_counter() - t0)

    results = []
    for (name, opt, params, first, peak_mib), ts in zip(runs, times):
        res = StepResult(
            name=name,
            case=case,
            numel=numel,
            num_tensors=len(params),
            step_ms=1e3 * statistics.median(ts),
            first_step_s=first,
            state_bytes_per_param=_state_bytes(opt) / numel,
            peak_mib=peak_mib,
            matmul_gflops=statistics.median(mm_gflops),
        )
        if name.startswith("HRNN"):
            res.gflops = flops_per_param * numel / statistics.median(ts) / 1e9
            res.fraction_of_peak = statistics.median(
                flops_per_param * numel / t / 1e9 / g for t, g in zip(ts, mm_gflops)
            )
        results.append(res)
    return results


def mnist1d_training_step(rounds: int = 300, threads: int = 1, seed: int = 0) -> dict[str, float]:
    """Milliseconds per training step (zero_grad, forward, backward, step) of the MNIST-1D example.

    The model and batch are those of ``configs/mnist1d_hrnn.yaml`` (MLP 40-100-100-10, batch 128,
    one thread); the learned optimizer with its shipped weights against ``torch.optim.Adam`` at its
    defaults, as ``configs/mnist1d_adam.yaml`` uses it, timed in alternation.
    """
    from lightning_lopt.models import MLPClassifier

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(128, 40, generator=gen)
        y = torch.randint(0, 10, (128,), generator=gen)
        runs = {}
        for name in ("HRNN", "Adam"):
            torch.manual_seed(seed)
            model = MLPClassifier(input_dim=40, hidden_dims=[100, 100], num_classes=10)
            opt = HierarchicalRNNOptimizer(model.parameters()) if name == "HRNN" else torch.optim.Adam(model.parameters())
            runs[name] = (model, opt)

        def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        for model, opt in runs.values():
            for _ in range(10):
                step(model, opt)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(rounds):
            for name in (runs if r % 2 == 0 else reversed(list(runs))):
                t0 = time.perf_counter()
                step(*runs[name])
                times[name].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    result = {f"{name} ms": 1e3 * statistics.median(ts) for name, ts in times.items()}
    result["ratio"] = statistics.median(a / b for a, b in zip(times["HRNN"], times["Adam"]))
    return result


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` other processes spinning on the CPU for the duration (what data-loader workers or
    a second job beside a run do to its threads)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them reach the scheduler
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def mnist1d_threads_table(busy: int, rounds: int = 200) -> list[tuple[str, int, dict[str, float]]]:
    """The MNIST-1D training step with one thread (what ``lightning-lopt fit`` picks for a small
    model) and with torch's default, each idle and with ``busy`` spinning processes beside it."""
    default = torch.get_num_threads()
    rows = []
    for label, threads in (("1 (the CLI's auto)", 1), (f"{default} (torch's default)", default)):
        for others in (0, busy):
            with busy_processes(others):
                rows.append((label, others, mnist1d_training_step(rounds=rounds, threads=threads)))
    return rows


def meta_training_throughput(
    lopt: HierarchicalRNN,
    num_problems: int = 8,
    problem_size: int = 3000,
    unroll: int = 16,
    repeats: int = 3,
    seed: int = 0,
) -> float:
    """Inner steps per second of the differentiable step, backward pass through the unroll included.

    ``num_problems`` noisy quadratic problems of about ``problem_size`` parameters each (three
    tensors: a matrix, a vector, a bias) share one layout, as meta-training batches tasks. The
    gradient is a differentiable function of the point, so the backward pass goes through every
    step of the unroll into the meta-parameters.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = max(1, int(math.sqrt(problem_size * 0.9)))
    per = [rows * rows, max(1, problem_size - rows * rows - 16), 16]
    sizes = per * num_problems
    problems = [p for p in range(num_problems) for _ in per]
    layout = Layout.build(sizes, problems)
    n = layout.numel
    curvature = torch.rand(n, generator=gen) * 2.0 + 0.01
    target = torch.randn(n, generator=gen)
    theta0 = torch.randn(n, generator=gen)

    def run_unroll() -> None:
        state = lopt.init_state(layout, theta=theta0, generator=torch.Generator().manual_seed(1))
        point = theta0.clone()
        meta_loss = point.new_zeros(())
        for _ in range(unroll):
            grad = curvature * (point - target)
            out = lopt.step(state, point, grad, layout)
            point, state = out.point, out.state
            theta = state.theta if state.theta is not None else point
            meta_loss = meta_loss + torch.log((curvature * (theta - target) ** 2).sum() + 1e-6)
        lopt.zero_grad(set_to_none=True)
        (meta_loss / unroll).backward()

    with torch.enable_grad():
        run_unroll()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_unroll()
            times.append(time.perf_counter() - t0)
    return unroll / statistics.median(times)


def compile_start_times(size: int, cache_dir: Optional[str] = None) -> Optional[tuple[float, float]]:
    """First-step time of a compiled optimizer in a fresh process with an empty, then a warm cache.

    Returns ``(cold_s, warm_s)``, or None when this version of the optimizer has no ``compile``
    option. Each measurement runs in a new Python process so that only inductor's on-disk cache
    carries over.
    """
    if _accepts(HierarchicalRNNOptimizer, "backend"):
        compile_arg = "backend='compiled'"
    elif _accepts(HierarchicalRNNOptimizer, "compile"):
        compile_arg = "compile=True"
    else:
        return None
    code = (
        "import time, warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer\n"
        f"p = torch.nn.Parameter(torch.randn({size})); p.grad = torch.randn({size})\n"
        f"opt = HierarchicalRNNOptimizer([p], weights=HierarchicalRNN(), {compile_arg})\n"
        "t0 = time.perf_counter(); opt.step(); print(time.perf_counter() - t0)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir or tmp)
        found = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            found.append(float(out.stdout.strip().splitlines()[-1]))
    return found[0], found[1]


def kernel_start_times() -> Optional[tuple[float, float]]:
    """Build time of the C++ kernel with an empty extension cache, then its load time from that cache.

    Returns ``(cold_s, warm_s)``, each measured in a fresh Python process (only the on-disk cache
    carries over), or None when this version has no C++ kernel or it does not build here.
    """
    try:
        import lightning_lopt.kernels  # noqa: F401
    except ImportError:
        return None
    code = (
        "import torch, warnings\n"
        "from lightning_lopt.kernels import cpu_kernel, cpu_kernel_build_seconds\n"
        "print(cpu_kernel_build_seconds() if cpu_kernel() is not None else -1.0)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=tmp)
        found = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            found.append(float(out.stdout.strip().splitlines()[-1]))
    if min(found) < 0:
        return None
    return found[0], found[1]


# ---------------------------------------------------------------------------- main


def _parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated parameter counts (default %(default)s)")
    parser.add_argument("--cases", default="mixed,single", help="mixed (transformer-like shapes) and/or single (one tensor)")
    parser.add_argument(
        "--modes",
        default="default",
        help="HRNN variants: default (the optimizer's own choice, fp32 and bf16 state), cpp (the C++ kernel, "
        "fp32 and bf16 state), eager, compiled, unchunked",
    )
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds per size (default: by size)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    parser.add_argument("--no-meta", action="store_true", help="skip the meta-training throughput")
    parser.add_argument("--no-mnist1d", action="store_true", help="skip the MNIST-1D training-step comparison")
    parser.add_argument("--compile-times", action="store_true", help="measure cold and warm compile start-up")
    parser.add_argument(
        "--kernel-times", action="store_true", help="measure the C++ kernel's cold build and warm load in fresh processes"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--busy", type=int, default=0,
                        help="also time the MNIST-1D step with 1 thread and torch's default, idle and with this many "
                             "spinning processes beside it")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message=".*untrained initialisation.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = _parse_sizes(args.sizes)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    lopt = HierarchicalRNN()
    fpp = flops_per_parameter(lopt)
    peak = matmul_peak_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(
        f"FLOPs per parameter per step (param GRU {lopt.num_features}+{lopt.param_units} -> 3x{lopt.param_units} "
        f"and read-outs): {fpp}"
    )
    print(f"fp32 matmul peak (2048^3 torch.mm, best of 7): {peak:.1f} GFLOP/s")
    print(
        "% of peak: median over interleaved rounds of (step GFLOP/s) / (2048^3 torch.mm GFLOP/s timed in the same round)"
    )
    print()

    modes = [m.strip() for m in args.modes.split(",")]
    results: list[StepResult] = []
    for n in sizes:
        # The eager and compiled references take seconds per step from 1e7 parameters; they are
        # measured up to 1e6.
        factories = [
            (name, make) for name, make in optimizer_factories(modes)
            if n <= 1_000_000 or not any(w in name for w in ("eager", "compiled"))
        ]
        for case in cases:
            shapes = mixed_shapes(n) if case == "mixed" else [(n,)]
            rounds = args.repeats or (15 if n <= 1e5 else 9 if n <= 1e6 else 5)
            rows = time_steps(factories, shapes, case, args.warmup, rounds, fpp)
            for res in rows:
                print(f"  {case} N={res.numel} {res.name}: {res.step_ms:.2f} ms", file=sys.stderr, flush=True)
            results += rows
            gc.collect()  # the optimizers of this size and their state, before the next size

    print("| params | case | tensors | optimizer | step ms | vs Adam foreach | GFLOP/s | % of peak | state B/param | step peak MiB | first step s |")
    print("| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for res in results:
        adam = next(r for r in results if r.name == "Adam foreach" and r.numel == res.numel and r.case == res.case)
        gf = "-" if res.gflops is None else f"{res.gflops:.1f}"
        pct = "-" if res.fraction_of_peak is None else f"{100 * res.fraction_of_peak:.1f}%"
        print(
            f"| {res.numel:.0e} | {res.case} | {res.num_tensors} | {res.name} | {res.step_ms:.2f} | "
            f"{res.step_ms / adam.step_ms:.1f}x | {gf} | {pct} | {res.state_bytes_per_param:.1f} | "
            f"{res.peak_mib:.1f} | {res.first_step_s:.2f} |"
        )

    print()
    print("| params | case | matmul GFLOP/s during the rounds (median) |")
    print("| ---: | --- | ---: |")
    for res in results:
        if res.name == "Adam foreach":
            print(f"| {res.numel:.0e} | {res.case} | {res.matmul_gflops:.1f} |")

    if not args.no_mnist1d:
        print()
        e2e = mnist1d_training_step()
        print("| MNIST-1D example training step (MLP 40-100-100-10, batch 128, 1 thread) | ms |")
        print("| --- | ---: |")
        print(f"| Adam (torch defaults, as configs/mnist1d_adam.yaml) | {e2e['Adam ms']:.3f} |")
        print(f"| HierarchicalRNNOptimizer (shipped weights) | {e2e['HRNN ms']:.3f} |")
        print(f"| ratio (median over alternating steps) | {e2e['ratio']:.2f}x |")
        if args.busy:
            print()
            print("| MNIST-1D training step: threads | busy processes beside it | Adam ms | HierarchicalRNNOptimizer ms |")
            print("| --- | ---: | ---: | ---: |")
            for label, others, res in mnist1d_threads_table(args.busy):
                print(f"| {label} | {others} | {res['Adam ms']:.3f} | {res['HRNN ms']:.3f} |")

    if not args.no_meta:
        print()
        steps_per_s = meta_training_throughput(lopt)
        print("| meta-training | inner steps/s |")
        print("| --- | ---: |")
        print(f"| 8 problems x ~3k params, 16-step unroll, backward included | {steps_per_s:.1f} |")

    if args.compile_times:
        print()
        times = compile_start_times(100_000)
        if times is None:
            print("(this optimizer has no compile option)")
        else:
            print("| compiled first step (fresh process, 1e5 params) | seconds |")
            print("| --- | ---: |")
            print(f"| cold (empty inductor cache) | {times[0]:.1f} |")
            print(f"| warm (inductor cache from the previous process) | {times[1]:.1f} |")

    if args.kernel_times:
        print()
        times = kernel_start_times()
        if times is None:
            print("(no C++ kernel here)")
        else:
            print("| C++ kernel start-up (fresh process) | seconds |")
            print("| --- | ---: |")
            print(f"| cold build (empty extension cache) | {times[0]:.1f} |")
            print(f"| warm load (extension cache from the previous process) | {times[1]:.2f} |")


if __name__ == "__main__":
    main()
