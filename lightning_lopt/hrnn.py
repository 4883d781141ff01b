"""The hierarchical RNN learned optimizer (Wichrowska et al., ICML 2017).

This module holds the one definition of the update rule. :class:`HierarchicalRNN` owns the
meta-parameters and exposes a pure, vectorised :meth:`HierarchicalRNN.step` over a flat vector
that may hold many parameter tensors, grouped into independent problems. The torch optimizer
(:mod:`lightning_lopt.optimizer`) and meta-training (:mod:`lightning_lopt.meta`) are thin adapters
around it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_lopt.optimizer import HierarchicalRNNOptimizer

__all__ = ["BiasGRU", "HierarchicalRNN", "HRNNState", "Layout", "StepDiagnostics", "StepOutput"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


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

    def forward(self, x: Tensor, h: Tensor, injected: Optional[Tensor] = None) -> Tensor:
        """One step. ``injected`` has width ``3 * hidden_size`` (reset, keep, candidate) or is None."""
        hs = self.hidden_size
        gates = torch.cat([x, h], dim=-1) @ self.weight_gates + self.bias_gates
        if injected is not None:
            gates = gates + injected[..., : 2 * hs]
        reset, keep = torch.sigmoid(gates).split(hs, dim=-1)
        cand = torch.cat([x, reset * h], dim=-1) @ self.weight_candidate + self.bias_candidate
        if injected is not None:
            cand = cand + injected[..., 2 * hs :]
        return keep * h + (1.0 - keep) * torch.tanh(cand)


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
    ) -> "Layout":
        """Make a layout.

        Args:
            sizes: Number of elements of each tensor, in flat order (all positive).
            problems: Problem index of each tensor (``0 .. P-1``); ``None`` means one problem.
            device: Where the index tensors live.
        """
        sizes = tuple(int(s) for s in sizes)
        if not sizes or min(sizes) <= 0:
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
        counts = size_t.to(torch.float32)
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

    def tensor_mean(self, values: Tensor) -> Tensor:
        """Mean over each tensor's elements of ``values`` (shape ``(N, ...)``) -> ``(T, ...)``."""
        total = values.new_zeros((self.num_tensors, *values.shape[1:])).index_add(0, self.tensor_ids, values)
        return total / self.tensor_counts.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))


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
        h_tensor: Tensor-RNN state, ``(T, tensor_units)``.
        h_global: Global-RNN state, ``(P, global_units)``.
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


def _straight_through_clamp(x: Tensor, low: float, high: float) -> Tensor:
    # Forward clamps; backward passes the gradient through unchanged, so a learning rate that hits
    # the bound still receives a signal to come back.
    return x + (x.clamp(low, high) - x).detach()


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
        self.config: dict[str, Any] = dict(
            param_units=param_units,
            tensor_units=tensor_units,
            global_units=global_units,
            num_timescales=num_timescales,
            attention=attention,
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
        self.attention = attention
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
        self.global_rnn = BiasGRU(ht, hg, gate_bias, gen)
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
            h_tensor=self.h0_tensor.to(device, dtype).expand(t, -1).clone(),
            h_global=self.h0_global.to(device, dtype).expand(layout.num_problems, -1).clone(),
        )

    # ------------------------------------------------------------------ the update rule

    def features(
        self, grad: Tensor, momentum: Tensor, mean_square: Tensor, beta_in: Tensor, beta_sc: Tensor, rel_log_lr: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Update the accumulators and compute the per-element input features.

        Returns:
            ``(z, x, momentum, mean_square)``: the ``3K`` features, the rescaled momenta ``x_s``
            and the new accumulators.
        """
        k = self.num_timescales
        exponents = torch.pow(2.0, -torch.arange(k, dtype=grad.dtype, device=grad.device))
        betas = beta_in.unsqueeze(-1) ** exponents
        momentum = (1.0 - betas) * grad.unsqueeze(-1) + betas * momentum
        bsc = beta_sc.unsqueeze(-1)
        mean_square = (1.0 - bsc) * (momentum.square() + self.ms_epsilon) + bsc * mean_square
        x = torch.asinh(momentum * torch.rsqrt(mean_square + self.epsilon))
        log_ms = torch.log(mean_square + self.epsilon)
        rel_log_ms = log_ms - log_ms.mean(-1, keepdim=True)
        z = torch.cat([x, x[:, :-1] * x[:, 1:], rel_log_ms, rel_log_lr.unsqueeze(-1)], dim=-1)
        return z, x, momentum, mean_square

    def step(
        self,
        state: HRNNState,
        point: Tensor,
        grad: Tensor,
        layout: Layout,
        lr: Union[float, Tensor] = 1.0,
        weight_decay: Union[float, Tensor] = 0.0,
        diagnostics: bool = False,
    ) -> StepOutput:
        """One optimizer step over a flat vector. Pure and differentiable.

        Args:
            state: The optimizer state (see :meth:`init_state`).
            point: Where the gradient was taken, flat ``(N,)``: the attended point with attention,
                else the parameters.
            grad: The gradient at ``point``, flat ``(N,)``.
            layout: The flat vector's tensors and problems.
            lr: Multiplier of the learned step: a float or a per-tensor ``(T,)`` tensor.
            weight_decay: Decoupled weight decay (scaled by ``lr``): a float or per-tensor ``(T,)``.
            diagnostics: Also return a :class:`StepDiagnostics`.
        """
        tid, pid = layout.tensor_ids, layout.problem_ids
        dtype = point.dtype
        h_param, momentum, mean_square = state.h_param.to(dtype), state.momentum.to(dtype), state.mean_square.to(dtype)
        beta_in, beta_sc, log_lr = state.beta_in.to(dtype), state.beta_sc.to(dtype), state.log_lr.to(dtype)
        h_tensor, h_global = state.h_tensor.to(dtype), state.h_global.to(dtype)

        # Log lr relative to its mean over the whole problem (element-weighted).
        lr_sum_t = log_lr.new_zeros(layout.num_tensors).index_add(0, tid, log_lr)
        lr_mean_p = log_lr.new_zeros(layout.num_problems).index_add(0, pid, lr_sum_t) / layout.problem_elements
        rel_log_lr = log_lr - lr_mean_p[pid][tid]

        z, x, momentum, mean_square = self.features(grad, momentum, mean_square, beta_in, beta_sc, rel_log_lr)

        # Parameter RNN, biased by the previous step's tensor and global states.
        h_global_t = h_global[pid]
        injected_t = self.tensor_to_param(h_tensor) + self.global_to_param(h_global_t)
        h_param = self.param_rnn(z, h_param, injected_t[tid])

        direction = h_param @ self.w_direction + x @ self.shortcut_direction
        log_lr_step = log_lr + (h_param @ self.w_log_lr + self.b_log_lr)
        log_lr_step = _straight_through_clamp(log_lr_step, *self.log_lr_bounds)
        keep = torch.sigmoid(self.lr_smoothing)
        new_log_lr = keep * log_lr + (1.0 - keep) * log_lr_step
        new_beta_sc = torch.sigmoid(h_param @ self.w_beta_sc + self.b_beta_sc)
        new_beta_in = torch.sigmoid(h_param @ self.w_beta_in + self.b_beta_in)

        lr_t = torch.as_tensor(lr, dtype=dtype, device=point.device).expand(layout.num_tensors)
        wd_t = torch.as_tensor(weight_decay, dtype=dtype, device=point.device).expand(layout.num_tensors)
        lr_e = lr_t[tid]
        theta_old = state.theta.to(dtype) if self.attention else point
        d_rms = layout.tensor_mean(direction.square()) + self.epsilon
        step_size = torch.exp(log_lr_step + self.step_offset) * lr_e
        theta = theta_old - step_size * direction * torch.rsqrt(d_rms)[tid] - (lr_t * wd_t)[tid] * theta_old

        if self.attention:
            att = h_param @ self.w_attention + x @ self.shortcut_attention
            a_rms = layout.tensor_mean(att.square()) + self.epsilon
            phi = theta_old - torch.exp(log_lr_step) * lr_e * att * torch.rsqrt(a_rms)[tid]
        else:
            phi = theta

        # Tensor RNN reads the mean of the new parameter states and features; global RNN the mean
        # of the new tensor states over each problem.
        tensor_in = layout.tensor_mean(torch.cat([h_param, z], dim=-1))
        h_tensor = self.tensor_rnn(tensor_in, h_tensor, self.global_to_tensor(h_global_t))
        global_in = h_tensor.new_zeros(layout.num_problems, h_tensor.shape[-1]).index_add(0, pid, h_tensor)
        global_in = global_in / layout.problem_tensors.to(dtype).unsqueeze(-1)
        h_global = self.global_rnn(global_in, h_global)

        sd = state.momentum.dtype
        new_state = HRNNState(
            h_param=h_param.to(sd),
            momentum=momentum.to(sd),
            mean_square=mean_square.to(sd),
            beta_in=new_beta_in.to(sd),
            beta_sc=new_beta_sc.to(sd),
            log_lr=new_log_lr.to(sd),
            theta=theta.to(state.theta.dtype) if self.attention else None,
            h_tensor=h_tensor.to(sd),
            h_global=h_global.to(sd),
        )
        diag = None
        if diagnostics:
            diag = StepDiagnostics(
                beta_in=new_beta_in.detach(),
                beta_sc=new_beta_sc.detach(),
                log_step_size=(log_lr_step + self.step_offset + torch.log(lr_e)).detach(),
                update=(theta - theta_old).detach(),
                attention_offset=(phi - theta).detach(),
                theta=theta.detach(),
                h_tensor=h_tensor.detach(),
                h_global=h_global.detach(),
            )
        return StepOutput(phi, new_state, diag)

    # ------------------------------------------------------------------ adapters

    def optimizer(self, params: Any, **kwargs: Any) -> "HierarchicalRNNOptimizer":
        """A :class:`~lightning_lopt.HierarchicalRNNOptimizer` over ``params`` with these weights."""
        from lightning_lopt.optimizer import HierarchicalRNNOptimizer

        return HierarchicalRNNOptimizer(params, weights=self, **kwargs)

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
        missing = sorted(set(own) - set(tensors))
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
        self.load_state_dict(tensors)


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
    if candidate.suffix == ".ckpt":
        ckpt = torch.load(candidate, map_location="cpu", weights_only=True)
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
        raise ValueError(f"{candidate} is not a readable safetensors file: {err}") from err
    if metadata.get("format") != "lightning_lopt.hrnn" or "config" not in metadata:
        raise ValueError(
            f"{candidate} is not a lightning_lopt HierarchicalRNN weights file (metadata {metadata}); "
            "write one with HierarchicalRNN.save_pretrained."
        )
    return json.loads(metadata["config"]), tensors, str(candidate)
