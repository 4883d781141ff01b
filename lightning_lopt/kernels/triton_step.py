"""Triton kernels of the element-level part of the hierarchical RNN step (no autograd), for GPUs.

Two kernels compute what :func:`lightning_lopt.hrnn._element_update` and
:func:`lightning_lopt.hrnn._apply_update` compute, with no temporary of the parameters' size:

* :func:`element_update`: the accumulators, the ``3K`` features, the parameter GRU with the
  per-tensor injected bias, the read-outs, the new state and the un-normalised updates, and each
  program's partial sums of what the per-tensor epilogue needs;
* :func:`apply_update`: the parameter update once the per-tensor RMS of the directions is known.

Work is cut into spans that never cross a tensor boundary, so a program reads its tensor's row of
the per-tensor tables once and needs no per-element tensor index; each program writes one row of
partial sums, and the per-tensor sums are one small ``index_add`` over those rows (no atomics, so
the step is deterministic). The small products of the GRU are ``tl.dot`` over tiles padded to 16
(in IEEE float32, so that the result agrees with the eager reference to float32 rounding).

The kernels also run under Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` set before
``triton`` is first imported): that is how they are tested without a GPU. Importing this module
without Triton installed works; :data:`AVAILABLE` is then False.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs need not have it: the step then runs eagerly
    triton = None
    tl = None

__all__ = ["AVAILABLE", "BLOCK", "DOT_PRECISION", "INTERPRETED", "NUM_WARPS", "SPAN_BLOCKS", "applies", "apply_update",
           "element_update"]

AVAILABLE = triton is not None
"""True when Triton is importable."""

INTERPRETED = AVAILABLE and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
"""True when Triton runs kernels in its interpreter (on CPU tensors); fixed at import, as Triton's own
library functions are wrapped for one mode when ``triton`` is first imported."""

BLOCK = 64
"""Elements per tile (one iteration of a program); at least 16, the smallest ``tl.dot`` tile."""

NUM_WARPS = 2
"""Warps per program of the element kernel. Compiled for sm_90 (ptxas -v, no GPU at hand), every
tile and warp count tried uses all 255 registers and spills some; 64 elements on 2 warps spilled
least (488 bytes against 644 for 128 on 4). To be chosen by measurement on a GPU."""

SPAN_BLOCKS = 16
"""Tiles per program at most: fewer programs means fewer rows of partial sums to add up."""

DOT_PRECISION = "ieee"
"""``input_precision`` of the GRU's ``tl.dot``: ``"ieee"`` (float32 FMAs) keeps the step equal to the
eager reference to float32 rounding; ``"tf32x3"`` (three TF32 tensor-core products) is close to it
and may be faster; ``"tf32"`` alone (10 bits of mantissa) is not accurate enough."""


def applies(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device``: a GPU with compiled kernels, or the
    CPU under the interpreter."""
    if not AVAILABLE:
        return False
    if INTERPRETED:
        return device.type == "cpu"
    return device.type == "cuda"


def _pow2(n: int, low: int = 16) -> int:
    return max(low, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


if AVAILABLE:

    @triton.jit
    def _narrow(x):
        # float32 -> bfloat16 rounded to nearest even (as torch rounds), written out in integer
        # operations because the interpreter's conversion rounds differently.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    # The kernel calls few helper functions: under the interpreter each call of one costs
    # milliseconds, so activations are written inline (sigmoid as 1 / (1 + exp(-x))).

    @triton.jit
    def _element_kernel(
        grad_ptr,
        h_ptr, h_rs, h_cs, m_ptr, m_rs, m_cs, v_ptr, v_rs, v_cs, bi_ptr, bs_ptr, ll_ptr,
        oh_ptr, oh_rs, oh_cs, om_ptr, om_rs, om_cs, ov_ptr, ov_rs, ov_cs, obi_ptr, obs_ptr, oll_ptr,
        ud_ptr, ua_ptr,
        span_start_ptr, span_end_ptr, span_tensor_ptr,
        table_ptr, table_w,
        wz_ptr, wh_ptr, bias_ptr,
        partial_ptr, partial_w,
        keep, offset, ms_eps, eps, low, high,
        H: tl.constexpr, K: tl.constexpr, HP: tl.constexpr, FP: tl.constexpr, OP: tl.constexpr,
        ATTENTION: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        start = tl.load(span_start_ptr + pid)
        end = tl.load(span_end_ptr + pid)
        t = tl.load(span_tensor_ptr + pid)
        F: tl.constexpr = 3 * K

        rb = tl.arange(0, BLOCK)
        ch = tl.arange(0, HP)
        cf = tl.arange(0, FP)
        co = tl.arange(0, OP)
        colh = ch[None, :]
        colf = cf[None, :]
        colo = co[None, :]
        hmask = ch < H

        # Weights, packed by _packed_weights: 4 (FP, HP|OP) blocks from z (reset, keep, candidate,
        # read-out), the same 4 from h, and the 4 biases (one row of HP|OP each).
        wz_r = tl.load(wz_ptr + cf[:, None] * HP + colh)
        wz_u = tl.load(wz_ptr + FP * HP + cf[:, None] * HP + colh)
        wz_c = tl.load(wz_ptr + 2 * FP * HP + cf[:, None] * HP + colh)
        wz_o = tl.load(wz_ptr + 3 * FP * HP + cf[:, None] * OP + colo)
        wh_r = tl.load(wh_ptr + ch[:, None] * HP + colh)
        wh_u = tl.load(wh_ptr + HP * HP + ch[:, None] * HP + colh)
        wh_c = tl.load(wh_ptr + 2 * HP * HP + ch[:, None] * HP + colh)
        wh_o = tl.load(wh_ptr + 3 * HP * HP + ch[:, None] * OP + colo)
        # This tensor's row of the table: injected biases (reset, keep, candidate), the problem-mean
        # log learning rate, the lr multiplier.
        row = table_ptr + t * table_w
        b_r = tl.load(bias_ptr + ch) + tl.load(row + ch, mask=hmask, other=0.0)
        b_u = tl.load(bias_ptr + HP + ch) + tl.load(row + H + ch, mask=hmask, other=0.0)
        b_c = tl.load(bias_ptr + 2 * HP + ch) + tl.load(row + 2 * H + ch, mask=hmask, other=0.0)
        b_o = tl.load(bias_ptr + 3 * HP + co)
        lr_mean = tl.load(row + 3 * H)
        lr_t = tl.load(row + 3 * H + 1)

        acc_h = tl.zeros((BLOCK, HP), dtype=tl.float32)
        acc_z = tl.zeros((BLOCK, FP), dtype=tl.float32)
        acc_d = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_a = tl.zeros((BLOCK,), dtype=tl.float32)
        for base in range(start, end, BLOCK):
            offs = base + rb
            mask = offs < end
            g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            beta_in = tl.load(bi_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            beta_sc = tl.load(bs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            log_lr = tl.load(ll_ptr + offs, mask=mask, other=0.0).to(tl.float32)

            # Accumulators and features, one timescale at a time; z is assembled column by column.
            z = tl.zeros((BLOCK, FP), dtype=tl.float32)
            beta = beta_in
            x_prev = tl.zeros((BLOCK,), dtype=tl.float32)
            log_sum = tl.zeros((BLOCK,), dtype=tl.float32)
            for s in tl.static_range(K):
                if s > 0:
                    beta = tl.sqrt_rn(beta)  # beta_in ** 2**-s, as the reference computes it
                m_old = tl.load(m_ptr + offs * m_rs + s * m_cs, mask=mask, other=0.0).to(tl.float32)
                v_old = tl.load(v_ptr + offs * v_rs + s * v_cs, mask=mask, other=0.0).to(tl.float32)
                a = (1.0 - beta) * g + beta * m_old
                v = (1.0 - beta_sc) * (a * a + ms_eps) + beta_sc * v_old
                if BF16:
                    tl.store(om_ptr + offs * om_rs + s * om_cs, _narrow(a), mask=mask)
                    tl.store(ov_ptr + offs * ov_rs + s * ov_cs, _narrow(v), mask=mask)
                else:
                    tl.store(om_ptr + offs * om_rs + s * om_cs, a, mask=mask)
                    tl.store(ov_ptr + offs * ov_rs + s * ov_cs, v, mask=mask)
                # asinh: a Taylor series near 0 (where log(r + sqrt(r^2 + 1)) loses digits) and
                # log(2r) far out (where r^2 overflows); libdevice's has no interpreter counterpart.
                y = a * tl.rsqrt(v + eps)
                r = tl.abs(y)
                r2 = r * r
                series = r * (1.0 + r2 * (-1.0 / 6.0 + r2 * (3.0 / 40.0 + r2 * (-15.0 / 336.0 + r2 * (105.0 / 3456.0)))))
                far = tl.log(tl.maximum(r, 1.0)) + 0.6931471805599453
                r = tl.where(r < 0.125, series, tl.where(r > 4096.0, far, tl.log(r + tl.sqrt(r2 + 1.0))))
                x = tl.where(y < 0, -r, r)
                log_ms = tl.log(v + eps)
                log_sum += log_ms
                z = tl.where(colf == s, x[:, None], z)
                if s > 0:
                    z = tl.where(colf == K + s - 1, (x_prev * x)[:, None], z)
                z = tl.where(colf == 2 * K - 1 + s, log_ms[:, None], z)
                x_prev = x
            rel = (colf >= 2 * K - 1) & (colf < 3 * K - 1)
            z = tl.where(rel, z - (log_sum / K)[:, None], z)
            z = tl.where(colf == 3 * K - 1, (log_lr - lr_mean)[:, None], z)

            # Parameter GRU biased by the tensor and global states of the previous step.
            hmat = mask[:, None] & (colh < H)
            h = tl.load(h_ptr + offs[:, None] * h_rs + colh * h_cs, mask=hmat, other=0.0).to(tl.float32)
            pre = tl.dot(z, wz_r, input_precision=PRECISION) + tl.dot(h, wh_r, input_precision=PRECISION)
            reset = 1.0 / (1.0 + tl.exp(-(pre + b_r[None, :])))
            pre = tl.dot(z, wz_u, input_precision=PRECISION) + tl.dot(h, wh_u, input_precision=PRECISION)
            keep_g = 1.0 / (1.0 + tl.exp(-(pre + b_u[None, :])))
            pre = tl.dot(z, wz_c, input_precision=PRECISION) + tl.dot(reset * h, wh_c, input_precision=PRECISION)
            pre = pre + b_c[None, :]
            # tanh: a Taylor series near 0, where (1 - e) / (1 + e) loses digits.
            r = tl.abs(pre)
            r2 = r * r
            series = r * (1.0 + r2 * (-1.0 / 3.0 + r2 * (2.0 / 15.0 + r2 * (-17.0 / 315.0 + r2 * (62.0 / 2835.0)))))
            e = tl.exp(-2.0 * r)
            r = tl.where(r < 0.125, series, (1.0 - e) / (1.0 + e))
            cand = tl.where(pre < 0, -r, r)
            h_new = keep_g * h + (1.0 - keep_g) * cand
            h_new = tl.where(colh < H, h_new, 0.0)
            if BF16:
                tl.store(oh_ptr + offs[:, None] * oh_rs + colh * oh_cs, _narrow(h_new), mask=hmat)
            else:
                tl.store(oh_ptr + offs[:, None] * oh_rs + colh * oh_cs, h_new, mask=hmat)

            # Read-outs: direction, log lr, decays (and attention); the shortcuts are z's x columns.
            outs = tl.dot(h_new, wh_o, input_precision=PRECISION) + tl.dot(z, wz_o, input_precision=PRECISION)
            outs = outs + b_o[None, :]
            # Each column alone, exactly (a sum of one value and zeros).
            direction = tl.sum(tl.where(colo == 0, outs, 0.0), axis=1)
            log_lr_step = tl.sum(tl.where(colo == 1, outs, 0.0), axis=1) + log_lr
            log_lr_step = tl.minimum(tl.maximum(log_lr_step, low), high)
            new_log_lr = keep * log_lr + (1.0 - keep) * log_lr_step
            beta_sc_new = 1.0 / (1.0 + tl.exp(-tl.sum(tl.where(colo == 2, outs, 0.0), axis=1)))
            beta_in_new = 1.0 / (1.0 + tl.exp(-tl.sum(tl.where(colo == 3, outs, 0.0), axis=1)))
            if BF16:
                tl.store(obs_ptr + offs, _narrow(beta_sc_new), mask=mask)
                tl.store(obi_ptr + offs, _narrow(beta_in_new), mask=mask)
                tl.store(oll_ptr + offs, _narrow(new_log_lr), mask=mask)
            else:
                tl.store(obs_ptr + offs, beta_sc_new, mask=mask)
                tl.store(obi_ptr + offs, beta_in_new, mask=mask)
                tl.store(oll_ptr + offs, new_log_lr, mask=mask)
            tl.store(ud_ptr + offs, tl.exp(log_lr_step + offset) * lr_t * direction, mask=mask)
            acc_d += tl.where(mask, direction * direction, 0.0)
            if ATTENTION:
                att = tl.sum(tl.where(colo == 4, outs, 0.0), axis=1)
                tl.store(ua_ptr + offs, tl.exp(log_lr_step) * lr_t * att, mask=mask)
                acc_a += tl.where(mask, att * att, 0.0)
            acc_h += tl.where(mask[:, None], h_new, 0.0)
            acc_z += tl.where(mask[:, None], z, 0.0)

        out = partial_ptr + pid * partial_w
        tl.store(out + ch, tl.sum(acc_h, axis=0), mask=hmask)
        tl.store(out + H + cf, tl.sum(acc_z, axis=0), mask=cf < F)
        tl.store(out + H + F, tl.sum(acc_d, axis=0))
        if ATTENTION:
            tl.store(out + H + F + 1, tl.sum(acc_a, axis=0))

    @triton.jit
    def _apply_kernel(
        theta_ptr, ud_ptr, ua_ptr, theta_out_ptr, point_out_ptr,
        span_start_ptr, span_end_ptr, span_tensor_ptr, table_ptr,
        ATTENTION: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        start = tl.load(span_start_ptr + pid)
        end = tl.load(span_end_ptr + pid)
        t = tl.load(span_tensor_ptr + pid)
        rs_d = tl.load(table_ptr + t * 3)
        rs_a = tl.load(table_ptr + t * 3 + 1)
        decay = tl.load(table_ptr + t * 3 + 2)
        rb = tl.arange(0, BLOCK)
        for base in range(start, end, BLOCK):
            offs = base + rb
            mask = offs < end
            theta_old = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            theta = theta_old - tl.load(ud_ptr + offs, mask=mask, other=0.0) * rs_d - decay * theta_old
            if ATTENTION:
                phi = theta_old - tl.load(ua_ptr + offs, mask=mask, other=0.0) * rs_a
                tl.store(theta_out_ptr + offs, theta.to(theta_out_ptr.dtype.element_ty), mask=mask)
                tl.store(point_out_ptr + offs, phi.to(point_out_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(point_out_ptr + offs, theta.to(point_out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- host side

_SPANS: dict[Any, tuple[Tensor, Tensor, Tensor]] = {}
_WEIGHTS: dict[Any, tuple[tuple[Tensor, ...], tuple[int, ...], tuple[Tensor, Tensor, Tensor]]] = {}


def _spans(sizes: tuple[int, ...], device: torch.device, span: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(start, end, tensor)`` of every program's span: runs of at most ``span`` elements of one tensor."""
    key = (sizes, str(device), span)
    cached = _SPANS.get(key)
    if cached is None:
        size_t = torch.tensor(sizes, dtype=torch.long)
        count = (size_t + span - 1) // span
        tensor = torch.repeat_interleave(torch.arange(len(sizes)), count)
        first = torch.cumsum(count, 0) - count
        offset = torch.cumsum(size_t, 0) - size_t
        start = offset[tensor] + (torch.arange(int(count.sum())) - first[tensor]) * span
        end = torch.minimum(start + span, (offset + size_t)[tensor])
        cached = (start.to(device), end.to(device), tensor.to(device))
        if len(_SPANS) >= 8:  # a few layouts (the optimizer's, a partial step's) are in use at once
            _SPANS.pop(next(iter(_SPANS)))
        _SPANS[key] = cached
    return cached


def _packed_weights(w: dict[str, Tensor], hp_units: int, k: int, attention: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The element-level weights, zero-padded into the kernel's tiles (see ``_element_kernel``)."""
    names = ("w_gates", "b_gates", "w_cand", "b_cand", "w_out", "b_out")
    key = (hp_units, k, attention, str(w["w_gates"].device))
    versions = tuple(w[n]._version for n in names)
    cached = _WEIGHTS.get(key)
    # The entry holds the source tensors, so identity (not a reusable id) tells they are the same.
    if cached is not None and all(a is w[n] for a, n in zip(cached[0], names)) and cached[1] == versions:
        return cached[2]
    h, f = hp_units, 3 * k
    hpad, fpad, opad = _pow2(h), _pow2(f), 16
    dev = w["w_gates"].device
    wg, wc, wo = w["w_gates"].float(), w["w_cand"].float(), w["w_out"].float()
    o = wo.shape[1]
    wz = torch.zeros(3 * fpad * hpad + fpad * opad, device=dev)
    wh = torch.zeros(3 * hpad * hpad + hpad * opad, device=dev)
    blocks_z = [wg[:f, :h], wg[:f, h:], wc[:f]]
    blocks_h = [wg[f:, :h], wg[f:, h:], wc[f:]]
    for i, (bz, bh) in enumerate(zip(blocks_z, blocks_h)):
        wz[i * fpad * hpad : (i + 1) * fpad * hpad].view(fpad, hpad)[:f, :h] = bz
        wh[i * hpad * hpad : (i + 1) * hpad * hpad].view(hpad, hpad)[:h, :h] = bh
    # Read-out: rows of h_new, and the shortcuts from x, which are z's first k columns.
    wz[3 * fpad * hpad :].view(fpad, opad)[:k, :o] = wo[h:]
    wh[3 * hpad * hpad :].view(hpad, opad)[:h, :o] = wo[:h]
    bias = torch.zeros(3 * hpad + opad, device=dev)
    bg = w["b_gates"].float()
    bias[:h] = bg[:h]
    bias[hpad : hpad + h] = bg[h:]
    bias[2 * hpad : 2 * hpad + h] = w["b_cand"].float()
    bias[3 * hpad : 3 * hpad + o] = w["b_out"].float()
    _WEIGHTS[key] = (tuple(w[n] for n in names), versions, (wz, wh, bias))
    return wz, wh, bias


def _mat(t: Tensor) -> tuple[Tensor, int, int]:
    return t, t.stride(0), t.stride(1)


def element_update(
    sizes: tuple[int, ...],
    grad: Tensor,
    state: Any,
    new: Any,
    ud: Tensor,
    ua: Tensor,
    table: Tensor,
    weights: dict[str, Tensor],
    param_units: int,
    num_timescales: int,
    attention: bool,
    ms_epsilon: float,
    epsilon: float,
    log_lr_low: float,
    log_lr_high: float,
    block: Optional[int] = None,
    span_blocks: Optional[int] = None,
) -> Tensor:
    """The element-level part of the step over the whole flat vector, as one kernel launch.

    Writes the new per-element state into ``new`` (an ``HRNNState``; its buffers may be those of
    ``state``) and the un-normalised updates into ``ud`` and ``ua``.

    Args:
        sizes: Elements of each tensor, in flat order (the layout's ``sizes``).
        grad: The float32 gradient, flat and contiguous.
        state: The ``HRNNState`` before the step (float32 or bfloat16 buffers).
        new: Where the new state goes.
        ud: Float32 buffer for ``exp(eta_step + c) * lr * d``.
        ua: Float32 buffer for ``exp(eta_step) * lr * a`` (unused without attention).
        table: Per-tensor rows: the ``3 * param_units`` injected biases, the problem-mean log lr,
            the lr multiplier (float32, contiguous).
        weights: The packed element-level meta-parameters (``HierarchicalRNN._element_weights``).
        block: Elements per tile (default :data:`BLOCK`).
        span_blocks: Tiles per program at most (default :data:`SPAN_BLOCKS`).

    Returns:
        The per-tensor sums ``(T, param_units + 3K + 1 + attention)`` of ``h'``, ``z``, ``d^2``
        (and ``a^2``), as the epilogue of the step reads them.
    """
    block = block or BLOCK
    span = block * (span_blocks or SPAN_BLOCKS)
    h, k = param_units, num_timescales
    starts, ends, tensors = _spans(sizes, grad.device, span)
    wz, wh, bias = _packed_weights(weights, h, k, attention)
    width = h + 3 * k + 1 + int(attention)
    sums = torch.zeros(len(sizes), width, dtype=torch.float32, device=grad.device)
    if starts.numel() == 0:  # a rank's empty shard of every tensor
        return sums
    partial = torch.empty(starts.numel(), width, dtype=torch.float32, device=grad.device)
    _element_kernel[(starts.numel(),)](
        grad,
        *_mat(state.h_param), *_mat(state.momentum), *_mat(state.mean_square),
        state.beta_in, state.beta_sc, state.log_lr,
        *_mat(new.h_param), *_mat(new.momentum), *_mat(new.mean_square),
        new.beta_in, new.beta_sc, new.log_lr,
        ud, ua,
        starts, ends, tensors,
        table, table.shape[1],
        wz, wh, bias,
        partial, width,
        float(weights["keep"]), float(weights["offset"]), ms_epsilon, epsilon, log_lr_low, log_lr_high,
        H=h, K=k, HP=_pow2(h), FP=_pow2(3 * k), OP=16, ATTENTION=attention,
        BF16=new.h_param.dtype == torch.bfloat16, PRECISION=DOT_PRECISION, BLOCK=block, num_warps=NUM_WARPS,
    )
    return sums.index_add_(0, tensors, partial)


def apply_update(
    sizes: tuple[int, ...],
    theta_old: Tensor,
    ud: Tensor,
    ua: Tensor,
    update_table: Tensor,
    theta_out: Optional[Tensor],
    point_out: Tensor,
    attention: bool,
    block: Optional[int] = None,
    span_blocks: Optional[int] = None,
) -> None:
    """The parameter update: ``theta = theta_old - ud / rms(d) - lr * wd * theta_old`` and, with
    attention, ``phi = theta_old - ua / rms(a)``.

    Args:
        sizes: Elements of each tensor, in flat order.
        theta_old: The true parameters before the step (the point without attention), contiguous.
        ud: What :func:`element_update` wrote.
        ua: Likewise (unused without attention).
        update_table: Per-tensor ``(1/rms(d), 1/rms(a), lr * weight_decay)``, ``(T, 3)`` float32.
        theta_out: Where the new true parameters go with attention (may alias ``theta_old``).
        point_out: Where the new point goes: ``phi`` with attention, else the new parameters.
        attention: Whether the step has attention.
    """
    block = block or BLOCK
    starts, ends, tensors = _spans(sizes, ud.device, block * (span_blocks or SPAN_BLOCKS))
    if starts.numel() == 0:
        return
    _apply_kernel[(starts.numel(),)](
        theta_old, ud, ua, point_out if theta_out is None else theta_out, point_out,
        starts, ends, tensors, update_table.contiguous(),
        ATTENTION=attention, BLOCK=block,
    )
