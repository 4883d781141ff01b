"""``LearnedOptimizerMonitor``: the hierarchical RNN's internal state on every logger.

The statistics are computed by :func:`diagnostics_summary` and :func:`diagnostics_histograms`
from the :class:`~lightning_lopt.StepDiagnostics` the step function returns on request, so that
anything holding diagnostics (the optimizer in a Trainer, the inner optimizer of meta-training)
summarises them the same way.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_lopt.hrnn import Layout, StepDiagnostics
from lightning_lopt.optimizer import HierarchicalRNNOptimizer
from lightning_lopt.plots import HISTORY_FILE, HISTORY_FORMAT, plot_history

__all__ = [
    "HISTORY_FILE",
    "HistogramData",
    "LearnedOptimizerMonitor",
    "diagnostics_histograms",
    "diagnostics_summary",
    "quantile_name",
    "timescales",
]

_EPS = torch.finfo(torch.float32).eps
_TINY = 1e-30


def quantile_name(q: float) -> str:
    """Key suffix of quantile ``q``: ``0.1 -> "p10"``, ``0.5 -> "p50"``, ``0.025 -> "p2.5"``."""
    return f"p{round(q * 100, 6):g}"


def timescales(beta_in: Tensor, num_timescales: int) -> Tensor:
    """Momentum timescales in steps, ``1 / (1 - beta_in ** 2**-s)`` for ``s = 0 .. K-1``, shape ``(..., K)``.

    ``1 - beta`` is floored at float32's machine epsilon, so a saturated decay reads as about
    8.4e6 steps instead of infinity.
    """
    return torch.stack(_timescale_list(beta_in, num_timescales), -1)


def _timescale_list(beta_in: Tensor, num_timescales: int) -> list[Tensor]:
    # beta ** 2**-s by repeated square roots: much cheaper than a fractional power.
    beta = beta_in.float().clamp(0.0, 1.0)
    out = []
    for s in range(num_timescales):
        if s:
            beta = beta.sqrt()
        out.append((1.0 - beta).clamp_min_(_EPS).reciprocal_())
    return out


def _sample_index(sizes: Sequence[int], max_samples: int, device: torch.device) -> Optional[Tensor]:
    """Elements the quantiles are taken on: all (None), or a stride through them plus each tensor's first."""
    n = sum(sizes)
    if n <= max_samples:
        return None
    starts = torch.tensor([0, *sizes[:-1]], device=device).cumsum(0)
    strided = torch.arange(0, n, -(-n // max_samples), device=device)
    return torch.unique(torch.cat([strided, starts]))


def _sort_within(values: Tensor, counts: Tensor) -> Tensor:
    """``values`` sorted within consecutive segments of lengths ``counts`` (on an accelerator)."""
    if counts.numel() == 1:
        return torch.sort(values).values
    # One sort for every segment: the key is the segment index plus the value scaled into [0, 0.5].
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=values.device), counts)
    v = values.double()
    lo, hi = v.min(), v.max()
    key = seg.double() + 0.5 * (v - lo) / torch.clamp(hi - lo, min=1e-300)
    return values[torch.sort(key).indices]


def _segment_quantiles(values: Tensor, counts: Tensor, qs: Sequence[float], transform: Any) -> Tensor:
    """Quantiles of ``transform(values)`` within consecutive segments, ``(segments, len(qs), ...)``.

    ``transform`` must be increasing: the order statistics of ``values`` are gathered and only
    those few are transformed, then interpolated linearly as ``torch.quantile`` does.
    """
    if values.device.type == "cpu":
        # NumPy sorts small arrays an order of magnitude faster than torch.sort on the CPU, and
        # does the index arithmetic without torch's per-operation overhead.
        arr = values.detach().numpy()
        cnt = counts.numpy()
        bounds = np.cumsum(cnt)[:-1]
        sorted_np = np.concatenate([np.sort(part) for part in np.split(arr, bounds)])
        first = np.cumsum(cnt) - cnt
        span_np = np.maximum(cnt - 1, 0)
        pos_np = first[:, None] + np.asarray(qs, dtype=np.float64)[None, :] * span_np[:, None]
        lo_np = np.floor(pos_np).astype(np.int64)
        hi_np = np.minimum(lo_np + 1, (first + span_np)[:, None])
        w = torch.from_numpy((pos_np - lo_np).astype(np.float32))
        a, b = transform(torch.from_numpy(sorted_np[lo_np])), transform(torch.from_numpy(sorted_np[hi_np]))
        return a + w.view(*w.shape, *([1] * (a.dim() - w.dim()))) * (b - a)
    sorted_v = _sort_within(values, counts)
    starts = counts.cumsum(0) - counts
    span = (counts - 1).clamp_min(0)
    q = torch.tensor(list(qs), dtype=torch.float64, device=values.device)
    pos = starts.unsqueeze(1).double() + q.unsqueeze(0) * span.unsqueeze(1).double()
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (starts + span).unsqueeze(1))
    weight = (pos - lo.double()).float()
    a, b = transform(sorted_v[lo]), transform(sorted_v[hi])
    return a + weight.view(*weight.shape, *([1] * (a.dim() - weight.dim()))) * (b - a)


_TENSOR_STATS_CACHE: dict[tuple, list[str]] = {}


def _stat_names(num_timescales: int, quantiles: Sequence[float]) -> list[str]:
    """Column names of the statistics, as ``group/stat`` (the tensor name goes between them)."""
    key = (num_timescales, tuple(quantiles))
    if key not in _TENSOR_STATS_CACHE:
        cols = []
        for s in range(num_timescales):
            cols.append(f"timescale/s{s}_mean")
            cols += [f"timescale/s{s}_{quantile_name(q)}" for q in quantiles]
        cols += ["scale_decay/mean", "scale_decay/timescale_mean"]
        cols += ["lr/mean", "lr/median", "lr/min", "lr/max"]
        cols += ["attention/offset_rel_param", "attention/offset_rel_step", "update/rms", "update/ratio"]
        cols += ["tensor_rnn/mean", "tensor_rnn/rms"]
        _TENSOR_STATS_CACHE[key] = cols
    return _TENSOR_STATS_CACHE[key]


def diagnostics_summary(
    diag: StepDiagnostics,
    names: Sequence[str],
    sizes: Union[Sequence[int], Layout],
    *,
    prefix: str = "lopt",
    num_timescales: int = 4,
    quantiles: Sequence[float] = (0.1, 0.5, 0.9),
    per_tensor: bool = True,
    max_samples: int = 2**22,
) -> dict[str, float]:
    """Scalar statistics of one step's diagnostics, over all parameters and per tensor.

    Keys (``<p>`` is ``prefix``; with ``per_tensor``, each key is repeated for every tensor with
    its name after the group, e.g. ``lopt/lr/layer.weight/median``):

    - ``<p>/timescale/s{s}_mean``, ``<p>/timescale/s{s}_p10`` ...: momentum timescale ``s`` in steps,
      ``1/(1 - beta_in ** 2**-s)``: mean and quantiles.
    - ``<p>/scale_decay/mean``, ``<p>/scale_decay/timescale_mean``: the mean-square decay and its
      timescale ``1/(1 - beta_sc)``.
    - ``<p>/lr/mean``, ``median``, ``min``, ``max``: the step size actually applied (group lr included).
    - ``<p>/attention/offset_rel_param`` (``||phi - theta|| / ||theta||``) and
      ``<p>/attention/offset_rel_step`` (``||phi - theta|| / ||update||``).
    - ``<p>/update/rms`` and ``<p>/update/ratio`` (``||update|| / ||theta||``).
    - ``<p>/tensor_rnn/mean``, ``<p>/tensor_rnn/rms``: the tensor RNN's activations.
    - ``<p>/global_rnn/unit_00`` ...: each unit of the global RNN (mean over problems).

    Vectorised over tensors (segment reductions; sorts only for the quantiles), with a single
    transfer to the host.

    Args:
        diag: The diagnostics of one step.
        names: Name of each tensor the diagnostics cover, in flat order.
        sizes: Elements of each tensor, or the step's :class:`~lightning_lopt.Layout`.
        prefix: First component of every key.
        num_timescales: ``K`` of the hierarchical RNN.
        quantiles: Quantiles of the timescales to report.
        per_tensor: Also report every statistic for each tensor.
        max_samples: Quantiles and medians of more elements than this are taken on a strided
            subsample of about this size (means, minima and maxima always use every element).

    Returns:
        A flat dict from key to a Python float.
    """
    sizes = list(sizes.sizes) if isinstance(sizes, Layout) else [int(s) for s in sizes]
    names = list(names)
    t_count, n = len(sizes), sum(sizes)
    if len(names) != t_count:
        raise ValueError(f"Got {len(names)} names for {t_count} tensors.")
    if n != diag.beta_in.numel():
        raise ValueError(f"The tensors hold {n} elements but the diagnostics cover {diag.beta_in.numel()}.")
    if diag.h_tensor.shape[0] != t_count:
        raise ValueError(f"The diagnostics hold {diag.h_tensor.shape[0]} tensor states for {t_count} tensors.")
    k, qs = num_timescales, list(quantiles)
    device = diag.beta_in.device

    with torch.no_grad():
        size_t = torch.tensor(sizes, device=device)
        tid = torch.repeat_interleave(torch.arange(t_count, device=device), size_t)
        beta_in, beta_sc = diag.beta_in.float(), diag.beta_sc.float()
        log_step = diag.log_step_size.float()

        # Per-element columns reduced per tensor: K timescales, beta_sc, its timescale, the applied
        # lr, and the squares of offset, theta and update (for the norms).
        columns = _timescale_list(beta_in, k) + [
            beta_sc,
            (1.0 - beta_sc).clamp_min_(_EPS).reciprocal_(),
            torch.exp(log_step),
            diag.attention_offset.float().square(),
            diag.theta.float().square(),
            diag.update.float().square(),
        ]
        if device.type == "cpu":
            # Tensors are contiguous runs of the flat vector: NumPy's reduceat sums them in float64,
            # far faster than index_add on the CPU.
            starts = np.cumsum([0, *sizes[:-1]])
            sums_t = torch.from_numpy(
                np.stack([np.add.reduceat(col.numpy().astype(np.float64), starts) for col in columns], 1)
            )
            lo_t = torch.from_numpy(np.minimum.reduceat(log_step.numpy(), starts))
            hi_t = torch.from_numpy(np.maximum.reduceat(log_step.numpy(), starts))
        else:
            sums_t = torch.stack([torch.zeros(t_count, device=device).index_add_(0, tid, col) for col in columns], 1)
            lo_t = torch.full((t_count,), math.inf, device=device).scatter_reduce(0, tid, log_step, "amin")
            hi_t = torch.full((t_count,), -math.inf, device=device).scatter_reduce(0, tid, log_step, "amax")

        sample = _sample_index(sizes, max_samples, device)
        b_s = beta_in if sample is None else beta_in[sample]
        l_s = log_step if sample is None else log_step[sample]
        whole = torch.tensor([b_s.numel()], device=device)
        to_tau = functools.partial(timescales, num_timescales=k)
        parts = [
            sums_t.flatten(),
            lo_t,
            hi_t,
            _segment_quantiles(b_s, whole, qs, to_tau).flatten(),  # (1, Q, K)
            _segment_quantiles(l_s, whole, [0.5], torch.exp).flatten(),
        ]
        if per_tensor:
            # The sample keeps the flat order, so each tensor's elements stay contiguous.
            seg_counts = size_t if sample is None else torch.bincount(tid[sample], minlength=t_count)
            parts.append(_segment_quantiles(b_s, seg_counts, qs, to_tau).flatten())  # (T, Q, K)
            parts.append(_segment_quantiles(l_s, seg_counts, [0.5], torch.exp).flatten())
        h = diag.h_tensor.float()
        parts += [h.sum(1), h.square().sum(1), diag.h_global.float().mean(0)]
        # One transfer for everything: a single device synchronisation per logged step.
        packed = torch.cat([part.double() for part in parts]).cpu().numpy()

    # The rest is a few hundred numbers: NumPy on the host, in float64.
    c, q_n, units_n = len(columns), len(qs), diag.h_global.shape[-1]
    take = iter(np.split(packed, np.cumsum([t_count * c, t_count, t_count, q_n * k, 1] + (
        [t_count * q_n * k, t_count] if per_tensor else []) + [t_count, t_count])))
    sums_t, lo_t, hi_t = next(take).reshape(t_count, c), next(take), next(take)
    tau_q, lr_med = next(take).reshape(1, q_n, k), next(take)
    if per_tensor:
        tau_q_t, lr_med_t = next(take).reshape(t_count, q_n, k), next(take)
    h_sum, h_sq, units = next(take), next(take), next(take)
    counts = np.asarray(sizes, dtype=np.float64)
    units_u = diag.h_tensor.shape[-1]

    def block(sums: np.ndarray, count: np.ndarray, tau_qs: np.ndarray, med: np.ndarray, lo: np.ndarray,
              hi: np.ndarray, hs: np.ndarray, hq: np.ndarray, h_count: np.ndarray) -> np.ndarray:
        means = sums / count[:, None]
        off, th, up = (np.sqrt(sums[:, j]) for j in (k + 3, k + 4, k + 5))
        tau = np.concatenate([means[:, None, :k], tau_qs], 1).transpose(0, 2, 1).reshape(len(count), -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            stats = [
                means[:, k], means[:, k + 1], means[:, k + 2], med, np.exp(lo), np.exp(hi),
                off / np.maximum(th, _TINY), off / np.maximum(up, _TINY), up / np.sqrt(count),
                up / np.maximum(th, _TINY), hs / h_count, np.sqrt(hq / h_count),
            ]
        return np.concatenate([tau, np.stack(stats, 1)], 1)

    rows = [
        block(sums_t.sum(0, keepdims=True), np.array([float(n)]), tau_q, lr_med, lo_t.min(keepdims=True),
              hi_t.max(keepdims=True), h_sum.sum(keepdims=True), h_sq.sum(keepdims=True),
              np.array([float(t_count * units_u)]))
    ]
    if per_tensor:
        rows.append(block(sums_t, counts, tau_q_t, lr_med_t, lo_t, hi_t, h_sum, h_sq,
                          np.full(t_count, float(units_u))))
    floats = np.concatenate([r.reshape(-1) for r in rows] + [units]).tolist()

    cols = _stat_names(k, qs)
    keys = [f"{prefix}/{c}" for c in cols]
    if per_tensor:
        for name in names:
            keys += [f"{prefix}/{c.replace('/', '/' + name + '/', 1)}" for c in cols]
    width = max(2, len(str(units_n - 1)))
    keys += [f"{prefix}/global_rnn/unit_{j:0{width}d}" for j in range(units_n)]
    return dict(zip(keys, floats))


@dataclass
class HistogramData:
    """A histogram in the forms W&B and TensorBoard take.

    Attributes:
        counts: Elements per bin.
        edges: Bin edges, one more than ``counts``.
        min: Smallest value.
        max: Largest value.
        num: Number of values.
        sum: Sum of the values.
        sum_squares: Sum of their squares.
    """

    counts: list[float]
    edges: list[float]
    min: float
    max: float
    num: int
    sum: float
    sum_squares: float

    def to_wandb(self) -> Any:
        """A ``wandb.Histogram``."""
        import wandb

        return wandb.Histogram(np_histogram=(self.counts, self.edges))

    def add_to_tensorboard(self, writer: Any, tag: str, step: int) -> None:
        """Write to a TensorBoard ``SummaryWriter`` with ``add_histogram_raw``."""
        writer.add_histogram_raw(
            tag,
            min=self.min,
            max=self.max,
            num=self.num,
            sum=self.sum,
            sum_squares=self.sum_squares,
            bucket_limits=self.edges[1:],
            bucket_counts=self.counts,
            global_step=step,
        )


def _histograms(x: Tensor, bins: int) -> Tensor:
    """Histograms of each row of ``x`` ``(S, n)``, binned on the device so only a few numbers cross
    to the host: ``(S, bins + (bins + 1) + 4)`` = counts, edges, then min, max, sum, sum of squares.
    """
    x = x.float()
    rows = x.shape[0]
    mn, mx = x.min(1).values, x.max(1).values
    flat = mx <= mn
    lo, hi = torch.where(flat, mn - 0.5, mn), torch.where(flat, mx + 0.5, mx)
    idx = ((x - lo[:, None]) / (hi - lo)[:, None] * bins).long().clamp_(0, bins - 1)
    idx += torch.arange(rows, device=x.device)[:, None] * bins
    counts = torch.bincount(idx.reshape(-1), minlength=rows * bins).float().view(rows, bins)
    steps = torch.arange(bins + 1, device=x.device, dtype=torch.float32) / bins
    edges = lo[:, None] + (hi - lo)[:, None] * steps
    moments = torch.stack([mn, mx, x.sum(1), x.square().sum(1)], 1)
    return torch.cat([counts, edges, moments], 1)


def diagnostics_histograms(
    diag: StepDiagnostics,
    *,
    prefix: str = "lopt",
    num_timescales: int = 4,
    bins: int = 64,
    max_samples: int = 2**20,
) -> dict[str, HistogramData]:
    """Histograms over all parameters of one step's diagnostics.

    Keys: ``<prefix>/hist/log10_timescale_s{s}`` for each timescale, ``<prefix>/hist/log10_lr``
    (applied step size), ``<prefix>/hist/log10_attention_offset`` (``|phi - theta|`` of the elements
    where it is not zero; absent without attention) and ``<prefix>/hist/tensor_rnn`` (all activations).

    Args:
        diag: The diagnostics of one step.
        prefix: First component of every key.
        num_timescales: ``K`` of the hierarchical RNN.
        bins: Number of bins.
        max_samples: More elements than this are histogrammed on a strided subsample of about
            this size (the histogram's ``num`` is then the subsample's).
    """
    with torch.no_grad():
        n = diag.beta_in.numel()
        stride = max(1, -(-n // max_samples))
        beta_in, log_step, offset = diag.beta_in[::stride], diag.log_step_size[::stride], diag.attention_offset[::stride]
        # All per-element quantities in one (K + 1, n) block: one histogram pass for all of them.
        rows = torch.cat([torch.log10(timescales(beta_in, num_timescales)).T, (log_step.float() / math.log(10.0))[None]])
        keys = [f"{prefix}/hist/log10_timescale_s{s}" for s in range(num_timescales)] + [f"{prefix}/hist/log10_lr"]
        nums = [rows.shape[1]] * rows.shape[0]
        blocks = [_histograms(rows, bins)]
        offset = offset.float().abs()
        offset = offset[offset > 0]
        if offset.numel():
            keys.append(f"{prefix}/hist/log10_attention_offset")
            nums.append(offset.numel())
            blocks.append(_histograms(torch.log10(offset)[None], bins))
        keys.append(f"{prefix}/hist/tensor_rnn")
        nums.append(diag.h_tensor.numel())
        blocks.append(_histograms(diag.h_tensor.reshape(1, -1), bins))
        packed = torch.cat(blocks).cpu().tolist()
    out = {}
    for key, num, row in zip(keys, nums, packed):
        counts, edges, (mn, mx, total, sq) = row[:bins], row[bins : 2 * bins + 1], row[2 * bins + 1 :]
        out[key] = HistogramData(counts, edges, mn, mx, num, total, sq)
    return out


def _tensorboard_scalars(logger: TensorBoardLogger, metrics: dict[str, float], step: int) -> bool:
    """Write all scalars as one TensorBoard event; False where the writer does not allow it.

    ``log_metrics`` writes one event per key, which for hundreds of keys costs more than
    computing them.
    """
    writer = getattr(logger.experiment, "_get_file_writer", None)
    if writer is None:
        return False
    from tensorboard.compat.proto.summary_pb2 import Summary

    prefix = getattr(logger, "_prefix", "")
    join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
    values = [Summary.Value(tag=f"{prefix}{join}{k}" if prefix else k, simple_value=v) for k, v in metrics.items()]
    writer().add_summary(Summary(value=values), step)
    return True


def _tensorboard_histograms(logger: TensorBoardLogger, hists: dict[str, HistogramData], step: int) -> bool:
    """Write all histograms as one TensorBoard event; False where the writer does not allow it."""
    writer = getattr(logger.experiment, "_get_file_writer", None)
    if writer is None:
        return False
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    values = [
        Summary.Value(
            tag=key,
            histo=HistogramProto(
                min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares,
                bucket_limit=h.edges[1:], bucket=h.counts,
            ),
        )
        for key, h in hists.items()
    ]
    writer().add_summary(Summary(value=values), step)
    return True


@dataclass
class _Pending:
    marker: Optional[StepDiagnostics]
    counters: tuple[int, int]
    decay_factor: float


def _counters(opt: HierarchicalRNNOptimizer) -> tuple[int, int]:
    st = opt.hrnn_state
    return (0, 0) if st is None else (int(st["step"]), int(st["skipped"]))


class LearnedOptimizerMonitor(Callback):
    """Log the internal state of :class:`~lightning_lopt.HierarchicalRNNOptimizer` to every logger.

    Every ``logging_interval`` optimizer steps it asks the optimizer to return diagnostics from its
    next step (other steps compute none) and logs :func:`diagnostics_summary` as scalars to all
    loggers, ``<prefix>/skipped_steps``, ``<prefix>/decay_factor`` (what the logged step multiplied
    ``lr`` by in the decay phase: 1 before it, or while the run's length is unknown), and, on rank zero, :func:`diagnostics_histograms` to
    W&B (``wandb.Histogram``) and TensorBoard (``add_histogram_raw``). At the end of fit it writes
    ``lopt_history.json`` and PNG figures to the log directory (see ``lightning-lopt-plot``).

    The first optimizer found in ``trainer.optimizers`` logs under ``lopt/``, any further one under
    ``lopt{i}/`` with ``i`` its position. Per-tensor keys use the names from
    ``pl_module.named_parameters()``; a tensor without a gradient at a logged step has no
    per-tensor keys at that step. Scalars go to every logger with ``log_metrics`` at the loggers'
    step, independent of ``Trainer(log_every_n_steps)``; a TensorBoard logger gets each logged
    step's scalars and histograms as one event each, since one event per key costs more than
    computing the statistics.

    Args:
        logging_interval: Log every this many optimizer steps (counted like the loggers' step).
        histograms: Log histograms to W&B and TensorBoard loggers.
        per_tensor: Log every statistic for each parameter tensor as well as over all of them.
        plots: Write the history file and PNG figures at the end of fit.
        quantiles: Quantiles of the timescales to log.
        histogram_bins: Bins of each histogram.
        output_dir: Where to write the history and figures; default: the W&B run's files directory
            with a W&B logger first, else ``trainer.log_dir``.

    Attributes:
        history: One record per logged step of this fit (``step``, ``prefix``, ``metrics``,
            ``histograms``), what the history file holds.

    Raises:
        MisconfigurationException: If the Trainer has no logger.
    """

    def __init__(
        self,
        logging_interval: int = 50,
        histograms: bool = True,
        per_tensor: bool = True,
        plots: bool = True,
        quantiles: tuple[float, ...] = (0.1, 0.5, 0.9),
        histogram_bins: int = 64,
        output_dir: Optional[str] = None,
    ) -> None:
        if logging_interval < 1:
            raise MisconfigurationException(f"logging_interval must be a positive integer, got {logging_interval}.")
        if not all(0.0 <= q <= 1.0 for q in quantiles):
            raise MisconfigurationException(f"quantiles must lie in [0, 1], got {quantiles}.")
        self.logging_interval = logging_interval
        self.histograms = histograms
        self.per_tensor = per_tensor
        self.plots = plots
        self.quantiles = tuple(float(q) for q in quantiles)
        self.histogram_bins = histogram_bins
        self.output_dir = output_dir
        self.history: list[dict[str, Any]] = []
        self._pending: dict[int, _Pending] = {}
        self._names: dict[int, str] = {}
        self._warned_no_optimizer = False

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _optimizers(trainer: "pl.Trainer") -> list[tuple[str, HierarchicalRNNOptimizer]]:
        found = []
        for i, opt in enumerate(trainer.optimizers):
            inner = getattr(opt, "optimizer", opt)  # LightningOptimizer wraps the user's optimizer
            if isinstance(inner, HierarchicalRNNOptimizer):
                found.append(("lopt" if not found else f"lopt{i}", inner))
        return found

    @staticmethod
    def _step(trainer: "pl.Trainer") -> int:
        # The step the loggers use (LearningRateMonitor uses the same counter).
        return trainer.fit_loop.epoch_loop._batches_that_stepped

    def _tensor_names(self, opt: HierarchicalRNNOptimizer, indices: Sequence[int]) -> list[str]:
        params = opt.params
        return [self._names.get(id(params[i]), f"param_{i}") for i in indices]

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `LearnedOptimizerMonitor` callback with `Trainer` that has no logger."
            )
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        self._pending = {}
        self.history = []
        if not self._optimizers(trainer) and not self._warned_no_optimizer:
            rank_zero_warn(
                "LearnedOptimizerMonitor found no HierarchicalRNNOptimizer in `trainer.optimizers`; it will log nothing."
            )
            self._warned_no_optimizer = True

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        # Only rank zero logs, so only rank zero pays for diagnostics.
        if not trainer.is_global_zero or self._step(trainer) % self.logging_interval != 0:
            return
        for _, opt in self._optimizers(trainer):
            if id(opt) not in self._pending:
                opt.request_diagnostics()
                self._pending[id(opt)] = _Pending(opt.last_diagnostics, _counters(opt), opt.decay_factor)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending:
            return
        step = self._step(trainer)
        for prefix, opt in self._optimizers(trainer):
            pending = self._pending.get(id(opt))
            if pending is None:
                continue
            diag = opt.last_diagnostics
            fresh = diag is not None and diag is not pending.marker
            if not fresh and _counters(opt) == pending.counters:
                continue  # no step yet (gradient accumulation): keep waiting
            del self._pending[id(opt)]
            metrics: dict[str, float] = {
                f"{prefix}/skipped_steps": float(opt.skipped_steps),
                f"{prefix}/decay_factor": pending.decay_factor,
            }
            hists: dict[str, HistogramData] = {}
            if fresh:
                opt.last_diagnostics = None  # asked for by this callback: release the memory
                summary = self._summarise(opt, diag, prefix)
                if summary is not None:
                    metrics.update(summary)
                    histogram_logger = any(isinstance(lg, (WandbLogger, TensorBoardLogger)) for lg in trainer.loggers)
                    if (self.histograms and histogram_logger) or self.plots:
                        hists = diagnostics_histograms(
                            diag, prefix=prefix, num_timescales=opt.lopt.num_timescales, bins=self.histogram_bins
                        )
            self._log(trainer, metrics, hists if self.histograms else {}, step)
            self.history.append(
                {
                    "step": step,
                    "prefix": prefix,
                    "metrics": metrics,
                    "histograms": {k: {"counts": h.counts, "edges": h.edges} for k, h in hists.items()},
                }
            )

    def _summarise(
        self, opt: HierarchicalRNNOptimizer, diag: StepDiagnostics, prefix: str
    ) -> Optional[dict[str, float]]:
        params = opt.params
        indices = getattr(opt, "last_diagnostics_tensors", None)
        if indices is None:
            indices = range(len(params))
        indices = list(indices)
        sizes = [params[i].numel() for i in indices]
        if sum(sizes) != diag.beta_in.numel():
            rank_zero_warn("LearnedOptimizerMonitor could not match the diagnostics to the parameters; skipped.")
            return None
        return diagnostics_summary(
            diag,
            self._tensor_names(opt, indices),
            sizes,
            prefix=prefix,
            num_timescales=opt.lopt.num_timescales,
            quantiles=self.quantiles,
            per_tensor=self.per_tensor,
        )

    def _log(self, trainer: "pl.Trainer", metrics: dict[str, float], hists: dict[str, HistogramData], step: int) -> None:
        for logger in trainer.loggers:
            if not (isinstance(logger, TensorBoardLogger) and _tensorboard_scalars(logger, metrics, step)):
                logger.log_metrics(metrics, step=step)
        if not hists or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.log({**{k: h.to_wandb() for k, h in hists.items()}, "trainer/global_step": step})
            elif isinstance(logger, TensorBoardLogger) and not _tensorboard_histograms(logger, hists, step):
                for key, h in hists.items():
                    h.add_to_tensorboard(logger.experiment, key, step)

    def _resolve_output_dir(self, trainer: "pl.Trainer") -> Optional[str]:
        if self.output_dir is not None:
            return self.output_dir
        log_dir = trainer.log_dir  # a collective call: every rank must make it
        if trainer.is_global_zero and trainer.loggers and isinstance(trainer.loggers[0], WandbLogger):
            # The run's files directory: `wandb sync` uploads the figures with the run.
            return trainer.loggers[0].experiment.dir
        return log_dir

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.plots:
            return
        out = self._resolve_output_dir(trainer)
        if not trainer.is_global_zero or not self.history or out is None:
            return
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        history_path = path / HISTORY_FILE
        history_path.write_text(json.dumps(self.history_record()) + "\n")
        plot_history(self.history_record(), path)

    def history_record(self) -> dict[str, Any]:
        """What the history file holds: the settings and every logged step's scalars and histograms."""
        return {
            "format": HISTORY_FORMAT,
            "version": 1,
            "logging_interval": self.logging_interval,
            "quantiles": list(self.quantiles),
            "records": self.history,
        }
