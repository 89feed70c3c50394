"""Triton face of ``mgpt::policy_loss`` (formulas: the docstring of ``mgpt_ops/rl/policy_loss.py``, whose
``policy_loss_reference`` is the spec this kernel re-states in fp32).

One program owns a block of BLOCK_B rows and walks the columns in BLOCK_T chunks (``while`` loops: the
Triton 3.6 interpreter cannot take a runtime bound in ``range`` under numpy >= 2.4):

* sequence level (GSPO) needs the row's mean log-ratio before any token loss, and every token's gradient
  needs the row sum of d(loss)/d(ratio): three sweeps over the row (mean log-ratio; losses + that row sum;
  gradients). Token level needs one sweep, which writes the gradient directly.
* the reduction arrives as one coefficient per row (``row_coef``), computed by the caller, so global
  normalisers (num_items, token counts) need no cross-program communication.
* each program writes its partial sums (loss, metric numerators, mask sum) to ``partials[program, :]``;
  torch adds them up (deterministic, no atomics).

Tiles hold at most 4096 elements on a GPU (one row per program once there are few rows, to fill the SMs)
and 8192 under the interpreter, where few large programs are fastest. Offsets are int64.
Imported only when the ``triton`` face runs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from mgpt_ops._backend import triton_interpreting
from mgpt_ops.rl.policy_loss import K3_CLAMP, LOG_RATIO_CLAMP, NUM_SUMS, LossConfig

# jit code may only read constexpr globals
_LR_CLAMP = tl.constexpr(LOG_RATIO_CLAMP)
_KL_CLAMP = tl.constexpr(K3_CLAMP)
_LOSS_KIND = {"grpo": 0, "dapo": 0, "dr_grpo": 0, "bnpo": 0, "cispo": 1, "sapo": 2}
_KL_KIND = {"k1": 0, "k2": 1, "k3": 2}


@triton.jit
def _pg_terms(r, A, lp, eps_low, eps_high, dual_clip, delta, tau_pos, tau_neg,
              LOSS_KIND: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL: tl.constexpr):
    """Per-token loss, derivative (w.r.t. r; for cispo w.r.t. lp), low/high/dual clip indicators (fp32)."""
    zero = tl.zeros_like(r)
    if LOSS_KIND == 1:  # cispo
        capped = tl.minimum(r, eps_high)
        loss = -capped * A * lp
        grad = -capped * A
        low = zero
        high = tl.where((r > eps_high) & (A > 0), 1.0, 0.0)
        dual = zero
    elif LOSS_KIND == 2:  # sapo
        tau = tl.where(A > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (r - 1.0))
        loss = -A * gate * 4.0 / tau
        grad = -A * 4.0 * gate * (1.0 - gate)
        low = zero
        high = zero
        dual = zero
    else:  # clipped: grpo / dapo / bnpo / dr_grpo
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        r_d = r
        d_rd = zero + 1.0
        if HAS_DELTA:
            r_d = tl.minimum(r, delta)
            d_rd = tl.where(r <= delta, 1.0, 0.0)
        d_rc = tl.where((r >= lo) & (r <= hi), 1.0, 0.0)
        a = -A * r_d
        b = -A * tl.minimum(tl.maximum(r, lo), hi)
        loss = tl.maximum(a, b)
        # Ties split the gradient evenly, as torch.maximum/minimum do.
        grad = tl.where(a > b, -A * d_rd, tl.where(a < b, -A * d_rc, -A * (d_rd + d_rc) * 0.5))
        dual = zero
        if HAS_DUAL:
            cap = -A * dual_clip
            neg = A < 0
            dual = tl.where(neg & (loss > cap), 1.0, 0.0)
            grad = tl.where(neg, tl.where(loss < cap, grad, tl.where(loss > cap, 0.0, grad * 0.5)), grad)
            loss = tl.where(neg, tl.minimum(loss, cap), loss)
        low = tl.where((r_d < lo) & (A < 0), 1.0, 0.0)
        high = tl.where((r_d > hi) & (A > 0), 1.0, 0.0)
    return loss, grad, low, high, dual


@triton.jit
def _kl_terms(lp, ref, KL_KIND: tl.constexpr):
    """verl kl_penalty(lp, ref) and its derivative w.r.t. lp."""
    d = lp - ref
    if KL_KIND == 0:
        kl = d
        dkl = tl.zeros_like(d) + 1.0
    elif KL_KIND == 1:
        kl = 0.5 * d * d
        dkl = d
    else:
        u = -d
        uc = tl.minimum(tl.maximum(u, -_LR_CLAMP), _LR_CLAMP)
        e = tl.exp(uc)
        kld = e - uc - 1.0
        passes = (tl.abs(u) <= _LR_CLAMP) & (tl.abs(kld) <= _KL_CLAMP)
        kl = tl.minimum(tl.maximum(kld, -_KL_CLAMP), _KL_CLAMP)
        dkl = tl.where(passes, -(e - 1.0), 0.0)
    return kl, dkl


@triton.jit
def _load_tile(ptr, rows, cols, stride_b, stride_t, inside):
    offs = rows[:, None] * stride_b + cols[None, :].to(tl.int64) * stride_t
    return tl.load(ptr + offs, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _policy_loss_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, isw_ptr, coef_ptr, grad_ptr, partial_ptr,
    B, T, stride_adv_b, stride_adv_t, stride_isw_b, stride_isw_t,
    eps_low, eps_high, dual_clip, delta, beta, tau_pos, tau_neg,
    LOSS_KIND: tl.constexpr, KL_KIND: tl.constexpr, SEQUENCE_LEVEL: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_ISW: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL: tl.constexpr, USE_KL: tl.constexpr,
    NUM_SUMS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < B
    lanes = tl.arange(0, BLOCK_T)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)

    # Sweep 1 (sequence level): the row's mean log-ratio -> one clamped ratio per row.
    seq_ratio = tl.zeros([BLOCK_B], tl.float32)
    seq_pass = tl.zeros([BLOCK_B], tl.float32)
    row_count = tl.zeros([BLOCK_B], tl.float32)
    if SEQUENCE_LEVEL:
        acc = tl.zeros([BLOCK_B], tl.float32)
        t0 = 0
        while t0 < T:
            cols = t0 + lanes
            inside = row_ok[:, None] & (cols < T)[None, :]
            m = _load_tile(mask_ptr, rows, cols, T, 1, inside)
            live = m != 0
            lp = _load_tile(lp_ptr, rows, cols, T, 1, inside)
            old = _load_tile(old_ptr, rows, cols, T, 1, inside)
            acc += tl.sum(tl.where(live, m * (lp - old), 0.0), axis=1)
            row_count += tl.sum(tl.where(live, m, 0.0), axis=1)
            t0 += BLOCK_T
        x = acc / tl.maximum(row_count, 1.0)
        seq_pass = tl.where(tl.abs(x) <= _LR_CLAMP, 1.0, 0.0)
        seq_ratio = tl.exp(tl.minimum(tl.maximum(x, -_LR_CLAMP), _LR_CLAMP))

    # Sweep 2: losses, metrics, and either the gradient (token level) or the row sum d loss / d ratio.
    s_loss = tl.zeros([BLOCK_B], tl.float32)
    s_low = tl.zeros([BLOCK_B], tl.float32)
    s_high = tl.zeros([BLOCK_B], tl.float32)
    s_dual = tl.zeros([BLOCK_B], tl.float32)
    s_ratio = tl.zeros([BLOCK_B], tl.float32)
    s_approx = tl.zeros([BLOCK_B], tl.float32)
    s_kl = tl.zeros([BLOCK_B], tl.float32)
    s_mask = tl.zeros([BLOCK_B], tl.float32)
    d_row = tl.zeros([BLOCK_B], tl.float32)
    t0 = 0
    while t0 < T:
        cols = t0 + lanes
        inside = row_ok[:, None] & (cols < T)[None, :]
        m = _load_tile(mask_ptr, rows, cols, T, 1, inside)
        live = m != 0
        lp = _load_tile(lp_ptr, rows, cols, T, 1, inside)
        old = _load_tile(old_ptr, rows, cols, T, 1, inside)
        A = _load_tile(adv_ptr, rows, cols, stride_adv_b, stride_adv_t, inside)
        log_ratio = tl.where(live, lp - old, 0.0)
        if SEQUENCE_LEVEL:
            r = seq_ratio[:, None] + tl.zeros_like(lp)
            passes = seq_pass[:, None] + tl.zeros_like(lp)
        else:
            passes = tl.where(tl.abs(log_ratio) <= _LR_CLAMP, 1.0, 0.0)
            r = tl.exp(tl.minimum(tl.maximum(log_ratio, -_LR_CLAMP), _LR_CLAMP))
        pg, d_pg, low, high, dual = _pg_terms(r, A, lp, eps_low, eps_high, dual_clip, delta, tau_pos, tau_neg,
                                              LOSS_KIND, HAS_DELTA, HAS_DUAL)
        if HAS_ISW:
            w = _load_tile(isw_ptr, rows, cols, stride_isw_b, stride_isw_t, inside)
            pg = pg * w
            d_pg = d_pg * w
        kl = tl.zeros_like(lp)
        d_kl = tl.zeros_like(lp)
        if HAS_REF:
            ref = _load_tile(ref_ptr, rows, cols, T, 1, inside)
            kl, d_kl = _kl_terms(lp, ref, KL_KIND)
        total = pg
        if USE_KL:
            total = pg + beta * kl
        s_loss += tl.sum(tl.where(live, coef[:, None] * m * total, 0.0), axis=1)
        s_low += tl.sum(tl.where(live, m * low, 0.0), axis=1)
        s_high += tl.sum(tl.where(live, m * high, 0.0), axis=1)
        s_dual += tl.sum(tl.where(live, m * dual, 0.0), axis=1)
        s_ratio += tl.sum(tl.where(live, m * r, 0.0), axis=1)
        s_approx += tl.sum(tl.where(live, -m * tl.minimum(tl.maximum(log_ratio, -_LR_CLAMP), _LR_CLAMP), 0.0),
                           axis=1)
        s_kl += tl.sum(tl.where(live, m * kl, 0.0), axis=1)
        s_mask += tl.sum(tl.where(live, m, 0.0), axis=1)
        if SEQUENCE_LEVEL and LOSS_KIND != 1:
            d_row += tl.sum(tl.where(live, m * d_pg, 0.0), axis=1)
        else:
            d_tok = d_pg
            if LOSS_KIND != 1:  # cispo's capped ratio is a constant: its gradient is w.r.t. lp directly
                d_tok = d_pg * r * passes
            if USE_KL:
                d_tok += beta * d_kl
            g = tl.where(live, coef[:, None] * m * d_tok, 0.0)
            offs = rows[:, None] * T + cols[None, :].to(tl.int64)
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=inside)
        t0 += BLOCK_T

    # Sweep 3 (sequence level): every token reaches the row's ratio through the mean log-ratio.
    if SEQUENCE_LEVEL and LOSS_KIND != 1:
        d_seq = d_row * seq_ratio * seq_pass / tl.maximum(row_count, 1.0)
        t0 = 0
        while t0 < T:
            cols = t0 + lanes
            inside = row_ok[:, None] & (cols < T)[None, :]
            m = _load_tile(mask_ptr, rows, cols, T, 1, inside)
            live = m != 0
            d_tok = d_seq[:, None] + tl.zeros_like(m)
            if USE_KL:
                lp = _load_tile(lp_ptr, rows, cols, T, 1, inside)
                ref = _load_tile(ref_ptr, rows, cols, T, 1, inside)
                kl, d_kl = _kl_terms(lp, ref, KL_KIND)
                d_tok += beta * d_kl
            g = tl.where(live, coef[:, None] * m * d_tok, 0.0)
            offs = rows[:, None] * T + cols[None, :].to(tl.int64)
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=inside)
            t0 += BLOCK_T

    out = partial_ptr + pid * NUM_SUMS
    tl.store(out + 0, tl.sum(s_loss, axis=0))
    tl.store(out + 1, tl.sum(s_low, axis=0))
    tl.store(out + 2, tl.sum(s_high, axis=0))
    tl.store(out + 3, tl.sum(s_dual, axis=0))
    tl.store(out + 4, tl.sum(s_ratio, axis=0))
    tl.store(out + 5, tl.sum(s_approx, axis=0))
    tl.store(out + 6, tl.sum(s_kl, axis=0))
    tl.store(out + 7, tl.sum(s_mask, axis=0))


def _blocks(B: int, T: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_T, num_warps)."""
    if triton_interpreting():  # few, large programs: the interpreter is vectorised per program
        block_t = min(triton.next_power_of_2(T), 128)
        return min(triton.next_power_of_2(B), 8192 // block_t), block_t, 4
    block_t = min(triton.next_power_of_2(T), 1024)
    block_b = min(triton.next_power_of_2(B), max(1, 4096 // block_t))
    while block_b > 1 and triton.cdiv(B, block_b) < 264:  # ~2 programs per SM on an H100
        block_b //= 2
    return block_b, block_t, 8 if block_b * block_t >= 2048 else 4


def _row_strides(t: torch.Tensor, T: int) -> tuple[int, int]:
    """Strides of a contiguous [B] (broadcast over columns) or [B, T] tensor."""
    return (1, 0) if t.dim() == 1 else (T, 1)


def policy_loss_triton(lp, old, adv, mask, row_coef, ref, is_weights, cfg: LossConfig):
    """Same contract as ``policy_loss_reference``: (sums[NUM_SUMS] fp32, grad[B, T] in lp.dtype)."""
    B, T = lp.shape
    lp, old, adv, mask, row_coef = (t.contiguous() for t in (lp, old, adv, mask, row_coef))
    if mask.dtype == torch.bool:  # Triton's i1 pointers are awkward; bytes load everywhere
        mask = mask.view(torch.uint8)
    ref = ref.contiguous() if ref is not None else None
    is_weights = is_weights.contiguous() if is_weights is not None else None
    block_b, block_t, num_warps = _blocks(B, T)
    grid = (triton.cdiv(B, block_b),)
    grad = torch.empty((B, T), dtype=lp.dtype, device=lp.device)
    partials = torch.empty((grid[0], NUM_SUMS), dtype=torch.float32, device=lp.device)
    adv_sb, adv_st = _row_strides(adv, T)
    isw_sb, isw_st = _row_strides(is_weights, T) if is_weights is not None else (0, 0)
    with torch.cuda.device(lp.device) if lp.is_cuda else contextlib.nullcontext():  # launch on the data's GPU
        _policy_loss_kernel[grid](
            lp, old, adv, mask, ref if ref is not None else lp, is_weights if is_weights is not None else lp,
            row_coef, grad, partials,
            B, T, adv_sb, adv_st, isw_sb, isw_st,
            cfg.eps_low, cfg.eps_high, cfg.dual_clip or 0.0, cfg.delta or 0.0, cfg.beta, cfg.tau_pos, cfg.tau_neg,
            LOSS_KIND=_LOSS_KIND[cfg.loss_type], KL_KIND=_KL_KIND[cfg.kl_type], SEQUENCE_LEVEL=cfg.sequence_level,
            HAS_REF=cfg.has_ref, HAS_ISW=is_weights is not None, HAS_DELTA=cfg.delta is not None,
            HAS_DUAL=cfg.dual_clip is not None, USE_KL=cfg.has_ref and cfg.beta != 0,
            NUM_SUMS=NUM_SUMS, BLOCK_B=block_b, BLOCK_T=block_t, num_warps=num_warps,
        )
    return partials.sum(0), grad
