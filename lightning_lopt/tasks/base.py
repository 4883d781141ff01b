"""The functional task interface that meta-training and the benchmarks optimise."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Task", "NegativeLossError", "make_generator", "randn", "uniform", "sample_rows"]


class NegativeLossError(ValueError):
    """A task returned a loss below zero; the meta-objective needs losses >= 0."""


class Task:
    """A small optimisation problem, written functionally.

    A task owns its fixed data (made from a seed in the constructor, on the CPU), makes initial
    parameters from a generator, samples batches, and returns a loss >= 0 for given parameters.
    Subclasses set ``family`` and implement :meth:`init_params` and :meth:`loss`; stochastic
    tasks also implement :meth:`sample_batch`.

    Attributes:
        family: Name of the task family (used for family weights and per-family logging).
        gradient_noise: Standard deviation of additive Gaussian noise on the gradient.
    """

    family: str = "task"
    gradient_noise: float = 0.0

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """Initial parameter tensors (on the CPU), drawn from ``generator``."""
        raise NotImplementedError

    def sample_batch(self, generator: torch.Generator) -> Any:
        """A batch for :meth:`loss` (CPU tensors or None); full-batch tasks return None."""
        return None

    def loss(self, params: Sequence[Tensor], batch: Any) -> Tensor:
        """Scalar loss >= 0 of ``params`` on ``batch``; differentiable in ``params``."""
        raise NotImplementedError

    def particle_loss(self, params: Sequence[Tensor], batch: Any) -> Optional[Tensor]:
        """:meth:`loss` of many parameter sets at once, for meta-training's particles: each tensor of
        ``params`` has a leading particle dimension ``P``, and the result is ``(P,)``; the same
        function as :meth:`loss`, without ``torch.func.vmap``'s per-call cost. None (the default)
        when a task does not provide it: the caller then vmaps :meth:`loss`."""
        return None

    def particle_loss_and_grad(self, params: Sequence[Tensor], batch: Any) -> Optional[tuple[Tensor, list[Tensor]]]:
        """:meth:`particle_loss` and each particle's gradient of its own loss, ``((P,), [like
        params])``, computed by hand where a task writes it out: autograd's per-operation cost is
        most of a small task's gradient. None (the default): the caller differentiates
        :meth:`particle_loss`."""
        return None

    def checked_loss(self, params: Sequence[Tensor], batch: Any) -> Tensor:
        """:meth:`loss`, raising :class:`NegativeLossError` when it is below zero."""
        value = self.loss(params, batch)
        if bool((value.detach() < 0).any()):
            raise NegativeLossError(
                f"Task {self!r} (family {self.family!r}) returned a negative loss {float(value.detach()):.4g}; "
                "the meta-objective log(f_t / f_0) needs losses >= 0. Shift or square the objective."
            )
        return value

    def transform_grads(self, grads: Sequence[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        """The gradient the optimizer sees: by default plus Gaussian noise of ``gradient_noise``."""
        if self.gradient_noise <= 0 or generator is None:
            return list(grads)
        return [
            g + self.gradient_noise * torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device)
            for g in grads
        ]

    def to(self, device: torch.device | str) -> "Task":
        """Move every tensor attribute (and nested task) to ``device``; returns self."""
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
            elif isinstance(value, Task):
                value.to(device)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Task) for v in value):
                for v in value:
                    v.to(device)
        return self

    @property
    def num_params(self) -> int:
        """Number of scalar parameters (draws one initialisation)."""
        return sum(p.numel() for p in self.init_params(torch.Generator().manual_seed(0)))

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
            for k, v in vars(self).items()
            if isinstance(v, (int, float, str, bool))
        )
        return f"{type(self).__name__}({fields})"


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``; tasks draw their fixed data only from such generators."""
    return torch.Generator().manual_seed(int(seed) % (2**63))


def randn(shape: Sequence[int], generator: torch.Generator, std: float = 1.0) -> Tensor:
    """Float32 CPU normal draws with standard deviation ``std``."""
    return std * torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def uniform(shape: Sequence[int], generator: torch.Generator, low: float, high: float) -> Tensor:
    """Float32 CPU uniform draws on ``[low, high)``."""
    return low + (high - low) * torch.rand(tuple(shape), generator=generator, dtype=torch.float32)


def sample_rows(generator: torch.Generator, num_rows: int, batch_size: int, device: torch.device) -> Tensor:
    """Row indices of a minibatch, drawn with replacement on the CPU and moved to ``device``."""
    return torch.randint(num_rows, (batch_size,), generator=generator).to(device)
