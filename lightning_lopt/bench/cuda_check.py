"""GPU check of the optimizer step: the same numbers as the CPU reference, and its speed against Adam.

Run ``python -m lightning_lopt.bench.cuda_check`` on a machine with a GPU (``--help`` for options).
It prints:

* a correctness check: the same parameters and gradients stepped on the CPU (the reference) and on
  the device for a few steps, with the largest differences of the parameters and of every state
  buffer, and PASS or FAIL against a float32 tolerance (the exit status is 1 on FAIL);
* the Triton step against the eager step on the device, float32 and bfloat16 state, likewise
  (where Triton runs on the device: a GPU, or the CPU under ``TRITON_INTERPRET=1``);
* a table of step times at 1e7 and 1e8 parameters (one big tensor, and a mix of tensor shapes) for
  the learned optimizer (eager and Triton backends, float32 and bfloat16 state) and
  ``torch.optim.AdamW(fused=True)`` in the same run, with the device's peak memory during the steps;
* one TBPTT meta-training step (``run_inner`` on a ``MetaTrainingModule``'s tasks, backward,
  meta-optimizer step) on the device, with its inner steps per second;
* the particle-steps per second of the GPU burst's ES recipe (``configs/meta_train_gpu_burst.yaml``:
  thousands of particles per inner step through the batched unroll) on the device.

The whole check is sized to finish in under 5 minutes on a GPU. With ``--device cpu`` and small
``--sizes``, ``--check-size`` and ``--meta-tasks`` it runs anywhere (that is how it is tested).
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
from lightning_lopt.kernels import triton_step
from lightning_lopt.optimizer import HierarchicalRNNOptimizer

__all__ = ["check_against_cpu", "check_triton", "main", "meta_training_step", "time_step"]


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


def check_triton(
    device: torch.device, shapes: Sequence[tuple[int, ...]], steps: int = 5, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Largest differences between ``steps`` optimizer steps with ``backend="triton"`` and with
    ``backend="eager"``, both on ``device``, for float32 and bfloat16 state.

    Returns ``{state dtype name: {buffer or "params": largest |triton - eager| / (1 + |eager|)}}``,
    empty where the Triton kernels do not run on ``device``.
    """
    if not triton_step.applies(device):
        return {}
    lopt = HierarchicalRNN.from_pretrained("default").to(device)
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    result = {}
    for state_dtype in (torch.float32, torch.bfloat16):

        def run(backend: str) -> tuple[list[torch.Tensor], dict]:
            params = [torch.nn.Parameter(v.clone().to(device)) for v in values]
            opt = HierarchicalRNNOptimizer(params, weights=lopt, backend=backend, state_dtype=state_dtype)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.to(device)
                opt.step()
                if lopt.last_backend != backend:
                    raise RuntimeError(f"asked for backend {backend!r}, the step ran {lopt.last_backend!r}")
            return params, opt.hrnn_state

        ref_params, ref_state = run("eager")
        tri_params, tri_state = run("triton")
        diffs = {"params": max(_rel_diff(a, b) for a, b in zip(ref_params, tri_params))}
        for key, value in ref_state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                diffs[key] = _rel_diff(value, tri_state[key])
        result[str(state_dtype).replace("torch.", "")] = diffs
    return result


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(((a - b).abs() / (1.0 + a.abs())).max()) if a.numel() else 0.0


def meta_training_step(device: torch.device, tasks: int = 8, steps: int = 16, seed: int = 0) -> dict[str, float]:
    """One TBPTT meta-training step on ``device``: ``tasks`` tasks of the training distribution
    unrolled ``steps`` inner steps through the differentiable step, the meta-gradient, and one
    meta-optimizer step. A first, untimed step on other tasks warms the device up.

    Returns ``inner_steps`` (summed over tasks), ``seconds`` (the timed meta-step),
    ``inner_steps_per_s`` and ``meta_loss``.
    """
    from lightning_lopt.meta import MetaTrainingModule
    from lightning_lopt.meta.module import run_inner

    module = MetaTrainingModule(tasks_per_step=tasks, truncation_length=steps, num_threads=None).to(device)
    meta_opt = torch.optim.Adam(module.lopt.parameters(), lr=1e-4)
    out: dict[str, float] = {}
    for rep in range(2):
        slots = [module.new_slot(seed + rep * tasks + i, length=steps) for i in range(tasks)]
        _sync(device)
        t0 = time.perf_counter()
        meta_loss, history, _ = run_inner(module.lopt, slots, steps, device=device)
        meta_opt.zero_grad()
        if meta_loss is not None:
            meta_loss.backward()
            meta_opt.step()
        _sync(device)
        elapsed = time.perf_counter() - t0
        inner = sum(len(h) for h in history)
        out = dict(inner_steps=float(inner), seconds=elapsed, inner_steps_per_s=inner / max(elapsed, 1e-9),
                   meta_loss=float("nan") if meta_loss is None else float(meta_loss.detach()))
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
    parser.add_argument("--triton-check-size", type=float, default=None,
                        help="parameters in the Triton-against-eager check (default: --check-size; "
                        "below 1e3, three tensors instead of a model's mix)")
    parser.add_argument("--meta-tasks", type=int, default=8, help="tasks in the meta-training step (0: skip it)")
    parser.add_argument("--meta-steps", type=int, default=16, help="inner steps of the meta-training step")
    parser.add_argument("--es-config", default="configs/meta_train_gpu_burst.yaml",
                        help="meta-training config whose ES particle-steps/s to time on the device ('' skips it)")
    parser.add_argument("--es-seconds", type=float, default=30.0, help="seconds of ES meta-steps to time")
    parser.add_argument("--es-tasks", type=int, default=None, help="override the config's tasks_per_step")
    parser.add_argument("--es-pairs", type=int, default=None, help="override the config's pes_pairs")
    args = parser.parse_args(argv)
    start = time.perf_counter()

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

    triton_size = int(args.triton_check_size if args.triton_check_size is not None else args.check_size)
    # Below 1e3 parameters (a check under the interpreter, which takes ~0.1 s per tile) three tensors.
    shapes = mixed_shapes(triton_size, blocks=1) if triton_size >= 1000 else [(triton_size,), (7, 3), (1,)]
    by_dtype = check_triton(device, shapes, steps=3)
    if not by_dtype:
        why = "Triton is not installed" if not triton_step.AVAILABLE else f"Triton does not run on {device.type} here"
        print(f"triton vs eager: skipped ({why})")
    for dtype_name, diffs in by_dtype.items():
        worst = max(diffs.values())
        # bfloat16 state rounds the same float32 values: a last-bit difference may flip a rounding.
        tol = args.tolerance if dtype_name == "float32" else max(args.tolerance, 2.0**-7)
        passed = worst <= tol
        ok = ok and passed
        print(f"triton vs eager, {dtype_name} state, largest |triton - eager| / (1 + |eager|) after 3 steps: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        print(f"{'PASS' if passed else 'FAIL'} (tolerance {tol:g})")

    lopt = HierarchicalRNN.from_pretrained("default")
    # Timing the interpreter would say nothing: the Triton rows are for a GPU.
    backends = ["eager", "triton"] if triton_step.applies(device) and not triton_step.INTERPRETED else ["eager", "auto"]

    def hrnn(backend: str, state_dtype: torch.dtype) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        return lambda p: HierarchicalRNNOptimizer(p, weights=lopt, backend=backend, state_dtype=state_dtype)

    rows: list[tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]] = [
        ("AdamW fused", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
    ]
    for backend in backends:
        rows.append((f"HRNN {backend}", hrnn(backend, torch.float32)))
        rows.append((f"HRNN {backend} bf16 state", hrnn(backend, torch.bfloat16)))
    print()
    print("| params | case | optimizer | step ms | vs AdamW fused | peak GiB |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for n in (int(float(s)) for s in args.sizes.split(",") if s.strip()):
        for case, shapes in (("single", [(n,)]), ("mixed", mixed_shapes(n))):
            adam_ms = None
            for label, make in rows:
                ms, peak = time_step(make, shapes, device, args.repeats)
                adam_ms = adam_ms or ms
                print(f"| {n:.0e} | {case} | {label} | {ms:.2f} | {ms / adam_ms:.1f}x | {peak:.2f} |", flush=True)

    if args.meta_tasks > 0:
        meta = meta_training_step(device, args.meta_tasks, args.meta_steps)
        print()
        print(f"TBPTT meta-training step: {args.meta_tasks} tasks x {args.meta_steps} inner steps, "
              f"{meta['seconds']:.2f} s, {meta['inner_steps_per_s']:.1f} inner steps/s, meta-loss {meta['meta_loss']:.3f}")
    if args.es_config:
        rate, particles = es_particle_steps(device, args.es_config, args.es_seconds, args.es_tasks, args.es_pairs)
        print()
        print(f"ES meta-training ({args.es_config}, batched unroll): {particles} particles per inner step, "
              f"{rate:.0f} particle-steps/s on the device")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


def es_particle_steps(
    device: torch.device, config: str, seconds: float, tasks: Optional[int] = None, pairs: Optional[int] = None
) -> tuple[float, int]:
    """Particle-steps per second of a meta-training config's ES recipe on ``device`` (the batched
    unroll), over meta-steps run for about ``seconds`` after an untimed first one; ``tasks`` and
    ``pairs`` override the config's ``tasks_per_step`` and ``pes_pairs``."""
    from lightning_lopt.bench.es_throughput import _round, detach_from_trainer, module_from_config

    overrides: dict = {"es_unroll": "batched", "num_threads": None}
    if tasks:
        overrides["tasks_per_step"] = tasks
    if pairs:
        overrides["pes_pairs"] = pairs
    torch.manual_seed(0)
    module = module_from_config(config, **overrides).to(device)
    detach_from_trainer(module)
    _round(module, 0, 1)
    _sync(device)
    elapsed, steps, k = 0.0, 0, 1
    while elapsed < seconds:
        t, n = _round(module, k, 1)
        _sync(device)
        elapsed, steps, k = elapsed + t, steps + n, k + 1
    return steps / elapsed, module.hparams.tasks_per_step * 2 * module.hparams.pes_pairs


if __name__ == "__main__":
    raise SystemExit(main())
