"""``MetaTrainingModule``: meta-train the hierarchical RNN by truncated unrolls over sampled tasks."""

from __future__ import annotations

import math
import time
import warnings
from fnmatch import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.autograd.profiler import record_function

from lightning_lopt.hrnn import HierarchicalRNN, HRNNState, Layout, StepDiagnostics, _read_weights
from lightning_lopt.meta.pes import (
    ESTIMATORS,
    ParticleSlot,
    _to_device,
    antithetic,
    draw_perturbations,
    flat_meta_parameters,
    pes_estimate,
    unroll_particle_slots,
    unroll_particles,
)
from lightning_lopt.tasks import Task, TaskDistribution
from lightning_lopt.verdict import validation_verdict

__all__ = ["MetaTrainingModule", "TaskSlot", "run_inner", "meta_objective_terms", "validation_verdict"]


def _split_params(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [v.view(s) for v, s in zip(flat.split(sizes), shapes)]


def meta_objective_terms(loss: Tensor, initial_loss: Tensor) -> Tensor:
    """``log(f_t / (f_0 + 1e-6) + 1e-6)``: invariant to the loss's scale, rewards exact convergence."""
    return torch.log(loss / (initial_loss + 1e-6) + 1e-6)


@dataclass
class TaskSlot:
    """One task in flight: its parameters, optimizer state and position in its unroll."""

    seed: int
    task: Task
    length: int
    shapes: list[torch.Size]
    generator: torch.Generator
    point: Optional[Tensor] = None  # flat, where the next gradient is taken
    state: Optional[HRNNState] = None
    initial_loss: Optional[Tensor] = None
    steps_done: int = 0
    last_loss: float = float("nan")
    diverged: bool = False

    @property
    def numel(self) -> int:
        """Number of scalar parameters of the task."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def finished(self) -> bool:
        """True once the task has run its length or diverged."""
        return self.diverged or self.steps_done >= self.length


def _cat_states(states: Sequence[HRNNState]) -> HRNNState:
    return HRNNState(
        *(None if getattr(states[0], k) is None else torch.cat([getattr(s, k) for s in states]) for k in HRNNState._fields)
    )


def _split_state(state: HRNNState, numels: Sequence[int], tensors: Sequence[int]) -> list[HRNNState]:
    per_element = {
        k: getattr(state, k).split(list(numels)) if getattr(state, k) is not None else [None] * len(numels)
        for k in ("h_param", "momentum", "mean_square", "beta_in", "beta_sc", "log_lr", "theta")
    }
    h_tensor = state.h_tensor.split(list(tensors))
    h_global = state.h_global.split(1)
    return [
        HRNNState(**{k: v[i] for k, v in per_element.items()}, h_tensor=h_tensor[i], h_global=h_global[i])
        for i in range(len(numels))
    ]


def _batch_layout(slots: Sequence[TaskSlot], device: torch.device) -> Layout:
    sizes = [math.prod(s) for slot in slots for s in slot.shapes]
    problems = [i for i, slot in enumerate(slots) for _ in slot.shapes]
    return Layout.build(sizes, problems, device=device)


def _losses(slots: Sequence[TaskSlot], flat: Tensor, batches: Sequence[Any]) -> list[Tensor]:
    out, offset = [], 0
    for slot, batch in zip(slots, batches):
        n = slot.numel
        out.append(slot.task.checked_loss(_split_params(flat[offset : offset + n], slot.shapes), batch))
        offset += n
    return out


def _transform_grads(slots: Sequence[TaskSlot], grad: Tensor) -> Tensor:
    parts, offset = [], 0
    for slot in slots:
        n = slot.numel
        g = _split_params(grad[offset : offset + n], slot.shapes)
        parts.extend(t.reshape(-1) for t in slot.task.transform_grads(g, slot.generator))
        offset += n
    return torch.cat(parts)


def run_inner(
    lopt: HierarchicalRNN,
    slots: Sequence[TaskSlot],
    num_steps: int,
    second_order: bool = False,
    device: Union[torch.device, str] = "cpu",
    diagnostics_at: Optional[int] = None,
) -> tuple[Optional[Tensor], list[list[float]], Optional[StepDiagnostics]]:
    """Advance every slot by up to ``num_steps`` inner steps with the differentiable update rule.

    All slots are stepped together in one flat vector, one problem per task. Slots must have their
    ``point``, ``state`` and ``initial_loss`` set. The unroll stops early, before the step whose
    loss is non-finite; the slots that went non-finite are marked ``diverged``.

    Args:
        lopt: The meta-parameters.
        slots: Tasks in flight (updated in place, detached at the end).
        num_steps: Truncation length.
        second_order: Backpropagate through the task's gradients (else they are inputs).
        device: Where to compute.
        diagnostics_at: Inner step index at which to return the update rule's diagnostics.

    Returns:
        ``(meta_loss, losses, diagnostics)``: the mean meta-objective over steps and tasks (None if
        no step completed), each slot's losses at the true parameters per step, and diagnostics.
    """
    layout = _batch_layout(slots, torch.device(device))
    state = _cat_states([s.state for s in slots])
    point = torch.cat([s.point for s in slots])
    initial = torch.stack([s.initial_loss for s in slots])
    terms: list[Tensor] = []
    history: list[list[float]] = [[] for _ in slots]
    diag = None
    steps = min(num_steps, max(s.length - s.steps_done for s in slots))
    for t in range(steps):
        batches = [s.task.sample_batch(s.generator) for s in slots]
        batches = [_to_device(b, device) for b in batches]
        at = point if (second_order and point.requires_grad) else point.detach().requires_grad_()
        with torch.enable_grad():
            losses_at_point = torch.stack(_losses(slots, at, batches))
            (grad,) = torch.autograd.grad(losses_at_point.sum(), at, create_graph=second_order)
        if not torch.isfinite(grad).all():
            _mark_nonfinite(slots, grad)
            break
        grad = _transform_grads(slots, grad)
        progress = None
        if lopt.progress_input:
            # Each task's fraction of its run done before this step: the horizon is known in meta-training.
            progress = torch.tensor([(s.steps_done + t) / s.length for s in slots], device=point.device)
        out = lopt.step(state, point, grad, layout, diagnostics=(t == diagnostics_at), progress=progress,
                        loss=losses_at_point.detach())
        theta = out.state.theta if lopt.attention else out.point
        losses = torch.stack(_losses(slots, theta, batches))
        if not torch.isfinite(losses).all() or not torch.isfinite(out.point).all():
            for slot, value in zip(slots, losses.detach().tolist()):
                slot.diverged = slot.diverged or not math.isfinite(value)
            break
        if out.diagnostics is not None:
            diag = out.diagnostics
        # Tasks past their length keep stepping in the batch but no longer count.
        active = torch.tensor([s.steps_done + t < s.length for s in slots], device=losses.device)
        terms.append(torch.where(active, meta_objective_terms(losses, initial), torch.zeros_like(losses)))
        for i, value in enumerate(losses.detach().tolist()):
            if slots[i].steps_done + t < slots[i].length:
                history[i].append(value)
        state, point = out.state, out.point
    completed = len(terms)
    numels = [s.numel for s in slots]
    tensors = [len(s.shapes) for s in slots]
    for slot, st, pt, hist in zip(slots, _split_state(state.detach(), numels, tensors), point.detach().split(numels), history):
        slot.state, slot.point = st, pt
        slot.steps_done += len(hist)
        if hist:
            slot.last_loss = hist[-1]
    if not completed:
        return None, history, diag
    stacked = torch.stack(terms)  # (steps, tasks)
    counts = torch.tensor([max(len(h), 1) for h in history], device=stacked.device, dtype=stacked.dtype)
    meta_loss = (stacked.sum(0) / counts).mean()
    return meta_loss, history, diag


DISQUALIFIED_PENALTY = 100.0
"""Added to ``val/selection_score`` for each validation task the rule stalls or diverges on."""


def _mark_nonfinite(slots: Sequence[TaskSlot], grad: Tensor) -> None:
    offset = 0
    for slot in slots:
        n = slot.numel
        if not torch.isfinite(grad[offset : offset + n]).all():
            slot.diverged = True
        offset += n


class MetaTrainingModule(pl.LightningModule):
    """Meta-train a :class:`~lightning_lopt.HierarchicalRNN` on a distribution of tasks.

    Each ``training_step`` is one truncation of ``truncation_length`` inner steps on
    ``tasks_per_step`` tasks; the meta-objective is the mean of ``log(f_t / f_0)`` at the true
    parameters. Parameters and optimizer state carry across truncations; a finished task is
    replaced by a new one from the seed stream of :class:`~lightning_lopt.meta.TaskDataModule`.
    The meta-gradient comes from one of three estimators:

    - ``"tbptt"``: the tasks step together in one flat vector through the differentiable update
      rule and the meta-objective is backpropagated through the truncation. Biased toward short
      horizons: it learns to anneal the step.
    - ``"pes"``: persistent evolution strategies (:mod:`lightning_lopt.meta.pes`), unbiased for
      the whole-horizon objective. Each task runs ``pes_pairs`` antithetic pairs of particles with
      perturbed meta-parameters, forward only.
    - ``"es_single"``: the same with one perturbation per task for its whole run.

    Every estimator's meta-gradient goes through ``manual_backward``, so DDP averages it across ranks.

    Args:
        lopt_config: Arguments of :class:`~lightning_lopt.HierarchicalRNN` (architecture and init).
        init_weights: Start from these weights (a shipped name, ``.safetensors`` or ``.ckpt``); entries
            of ``lopt_config`` override the file's settings where the shapes stay the same.
        tasks: The training task distribution.
        tasks_per_step: Tasks stepped together in each training step.
        truncation_length: Inner steps per training step (None: 16 under ``"tbptt"``, 50 under the
            ES estimators).
        gradient_estimator: ``"tbptt"``, ``"pes"`` or ``"es_single"`` (see above).
        pes_sigma: Standard deviation of the ES perturbations of the meta-parameters.
        pes_pairs: Antithetic pairs of particles per task under the ES estimators.
        es_unroll: How the ES estimators step their particles: ``"batched"`` runs every particle
            of every task through one update-rule step per inner step (each particle one problem
            with its own meta-parameters, through the fused C++ kernel where it applies);
            ``"per_task"`` runs one vmapped step per task, the reference the batched path is tested
            against. Both compute the same estimate.
        task_lengths: Task lengths drawn log-uniformly between these bounds (None: ``(100,
            max_task_length)`` under the ES estimators; the heavy-tailed unroll distribution below
            under ``"tbptt"``). Under the ES estimators the first task of each slot is cut to a
            uniformly drawn part of its length, so that the slots' tasks end out of phase.
        meta_parameters: Names (``fnmatch`` patterns, e.g. ``["w_*", "b_*", "step_offset"]``) of the
            meta-parameters that meta-training changes; the others stay fixed (None: all). Under the ES
            estimators only these are perturbed: the estimate's variance grows with their number,
            so a few scalars are learned with far fewer pairs than all 12,000.
        meta_loss_max: Under the ES estimators, each step's ``log(f_t / f_0)`` is clipped to this, and a
            non-finite or diverged loss counts as this.
        unroll_length_mean: Mean of the exponential part of a partial unroll's length.
        unroll_length_min: Constant part of a partial unroll's length.
        num_unrolls_mean: Mean of the exponential part of the number of partial unrolls; a task runs
            ``(round(Exp(unroll_length_mean)) + unroll_length_min) * (round(Exp(num_unrolls_mean)) + 1)``
            steps, a heavy-tailed length.
        max_task_length: Cap on a task's length.
        curriculum_steps: Meta-steps over which the length distribution grows from
            ``unroll_length_min`` to the full one (0: no curriculum).
        second_order: Backpropagate through the tasks' gradients (the paper) or treat them as inputs.
        meta_optimizer: ``"adam"``, ``"rmsprop"`` or ``"sgd"``.
        meta_lr: Learning rate of the meta-optimizer.
        meta_grad_clip_norm: Clip the meta-gradient's norm to this (None: no clipping).
        meta_grad_clip_value: Clip each meta-gradient element to this (None: no clipping).
        validation_lengths: Inner steps of the validation tasks, cycled over the validation seeds.
        validation_adam_lr: Learning rate of the Adam baseline on the validation tasks.
        num_threads: Intra-op CPU threads per process (None: leave torch's setting). The tasks' tensors
            are tiny, so one thread per process avoids thread-pool overhead; run one process per core
            (DDP) to use several cores.
        inner_diagnostics_interval: Every this many meta-steps, log statistics of the inner update
            rule's internals (timescales, learning rates, attention, RNN states) under ``lopt/inner/``,
            the keys of :class:`~lightning_lopt.callbacks.LearnedOptimizerMonitor`; 0 turns it off.
    """

    def __init__(
        self,
        lopt_config: Optional[dict[str, Any]] = None,
        init_weights: Optional[str] = None,
        tasks: Optional[TaskDistribution] = None,
        tasks_per_step: int = 8,
        truncation_length: Optional[int] = None,
        gradient_estimator: str = "tbptt",
        pes_sigma: float = 0.01,
        pes_pairs: int = 8,
        es_unroll: str = "batched",
        task_lengths: Optional[tuple[int, int]] = None,
        meta_loss_max: float = 1.0,
        meta_parameters: Optional[list[str]] = None,
        unroll_length_mean: float = 200.0,
        unroll_length_min: int = 50,
        num_unrolls_mean: float = 5.0,
        max_task_length: int = 5000,
        curriculum_steps: int = 0,
        second_order: bool = False,
        meta_optimizer: str = "adam",
        meta_lr: float = 3e-4,
        meta_grad_clip_norm: Optional[float] = 1.0,
        meta_grad_clip_value: Optional[float] = None,
        validation_lengths: Sequence[int] = (200, 1000, 3000),
        validation_adam_lr: float = 1e-3,
        num_threads: Optional[int] = 1,
        inner_diagnostics_interval: int = 0,
    ) -> None:
        super().__init__()
        if meta_optimizer not in ("adam", "rmsprop", "sgd"):
            raise ValueError(f"meta_optimizer must be 'adam', 'rmsprop' or 'sgd', got {meta_optimizer!r}.")
        if gradient_estimator not in ESTIMATORS:
            raise ValueError(f"gradient_estimator must be one of {ESTIMATORS}, got {gradient_estimator!r}.")
        es = gradient_estimator != "tbptt"
        truncation_length = truncation_length if truncation_length is not None else (50 if es else 16)
        if truncation_length < 1 or tasks_per_step < 1:
            raise ValueError("truncation_length and tasks_per_step must be >= 1.")
        if es_unroll not in ("batched", "per_task"):
            raise ValueError(f"es_unroll must be 'batched' or 'per_task', got {es_unroll!r}.")
        if pes_pairs < 1 or not pes_sigma > 0:
            raise ValueError(f"pes_pairs must be >= 1 and pes_sigma > 0, got {pes_pairs} and {pes_sigma}.")
        if task_lengths is None and es:
            task_lengths = (min(100, max_task_length), max_task_length)
        if task_lengths is not None and not 1 <= task_lengths[0] <= task_lengths[1]:
            raise ValueError(f"task_lengths must be (low, high) with 1 <= low <= high, got {task_lengths}.")
        self.automatic_optimization = False
        if init_weights is not None:
            # Continue from a file; lopt_config may change settings that keep the shapes (e.g. the
            # log-lr bounds), and load_weights names any shape that no longer fits.
            config, tensors, source = _read_weights(init_weights)
            self.lopt = HierarchicalRNN(**{**config, **(lopt_config or {})})
            self.lopt.load_weights(tensors, source=source)
        else:
            self.lopt = HierarchicalRNN(**(lopt_config or {}))
        self.save_hyperparameters(ignore=["tasks"])
        self.hparams["truncation_length"] = truncation_length
        self.hparams["task_lengths"] = None if task_lengths is None else [int(v) for v in task_lengths]
        self.hparams["lopt_config"] = self.lopt.config  # what from_pretrained(ckpt) rebuilds
        self.tasks = tasks if tasks is not None else TaskDistribution()
        names = [n for n, _ in self.lopt.named_parameters()]
        chosen = names if meta_parameters is None else [n for n in names if any(fnmatch(n, pat) for pat in meta_parameters)]
        if not chosen:
            raise ValueError(f"meta_parameters {meta_parameters} match none of the meta-parameters {names}.")
        self._trained = set(chosen)
        sizes = [p.numel() for p in self.lopt.parameters()]
        self._trained_mask = torch.cat([torch.full((k,), n in self._trained) for n, k in zip(names, sizes)])
        self.slots: list[Optional[Union[TaskSlot, ParticleSlot]]] = [None] * tasks_per_step
        self._noise_generator: Optional[torch.Generator] = None
        self.meta_skips = 0
        self.inner_divergences = 0
        self.stream_position = 0
        self._train_seconds = 0.0
        self._adam_reference: dict[int, float] = {}
        self._diagnostics_requested = False
        self.last_diagnostics: Optional[StepDiagnostics] = None

    def setup(self, stage: str) -> None:
        if self.hparams.num_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(self.hparams.num_threads)

    # ------------------------------------------------------------------ tasks

    def _task_length(self, gen: torch.Generator) -> int:
        hp = self.hparams
        if hp.task_lengths is not None:
            low, high = (math.log(v) for v in hp.task_lengths)
            return int(round(math.exp(low + (high - low) * torch.rand((), generator=gen).item())))
        progress = 1.0 if hp.curriculum_steps <= 0 else min(1.0, self.global_step / hp.curriculum_steps)

        def exp_sample(mean: float) -> float:
            return -mean * math.log(1.0 - torch.rand((), generator=gen).item())

        unroll = round(progress * exp_sample(hp.unroll_length_mean)) + hp.unroll_length_min
        count = round(progress * exp_sample(hp.num_unrolls_mean)) + 1
        return int(min(hp.max_task_length, unroll * count))

    def new_slot(self, seed: int, length: Optional[int] = None) -> TaskSlot:
        """Start the task of ``seed``: parameters, fresh optimizer state and its loss at initialisation."""
        gen = torch.Generator().manual_seed(int(seed))
        task = self.tasks.sample(int(seed)).to(self.device)
        params = [p.to(self.device) for p in task.init_params(gen)]
        slot = TaskSlot(
            seed=int(seed),
            task=task,
            length=self._task_length(gen) if length is None else length,
            shapes=[p.shape for p in params],
            generator=gen,
        )
        slot.point = torch.cat([p.reshape(-1) for p in params]).float()
        layout = Layout.build([p.numel() for p in params], device=self.device)
        # Differentiable in the learned initial states: the first truncation trains them.
        slot.state = self.lopt.init_state(layout, theta=slot.point, generator=gen)
        with torch.no_grad():
            batch = _to_device(task.sample_batch(gen), self.device)
            slot.initial_loss = task.checked_loss(_split_params(slot.point, slot.shapes), batch).detach()
        return slot

    # ------------------------------------------------------------------ training

    def request_diagnostics(self) -> None:
        """Make the next training step return the update rule's diagnostics in ``last_diagnostics``."""
        self._diagnostics_requested = True

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        seeds = batch["seeds"].tolist()
        self.stream_position = int(batch["index"]) + 1
        if self.hparams.gradient_estimator != "tbptt":
            return self._es_training_step(seeds)
        for i, slot in enumerate(self.slots):
            if slot is None or slot.finished:
                if slot is not None and slot.diverged:
                    self.inner_divergences += 1
                self.slots[i] = self.new_slot(seeds[i % len(seeds)])
        hp = self.hparams
        start = time.perf_counter()
        meta_loss, history, diag = run_inner(
            self.lopt,
            self.slots,
            hp.truncation_length,
            second_order=hp.second_order,
            device=self.device,
            diagnostics_at=0 if self._wants_diagnostics() else None,
        )
        self._log_inner_diagnostics(diag)
        if meta_loss is not None:
            # Some meta-parameters get no gradient on some steps (the learned initial states only when a
            # task starts; the attention read-out never in first-order mode, where the gradient at the
            # attended point is an input). A zero term keeps all in the graph, as DDP's reducer expects.
            anchor = sum(p.sum() for p in self.lopt.parameters())
            self._meta_update(meta_loss + 0.0 * anchor)
        else:
            self._meta_update(None)
        self._log_step(sum(len(h) for h in history), time.perf_counter() - start, meta_loss)
        return meta_loss.detach() if meta_loss is not None else torch.tensor(float("nan"))

    def _wants_diagnostics(self) -> bool:
        every = self.hparams.inner_diagnostics_interval
        want = self._diagnostics_requested or (every > 0 and self.global_step % every == 0)
        self._diagnostics_requested = False
        return want

    def _log_inner_diagnostics(self, diag: Optional[StepDiagnostics], slots: Optional[Sequence[Any]] = None) -> None:
        self.last_diagnostics = diag
        if diag is None or self.hparams.inner_diagnostics_interval <= 0:
            return
        from lightning_lopt.callbacks.monitor import diagnostics_summary

        slots = self.slots if slots is None else slots
        sizes = [math.prod(shape) for slot in slots for shape in slot.shapes]
        names = [f"task{i}.tensor{j}" for i, slot in enumerate(slots) for j in range(len(slot.shapes))]
        summary = diagnostics_summary(
            diag, names, sizes, prefix="lopt/inner", num_timescales=self.lopt.num_timescales, per_tensor=False
        )
        self.log_dict(summary, batch_size=len(self.slots))

    def _meta_update(self, objective: Optional[Tensor]) -> bool:
        """Backpropagate ``objective`` (DDP averages the gradient), clip and step; False if skipped."""
        hp = self.hparams
        opt = self.optimizers()
        opt.zero_grad()
        if objective is not None:
            self.manual_backward(objective)
            for name, p in self.lopt.named_parameters():
                if name not in self._trained and p.grad is not None:
                    p.grad.zero_()
            grads = [p.grad for p in self.lopt.parameters() if p.grad is not None]
            if all(bool(torch.isfinite(g).all()) for g in grads):
                if hp.meta_grad_clip_value is not None:
                    self.clip_gradients(opt, gradient_clip_val=hp.meta_grad_clip_value, gradient_clip_algorithm="value")
                if hp.meta_grad_clip_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=hp.meta_grad_clip_norm, gradient_clip_algorithm="norm")
                opt.step()
                return True
        self.meta_skips += 1
        opt.zero_grad()
        return False

    def _log_step(
        self, inner_steps: int, elapsed: float, meta_loss: Optional[Tensor], extra: Optional[dict[str, float]] = None
    ) -> None:
        bs = len(self.slots)
        self._train_seconds += elapsed
        metrics = {
            "meta/skipped_updates": float(self.meta_skips),
            "meta/inner_divergences": float(self.inner_divergences),
            "meta/inner_steps_per_s": inner_steps / max(elapsed, 1e-9),
            "meta/train_seconds": self._train_seconds,
            **(extra or {}),
        }
        per_family: dict[str, list[float]] = {}
        for slot in self.slots:
            if math.isfinite(slot.last_loss) and slot.initial_loss is not None:
                ratio = math.log(slot.last_loss / (float(slot.initial_loss) + 1e-6) + 1e-6)
                per_family.setdefault(slot.task.family, []).append(ratio)
        for fam, values in per_family.items():
            metrics[f"meta/log_loss_ratio/{fam}"] = sum(values) / len(values)
        self.log_dict(metrics, batch_size=bs)
        if meta_loss is not None:
            self.log("meta/loss", meta_loss.detach(), prog_bar=True, batch_size=bs)

    # ------------------------------------------------------------------ ES estimators

    def _noise(self) -> torch.Generator:
        if self._noise_generator is None:
            # Ranks draw different perturbations; resume restores the generator's state.
            seed = (torch.initial_seed() * 1_000_003 + 7919 * self.global_rank) % (2**63)
            self._noise_generator = torch.Generator().manual_seed(seed)
        return self._noise_generator

    def new_particle_slot(self, seed: int, first: bool = False) -> ParticleSlot:
        """Start the task of ``seed`` with ``2 * pes_pairs`` identical particles.

        Args:
            seed: The task's seed.
            first: The slot's first task of the run: cut it to a uniformly drawn part of its length.
        """
        hp = self.hparams
        with torch.no_grad():
            base = self.new_slot(seed)
        if first:
            base.length = 1 + int(torch.randint(base.length, (), generator=base.generator))
        return ParticleSlot.from_task_slot(base, 2 * hp.pes_pairs)

    def _perturbations(self, theta: Tensor) -> Tensor:
        """``(pes_pairs, D)`` perturbations, zero outside the trained meta-parameters."""
        hp = self.hparams
        mask = self._trained_mask.to(theta.device)
        drawn = draw_perturbations(hp.pes_pairs, int(mask.sum()), hp.pes_sigma, self._noise(), theta.device)
        if bool(mask.all()):
            return drawn
        eps = theta.new_zeros(hp.pes_pairs, theta.numel())
        eps[:, mask] = drawn
        return eps

    def _es_training_step(self, seeds: list[int]) -> Tensor:
        hp = self.hparams
        with record_function("es/new_tasks"):
            for i, slot in enumerate(self.slots):
                if slot is None or slot.finished:
                    if slot is not None and slot.dead is not None and bool(slot.dead.any()):
                        self.inner_divergences += 1
                    self.slots[i] = self.new_particle_slot(seeds[i % len(seeds)], first=slot is None)
        start = time.perf_counter()
        theta = flat_meta_parameters(self.lopt)
        want_diag = self._wants_diagnostics()
        estimate = torch.zeros_like(theta)
        losses, deltas, used, inner_steps, diag = [], [], 0, 0, None
        perturbed = []
        with record_function("es/perturbations"):
            for slot in self.slots:
                if hp.gradient_estimator == "es_single":
                    if slot.eps is None:
                        slot.eps = self._perturbations(theta)
                    eps = slot.eps
                    slot.xi = eps
                else:
                    eps = self._perturbations(theta)
                    slot.xi = eps.clone() if slot.steps_done == 0 or slot.xi is None else slot.xi + eps
                perturbed.append(antithetic(theta, eps))
        if hp.es_unroll == "batched":
            results, ran_steps, diag = unroll_particle_slots(
                self.lopt, self.slots, perturbed, hp.truncation_length, hp.meta_loss_max, diagnostics=want_diag
            )
        else:
            results, ran_steps = [], []
            for i, (slot, prt) in enumerate(zip(self.slots, perturbed)):
                mean_losses, ran, d = unroll_particles(
                    self.lopt, slot, prt, hp.truncation_length, hp.meta_loss_max, diagnostics=want_diag and i == 0
                )
                diag = diag if d is None else d
                results.append(mean_losses)
                ran_steps.append(ran)
        for slot, mean_losses, ran in zip(self.slots, results, ran_steps):
            if mean_losses is None:
                continue
            estimate += pes_estimate(slot.xi, mean_losses, hp.pes_sigma)
            losses.append(mean_losses.mean())
            deltas.append((mean_losses[: hp.pes_pairs] - mean_losses[hp.pes_pairs :]).abs())
            inner_steps += ran * mean_losses.numel()
            used += 1
        self._log_inner_diagnostics(diag, self.slots[:1])
        meta_loss = torch.stack(losses).mean() if losses else None
        extra: dict[str, float] = {}
        if used:
            estimate /= used
            extra["meta/estimate_norm"] = float(estimate.norm())
            extra["meta/loss_difference_median"] = float(torch.cat(deltas).median())
            # The surrogate's gradient is the estimate, so manual_backward lets DDP average it.
            offsets = [0] + torch.tensor([p.numel() for p in self.lopt.parameters()]).cumsum(0).tolist()
            surrogate = sum(
                (p * estimate[a:b].view_as(p)).sum() for p, a, b in zip(self.lopt.parameters(), offsets, offsets[1:])
            )
            with record_function("es/meta_update"):
                self._meta_update(surrogate)
        else:
            self._meta_update(None)
        with record_function("es/logging"):
            self._log_step(inner_steps, time.perf_counter() - start, meta_loss, extra)
        return meta_loss if meta_loss is not None else torch.tensor(float("nan"))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        params = self.lopt.parameters()
        if hp.meta_optimizer == "adam":
            return torch.optim.Adam(params, lr=hp.meta_lr)
        if hp.meta_optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=hp.meta_lr)
        return torch.optim.SGD(params, lr=hp.meta_lr, momentum=0.9)

    # ------------------------------------------------------------------ validation

    def _adam_final_loss(self, seed: int, length: int) -> float:
        """Train the validation task ``seed`` with Adam; mean loss at the parameters over the last 10%."""
        slot = self.new_slot(seed, length=length)
        param = slot.point.detach().clone().requires_grad_()
        opt = torch.optim.Adam([param], lr=self.hparams.validation_adam_lr)
        tail = max(1, length // 10)
        losses: list[float] = []
        for t in range(length):
            batch = _to_device(slot.task.sample_batch(slot.generator), self.device)
            with torch.enable_grad():
                loss = slot.task.checked_loss(_split_params(param, slot.shapes), batch)
                (g,) = torch.autograd.grad(loss, param)
            g = _transform_grads([slot], g)
            if not torch.isfinite(g).all():
                return float("inf")
            param.grad = g
            opt.step()
            with torch.no_grad():
                value = float(slot.task.checked_loss(_split_params(param, slot.shapes), batch))
            if not math.isfinite(value):
                return float("inf")
            if t >= length - tail:
                losses.append(value)
        return sum(losses) / len(losses)

    @torch.no_grad()
    def learned_final_losses(self, seeds: Sequence[int], lengths: Sequence[int], chunk: int = 200) -> list[float]:
        """Train the tasks of ``seeds`` together with the current update rule (no gradient).

        Returns each task's mean loss at the true parameters over the last 10% of its steps
        (``inf`` for a task that diverged).
        """
        return [final for final, _ in self.learned_losses(seeds, lengths, chunk)]

    def learned_losses(
        self, seeds: Sequence[int], lengths: Sequence[int], chunk: int = 200
    ) -> list[tuple[float, float]]:
        """Like :meth:`learned_final_losses`, with each task's ``(final, early)`` losses.

        ``early`` is the mean loss over steps 9% to 11% of the task's length: what
        :func:`validation_verdict` compares the final loss with to detect a stall.
        """
        slots = [self.new_slot(s, length=n) for s, n in zip(seeds, lengths)]
        histories: list[list[float]] = [[] for _ in slots]
        running = list(range(len(slots)))
        while running:
            _, hist, _ = run_inner(self.lopt, [slots[i] for i in running], chunk, device=self.device)
            for i, h in zip(running, hist):
                histories[i].extend(h)
            running = [i for i in running if not slots[i].finished]
        out = []
        for slot, hist in zip(slots, histories):
            if slot.diverged or len(hist) < slot.length:
                out.append((float("inf"), float("inf")))
                continue
            tail = hist[-max(1, slot.length // 10) :]
            early = hist[int(0.09 * slot.length) : int(0.11 * slot.length) + 1]
            out.append((sum(tail) / len(tail), sum(early) / len(early)))
        return out

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        # Lightning validates under inference mode, where even the inner tasks' own gradients are off.
        with torch.inference_mode(False):
            self._validate(batch.clone().tolist())

    def _validate(self, seeds: list[int]) -> None:
        lengths = list(self.hparams.validation_lengths)
        task_lengths = [lengths[i % len(lengths)] for i in range(len(seeds))]
        mine = self.learned_losses(seeds, task_lengths)
        ratios, disqualified = [], 0
        for i, (seed, length) in enumerate(zip(seeds, task_lengths)):
            key = (seed, length)
            if key not in self._adam_reference:
                self._adam_reference[key] = self._adam_final_loss(seed, length)
            ref = self._adam_reference[key]
            final, early = mine[i]
            # A diverged run counts as a large, finite penalty so that the mean stays comparable.
            ratio = math.log((final + 1e-12) / (ref + 1e-12)) if math.isfinite(final) else 50.0
            ratios.append(min(ratio, 50.0))
            disqualified += validation_verdict(final, early, ref) is not None
            self.log(f"val/log_ratio_vs_adam/task_{i}_{length}", ratios[-1], batch_size=1, sync_dist=True)
        score = sum(ratios) / len(ratios)
        self.log("val/log_ratio_vs_adam", score, prog_bar=True, batch_size=1, sync_dist=True)
        self.log("val/disqualified_tasks", float(disqualified), batch_size=1, sync_dist=True)
        # What checkpoints are selected by: a stalling or diverging rule never beats one that keeps learning.
        self.log("val/selection_score", score + DISQUALIFIED_PENALTY * disqualified, batch_size=1, sync_dist=True)

    # ------------------------------------------------------------------ checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        slots = []
        for slot in self.slots:
            if slot is None:
                slots.append(None)
                continue
            if isinstance(slot, ParticleSlot):
                slots.append(slot.to_checkpoint())
                continue
            slots.append(
                {
                    "seed": slot.seed,
                    "length": slot.length,
                    "steps_done": slot.steps_done,
                    "diverged": slot.diverged,
                    "last_loss": slot.last_loss,
                    "generator": slot.generator.get_state(),
                    "point": slot.point.detach().cpu(),
                    "initial_loss": slot.initial_loss.detach().cpu(),
                    "state": {k: (None if v is None else v.detach().cpu()) for k, v in slot.state._asdict().items()},
                }
            )
        mine = {
            "slots": slots,
            "noise_generator": None if self._noise_generator is None else self._noise_generator.get_state(),
            "inner_divergences": self.inner_divergences,
        }
        # Each rank has its own tasks in flight and perturbations; Lightning writes rank zero's
        # checkpoint, so it must hold every rank's part (this hook runs on all ranks).
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        checkpoint["meta_ranks"] = ranks
        checkpoint["meta_counters"] = {
            "meta_skips": self.meta_skips,
            "stream_position": self.stream_position,
            "train_seconds": self._train_seconds,
        }
        checkpoint["meta_task_distribution"] = self._distribution_settings()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("meta_counters", {})
        self.meta_skips = int(counters.get("meta_skips", 0))
        self.stream_position = int(counters.get("stream_position", 0))
        self._train_seconds = float(counters.get("train_seconds", 0.0))
        ranks = checkpoint.get("meta_ranks")
        if ranks is None and "meta_slots" in checkpoint:  # written before checkpoints held every rank's part
            ranks = [{"slots": checkpoint["meta_slots"], "noise_generator": None,
                      "inner_divergences": int(counters.get("inner_divergences", 0))}]
        if ranks is None and counters:
            warnings.warn(
                "The checkpoint holds no tasks in flight (a copy made with `python -m lightning_lopt.meta.portable "
                "--drop-tasks`): the meta-parameters, optimizer and stream resume, and tasks start afresh "
                "(not bit-exact).",
                UserWarning,
            )
        self._pending_ranks = ranks
        self._pending_distribution = checkpoint.get("meta_task_distribution")

    def on_train_start(self) -> None:
        ranks = getattr(self, "_pending_ranks", None)
        self._pending_ranks = None
        if not ranks:
            return
        world, rank = self.trainer.world_size, self.global_rank
        if len(ranks) != world:
            # Another number of processes: the meta-parameters and the stream resume; tasks start afresh.
            warnings.warn(
                f"The checkpoint holds the tasks in flight of {len(ranks)} process(es), this run has {world}: "
                "meta-training resumes with fresh tasks (not bit-exact).",
                UserWarning,
            )
            return
        mine = ranks[rank]
        if len(mine["slots"]) != self.hparams.tasks_per_step:
            warnings.warn(
                f"The checkpoint holds {len(mine['slots'])} tasks in flight per process, this run steps "
                f"{self.hparams.tasks_per_step}: the meta-parameters, optimizer and stream resume, and tasks in "
                "flight start afresh (not bit-exact).",
                UserWarning,
            )
            return
        self.inner_divergences = int(mine["inner_divergences"])
        if mine["noise_generator"] is not None:
            self._noise_generator = torch.Generator()
            self._noise_generator.set_state(mine["noise_generator"])
        saved_distribution = getattr(self, "_pending_distribution", None)
        self._pending_distribution = None
        changed = saved_distribution is not None and saved_distribution != self._distribution_settings()
        slots = [] if changed else [None if s is None else self._restore_slot(s) for s in mine["slots"]]
        # Tasks in flight are made again from their seeds, so they are only the saved ones under the
        # same distribution; checkpoints older than the recorded settings are checked by size.
        if changed or any(s is not None and s.point.shape[-1] != s.numel for s in slots):
            warnings.warn(
                "The task distribution differs from the checkpoint's: the meta-parameters, optimizer and stream "
                "resume, and tasks in flight start afresh (not bit-exact).",
                UserWarning,
            )
            return
        self.slots = slots

    def _distribution_settings(self) -> Optional[dict[str, Any]]:
        settings = getattr(self.tasks, "settings", None)  # duck-typed distributions may have none
        return settings() if callable(settings) else None

    def _restore_slot(self, saved: dict[str, Any]) -> Union[TaskSlot, ParticleSlot]:
        if saved.get("kind") == "particles":
            return ParticleSlot.from_checkpoint(saved, self.tasks.sample(int(saved["seed"])).to(self.device), self.device)
        gen = torch.Generator()
        gen.set_state(saved["generator"])
        task = self.tasks.sample(int(saved["seed"])).to(self.device)
        shapes = [p.shape for p in task.init_params(torch.Generator().manual_seed(0))]
        st = HRNNState(**{k: (None if v is None else v.to(self.device)) for k, v in saved["state"].items()})
        return TaskSlot(
            seed=int(saved["seed"]),
            task=task,
            length=int(saved["length"]),
            shapes=shapes,
            generator=gen,
            point=saved["point"].to(self.device),
            state=st,
            initial_loss=saved["initial_loss"].to(self.device),
            steps_done=int(saved["steps_done"]),
            last_loss=float(saved["last_loss"]),
            diverged=bool(saved["diverged"]),
        )

    def export(self, path: Union[str, Path], card: Optional[dict[str, Any]] = None) -> Path:
        """Write the current meta-parameters with :meth:`HierarchicalRNN.save_pretrained`."""
        info = {"meta_steps": int(self.global_step), "meta_training": {k: v for k, v in self.hparams.items()}}
        return self.lopt.save_pretrained(path, card={**info, **(card or {})})
