"""Measure one meta-parameter's derivative of a whole-horizon objective, three ways.

The short-horizon bias shows as a sign: the finite difference of the whole-horizon objective says
one thing, the mean of truncated-backprop gradients another. The ES estimators (PES, ES-Single)
perturbing only that meta-parameter give per-pair estimates whose mean and spread show their bias
and variance. ``python -m lightning_lopt.bench.estimators`` prints these figures.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from lightning_lopt.hrnn import HierarchicalRNN, Layout
from lightning_lopt.meta.module import TaskSlot, run_inner
from lightning_lopt.meta.pes import ParticleSlot, antithetic, clipped_meta_loss, flat_meta_parameters, unroll_particles
from lightning_lopt.tasks import Task

__all__ = [
    "start_task",
    "particles_of",
    "parameter_index",
    "whole_horizon_objective",
    "finite_difference",
    "tbptt_derivative",
    "es_derivatives",
    "summary",
]

TaskFactory = Callable[[], Task]


def start_task(lopt: HierarchicalRNN, task: Task, length: int, seed: int = 0) -> TaskSlot:
    """A fresh task slot: parameters and optimizer state from ``seed``, and the initial loss."""
    gen = torch.Generator().manual_seed(seed)
    params = task.init_params(gen)
    point = torch.cat([p.reshape(-1) for p in params])
    slot = TaskSlot(seed=seed, task=task, length=length, shapes=[p.shape for p in params], generator=gen)
    slot.point = point
    slot.state = lopt.init_state(Layout.build([p.numel() for p in params]), theta=point, generator=gen)
    with torch.no_grad():
        slot.initial_loss = task.loss(params, task.sample_batch(gen)).detach()
    return slot


def particles_of(slot: TaskSlot, count: int) -> ParticleSlot:
    """``count`` identical particles at ``slot``'s point and state, sharing its generator."""
    return ParticleSlot.from_task_slot(slot, count)


def parameter_index(lopt: HierarchicalRNN, name: str) -> int:
    """Offset of the (first element of the) meta-parameter ``name`` in the flat meta-parameters."""
    offset = 0
    for n, p in lopt.named_parameters():
        if n == name:
            return offset
        offset += p.numel()
    raise KeyError(f"No meta-parameter {name!r}; names: {[n for n, _ in lopt.named_parameters()]}.")


def whole_horizon_objective(lopt: HierarchicalRNN, task_fn: TaskFactory, horizon: int, seed: int = 0,
                            loss_max: float = 1.0) -> float:
    """Mean over all ``horizon`` steps of the clipped ``log(f_t / f_0)``; ``loss_max`` if the run diverged."""
    slot = start_task(lopt, task_fn(), horizon, seed)
    with torch.no_grad():
        _, hist, _ = run_inner(lopt, [slot], horizon)
    if len(hist[0]) < horizon:
        return loss_max
    return float(clipped_meta_loss(torch.tensor(hist[0]), slot.initial_loss, loss_max).mean())


def finite_difference(lopt: HierarchicalRNN, task_fn: TaskFactory, horizon: int, name: str, h: float,
                      seed: int = 0) -> float:
    """Central difference of :func:`whole_horizon_objective` in the scalar meta-parameter ``name``."""
    param = dict(lopt.named_parameters())[name]
    start = param.detach().clone()
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            param.copy_(start + sign * h)
        values.append(whole_horizon_objective(lopt, task_fn, horizon, seed))
    with torch.no_grad():
        param.copy_(start)
    return (values[0] - values[1]) / (2 * h)


def tbptt_derivative(lopt: HierarchicalRNN, task_fn: TaskFactory, horizon: int, truncation: int, name: str,
                     seed: int = 0) -> float:
    """Mean over a horizon of the first-order truncated-backprop gradients of the scalar ``name``."""
    slot = start_task(lopt, task_fn(), horizon, seed)
    param = dict(lopt.named_parameters())[name]
    total, count = 0.0, 0
    while not slot.finished:
        lopt.zero_grad()
        meta_loss, _, _ = run_inner(lopt, [slot], truncation)
        if meta_loss is None:
            break
        meta_loss.backward()
        total, count = total + float(param.grad), count + 1
    lopt.zero_grad()
    return total / max(count, 1)


def es_derivatives(
    lopt: HierarchicalRNN,
    task_fn: TaskFactory,
    horizon: int,
    truncation: int,
    name: str,
    pairs: int,
    sigma: float,
    estimator: str = "pes",
    seed: int = 0,
) -> Tensor:
    """Per-pair ES estimates of the whole-horizon derivative in ``name``, perturbing only it.

    Args:
        estimator: ``"pes"`` (fresh perturbations each truncation, summed into xi) or
            ``"es_single"`` (one perturbation per pair for the whole run).

    Returns:
        ``(pairs,)`` estimates; their mean estimates the derivative of the smoothed objective.
    """
    if estimator not in ("pes", "es_single"):
        raise ValueError(f"estimator must be 'pes' or 'es_single', got {estimator!r}.")
    theta = flat_meta_parameters(lopt)
    j = parameter_index(lopt, name)
    noise = torch.Generator().manual_seed(1000 + seed)
    slot = particles_of(start_task(lopt, task_fn(), horizon, seed), 2 * pairs)
    fixed = torch.zeros(pairs, theta.numel())
    fixed[:, j] = sigma * torch.randn(pairs, generator=noise)
    xi = torch.zeros(pairs, theta.numel())
    total = torch.zeros(pairs)
    while not slot.finished:
        if estimator == "es_single":
            eps = xi = fixed
        else:
            eps = torch.zeros(pairs, theta.numel())
            eps[:, j] = sigma * torch.randn(pairs, generator=noise)
            xi = xi + eps
        losses, ran, _ = unroll_particles(lopt, slot, antithetic(theta, eps), truncation, 1.0)
        if losses is None:
            break
        # Each truncation's estimate weighted by its steps: the whole horizon's objective is their mean.
        total += xi[:, j] * (losses[:pairs] - losses[pairs:]) / (2 * sigma**2) * ran
    return total / horizon


def summary(values: Tensor) -> tuple[float, float]:
    """``(mean, standard error)`` of per-pair estimates."""
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))
