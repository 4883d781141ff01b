"""Quality benchmark of the learned optimizer on held-out problems, against tuned Adam, RMSProp and SGD.

Run ``python -m lightning_lopt.bench.quality`` (or ``lightning-lopt-bench``; ``--help`` for
options). Every task here is outside the meta-training distribution
(:class:`~lightning_lopt.tasks.TaskDistribution` never samples it):

* ``a``  ``mnist1d_mlp``: a one-hidden-layer ReLU MLP on MNIST-1D (generated locally);
* ``b``  ``digits_conv_relu``: a small conv net on scikit-learn's 8x8 digits, ReLU;
* ``b2`` ``digits_conv_sigmoid``: the same conv net with sigmoid activations (``b'``);
* ``c``  ``char_lm``: a 2-layer character-level transformer on CPython's ``pydoc_data.topics`` text;
* ``d``  ``breast_cancer_logreg``: logistic regression on scikit-learn's breast-cancer set;
* ``e``  ``mnist1d_deep_mlp``: a 4-hidden-layer MLP on MNIST-1D for 5,000 steps (long horizon);
* ``f``  ``noisy_quadratic``: a 2,000-dimensional quadratic with noisy gradients.

Each task is trained with the learned optimizer (untuned, ``lr=1``), with Adam, RMSProp and SGD
with momentum 0.9 over a log-spaced learning-rate sweep, and with Adam at 1e-3, over several
seeds (a seed sets the initialisation, the minibatch order and the gradient noise; every optimizer
sees the same seeds). The tuned baseline of a task is the (optimizer, lr) with the lowest mean
final training loss. The final training loss is measured at the true parameters (the learned
optimizer is put in eval mode) on the whole training set, or on a fixed large batch for the
language model. ``--bf16-state`` also runs the learned optimizer with its state in bfloat16 and
reports its final loss next to the float32-state one; ``--cosine`` also runs it with a cosine
schedule on its ``lr`` multiplier (1 to 0 over the run). Outputs: ``OUT/results.md``,
``OUT/results.json`` and ``OUT/curves_<task>.png`` (drawn by :mod:`lightning_lopt.bench.report`).
Finished runs are cached under ``OUT/runs`` and reused when the same run is asked for again.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_lopt.bench.report import KIND_LABELS, at_sweep_edge, plot_task, render_markdown
from lightning_lopt.hrnn import WEIGHTS_DIR, HierarchicalRNN
from lightning_lopt.optimizer import HierarchicalRNNOptimizer, linear_decay, load_weights
from lightning_lopt.tasks.base import Task, make_generator
from lightning_lopt.tasks.benchmark import (
    TASKS,
    BreastCancerLogRegTask,
    build_task,
    CharTransformerTask,
    DigitsConvNetActivationTask,
    NoisyQuadraticTask,
    resolve_task_keys,
    TaskSpec,
)
from lightning_lopt.verdict import validation_verdict

__all__ = [
    "ABLATIONS",
    "BF16_STATE",
    "COSINE",
    "TASKS",
    "BreastCancerLogRegTask",
    "CharTransformerTask",
    "DigitsConvNetActivationTask",
    "NoisyQuadraticTask",
    "OptimizerConfig",
    "TaskSpec",
    "build_task",
    "is_diverged",
    "main",
    "run_one",
    "select_tuned",
    "steps_to_reach",
    "summarize",
]

# A run has diverged when its final loss is not finite or above this multiple of its initial loss.
DIVERGENCE_FACTOR = 10.0
BASELINE_KINDS = ("adam", "rmsprop", "sgd")
# Full sweeps: 7 log-spaced points each (half-decade steps).
SWEEPS: dict[str, tuple[float, ...]] = {
    "adam": tuple(10.0 ** (-4 + 0.5 * i) for i in range(7)),
    "rmsprop": tuple(10.0 ** (-4 + 0.5 * i) for i in range(7)),
    "sgd": tuple(10.0 ** (-3 + 0.5 * i) for i in range(7)),
}
# --quick keeps every other point: whole decades, which still contain Adam's 1e-3.
QUICK_SWEEP_INDICES = (0, 2, 4, 6)
ADAM_DEFAULT_LR = 1e-3
QUICK_STEPS_SCALE = 0.2
QUICK_MIN_STEPS = 50
# The bar the default weights are judged by (see bar_summary).
BAR_TASKS_VS_ADAM = 6
BAR_GROUPS_VS_BEST = 2
BAR_DEEP_MLP_RATIO = 0.5
# Variant of the learned optimizer with the weights under test but its state kept in bfloat16
# (``--bf16-state``); it rides on the ablation variants' machinery (OptimizerConfig.variant).
BF16_STATE = "bf16_state"
# State dtype of each learned-optimizer variant that changes only how the state is stored.
STATE_DTYPE_VARIANTS: dict[str, torch.dtype] = {BF16_STATE: torch.bfloat16}
# Variant with the weights under test whose lr multiplier follows torch's CosineAnnealingLR from
# ``lr`` to 0 over the run (``--cosine``): what an external schedule adds to the learned step.
COSINE = "cosine"
# The weights under test at other lr multipliers (``--tune-learned``): with lr=1 (the untuned run)
# they are the learned optimizer's sweep, of as many points as Adam's.
LR_SWEEP = "lr_sweep"
LEARNED_SWEEP: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Variant of the baselines whose learning rate decays linearly to 0 over the last
# ``PARITY_DECAY_FRACTION`` of the run (``--decayed-baselines``), as the shipped default weights
# decay the learned step: the comparison at equal schedules.
DECAYED = "decayed"
PARITY_DECAY_FRACTION = 0.5


# ============================================================================ tasks

# ============================================================================ optimizers


@dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer setting of the benchmark.

    Attributes:
        kind: ``learned``, ``adam``, ``rmsprop`` or ``sgd``.
        lr: Learning rate (for ``learned``, the multiplier of the learned step).
        variant: For ``learned``: ``default`` (the weights under test), an ablation name,
            ``bf16_state`` (the weights under test with the state in bfloat16) or ``cosine`` (the
            weights under test with a cosine schedule on ``lr``).
    """

    kind: str
    lr: float
    variant: str = "default"

    @property
    def key(self) -> str:
        """Stable identifier, e.g. ``adam@0.001`` or ``learned:no_attention@1``."""
        name = self.kind if self.variant == "default" else f"{self.kind}:{self.variant}"
        return f"{name}@{self.lr:.3g}"

    @property
    def label(self) -> str:
        """Human-readable name."""
        if self.kind == "learned":
            return "learned" if self.variant == "default" else f"learned ({self.variant})"
        suffix = " + decay" if self.variant == DECAYED else ""
        return f"{KIND_LABELS[self.kind]} {self.lr:.3g}{suffix}"


def make_optimizer(
    config: OptimizerConfig,
    params: list[Tensor],
    lopt: Optional[HierarchicalRNN],
    seed: int,
    total_steps: Optional[int] = None,
) -> torch.optim.Optimizer:
    """The torch optimizer of ``config`` over ``params``; the learned one is told the horizon
    ``total_steps`` (read only by weights meta-trained with ``progress_input``), as the
    ``TrainingProgress`` callback would in a Lightning run."""
    if config.kind == "learned":
        if lopt is None:
            raise ValueError("The learned optimizer needs weights.")
        state_dtype = STATE_DTYPE_VARIANTS.get(config.variant)  # None: the optimizer's float32 default
        # With the cosine schedule on lr, the external schedule replaces the weights' own decay.
        decay_fraction = 0.0 if config.variant == COSINE else None
        return HierarchicalRNNOptimizer(
            params, weights=lopt, lr=config.lr, seed=seed, state_dtype=state_dtype, total_steps=total_steps,
            decay_fraction=decay_fraction,
        )
    if config.kind == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr)
    if config.kind == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9)
    raise ValueError(f"Unknown optimizer kind {config.kind!r}.")


@dataclass
class Weights:
    """Resolved weights of the learned optimizer.

    Attributes:
        spec: What was asked for (``default`` or a path).
        description: What was loaded, for the report.
        untrained: True when the untrained initialisation stands in for missing default weights.
        digest: Hash of the configuration and tensors (part of the run cache key).
        config: The HierarchicalRNN configuration.
    """

    spec: str
    description: str
    untrained: bool
    digest: str
    config: dict[str, Any]


def _digest(model: HierarchicalRNN) -> str:
    h = hashlib.sha256(json.dumps(model.config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def load_lopt(spec: str) -> tuple[HierarchicalRNN, Weights]:
    """Load weights as the optimizer would (``default`` falls back to the untrained initialisation)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_weights(spec)
    untrained = spec == "default" and not (WEIGHTS_DIR / "default.safetensors").exists()
    if untrained:
        description = "untrained initialisation (lightning_lopt/weights/default.safetensors is not shipped yet)"
    elif spec == "default":
        description = f"default ({WEIGHTS_DIR / 'default.safetensors'})"
    else:
        description = str(spec)
    if caught and not untrained:
        description += " [warnings: " + "; ".join(str(w.message) for w in caught) + "]"
    return model, Weights(spec, description, untrained, _digest(model), dict(model.config))


# ============================================================================ one run


def is_diverged(initial_loss: float, final_loss: float, nonfinite: bool = False) -> bool:
    """True when a run's loss went non-finite or ended above ``DIVERGENCE_FACTOR`` times its start."""
    if nonfinite or not math.isfinite(final_loss):
        return True
    return final_loss > DIVERGENCE_FACTOR * initial_loss


@torch.no_grad()
def _full_loss(task: Task, params: Sequence[Tensor]) -> float:
    return float(task.loss(params, None))


def _eval_steps(steps: int, points: int) -> list[int]:
    return sorted({int(round(i * steps / points)) for i in range(points + 1)})


def _state_dtype(opt: torch.optim.Optimizer) -> Optional[str]:
    """Dtype of the learned optimizer's state as stored (None for the baselines)."""
    if not isinstance(opt, HierarchicalRNNOptimizer):
        return None
    # Read from the buffers themselves, not the constructor argument, so the record proves what ran.
    st = opt.hrnn_state
    dtype = st["h_param"].dtype if st is not None else opt.state_dtype
    return str(dtype).removeprefix("torch.")


def run_one(
    task: Task,
    config: OptimizerConfig,
    seed: int,
    steps: int,
    lopt: Optional[HierarchicalRNN] = None,
    eval_points: int = 50,
    curve_points: int = 200,
    progress: Optional[Callable[[int], None]] = None,
) -> dict[str, Any]:
    """Train ``task`` with one optimizer setting and seed; return the run's record.

    The minibatch loss is recorded at every step where the optimizer takes its gradient (the
    attended point for the learned optimizer with attention) and stored as means over blocks of
    steps (``curve``). Every ``steps / eval_points`` steps, and at the end, the training loss is
    measured at the true parameters on the full training set (``eval_curve``). A run stops early
    when its loss becomes non-finite. The ``cosine`` variant anneals the learning rate with
    ``CosineAnnealingLR(T_max=steps)``: step ``t`` (from 0) uses ``lr * (1 + cos(pi * t / steps)) / 2``.

    Args:
        task: The problem.
        config: Optimizer and learning rate.
        seed: Sets the initialisation, the minibatch order and the gradient noise.
        steps: Optimizer steps.
        lopt: Weights of the learned optimizer (``config.kind == "learned"`` only).
        eval_points: Number of full training-loss evaluations after the initial one.
        curve_points: Number of blocks of the minibatch-loss curve.
        progress: Called with the number of steps just done (for progress bars).

    Returns:
        A JSON-serialisable dict: the setting, initial and final training loss, divergence flags,
        test loss and accuracy (None without a test split), timings, both curves and the learned
        optimizer's state dtype (None for the baselines).
    """
    init_gen = make_generator(1_000_003 * (seed + 1))
    batch_gen = make_generator(2_000_003 * (seed + 1))
    noise_gen = make_generator(3_000_017 * (seed + 1))
    params = [p.detach().clone().requires_grad_(True) for p in task.init_params(init_gen)]
    opt = make_optimizer(config, params, lopt, seed, total_steps=steps)
    learned = isinstance(opt, HierarchicalRNNOptimizer)
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    if config.variant == COSINE:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    elif config.variant == DECAYED:
        # The ramp the learned optimizer applies with a known horizon (its decay_factor).
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: linear_decay(t / steps, PARITY_DECAY_FRACTION))

    def at_true_params(fn: Callable[[], Any]) -> Any:
        # With attention the model holds the look-ahead point while training.
        if learned:
            opt.eval()
        try:
            return fn()
        finally:
            if learned:
                opt.train()

    t_start = time.perf_counter()
    initial_loss = _full_loss(task, params)
    eval_at = set(_eval_steps(steps, eval_points))
    eval_steps, eval_curve = [0], [initial_loss]
    block = max(1, math.ceil(steps / curve_points))
    curve_steps: list[int] = []
    curve: list[float] = []
    block_sum, block_n = 0.0, 0
    nonfinite = False
    train_seconds = 0.0
    # The applied step size: the RMS change of the true parameters per element over one step, at
    # about curve_points steps of the run (out of the timed loop).
    update_rms: list[float] = []

    def true_flat() -> Tensor:
        return at_true_params(lambda: torch.cat([p.detach().reshape(-1) for p in params]).clone())

    done = reported = 0
    with warnings.catch_warnings():
        # A diverging baseline makes the learned optimizer's skip warning irrelevant noise here.
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(steps):
            measure = t % block == 0
            before = true_flat() if measure else None
            t0 = time.perf_counter()
            batch = task.sample_batch(batch_gen)
            loss = task.loss(params, batch)
            grads = torch.autograd.grad(loss, params)
            grads = task.transform_grads(grads, noise_gen)
            for p, g in zip(params, grads):
                p.grad = g
            # A closure, as Lightning passes one: a step gain reads the loss it returns.
            opt.step(lambda: loss)
            if scheduler is not None:
                scheduler.step()
            value = float(loss.detach())
            train_seconds += time.perf_counter() - t0
            if before is not None:
                change = float((true_flat() - before).square().mean().sqrt())
                if math.isfinite(change):
                    update_rms.append(change)
            done = t + 1
            block_sum += value
            block_n += 1
            if block_n == block or done == steps or not math.isfinite(value):
                curve_steps.append(done)
                curve.append(block_sum / block_n)
                block_sum, block_n = 0.0, 0
            if progress is not None and (done % 10 == 0 or done == steps):
                progress(done - reported)
                reported = done
            if not math.isfinite(value):
                nonfinite = True
                break
            if done in eval_at and done != steps:
                eval_steps.append(done)
                eval_curve.append(at_true_params(lambda: _full_loss(task, params)))
    if progress is not None and reported < steps:
        progress(steps - reported)  # a run stopped early still fills its share of the bar
    final_loss = at_true_params(lambda: _full_loss(task, params))
    if eval_steps[-1] != done:
        eval_steps.append(done)
        eval_curve.append(final_loss)
    nonfinite = nonfinite or not math.isfinite(final_loss)
    metrics: dict[str, float] = {}
    evaluate = getattr(task, "evaluate", None)
    if evaluate is not None:
        metrics = at_true_params(lambda: evaluate(params))
    seconds = time.perf_counter() - t_start
    return {
        "optimizer": config.key,
        "kind": config.kind,
        "lr": config.lr,
        "variant": config.variant,
        "seed": seed,
        "steps": steps,
        "steps_done": done,
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "nonfinite": nonfinite,
        "diverged": is_diverged(initial_loss, final_loss, nonfinite),
        "skipped_steps": opt.skipped_steps if learned else 0,
        "state_dtype": _state_dtype(opt),
        "test_accuracy": metrics.get("test_accuracy"),
        "test_loss": metrics.get("test_loss"),
        "seconds": seconds,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / max(done, 1),
        "update_rms": float(np.mean(update_rms)) if update_rms else None,
        "num_params": sum(p.numel() for p in params),
        "curve_steps": curve_steps,
        "curve": curve,
        "eval_steps": eval_steps,
        "eval_curve": eval_curve,
    }


# ============================================================================ jobs and cache


@dataclass(frozen=True)
class Job:
    """One (task, optimizer setting, seed) run of the benchmark."""

    task: str
    config: OptimizerConfig
    seed: int
    steps: int
    weights: Optional[str]  # path or "default" for learned runs, else None
    eval_points: int
    task_overrides: tuple[tuple[str, Any], ...] = ()

    def signature(self, weights_digest: Optional[str]) -> str:
        """Hash of everything that determines the run's result."""
        spec = TASKS[self.task]
        payload = dict(
            version=1,
            task=self.task,
            task_kwargs={**spec.kwargs, **dict(self.task_overrides)},
            optimizer=self.config.key,
            seed=self.seed,
            steps=self.steps,
            eval_points=self.eval_points,
            weights=weights_digest,
        )
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _clean(value: Any) -> Any:
    # JSON has no NaN or infinity; they are written as strings so that a reload keeps them.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _unclean(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _unclean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unclean(v) for v in value]
    return value


def _cache_path(out: Path, job: Job) -> Path:
    safe = job.config.key.replace(":", "-").replace("@", "_lr")
    return out / "runs" / TASKS[job.task].name / f"{safe}_seed{job.seed}.json"


def _execute(job: Job, threads: int, progress: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        task = build_task(job.task, **dict(job.task_overrides))
        lopt, weights = load_lopt(job.weights) if job.weights is not None else (None, None)
        record = run_one(
            task, job.config, job.seed, job.steps, lopt=lopt, eval_points=job.eval_points, progress=progress
        )
    finally:
        torch.set_num_threads(previous_threads)
    record["task"] = job.task
    record["weights_digest"] = weights.digest if weights else None
    return record


def _execute_in_worker(job: Job, threads: int) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    return _execute(job, threads)


def run_jobs(
    jobs: Sequence[Job],
    out: Path,
    threads: int = 1,
    workers: int = 1,
    use_cache: bool = True,
    show_progress: bool = True,
) -> tuple[list[dict[str, Any]], int]:
    """Run (or reload from ``out/runs``) every job, with a progress bar.

    Returns:
        The records of all jobs, in order, and how many were run (not reloaded).
    """
    from tqdm.auto import tqdm

    digests = {spec: load_lopt(spec)[1].digest for spec in {j.weights for j in jobs if j.weights is not None}}
    records: list[Optional[dict[str, Any]]] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        sig = job.signature(digests.get(job.weights))
        path = _cache_path(out, job)
        if use_cache and path.exists():
            try:
                cached = _unclean(json.loads(path.read_text()))
                if cached.get("signature") == sig:
                    records[i] = cached
                    continue
            except (OSError, ValueError):
                pass  # an unreadable cache entry is simply run again
        todo.append((i, job, sig, path))

    def save(i: int, job: Job, sig: str, path: Path, record: dict[str, Any]) -> None:
        record["signature"] = sig
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_clean(record)))
        tmp.replace(path)  # an interrupted benchmark never leaves a half-written cache entry
        records[i] = record

    total_steps = sum(j.steps for _, j, _, _ in todo)
    bar = tqdm(
        total=total_steps, desc="benchmark", unit="step", disable=not show_progress, dynamic_ncols=True, mininterval=0.5
    )
    bar.set_postfix_str(f"{len(jobs) - len(todo)} cached, {len(todo)} to run")
    try:
        if workers <= 1:
            for n, (i, job, sig, path) in enumerate(todo):
                bar.set_description(f"[{n + 1}/{len(todo)}] {TASKS[job.task].name} {job.config.label} s{job.seed}")
                save(i, job, sig, path, _execute(job, threads, progress=bar.update))
        else:
            ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can deadlock
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = {pool.submit(_execute_in_worker, item[1], threads): item for item in todo}
                for n, fut in enumerate(cf.as_completed(futures)):
                    i, job, sig, path = futures[fut]
                    save(i, job, sig, path, fut.result())
                    bar.update(job.steps)
                    bar.set_description(f"[{n + 1}/{len(todo)}] {TASKS[job.task].name} {job.config.label} s{job.seed}")
    finally:
        bar.close()
    return [r for r in records if r is not None], len(todo)


# ============================================================================ aggregation


def _stats(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    finite = bool(np.isfinite(arr).all()) and arr.size > 0
    return {
        "mean": float(arr.mean()) if finite else math.inf,
        "std": float(arr.std()) if finite else math.nan,
        "min": float(np.nanmin(arr)) if np.isfinite(arr).any() else math.nan,
        "max": float(arr.max()) if finite else math.inf,
        "values": [float(v) for v in arr],
    }


def _mean_curve(runs: Sequence[dict[str, Any]], steps_key: str, values_key: str) -> tuple[list[int], list[float]]:
    # Runs of one config share their step grid; a run stopped early is padded with NaN.
    longest = max(runs, key=lambda r: len(r[steps_key]))
    grid = list(longest[steps_key])
    rows = []
    for r in runs:
        vals = list(r[values_key]) + [math.nan] * (len(grid) - len(r[values_key]))
        rows.append(vals[: len(grid)])
    with np.errstate(all="ignore"):
        mean = np.asarray(rows, dtype=np.float64).mean(0)
    return grid, [float(v) for v in mean]


def _loss_at_fraction(run: dict[str, Any], fraction: float) -> float:
    """The run's full training loss at the first evaluation at or after ``fraction`` of its steps."""
    target = fraction * run["steps"]
    for step, loss in zip(run["eval_steps"], run["eval_curve"]):
        if step >= target:
            return loss
    return run["eval_curve"][-1]


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Statistics over the seeds of one (task, optimizer setting).

    The mean final loss is infinite when any seed's loss went non-finite, so such a setting is
    never chosen as the tuned baseline.
    """
    first = runs[0]
    accuracies = [r["test_accuracy"] for r in runs if r.get("test_accuracy") is not None]
    eval_steps, eval_mean = _mean_curve(runs, "eval_steps", "eval_curve")
    curve_steps, curve_mean = _mean_curve(runs, "curve_steps", "curve")
    return {
        "optimizer": first["optimizer"],
        "kind": first["kind"],
        "lr": first["lr"],
        "variant": first.get("variant", "default"),
        "seeds": [r["seed"] for r in runs],
        # A run whose loss went non-finite on the way counts as infinite even if it ended finite.
        "final_loss": _stats([math.inf if r["nonfinite"] else r["final_loss"] for r in runs]),
        "initial_loss": _stats([r["initial_loss"] for r in runs]),
        "test_accuracy": _stats(accuracies) if accuracies else None,
        "diverged_seeds": [r["seed"] for r in runs if r["diverged"]],
        # Per seed, for the stall verdict: the full training loss at 10% of the run, and at its end.
        "early_losses": [_loss_at_fraction(r, 0.1) for r in runs],
        "final_losses": [math.inf if r["nonfinite"] else r["final_loss"] for r in runs],
        "seconds": float(np.mean([r["seconds"] for r in runs])),
        "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
        "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in runs])),
        # Runs cached before the field existed have none.
        "update_rms": float(np.mean(rms)) if (rms := [r["update_rms"] for r in runs if r.get("update_rms")]) else None,
        "eval_steps": eval_steps,
        "eval_mean": eval_mean,
        "curve_steps": curve_steps,
        "curve_mean": curve_mean,
    }


def select_tuned(
    summaries: Iterable[dict[str, Any]], kinds: Sequence[str] = BASELINE_KINDS, variant: str = "default"
) -> dict[str, Any]:
    """The tuned baselines: per optimizer kind, and overall, the setting of lowest mean final loss.

    Args:
        summaries: Outputs of :func:`summarize` (any kinds; those not in ``kinds`` are ignored).
        kinds: Baseline kinds to tune over.
        variant: Only settings of this variant take part (``default``: constant learning rates;
            :data:`DECAYED`: the decaying ones).

    Returns:
        ``{"adam": summary, "rmsprop": summary, "sgd": summary, "best": summary}``; a kind is
        missing when it has no setting, and ``best`` is None when no setting has a finite mean.
        Ties keep the first setting seen.
    """
    chosen: dict[str, Any] = {}
    for s in summaries:
        if s["kind"] not in kinds or s.get("variant", "default") != variant:
            continue
        current = chosen.get(s["kind"])
        if current is None or s["final_loss"]["mean"] < current["final_loss"]["mean"]:
            chosen[s["kind"]] = s
    finite = [s for s in chosen.values() if math.isfinite(s["final_loss"]["mean"])]
    chosen["best"] = min(finite, key=lambda s: s["final_loss"]["mean"]) if finite else None
    return chosen


def steps_to_reach(steps: Sequence[int], losses: Sequence[float], target: float) -> Optional[int]:
    """First step at which ``losses`` is at or below ``target``; None if never (NaN never counts)."""
    for s, v in zip(steps, losses):
        if v is not None and math.isfinite(v) and v <= target:
            return int(s)
    return None


# ============================================================================ ablation


@dataclass(frozen=True)
class Ablation:
    """A variant of the learned optimizer for the paper's ablation.

    Attributes:
        name: Key used by ``--ablation-weights``.
        title: What is ablated.
        config_key: The HierarchicalRNN argument that makes the variant.
        config_value: Its value in the variant's weights.
    """

    name: str
    title: str
    config_key: str
    config_value: Any

    def mismatch(self, config: dict[str, Any]) -> Optional[str]:
        """Why weights with ``config`` are not this variant, or None when they are."""
        value = config.get(self.config_key)
        return None if value == self.config_value else f"its config has {self.config_key}={value!r}"

    def unsupported(self) -> Optional[str]:
        """Why HierarchicalRNN cannot express this variant, or None."""
        import inspect

        if self.config_key in inspect.signature(HierarchicalRNN.__init__).parameters:
            return None
        return (
            f"HierarchicalRNN has no `{self.config_key}` argument (no switch for: {self.title}), "
            "so this variant can be neither built nor loaded"
        )


ABLATIONS: dict[str, Ablation] = {
    a.name: a
    for a in (
        Ablation("no_attention", "attention off", "attention", False),
        Ablation("one_timescale", "one momentum timescale instead of four", "num_timescales", 1),
        Ablation("param_rnn_only", "parameter RNN only (no tensor or global RNN)", "hierarchy", False),
    )
}


def parse_ablation_weights(text: Optional[str]) -> dict[str, str]:
    """``name=PATH,name=PATH`` into a dict, checking the names."""
    result: dict[str, str] = {}
    for item in (t.strip() for t in (text or "").split(",") if t.strip()):
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--ablation-weights entries look like name=PATH, got {item!r}.")
        if name not in ABLATIONS:
            raise ValueError(f"Unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}.")
        result[name] = path
    return result


def plan_ablations(paths: dict[str, str], full_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For each ablation: run it (with which weights) or why it is skipped.

    Untrained weights are never substituted: a variant without meta-trained weights is skipped.

    Returns:
        ``{name: {"title", "status": "run"|"skipped", "reason", "weights", "other_differences"}}``.
    """
    plan: dict[str, dict[str, Any]] = {}
    for name, ab in ABLATIONS.items():
        entry: dict[str, Any] = {"title": ab.title, "status": "skipped", "reason": None, "weights": paths.get(name)}
        unsupported = ab.unsupported()
        if unsupported:
            entry["reason"] = f"not supported: {unsupported}"
        elif name not in paths:
            entry["reason"] = f"no meta-trained weights given (--ablation-weights {name}=PATH)"
        else:
            try:
                _, w = load_lopt(paths[name])
            except (OSError, ValueError) as err:
                entry["reason"] = f"weights could not be loaded: {err}"
            else:
                wrong = ab.mismatch(w.config)
                if wrong:
                    entry["reason"] = f"{paths[name]} is not this variant: {wrong}"
                else:
                    entry["status"] = "run"
                    entry["description"] = w.description
                    ignore = {"seed", ab.config_key}
                    entry["other_differences"] = {
                        k: [full_config.get(k), v]
                        for k, v in w.config.items()
                        if k not in ignore and full_config.get(k) != v
                    }
        plan[name] = entry
    return plan


# ============================================================================ analysis


def _ratio(a: float, b: Optional[float]) -> Optional[float]:
    if b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return a / b


def analyse_task(summaries: dict[str, dict[str, Any]], sweeps: dict[str, Sequence[float]]) -> dict[str, Any]:
    """Comparisons of one task: learned vs Adam 1e-3 vs the tuned baselines, steps to reach, divergence.

    With the ``bf16_state`` variant present, also its final loss relative to the float32-state
    learned optimizer (``ratio_bf16_state_to_learned``). With the ``cosine`` variant present, its
    final loss relative to the constant-lr learned optimizer (``ratio_cosine_to_learned``), to Adam
    1e-3 and to the best tuned baseline (``ratio_cosine_to_adam_default``,
    ``ratio_cosine_to_best_tuned``, and the ``cosine_beats_*`` flags). The variants never change
    the default learned optimizer's entries, which alone feed :func:`bar_summary`.
    """
    learned = summaries.get(OptimizerConfig("learned", 1.0).key)
    adam = summaries.get(OptimizerConfig("adam", ADAM_DEFAULT_LR).key)
    tuned = select_tuned(summaries.values())
    best = tuned.get("best")
    result: dict[str, Any] = {
        "learned": learned["optimizer"] if learned else None,
        "adam_default": adam["optimizer"] if adam else None,
        "tuned": {k: (v["optimizer"] if v else None) for k, v in tuned.items()},
        "tuned_at_sweep_edge": {k: bool(v and at_sweep_edge(v["lr"], sweeps[v["kind"]])) for k, v in tuned.items()},
    }
    if learned:
        lm = learned["final_loss"]["mean"]
        result["beats_adam_default"] = bool(adam and lm < adam["final_loss"]["mean"])
        result["beats_best_tuned"] = bool(best and lm < best["final_loss"]["mean"])
        result["ratio_to_adam_default"] = _ratio(lm, adam["final_loss"]["mean"] if adam else None)
        result["ratio_to_best_tuned"] = _ratio(lm, best["final_loss"]["mean"] if best else None)
        target = best["final_loss"]["mean"] if best else math.nan
        result["steps_to_best_tuned"] = steps_to_reach(learned["eval_steps"], learned["eval_mean"], target)
        result["eval_interval"] = learned["eval_steps"][1] if len(learned["eval_steps"]) > 1 else None
        result["learned_diverged_seeds"] = learned["diverged_seeds"]
        if adam:
            adam_final = adam["final_loss"]["mean"]
            result["learned_stalled_seeds"] = [
                seed
                for seed, early, final in zip(learned["seeds"], learned["early_losses"], learned["final_losses"])
                if validation_verdict(final, early, adam_final) == "stalled"
            ]
    bf16 = summaries.get(OptimizerConfig("learned", 1.0, BF16_STATE).key)
    if bf16:
        result["bf16_state"] = bf16["optimizer"]
        result["ratio_bf16_state_to_learned"] = _ratio(
            bf16["final_loss"]["mean"], learned["final_loss"]["mean"] if learned else None
        )
    cosine = summaries.get(OptimizerConfig("learned", 1.0, COSINE).key)
    if cosine:
        cm = cosine["final_loss"]["mean"]
        result["cosine"] = cosine["optimizer"]
        result["ratio_cosine_to_learned"] = _ratio(cm, learned["final_loss"]["mean"] if learned else None)
        result["ratio_cosine_to_adam_default"] = _ratio(cm, adam["final_loss"]["mean"] if adam else None)
        result["ratio_cosine_to_best_tuned"] = _ratio(cm, best["final_loss"]["mean"] if best else None)
        result["cosine_beats_adam_default"] = bool(adam and cm < adam["final_loss"]["mean"])
        result["cosine_beats_best_tuned"] = bool(best and cm < best["final_loss"]["mean"])
        result["cosine_diverged_seeds"] = cosine["diverged_seeds"]
    sweep = [s for s in summaries.values() if s["kind"] == "learned" and s.get("variant") == LR_SWEEP]
    if sweep and learned:
        tuned_learned = min([learned, *sweep], key=lambda s: s["final_loss"]["mean"])
        tm = tuned_learned["final_loss"]["mean"]
        result["learned_tuned"] = tuned_learned["optimizer"]
        result["learned_tuned_lr"] = tuned_learned["lr"]
        result["learned_tuned_at_sweep_edge"] = at_sweep_edge(tuned_learned["lr"], LEARNED_SWEEP)
        result["ratio_learned_tuned_to_best_tuned"] = _ratio(tm, best["final_loss"]["mean"] if best else None)
        result["learned_tuned_beats_adam_default"] = bool(adam and tm < adam["final_loss"]["mean"])
        result["learned_tuned_beats_best_tuned"] = bool(best and tm < best["final_loss"]["mean"])
    decayed = select_tuned(summaries.values(), variant=DECAYED)
    if decayed.get("best") and learned:
        dm = decayed["best"]["final_loss"]["mean"]
        result["tuned_decayed"] = {k: (v["optimizer"] if v else None) for k, v in decayed.items()}
        result["ratio_to_best_decayed"] = _ratio(learned["final_loss"]["mean"], dm)
        result["beats_best_decayed"] = bool(learned["final_loss"]["mean"] < dm)
    if learned:
        result["learned_update_rms"] = learned.get("update_rms")
        tuned_adam = tuned.get("adam")
        result["tuned_adam_lr"] = tuned_adam["lr"] if tuned_adam else None
        result["tuned_adam_update_rms"] = tuned_adam.get("update_rms") if tuned_adam else None
    diverged = {k: s["diverged_seeds"] for k, s in summaries.items() if s["diverged_seeds"]}
    result["diverged"] = diverged
    return result


def bar_summary(analyses: dict[str, dict[str, Any]], task_keys: Sequence[str], full: bool = True) -> dict[str, Any]:
    """Counts for the bar of the default weights: tasks and groups won, divergences, stalls.

    The bar: lower final loss than Adam 1e-3 on at least :data:`BAR_TASKS_VS_ADAM` of the 7 tasks,
    than the best tuned baseline on at least :data:`BAR_GROUPS_VS_BEST` task groups (``b`` and
    ``b2`` form group ``b``, won only when both rows are won), no learned run diverges or stalls
    (:func:`~lightning_lopt.verdict.validation_verdict` against Adam 1e-3's mean final loss), and
    on the 5,000-step deep MLP (``e``) a final loss at most :data:`BAR_DEEP_MLP_RATIO` x Adam
    1e-3's. It is judged only on a full benchmark (``full``: not ``--quick``, with every task).
    """
    rows = [k for k in task_keys if analyses.get(k, {}).get("learned")]
    beats_adam = [k for k in rows if analyses[k].get("beats_adam_default")]
    beats_best = [k for k in rows if analyses[k].get("beats_best_tuned")]
    diverged = {k: analyses[k]["learned_diverged_seeds"] for k in rows if analyses[k].get("learned_diverged_seeds")}
    stalled = {k: analyses[k]["learned_stalled_seeds"] for k in rows if analyses[k].get("learned_stalled_seeds")}
    groups: dict[str, list[str]] = {}
    for k in rows:
        groups.setdefault(TASKS[k].group, []).append(k)
    g_adam = [g for g, ks in groups.items() if all(k in beats_adam for k in ks)]
    g_best = [g for g, ks in groups.items() if all(k in beats_best for k in ks)]
    beats_decayed = [k for k in rows if analyses[k].get("beats_best_decayed")]
    g_decayed = [g for g, ks in groups.items() if all(k in beats_decayed for k in ks)]
    deep = analyses.get("e", {}).get("ratio_to_adam_default") if "e" in rows else None
    complete = full and all(k in rows for k in TASKS)
    met = (
        len(beats_adam) >= BAR_TASKS_VS_ADAM
        and len(g_best) >= BAR_GROUPS_VS_BEST
        and not diverged
        and not stalled
        and deep is not None
        and deep <= BAR_DEEP_MLP_RATIO
    )
    return {
        "rows": rows,
        "beats_adam_default": beats_adam,
        "beats_best_tuned": beats_best,
        "groups": sorted(groups),
        "groups_beating_adam_default": sorted(g_adam),
        "groups_beating_best_tuned": sorted(g_best),
        # At equal schedules (--decayed-baselines): not part of the bar, which compares constant lrs.
        "beats_best_decayed": beats_decayed,
        "groups_beating_best_decayed": sorted(g_decayed),
        "learned_diverged": diverged,
        "learned_stalled": stalled,
        "deep_mlp_ratio_to_adam_default": deep,
        "thresholds": {
            "tasks_vs_adam_default": BAR_TASKS_VS_ADAM,
            "groups_vs_best_tuned": BAR_GROUPS_VS_BEST,
            "deep_mlp_ratio_to_adam_default": BAR_DEEP_MLP_RATIO,
        },
        "bar_applicable": complete,
        "bar_met": bool(met) if complete else None,
    }


# ============================================================================ driver


def machine_description() -> str:
    """CPU model, core count, OS and torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {system}, Python {platform.python_version()}, torch {torch.__version__}"


def plan_jobs(
    task_keys: Sequence[str],
    seeds: int,
    steps_scale: float,
    sweeps: dict[str, Sequence[float]],
    weights: str,
    ablation_plan: Optional[dict[str, dict[str, Any]]] = None,
    bf16_state: bool = False,
    cosine: bool = False,
    tune_learned: bool = False,
    decayed_baselines: bool = False,
    min_steps: int = 1,
    eval_points: int = 50,
    task_overrides: Optional[dict[str, dict[str, Any]]] = None,
) -> list[Job]:
    """Every run of the benchmark, learned optimizer (and its variants) first within each task."""
    jobs = []
    for key in task_keys:
        steps = max(min_steps, int(round(TASKS[key].steps * steps_scale)))
        overrides = tuple(sorted((task_overrides or {}).get(key, {}).items()))
        configs: list[tuple[OptimizerConfig, Optional[str]]] = [(OptimizerConfig("learned", 1.0), weights)]
        for name, p in (ablation_plan or {}).items():
            if p["status"] == "run":
                configs.append((OptimizerConfig("learned", 1.0, name), p["weights"]))
        if bf16_state:  # the weights under test, only the state dtype differs
            configs.append((OptimizerConfig("learned", 1.0, BF16_STATE), weights))
        if cosine:  # the weights under test, only the lr multiplier's schedule differs
            configs.append((OptimizerConfig("learned", 1.0, COSINE), weights))
        if tune_learned:  # lr=1 is the untuned run itself
            configs += [(OptimizerConfig("learned", lr, LR_SWEEP), weights) for lr in LEARNED_SWEEP if lr != 1.0]
        keys = set()
        for kind in BASELINE_KINDS:
            for lr in sweeps[kind]:
                configs.append((OptimizerConfig(kind, float(lr)), None))
                keys.add(OptimizerConfig(kind, float(lr)).key)
        if OptimizerConfig("adam", ADAM_DEFAULT_LR).key not in keys:
            configs.append((OptimizerConfig("adam", ADAM_DEFAULT_LR), None))
        if decayed_baselines:
            configs += [(OptimizerConfig(kind, float(lr), DECAYED), None) for kind in BASELINE_KINDS for lr in sweeps[kind]]
        for config, w in configs:
            for seed in range(seeds):
                jobs.append(Job(key, config, seed, steps, w, min(eval_points, steps), overrides))
    return jobs


def run_benchmark(
    task_keys: Sequence[str],
    out: Path,
    seeds: int = 3,
    steps_scale: float = 1.0,
    quick: bool = False,
    weights: str = "default",
    ablation: bool = False,
    ablation_weights: Optional[dict[str, str]] = None,
    bf16_state: bool = False,
    cosine: bool = False,
    tune_learned: bool = False,
    decayed_baselines: bool = False,
    threads: int = 1,
    workers: int = 1,
    use_cache: bool = True,
    show_progress: bool = True,
    task_overrides: Optional[dict[str, dict[str, Any]]] = None,
    sweeps: Optional[dict[str, Sequence[float]]] = None,
    eval_points: int = 50,
    command: str = "",
) -> dict[str, Any]:
    """Run the benchmark and write ``results.md``, ``results.json`` and the curve PNGs to ``out``.

    Args:
        task_keys: Tasks to run (keys of :data:`TASKS`).
        out: Output folder.
        seeds: Seeds per optimizer setting.
        steps_scale: Multiplies every task's steps (``--quick`` multiplies it by a further 0.2).
        quick: Fewer steps and sweep points.
        weights: Learned-optimizer weights (``default`` or a path).
        ablation: Also run the ablation variants that have weights.
        ablation_weights: Ablation name to weights path.
        bf16_state: Also run the learned optimizer with its state in bfloat16 (variant ``bf16_state``).
        cosine: Also run the learned optimizer with a cosine schedule on its lr multiplier, 1 to 0
            over the run (variant ``cosine``).
        tune_learned: Also run the learned optimizer at the lr multipliers of :data:`LEARNED_SWEEP`
            (variant ``lr_sweep``) and report the best beside the untuned run.
        decayed_baselines: Also run every baseline setting with its learning rate decaying
            linearly to 0 over the last :data:`PARITY_DECAY_FRACTION` of the run (variant
            :data:`DECAYED`), tuned separately: the comparison at the learned default's schedule.
        threads: torch threads per run.
        workers: Runs in parallel processes.
        use_cache: Reuse finished runs from ``out/runs``.
        show_progress: Show tqdm progress bars.
        task_overrides: Per task key, constructor arguments replacing the benchmark's (tests).
        sweeps: Learning rates per baseline kind (default: :data:`SWEEPS`, thinned by ``quick``).
        eval_points: Full training-loss evaluations per run.
        command: The command line, for the report.

    Returns:
        The results dict (what ``results.json`` holds).
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if sweeps is None:
        sweeps = {k: tuple(v[i] for i in QUICK_SWEEP_INDICES) if quick else v for k, v in SWEEPS.items()}
    scale = steps_scale * (QUICK_STEPS_SCALE if quick else 1.0)
    lopt, w = load_lopt(weights)
    plan = plan_ablations(ablation_weights or {}, w.config) if ablation else None
    jobs = plan_jobs(
        task_keys, seeds, scale, sweeps, weights, plan, bf16_state=bf16_state, cosine=cosine,
        tune_learned=tune_learned, decayed_baselines=decayed_baselines, min_steps=QUICK_MIN_STEPS if quick else 1, eval_points=eval_points, task_overrides=task_overrides,
    )  # fmt: skip
    t_runs = time.perf_counter()
    records, executed = run_jobs(
        jobs, out, threads=threads, workers=workers, use_cache=use_cache, show_progress=show_progress
    )
    executed_seconds = time.perf_counter() - t_runs
    tasks: dict[str, Any] = {}
    for key in task_keys:
        spec = TASKS[key]
        by_config: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r["task"] == key:
                by_config.setdefault(r["optimizer"], []).append(r)
        summaries = {k: summarize(sorted(v, key=lambda r: r["seed"])) for k, v in by_config.items()}
        task_result = {
            "key": key,
            "name": spec.name,
            "title": spec.title,
            "group": spec.group,
            "steps": next(iter(by_config.values()))[0]["steps"],
            "num_params": next(iter(by_config.values()))[0]["num_params"],
            "summaries": summaries,
            "analysis": analyse_task(summaries, sweeps),
        }
        fig = plot_task(task_result, out / f"curves_{spec.name}.png")
        task_result["figure"] = fig.name
        tasks[key] = task_result
    results: dict[str, Any] = {
        "meta": {
            "command": command,
            "machine": machine_description(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "quick": quick,
            "seeds": seeds,
            "steps_scale": scale,
            "sweeps": {k: [float(v) for v in vals] for k, vals in sweeps.items()},
            "weights": dataclasses.asdict(w),
            "threads": threads,
            "workers": workers,
            "divergence_factor": DIVERGENCE_FACTOR,
            "runs_total": len(jobs),
            "runs_cached": len(jobs) - executed,
            "runs_executed": executed,
            "run_seconds": executed_seconds,
            "wall_seconds": 0.0,
        },
        "tasks": tasks,
        "bar": bar_summary({k: t["analysis"] for k, t in tasks.items()}, task_keys, full=not quick),
        "runs": records,
    }
    if plan is not None:
        results["ablation"] = {"plan": plan}
    if bf16_state:
        results["bf16_state"] = {
            "variant": BF16_STATE,
            "optimizer": OptimizerConfig("learned", 1.0, BF16_STATE).key,
            "state_dtype": str(STATE_DTYPE_VARIANTS[BF16_STATE]).removeprefix("torch."),
        }
    if cosine:
        results["cosine"] = {"variant": COSINE, "optimizer": OptimizerConfig("learned", 1.0, COSINE).key}
    if tune_learned:
        results["tune_learned"] = {"variant": LR_SWEEP, "sweep": list(LEARNED_SWEEP)}
    if decayed_baselines:
        results["decayed_baselines"] = {"variant": DECAYED, "fraction": PARITY_DECAY_FRACTION}
    results["meta"]["wall_seconds"] = time.perf_counter() - t0
    md = render_markdown(results)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(_clean(results), indent=1))
    results["markdown"] = md
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="lightning-lopt-bench",
        description="Final training loss of the learned optimizer against tuned Adam, RMSProp and SGD with "
        "momentum on held-out tasks; writes results.md, results.json and curves_<task>.png.",
    )
    names = ", ".join(f"{s.key}={s.name}" for s in TASKS.values())
    p.add_argument("--tasks", default="all", help=f"comma-separated task keys or names: {names} (default: all)")
    p.add_argument("--out", default="runs/bench_quality", help="output folder (finished runs are cached in OUT/runs)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3, --quick 1)")
    p.add_argument(
        "--weights", default="default", help="learned-optimizer weights: 'default' or a .safetensors/.ckpt path"
    )
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every task's steps (after --quick's 0.2)")
    p.add_argument(
        "--quick", action="store_true", help="0.2x steps (at least 50), 4 sweep points, 1 seed (the report's header gives the wall time)"
    )
    p.add_argument("--ablation", action="store_true", help="also run the learned-optimizer ablation variants")
    p.add_argument(
        "--ablation-weights",
        default=None,
        metavar="NAME=PATH,...",
        help="meta-trained weights of the variants: " + ", ".join(ABLATIONS),
    )
    p.add_argument(
        "--bf16-state",
        action="store_true",
        help="also run the learned optimizer with its state in bfloat16 (same weights and seeds) and compare",
    )
    p.add_argument(
        "--cosine",
        action="store_true",
        help="also run the learned optimizer with a cosine schedule on its lr multiplier (1 -> 0 over the run), "
        "same weights and seeds",
    )
    p.add_argument(
        "--tune-learned",
        action="store_true",
        help=f"also run the learned optimizer at lr multipliers {', '.join(f'{v:g}' for v in LEARNED_SWEEP)} "
        "(as many as Adam's sweep) and report the best beside the untuned run",
    )
    p.add_argument(
        "--decayed-baselines",
        action="store_true",
        help=f"also sweep every baseline with its lr decaying linearly to 0 over the last {PARITY_DECAY_FRACTION:g} "
        "of the run (the learned default's own decay), tuned separately: the comparison at equal schedules",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: the models are small)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes (default 1)")
    p.add_argument("--no-cache", action="store_true", help="rerun every run instead of reusing OUT/runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lightning-lopt-bench`` and ``python -m lightning_lopt.bench.quality``."""
    args = build_parser().parse_args(argv)
    try:
        keys = resolve_task_keys(args.tasks)
        ablation_weights = parse_ablation_weights(args.ablation_weights)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if ablation_weights and not args.ablation:
        print("error: --ablation-weights needs --ablation", file=sys.stderr)
        return 2
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(shlex.quote(a) for a in ["lightning-lopt-bench", *given])
    try:
        results = run_benchmark(
            keys, Path(args.out), seeds=seeds, steps_scale=args.steps_scale, quick=args.quick, weights=args.weights,
            ablation=args.ablation, ablation_weights=ablation_weights, bf16_state=args.bf16_state,
            cosine=args.cosine, tune_learned=args.tune_learned,
            decayed_baselines=args.decayed_baselines, threads=args.threads, workers=args.jobs,
            use_cache=not args.no_cache, show_progress=not args.no_progress, command=command,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(results["markdown"])
    print(f"Wrote {Path(args.out) / 'results.md'}, results.json and curves_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
