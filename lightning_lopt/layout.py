"""How a flat vector is cut into tensors and independent problems (:class:`Layout`), and the state
of the update rule over it (:class:`HRNNState`), with what a step returns.

The update rule (:mod:`lightning_lopt.hrnn`) works on one flat vector of many tensors; these types
describe that vector and hold no meta-parameters.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["HRNNState", "Layout", "ProblemRows", "StepDiagnostics", "StepOutput", "StepReducer", "is_feature_major"]


class ProblemRows(NamedTuple):
    """Which problem each row of a per-tensor matrix belongs to, for per-problem weights: row ``i``
    is entry ``position[i]`` of problem ``problem[i]``, and no problem has more than ``width`` rows."""

    problem: Tensor
    position: Tensor
    width: int

    @staticmethod
    def of(problem_ids: Tensor) -> "ProblemRows":
        """From non-decreasing problem ids (a :class:`Layout`'s ``problem_ids``); kept per tensor,
        since meta-training steps one layout many times."""
        cached = _PROBLEM_ROWS.get(problem_ids)
        if cached is None:
            first = torch.searchsorted(problem_ids, problem_ids)  # index of each problem's first row
            position = torch.arange(problem_ids.numel(), device=problem_ids.device) - first
            cached = ProblemRows(problem_ids, position, int(position.max()) + 1 if position.numel() else 1)
            _PROBLEM_ROWS[problem_ids] = cached
        return cached


class _TensorCache:
    """Values derived from index tensors, kept while the tensor lives (by identity: a tensor's ``==``
    compares elements, so a ``WeakKeyDictionary`` cannot hold tensors as keys)."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref, Any]] = {}

    def get(self, key: Tensor) -> Any:
        item = self._items.get(id(key))
        return item[1] if item is not None and item[0]() is key else None

    def __setitem__(self, key: Tensor, value: Any) -> None:
        ident = id(key)
        self._items[ident] = (weakref.ref(key, lambda _: self._items.pop(ident, None)), value)


_PROBLEM_ROWS = _TensorCache()
_PROBLEM_STARTS = _TensorCache()
_TENSOR_STARTS = _TensorCache()


def _problem_starts(layout: "Layout") -> Tensor:
    """Where each problem's elements start in the flat vector, and the end: ``(P + 1,)`` int64."""
    starts = _PROBLEM_STARTS.get(layout.problem_elements)
    if starts is None:
        counts = layout.problem_elements.long()
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        _PROBLEM_STARTS[layout.problem_elements] = starts
    return starts


def _tensor_starts(layout: "Layout") -> Tensor:
    """Where each tensor's elements start in the flat vector, and the end: ``(T + 1,)`` int64."""
    starts = _TENSOR_STARTS.get(layout.tensor_ids)
    if starts is None:
        sizes = torch.tensor(layout.sizes, dtype=torch.int64)
        starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        _TENSOR_STARTS[layout.tensor_ids] = starts
    return starts


@dataclass(frozen=True)
class Layout:
    """How a flat vector is cut into tensors, and tensors grouped into independent problems.

    Build it with :meth:`Layout.build`. The tensor-level means of the update rule are segment
    reductions over ``tensor_ids``; the problem-level means are reductions over ``problem_ids``.

    Attributes:
        sizes: Number of elements of each tensor, in flat order.
        problem_ids: Problem index of each tensor, shape ``(T,)``.
        tensor_ids: Tensor index of each element, shape ``(N,)``.
        tensor_counts: Elements per tensor as float, shape ``(T,)``.
        problem_elements: Elements per problem as float, shape ``(P,)``.
        problem_tensors: Tensors per problem as float, shape ``(P,)``.
        num_problems: ``P``.
    """

    sizes: tuple[int, ...]
    problem_ids: Tensor
    tensor_ids: Tensor
    tensor_counts: Tensor
    problem_elements: Tensor
    problem_tensors: Tensor
    num_problems: int

    @staticmethod
    def build(
        sizes: Sequence[int],
        problems: Optional[Sequence[int]] = None,
        device: Union[torch.device, str, None] = None,
        counts: Optional[Sequence[int]] = None,
    ) -> "Layout":
        """Make a layout.

        Args:
            sizes: Number of elements of each tensor, in flat order (all positive).
            problems: Problem index of each tensor (``0 .. P-1``); ``None`` means one problem.
            device: Where the index tensors live.
            counts: Elements of each whole tensor, which the means divide by (default ``sizes``):
                when the flat vector holds one shard of each tensor, the whole tensors' sizes; a
                shard may then be empty.
        """
        sizes = tuple(int(s) for s in sizes)
        if counts is not None:
            counts = tuple(int(c) for c in counts)
            if len(counts) != len(sizes) or any(c <= 0 or s < 0 or s > c for s, c in zip(sizes, counts)):
                raise ValueError(f"Shard sizes {sizes} do not fit whole-tensor counts {counts}.")
        elif not sizes or min(sizes) <= 0:
            raise ValueError(f"A layout needs at least one tensor and no empty tensors, got sizes {sizes}.")
        problems = [0] * len(sizes) if problems is None else [int(p) for p in problems]
        if len(problems) != len(sizes):
            raise ValueError(f"Got {len(problems)} problem indices for {len(sizes)} tensors.")
        num_problems = max(problems) + 1
        if sorted(set(problems)) != list(range(num_problems)):
            raise ValueError(f"Problem indices must cover 0..P-1 without gaps, got {sorted(set(problems))}.")
        size_t = torch.tensor(sizes, dtype=torch.long, device=device)
        problem_ids = torch.tensor(problems, dtype=torch.long, device=device)
        tensor_ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), size_t)
        counts = size_t.to(torch.float32) if counts is None else torch.tensor(counts, dtype=torch.float32, device=device)
        problem_elements = torch.zeros(num_problems, device=device).index_add_(0, problem_ids, counts)
        problem_tensors = torch.zeros(num_problems, device=device).index_add_(0, problem_ids, torch.ones_like(counts))
        return Layout(sizes, problem_ids, tensor_ids, counts, problem_elements, problem_tensors, num_problems)

    @property
    def numel(self) -> int:
        """Total number of elements ``N``."""
        return int(self.tensor_ids.numel())

    @property
    def num_tensors(self) -> int:
        """Number of tensors ``T``."""
        return len(self.sizes)

    def problem_sum(self, values: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Sum over each problem's elements of flat ``values`` (shape ``(N,)``) -> ``(P,)``.

        Problems are contiguous runs of the flat vector; a layout of one problem (an optimizer's)
        needs a single reduction, where a scatter over ``N`` elements would cost several times more.
        """
        dtype = dtype or values.dtype
        if self.num_problems == 1:
            return values.sum(dtype=dtype).reshape(1)
        per_tensor = values.new_zeros(self.num_tensors, dtype=dtype).index_add(0, self.tensor_ids, values.to(dtype))
        return per_tensor.new_zeros(self.num_problems).index_add(0, self.problem_ids, per_tensor)

    def tensor_mean(self, values: Tensor) -> Tensor:
        """Mean over each tensor's elements of ``values`` (shape ``(N, ...)``) -> ``(T, ...)``."""
        total = values.new_zeros((self.num_tensors, *values.shape[1:])).index_add(0, self.tensor_ids, values)
        return total / self.tensor_counts.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))


class StepReducer:
    """Completes the sums of a step that sees only part of a problem (sharded parameters).

    The step sums over its own elements and tensors; a reducer adds the other parts' sums, so
    that the same update rule serves a whole problem or one rank's part of it. With a reducer,
    the layout's counts are the whole tensors' (see ``Layout.build(counts=...)``). This base
    class reduces nothing; :class:`lightning_lopt.sharding.ShardReducer` reduces across ranks.
    """

    def tensor_sums(self, x: Tensor) -> Tensor:
        """Complete ``(T, ...)`` per-tensor sums (parts of a tensor held elsewhere)."""
        return x

    def problem_sums(self, x: Tensor) -> Tensor:
        """Complete ``(P, ...)`` per-problem sums (tensors of the problem held elsewhere)."""
        return x


class HRNNState(NamedTuple):
    """The optimizer state of the hierarchical RNN, for ``N`` elements, ``T`` tensors, ``P`` problems.

    Attributes:
        h_param: Parameter-RNN state, ``(N, param_units)``.
        momentum: Accumulators ``a_s`` at each timescale, ``(N, K)``.
        mean_square: Running mean squares ``v_s`` of the accumulators, ``(N, K)``.
        beta_in: Momentum decay predicted at the previous step, ``(N,)`` (0 at the first step).
        beta_sc: Mean-square decay predicted at the previous step, ``(N,)`` (0 at the first step).
        log_lr: Smoothed log learning rate ``eta``, ``(N,)``.
        theta: The true parameters when attention is on (the model holds the attended point);
            ``None`` otherwise.
        h_tensor: Per-tensor state, ``(T, tensor_units)``: the tensor RNN's; with ``lr_adaptation``
            one more column, the tensor's log step gain.
        h_global: Per-problem state, ``(P, global_units)``: the global RNN's; with ``lr_adaptation``
            two more columns, the running mean of the log loss and its weight (0: no loss seen).
    """

    h_param: Tensor
    momentum: Tensor
    mean_square: Tensor
    beta_in: Tensor
    beta_sc: Tensor
    log_lr: Tensor
    theta: Optional[Tensor]
    h_tensor: Tensor
    h_global: Tensor

    def detach(self) -> "HRNNState":
        """The same state cut from the autograd graph (for truncated backpropagation)."""
        return HRNNState(*(None if t is None else t.detach() for t in self))


@dataclass
class StepDiagnostics:
    """What the step computed, for monitoring. Only returned when asked for.

    Attributes:
        beta_in: Next momentum decay per element, ``(N,)``; timescale ``s`` is
            ``beta_in ** (2 ** -s)``.
        beta_sc: Next mean-square decay per element, ``(N,)``.
        log_step_size: Log of the step size actually applied (``eta_step + c + log(lr)``), ``(N,)``.
        update: ``theta_new - theta_old``, ``(N,)``.
        attention_offset: ``phi_new - theta_new`` (zeros without attention), ``(N,)``.
        theta: The new true parameters, ``(N,)``.
        h_tensor: New tensor-RNN state, ``(T, tensor_units)``.
        h_global: New global-RNN state, ``(P, global_units)``.
    """

    beta_in: Tensor
    beta_sc: Tensor
    log_step_size: Tensor
    update: Tensor
    attention_offset: Tensor
    theta: Tensor
    h_tensor: Tensor
    h_global: Tensor


class StepOutput(NamedTuple):
    """Result of :meth:`HierarchicalRNN.step`.

    Attributes:
        point: Where the model should be for the next gradient: the attended point ``phi`` with
            attention, else the new true parameters.
        state: The new optimizer state.
        diagnostics: A :class:`StepDiagnostics` when asked for, else None.
    """

    point: Tensor
    state: HRNNState
    diagnostics: Optional[StepDiagnostics]


def is_feature_major(t: Tensor) -> bool:
    """True when ``t`` is 2-D with each column contiguous (its transpose is contiguous): the layout
    in which the fused kernel reads a tile's column with one vector load."""
    return t.dim() == 2 and t.stride(0) == 1 and t.t().is_contiguous()
