"""``LearnedOptimizerMonitor``: the hierarchical RNN's internal state on every logger.

The statistics are computed by :func:`diagnostics_summary` and :func:`diagnostics_histograms`
from the :class:`~lightning_lopt.StepDiagnostics` the step function returns on request, so that
anything holding diagnostics (the optimizer in a Trainer, the inner optimizer of meta-training)
summarises them the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_lopt.hrnn import Layout, StepDiagnostics
from lightning_lopt.optimizer import HierarchicalRNNOptimizer

__all__ = [
    "HISTORY_FILE",
    "HistogramData",
    "LearnedOptimizerMonitor",
    "diagnostics_histograms",
    "diagnostics_summary",
    "quantile_name",
    "timescales",
]

HISTORY_FILE = "lopt_history.json"
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
    exponents = torch.pow(2.0, -torch.arange(num_timescales, dtype=torch.float32, device=beta_in.device))
    betas = beta_in.float().clamp(0.0, 1.0).unsqueeze(-1) ** exponents
    return 1.0 / (1.0 - betas).clamp_min(_EPS)


def _sample_index(sizes: Sequence[int], max_samples: int, device: torch.device) -> Optional[Tensor]:
    """Elements the quantiles are taken on: all (None), or a stride through them plus each tensor's first."""
    n = sum(sizes)
    if n <= max_samples:
        return None
    starts = torch.tensor([0, *sizes[:-1]], device=device).cumsum(0)
    strided = torch.arange(0, n, -(-n // max_samples), device=device)
    return torch.unique(torch.cat([strided, starts]))


def _segment_quantiles(values: Tensor, seg: Tensor, num_segments: int, qs: Sequence[float], transform: Any) -> Tensor:
    """Quantiles of ``transform(values)`` within each segment, ``(num_segments, len(qs))``.

    ``transform`` must be increasing: the order statistics of ``values`` are gathered and only
    those few are transformed, then interpolated linearly as ``torch.quantile`` does. One sort
    serves every segment: the key is the segment index plus the value scaled into ``[0, 0.5]``.
    """
    v = values.double()
    lo_v, hi_v = v.min(), v.max()
    scaled = (v - lo_v) / torch.clamp(hi_v - lo_v, min=1e-300)
    order = torch.sort(seg.double() + 0.5 * scaled).indices
    sorted_v = values[order]
    counts = torch.bincount(seg, minlength=num_segments)
    starts = counts.cumsum(0) - counts
    last = starts + (counts - 1).clamp_min(0)
    q = torch.tensor(list(qs), dtype=torch.float64, device=values.device)
    pos = starts.unsqueeze(1).double() + q.unsqueeze(0) * (counts - 1).clamp_min(0).unsqueeze(1).double()
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, last.unsqueeze(1))
    weight = (pos - lo.double()).float()
    a, b = transform(sorted_v[lo]), transform(sorted_v[hi])
    return a + weight.view(*weight.shape, *([1] * (a.dim() - weight.dim()))) * (b - a)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return num / den.clamp_min(_TINY)


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

    Vectorised over tensors (segment reductions, one sort per quantity), with a single transfer
    to the host.

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
        count = size_t.float()

        def seg_sum(x: Tensor) -> Tensor:
            return torch.zeros(t_count, device=device).index_add_(0, tid, x.float())

        beta_in, beta_sc = diag.beta_in.float(), diag.beta_sc.float()
        log_step = diag.log_step_size.float()
        exps = [2.0**-s for s in range(k)]

        def to_tau(b: Tensor) -> Tensor:
            b = b.float().clamp(0.0, 1.0)
            return torch.stack([1.0 / (1.0 - b**e).clamp_min(_EPS) for e in exps], -1)

        # Sums per tensor: (T, C); the totals over all tensors are their column sums.
        sums = [seg_sum(1.0 / (1.0 - beta_in**e).clamp_min(_EPS)) for e in exps]
        sums += [seg_sum(beta_sc), seg_sum(1.0 / (1.0 - beta_sc).clamp_min(_EPS)), seg_sum(torch.exp(log_step))]
        sums += [seg_sum(diag.attention_offset.float().square()), seg_sum(diag.theta.float().square())]
        sums += [seg_sum(diag.update.float().square())]
        sums_t = torch.stack(sums, 1)
        total = sums_t.sum(0)
        tau_mean_t, tau_mean = sums_t[:, :k] / count.unsqueeze(1), total[:k] / n
        rest_t, rest = sums_t[:, k:] / count.unsqueeze(1), total[k:] / n  # means of the remaining columns

        sample = _sample_index(sizes, max_samples, device)
        b_s = beta_in if sample is None else beta_in[sample]
        l_s = log_step if sample is None else log_step[sample]
        zeros = torch.zeros_like(b_s, dtype=torch.long)
        tau_q = _segment_quantiles(b_s, zeros, 1, qs, to_tau)[0]  # (Q, K)
        lr_med = _segment_quantiles(l_s, zeros, 1, [0.5], torch.exp)[0, 0]

        def block(tau_m: Tensor, tau_qs: Tensor, means: Tensor, med: Tensor, lo: Tensor, hi: Tensor, h: Tensor) -> Tensor:
            # means: (..., 6) = beta_sc, sc timescale, lr, offset^2, theta^2, update^2 (mean squares)
            off, th, up = means[..., 3].sqrt(), means[..., 4].sqrt(), means[..., 5].sqrt()
            tau_part = torch.cat([tau_m.unsqueeze(-2), tau_qs], -2).transpose(-1, -2).flatten(-2)
            return torch.cat(
                [
                    tau_part,
                    torch.stack(
                        [
                            means[..., 0], means[..., 1], means[..., 2], med, torch.exp(lo), torch.exp(hi),
                            _ratio(off, th), _ratio(off, up), up, _ratio(up, th),
                            h.mean(-1), h.square().mean(-1).sqrt(),
                        ],
                        -1,
                    ),
                ],
                -1,
            )

        h_all = diag.h_tensor.float().reshape(-1)
        overall = block(tau_mean, tau_q, rest, lr_med, log_step.min(), log_step.max(), h_all)
        parts = [overall]
        if per_tensor:
            tid_s = tid if sample is None else tid[sample]
            tau_q_t = _segment_quantiles(b_s, tid_s, t_count, qs, to_tau)  # (T, Q, K)
            lr_med_t = _segment_quantiles(l_s, tid_s, t_count, [0.5], torch.exp)[:, 0]
            lo_t = torch.full((t_count,), math.inf, device=device).scatter_reduce(0, tid, log_step, "amin")
            hi_t = torch.full((t_count,), -math.inf, device=device).scatter_reduce(0, tid, log_step, "amax")
            parts.append(block(tau_mean_t, tau_q_t, rest_t, lr_med_t, lo_t, hi_t, diag.h_tensor.float()).reshape(-1))
        units = diag.h_global.float().mean(0)
        parts.append(units)
        # One transfer for everything: a single device synchronisation per logged step.
        floats = torch.cat(parts).cpu().tolist()

    cols = _stat_names(k, qs)
    keys = [f"{prefix}/{c}" for c in cols]
    if per_tensor:
        for name in names:
            keys += [f"{prefix}/{c.replace('/', '/' + name + '/', 1)}" for c in cols]
    width = max(2, len(str(units.numel() - 1)))
    keys += [f"{prefix}/global_rnn/unit_{j:0{width}d}" for j in range(units.numel())]
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


def _histogram(x: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    # Binned on the device, so only `bins` numbers cross to the host.
    x = x.float().reshape(-1)
    mn, mx = x.min(), x.max()
    flat = mx <= mn
    lo, hi = torch.where(flat, mn - 0.5, mn), torch.where(flat, mx + 0.5, mx)
    idx = ((x - lo) / (hi - lo) * bins).long().clamp_(0, bins - 1)
    counts = torch.bincount(idx, minlength=bins).float()
    edges = lo + (hi - lo) * torch.arange(bins + 1, device=x.device, dtype=torch.float32) / bins
    moments = torch.stack([mn, mx, x.sum(), x.square().sum()])
    return counts, edges, moments


def diagnostics_histograms(
    diag: StepDiagnostics,
    *,
    prefix: str = "lopt",
    num_timescales: int = 4,
    bins: int = 64,
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
    """
    with torch.no_grad():
        sources: dict[str, Tensor] = {}
        taus = timescales(diag.beta_in, num_timescales)
        for s in range(num_timescales):
            sources[f"{prefix}/hist/log10_timescale_s{s}"] = torch.log10(taus[:, s])
        sources[f"{prefix}/hist/log10_lr"] = diag.log_step_size.float() / math.log(10.0)
        offset = diag.attention_offset.float().abs()
        offset = offset[offset > 0]
        if offset.numel():
            sources[f"{prefix}/hist/log10_attention_offset"] = torch.log10(offset)
        sources[f"{prefix}/hist/tensor_rnn"] = diag.h_tensor
        parts = [_histogram(v, bins) for v in sources.values()]
        nums = [v.numel() for v in sources.values()]
        packed = torch.cat([torch.cat(p) for p in parts]).cpu().tolist()
    out = {}
    width = 2 * bins + 1 + 4
    for i, (key, num) in enumerate(zip(sources, nums)):
        row = packed[i * width : (i + 1) * width]
        counts, edges, (mn, mx, total, sq) = row[:bins], row[bins : 2 * bins + 1], row[2 * bins + 1 :]
        out[key] = HistogramData(counts, edges, mn, mx, num, total, sq)
    return out


@dataclass
class _Pending:
    marker: Optional[StepDiagnostics]
    counters: tuple[int, int]


def _counters(opt: HierarchicalRNNOptimizer) -> tuple[int, int]:
    st = opt.hrnn_state
    return (0, 0) if st is None else (int(st["step"]), int(st["skipped"]))


class LearnedOptimizerMonitor(Callback):
    """Log the internal state of :class:`~lightning_lopt.HierarchicalRNNOptimizer` to every logger.

    Every ``logging_interval`` optimizer steps it asks the optimizer to return diagnostics from its
    next step (other steps compute none) and logs :func:`diagnostics_summary` as scalars to all
    loggers, ``<prefix>/skipped_steps``, and, on rank zero, :func:`diagnostics_histograms` to
    W&B (``wandb.Histogram``) and TensorBoard (``add_histogram_raw``). At the end of fit it writes
    ``lopt_history.json`` and PNG figures to the log directory (see ``lightning-lopt-plot``).

    The first optimizer found in ``trainer.optimizers`` logs under ``lopt/``, any further one under
    ``lopt{i}/`` with ``i`` its position. Per-tensor keys use the names from
    ``pl_module.named_parameters()``.

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
                self._pending[id(opt)] = _Pending(opt.last_diagnostics, _counters(opt))

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
            metrics: dict[str, float] = {f"{prefix}/skipped_steps": float(opt.skipped_steps)}
            hists: dict[str, HistogramData] = {}
            if fresh:
                opt.last_diagnostics = None  # asked for by this callback: release the memory
                summary = self._summarise(opt, diag, prefix)
                if summary is not None:
                    metrics.update(summary)
                    if self.histograms or self.plots:
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
            logger.log_metrics(metrics, step=step)
        if not hists or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.log({**{k: h.to_wandb() for k, h in hists.items()}, "trainer/global_step": step})
            elif isinstance(logger, TensorBoardLogger):
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
        from lightning_lopt.plots import plot_history

        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        history_path = path / HISTORY_FILE
        history_path.write_text(json.dumps(self.history_record()) + "\n")
        plot_history(self.history_record(), path)

    def history_record(self) -> dict[str, Any]:
        """What the history file holds: the settings and every logged step's scalars and histograms."""
        return {
            "format": "lightning_lopt.monitor_history",
            "version": 1,
            "logging_interval": self.logging_interval,
            "quantiles": list(self.quantiles),
            "records": self.history,
        }
