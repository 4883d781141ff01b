"""``HierarchicalRNNOptimizer``: the learned optimizer as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_lopt.hrnn import (
    DEFAULT_CHUNK,
    WEIGHTS_DIR,
    HierarchicalRNN,
    LR_ADAPTATIONS,
    HRNNState,
    Layout,
    StepDiagnostics,
    is_feature_major,
    register_optimizer,
)
from lightning_lopt.sharding import Sharding, local_tensor

__all__ = ["HierarchicalRNNOptimizer"]

STATE_KEY = "hrnn"
FORMAT_KEY = "optimizer"
FORMAT = "lightning_lopt.HierarchicalRNNOptimizer"
"""``state_dict()[FORMAT_KEY]``: marks a state dict as this optimizer's, so that another optimizer's is refused."""
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
"""float16 is not among them: its range (65504) cannot hold the mean squares of gradients above 256."""
COMPILE_MIN_PARAMS = 1 << 16
"""Below this many parameters the step stays eager even with ``backend="compiled"``: there is less
than one compiled chunk's worth of work, and the last, partial chunk always runs eagerly."""
GPU_CHUNK = 1 << 20
"""Elements per chunk of the eager step on a GPU (about 0.4 GB of temporaries), where each chunk
costs a few dozen kernel launches; the CPU default, ``DEFAULT_CHUNK``, keeps chunks in cache."""
BACKENDS = ("auto", "cpp", "eager", "compiled", "triton")
_TENSOR_FIELDS = HRNNState._fields
_MATRIX_FIELDS = ("h_param", "momentum", "mean_square")
_ELEMENT_FIELDS = ("h_param", "momentum", "mean_square", "beta_in", "beta_sc", "log_lr", "theta")


def _feature_major(st: dict[str, Any]) -> dict[str, Any]:
    # The (N, H) and (N, K) buffers are kept with each column contiguous: the fused kernel then
    # reads a tile's column with one vector load instead of a gather (about 10% of the step).
    for k in _MATRIX_FIELDS:
        t = st.get(k)
        if t is not None and t.dim() == 2 and not is_feature_major(t):
            st[k] = t.t().contiguous().t()
    return st


def linear_decay(progress: float, fraction: float) -> float:
    """The factor on ``lr`` at ``progress`` (the fraction of the run done) of a decay phase over the
    run's last ``fraction``: 1, then linear to 0 at the end (always 1 when ``fraction`` is 0)."""
    if fraction == 0.0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - progress) / fraction))


def load_weights(weights: Union[str, Path, HierarchicalRNN, None]) -> HierarchicalRNN:
    """Resolve the ``weights`` argument of the optimizer into a :class:`HierarchicalRNN`.

    ``None`` is the specification's initialisation from a fixed seed (not meta-trained, so it
    warns). ``"default"`` falls back to it with a warning while no default weights are shipped.
    """
    if isinstance(weights, HierarchicalRNN):
        return weights
    if weights is None:
        warnings.warn(
            "HierarchicalRNNOptimizer(weights=None) uses the untrained initialisation of the hierarchical RNN "
            "(fixed seed); it is not meta-trained and optimises poorly. Pass weights='default' or a file.",
            UserWarning,
            stacklevel=3,
        )
        return HierarchicalRNN()
    if str(weights) == "default" and not (WEIGHTS_DIR / "default.safetensors").exists():
        warnings.warn(
            "This installation ships no meta-trained 'default' weights; using the untrained initialisation "
            "of the hierarchical RNN (fixed seed), which optimises poorly.",
            UserWarning,
            stacklevel=3,
        )
        return HierarchicalRNN()
    return HierarchicalRNN.from_pretrained(weights)


def _compute_dtype(params: list[Tensor]) -> torch.dtype:
    # float64 parameters are stepped in float64 (eagerly: the fused kernel is float32); everything
    # else, half precision included, in float32.
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _abs_max(x: Tensor) -> float:
    """``max(abs(x))`` from one fused min/max pass; ``inf`` when ``x`` holds a NaN or an infinity."""
    if x.numel() == 0:
        return 0.0
    low, high = (v.item() for v in torch.aminmax(x))
    return max(-low, high) if math.isfinite(low) and math.isfinite(high) else math.inf


def _all_finite(x: Tensor) -> bool:
    # One fused min/max pass: NaN propagates into both and an infinity shows in one of them, where
    # isfinite().all() makes three passes and a mask of the parameters' size.
    low, high = torch.aminmax(x)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def _check_own_state_dict(sd: Any) -> None:
    # torch.optim.Optimizer.load_state_dict takes any optimizer's state dict and copies its group
    # options over ours: Adam's would silently set the lr multiplier to 0.001.
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or not isinstance(sd.get("param_groups"), list):
        found = f"keys {sorted(map(str, sd))}" if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(
            f"HierarchicalRNNOptimizer.load_state_dict expects a dict from HierarchicalRNNOptimizer.state_dict() "
            f"(with 'state' and 'param_groups'); found {found}."
        )
    marker = sd.get(FORMAT_KEY)
    others = [k for k in sd["state"] if k != STATE_KEY]
    if marker == FORMAT and not others:
        return
    if marker is None and STATE_KEY in sd["state"] and not others:
        return  # this optimizer's flat state alone, e.g. rebuilt by a strategy that drops top-level keys
    found = []
    if marker is not None:
        found.append(f"a state dict marked {marker!r}")
    if others:
        entries = sorted({str(k) for v in sd["state"].values() if isinstance(v, dict) for k in v})
        found.append(f"per-parameter state for {len(others)} parameter(s) with entries {entries}")
    options = sorted({str(k) for g in sd["param_groups"] if isinstance(g, dict) for k in g} - {"params"})
    found.append(f"parameter groups with options {options}")
    raise ValueError(
        "This state dict was not written by HierarchicalRNNOptimizer; found " + " and ".join(found) + ". "
        "It looks like another optimizer's (such as torch.optim.Adam). Start this optimizer from a fresh state: "
        "load only the model's weights (e.g. LightningModule.load_from_checkpoint and fit without ckpt_path)."
    )


def _from_lightning(closure: Any) -> bool:
    # Lightning's precision plugins hand step() a functools.partial of one of their methods.
    fn = closure
    while isinstance(fn, functools.partial):
        fn = fn.func
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return module.split(".")[0] in ("lightning", "pytorch_lightning")


class HierarchicalRNNOptimizer(Optimizer):
    """The hierarchical RNN learned optimizer (Wichrowska et al., 2017) as a torch optimizer.

    All parameters of all groups form one problem for the learned update rule; the state lives
    in flat buffers. With attention (the default weights use it), gradients are taken at a
    learned look-ahead point: in train mode the model holds that point, in eval mode the true
    parameters. Call :meth:`eval` before evaluating or saving a model and :meth:`train` before
    training again, or use :class:`lightning_lopt.callbacks.EvalWithTrueParameters`. Stepped by a
    Lightning Trainer with attention while neither that callback nor anything else has called
    :meth:`train` or :meth:`eval`, the optimizer warns once, saying what to add.

    Only parameters that train hold state. When the state is made (at the first step), a
    parameter holds state if it requires grad or has a gradient; frozen ones
    (``requires_grad=False``) and 0-element ones hold none, and neither :meth:`step` nor
    :meth:`train` / :meth:`eval` touches them. A parameter without state that later receives a
    gradient (unfrozen, or added with ``add_param_group``) gets a fresh state at that step, in its
    place in the flat order; the other parameters keep theirs, and from then on the per-problem
    statistics (the global RNN's input) include it. A parameter with state that stops receiving
    gradients (frozen again, or unused) keeps its state and is not stepped while its gradient is
    None; with attention, :meth:`train` and :meth:`eval` still switch it between its look-ahead
    point and its true value. Which parameters hold state is part of :meth:`state_dict`.

    Args:
        params: Parameters or parameter groups to optimise.
        weights: Meta-trained weights: "default" (the shipped ones), a path to a .safetensors
            export or a meta-training .ckpt, a lightning_lopt.HierarchicalRNN, or None (null in a
            config) for the untrained initialisation.
        lr: Multiplier of the learned step size (what LR schedulers change).
        weight_decay: Decoupled weight decay; each step shrinks parameters by lr * weight_decay.
        seed: Seed of the random initial per-element learning rates in the state.
        state_dtype: Floating point type of the state buffers: torch.float32 (default),
            torch.bfloat16 (half the state) or torch.float64; also as a string, "bfloat16" or
            "torch.bfloat16". The true parameters kept with attention stay in the compute
            precision: float64 when any parameter is float64 (the step then runs eagerly in
            float64), else float32.
        chunk_size: Elements per chunk of the step's eager element-level part (0: one chunk;
            None: lightning_lopt.hrnn.DEFAULT_CHUNK on CPU, where chunks stay in cache, and
            GPU_CHUNK of this module on a GPU, where each chunk costs a few dozen kernel launches).
        backend: How the step's element-level part runs. "auto" (default): the fused C++ kernel
            on CPU (compiled once per machine on first use, or ahead of time with
            lightning-lopt-build-kernel), the fused Triton kernels on a GPU (pip install
            'lightning-lopt[gpu]'; without Triton the step runs eagerly and warns once), else
            eager. "cpp": the C++ kernel, asked for explicitly. "triton": the Triton kernels,
            asked for explicitly (on CPU tensors only under Triton's interpreter,
            TRITON_INTERPRET=1: a test of the kernels, not a speed-up). "eager": chunked torch
            operations. "compiled": chunks through torch.compile, only above COMPILE_MIN_PARAMS
            parameters (measured slower than eager here). Where the choice does not apply
            (bfloat16 or float64 compute, a GPU) or fails to build, the step runs eagerly; a
            failed build warns once. lopt.last_backend says which ran.
        problem_group: For torch.distributed.optim.ZeroRedundancyOptimizer: the process group
            (e.g. torch.distributed.group.WORLD) whose ranks' optimizers each hold a part of the
            model's tensors. The per-problem reductions (the log learning rate's mean, the global
            RNN's input) are then all-reduced over it, so every rank applies the update of one
            optimizer over the whole model. None: this optimizer holds the whole problem. FSDP2
            (fully_shard) parameters need nothing: their shard group is read from them.
        total_steps: The training horizon in optimizer steps, for weights meta-trained with a
            training-progress input (progress_input in their config): each step then passes
            steps taken / total_steps to the update rule. None: the horizon is unknown. Weights
            without that input ignore it. Settable later as the attribute of the same name; in a
            Trainer, lightning_lopt.callbacks.TrainingProgress sets it from
            trainer.estimated_stepping_batches.
        max_update_ratio: Trust-ratio bound of the update rule: each tensor's update is at most
            this fraction of the tensor's norm (tensors of norm zero are not bound); inf turns a
            bound off. None: the weights' own setting (max_update_ratio in their config; the
            shipped default weights carry one).
        lr_adaptation: A per-tensor step gain on top of the rule (see HierarchicalRNN):
            "hypergradient" adapts each tensor's log step size by hypergradient descent (Baydin et
            al., 2018); "learned" uses the gain the weights were meta-trained with (they must hold
            one); "none" turns a gain off. None: the weights' own setting. The gain reads the loss that a closure returns; stepped
            without a closure it uses the gradient alignment alone.
        hypergradient_lr: Step of the hypergradient descent on each tensor's log step size.
        decay_fraction: When the horizon (total_steps) is known, the learned step decays linearly
            to zero over this fraction of training at its end, as the decay phase of a
            warmup-stable-decay schedule; the factor multiplies lr (so also the weight decay).
            0: no decay; set it when an LR scheduler anneals lr instead. None: the weights' own
            setting (decay_fraction in their config; the shipped default weights carry 0.5).
            Without a horizon there is no decay.

    Sharded parameters (DTensors from ``fully_shard``, ``Shard`` or ``Replicate`` on one 1-D mesh)
    are stepped shard by shard; each rank keeps state for its local shard only, and the per-tensor
    statistics are all-reduced over the shard group, so the update equals the unsharded one.
    The state dict is then per parameter (DTensors for sharded ones), which
    ``torch.distributed.checkpoint`` saves and reshards; see :attr:`per_parameter_state_dict`.
    """

    per_parameter_state_dict: Optional[bool] = None
    """Write :meth:`state_dict` per parameter (what ``torch.distributed.checkpoint`` needs) rather than
    as flat buffers. ``None``: per parameter when the parameters are sharded or ``problem_group`` is
    set. Set ``True`` on an unsharded optimizer to load a sharded checkpoint into it (resharding)."""

    def __init__(
        self,
        params: Any,
        weights: Union[str, Path, HierarchicalRNN, None] = "default",
        lr: float = 1.0,
        weight_decay: float = 0.0,
        seed: int = 0,
        state_dtype: Union[torch.dtype, str, None] = None,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
        problem_group: Optional[Any] = None,
        total_steps: Optional[int] = None,
        max_update_ratio: Optional[float] = None,
        lr_adaptation: Optional[str] = None,
        hypergradient_lr: float = 0.02,
        decay_fraction: Optional[float] = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning-rate multiplier lr={lr}: it must be >= 0.")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay={weight_decay}: it must be >= 0.")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.lopt = load_weights(weights)
        if max_update_ratio is not None:
            if not max_update_ratio > 0:
                raise ValueError(f"Invalid max_update_ratio={max_update_ratio}: it must be > 0 (inf: no bound).")
            if isinstance(weights, HierarchicalRNN):
                raise ValueError("Set max_update_ratio on the HierarchicalRNN passed as weights, not here.")
            self.lopt.max_update_ratio = None if math.isinf(max_update_ratio) else float(max_update_ratio)
            self.lopt.config["max_update_ratio"] = self.lopt.max_update_ratio
        if lr_adaptation is not None:
            modes = [m for m in LR_ADAPTATIONS if m] + ["none"]
            if lr_adaptation not in modes:
                raise ValueError(f"Invalid lr_adaptation={lr_adaptation!r}: use one of {modes}.")
            if not hypergradient_lr > 0:
                raise ValueError(f"Invalid hypergradient_lr={hypergradient_lr}: it must be > 0.")
            if isinstance(weights, HierarchicalRNN):
                raise ValueError("Set lr_adaptation on the HierarchicalRNN passed as weights, not here.")
            self.lopt.set_lr_adaptation(None if lr_adaptation == "none" else lr_adaptation, hypergradient_lr)
        if decay_fraction is None:
            decay_fraction = self.lopt.decay_fraction or 0.0
        if not 0.0 <= decay_fraction <= 1.0:
            raise ValueError(f"Invalid decay_fraction={decay_fraction}: a fraction of training in [0, 1] (0: no decay).")
        self.decay_fraction = float(decay_fraction)
        if not isinstance(weights, HierarchicalRNN):  # a module passed in may be under meta-training: leave it be
            for p in self.lopt.parameters():
                p.requires_grad_(False)
        self.seed = seed
        if isinstance(state_dtype, str):  # "bfloat16" or "torch.bfloat16", as a config writes it
            state_dtype = getattr(torch, state_dtype.removeprefix("torch."), state_dtype)
        if state_dtype is not None and state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"Invalid state_dtype={state_dtype!r}: the state holds floating point values; use one of "
                f"{', '.join(map(str, STATE_DTYPES))} (torch.bfloat16 halves the state)."
            )
        self.state_dtype = state_dtype or torch.float32
        self.last_diagnostics: Optional[StepDiagnostics] = None
        # Indices into `params` of the tensors `last_diagnostics` covers: a step skips tensors without a grad.
        self.last_diagnostics_tensors: Optional[list[int]] = None
        self._diagnostics_requested = False
        self._warned_nonfinite = False
        self._warned_nonfinite_update = False
        self._warned_past_horizon = False
        # Set once anything switches modes (EvalWithTrueParameters does on train start): until then,
        # a step from a Lightning Trainer means validation and checkpoints would see the look-ahead point.
        self._modes_managed = False
        self._layout_cache: dict[Any, Layout] = {}
        self._training = True
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; expected one of {BACKENDS}.")
        self.backend = backend
        self.problem_group = problem_group
        self._sharding_cache: Optional[tuple[Any, Sharding]] = None
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self._point_buffer: Optional[Tensor] = None
        self._hyper_cache: Optional[tuple[Any, Tensor, Tensor]] = None
        self.total_steps = total_steps

    # ------------------------------------------------------------------ public helpers

    @property
    def params(self) -> list[Tensor]:
        """All parameters of all groups, in order (the state covers :attr:`held_params`, a subsequence)."""
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def training(self) -> bool:
        """True in train mode (the model holds the attended point)."""
        return self._training

    @property
    def hrnn_state(self) -> Optional[dict[str, Any]]:
        """The flat state (tensors and counters), or None before the first step.

        Its buffers cover the parameters ``params[i]`` for ``i`` in ``hrnn_state["held"]``, in that
        order; ``hrnn_state["sizes"]`` holds their sizes.
        """
        return self.state.get(STATE_KEY)

    @property
    def state_bytes(self) -> int:
        """Bytes of the state tensors this process holds (a sharded parameter's local shard only)."""
        st = self.hrnn_state or {}
        return sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, Tensor))

    @property
    def held_params(self) -> list[Tensor]:
        """The parameters that hold state, in the flat order of the state (empty before the first step)."""
        st = self.hrnn_state
        if st is None:
            return []
        params = self.params
        return [params[i] for i in st["held"]]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient or the update was not finite (parameters and state unchanged)."""
        st = self.hrnn_state
        return 0 if st is None else int(st["skipped"])

    @property
    def total_steps(self) -> Optional[int]:
        """The training horizon in optimizer steps, or None when it is unknown."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: Optional[int]) -> None:
        if value is not None:
            if not math.isfinite(value) or int(value) != value or value < 1:
                raise ValueError(f"Invalid total_steps={value!r}: a positive whole number of steps, or None.")
            value = int(value)
        self._total_steps = value

    @property
    def progress(self) -> Optional[float]:
        """The fraction of training done that the next step passes to the update rule: steps taken
        (skipped ones included) over :attr:`total_steps`; None when the horizon is unknown."""
        if self._total_steps is None:
            return None
        st = self.hrnn_state
        done = 0 if st is None else int(st["step"]) + int(st["skipped"])
        return done / self._total_steps

    @property
    def decay_factor(self) -> float:
        """What the next step multiplies ``lr`` by: 1 until the last :attr:`decay_fraction` of
        training, then falling linearly to 0 at :attr:`total_steps`; 1 without a horizon."""
        progress = self.progress
        return 1.0 if progress is None else linear_decay(progress, self.decay_fraction)

    def request_diagnostics(self) -> None:
        """Make the next :meth:`step` compute a :class:`StepDiagnostics` into ``last_diagnostics``."""
        self._diagnostics_requested = True

    def layout(self, params: Optional[list[Tensor]] = None) -> Layout:
        """The flat layout of ``params`` (default: all parameters) on their device."""
        params = self.params if params is None else params
        key = tuple(id(p) for p in params)
        layout = self._layout_cache.get(key)
        if layout is None or layout.tensor_ids.device != params[0].device:
            sizes = [local_tensor(p).numel() for p in params]
            # A sharded parameter contributes its local shard; its means divide by the whole tensor's size.
            counts = [p.numel() for p in params] if sizes != [p.numel() for p in params] else None
            layout = Layout.build(sizes, device=params[0].device, counts=counts)
            self._layout_cache = {key: layout}
        return layout

    def _sharding(self, params: list[Tensor]) -> Optional[Sharding]:
        """How ``params`` are distributed, or None when this optimizer holds its whole problem."""
        key = tuple(id(p) for p in params)
        if self._sharding_cache is None or self._sharding_cache[0] != key:
            self._sharding_cache = (key, Sharding(params, self.problem_group))
        sharding = self._sharding_cache[1]
        return sharding if sharding.distributed else None

    # ------------------------------------------------------------------ train / eval

    def train(self) -> None:
        """Put the model at the attended point, where training gradients are taken."""
        self._modes_managed = True
        if not self._training:
            self._swap()
            self._training = True

    def eval(self) -> None:
        """Put the model at the true parameters, for evaluation and saving."""
        self._modes_managed = True
        if self._training:
            self._swap()
            self._training = False

    @torch.no_grad()
    def _swap(self) -> None:
        st = self.hrnn_state
        if st is None or st["theta"] is None:
            return
        params = [local_tensor(p) for p in self.held_params]
        shadow = st["theta"]
        current = torch.cat([p.detach().reshape(-1).to(shadow.dtype) for p in params])
        torch._foreach_copy_([p.data for p in params], self._split(shadow, params))
        shadow.copy_(current)

    @staticmethod
    def _split(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
        return [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params)]

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state: per-group hyper-parameters and the flat state (tensors and primitives)."""
        sd = super().state_dict()
        if STATE_KEY in sd["state"]:
            sd["state"][STATE_KEY] = dict(sd["state"][STATE_KEY], training=self._training)
        sd[FORMAT_KEY] = FORMAT
        per_parameter = self.per_parameter_state_dict
        if per_parameter is None:
            per_parameter = self._sharding(self.params) is not None
        if per_parameter and STATE_KEY in sd["state"]:
            flat = sd["state"][STATE_KEY]
            held = self.held_params
            per_held = Sharding(held, self.problem_group).per_parameter_state(held, flat)
            # Keyed by the index among all parameters, as torch.optim writes them; frozen ones have no entry.
            sd["state"] = {flat["held"][k]: v for k, v in per_held.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the parameters must have the same shapes.

        Raises:
            ValueError: The state was not written by this optimizer (e.g. it is ``torch.optim.Adam``'s),
                or does not match these parameters or weights.
        """
        state_dict = self._flat_state_dict(state_dict)
        _check_own_state_dict(state_dict)
        saved = state_dict["state"].get(STATE_KEY)
        held: list[int] = []
        if saved is not None:
            params = self.params
            # A state dict written before frozen parameters were left out holds state for every parameter.
            held = [int(i) for i in saved.get("held", range(len(params)))]
            in_range = all(0 <= i < len(params) for i in held) and held == sorted(set(held))
            sizes = [local_tensor(params[i]).numel() for i in held] if in_range else None
            if list(saved["sizes"]) != sizes:
                raise ValueError(
                    f"The saved HierarchicalRNNOptimizer state was made for parameters of sizes {list(saved['sizes'])} "
                    f"(parameters {held} of the optimizer's), but this optimizer has "
                    f"{[local_tensor(p).numel() for p in params]}."
                )
            lo = self.lopt
            widths = dict(h_param=lo.param_units, momentum=lo.num_timescales, h_tensor=lo.tensor_state_width,
                          h_global=lo.global_state_width)
            wrong = [f"{k} width {saved[k].shape[-1]} vs {w}" for k, w in widths.items() if saved[k].shape[-1] != w]
            if (saved["theta"] is not None) != lo.attention:
                wrong.append(f"attention {saved['theta'] is not None} vs {lo.attention}")
            if wrong:
                hint = ""
                if saved["h_tensor"].shape[-1] - lo.tensor_units in (0, 1) and \
                        saved["h_tensor"].shape[-1] != lo.tensor_state_width:
                    hint = (" The state was saved with a step gain and these weights have none, or the other way"
                            " round: pass the same lr_adaptation as when it was saved.")
                raise ValueError(
                    f"The saved HierarchicalRNNOptimizer state does not match these weights: {', '.join(wrong)}.{hint}")
        super().load_state_dict(state_dict)
        st = self.state.get(STATE_KEY)
        if st is not None:
            st = _feature_major(dict(st, held=held, sizes=list(st["sizes"])))
            self._training = bool(st.pop("training", True))
            self.state[STATE_KEY] = st
        else:
            self._training = True
        self._layout_cache = {}
        self._point_buffer = None

    def _flat_state_dict(self, state_dict: Any) -> Any:
        # A per-parameter state dict (from a sharded optimizer, or torch.distributed.checkpoint) back
        # into the flat buffers; the entries are matched to parameters through the groups' order.
        state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(state, dict) or not state or STATE_KEY in state:
            return state_dict
        if not all(isinstance(v, dict) and "h_tensor" in v and "h_global" in v for v in state.values()):
            return state_dict  # not this optimizer's: refused by the check that follows
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = self.params
        if len(saved_ids) != len(params) or any(i not in saved_ids for i in state):
            raise ValueError(
                f"The saved per-parameter HierarchicalRNNOptimizer state is for {len(saved_ids)} parameters, "
                f"but this optimizer has {len(params)}."
            )
        # Frozen parameters have no entry: the others hold state, in the parameters' order.
        held = [n for n, i in enumerate(saved_ids) if i in state]
        flat = Sharding.flat_state([params[n] for n in held], [state[saved_ids[n]] for n in held])
        flat["held"] = held
        groups = []
        start = 0
        for g in state_dict["param_groups"]:
            groups.append(dict(g, params=list(range(start, start + len(g["params"])))))
            start += len(g["params"])
        return dict(state_dict, state={STATE_KEY: flat}, param_groups=groups)

    # ------------------------------------------------------------------ step

    def _init_state(self, params: list[Tensor], held: list[int], joining: bool = False) -> dict[str, Any]:
        """A fresh state for ``params``, which are ``self.params[i]`` for ``i`` in ``held``.

        ``joining``: the parameters join a running state. Their initial learning rates are then
        drawn without the ranks of a ``problem_group``, which may not all be stepping new parameters
        at this step.
        """
        layout = self.layout(params)
        locals_ = [local_tensor(p) for p in params]
        dtype = _compute_dtype(locals_)
        flat = torch.cat([p.detach().reshape(-1).to(dtype) for p in locals_])
        gen = torch.Generator().manual_seed(self.seed)
        hrnn = self.lopt.init_state(layout, theta=flat, generator=gen, dtype=self.state_dtype)
        st: dict[str, Any] = {k: getattr(hrnn, k) for k in _TENSOR_FIELDS}
        if st["theta"] is not None:
            st["theta"] = flat  # from the parameters themselves: init_state rounds theta to state_dtype
        sharding = Sharding(params) if joining else self._sharding(params)
        if sharding is not None and sharding.distributed:
            # The unsharded optimizer's draws for these elements: a sharded run starts where it would.
            st["log_lr"] = sharding.initial_log_lr(self.lopt, [p.numel() for p in locals_], self.seed,
                                                   st["log_lr"].dtype, flat.device)
        st.update(step=0, skipped=0, sizes=[p.numel() for p in locals_], held=list(held))
        return _feature_major(st)

    @staticmethod
    def _check_held(st: dict[str, Any], params: list[Tensor]) -> None:
        held = st["held"]
        sizes = [params[i].numel() for i in held] if not held or held[-1] < len(params) else None
        if sizes != st["sizes"]:
            raise ValueError(
                f"The optimizer's parameters changed: its state was made for parameters of sizes {st['sizes']} "
                f"(parameters {held} of the optimizer's), which now have sizes {[p.numel() for p in params]}. "
                "Only appending parameter groups (add_param_group) is supported after the first step. Create a "
                "new optimizer instead."
            )

    def _insert_state(self, st: dict[str, Any], full_params: list[Tensor], joining: list[int]) -> dict[str, Any]:
        """Give parameters that receive their first gradient (unfrozen, or added by ``add_param_group``) a
        fresh state, spliced in at their place in the flat order; the others keep theirs."""
        added = self._init_state([full_params[i] for i in joining], joining, joining=True)
        held = sorted(st["held"] + joining)
        size = dict(zip(st["held"], st["sizes"])) | dict(zip(joining, added["sizes"]))
        # Consecutive parameters from one source become one slice: a model of thousands of tensors
        # splices a few runs, not one slice per tensor. A run: [source, first row, rows, first element, elements].
        runs: list[list[Any]] = []
        cursor = {id(st): [0, 0], id(added): [0, 0]}
        new = set(joining)
        for i in held:
            src = added if i in new else st
            at = cursor[id(src)]
            if not (runs and runs[-1][0] is src):
                runs.append([src, at[0], 0, at[1], 0])
            runs[-1][2] += 1
            runs[-1][4] += size[i]
            at[0] += 1
            at[1] += size[i]
        merged = dict(st, held=held, sizes=[size[i] for i in held])
        for k in _ELEMENT_FIELDS + ("h_tensor",):
            if st[k] is None:
                continue
            pieces = [src[k][r : r + nr] if k == "h_tensor" else src[k][e : e + ne] for src, r, nr, e, ne in runs]
            merged[k] = torch.cat([x.to(st[k].device, st[k].dtype) for x in pieces])
        self._layout_cache = {}
        self._point_buffer = None
        return _feature_major(merged)

    def _per_tensor_hyperparameters(self, active: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        # Made anew only when a group's lr or weight decay changes (a scheduler) or the active set does.
        factor = self.decay_factor
        if factor == 0.0 and not self._warned_past_horizon:
            self._warned_past_horizon = True
            warnings.warn(
                f"HierarchicalRNNOptimizer: this step is past the run's length (total_steps={self.total_steps}), "
                "where the decay phase leaves a step of 0. Set total_steps to the real length, or "
                "decay_fraction=0 for no decay.",
                UserWarning,
                stacklevel=3,
            )
        values = [(float(g["lr"]) * factor, float(g["weight_decay"])) for g in self.param_groups for _ in g["params"]]
        key = (tuple(values[i] for i in active), device)
        if self._hyper_cache is None or self._hyper_cache[0] != key:
            lr = torch.tensor([v[0] for v in key[0]], dtype=torch.float32, device=device)
            wd = torch.tensor([v[1] for v in key[0]], dtype=torch.float32, device=device)
            self._hyper_cache = (key, lr, wd)
        return self._hyper_cache[1], self._hyper_cache[2]

    def _may_overflow(
        self, st: dict[str, Any], point: Tensor, grad_max: float, act_params: list[Tensor], active: list[int]
    ) -> bool:
        """Whether this step's state or update could leave the range of their dtypes.

        A bound, from one pass over the true parameters: the squared momenta (in the mean squares)
        are below ``grad_max ** 2`` and each normalised update is below
        ``lr * exp(log_lr_high + step_offset) * sqrt(tensor size)``.
        """
        state_max = min(torch.finfo(self.state_dtype).max, torch.finfo(point.dtype).max)
        if grad_max >= math.sqrt(state_max) / 4:
            return True
        hyper = [(float(g["lr"]), float(g["weight_decay"])) for g in self.param_groups for _ in g["params"]]
        lr_max = max(hyper[i][0] for i in active)
        decay_max = max(hyper[i][0] * hyper[i][1] for i in active)
        theta = st.get("theta")
        theta_max = _abs_max(theta if theta is not None else point)
        cst = self.lopt._constants()
        exponent = cst.log_lr_high + max(float(self.lopt.step_offset), 0.0)
        size = max(p.numel() for p in act_params)
        bound = theta_max * (1.0 + decay_max) + lr_max * math.exp(min(exponent, 700.0)) * math.sqrt(size)
        return not bound < min(torch.finfo(p.dtype).max for p in act_params) / 4

    def _finite_result(self, out: Any, act_params: list[Tensor], check_state: bool) -> bool:
        """Whether the new point and true parameters fit each parameter's dtype (eval() writes the
        true parameters into the model) and, for a step into fresh buffers, the new state is finite."""
        for flat in (out.point, out.state.theta):
            if flat is not None and not self._fits(flat, act_params):
                return False
        if not check_state:
            return True
        return all(math.isfinite(_abs_max(v)) for v in out.state if v is not None)

    def _fits(self, flat: Tensor, params: list[Tensor]) -> bool:
        dtypes = {p.dtype for p in params}
        if len(dtypes) == 1:
            return _abs_max(flat) <= torch.finfo(next(iter(dtypes))).max
        if not math.isfinite(_abs_max(flat)):
            return False
        widest = torch.finfo(flat.dtype).max
        for v, p in zip(self._split(flat, params), params):
            limit = torch.finfo(p.dtype).max
            if limit < widest and not _abs_max(v) <= limit:  # would round to infinity in p's dtype
                return False
        return True

    @staticmethod
    def _check_grad(p: Tensor) -> None:
        g = p.grad
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(
                "HierarchicalRNNOptimizer does not support sparse gradients; use dense gradients "
                "(e.g. nn.Embedding(sparse=False)) or a sparse optimizer such as torch.optim.SparseAdam."
            )
        if g.is_complex() or p.is_complex():
            raise RuntimeError(
                "HierarchicalRNNOptimizer does not support complex parameters or gradients; "
                "optimise torch.view_as_real(param) instead."
            )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Take one step.

        Args:
            closure: Re-evaluates the model and returns the loss (Lightning's automatic
                optimization passes one); gradients are read after it runs. The step gain reads
                the loss; under torch.distributed its mean over the processes (``problem_group``,
                else the world), so that DDP replicas take one step: every process then steps,
                as every process runs DDP's backward. A process stepping alone in a process
                group passes no closure.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if not self._modes_managed and self.lopt.attention and _from_lightning(closure):
                warnings.warn(
                    "HierarchicalRNNOptimizer is stepped by a Lightning Trainer without the EvalWithTrueParameters "
                    "callback: with attention the model holds the look-ahead point while it trains, so validation, "
                    "checkpoints and the model after fit would not hold the trained parameters. Add "
                    "`from lightning_lopt.callbacks import EvalWithTrueParameters` and "
                    "`pl.Trainer(callbacks=[EvalWithTrueParameters()])` (or call optimizer.eval() and "
                    "optimizer.train() yourself).",
                    UserWarning,
                    stacklevel=2,
                )
                self._modes_managed = True  # warn once
        if not self._training and self.lopt.attention:
            raise RuntimeError(
                "HierarchicalRNNOptimizer.step() was called in eval mode, where the model holds the true "
                "parameters, not the attended point. Call optimizer.train() before the training forward pass "
                "(lightning_lopt.callbacks.EvalWithTrueParameters does this in a Trainer)."
            )
        full_params = self.params
        if not full_params:
            return loss
        device = full_params[0].device
        if next(self.lopt.parameters()).device != device:
            self.lopt.to(device)
        for p in full_params:  # before the state is made: complex parameters cannot be flattened into it
            if p.grad is not None:
                self._check_grad(p)
        # The state covers each sharded (DTensor) parameter's local shard: the step reads and writes those.
        params = [local_tensor(p) for p in full_params]
        sharding = self._sharding(full_params)
        # 0-element parameters have nothing to step and no per-tensor statistics: they never hold state.
        active = [i for i, p in enumerate(full_params) if p.grad is not None and p.numel()]
        st = self.state.get(STATE_KEY)
        if st is None:
            held = [i for i, p in enumerate(full_params) if p.numel() and (p.requires_grad or p.grad is not None)]
            if not held:
                return loss
            st = self.state[STATE_KEY] = self._init_state([full_params[i] for i in held], held)
        else:
            self._check_held(st, params)
            held_set = set(st["held"])
            joining = [i for i in active if i not in held_set]
            if joining:
                st = self.state[STATE_KEY] = self._insert_state(st, full_params, joining)
        if not active:
            return loss
        held = st["held"]
        held_params = [params[i] for i in held]
        act_params = [params[i] for i in active]
        dtype = _compute_dtype(held_params)
        grad = torch.cat([local_tensor(full_params[i].grad).reshape(-1).to(dtype) for i in active])
        grad_max = _abs_max(grad)
        finite = math.isfinite(grad_max)
        if sharding is not None:
            finite = sharding.all_finite(finite, device)  # ranks skip together, or their collectives part ways
        if not finite:
            st["skipped"] += 1
            if not self._warned_nonfinite:
                warnings.warn(
                    "HierarchicalRNNOptimizer skipped a step with a non-finite gradient; parameters and state "
                    "are unchanged. Further skips are counted in optimizer.skipped_steps without a warning.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned_nonfinite = True
            self._diagnostics_requested = False
            return loss

        lr, wd = self._per_tensor_hyperparameters(active, device)
        point = torch.cat([p.detach().reshape(-1).to(dtype) for p in act_params])

        full = len(active) == len(held)
        state = HRNNState(*(st[k] for k in _TENSOR_FIELDS))
        layout = self.layout([full_params[i] for i in active])
        if full:
            index = rows = None
        else:
            # Only the tensors that have gradients take part; the others keep their state.
            position = {i: k for k, i in enumerate(held)}
            slots = [position[i] for i in active]
            bounds = torch.tensor([0] + st["sizes"]).cumsum(0).tolist()
            index = torch.cat([torch.arange(bounds[k], bounds[k + 1], device=device) for k in slots])
            rows = torch.tensor(slots, device=device)
            state = state._replace(
                **{
                    k: getattr(state, k).index_select(0, index)
                    for k in ("h_param", "momentum", "mean_square", "beta_in", "beta_sc", "log_lr")
                },
                theta=None if state.theta is None else state.theta.index_select(0, index),
                h_tensor=state.h_tensor.index_select(0, rows),
            )

        diagnostics = self._diagnostics_requested
        backend = self.backend
        if backend == "compiled" and layout.numel < COMPILE_MIN_PARAMS:
            backend = "eager"
        chunk = self.chunk_size
        if chunk is None:
            chunk = DEFAULT_CHUNK if device.type == "cpu" else GPU_CHUNK
        fast: dict[str, Any] = dict(chunk_size=chunk, backend=backend)
        if sharding is not None:
            fast.update(reducer=sharding.reducer(active, device))
        # A step that could overflow writes into fresh buffers, committed only if finite.
        in_place = full and not self._may_overflow(st, point, grad_max, act_params, active)
        if in_place:
            # The step writes the new state straight into the flat buffers, and the point into a
            # kept buffer, so a step allocates nothing of the parameters' size.
            if self._point_buffer is None or self._point_buffer.shape != point.shape:
                self._point_buffer = torch.empty_like(point)
            fast.update(out=state, out_point=self._point_buffer)
        if self.lopt.progress_input:
            fast.update(progress=self.progress)
        if self.lopt.lr_adaptation:
            fast.update(loss=self._shared_loss(loss, device))
        out = self.lopt.step(state, point, grad, layout, lr=lr, weight_decay=wd, diagnostics=diagnostics, **fast)
        new = out.state
        finite = self._finite_result(out, act_params, check_state=not in_place)
        if sharding is not None:
            finite = sharding.all_finite(finite, device)
        if not finite:
            if in_place:  # not foreseen by _may_overflow: the state is already overwritten
                fresh = self._init_state([full_params[i] for i in held], held)
                st.update({k: v for k, v in fresh.items() if k in _TENSOR_FIELDS})
            st["skipped"] += 1
            if not self._warned_nonfinite_update:
                warnings.warn(
                    "HierarchicalRNNOptimizer skipped a step whose update was not finite in the parameters' "
                    f"precision (lr={max(float(g['lr']) for g in self.param_groups):g} too large, or parameters near "
                    "the largest value of their dtype); parameters and state are unchanged. Further skips are "
                    "counted in optimizer.skipped_steps without a warning.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned_nonfinite_update = True
            self._diagnostics_requested = False
            return loss
        if full:
            for k in _TENSOR_FIELDS:
                if st[k] is not None and getattr(new, k) is not st[k]:  # the fast path wrote in place
                    st[k].copy_(getattr(new, k))
        else:
            for k in _ELEMENT_FIELDS:
                if st[k] is not None:
                    st[k].index_copy_(0, index, getattr(new, k).to(st[k].dtype))
            st["h_tensor"].index_copy_(0, rows, new.h_tensor)
            st["h_global"].copy_(new.h_global)
        torch._foreach_copy_([p.data for p in act_params], self._split(out.point, act_params))
        st["step"] += 1
        self.last_diagnostics = out.diagnostics if diagnostics else None
        self.last_diagnostics_tensors = list(active) if diagnostics else None
        self._diagnostics_requested = False
        return loss

    def _shared_loss(self, loss: Any, device: torch.device) -> Optional[Tensor]:
        """The closure's loss as one value that every process agrees on (their mean over
        ``problem_group`` where one is set, else over the world), so that replicas under DDP or a
        shard group take the same step; None where there is no loss."""
        if isinstance(loss, (int, float)):
            loss = torch.tensor(float(loss))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return None
        value = loss.detach().reshape(()).to(device, torch.float32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            size = torch.distributed.get_world_size(self.problem_group)
            if size > 1:
                value = value.clone()
                torch.distributed.all_reduce(value, group=self.problem_group)
                value /= size
        return value

    def __repr__(self) -> str:
        groups = ", ".join(f"(lr={g['lr']}, weight_decay={g['weight_decay']}, n={len(g['params'])})" for g in self.param_groups)
        return f"HierarchicalRNNOptimizer(attention={self.lopt.attention}, groups=[{groups}])"

    # ------------------------------------------------------------------ copy and pickle

    # Caches keyed by tensor identity or tied to a device: a copy rebuilds them on its first step.
    _TRANSIENT = ("_layout_cache", "_point_buffer", "_hyper_cache", "_sharding_cache")

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer keeps only defaults, state and param_groups, which loses the learned
        # optimizer and the mode; keep every attribute except hooks (torch drops them too: they may
        # be closures) and the caches.
        return {
            k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_") and k not in self._TRANSIENT
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_total_steps", None)  # pickled before the horizon existed
        self.__dict__.setdefault("decay_fraction", 0.0)  # pickled before the decay existed
        self.__dict__.setdefault("_warned_past_horizon", False)
        for k in self._TRANSIENT:
            setattr(self, k, None)
        self._layout_cache = {}


# HierarchicalRNN.optimizer() builds this class; registering it here keeps hrnn.py free of an import of this module.
register_optimizer(HierarchicalRNNOptimizer)
