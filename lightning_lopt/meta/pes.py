"""Evolution-strategies meta-gradients: persistent (PES) and single-perturbation (ES-Single) estimates.

Truncated backpropagation optimises each truncation's loss greedily and learns to anneal the step
to zero (the short-horizon bias). PES (Vicol et al. 2021) is unbiased for the whole-horizon
objective: antithetic pairs of particles run the same task with ``theta + eps`` and ``theta - eps``
from their own persistent inner states, and each pair keeps ``xi``, the sum of the perturbations
it has run with since its task started. The estimate of one truncation is

    g = 1 / (2 sigma^2) * mean_pairs xi * (L(theta + eps) - L(theta - eps))

with ``L`` the truncation's mean meta-loss. ES-Single (Vicol 2023) draws one perturbation per task
and keeps it for the task's whole run, so ``xi = eps`` and its variance does not grow with the
number of truncations.

Unrolls are forward only: the particles of a task step together through the one update rule
(:meth:`~lightning_lopt.HierarchicalRNN.step`) under :func:`torch.func.vmap`, each with its own
meta-parameters, and no autograd graph is built through the unroll.
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.autograd.profiler import record_function
from torch.func import functional_call, grad_and_value, vmap

from lightning_lopt.hrnn import HierarchicalRNN, HRNNState, Layout, StepDiagnostics
from lightning_lopt.tasks import NegativeLossError, Task

__all__ = [
    "ESTIMATORS",
    "ParticleSlot",
    "antithetic",
    "clipped_meta_loss",
    "draw_perturbations",
    "flat_meta_parameters",
    "pes_estimate",
    "unroll_particle_slots",
    "unroll_particles",
]

ESTIMATORS = ("tbptt", "pes", "es_single")



def _region(name: str) -> Any:
    """A labelled range for ``torch.profiler`` (``bench.es_profile`` splits a meta-step by them);
    outside a profile, nothing: the inner loop enters thousands of them per meta-step."""
    return record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()

def clipped_meta_loss(loss: Tensor, initial_loss: Tensor, maximum: float) -> Tensor:
    """``log(f_t / f_0)`` (with the floors of :func:`~lightning_lopt.meta.meta_objective_terms`),
    clipped above at ``maximum``; a non-finite loss counts as ``maximum``.

    A particle that diverges thus scores badly but finitely, and never turns the estimate into NaN.
    """
    terms = torch.log(loss / (initial_loss + 1e-6) + 1e-6)
    return torch.where(torch.isfinite(terms), terms.clamp(max=maximum), torch.full_like(terms, maximum))


def flat_meta_parameters(lopt: HierarchicalRNN) -> Tensor:
    """All meta-parameters as one detached flat vector, in ``named_parameters`` order."""
    return torch.cat([p.detach().reshape(-1) for p in lopt.parameters()])


@dataclass
class ParticleSlot:
    """One task in flight under an ES estimator: ``2 * pairs`` particles over the same task.

    Particle ``i < pairs`` runs with ``theta + eps_i``, particle ``pairs + i`` with ``theta - eps_i``.

    Attributes:
        seed: The task's seed.
        task: The task.
        length: Inner steps the task runs.
        shapes: Shapes of the task's parameter tensors.
        generator: The task's generator (batches and gradient noise), shared by all particles.
        point: Where each particle takes its next gradient, ``(2 * pairs, n)``.
        state: The particles' optimizer states, each field with a leading ``2 * pairs`` dimension.
        initial_loss: The task's loss at initialisation (the same for every particle).
        xi: Per pair, the sum of the perturbations since the task started, ``(pairs, D)``.
        eps: ES-Single's perturbation, drawn when the task starts, ``(pairs, D)``; None under PES.
        steps_done: Inner steps completed.
        dead: Particles whose loss or parameters went non-finite, ``(2 * pairs,)``.
        last_loss: Mean over live particles of the last loss at the true parameters.
    """

    seed: int
    task: Task
    length: int
    shapes: list[torch.Size]
    generator: torch.Generator
    point: Tensor
    state: HRNNState
    initial_loss: Tensor
    xi: Optional[Tensor] = None
    eps: Optional[Tensor] = None
    steps_done: int = 0
    dead: Optional[Tensor] = None
    last_loss: float = float("nan")

    @property
    def numel(self) -> int:
        """Number of scalar parameters of the task."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def finished(self) -> bool:
        """True once the task has run its length, or every particle diverged."""
        return self.steps_done >= self.length or (self.dead is not None and bool(self.dead.all()))

    @classmethod
    def from_task_slot(cls, slot: Any, count: int) -> "ParticleSlot":
        """``count`` identical particles at a :class:`~lightning_lopt.meta.TaskSlot`'s point and state,
        sharing its task and generator."""
        return cls(
            seed=slot.seed,
            task=slot.task,
            length=slot.length,
            shapes=slot.shapes,
            generator=slot.generator,
            point=slot.point.detach().unsqueeze(0).repeat(count, 1),
            state=HRNNState(
                *(None if v is None else v.detach().unsqueeze(0).repeat(count, *[1] * v.dim()) for v in slot.state)
            ),
            initial_loss=slot.initial_loss,
        )

    def layout(self) -> Layout:
        """The layout of one particle's flat vector (one problem)."""
        return Layout.build([math.prod(s) for s in self.shapes], device=self.point.device)

    def to_checkpoint(self) -> dict[str, Any]:
        """Tensors and primitives that :meth:`from_checkpoint` restores exactly."""
        return {
            "kind": "particles",
            "seed": self.seed,
            "length": self.length,
            "steps_done": self.steps_done,
            "last_loss": self.last_loss,
            "generator": self.generator.get_state(),
            "point": self.point.cpu(),
            "initial_loss": self.initial_loss.cpu(),
            "xi": None if self.xi is None else self.xi.cpu(),
            "eps": None if self.eps is None else self.eps.cpu(),
            "dead": None if self.dead is None else self.dead.cpu(),
            "state": {k: (None if v is None else v.cpu()) for k, v in self.state._asdict().items()},
        }

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], task: Task, device: torch.device) -> "ParticleSlot":
        """Rebuild a slot saved by :meth:`to_checkpoint` around ``task`` (made again from its seed)."""
        gen = torch.Generator()
        gen.set_state(saved["generator"])

        def dev(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(device)

        return cls(
            seed=int(saved["seed"]),
            task=task,
            length=int(saved["length"]),
            shapes=[p.shape for p in task.init_params(torch.Generator().manual_seed(0))],
            generator=gen,
            point=saved["point"].to(device),
            state=HRNNState(**{k: dev(v) for k, v in saved["state"].items()}),
            initial_loss=saved["initial_loss"].to(device),
            xi=dev(saved["xi"]),
            eps=dev(saved["eps"]),
            steps_done=int(saved["steps_done"]),
            dead=dev(saved["dead"]),
            last_loss=float(saved["last_loss"]),
        )


class _StepCall(nn.Module):
    """``forward`` is the update rule, so :func:`torch.func.functional_call` can swap its weights."""

    def __init__(self, lopt: HierarchicalRNN) -> None:
        super().__init__()
        self.lopt = lopt

    def forward(
        self, state: HRNNState, point: Tensor, grad: Tensor, layout: Layout, progress: Optional[Tensor] = None,
        loss: Optional[Tensor] = None,
    ) -> tuple[Tensor, HRNNState]:
        out = self.lopt.step(state, point, grad, layout, backend="eager", progress=progress, loss=loss)
        return out.point, out.state


def _stacked_parameters(lopt: HierarchicalRNN, flat: Tensor) -> dict[str, Tensor]:
    """``(particles, D)`` flat meta-parameters -> ``{"lopt." + name: (particles, *shape)}``."""
    out, offset = {}, 0
    for name, p in lopt.named_parameters():
        n = p.numel()
        out["lopt." + name] = flat[:, offset : offset + n].reshape(flat.shape[0], *p.shape)
        offset += n
    return out


def _start_particles(lopt: HierarchicalRNN, slot: ParticleSlot, params: dict[str, Tensor]) -> None:
    # The learned initial RNN states are meta-parameters too: each particle starts from its own.
    p = slot.point.shape[0]
    st = slot.state
    slot.state = st._replace(
        h_param=params["lopt.h0_param"].unsqueeze(1).expand(p, st.h_param.shape[1], -1).to(st.h_param.dtype).clone(),
        h_tensor=lopt.initial_tensor_state(params["lopt.h0_tensor"], st.h_tensor.shape[1]).to(st.h_tensor.dtype),
        h_global=lopt.initial_global_state(params["lopt.h0_global"], st.h_global.shape[1]).to(st.h_global.dtype),
    )


def _shared_draws(task: Task, grads: list[Tensor], generator: torch.Generator) -> Optional[list[Tensor]]:
    """The built-in gradient transforms (:class:`~lightning_lopt.tasks.Task`'s noise, the wrappers'
    noise and sparsity) of every particle at once, ``grads`` with a leading particle dimension: each
    draw is made once, with one particle's shapes, in the order a single transform makes it, and
    broadcast. None for a transform this does not know (the caller then runs it particle by particle)."""
    from lightning_lopt.tasks.wrappers import ReparamWeights, Rescaled, SparseGradients, TaskWrapper

    impl = type(task).transform_grads
    if impl in (Rescaled.transform_grads, ReparamWeights.transform_grads):
        # The wrapped transform in the wrapped task's coordinates, then this wrapper's own noise.
        scales = [task.scale] * len(grads) if impl is Rescaled.transform_grads else task.scales  # type: ignore[attr-defined]
        inner = _shared_draws(task.task, [g / s for g, s in zip(grads, scales)], generator)  # type: ignore[attr-defined]
        return None if inner is None else _noise(task, [g * s for g, s in zip(inner, scales)], generator)
    if impl is SparseGradients.transform_grads:
        inner = _shared_draws(task.task, grads, generator)  # type: ignore[attr-defined]
        if inner is None:
            return None
        inner = _noise(task, inner, generator)
        return [g * (torch.rand(g.shape[1:], generator=generator) >= task.drop_prob).to(device=g.device, dtype=g.dtype)
                for g in inner]
    if impl is TaskWrapper.transform_grads:
        inner = _shared_draws(task.task, grads, generator)  # type: ignore[attr-defined]
        return None if inner is None else _noise(task, inner, generator)
    if impl is Task.transform_grads:
        return _noise(task, grads, generator)
    return None


def _noise(task: Task, grads: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """:meth:`Task.transform_grads`' additive noise, drawn once for all particles."""
    if task.gradient_noise <= 0:
        return grads
    return [g + task.gradient_noise * torch.randn(g.shape[1:], generator=generator, dtype=g.dtype).to(g.device)
            for g in grads]


def _transform_particle_grads(slot: ParticleSlot, grads: Tensor) -> Tensor:
    """The task's gradient transform (noise, sparsity) with the same draws for every particle."""
    split = [math.prod(s) for s in slot.shapes]
    stacked = [v.reshape(grads.shape[0], *s) for v, s in zip(grads.split(split, dim=1), slot.shapes)]
    shared = _shared_draws(slot.task, stacked, slot.generator)
    if shared is not None:
        if all(a is b for a, b in zip(shared, stacked)):
            return grads  # the identity: nothing drawn, nothing changed
        return torch.cat([t.reshape(grads.shape[0], -1) for t in shared], 1)

    def one(g: Tensor) -> list[Tensor]:
        return slot.task.transform_grads([v.view(s) for v, s in zip(g.split(split), slot.shapes)], slot.generator)

    parts0 = [v.view(s) for v, s in zip(grads[0].split(split), slot.shapes)]
    snapshot = slot.generator.get_state()
    first = slot.task.transform_grads(parts0, slot.generator)
    if all(a is b for a, b in zip(first, parts0)):
        return grads  # the identity: nothing drawn, nothing changed
    rows = [torch.cat([t.reshape(-1) for t in first])]
    for i in range(1, grads.shape[0]):
        slot.generator.set_state(snapshot)
        rows.append(torch.cat([t.reshape(-1) for t in one(grads[i])]))
    return torch.stack(rows)


def unroll_particles(
    lopt: HierarchicalRNN,
    slot: ParticleSlot,
    perturbed: Tensor,
    num_steps: int,
    meta_loss_max: float,
    diagnostics: bool = False,
) -> tuple[Optional[Tensor], int, Optional[StepDiagnostics]]:
    """Advance every particle of ``slot`` by up to ``num_steps`` inner steps, without autograd graph.

    Args:
        lopt: The meta-parameters' module (its weights are replaced per particle).
        slot: The task and its particles (updated in place).
        perturbed: Each particle's flat meta-parameters, ``(2 * pairs, D)``.
        num_steps: Truncation length (fewer steps if the task ends first).
        meta_loss_max: Clip of the per-step meta-loss; also the score of a non-finite loss.
        diagnostics: Also return the update rule's diagnostics at the first step, computed with
            the unperturbed meta-parameters on the first particle's inputs.

    Returns:
        ``(L, steps, diagnostics)``: each particle's mean meta-loss over the steps run, ``(2 * pairs,)``
        (None if no step ran), the number of steps, and the diagnostics (or None).
    """
    params = _stacked_parameters(lopt, perturbed)
    if slot.steps_done == 0:
        _start_particles(lopt, slot, params)
    if slot.dead is None:
        slot.dead = torch.zeros(perturbed.shape[0], dtype=torch.bool, device=slot.point.device)
    layout = slot.layout()
    sizes = [math.prod(s) for s in slot.shapes]

    def loss_of(flat: Tensor, batch: Any) -> Tensor:
        return slot.task.loss([v.view(s) for v, s in zip(flat.split(sizes), slot.shapes)], batch)

    grads_and_losses = vmap(grad_and_value(loss_of), in_dims=(0, None))
    losses_at = vmap(loss_of, in_dims=(0, None))
    caller = _StepCall(lopt)
    # The particles of a task are at the same inner step: their training progress is shared (unbatched).
    step = vmap(lambda prm, st, pt, g, prog, loss: functional_call(caller, prm, (st, pt, g, layout, prog, loss)),
                in_dims=(0, 0, 0, 0, None, 0))
    steps = max(0, min(num_steps, slot.length - slot.steps_done))
    total = torch.zeros(perturbed.shape[0], dtype=torch.float32, device=slot.point.device)
    diag = None
    point, state = slot.point, slot.state
    ran = 0
    for t in range(steps):
        with _region("es/task_gradients"):
            batch = slot.task.sample_batch(slot.generator)
            batch = _to_device(batch, point.device)
            grads, point_losses = grads_and_losses(point, batch)
        with _region("es/gradient_transform"):
            grads = _transform_particle_grads(slot, grads)
        finite_grad = torch.isfinite(grads).all(1)
        # A particle whose gradient is non-finite has diverged; zeros keep its lane harmless.
        grads = torch.where(finite_grad.unsqueeze(1), grads, torch.zeros_like(grads))
        progress = _progress(lopt, slot.steps_done + t, slot.length, point)
        if diagnostics and t == 0:
            with torch.no_grad():
                one = HRNNState(*(None if v is None else v[0] for v in state))
                diag = lopt.step(one, point[0], grads[0], layout, diagnostics=True, backend="eager",
                                 progress=progress, loss=point_losses[0]).diagnostics
        # The step runs with grad mode on so that it takes its one-chunk reference path (its
        # inputs do not require grad, so no graph is recorded).
        with torch.enable_grad(), _region("es/rule_step"):
            point, state = step(params, state, point, grads, progress, point_losses.detach())
        theta = state.theta if lopt.attention else point
        with torch.no_grad(), _region("es/task_losses"):
            losses = losses_at(theta, batch)
        finite = torch.isfinite(losses)
        if bool((losses[finite] < 0).any()):
            raise NegativeLossError(
                f"Task {slot.task!r} (family {slot.task.family!r}) returned a negative loss "
                f"{float(losses[finite].min()):.4g}; the meta-objective log(f_t / f_0) needs losses >= 0. "
                "Shift or square the objective."
            )
        slot.dead = slot.dead | ~finite | ~finite_grad | ~torch.isfinite(theta).all(1)
        terms = clipped_meta_loss(losses.float(), slot.initial_loss.float(), meta_loss_max)
        total += torch.where(slot.dead, torch.full_like(terms, meta_loss_max), terms)
        ran += 1
        live = losses[~slot.dead]
        slot.last_loss = float(live.mean()) if live.numel() else float("nan")
    slot.point, slot.state = point, state
    slot.steps_done += ran
    return (total / ran if ran else None), ran, diag


def unroll_particle_slots(
    lopt: HierarchicalRNN,
    slots: list[ParticleSlot],
    perturbed: list[Tensor],
    num_steps: int,
    meta_loss_max: float,
    diagnostics: bool = False,
) -> tuple[list[Optional[Tensor]], list[int], Optional[StepDiagnostics]]:
    """:func:`unroll_particles` for several slots at once: the same function, faster.

    Every particle of every slot is one problem of one flat vector, with its own meta-parameters
    (:meth:`~lightning_lopt.HierarchicalRNN.step` with per-problem weights), so each inner step
    runs the update rule once for all of them, through the fused C++ kernel where it applies. Only
    the tasks' losses and gradients run per slot (vmapped over the slot's particles). A slot whose
    task ends before ``num_steps`` leaves the flat vector, and the others go on without it.

    Args:
        lopt: The meta-parameters' module.
        slots: The tasks and their particles (updated in place).
        perturbed: Per slot, each particle's flat meta-parameters, ``(2 * pairs, D)``.
        num_steps: Truncation length.
        meta_loss_max: Clip of the per-step meta-loss; also the score of a non-finite loss.
        diagnostics: Also return the diagnostics of the first slot's first step, as
            :func:`unroll_particles` does.

    Returns:
        Per slot, ``L`` (or None) and the steps run, as :func:`unroll_particles` returns them, and
        the diagnostics (or None).
    """
    steps = [max(0, min(num_steps, s.length - s.steps_done)) for s in slots]
    totals = [torch.zeros(p.shape[0], dtype=torch.float32, device=s.point.device) for s, p in zip(slots, perturbed)]
    for slot, prt in zip(slots, perturbed):
        if slot.steps_done == 0:
            _start_particles(lopt, slot, _stacked_parameters(lopt, prt))
        if slot.dead is None:
            slot.dead = torch.zeros(prt.shape[0], dtype=torch.bool, device=slot.point.device)
    diag = None
    if diagnostics and steps and steps[0] > 0:
        diag = _first_step_diagnostics(lopt, slots[0])
    done = 0
    while True:
        active = [k for k, n in enumerate(steps) if n > done]
        if not active:
            break
        run = min(steps[k] for k in active) - done  # until the first of them ends
        _run_lanes(lopt, [slots[k] for k in active], [perturbed[k] for k in active], run,
                   meta_loss_max, [totals[k] for k in active])
        done += run
    return [t / n if n else None for t, n in zip(totals, steps)], steps, diag


def _first_step_diagnostics(lopt: HierarchicalRNN, slot: ParticleSlot) -> StepDiagnostics:
    """The diagnostics :func:`unroll_particles` returns: the unperturbed rule on the first particle's
    inputs of the next step, with the task's generator left where it was."""
    snapshot = slot.generator.get_state()
    batch = _to_device(slot.task.sample_batch(slot.generator), slot.point.device)
    sizes = [math.prod(s) for s in slot.shapes]
    with torch.enable_grad():
        x = slot.point[:1].detach().requires_grad_(True)
        loss = slot.task.loss([v.view(s) for v, s in zip(x[0].split(sizes), slot.shapes)], batch)
        (g,) = torch.autograd.grad(loss, x)
        loss = loss.detach()
    grads = _transform_particle_grads(slot, g.expand(slot.point.shape[0], -1).contiguous())
    slot.generator.set_state(snapshot)
    g0 = torch.where(torch.isfinite(grads[0]), grads[0], torch.zeros_like(grads[0]))
    with torch.no_grad():
        one = HRNNState(*(None if v is None else v[0] for v in slot.state))
        progress = _progress(lopt, slot.steps_done, slot.length, slot.point)
        return lopt.step(one, slot.point[0], g0, slot.layout(), diagnostics=True, backend="eager",
                         progress=progress, loss=loss).diagnostics


def _run_lanes(
    lopt: HierarchicalRNN,
    slots: list[ParticleSlot],
    perturbed: list[Tensor],
    steps: int,
    meta_loss_max: float,
    totals: list[Tensor],
) -> None:
    """``steps`` inner steps of every particle of ``slots``, none of whose tasks ends before."""
    from torch.nn.utils.stateless import _reparametrize_module

    device = slots[0].point.device
    pairs2 = [p.shape[0] for p in perturbed]
    sizes = [[math.prod(s) for s in slot.shapes] for slot in slots]
    numels = [sum(sz) for sz in sizes]
    lane_sizes = [n for sz, p in zip(sizes, pairs2) for _ in range(p) for n in sz]
    lane_ids = [lane for lane, n in enumerate(len(sz) for sz, p in zip(sizes, pairs2) for _ in range(p)) for _ in range(n)]
    layout = Layout.build(lane_sizes, problems=lane_ids, device=device)
    # Contiguous once here: column slices of the particles' flat vectors would be copied at every step.
    params = {k[len("lopt."):]: v.contiguous() for k, v in _stacked_parameters(lopt, torch.cat(perturbed)).items()}

    def cat(field: str) -> Optional[Tensor]:
        parts = [getattr(s.state, field) for s in slots]
        if parts[0] is None:
            return None
        return torch.cat([p.reshape(p.shape[0] * p.shape[1], *p.shape[2:]) for p in parts]).contiguous()

    state = HRNNState(**{f: cat(f) for f in HRNNState._fields})
    point = torch.cat([s.point.reshape(-1) for s in slots])
    offsets = [0]
    for n, p in zip(numels, pairs2):
        offsets.append(offsets[-1] + n * p)

    def views(flat: Tensor) -> list[Tensor]:
        return [flat[a:b].view(p, n) for a, b, p, n in zip(offsets, offsets[1:], pairs2, numels)]

    loss_fns = [_loss_fn(slot, sz) for slot, sz in zip(slots, sizes)]
    grad_fns = [_loss_and_grad_fn(slot, sz, fn) for slot, sz, fn in zip(slots, sizes, loss_fns)]
    negative = torch.zeros((), dtype=torch.bool, device=device)
    last = [None] * len(slots)
    # The bookkeeping of all particles at once: which lane each element is in, and per lane the
    # dead flag, the initial loss and the running sum of meta-loss terms.
    lane_of = layout.problem_ids[layout.tensor_ids]
    lanes = layout.num_problems
    dead = torch.cat([s.dead for s in slots])
    initial = torch.cat([s.initial_loss.float().expand(p) for s, p in zip(slots, pairs2)])
    total = torch.zeros(lanes, dtype=torch.float32, device=device)

    clean = torch.zeros(lanes, dtype=torch.bool, device=device)

    def lanes_with_nonfinite(flat: Tensor) -> Optional[Tensor]:
        """Which lanes hold a non-finite element; None when none does."""
        # A finite sum has only finite terms: one reduction settles the usual case, where the
        # per-lane scatter below costs as much as a tenth of the update rule.
        if bool(torch.isfinite(flat.sum())):
            return None
        bad = (~torch.isfinite(flat)).to(torch.float32)
        return torch.zeros(lanes, dtype=torch.float32, device=device).index_add_(0, lane_of, bad) > 0
    # Each particle runs its own meta-parameters, swapped in for the whole run.
    with _reparametrize_module(lopt, params):
        for t in range(steps):
            batches, grads, point_losses = [], [], []
            for slot, x, grad_fn in zip(slots, views(point), grad_fns):
                with _region("es/task_gradients"):
                    batch = _to_device(slot.task.sample_batch(slot.generator), device)
                    at_point, g = grad_fn(x, batch)
                    point_losses.append(at_point)
                with _region("es/gradient_transform"):
                    grads.append(_transform_particle_grads(slot, g).reshape(-1))
                batches.append(batch)
            grad = torch.cat(grads)
            bad_grad = lanes_with_nonfinite(grad)
            if bad_grad is not None:
                dead = dead | bad_grad
                # A particle whose gradient is non-finite has diverged; zeros keep its lane harmless.
                grad = torch.where(bad_grad[lane_of], torch.zeros_like(grad), grad)
            progress = None
            if lopt.progress_input:
                progress = torch.cat([torch.full((p,), (s.steps_done + t) / s.length, device=device)
                                      for s, p in zip(slots, pairs2)])
            with torch.no_grad(), _region("es/rule_step"):
                out = lopt.step(state, point, grad, layout, progress=progress,
                                loss=torch.cat(point_losses) if lopt.lr_adaptation else None)
            point, state = out.point, out.state
            theta = state.theta if lopt.attention else point
            with torch.no_grad():
                for k, (th, fn, batch) in enumerate(zip(views(theta), loss_fns, batches)):
                    with _region("es/task_losses"):
                        last[k] = fn(th, batch)
                losses = torch.cat(last)
                finite = torch.isfinite(losses)
                negative = negative | (torch.where(finite, losses, torch.zeros_like(losses)) < 0).any()
                bad_theta = lanes_with_nonfinite(theta)
                dead = dead | ~finite | (clean if bad_theta is None else bad_theta)
                terms = clipped_meta_loss(losses.float(), initial, meta_loss_max)
                total += torch.where(dead, torch.full_like(terms, meta_loss_max), terms)
    if bool(negative):
        for slot, losses in zip(slots, last):
            finite = losses[torch.isfinite(losses)]
            if bool((finite < 0).any()):
                raise NegativeLossError(
                    f"Task {slot.task!r} (family {slot.task.family!r}) returned a negative loss "
                    f"{float(finite.min()):.4g}; the meta-objective log(f_t / f_0) needs losses >= 0. "
                    "Shift or square the objective."
                )
        raise NegativeLossError("A task returned a negative loss; the meta-objective log(f_t / f_0) needs losses >= 0.")
    # Back into the slots, as copies: a view would keep (and checkpoint) the whole flat buffer.
    tensor_offsets = [0]
    for sz, p in zip(sizes, pairs2):
        tensor_offsets.append(tensor_offsets[-1] + len(sz) * p)
    lane_offsets = [0]
    for p in pairs2:
        lane_offsets.append(lane_offsets[-1] + p)
    for k, slot in enumerate(slots):
        a, b, p, n, ta, tb = offsets[k], offsets[k + 1], pairs2[k], numels[k], tensor_offsets[k], tensor_offsets[k + 1]
        slot.dead = dead[lane_offsets[k] : lane_offsets[k + 1]].clone()
        totals[k] += total[lane_offsets[k] : lane_offsets[k + 1]]

        def part(field: str, flat: Optional[Tensor]) -> Optional[Tensor]:
            if flat is None:
                return None
            if field == "h_tensor":
                return flat[ta:tb].reshape(p, len(sizes[k]), -1).clone()
            if field == "h_global":
                lo = sum(pairs2[:k])
                return flat[lo : lo + p].reshape(p, 1, -1).clone()
            return flat[a:b].reshape(p, n, *flat.shape[1:]).clone()

        slot.state = HRNNState(**{f: part(f, getattr(state, f)) for f in HRNNState._fields})
        slot.point = point[a:b].reshape(p, n).clone()
        slot.steps_done += steps
        live = last[k][~slot.dead]
        slot.last_loss = float(live.mean()) if live.numel() else float("nan")


def _loss_fn(slot: ParticleSlot, sizes: list[int]) -> Any:
    """The task's loss of each particle, ``(particles, n) -> (particles,)``: the task's
    :meth:`~lightning_lopt.tasks.Task.particle_loss` where it has one, else its loss vmapped."""

    def loss_of(flat: Tensor, batch: Any) -> Tensor:
        return slot.task.loss([v.view(s) for v, s in zip(flat.split(sizes), slot.shapes)], batch)

    vmapped = vmap(loss_of, in_dims=(0, None))

    def losses(flat: Tensor, batch: Any) -> Tensor:
        parts = [v.reshape(flat.shape[0], *s) for v, s in zip(flat.split(sizes, dim=1), slot.shapes)]
        direct = slot.task.particle_loss(parts, batch)
        return vmapped(flat, batch) if direct is None else direct

    return losses


def _loss_and_grad_fn(slot: ParticleSlot, sizes: list[int], losses: Any) -> Any:
    """Each particle's loss and the gradient of it, ``(particles, n) -> ((particles,), (particles, n))``:
    the task's :meth:`~lightning_lopt.tasks.Task.particle_loss_and_grad` where it writes one out,
    else autograd through ``losses`` (:func:`_loss_fn`)."""

    def loss_and_grad(flat: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        parts = [v.reshape(flat.shape[0], *s) for v, s in zip(flat.split(sizes, dim=1), slot.shapes)]
        by_hand = slot.task.particle_loss_and_grad(parts, batch)
        if by_hand is not None:
            return by_hand[0].detach(), torch.cat([g.reshape(flat.shape[0], -1) for g in by_hand[1]], 1)
        with torch.enable_grad():
            x = flat.detach().requires_grad_(True)
            value = losses(x, batch)
            (g,) = torch.autograd.grad(value.sum(), x)
        return value.detach(), g

    return loss_and_grad


def _progress(lopt: HierarchicalRNN, steps_done: int, length: int, like: Tensor) -> Optional[Tensor]:
    """A task's fraction of training done, ``(1,)``, for a rule with a progress input (else None)."""
    if not lopt.progress_input:
        return None
    return torch.tensor([steps_done / length], dtype=torch.float32, device=like.device)


def pes_estimate(xi: Tensor, losses: Tensor, sigma: float) -> Tensor:
    """``1 / (2 sigma^2) * mean_pairs xi * (L+ - L-)`` for ``xi`` of shape ``(pairs, D)`` and
    ``losses`` ``(2 * pairs,)`` ordered ``[+eps_0 .. +eps_{k-1}, -eps_0 .. -eps_{k-1}]``."""
    pairs = xi.shape[0]
    delta = losses[:pairs] - losses[pairs:]
    return (xi * delta.unsqueeze(1)).mean(0) / (2.0 * sigma**2)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def antithetic(theta: Tensor, eps: Tensor) -> Tensor:
    """``(2 * pairs, D)`` particle parameters ``[theta + eps_i ..., theta - eps_i ...]``."""
    return torch.cat([theta + eps, theta - eps])


def draw_perturbations(pairs: int, dim: int, sigma: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """``(pairs, dim)`` Gaussian perturbations of standard deviation ``sigma`` (drawn on the CPU)."""
    return (sigma * torch.randn(pairs, dim, generator=generator)).to(device)
