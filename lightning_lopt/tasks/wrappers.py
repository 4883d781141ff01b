"""Wrappers that change how a task looks to the optimizer (spec section 6).

A wrapper keeps the wrapped task's ``family`` (family weights and per-family logging refer to
the underlying problem) and shows the wrapping in its ``repr``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from lightning_lopt.tasks.base import Task

__all__ = ["TaskWrapper", "LogObjective", "Rescaled", "ReparamWeights", "SumOfTasks", "SparseGradients", "GradientNoise"]


class TaskWrapper(Task):
    """Forwards everything to ``task``; subclasses override what they change.

    Args:
        task: The wrapped task.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.family = task.family

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """The wrapped task's initial parameters."""
        return self.task.init_params(generator)

    def sample_batch(self, generator: torch.Generator) -> Any:
        """The wrapped task's batch."""
        return self.task.sample_batch(generator)

    def loss(self, params: Sequence[Tensor], batch: Any = None) -> Tensor:
        """The wrapped task's loss."""
        return self.task.loss(params, batch)

    def particle_loss(self, params: Sequence[Tensor], batch: Any = None) -> Optional[Tensor]:
        """The wrapped task's, where this wrapper leaves the loss as it is (else None)."""
        if type(self).loss is not TaskWrapper.loss:
            return None
        return self.task.particle_loss(params, batch)

    def particle_loss_and_grad(self, params: Sequence[Tensor], batch: Any = None) -> Optional[tuple[Tensor, list[Tensor]]]:
        """The wrapped task's, where this wrapper leaves the loss as it is (else None)."""
        if type(self).loss is not TaskWrapper.loss:
            return None
        return self.task.particle_loss_and_grad(params, batch)

    def transform_grads(self, grads: Sequence[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        """The wrapped task's gradient transform, then this wrapper's own noise (if any)."""
        return super().transform_grads(self.task.transform_grads(grads, generator), generator)

    def _args(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self._args()
        return f"{type(self).__name__}({self.task!r}{', ' + extra if extra else ''})"


class LogObjective(TaskWrapper):
    """``log(1 + f)``: >= 0 whenever ``f`` is, and compresses the loss's dynamic range.

    Args:
        task: The wrapped task.
    """

    def loss(self, params: Sequence[Tensor], batch: Any = None) -> Tensor:
        """``log1p`` of the wrapped loss."""
        return torch.log1p(self.task.loss(params, batch))

    def particle_loss(self, params: Sequence[Tensor], batch: Any = None) -> Optional[Tensor]:
        """:meth:`loss` per particle, where the wrapped task has a ``particle_loss``."""
        inner = self.task.particle_loss(params, batch)
        return None if inner is None else torch.log1p(inner)

    def particle_loss_and_grad(self, params: Sequence[Tensor], batch: Any = None) -> Optional[tuple[Tensor, list[Tensor]]]:
        """:meth:`particle_loss` and its gradient, the wrapped one over ``1 + f``."""
        inner = self.task.particle_loss_and_grad(params, batch)
        if inner is None:
            return None
        f, grads = inner
        scale = 1.0 / (1.0 + f)
        return torch.log1p(f), [g * scale.view(-1, *[1] * (g.dim() - 1)) for g in grads]


class Rescaled(TaskWrapper):
    """The optimizer sees ``p / scale``: parameters ``scale`` times smaller, gradients larger.

    Args:
        task: The wrapped task.
        scale: The parameter scale (the paper samples it log-uniformly in 0.123-1000).
    """

    def __init__(self, task: Task, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        super().__init__(task)
        self.scale = float(scale)

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """The wrapped task's initial parameters divided by ``scale``."""
        return [p / self.scale for p in self.task.init_params(generator)]

    def loss(self, params: Sequence[Tensor], batch: Any = None) -> Tensor:
        """The wrapped loss at ``p * scale``."""
        return self.task.loss([p * self.scale for p in params], batch)

    def particle_loss(self, params: Sequence[Tensor], batch: Any = None) -> Optional[Tensor]:
        """:meth:`loss` per particle, where the wrapped task has a ``particle_loss``."""
        return self.task.particle_loss([p * self.scale for p in params], batch)

    def particle_loss_and_grad(self, params: Sequence[Tensor], batch: Any = None) -> Optional[tuple[Tensor, list[Tensor]]]:
        """:meth:`particle_loss` and its gradient (the wrapped one times ``scale``)."""
        inner = self.task.particle_loss_and_grad([p * self.scale for p in params], batch)
        return None if inner is None else (inner[0], [g * self.scale for g in inner[1]])

    def transform_grads(self, grads: Sequence[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        """The wrapped transform, applied in the wrapped task's coordinates."""
        inner = self.task.transform_grads([g / self.scale for g in grads], generator)
        return Task.transform_grads(self, [g * self.scale for g in inner], generator)

    def _args(self) -> str:
        return f"scale={self.scale:.4g}"


class ReparamWeights(TaskWrapper):
    """Each parameter tensor in its own units: the optimizer sees ``p_i / s_i`` (Celo's ``ReparamWeights``).

    The scales ``s_i`` are drawn log-uniformly in ``scale_range`` from ``seed``, one per tensor, so
    the same task looks different tensor by tensor: an update rule that depends on the
    parameters' units fails on it.

    Args:
        task: The wrapped task.
        scale_range: Range of the per-tensor scales, sampled log-uniformly.
        seed: Seed of the scales.
    """

    def __init__(self, task: Task, scale_range: tuple[float, float] = (1e-3, 1e3), seed: int = 0) -> None:
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}.")
        super().__init__(task)
        self.scale_range = (low, high)
        count = len(task.init_params(torch.Generator().manual_seed(0)))
        u = torch.rand(count, generator=torch.Generator().manual_seed(int(seed) % (2**63)), dtype=torch.float64)
        self.scales = [math.exp(math.log(low) + (math.log(high) - math.log(low)) * float(v)) for v in u]

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """The wrapped task's initial parameters, each divided by its scale."""
        return [p / s for p, s in zip(self.task.init_params(generator), self.scales)]

    def loss(self, params: Sequence[Tensor], batch: Any = None) -> Tensor:
        """The wrapped loss at ``p_i * s_i``."""
        return self.task.loss([p * s for p, s in zip(params, self.scales)], batch)

    def particle_loss(self, params: Sequence[Tensor], batch: Any = None) -> Optional[Tensor]:
        """:meth:`loss` per particle, where the wrapped task has a ``particle_loss``."""
        return self.task.particle_loss([p * s for p, s in zip(params, self.scales)], batch)

    def particle_loss_and_grad(self, params: Sequence[Tensor], batch: Any = None) -> Optional[tuple[Tensor, list[Tensor]]]:
        """:meth:`particle_loss` and its gradient (the wrapped one times each tensor's scale)."""
        inner = self.task.particle_loss_and_grad([p * s for p, s in zip(params, self.scales)], batch)
        return None if inner is None else (inner[0], [g * s for g, s in zip(inner[1], self.scales)])

    def transform_grads(self, grads: Sequence[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        """The wrapped transform, applied in the wrapped task's coordinates."""
        inner = self.task.transform_grads([g / s for g, s in zip(grads, self.scales)], generator)
        return Task.transform_grads(self, [g * s for g, s in zip(inner, self.scales)], generator)

    def _args(self) -> str:
        return f"scale_range=({self.scale_range[0]:.3g}, {self.scale_range[1]:.3g})"


class SumOfTasks(Task):
    """Sum of independent tasks: the parameter lists are concatenated, the losses added.

    Batches are tuples with one entry per task; gradient transforms apply per task.

    Args:
        tasks: The summed tasks (at least one).
    """

    def __init__(self, tasks: Sequence[Task]) -> None:
        if not tasks:
            raise ValueError("SumOfTasks needs at least one task.")
        self.tasks = list(tasks)
        self.family = "sum"
        probe = torch.Generator().manual_seed(0)
        self._counts = [len(t.init_params(probe)) for t in self.tasks]

    def _split(self, params: Sequence[Tensor]) -> list[Sequence[Tensor]]:
        out, start = [], 0
        for n in self._counts:
            out.append(params[start : start + n])
            start += n
        return out

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """Each task's initial parameters, concatenated in order."""
        return [p for t in self.tasks for p in t.init_params(generator)]

    def sample_batch(self, generator: torch.Generator) -> Optional[tuple[Any, ...]]:
        """A tuple of the tasks' batches, or None when no task has batches."""
        batches = tuple(t.sample_batch(generator) for t in self.tasks)
        return None if all(b is None for b in batches) else batches

    def loss(self, params: Sequence[Tensor], batch: Optional[tuple[Any, ...]] = None) -> Tensor:
        """Sum of the tasks' losses."""
        batches = (None,) * len(self.tasks) if batch is None else batch
        return sum(t.loss(p, b) for t, p, b in zip(self.tasks, self._split(params), batches))

    def transform_grads(self, grads: Sequence[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        """Each task's transform on its own gradients, then this task's noise (if any)."""
        out = [g for t, gs in zip(self.tasks, self._split(grads)) for g in t.transform_grads(gs, generator)]
        return super().transform_grads(out, generator)

    def __repr__(self) -> str:
        return f"SumOfTasks([{', '.join(repr(t) for t in self.tasks)}])"


class SparseGradients(TaskWrapper):
    """Zeroes each gradient entry independently with probability ``drop_prob`` (paper: 0.99).

    Without a generator (deterministic evaluation, as for gradient noise) gradients pass through.

    Args:
        task: The wrapped task.
        drop_prob: Probability that an entry is zeroed.
    """

    def __init__(self, task: Task, drop_prob: float = 0.99) -> None:
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}.")
        super().__init__(task)
        self.drop_prob = float(drop_prob)

    def transform_grads(self, grads: Sequence[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        """The wrapped transform, then the random mask."""
        grads = super().transform_grads(grads, generator)
        if generator is None:
            return grads
        return [
            g * (torch.rand(g.shape, generator=generator) >= self.drop_prob).to(device=g.device, dtype=g.dtype)
            for g in grads
        ]

    def _args(self) -> str:
        return f"drop_prob={self.drop_prob:.4g}"


class GradientNoise(TaskWrapper):
    """Adds Gaussian noise of standard deviation ``noise`` to every gradient entry.

    Args:
        task: The wrapped task.
        noise: Standard deviation of the noise (per-family levels are set by the distribution).
    """

    def __init__(self, task: Task, noise: float = 1.0) -> None:
        if not (noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"noise must be finite and >= 0, got {noise}.")
        super().__init__(task)
        self.gradient_noise = float(noise)

    def _args(self) -> str:
        return f"noise={self.gradient_noise:.4g}"
