"""The hierarchical RNN learned optimizer (Wichrowska et al., ICML 2017).

This module holds the one definition of the update rule. :class:`HierarchicalRNN` owns the
meta-parameters and exposes a pure, vectorised :meth:`HierarchicalRNN.step` over a flat vector
that may hold many parameter tensors, grouped into independent problems. The torch optimizer
(:mod:`lightning_lopt.optimizer`) and meta-training (:mod:`lightning_lopt.meta`) are thin adapters
around it.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from lightning_lopt.kernels.dispatch import (
    _BACKENDS,
    _compiled_kernel,
    _cpp_applies,
    _Scratch,
    _triton_kernels,
)
from lightning_lopt.layout import (
    HRNNState,
    Layout,
    ProblemRows,
    StepDiagnostics,
    StepOutput,
    StepReducer,
    _problem_starts,
    _tensor_starts,
    is_feature_major,
)

__all__ = ["BiasGRU", "HierarchicalRNN", "HRNNState", "Layout", "StepDiagnostics", "StepOutput", "StepReducer"]

WEIGHTS_DIR = Path(__file__).parent / "weights"

PROGRESS_CENTERS: tuple[float, ...] = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.1)
"""Centres ``c`` of the training-progress features ``tanh(10 * (x - c))`` (VeLO's embedding):
dense early, where a run's character changes fastest, and one past the end for overruns."""
LR_ADAPTATIONS: tuple[Optional[str], ...] = (None, "learned", "hypergradient")
"""Values of ``lr_adaptation``: no step gain, the learned one, the hypergradient baseline."""
_ZERO_INIT_INPUTS = frozenset({"w_gain"})
LOSS_DECAY = 0.9
"""Decay of the running mean of the log loss that the step-gain features compare each loss with."""


def _normal_(tensor: Tensor, fan_in: int, generator: torch.Generator) -> Tensor:
    with torch.no_grad():
        return tensor.normal_(0.0, 0.5 / math.sqrt(fan_in), generator=generator)


class BiasGRU(nn.Module):
    """A GRU cell whose gates take an extra, externally computed bias.

    ``[r, u] = sigmoid([x, h] W_g + b_g + [b_r, b_u])``, ``c = tanh([x, r*h] W_c + b_c0 + b_c)``,
    ``h' = u*h + (1-u)*c``: ``u`` is the keep gate, so a gate bias of 2.2 makes state move slowly.

    Args:
        input_size: Width of the input ``x``.
        hidden_size: Width of the state ``h``.
        gate_bias: Initial value of ``b_g``.
        generator: Source of randomness for the initialisation.
    """

    def __init__(self, input_size: int, hidden_size: int, gate_bias: float, generator: torch.Generator) -> None:
        super().__init__()
        fan_in = input_size + hidden_size
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight_gates = nn.Parameter(_normal_(torch.empty(fan_in, 2 * hidden_size), fan_in, generator))
        self.bias_gates = nn.Parameter(torch.full((2 * hidden_size,), float(gate_bias)))
        self.weight_candidate = nn.Parameter(_normal_(torch.empty(fan_in, hidden_size), fan_in, generator))
        self.bias_candidate = nn.Parameter(torch.zeros(hidden_size))

    def forward(
        self, x: Tensor, h: Tensor, injected: Optional[Tensor] = None, rows: Optional["ProblemRows"] = None
    ) -> Tensor:
        """One step. ``injected`` has width ``3 * hidden_size`` (reset, keep, candidate) or is None.

        With per-problem weights (a leading problem dimension, see :meth:`HierarchicalRNN.step`),
        ``rows`` gives each row's problem (None: row ``i`` is problem ``i``).
        """
        hs = self.hidden_size
        gates = _matmul(torch.cat([x, h], dim=-1), self.weight_gates, self.bias_gates, rows)
        if injected is not None:
            gates = gates + injected[..., : 2 * hs]
        reset, keep = torch.sigmoid(gates).split(hs, dim=-1)
        cand = _matmul(torch.cat([x, reset * h], dim=-1), self.weight_candidate, self.bias_candidate, rows)
        if injected is not None:
            cand = cand + injected[..., 2 * hs :]
        return keep * h + (1.0 - keep) * torch.tanh(cand)


def _matmul(x: Tensor, weight: Tensor, bias: Tensor, rows: Optional[ProblemRows]) -> Tensor:
    """``x @ weight + bias``; with per-problem weights ``(P, in, out)``, row ``i`` of ``x`` uses
    problem ``rows.problem[i]``'s (``rows`` None: problem ``i``)."""
    if weight.dim() == 2:
        return x @ weight + bias
    if rows is None:
        return torch.baddbmm(bias.unsqueeze(1), x.unsqueeze(1), weight).squeeze(1)
    # Rows scattered into a (P, width, in) block, so that one batched product uses each problem's
    # weights in place: gathering a weight matrix per row moved far more memory.
    block = x.new_zeros(weight.shape[0], rows.width, x.shape[-1])
    block[rows.problem, rows.position] = x
    return torch.baddbmm(bias.unsqueeze(1), block, weight)[rows.problem, rows.position]


def _linear(layer: nn.Linear, x: Tensor, rows: Optional[ProblemRows]) -> Tensor:
    """``layer(x)``, with per-problem weights as in :func:`_matmul`."""
    if layer.weight.dim() == 2:
        return layer(x)
    return _matmul(x, layer.weight.transpose(1, 2), layer.bias, rows)


def _straight_through_clamp(x: Tensor, low: float, high: float) -> Tensor:
    # Forward clamps; backward passes the gradient through unchanged, so a learning rate that hits
    # the bound still receives a signal to come back.
    # Written so that the forward value is exactly the clamped one even when |x| >> bounds (the
    # form x + (clamp(x) - x).detach() cancels catastrophically there).
    return x.clamp(low, high).detach() + (x - x.detach())


_optimizer_class: Optional[type] = None


def register_optimizer(cls: type) -> None:
    """Set the class :meth:`HierarchicalRNN.optimizer` builds (lightning_lopt.optimizer does, on import).

    The optimizer depends on this module and not the reverse: the factory finds its class here.
    """
    global _optimizer_class
    _optimizer_class = cls


class HierarchicalRNN(nn.Module):
    """The meta-parameters and the update rule of the hierarchical RNN learned optimizer.

    Three GRUs with shared weights: one state per scalar parameter, per tensor, and per problem.
    The step reads rescaled gradient statistics at ``num_timescales`` learned momentum timescales
    and outputs each parameter's update; with ``attention``, gradients are taken at a learned
    look-ahead point.

    Args:
        param_units: Hidden units of the parameter RNN.
        tensor_units: Hidden units of the tensor RNN.
        global_units: Hidden units of the global RNN.
        num_timescales: Momentum timescales (each twice the one before).
        attention: Take gradients at a learned look-ahead point (Nesterov-like).
        hierarchy: Run the tensor and global RNNs (the paper's architecture). ``False`` is the
            paper's ablation: the parameter RNN gets no injected biases (zero injection) and the
            tensor and global RNNs never run; their modules are kept, unused, so that every
            adapter sees the same parameter names (their states stay at the learned initial ones).
        progress_input: Feed the global RNN the fraction of training done, ``x = step / total``,
            as ``tanh(10 * (x - c))`` for each centre ``c`` of ``progress_centers`` (as VeLO
            does). An unknown horizon gives all-zero features, a pattern no known horizon
            produces (each ``x`` drives most features to +-1). Needs ``hierarchy``.
        progress_centers: Centres of the training-progress embedding.
        lr_adaptation: A per-tensor step gain ``exp(g)`` on top of the rule's update, where ``g``
            integrates, step by step, the alignment of the gradient with the rescaled momentum at
            each timescale (positive: the steps go on in one direction, so they are too small;
            negative: they overshoot) and, from the loss that ``step`` is given, the log of the
            loss over its running mean and that value's positive part (a spike).
            ``"learned"``: ``g += w_gain . features``, with ``w_gain`` a meta-parameter (zero: the
            rule unchanged); ``"hypergradient"``: the hand-designed baseline, hypergradient descent
            on the log step size (Baydin et al., 2018), ``g += hypergradient_lr * alignment`` at the
            fastest timescale. None: no gain.
        hypergradient_lr: The hypergradient step on the log gain, for ``lr_adaptation="hypergradient"``.
        log_gain_bounds: Bounds of the log gain ``g``.
        max_update_ratio: A trust-ratio bound: each tensor's update is scaled down, where needed, so
            that its norm is at most this fraction of the tensor's norm before the step (tensors of
            norm zero, such as zero-initialised biases, are not bound). None: no bound.
        decay_fraction: The fraction of training, at its end, over which
            :class:`~lightning_lopt.HierarchicalRNNOptimizer` lets the learned step decay linearly
            to zero when it knows the horizon (``total_steps``): the decay phase of a
            warmup-stable-decay schedule, which a rule meta-trained on short truncations does not
            learn. :meth:`step` itself steps at the ``lr`` it is given. None: no decay.
        gate_bias: Initial gate bias of all GRUs.
        shortcut_init: Mean of the initial shortcut weights from rescaled momenta to directions.
        shortcut_init_std: Standard deviation of that initialisation.
        lr_smoothing_init: Initial ``rho``; the log learning rate keeps ``sigmoid(rho)`` of itself.
        step_offset_init: Initial ``c`` in ``exp(eta_step + c)``.
        beta_sc_bias_init: Initial bias of the mean-square decay read-out.
        beta_in_bias_init: Initial bias of the momentum decay read-out.
        log_lr_bounds: Bounds of ``eta_step`` (straight-through clip).
        init_lr_range: Range of the initial learning rate; per element and per tensor offsets are
            drawn log-uniformly from its square root, so that their product spans it.
        ms_epsilon: Added to squared momenta in the mean square.
        epsilon: Added under square roots and logarithms.
        seed: Seed of the initialisation of the meta-parameters.
    """

    def __init__(
        self,
        param_units: int = 10,
        tensor_units: int = 30,
        global_units: int = 20,
        num_timescales: int = 4,
        attention: bool = True,
        hierarchy: bool = True,
        progress_input: bool = False,
        max_update_ratio: Optional[float] = None,
        progress_centers: tuple[float, ...] = PROGRESS_CENTERS,
        lr_adaptation: Optional[str] = None,
        hypergradient_lr: float = 0.02,
        log_gain_bounds: tuple[float, float] = (-7.0, 3.0),
        decay_fraction: Optional[float] = None,
        gate_bias: float = 2.2,
        shortcut_init: float = 0.25,
        shortcut_init_std: float = 0.05,
        lr_smoothing_init: float = 3.2,
        step_offset_init: float = -1.0,
        beta_sc_bias_init: float = 3.2,
        beta_in_bias_init: float = 2.2,
        log_lr_bounds: tuple[float, float] = (-33.0, 33.0),
        init_lr_range: tuple[float, float] = (1e-6, 1e-2),
        ms_epsilon: float = 1e-12,
        epsilon: float = 1e-16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if min(param_units, tensor_units, global_units, num_timescales) < 1:
            raise ValueError("Unit counts and num_timescales must be positive.")
        if not log_lr_bounds[0] < log_lr_bounds[1]:
            raise ValueError(f"log_lr_bounds must be (low, high) with low < high, got {log_lr_bounds}.")
        if progress_input and not hierarchy:
            raise ValueError("progress_input feeds the global RNN, which hierarchy=False removes.")
        if progress_input and not progress_centers:
            raise ValueError("progress_input needs at least one centre in progress_centers.")
        self.config: dict[str, Any] = dict(
            param_units=param_units,
            tensor_units=tensor_units,
            global_units=global_units,
            num_timescales=num_timescales,
            attention=attention,
            hierarchy=hierarchy,
            progress_input=progress_input,
            max_update_ratio=max_update_ratio,
            progress_centers=[float(c) for c in progress_centers],
            gate_bias=gate_bias,
            shortcut_init=shortcut_init,
            shortcut_init_std=shortcut_init_std,
            lr_smoothing_init=lr_smoothing_init,
            step_offset_init=step_offset_init,
            beta_sc_bias_init=beta_sc_bias_init,
            beta_in_bias_init=beta_in_bias_init,
            log_lr_bounds=[float(b) for b in log_lr_bounds],
            init_lr_range=[float(b) for b in init_lr_range],
            ms_epsilon=ms_epsilon,
            epsilon=epsilon,
            seed=seed,
        )
        if lr_adaptation not in LR_ADAPTATIONS:
            raise ValueError(f"lr_adaptation must be one of {LR_ADAPTATIONS}, got {lr_adaptation!r}.")
        if not log_gain_bounds[0] <= 0.0 <= log_gain_bounds[1]:
            raise ValueError(f"log_gain_bounds must be (low, high) with low <= 0 <= high, got {log_gain_bounds}.")
        # Saved only when set, so that the weights of a rule without a gain keep their config.
        if lr_adaptation is not None:
            self.config.update(lr_adaptation=lr_adaptation, hypergradient_lr=float(hypergradient_lr),
                               log_gain_bounds=[float(b) for b in log_gain_bounds])
        if decay_fraction is not None:
            if not 0.0 <= decay_fraction <= 1.0:
                raise ValueError(f"decay_fraction must be in [0, 1] or None, got {decay_fraction}.")
            self.config.update(decay_fraction=float(decay_fraction))
        self.decay_fraction = None if decay_fraction is None else float(decay_fraction)
        self.lr_adaptation = lr_adaptation
        self.hypergradient_lr = float(hypergradient_lr)
        self.log_gain_bounds = (float(log_gain_bounds[0]), float(log_gain_bounds[1]))
        self.attention = attention
        self.hierarchy = hierarchy
        self.progress_input = progress_input
        if max_update_ratio is not None and not max_update_ratio > 0:
            raise ValueError(f"max_update_ratio must be positive or None, got {max_update_ratio}.")
        self.max_update_ratio = None if max_update_ratio is None else float(max_update_ratio)
        self.progress_centers = tuple(float(c) for c in progress_centers)
        self.num_timescales = K = num_timescales
        self.log_lr_bounds = (float(log_lr_bounds[0]), float(log_lr_bounds[1]))
        self.init_lr_range = (float(init_lr_range[0]), float(init_lr_range[1]))
        self.ms_epsilon = ms_epsilon
        self.epsilon = epsilon
        self.num_features = 3 * K  # K rescaled momenta, K-1 products, K relative log magnitudes, 1 log lr
        gen = torch.Generator().manual_seed(seed)
        hp, ht, hg, nf = param_units, tensor_units, global_units, self.num_features

        self.param_rnn = BiasGRU(nf, hp, gate_bias, gen)
        self.tensor_rnn = BiasGRU(hp + nf, ht, gate_bias, gen)
        num_progress = len(self.progress_centers) if progress_input else 0
        self.global_rnn = BiasGRU(ht + num_progress, hg, gate_bias, gen)
        self.tensor_to_param = self._affine(ht, 3 * hp, gen)
        self.global_to_param = self._affine(hg, 3 * hp, gen)
        self.global_to_tensor = self._affine(hg, 3 * ht, gen)

        def readout() -> nn.Parameter:
            return nn.Parameter(_normal_(torch.empty(hp), hp, gen))

        self.w_direction = readout()
        self.w_attention = nn.Parameter(self.w_direction.detach().clone())
        self.shortcut_direction = nn.Parameter(
            torch.empty(K).normal_(shortcut_init, shortcut_init_std, generator=gen)
        )
        self.shortcut_attention = nn.Parameter(self.shortcut_direction.detach().clone())
        self.w_log_lr = nn.Parameter(torch.zeros(hp))
        self.b_log_lr = nn.Parameter(torch.zeros(()))
        self.w_beta_sc = readout()
        self.b_beta_sc = nn.Parameter(torch.tensor(float(beta_sc_bias_init)))
        self.w_beta_in = readout()
        self.b_beta_in = nn.Parameter(torch.tensor(float(beta_in_bias_init)))
        self.lr_smoothing = nn.Parameter(torch.tensor(float(lr_smoothing_init)))
        self.step_offset = nn.Parameter(torch.tensor(float(step_offset_init)))
        self.h0_param = nn.Parameter(torch.empty(hp).uniform_(-1.0, 1.0, generator=gen))
        self.h0_tensor = nn.Parameter(torch.empty(ht).uniform_(-1.0, 1.0, generator=gen))
        self.h0_global = nn.Parameter(torch.empty(hg).uniform_(-1.0, 1.0, generator=gen))
        if lr_adaptation == "learned":
            # Zero: the gain stays 1 and the rule is the one without it, so ES starts from there.
            self.w_gain = nn.Parameter(torch.zeros(K + 2))
        self.last_backend: Optional[str] = None
        """Which path ran the element-level part of the last step: "cpp", "triton", "compiled" or "eager"."""

    @staticmethod
    def _affine(fan_in: int, fan_out: int, gen: torch.Generator) -> nn.Linear:
        layer = nn.Linear(fan_in, fan_out)
        _normal_(layer.weight, fan_in, gen)
        with torch.no_grad():
            layer.bias.zero_()
        return layer

    @property
    def param_units(self) -> int:
        """Hidden units of the parameter RNN."""
        return self.param_rnn.hidden_size

    @property
    def tensor_units(self) -> int:
        """Hidden units of the tensor RNN."""
        return self.tensor_rnn.hidden_size

    @property
    def global_units(self) -> int:
        """Hidden units of the global RNN."""
        return self.global_rnn.hidden_size

    @property
    def tensor_state_width(self) -> int:
        """Columns of the per-tensor state: the tensor RNN's units, and the log gain with ``lr_adaptation``."""
        return self.tensor_units + (1 if self.lr_adaptation else 0)

    @property
    def global_state_width(self) -> int:
        """Columns of the per-problem state: the global RNN's units, and the loss statistics with ``lr_adaptation``."""
        return self.global_units + (2 if self.lr_adaptation else 0)

    def set_lr_adaptation(self, mode: Optional[str], hypergradient_lr: Optional[float] = None) -> None:
        """Switch the step gain (see the class's ``lr_adaptation``); a state made before no longer fits.

        ``"learned"`` needs weights that have ``w_gain``.
        """
        if mode not in LR_ADAPTATIONS:
            raise ValueError(f"lr_adaptation must be one of {LR_ADAPTATIONS}, got {mode!r}.")
        if mode == "learned" and not hasattr(self, "w_gain"):
            raise ValueError("lr_adaptation='learned' needs weights meta-trained with it (they hold w_gain).")
        self.lr_adaptation = mode
        if hypergradient_lr is not None:
            self.hypergradient_lr = float(hypergradient_lr)
        for key in ("lr_adaptation", "hypergradient_lr", "log_gain_bounds"):
            self.config.pop(key, None)
        if mode is not None:
            self.config.update(lr_adaptation=mode, hypergradient_lr=self.hypergradient_lr,
                               log_gain_bounds=list(self.log_gain_bounds))

    # ------------------------------------------------------------------ state

    def init_state(
        self,
        layout: Layout,
        theta: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        dtype: torch.dtype = torch.float32,
    ) -> HRNNState:
        """A fresh optimizer state for ``layout``.

        Args:
            layout: The flat vector's tensors and problems.
            theta: The initial parameters, flat ``(N,)``; required when attention is on.
            generator: Source of the random initial learning rates (CPU generator).
            dtype: Floating point type of the state.
        """
        n, t = layout.numel, layout.num_tensors
        device = layout.tensor_ids.device
        low, high = (0.5 * math.log(b) for b in self.init_lr_range)
        per_element = torch.empty(n, dtype=torch.float32).uniform_(low, high, generator=generator)
        per_tensor = torch.empty(t, dtype=torch.float32).uniform_(low, high, generator=generator)
        log_lr = (per_element + per_tensor.repeat_interleave(torch.tensor(layout.sizes))).to(device, dtype)
        if self.attention:
            if theta is None:
                raise ValueError("With attention on, init_state needs the initial parameters `theta`.")
            theta = theta.detach().to(dtype).clone()
        k = self.num_timescales
        zeros = torch.zeros(n, dtype=dtype, device=device)
        return HRNNState(
            h_param=self.h0_param.to(device, dtype).expand(n, -1).clone(),
            momentum=torch.zeros(n, k, dtype=dtype, device=device),
            mean_square=torch.zeros(n, k, dtype=dtype, device=device),
            beta_in=zeros,
            beta_sc=zeros.clone(),
            log_lr=log_lr,
            theta=theta if self.attention else None,
            h_tensor=self.initial_tensor_state(self.h0_tensor, t).to(device, dtype),
            h_global=self.initial_global_state(self.h0_global, layout.num_problems).to(device, dtype),
        )

    def initial_tensor_state(self, h0: Tensor, rows: int) -> Tensor:
        """``rows`` per-tensor states from the RNN's initial state ``h0`` (``(units,)``, or ``(B, units)``
        for ``B`` particles, giving ``(B, rows, width)``): the log gains start at 0."""
        h = h0.unsqueeze(-2).expand(*h0.shape[:-1], rows, h0.shape[-1])
        if not self.lr_adaptation:
            return h.clone()
        return torch.cat([h, h.new_zeros(*h.shape[:-1], 1)], -1)

    def initial_global_state(self, h0: Tensor, rows: int) -> Tensor:
        """As :meth:`initial_tensor_state`, per problem: the loss statistics start empty."""
        h = h0.unsqueeze(-2).expand(*h0.shape[:-1], rows, h0.shape[-1])
        if not self.lr_adaptation:
            return h.clone()
        return torch.cat([h, h.new_zeros(*h.shape[:-1], 2)], -1)

    # ------------------------------------------------------------------ the update rule

    def features(
        self, grad: Tensor, momentum: Tensor, mean_square: Tensor, beta_in: Tensor, beta_sc: Tensor, rel_log_lr: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Update the accumulators and compute the per-element input features.

        Returns:
            ``(z, x, momentum, mean_square)``: the ``3K`` features, the rescaled momenta ``x_s``
            and the new accumulators.
        """
        z, x, m, v = _features(self._constants(), grad, momentum, mean_square, beta_in, beta_sc, rel_log_lr)
        return torch.stack(z, -1), torch.stack(x, -1), torch.stack(m, -1), torch.stack(v, -1)

    def _constants(self) -> _Constants:
        low, high = self.log_lr_bounds
        return _Constants(self.param_units, self.num_timescales, self.attention, self.ms_epsilon, self.epsilon, low, high)

    def _element_weights(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The meta-parameters the element-level part reads, packed (differentiably) for it.

        Without autograd the packed tensors are kept until a meta-parameter changes (tracked by
        the tensors' version counters, which every in-place update bumps): on a small model,
        packing them anew was a tenth of the step.
        """
        if torch.is_grad_enabled():
            return self._pack_element_weights(dtype)
        # The sources themselves are held, so that a freed tensor's id and storage, reused by the
        # next meta-step's per-particle weights, cannot match. data_ptr: module.to() and
        # load_state_dict(assign=True) swap storage without a version bump.
        sources = self._element_sources()
        cached = self.__dict__.get("_packed_weights")
        if (cached is None or cached[0] != dtype or len(cached[1]) != len(sources)
                or any(p is not q or p._version != v or p.data_ptr() != ptr
                       for (p, v, ptr), q in zip(cached[1], sources))):
            cached = (dtype, [(p, p._version, p.data_ptr()) for p in sources], self._pack_element_weights(dtype))
            self.__dict__["_packed_weights"] = cached
        return cached[2]

    def _element_sources(self) -> list[Tensor]:
        """The meta-parameters :meth:`_pack_element_weights` reads (what its cache depends on)."""
        cell = self.param_rnn
        sources = [self.w_direction, self.w_log_lr, self.w_beta_sc, self.w_beta_in, self.shortcut_direction,
                   self.b_log_lr, self.b_beta_sc, self.b_beta_in, cell.weight_gates, cell.bias_gates,
                   cell.weight_candidate, cell.bias_candidate, self.lr_smoothing, self.step_offset]
        if self.attention:
            sources += [self.w_attention, self.shortcut_attention]
        return sources

    def _pack_element_weights(self, dtype: torch.dtype) -> dict[str, Tensor]:
        k = self.num_timescales
        heads = [self.w_direction, self.w_log_lr, self.w_beta_sc, self.w_beta_in]
        shortcuts = [self.shortcut_direction] + [torch.zeros_like(self.shortcut_direction)] * 3
        biases = [torch.zeros_like(self.b_log_lr), self.b_log_lr, self.b_beta_sc, self.b_beta_in]
        if self.attention:
            heads.append(self.w_attention)
            shortcuts.append(self.shortcut_attention)
            biases.append(torch.zeros_like(self.b_log_lr))
        # Stacked on the last dimensions, so that per-problem weights keep their leading dimension.
        read_out = torch.cat([torch.stack(heads, -1), torch.stack(shortcuts, -1)], -2)
        assert read_out.shape[-2] == self.param_units + k
        cell = self.param_rnn
        return {
            "w_gates": cell.weight_gates.to(dtype),
            "b_gates": cell.bias_gates.to(dtype),
            "w_cand": cell.weight_candidate.to(dtype),
            "b_cand": cell.bias_candidate.to(dtype),
            "w_out": read_out.to(dtype),
            "b_out": torch.stack(biases, -1).to(dtype),
            "keep": torch.sigmoid(self.lr_smoothing).to(dtype),
            "offset": self.step_offset.to(dtype),
        }

    def step(
        self,
        state: HRNNState,
        point: Tensor,
        grad: Tensor,
        layout: Layout,
        lr: Union[float, Tensor] = 1.0,
        weight_decay: Union[float, Tensor] = 0.0,
        diagnostics: bool = False,
        chunk_size: Optional[int] = None,
        out: Optional[HRNNState] = None,
        out_point: Optional[Tensor] = None,
        backend: str = "auto",
        reducer: Optional[StepReducer] = None,
        progress: Union[float, Tensor, None] = None,
        loss: Union[float, Tensor, None] = None,
    ) -> StepOutput:
        """One optimizer step over a flat vector. Pure and differentiable.

        The step has three parts: a per-tensor prelude (the problem-mean log learning rate and the
        biases the tensor and global states inject into the parameter RNN), an element-level part
        (features, parameter RNN, read-outs; see :func:`_element_update`) and a per-tensor
        epilogue (RMS normalisation of the directions, tensor and global RNNs). Without autograd,
        the element-level part runs either as one fused C++ kernel (:mod:`lightning_lopt.kernels`)
        or over fixed-size chunks of the flat buffers, so that its temporaries stay in cache,
        optionally compiled; every path computes the same function.

        Args:
            state: The optimizer state (see :meth:`init_state`).
            point: Where the gradient was taken, flat ``(N,)``: the attended point with attention,
                else the parameters.
            grad: The gradient at ``point``, flat ``(N,)``.
            layout: The flat vector's tensors and problems.
            lr: Multiplier of the learned step: a float or a per-tensor ``(T,)`` tensor.
            weight_decay: Decoupled weight decay (scaled by ``lr``): a float or per-tensor ``(T,)``.
            diagnostics: Also return a :class:`StepDiagnostics`.
            chunk_size: Elements per chunk of the element-level part when autograd is off
                (``None``: :data:`DEFAULT_CHUNK`; ``0``: one chunk). With autograd on, the step
                always runs as one chunk.
            out: Buffers for the new state (may be ``state`` itself, updated in place); only
                used without autograd. The returned state is then ``out``.
            out_point: Buffer for the returned point (may alias ``point``), likewise.
            backend: How the element-level part runs without autograd: ``"cpp"`` (the fused C++
                kernel, built on first use; CPU, float32 compute, float32 or bfloat16 state),
                ``"eager"`` (chunked torch operations), ``"compiled"`` (chunks through
                ``torch.compile``), ``"triton"`` (the fused Triton kernels of
                :mod:`lightning_lopt.kernels.triton_step`: a GPU, or CPU tensors under Triton's
                interpreter; float32 compute, float32 or bfloat16 state), or ``"auto"``: the Triton
                kernels on a GPU (eager, with a warning, where Triton is not installed), the C++ kernel wherever it applies (built on first
                use, once per machine; whatever the cache holds), else eager. Where the chosen backend does not apply or fails to build, the step
                runs eagerly (a failed build or compilation warns once). With autograd on, the step
                is always the eager reference.
            reducer: Completes the per-tensor and per-problem sums when ``state`` and ``grad``
                cover only part of the problem (sharded parameters); None: they cover it all.
            progress: Fraction of training done before this step, ``step / total_steps``: a float
                or a per-problem ``(P,)`` tensor (NaN marks a problem whose horizon is unknown);
                None: unknown. Read only with ``progress_input``, else ignored.
            loss: The loss at ``point`` (what ``optimizer.step(closure)`` returns): a float or a
                per-problem ``(P,)`` tensor; None, or a non-finite or non-positive value: unknown
                (its features are then 0 and its running mean is left as it was). Read only with
                ``lr_adaptation``, else ignored.
        """
        dtype = point.dtype
        cst = self._constants()
        hp, t_count = cst.param_units, layout.num_tensors
        tid, pid = layout.tensor_ids, layout.problem_ids
        grad_mode = torch.is_grad_enabled()
        if grad_mode:
            chunk_size, out, out_point = 0, None, None
        chunk = layout.numel if not chunk_size else int(chunk_size)
        if backend not in _BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; expected one of {_BACKENDS}.")

        cpp = None
        if backend in ("auto", "cpp") and not grad_mode and _cpp_applies(state, point, grad, out, dtype):
            from lightning_lopt import kernels

            # "auto" takes the kernel wherever it applies, building it on first use (once per
            # machine): a rule that looked at the cache made results depend on the machine's history.
            cpp = kernels.cpu_kernel()

        # ---- prelude (per tensor): problem-mean log lr, injected biases, lr and decay per tensor.
        # Per-problem meta-parameters (each with a leading problem dimension, swapped in by
        # torch.func.functional_call): every problem runs its own rule, as the particles of
        # evolution-strategies meta-training do.
        lanes = self.param_rnn.weight_gates.dim() == 3
        if lanes and reducer is None and cpp is not None and state.log_lr.dtype == torch.float32:
            # Lanes are contiguous runs: one pass, where two scatters over N elements cost more.
            lr_mean_p = cpp.segment_sums([state.log_lr], _problem_starts(layout), False)[:, 0].to(dtype) \
                / layout.problem_elements.to(dtype)
        elif reducer is None:
            lr_mean_p = layout.problem_sum(state.log_lr, dtype) / layout.problem_elements.to(dtype)
        else:
            # Per tensor first: shards of one tensor are summed across ranks before the problem sum.
            lr_t_sum = reducer.tensor_sums(state.log_lr.new_zeros(t_count, dtype=dtype).index_add(0, tid, state.log_lr.to(dtype)))
            lr_p = lr_t_sum.new_zeros(layout.num_problems).index_add(0, pid, lr_t_sum)
            # The element counts travel with the sums: under ZeRO each rank counts only its tensors.
            lr_p = reducer.problem_sums(torch.stack([lr_p, layout.problem_elements.to(dtype)], 1))
            lr_mean_p = lr_p[:, 0] / lr_p[:, 1]
        # The tensor and global RNNs run in the meta-parameters' precision; the element level in
        # the point's (float64 parameters keep float64 updates).
        rnn_dtype = self.h0_tensor.dtype
        h_tensor, h_global = state.h_tensor.to(rnn_dtype), state.h_global.to(rnn_dtype)
        gain_mode = self.lr_adaptation
        if gain_mode:
            # The gain's columns ride on the per-tensor and per-problem states; read before the
            # element level, which may overwrite the accumulators the alignment is taken with.
            log_gain, loss_stats = h_tensor[:, self.tensor_units], h_global[:, self.global_units:]
            h_tensor, h_global = h_tensor[:, : self.tensor_units], h_global[:, : self.global_units]
            new_log_gain, new_loss_stats = self._step_gain(state, grad, layout, reducer, cpp, loss, log_gain,
                                                           loss_stats)
        rows_t = ProblemRows.of(pid) if lanes else None
        if lanes and (diagnostics or reducer is not None or self.param_rnn.weight_gates.shape[0] != layout.num_problems):
            raise ValueError(
                "Per-problem meta-parameters need a leading dimension of the layout's problem count "
                f"({layout.num_problems}), and support neither diagnostics nor a reducer."
            )
        if self.hierarchy:
            injected_t = (_linear(self.tensor_to_param, h_tensor, rows_t)
                          # Per problem, then per tensor: a product per problem row, not per tensor.
                          + _linear(self.global_to_param, h_global, None)[pid]).to(dtype)
        else:
            injected_t = point.new_zeros(t_count, 3 * hp, dtype=dtype)
        lr_t = torch.as_tensor(lr, dtype=dtype, device=point.device).expand(t_count)
        wd_t = torch.as_tensor(weight_decay, dtype=dtype, device=point.device).expand(t_count)
        table = torch.cat([injected_t, lr_mean_p[pid].unsqueeze(1), lr_t.unsqueeze(1)], 1)
        weights = self._element_weights(dtype)

        # ---- element level: the fused C++ kernel, or chunk by chunk.
        n = layout.numel
        if lanes and cpp is not None and not all(t.is_contiguous() and t.dtype == torch.float32 for t in state
                                                  if t is not None):
            cpp = None
        tri = _triton_kernels(backend, state, point, grad, out, dtype) if cpp is None and not grad_mode and not lanes \
            else None
        if lanes and cpp is None:
            out, chunk = None, n  # the reference: one chunk, lane by lane
        if out is not None:
            new = out
        elif chunk < n or cpp is not None or tri is not None:
            new = _empty_like_state(state)
        else:
            new = None
        if diagnostics and new is not None:
            # The fast paths overwrite the state in place: keep what the diagnostics compare against.
            before = (state.log_lr.to(dtype).clone(), (state.theta if self.attention else point).to(dtype).clone())
        width = hp + self.num_features + 1 + int(cst.attention)
        sums = torch.zeros(t_count, width, dtype=dtype, device=point.device)
        scratch = _Scratch.get(self, n, dtype, point.device) if new is not None else None
        kernel = _compiled_kernel(cst) if backend == "compiled" and cpp is None and new is not None else None
        full: Optional[tuple[Any, ...]] = None
        starts = _problem_starts(layout) if lanes else None
        if lanes and cpp is not None:
            cpp.element_update_lanes(
                [grad.to(dtype).contiguous(), state.h_param, state.momentum, state.mean_square, state.beta_in,
                 state.beta_sc, state.log_lr],
                tid, table.contiguous(),
                [weights[k].contiguous() for k in ("w_gates", "b_gates", "w_cand", "b_cand", "w_out", "b_out")],
                starts.to(torch.int64).contiguous(), weights["keep"].contiguous(), weights["offset"].contiguous(),
                [new.h_param, new.momentum, new.mean_square, new.beta_in, new.beta_sc, new.log_lr, scratch.ud,
                 scratch.ua],
                sums, cst.attention, cst.ms_epsilon, cst.epsilon, cst.log_lr_low, cst.log_lr_high,
            )
        elif lanes:
            full = _element_update_lanes(cst, weights, starts.tolist(), grad, state, tid, table)
            sums = sums.index_add(0, tid, full[-1])
        elif cpp is not None:
            cpp.element_update(
                [grad.to(dtype).contiguous(), state.h_param, state.momentum, state.mean_square, state.beta_in,
                 state.beta_sc, state.log_lr],
                tid, table.contiguous(),
                [weights[k].contiguous() for k in ("w_gates", "b_gates", "w_cand", "b_cand", "w_out", "b_out")],
                [new.h_param, new.momentum, new.mean_square, new.beta_in, new.beta_sc, new.log_lr, scratch.ud,
                 scratch.ua],
                sums, cst.attention, float(weights["keep"]), float(weights["offset"]), cst.ms_epsilon, cst.epsilon,
                cst.log_lr_low, cst.log_lr_high,
            )
        elif tri is not None:
            sums = tri.element_update(
                layout.sizes, grad.to(dtype).contiguous(), state, new, scratch.ud, scratch.ua, table.contiguous(),
                weights, hp, cst.num_timescales, cst.attention, cst.ms_epsilon, cst.epsilon, cst.log_lr_low,
                cst.log_lr_high,
            )
        self.last_backend = ("cpp" if cpp is not None else "triton" if tri is not None
                             else "compiled" if kernel is not None else "eager")
        for start in range(0, n if cpp is None and tri is None and not lanes else 0, chunk):
            end = min(start + chunk, n)
            sl = slice(start, end)
            args = (grad[sl], state.h_param[sl], state.momentum[sl], state.mean_square[sl], state.beta_in[sl],
                    state.beta_sc[sl], state.log_lr[sl], tid[sl], table)
            if new is None:
                full = _element_update(cst, weights, *args, unrolled=False)
                h_c, m_c, v_c, bi, bsc, llr, lls, ud, ua, red = full
                sums = sums.index_add(0, tid, red)
                continue
            outs = (new.h_param[sl], new.momentum[sl], new.mean_square[sl], new.beta_in[sl], new.beta_sc[sl],
                    new.log_lr[sl], scratch.ud[sl], scratch.ua[sl])
            red = None
            if kernel is not None:
                red = kernel.run(weights, args, outs, chunk)
            if red is None:
                red = _element_update_into(cst, weights, args, outs, unrolled=False)
            sums.index_add_(0, tid[sl], red)

        # ---- epilogue (per tensor): RMS of the directions, tensor RNN, global RNN.
        if reducer is not None:
            sums = reducer.tensor_sums(sums)
        means = sums / layout.tensor_counts.to(dtype).unsqueeze(1)
        rs_d = torch.rsqrt(means[:, -1 - int(cst.attention)] + self.epsilon)
        rs_a = torch.rsqrt(means[:, -1] + self.epsilon) if cst.attention else rs_d
        if self.hierarchy:
            new_h_tensor, new_h_global = self._tensor_and_global(means, h_tensor, h_global, layout,
                                                                 reducer, progress, rows_t)
        else:
            new_h_tensor, new_h_global = h_tensor, h_global
        theta_old = state.theta if self.attention else point
        if gain_mode:
            gain = torch.exp(new_log_gain).to(dtype)
            rs_d, rs_a = rs_d * gain, rs_a * gain
            new_h_tensor_state = torch.cat([new_h_tensor, new_log_gain.unsqueeze(1).to(new_h_tensor.dtype)], 1)
            new_h_global_state = torch.cat([new_h_global, new_loss_stats.to(new_h_global.dtype)], 1)
        else:
            new_h_tensor_state, new_h_global_state = new_h_tensor, new_h_global
        if self.max_update_ratio is not None:
            # The update of a tensor is rs_d * step_d, element by element (step_d holds the lr).
            step_d = full[7] if new is None else scratch.ud
            if cpp is not None and theta_old.dtype == torch.float32 and theta_old.is_contiguous():
                # One pass over contiguous tensors, where a scatter of N rows cost as much again.
                squares = cpp.segment_sums([step_d, theta_old], _tensor_starts(layout), True)
            else:
                # Out of place: under vmap (meta-training's particles) the sums are batched.
                squares = torch.zeros(t_count, 2, dtype=dtype, device=point.device).index_add(
                    0, tid, torch.stack([step_d.to(dtype).square(), theta_old.to(dtype).square()], 1))
            if reducer is not None:
                squares = reducer.tensor_sums(squares)
            norms = squares.sqrt()
            limit = self.max_update_ratio * norms[:, 1]
            update = rs_d * norms[:, 0]
            scale = torch.where((limit > 0) & (update > limit), limit / update, torch.ones_like(update))
            rs_d, rs_a = rs_d * scale, rs_a * scale
        update_table = torch.stack([rs_d, rs_a, lr_t * wd_t], 1)

        sd = state.momentum.dtype
        if new is None:
            h_c, m_c, v_c, bi, bsc, llr, lls, ud, ua, red = full
            theta, phi = _apply_update(theta_old.to(dtype), ud, ua, tid, update_table, cst.attention)
            new_state = HRNNState(
                h_param=h_c.to(sd),
                momentum=m_c.to(sd),
                mean_square=v_c.to(sd),
                beta_in=bi.to(sd),
                beta_sc=bsc.to(sd),
                log_lr=llr.to(sd),
                theta=theta.to(state.theta.dtype) if self.attention else None,
                h_tensor=new_h_tensor_state.to(sd),
                h_global=new_h_global_state.to(sd),
            )
            diag = None
            if diagnostics:
                lr_e = lr_t[tid]
                diag = StepDiagnostics(
                    beta_in=bi.detach(),
                    beta_sc=bsc.detach(),
                    log_step_size=(lls + self.step_offset + torch.log(lr_e)
                                   + (new_log_gain[tid].to(dtype) if gain_mode else 0.0)).detach(),
                    update=(theta - theta_old).detach(),
                    attention_offset=(phi - theta).detach(),
                    theta=theta.detach(),
                    h_tensor=new_h_tensor.detach(),
                    h_global=new_h_global.detach(),
                )
            return StepOutput(phi, new_state, diag)

        # Chunked: the second element pass applies the per-tensor normalisers.
        theta_new = new.theta if self.attention else None
        if theta_new is None and self.attention:
            theta_new = torch.empty_like(state.theta)
        point_new = out_point if out_point is not None else torch.empty_like(point)
        applied = False
        if cpp is not None and theta_old.dtype == dtype and (theta_new is None or theta_new.dtype == dtype) \
                and point_new.dtype == dtype and point_new.is_contiguous() and theta_old.is_contiguous():
            cpp.apply_update(theta_old, scratch.ud, scratch.ua, tid, update_table.contiguous(),
                             theta_new if self.attention else point_new, point_new, cst.attention)
            applied = True
        elif tri is not None and theta_old.dtype == dtype and (theta_new is None or theta_new.dtype == dtype) \
                and point_new.dtype == dtype and point_new.is_contiguous() and theta_old.is_contiguous():
            tri.apply_update(layout.sizes, theta_old, scratch.ud, scratch.ua, update_table.to(dtype),
                             theta_new, point_new, cst.attention)
            applied = True
        for start in range(0, 0 if applied else n, chunk):
            sl = slice(start, min(start + chunk, n))
            theta, phi = _apply_update(theta_old[sl].to(dtype), scratch.ud[sl], scratch.ua[sl], tid[sl], update_table,
                                       cst.attention)
            if self.attention:
                theta_new[sl].copy_(theta)
                point_new[sl].copy_(phi)
            else:
                point_new[sl].copy_(theta)
        new.h_tensor.copy_(new_h_tensor_state)
        new.h_global.copy_(new_h_global_state)
        new_state = new._replace(theta=theta_new) if self.attention else new
        diag = None
        if diagnostics:
            old_log_lr, old_theta = before
            theta_now = (theta_new if self.attention else point_new).to(dtype)
            keep = float(weights["keep"])
            # eta_new = keep * eta + (1 - keep) * eta_step, so the applied (clipped) eta_step follows exactly.
            log_lr_step = (new.log_lr.to(dtype) - keep * old_log_lr) / (1.0 - keep)
            diag = StepDiagnostics(
                beta_in=new.beta_in.to(dtype).clone(),
                beta_sc=new.beta_sc.to(dtype).clone(),
                log_step_size=log_lr_step + self.step_offset.detach().to(dtype) + torch.log(lr_t[tid])
                + (new_log_gain[tid].to(dtype) if gain_mode else 0.0),
                update=theta_now - old_theta,
                attention_offset=point_new.to(dtype) - theta_now,
                theta=theta_now.clone(),
                h_tensor=new_h_tensor.detach().clone(),
                h_global=new_h_global.detach().clone(),
            )
        return StepOutput(point_new, new_state, diag)

    def _step_gain(
        self,
        state: HRNNState,
        grad: Tensor,
        layout: Layout,
        reducer: Optional[StepReducer],
        cpp: Any,
        loss: Union[float, Tensor, None],
        log_gain: Tensor,
        loss_stats: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The new per-tensor log gains ``(T,)`` and per-problem loss statistics ``(P, 2)``.

        Features per tensor: the cosine of the gradient with the rescaled momentum ``m_s / sqrt(v_s)``
        of the last step at each timescale ``s`` (the direction the rule's updates mostly follow: it
        stands in for the previous update, so that no per-element state is added), then the log of
        the problem's loss over the running mean of its log loss, clipped to +-3, and that value's
        positive part.
        """
        dtype, tid, pid = log_gain.dtype, layout.tensor_ids, layout.problem_ids
        k = self.num_timescales
        g = grad.to(dtype)
        if cpp is not None and dtype == torch.float32 and reducer is None:
            # One pass over the state, where the eager sums below build (N, K) temporaries and
            # scatter N rows: on meta-training's small tasks they cost a tenth of the step.
            sums = cpp.alignment_sums(g.contiguous(), state.momentum, state.mean_square, _tensor_starts(layout),
                                      self.epsilon)
        else:
            x = state.momentum.to(dtype) * torch.rsqrt(state.mean_square.to(dtype) + self.epsilon)
            sums = torch.zeros(layout.num_tensors, 2 * k + 1, dtype=dtype, device=g.device).index_add(
                0, tid, torch.cat([g.unsqueeze(1) * x, x.square(), g.square().unsqueeze(1)], 1))
        if reducer is not None:
            sums = reducer.tensor_sums(sums)
        # Norms taken apart, so that their product cannot underflow where both are tiny.
        align = (sums[:, :k] / (sums[:, k : 2 * k].sqrt() * sums[:, 2 * k :].sqrt() + 1e-30)).clamp(-1.0, 1.0)

        ratio, stats = torch.zeros(layout.num_problems, dtype=dtype, device=g.device), loss_stats
        if loss is not None:
            value = torch.as_tensor(loss, device=g.device).detach().to(dtype).reshape(-1).expand(layout.num_problems)
            valid = torch.isfinite(value) & (value > 0)
            log_loss = torch.log(torch.where(valid, value, torch.ones_like(value)))
            mean, weight = loss_stats[:, 0], loss_stats[:, 1]
            seen = weight > 0
            ratio = torch.where(valid & seen, (log_loss - mean / torch.where(seen, weight, torch.ones_like(weight)))
                                .clamp(-3.0, 3.0), torch.zeros_like(value))
            stats = torch.stack([torch.where(valid, LOSS_DECAY * mean + (1 - LOSS_DECAY) * log_loss, mean),
                                 torch.where(valid, LOSS_DECAY * weight + (1 - LOSS_DECAY), weight)], 1)
        if self.lr_adaptation == "hypergradient":
            delta = self.hypergradient_lr * align[:, 0]
        else:
            features = torch.cat([align, ratio[pid].unsqueeze(1), ratio.clamp(min=0.0)[pid].unsqueeze(1)], 1)
            w = self.w_gain.to(dtype)
            delta = (features * (w[pid] if w.dim() == 2 else w)).sum(1)
        low, high = self.log_gain_bounds
        return (log_gain + delta).clamp(low, high), stats

    def _tensor_and_global(
        self,
        means: Tensor,
        h_tensor: Tensor,
        h_global: Tensor,
        layout: Layout,
        reducer: Optional[StepReducer],
        progress: Union[float, Tensor, None],
        rows_t: Optional[ProblemRows] = None,
    ) -> tuple[Tensor, Tensor]:
        """The tensor RNN on each tensor's mean of ``[h_param', z]``, then the global RNN on each
        problem's mean of the new tensor states (and the progress features with ``progress_input``)."""
        rnn_dtype, pid = h_tensor.dtype, layout.problem_ids
        tensor_in = means[:, : self.param_units + self.num_features]
        new_h_tensor = self.tensor_rnn(tensor_in.to(rnn_dtype), h_tensor,
                                       _linear(self.global_to_tensor, h_global, None)[pid], rows=rows_t)
        global_in = new_h_tensor.new_zeros(layout.num_problems, new_h_tensor.shape[-1]).index_add(0, pid, new_h_tensor)
        if reducer is None:
            global_in = global_in / layout.problem_tensors.to(rnn_dtype).unsqueeze(-1)
        else:
            global_in = reducer.problem_sums(torch.cat([global_in, layout.problem_tensors.to(rnn_dtype).unsqueeze(-1)], 1))
            global_in = global_in[:, :-1] / global_in[:, -1:]
        if self.progress_input:
            global_in = torch.cat([global_in, self.progress_features(progress, layout.num_problems, global_in)], -1)
        return new_h_tensor, self.global_rnn(global_in, h_global)

    def progress_features(self, progress: Union[float, Tensor, None], num_problems: int, like: Tensor) -> Tensor:
        """``tanh(10 * (x - c))`` for each centre ``c``, ``(P, len(progress_centers))``; zeros where
        the horizon is unknown (``progress`` None, or NaN for a problem).

        Args:
            progress: Fraction of training done: a float, a scalar or ``(P,)`` tensor, or None.
            num_problems: ``P``.
            like: A tensor whose dtype and device the features take.
        """
        width = len(self.progress_centers)
        if progress is None:
            return like.new_zeros(num_problems, width)
        x = torch.as_tensor(progress, dtype=like.dtype, device=like.device).reshape(-1, 1).expand(num_problems, 1)
        centers = torch.tensor(self.progress_centers, dtype=like.dtype, device=like.device)
        features = torch.tanh(10.0 * (x - centers))
        return torch.where(torch.isnan(x), torch.zeros_like(features), features)

    # ------------------------------------------------------------------ adapters

    def optimizer(self, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """A :class:`~lightning_lopt.HierarchicalRNNOptimizer` over ``params`` with these weights."""
        if _optimizer_class is None:  # only if this file were loaded outside its package
            raise RuntimeError("HierarchicalRNN.optimizer needs lightning_lopt.optimizer imported.")
        return _optimizer_class(params, weights=self, **kwargs)

    # ------------------------------------------------------------------ weights files

    def save_pretrained(self, path: Union[str, Path], card: Optional[dict[str, Any]] = None) -> Path:
        """Write the meta-parameters as safetensors, with a JSON card beside it.

        Args:
            path: Target ``.safetensors`` file (the suffix is added if missing).
            card: Extra entries for the JSON card (training recipe, results, ...).

        Returns:
            The path of the safetensors file. The card is the same path with ``.json``.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": "lightning_lopt.hrnn", "config": json.dumps(self.config)})
        # safetensors writes through a private temporary file (mode 0600); give the weights the
        # mode of an ordinary file, as their card gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)
        full_card = {"format": "lightning_lopt.hrnn", "config": self.config, **(card or {})}
        path.with_suffix(".json").write_text(json.dumps(full_card, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], **overrides: Any) -> "HierarchicalRNN":
        """Load meta-parameters.

        Args:
            path: ``"default"`` (or another name of a file shipped in ``lightning_lopt/weights``),
                a ``.safetensors`` file written by :meth:`save_pretrained`, or a Lightning ``.ckpt``
                of :class:`~lightning_lopt.meta.MetaTrainingModule`.
            **overrides: Architecture arguments the file must agree with; a disagreement raises.

        Raises:
            FileNotFoundError: No such file or shipped name.
            ValueError: The file is not a hierarchical RNN of a matching architecture.
        """
        config, tensors, source = _read_weights(path)
        for key, value in overrides.items():
            if key not in config:
                raise ValueError(f"Unknown HierarchicalRNN argument {key!r}.")
            stored = config[key]
            if (list(stored) if isinstance(stored, (list, tuple)) else stored) != (
                list(value) if isinstance(value, (list, tuple)) else value
            ):
                raise ValueError(f"{source} was trained with {key}={stored!r}, but {key}={value!r} was asked for.")
        try:
            model = cls(**config)
        except TypeError as err:
            raise ValueError(f"{source} holds an unknown architecture config {config}: {err}") from err
        model.load_weights(tensors, source=source)
        return model

    def load_weights(self, tensors: dict[str, Tensor], source: str = "the weights") -> None:
        """Copy meta-parameters in, raising an error that names every missing, extra or misshapen one."""
        own = self.state_dict()
        # A new input's weights start at zero, where the rule is the one without that input: weights
        # saved before it load into a rule that has it (a meta-training run that adds the input).
        neutral = {k: own[k] for k in set(own) - set(tensors) if k in _ZERO_INIT_INPUTS}
        missing = sorted(set(own) - set(tensors) - set(neutral))
        extra = sorted(set(tensors) - set(own))
        shapes = [
            f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(tensors))
            if tensors[k].shape != own[k].shape
        ]
        if missing or extra or shapes:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unexpected {extra}")
            if shapes:
                parts.append("shape mismatch " + "; ".join(shapes))
            raise ValueError(f"{source} does not match this HierarchicalRNN ({self.config}): " + ", ".join(parts))
        self.load_state_dict({**neutral, **tensors})


# ---------------------------------------------------------------------------- the element-level part

DEFAULT_CHUNK = 8192
"""Elements per chunk of the eager element-level part without autograd: its temporaries (a few
dozen values per element) then stay in the L2 cache, and no step allocates or page-faults large
buffers."""

class _Constants(NamedTuple):
    """The Python constants of the element-level part (a compiled kernel is specialised on them)."""

    param_units: int
    num_timescales: int
    attention: bool
    ms_epsilon: float
    epsilon: float
    log_lr_low: float
    log_lr_high: float


def _affine(
    parts: list[Tensor], weight: Tensor, bias: Tensor, extra: Optional[Tensor], unrolled: bool, act: Any = None
) -> list[Tensor]:
    """``act(concat(parts) @ weight + bias + extra)`` as a list of output columns.

    ``parts`` are ``(C,)`` columns or ``(C, k)`` blocks. With ``unrolled``, each output column is
    written as a sum of scalar-times-column products: inductor then fuses the whole parameter-level
    GRU into one vectorised loop instead of calling a library matmul for a 22x20 product.
    """
    if not unrolled:
        x = torch.cat([p if p.dim() == 2 else p.unsqueeze(1) for p in parts], 1)
        y = torch.addmm(bias, x, weight)
        if extra is not None:
            y = y + extra
        return list((act(y) if act is not None else y).unbind(1))
    cols = [c for p in parts for c in (p.unbind(1) if p.dim() == 2 else (p,))]
    result = []
    for j in range(weight.shape[1]):
        acc = cols[0] * weight[0, j] + bias[j]
        if extra is not None:
            acc = acc + extra[:, j]
        for k in range(1, len(cols)):
            acc = acc + cols[k] * weight[k, j]
        result.append(act(acc) if act is not None else acc)
    return result


def _features(
    cst: _Constants, grad: Tensor, momentum: Tensor, mean_square: Tensor, beta_in: Tensor, beta_sc: Tensor, rel_log_lr: Tensor
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """The accumulators and the ``3K`` input features, as lists of ``(C,)`` columns.

    Returns ``(z, x, momentum, mean_square)``.
    """
    k = cst.num_timescales
    xs, log_ms, moms, mss = [], [], [], []
    beta = beta_in
    for s in range(k):
        # beta_in ** 2**-s as repeated square roots: the same value, without a pow per timescale.
        beta = beta if s == 0 else torch.sqrt(beta)
        a = (1.0 - beta) * grad + beta * momentum[:, s]
        v = (1.0 - beta_sc) * (a * a + cst.ms_epsilon) + beta_sc * mean_square[:, s]
        moms.append(a)
        mss.append(v)
        xs.append(torch.asinh(a * torch.rsqrt(v + cst.epsilon)))
        log_ms.append(torch.log(v + cst.epsilon))
    mean_log = sum(log_ms[1:], log_ms[0]) / k
    z = xs + [xs[s] * xs[s + 1] for s in range(k - 1)] + [lm - mean_log for lm in log_ms] + [rel_log_lr]
    return z, xs, moms, mss


def _element_update(
    cst: _Constants,
    w: dict[str, Tensor],
    grad: Tensor,
    h_param: Tensor,
    momentum: Tensor,
    mean_square: Tensor,
    beta_in: Tensor,
    beta_sc: Tensor,
    log_lr: Tensor,
    tensor_ids: Tensor,
    table: Tensor,
    unrolled: bool,
) -> tuple[Tensor, ...]:
    """The element-level part of the step: features, parameter RNN and read-outs, for ``C`` elements.

    Every element is independent given the per-tensor ``table`` (rows: the ``3 * param_units``
    injected biases, the problem-mean log learning rate, the lr multiplier), so this runs over any
    contiguous chunk of the flat buffers. This is the reference of every other path (the chunked
    and compiled steps, the C++ kernel of :mod:`lightning_lopt.kernels`).

    Args:
        unrolled: Write the small products column by column (for ``torch.compile``, which then
            fuses the whole parameter GRU into one loop); otherwise use matrix products, which
            need far fewer eager operations.

    Returns:
        ``(h, momentum, mean_square, beta_in, beta_sc, log_lr, log_lr_step, step_d, step_a, reduce)``:
        the new state, the clipped step log lr, the un-normalised updates
        ``exp(log_lr_step + c) * lr * d`` and ``exp(log_lr_step) * lr * a``, and the ``(C, R)``
        values whose per-tensor means the epilogue needs (``h``, ``z``, ``d^2`` and, with
        attention, ``a^2``).
    """
    if unrolled:
        return _element_update_columns(cst, w, grad, h_param, momentum, mean_square, beta_in, beta_sc, log_lr,
                                       tensor_ids, table)
    dtype = table.dtype
    hp, k = cst.param_units, cst.num_timescales
    rows = table[tensor_ids]
    grad, log_lr, h = grad.to(dtype), log_lr.to(dtype), h_param.to(dtype)
    beta_sc = beta_sc.to(dtype).unsqueeze(1)
    # beta_in ** 2**-s as repeated square roots, as the column form computes it.
    betas = [beta_in.to(dtype)]
    for _ in range(1, k):
        betas.append(torch.sqrt(betas[-1]))
    beta = torch.stack(betas, 1)
    m = (1.0 - beta) * grad.unsqueeze(1) + beta * momentum.to(dtype)
    v = (1.0 - beta_sc) * (m * m + cst.ms_epsilon) + beta_sc * mean_square.to(dtype)
    x = torch.asinh(m * torch.rsqrt(v + cst.epsilon))
    log_ms = torch.log(v + cst.epsilon)
    z = torch.cat([x, x[:, :-1] * x[:, 1:], log_ms - log_ms.mean(1, keepdim=True),
                   (log_lr - rows[:, 3 * hp]).unsqueeze(1)], 1)
    # Parameter RNN (BiasGRU) biased by the tensor and global states of the previous step.
    gates = torch.sigmoid(torch.addmm(w["b_gates"], torch.cat([z, h], 1), w["w_gates"]) + rows[:, : 2 * hp])
    reset, keep = gates[:, :hp], gates[:, hp:]
    cand = torch.tanh(torch.addmm(w["b_cand"], torch.cat([z, reset * h], 1), w["w_cand"]) + rows[:, 2 * hp : 3 * hp])
    h_new = keep * h + (1.0 - keep) * cand
    # Read-outs: direction, log lr, decays (and attention), with shortcuts from the rescaled momenta.
    outs = torch.addmm(w["b_out"], torch.cat([h_new, x], 1), w["w_out"])
    direction = outs[:, 0]
    log_lr_step = _straight_through_clamp(log_lr + outs[:, 1], cst.log_lr_low, cst.log_lr_high)
    new_log_lr = w["keep"] * log_lr + (1.0 - w["keep"]) * log_lr_step
    decays = torch.sigmoid(outs[:, 2:4])
    lr_e = rows[:, 3 * hp + 1]
    step_d = torch.exp(log_lr_step + w["offset"]) * lr_e * direction
    if cst.attention:
        step_a = torch.exp(log_lr_step) * lr_e * outs[:, 4]
        squares = outs[:, 0::4].square()  # columns 0 and 4: direction and attention
    else:
        step_a = step_d
        squares = outs[:, :1].square()
    reduce = torch.cat([h_new, z, squares], 1)
    return h_new, m, v, decays[:, 1], decays[:, 0], new_log_lr, log_lr_step, step_d, step_a, reduce


def _element_update_lanes(
    cst: _Constants,
    w: dict[str, Tensor],
    bounds: list[int],
    grad: Tensor,
    state: "HRNNState",
    tensor_ids: Tensor,
    table: Tensor,
) -> tuple[Tensor, ...]:
    """:func:`_element_update` for lanes of elements (``[bounds[i], bounds[i + 1])``) with their own
    weights (``w`` with a leading lane dimension). Consecutive lanes of one size (the particles of
    one task) run as one call vmapped over them, so the call count follows the tasks, not the lanes."""
    fields = (grad, state.h_param, state.momentum, state.mean_square, state.beta_in, state.beta_sc, state.log_lr,
              tensor_ids)
    one = functools.partial(_element_update, cst, unrolled=False)
    parts = []
    lane = 0
    lanes = len(bounds) - 1
    while lane < lanes:
        size = bounds[lane + 1] - bounds[lane]
        end = lane + 1
        while end < lanes and bounds[end + 1] - bounds[end] == size:
            end += 1
        a, b, count = bounds[lane], bounds[end], end - lane
        inputs = [f[a:b].reshape(count, size, *f.shape[1:]) for f in fields]
        group = {k: v[lane:end] for k, v in w.items()}
        out = torch.func.vmap(lambda wg, *xs: one(wg, *xs, table))(group, *inputs)
        parts.append(tuple(o.reshape(count * size, *o.shape[2:]) for o in out))
        lane = end
    return tuple(torch.cat(cols) for cols in zip(*parts))


def _element_update_columns(
    cst: _Constants,
    w: dict[str, Tensor],
    grad: Tensor,
    h_param: Tensor,
    momentum: Tensor,
    mean_square: Tensor,
    beta_in: Tensor,
    beta_sc: Tensor,
    log_lr: Tensor,
    tensor_ids: Tensor,
    table: Tensor,
) -> tuple[Tensor, ...]:
    """:func:`_element_update` written column by column, the form inductor fuses into one loop."""
    dtype = table.dtype
    hp = cst.param_units
    rows = table[tensor_ids]
    grad, log_lr = grad.to(dtype), log_lr.to(dtype)
    h = h_param.to(dtype)
    z, xs, moms, mss = _features(
        cst, grad, momentum.to(dtype), mean_square.to(dtype), beta_in.to(dtype), beta_sc.to(dtype), log_lr - rows[:, 3 * hp]
    )
    reset_keep = _affine(z + [h], w["w_gates"], w["b_gates"], rows[:, : 2 * hp], True, torch.sigmoid)
    reset, keep = reset_keep[:hp], reset_keep[hp:]
    h_cols = h.unbind(1)
    cand = _affine(z + [r * hc for r, hc in zip(reset, h_cols)], w["w_cand"], w["b_cand"], rows[:, 2 * hp : 3 * hp],
                   True, torch.tanh)
    h_new = [u * hc + (1.0 - u) * c for u, hc, c in zip(keep, h_cols, cand)]
    outs = _affine(h_new + xs, w["w_out"], w["b_out"], None, True)
    direction, log_lr_out, beta_sc_out, beta_in_out = outs[:4]
    log_lr_step = _straight_through_clamp(log_lr + log_lr_out, cst.log_lr_low, cst.log_lr_high)
    new_log_lr = w["keep"] * log_lr + (1.0 - w["keep"]) * log_lr_step
    lr_e = rows[:, 3 * hp + 1]
    step_d = torch.exp(log_lr_step + w["offset"]) * lr_e * direction
    reduce = h_new + z + [direction * direction]
    if cst.attention:
        step_a = torch.exp(log_lr_step) * lr_e * outs[4]
        reduce.append(outs[4] * outs[4])
    else:
        step_a = step_d
    return (torch.stack(h_new, 1), torch.stack(moms, 1), torch.stack(mss, 1), torch.sigmoid(beta_in_out),
            torch.sigmoid(beta_sc_out), new_log_lr, log_lr_step, step_d, step_a, torch.stack(reduce, 1))


def _element_update_into(
    cst: _Constants, w: dict[str, Tensor], args: tuple[Tensor, ...], outs: tuple[Tensor, ...], unrolled: bool
) -> Tensor:
    """Run :func:`_element_update` on one chunk and write the new state into ``outs`` (views of the
    state and scratch buffers, which may alias the inputs). Returns the ``(C, R)`` reduction rows."""
    results = _element_update(cst, w, *args, unrolled=unrolled)
    for dst, src in zip(outs, results[:6] + results[7:9]):
        dst.copy_(src)
    return results[-1]


def _apply_update(
    theta_old: Tensor, step_d: Tensor, step_a: Tensor, tensor_ids: Tensor, table: Tensor, attention: bool
) -> tuple[Tensor, Tensor]:
    """The parameter update, given per-tensor ``table`` rows ``(1/rms(d), 1/rms(a), lr * weight_decay)``.

    Returns ``(theta, phi)``: the new true parameters and the attended point (``theta`` without attention).
    """
    rows = table[tensor_ids]
    theta = theta_old - step_d * rows[:, 0] - rows[:, 2] * theta_old
    phi = theta_old - step_a * rows[:, 1] if attention else theta
    return theta, phi


def _empty_like_state(state: HRNNState) -> HRNNState:
    return HRNNState(*(None if t is None else torch.empty_like(t) for t in state))


def _read_weights(path: Union[str, Path]) -> tuple[dict[str, Any], dict[str, Tensor], str]:
    """Return ``(config, tensors, description)`` from a shipped name, safetensors file or checkpoint."""
    name = str(path)
    candidate = Path(name)
    if not candidate.exists() and "/" not in name and "\\" not in name and not candidate.suffix:
        shipped = WEIGHTS_DIR / f"{name}.safetensors"
        if not shipped.exists():
            available = sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))
            raise FileNotFoundError(
                f"No shipped weights named {name!r}; available: {available or 'none'}. "
                "Pass a path to a .safetensors or .ckpt file, or weights=None for the untrained initialisation."
            )
        candidate = shipped
    if not candidate.exists():
        raise FileNotFoundError(f"Weights file {candidate} does not exist.")
    if candidate.suffix == ".json":
        raise ValueError(
            f"{candidate} is a weights card (JSON), not weights: pass the .safetensors file beside it "
            f"({candidate.with_suffix('.safetensors')})."
        )
    if candidate.suffix == ".ckpt":
        try:
            ckpt = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as err:  # torch's reader names neither the file nor the likely cause
            raise ValueError(
                f"{candidate} is not a readable checkpoint (truncated or corrupted?): {type(err).__name__}: {err}"
            ) from err
        if not isinstance(ckpt, dict):
            raise ValueError(f"{candidate} is not a Lightning checkpoint (it holds a {type(ckpt).__name__}).")
        hparams = ckpt.get("hyper_parameters", {})
        config = hparams.get("lopt_config")
        state = ckpt.get("state_dict", {})
        prefix = "lopt."
        tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if config is None or not tensors:
            raise ValueError(
                f"{candidate} is not a MetaTrainingModule checkpoint (no 'lopt_config' hyper-parameter "
                "or no 'lopt.' weights)."
            )
        return dict(config), tensors, str(candidate)
    from safetensors import safe_open

    try:
        with safe_open(str(candidate), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{candidate} is not a readable safetensors file (truncated or corrupted?): {err}") from err
    if metadata.get("format") != "lightning_lopt.hrnn" or "config" not in metadata:
        raise ValueError(
            f"{candidate} is not a lightning_lopt HierarchicalRNN weights file (metadata {metadata}); "
            "write one with HierarchicalRNN.save_pretrained."
        )
    return json.loads(metadata["config"]), tensors, str(candidate)
