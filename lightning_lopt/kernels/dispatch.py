"""Which path runs the element-level part of a step without autograd, and what it needs: the fused
C++ kernel (:mod:`lightning_lopt.kernels`), the Triton kernels (:mod:`lightning_lopt.kernels.triton_step`),
chunks through ``torch.compile``, or eager chunks, with their scratch buffers.

The update rule itself is :mod:`lightning_lopt.hrnn`; every path here computes its function.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from lightning_lopt.layout import HRNNState, is_feature_major

if TYPE_CHECKING:
    from lightning_lopt.hrnn import _Constants

__all__: list[str] = []


class _Scratch:
    """Per-element scratch buffers of the chunked step, kept between steps so no step allocates them."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.ud = torch.empty(n, dtype=dtype, device=device)
        self.ua = torch.empty(n, dtype=dtype, device=device)

    @staticmethod
    def get(owner: nn.Module, n: int, dtype: torch.dtype, device: torch.device) -> "_Scratch":
        """The scratch buffers of ``owner`` for this size, made on first use (one size is kept)."""
        cached = owner.__dict__.get("_scratch")
        if cached is None or cached.ud.numel() != n or cached.ud.dtype != dtype or cached.ud.device != device:
            cached = _Scratch(n, dtype, device)
            owner.__dict__["_scratch"] = cached
        return cached


class _CompiledKernel:
    """The element-level part compiled with ``torch.compile`` for one chunk size.

    Only full chunks run compiled (one shape, so one compilation serves every model); the last,
    partial chunk runs eagerly. If compiling fails, it warns once and stays eager.
    """

    failed = False

    def __init__(self, cst: _Constants) -> None:
        from lightning_lopt.hrnn import _element_update  # the rule's module imports this one

        def kernel(w: dict[str, Tensor], args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            h, m, v, bi, bsc, llr, _, ud, ua, red = _element_update(cst, w, *args, unrolled=True)
            return h, m, v, bi, bsc, llr, ud, ua, red

        self.fn = torch.compile(kernel, dynamic=False)

    def run(self, w: dict[str, Tensor], args: tuple[Tensor, ...], outs: tuple[Tensor, ...], chunk: int) -> Optional[Tensor]:
        """Reduction rows of one chunk, or None when the caller must run it eagerly."""
        if _CompiledKernel.failed or args[0].numel() != chunk:
            return None
        table = args[-1]
        if table.shape[0] < 2:  # a size-1 dimension cannot be dynamic
            table = torch.cat([table, table], 0)
        torch._dynamo.mark_dynamic(table, 0)
        try:
            results = self.fn(w, args[:-1] + (table,))
        except Exception as err:  # any compiler or toolchain failure: the eager path computes the same
            _CompiledKernel.failed = True
            warnings.warn(
                f"torch.compile of the hierarchical RNN step failed ({type(err).__name__}: {err}); "
                "falling back to the eager step.",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        # The outputs usually alias the inputs (the optimizer updates its state in place), which
        # the compiled graph must not see: it may reorder reads and writes. Copy outside it.
        for dst, src in zip(outs, results):
            dst.copy_(src)
        return results[-1]


_KERNELS: dict[_Constants, _CompiledKernel] = {}


def _compiled_kernel(cst: _Constants) -> Optional[_CompiledKernel]:
    if _CompiledKernel.failed:
        return None
    if cst not in _KERNELS:
        _KERNELS[cst] = _CompiledKernel(cst)
    return _KERNELS[cst]


_BACKENDS = ("auto", "cpp", "eager", "compiled", "triton")

_TRITON_WARNED: set[str] = set()


def _triton_kernels(
    backend: str, state: HRNNState, point: Tensor, grad: Tensor, new: Optional[HRNNState], dtype: torch.dtype
) -> Any:
    """The Triton kernels (:mod:`lightning_lopt.kernels.triton_step`) when ``backend`` asks for them
    and they apply to this step, else None.

    ``"auto"`` asks for them on a GPU only, ``"triton"`` anywhere (on CPU tensors they run only under
    Triton's interpreter, for testing). They apply to float32 compute with float32 or bfloat16
    state buffers of one dtype whose vectors are contiguous. Where they were asked for and cannot
    run, the step runs eagerly and warns once.
    """
    if backend not in ("auto", "triton") or (backend == "auto" and point.device.type != "cuda"):
        return None
    from lightning_lopt.kernels import triton_step

    def fallback(reason: str) -> None:
        if reason not in _TRITON_WARNED:
            _TRITON_WARNED.add(reason)
            warnings.warn(f"The Triton step does not run here ({reason}); the step runs eagerly.", RuntimeWarning,
                          stacklevel=4)

    if not triton_step.AVAILABLE:
        fallback("Triton is not installed: pip install 'lightning-lopt[gpu]'")
        return None
    if not triton_step.applies(point.device):
        if backend == "triton":
            fallback(f"tensors on {point.device.type}" + (" under TRITON_INTERPRET" if triton_step.INTERPRETED else ""))
        return None
    sd = state.h_param.dtype
    ok = dtype == torch.float32 and sd in (torch.float32, torch.bfloat16) and grad.device == point.device
    for st in (state,) if new is None else (state, new):
        for name in ("h_param", "momentum", "mean_square", "beta_in", "beta_sc", "log_lr"):
            t = getattr(st, name)
            ok = ok and t.dtype == sd and t.device == point.device and (t.dim() == 2 or t.is_contiguous())
    if not ok:
        if backend == "triton":
            fallback("float32 compute and float32 or bfloat16 state of one dtype are needed")
        return None
    return triton_step


def _cpp_applies(state: HRNNState, point: Tensor, grad: Tensor, new: Optional[HRNNState], dtype: torch.dtype) -> bool:
    """Whether the C++ kernel can run this step: CPU, float32 compute, float32 or bfloat16 state
    buffers of one dtype, contiguous or (the per-element matrices) feature-major (else eager)."""
    if point.device.type != "cpu" or dtype != torch.float32 or grad.device.type != "cpu":
        return False
    sd = state.h_param.dtype
    if sd not in (torch.float32, torch.bfloat16) or state.h_param.shape[1] > 64 or state.momentum.shape[1] > 16:
        return False  # the kernel's per-tile stack arrays have these bounds
    fields = ("h_param", "momentum", "mean_square", "beta_in", "beta_sc", "log_lr")
    for st in (state,) if new is None else (state, new):
        for name in fields:
            t = getattr(st, name)
            laid_out = t.is_contiguous() or is_feature_major(t)
            if t.dtype != sd or not laid_out or t.device.type != "cpu":
                return False
    return True
