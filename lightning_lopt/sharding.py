"""The learned optimizer on sharded parameters: FSDP2 shards (DTensor) and ZeRO partitions.

The update rule reads per-tensor means (the tensor RNN's inputs, the RMS of the directions) and
per-problem means (the log learning rate's, the global RNN's input). A rank that holds only part
of a problem computes its own sums; :class:`ShardReducer` adds the other ranks' sums inside
:meth:`lightning_lopt.hrnn.HierarchicalRNN.step`, so that every rank applies the update the
unsharded optimizer would.

- FSDP2 (``fully_shard``): parameters are DTensors sharded over a 1-D device mesh. Each rank
  steps its local shard, keeps state the size of that shard, and all-reduces the per-tensor sums
  over the mesh's group. Plain (unsharded) parameters beside them are whole on every rank.
- ZeRO (``ZeroRedundancyOptimizer``): each rank's optimizer holds whole tensors, a partition of
  the model. ``problem_group`` names the ranks that together hold the problem; the per-problem
  sums are all-reduced over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_lopt.hrnn import Layout, StepReducer


__all__ = ["ShardReducer", "Sharding", "local_tensor"]

_PER_ELEMENT = ("beta_in", "beta_sc", "log_lr", "theta")
_PER_ELEMENT_MATRIX = ("h_param", "momentum", "mean_square")
_STREAM_CHUNK = 1 << 20


def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def local_tensor(t: Tensor) -> Tensor:
    """The rank's local part of ``t``: the local shard of a DTensor, else ``t`` itself.

    Under ``torch.no_grad`` the result aliases the DTensor's storage, so writing into it updates
    the parameter (how FSDP2 expects an optimizer to update its sharded parameters).
    """
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        return t._local_tensor
    return t


@dataclass(frozen=True)
class _Shard:
    """Where a rank's local elements of one DTensor parameter sit in the whole tensor."""

    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    offset: tuple[int, ...]
    mesh: Any
    placements: tuple[Any, ...]

    def global_indices(self) -> Tensor:
        """Flat indices, in the whole tensor, of the local elements (row-major order)."""
        full = torch.arange(int(torch.Size(self.global_shape).numel())).view(self.global_shape)
        return full[tuple(slice(o, o + s) for o, s in zip(self.offset, self.local_shape))].reshape(-1)


def _shard_of(p: Tensor) -> Optional[_Shard]:
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(p, dtensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or not (placements[0].is_shard() or placements[0].is_replicate()):
        raise NotImplementedError(
            f"HierarchicalRNNOptimizer supports DTensor parameters sharded (Shard) or replicated on a 1-D device "
            f"mesh, as fully_shard makes them; got placements {placements} on a {mesh.ndim}-D mesh."
        )
    if placements[0].is_replicate():
        return None  # whole on every rank: nothing to reduce
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    return _Shard(tuple(p.shape), tuple(local_shape), tuple(offset), mesh, placements)


class ShardReducer(StepReducer):
    """Completes a step's sums across ranks.

    Args:
        shard_group: Group over which the sharded tensors' per-tensor sums are all-reduced.
        sharded: Which tensors of the step's layout are sharded, ``(T,)`` bool; the others are
            whole on every rank and keep their own sums.
        problem_group: Group over which per-problem sums are all-reduced (ZeRO), or None.
    """

    def __init__(self, shard_group: Any, sharded: Optional[Tensor], problem_group: Any) -> None:
        self.shard_group = shard_group
        self.sharded = sharded
        self.problem_group = problem_group

    def tensor_sums(self, x: Tensor) -> Tensor:
        """Sum ``(T, ...)`` per-tensor partial sums over the shards of each tensor."""
        if self.shard_group is None or self.sharded is None:
            return x
        y = x.clone()
        dist.all_reduce(y, group=self.shard_group)
        if not bool(self.sharded.all()):
            # Whole tensors' sums are already complete; an all-reduce would count them once per rank.
            keep = ~self.sharded
            y[keep] = x[keep]
        return y

    def problem_sums(self, x: Tensor) -> Tensor:
        """Sum ``(P, ...)`` per-problem partial sums over the ranks that share the problem."""
        if self.problem_group is None:
            return x
        y = x.clone()
        dist.all_reduce(y, group=self.problem_group)
        return y


class Sharding:
    """How an optimizer's parameters are distributed: which are shards, which group reduces them.

    Args:
        params: The optimizer's parameters, in the flat order of its state.
        problem_group: The ranks whose optimizers together hold one problem (ZeRO), or None.
    """

    def __init__(self, params: Sequence[Tensor], problem_group: Any = None) -> None:
        self.shards = [_shard_of(p) for p in params]
        # fully_shard without a mesh makes one per call: equal meshes (same ranks) share the reduction.
        groups = {s.mesh: s.mesh for s in self.shards if s is not None}
        if len(groups) > 1:
            raise NotImplementedError("HierarchicalRNNOptimizer supports parameters sharded over one device mesh only.")
        self.shard_group = next(iter(groups.values())).get_group() if groups else None
        if self.shard_group is not None and problem_group is not None:
            raise NotImplementedError("problem_group (ZeRO) cannot be combined with sharded (DTensor) parameters.")
        self.problem_group = problem_group
        self.global_numels = [int(p.numel()) for p in params]

    @property
    def distributed(self) -> bool:
        """True when any reduction crosses ranks."""
        return self.shard_group is not None or self.problem_group is not None

    def layout(self, indices: Sequence[int], local_sizes: Sequence[int], device: torch.device) -> Layout:
        """The layout of the local elements of tensors ``indices``, with the whole tensors' counts."""
        return Layout.build(local_sizes, device=device, counts=[self.global_numels[i] for i in indices])

    def reducer(self, indices: Sequence[int], device: torch.device) -> Optional[ShardReducer]:
        """The reducer for a step over tensors ``indices``, or None when nothing is distributed."""
        if not self.distributed:
            return None
        sharded = None
        if self.shard_group is not None:
            sharded = torch.tensor([self.shards[i] is not None for i in indices], device=device)
        return ShardReducer(self.shard_group, sharded, self.problem_group)

    def all_finite(self, finite: bool, device: torch.device) -> bool:
        """Whether every rank's gradient is finite: ranks must skip a step together."""
        group = self.shard_group if self.shard_group is not None else self.problem_group
        if group is None:
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return flag.item() == 0.0

    def initial_log_lr(self, lopt: Any, local_sizes: Sequence[int], seed: int, dtype: torch.dtype,
                       device: torch.device) -> Tensor:
        """The initial log learning rates of the local elements, as the unsharded optimizer draws them.

        :meth:`HierarchicalRNN.init_state` draws one stream: a value per element of the flat
        vector, then one per tensor. A shard takes its elements' values from that stream, so a
        sharded run starts from the unsharded run's state. Under ZeRO the flat vector is the
        concatenation of the ranks' partitions in rank order.
        """
        n_before, t_before = 0, 0
        numels = list(self.global_numels)
        n_total, t_total = sum(numels), len(numels)
        if self.problem_group is not None:
            counts = [None] * dist.get_world_size(self.problem_group)
            dist.all_gather_object(counts, (n_total, t_total), group=self.problem_group)
            rank = dist.get_rank(self.problem_group)
            n_before = sum(c[0] for c in counts[:rank])
            t_before = sum(c[1] for c in counts[:rank])
            n_total = sum(c[0] for c in counts)
            t_total = sum(c[1] for c in counts)
        starts = torch.tensor([0] + numels).cumsum(0).tolist()
        # Each tensor's whole range of per-element values, then this rank's per-tensor values.
        ranges = [(n_before + starts[i], n_before + starts[i + 1]) for i in range(len(numels))]
        ranges.append((n_total + t_before, n_total + t_before + len(numels)))
        pieces = _stream_ranges(lopt, seed, n_total + t_total, ranges)
        per_tensor = pieces[-1]
        parts = []
        for i, (values, shard) in enumerate(zip(pieces[:-1], self.shards)):
            if shard is not None:
                values = values[shard.global_indices()]
            assert values.numel() == local_sizes[i]
            parts.append(values + per_tensor[i])
        return torch.cat(parts).to(device, dtype)

    # ------------------------------------------------------------------ state dict

    def per_parameter_state(self, params: Sequence[Tensor], flat: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """The flat state cut into one entry per parameter, keyed by its index.

        Per-element buffers take the parameter's shape (plus a trailing feature dimension) and,
        for a sharded parameter, become DTensors of the same sharding, which is what
        ``torch.distributed.checkpoint`` saves and reshards. Views: nothing is copied.
        """
        out: dict[int, dict[str, Any]] = {}
        start = 0
        for i, (p, shard) in enumerate(zip(params, self.shards)):
            local = local_tensor(p)
            n = local.numel()
            entry: dict[str, Any] = {}
            for k in _PER_ELEMENT_MATRIX + _PER_ELEMENT:
                t = flat.get(k)
                if t is None:
                    continue
                part = t[start : start + n]
                width = () if t.dim() == 1 else (t.shape[1],)
                part = part.view(*local.shape, *width)
                if shard is not None:
                    part = _as_dtensor(part, shard, width)
                entry[k] = part
            entry["h_tensor"] = flat["h_tensor"][i]
            entry["h_global"] = flat["h_global"][0]
            entry.update(step=int(flat["step"]), skipped=int(flat["skipped"]))
            if "training" in flat:
                entry["training"] = bool(flat["training"])
            out[i] = entry
            start += n
        return out

    @staticmethod
    def flat_state(params: Sequence[Tensor], entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The inverse of :meth:`per_parameter_state`, from entries in the parameters' order."""
        flat: dict[str, Any] = {}
        locals_ = [local_tensor(p) for p in params]
        for k in _PER_ELEMENT_MATRIX + _PER_ELEMENT:
            if k not in entries[0]:
                flat[k] = None
                continue
            parts = []
            for i, (e, local) in enumerate(zip(entries, locals_)):
                t = local_tensor(e[k])
                width = t.shape[-1] if k in _PER_ELEMENT_MATRIX else 1
                if t.numel() != local.numel() * width:
                    raise ValueError(
                        f"The saved HierarchicalRNNOptimizer state of parameter {i} holds {tuple(t.shape)} for "
                        f"'{k}', but this rank holds {local.numel()} elements of that parameter: load it through "
                        "torch.distributed.checkpoint (set_optimizer_state_dict), which reshards."
                    )
                parts.append(t.reshape(local.numel(), width) if k in _PER_ELEMENT_MATRIX else t.reshape(-1))
            flat[k] = torch.cat(parts)
        flat["h_tensor"] = torch.stack([local_tensor(e["h_tensor"]) for e in entries])
        flat["h_global"] = local_tensor(entries[0]["h_global"]).reshape(1, -1).clone()
        flat["step"] = int(entries[0]["step"])
        flat["skipped"] = int(entries[0]["skipped"])
        flat["training"] = bool(entries[0].get("training", True))
        flat["sizes"] = [t.numel() for t in locals_]
        return flat


def _as_dtensor(local: Tensor, shard: _Shard, width: tuple[int, ...]) -> Tensor:
    from torch.distributed.tensor import DTensor

    shape = torch.Size(shard.global_shape + width)
    stride = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        stride[d] = stride[d + 1] * shape[d + 1]
    return DTensor.from_local(local, shard.mesh, shard.placements, run_check=False, shape=shape, stride=tuple(stride))


def _stream_ranges(lopt: Any, seed: int, total: int, ranges: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Values at ``ranges`` of the initial-learning-rate stream of ``init_state``, drawn in chunks
    (CPU draws are the same however the stream is cut), so the whole stream is never held."""
    import math

    low, high = (0.5 * math.log(b) for b in lopt.init_lr_range)
    gen = torch.Generator().manual_seed(seed)
    out = [torch.empty(b - a, dtype=torch.float32) for a, b in ranges]
    end = max((b for _, b in ranges), default=0)
    for c0 in range(0, min(total, end), _STREAM_CHUNK):
        c1 = min(c0 + _STREAM_CHUNK, total)
        chunk = torch.empty(c1 - c0, dtype=torch.float32).uniform_(low, high, generator=gen)
        for (a, b), dst in zip(ranges, out):
            lo, hi = max(a, c0), min(b, c1)
            if lo < hi:
                dst[lo - a : hi - a] = chunk[lo - c0 : hi - c0]
    return out
