"""GPU check of the optimizer step: the same numbers as the CPU reference, and its speed against Adam.

Run ``python -m lightning_lopt.bench.cuda_check`` on a machine with a GPU (``--help`` for options).
It prints:

* a correctness check: the same parameters and gradients stepped on the CPU (the reference) and on
  the device for a few steps, with the largest differences of the parameters and of every state
  buffer, and PASS or FAIL against a float32 tolerance (the exit status is 1 on FAIL);
* a table of step times at 1e7 and 1e8 parameters (one big tensor, and a mix of tensor shapes) for
  the learned optimizer (float32 and bfloat16 state) and ``torch.optim.Adam(fused=True)``, with
  the device's peak memory, and the eager chunk size the step used.

With ``--device cpu`` and small ``--sizes`` it runs anywhere (that is how it is tested).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from lightning_lopt.bench.speed import mixed_shapes
from lightning_lopt.hrnn import HierarchicalRNN
from lightning_lopt.optimizer import HierarchicalRNNOptimizer

__all__ = ["check_against_cpu", "main", "time_step"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_against_cpu(
    device: torch.device, shapes: Sequence[tuple[int, ...]], steps: int = 5, seed: int = 0
) -> dict[str, float]:
    """Largest differences between ``steps`` optimizer steps of the CPU reference and of ``device``.

    The reference is the eager Python step on the CPU; the device runs the optimizer as a user
    would (its default backend). Returns one entry per state buffer and ``"params"``: the largest
    absolute difference relative to ``1 + |reference|``.
    """
    lopt = HierarchicalRNN.from_pretrained("default")
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]

    def run(dev: torch.device, **kwargs: object) -> tuple[list[torch.Tensor], dict]:
        params = [torch.nn.Parameter(v.clone().to(dev)) for v in values]
        opt = HierarchicalRNNOptimizer(params, weights=lopt, **kwargs)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(dev)
            opt.step()
        return params, opt.hrnn_state

    ref_params, ref_state = run(torch.device("cpu"), backend="eager")
    dev_params, dev_state = run(device)

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        return float(((a - b).abs() / (1.0 + a.abs())).max())

    out = {"params": max(diff(a, b) for a, b in zip(ref_params, dev_params))}
    for key, value in ref_state.items():
        if isinstance(value, torch.Tensor):
            out[key] = diff(value, dev_state[key])
    return out


def time_step(
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    shapes: Sequence[tuple[int, ...]],
    device: torch.device,
    repeats: int,
) -> tuple[float, float]:
    """(median step milliseconds, peak device memory in GiB during the steps) of one optimizer."""
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.1) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    for _ in range(2):
        opt.step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 1e3 * statistics.median(times), peak


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check and the timings; return 1 if the device disagrees with the CPU reference."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="device to check (default %(default)s)")
    parser.add_argument("--sizes", default="1e7,1e8", help="parameter counts to time (default %(default)s)")
    parser.add_argument("--check-size", type=float, default=2e5, help="parameters in the correctness check")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference that passes")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA device here.", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}")

    diffs = check_against_cpu(device, mixed_shapes(int(args.check_size)))
    worst = max(diffs.values())
    print("largest |device - cpu| / (1 + |cpu|) after 5 steps: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    ok = worst <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'} (tolerance {args.tolerance:g})")

    lopt = HierarchicalRNN.from_pretrained("default")
    rows: list[tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]] = [
        ("Adam fused", lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)),
        ("HRNN", lambda p: HierarchicalRNNOptimizer(p, weights=lopt)),
        ("HRNN bf16 state", lambda p: HierarchicalRNNOptimizer(p, weights=lopt, state_dtype=torch.bfloat16)),
    ]
    print()
    print("| params | case | optimizer | step ms | vs Adam fused | peak GiB |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for n in (int(float(s)) for s in args.sizes.split(",") if s.strip()):
        for case, shapes in (("single", [(n,)]), ("mixed", mixed_shapes(n))):
            adam_ms = None
            for label, make in rows:
                ms, peak = time_step(make, shapes, device, args.repeats)
                adam_ms = adam_ms or ms
                print(f"| {n:.0e} | {case} | {label} | {ms:.2f} | {ms / adam_ms:.1f}x | {peak:.2f} |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
