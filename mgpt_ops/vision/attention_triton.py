"""Triton face of ``vision_attention`` (contract: ``mgpt_ops/vision/_contract.py``): FlashAttention-2 style
variable-length attention with the rotate-half RoPE fused in. Imported only when the ``triton`` face runs.

Work split (every kernel: ONE launch for all sequences, no host sync)
    A 1-D grid of cdiv(max_seqlen, BLOCK) x H x S programs; program p takes block p % nb of head (p // nb) % H
    of sequence p // (nb H). A program whose block starts past its sequence's end returns at once, so
    thousands of 64-token windows and a few 4096-token images share one launch. (Axis 0 of a grid has no
    65,535 limit, unlike axes 1 and 2, so S and H are not capped.)
    forward    one program per query block: online softmax over the key blocks in the log2 domain
               (scores scaled by scale * log2(e), exp2), fp32 accumulators, writes out and lse = m + log l.
    dq         one program per query block: delta_i = <dout_i, out_i> (stored for the next kernel), then
               dS = P * (dP - delta) and dq' = scale * dS k' over the key blocks.
    dk, dv     one program per key block, over the query blocks: dv = P^T dout, dk' = scale * dS^T q'.
    Each gradient row is owned by exactly one program, so there are no atomics: the backward is bitwise
    deterministic, whatever the ``deterministic`` flag says. Inner-loop blocks that lie wholly inside the
    sequence skip the boundary select on the scores; only the last, partial block pays it.

Head dims without padding to a power of two
    D is split into two power-of-two column pieces, A = [0, DA) and B = [DA, DA + DB) masked past D:
    64 = 32 + 32, 72 = 64 + 16 (8 masked), 80 = 64 + 16, 96 = 64 + 32, 128 = 64 + 64. Every product over D
    is two chained tl.dot, so the math runs on D rounded up to the MMA k-step of 16 (72 -> 80, +11%; the
    others exact) instead of 128 (or FlashAttention's 96).

RoPE (x' = x cos + rotate_half(x) sin, in fp32, rounded to the input dtype as Hugging Face does)
    Column c pairs with partner(c) = c + D/2 (c < D/2) or c - D/2, so x'[c] = x[c] cos[c] -/+ x[partner(c)]
    sin[c]: the partner columns are loaded as a second tile of the same rows (same cache lines), which works
    for any split of D without register shuffles. q is rotated in the forward kernel's prologue (once per
    program). k is rotated once, by ``_rope_kernel``, into a [N, H, D] buffer: rotating it inside the key
    loop would re-read cos and sin (8 bytes per element in fp32) in every query-block program and triple the
    loop's L2 traffic, which already limits a D = 72 kernel. The backward rotates q and k again (the op saves
    only its inputs, out and lse).
    Gradient transpose: dx[c] = dx'[c] cos[c] +/- dx'[partner(c)] sin[partner(c)] needs partner columns of an
    fp32 accumulator, i.e. of registers held by other threads: the program stores its dx' tile to an fp32
    scratch [N, H, D], waits at a CTA barrier and reads the partner columns back (its own fresh lines, L1/L2
    hits). The scratch (N H D x 4 bytes, like FlashAttention-2's dq accumulator) serves dq then dk.

Strides (in units of 8 elements)
    Every stride reaches the kernels divided by 8 and is multiplied by the constant 8 there. Triton specialises
    an integer argument only on divisibility by 16, so D = 72's head stride (72 elements, packed qkv or not)
    looked unaligned to it: every q/k/v/cos/sin load went unvectorised, the K/V loads fell out of the software
    pipeline, and the D = 72 kernels spilled registers (compiled as launched for sm_90: forward 216 B of stack
    and 40 KB of shared memory instead of 0 B and 140 KB; backward 584 B and 720 B of spills). Times 8, the
    compiler sees 16-byte aligned rows and tiles for D = 72 come out like D = 80's. Every supported D is a
    multiple of 8, so contiguous tensors and views of a packed qkv qualify as they are; a tensor with other
    strides is copied to a contiguous one first (``_aligned``).

Interpreter (TRITON_INTERPRET=1, CPU tests): ``INTERPRETER`` casts dot operands to fp32 (bf16 tl.dot is
silently wrong there), rounds fp32 -> bf16 casts by hand (the interpreter truncates them) and walks the
blocks with ``while`` loops (``range`` over a runtime bound fails there); compiled kernels use ``tl.range``
loops, which Triton software-pipelines. Offsets are int64: N H D exceeds 2^31 at N ~ 10^6.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mgpt_ops._backend import triton_interpreting

_NEG_INF = tl.constexpr(float("-inf"))
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_MAX_PROGRAMS = 2**31 - 1  # grid axis 0
_UNIT = tl.constexpr(8)  # strides reach the kernels in units of 8 elements (module docstring: "Strides")
# Device functions are plain Python under the interpreter: it re-patches triton.language on every call of a
# @triton.jit device function (~1-3 ms here), which made a launch over 2,000 tiny sequences take minutes.
# Compiled, they are @triton.jit functions inlined into the kernels as usual.
_device_fn = (lambda fn: fn) if triton_interpreting() else triton.jit


# ---------------------------------------------------------------------------------------------------------
# Tile helpers
# ---------------------------------------------------------------------------------------------------------
@_device_fn
def _program_block(CU, n_blocks, n_heads, BLOCK: tl.constexpr):
    """(first token of the sequence, its length, head, first row of this program's block in the sequence)."""
    pid = tl.program_id(0)
    rest = pid // n_blocks
    seq = rest // n_heads
    start = tl.load(CU + seq)
    length = tl.load(CU + seq + 1) - start
    return start.to(tl.int64), length, (rest % n_heads).to(tl.int64), (pid % n_blocks) * BLOCK


@_device_fn
def _load(base, tok, row_ok, stride8_n, cols, col_ok):
    return tl.load(base + tok[:, None] * (stride8_n * _UNIT) + cols[None, :],
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@_device_fn
def _to(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The interpreter truncates fp32 -> bf16 (a bias of -2^-9 on every
    value), so there the bits are rounded first and the cast only drops zeros."""
    if INTERPRETER:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@_device_fn
def _store(base, tok, row_ok, stride8_n, cols, col_ok, tile, INTERPRETER: tl.constexpr):
    tl.store(base + tok[:, None] * (stride8_n * _UNIT) + cols[None, :],
             _to(tile, base.dtype.element_ty, INTERPRETER), mask=row_ok[:, None] & col_ok[None, :])


@_device_fn
def _partner(cols, HALF: tl.constexpr):
    return tl.where(cols < HALF, cols + HALF, cols - HALF)


@_device_fn
def _load_rotated(base, tok, row_ok, stride8_n, cols, col_ok, COS, SIN, stride8_cs, HALF: tl.constexpr):
    """x'[:, cols] in fp32: x[c] cos[c] + rotate_half(x)[c] sin[c], rotate_half(x)[c] = -x[c + HALF] for
    c < HALF, x[c - HALF] otherwise."""
    x = _load(base, tok, row_ok, stride8_n, cols, col_ok).to(tl.float32)
    rotated = _load(base, tok, row_ok, stride8_n, _partner(cols, HALF), col_ok).to(tl.float32)
    rotated = tl.where((cols < HALF)[None, :], -rotated, rotated)
    cos = _load(COS, tok, row_ok, stride8_cs, cols, col_ok)
    sin = _load(SIN, tok, row_ok, stride8_cs, cols, col_ok)
    return x * cos + rotated * sin


@_device_fn
def _unrotate(grad, SCRATCH, tok, row_ok, stride8_sn, cols, col_ok, COS, SIN, stride8_cs, HALF: tl.constexpr):
    """Rotation transpose of the gradient tile ``grad`` = dx'[:, cols] (all of dx' already in SCRATCH):
    dx[c] = dx'[c] cos[c] + dx'[c + HALF] sin[c + HALF] (c < HALF), dx'[c] cos[c] - dx'[c - HALF] sin[c - HALF]."""
    partner = _partner(cols, HALF)
    other = _load(SCRATCH, tok, row_ok, stride8_sn, partner, col_ok)
    other = tl.where((cols < HALF)[None, :], other, -other)
    cos = _load(COS, tok, row_ok, stride8_cs, cols, col_ok)
    sin_partner = _load(SIN, tok, row_ok, stride8_cs, partner, col_ok)
    return grad * cos + other * sin_partner


@_device_fn
def _store_grad(grad_a, grad_b, OUT, stride8_on, SCRATCH, stride8_sn, tok, row_ok, cols_a, cols_b, ok_a, ok_b,
                COS, SIN, stride8_cs, HALF: tl.constexpr, ROPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """Store the gradient of the un-rotated input (see the module docstring: scratch, barrier, partners)."""
    if ROPE:
        _store(SCRATCH, tok, row_ok, stride8_sn, cols_a, ok_a, grad_a, INTERPRETER)
        _store(SCRATCH, tok, row_ok, stride8_sn, cols_b, ok_b, grad_b, INTERPRETER)
        tl.debug_barrier()  # every thread's dx' columns are in SCRATCH before any thread reads partners
        grad_a, grad_b = (_unrotate(grad_a, SCRATCH, tok, row_ok, stride8_sn, cols_a, ok_a, COS, SIN, stride8_cs, HALF),
                          _unrotate(grad_b, SCRATCH, tok, row_ok, stride8_sn, cols_b, ok_b, COS, SIN, stride8_cs, HALF))
    _store(OUT, tok, row_ok, stride8_on, cols_a, ok_a, grad_a, INTERPRETER)
    _store(OUT, tok, row_ok, stride8_on, cols_b, ok_b, grad_b, INTERPRETER)


@_device_fn
def _dot(a, b, acc, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (PRECISION "ieee" keeps fp32 inputs out of TF32)."""
    if INTERPRETER:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@_device_fn
def _scores(x_a, x_b, y_a, y_b, qk_scale, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
    """qk_scale * x @ y^T over both column pieces ([rows of x, rows of y], fp32)."""
    s = tl.zeros([x_a.shape[0], y_a.shape[0]], dtype=tl.float32)
    s = _dot(x_a, tl.trans(y_a), s, INTERPRETER, PRECISION)
    return _dot(x_b, tl.trans(y_b), s, INTERPRETER, PRECISION) * qk_scale


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _rope_kernel(X, OUT, COS, SIN, stride8_xn, stride8_xh, stride8_on, stride8_oh, stride8_cs, n_tokens,
                 HEAD_DIM: tl.constexpr, HALF: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                 BLOCK_T: tl.constexpr, INTERPRETER: tl.constexpr):
    """OUT[:, h] = rotated X[:, h] in X's dtype; grid (cdiv(N, BLOCK_T), H)."""
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    row_ok = tok < n_tokens
    cols_a, cols_b = tl.arange(0, DA), DA + tl.arange(0, DB)
    ok_a, ok_b = cols_a < HEAD_DIM, cols_b < HEAD_DIM
    x_base, out_base = X + head * (stride8_xh * _UNIT), OUT + head * (stride8_oh * _UNIT)
    x_a = _load_rotated(x_base, tok, row_ok, stride8_xn, cols_a, ok_a, COS, SIN, stride8_cs, HALF)
    _store(out_base, tok, row_ok, stride8_on, cols_a, ok_a, x_a, INTERPRETER)
    x_b = _load_rotated(x_base, tok, row_ok, stride8_xn, cols_b, ok_b, COS, SIN, stride8_cs, HALF)
    _store(out_base, tok, row_ok, stride8_on, cols_b, ok_b, x_b, INTERPRETER)


@_device_fn
def _fwd_step(q_a, q_b, m_i, l_i, acc_a, acc_b, k_base, v_base, start, n0, length, stride8_kn, stride8_vn, cols_a,
              cols_b, ok_a, ok_b, qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr, INTERPRETER: tl.constexpr,
              PRECISION: tl.constexpr):
    """One key block of the online softmax (log2 domain): rescale by 2^(m_old - m_new), add P V. MASK: the
    block runs past the sequence's end (only the last one does; the others skip the select)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n < length
    tok_n = start + offs_n
    k_a = _load(k_base, tok_n, key_ok, stride8_kn, cols_a, ok_a)
    k_b = _load(k_base, tok_n, key_ok, stride8_kn, cols_b, ok_b)
    s = _scores(q_a, q_b, k_a, k_b, qk_scale, INTERPRETER, PRECISION)
    if MASK:
        s = tl.where(key_ok[None, :], s, _NEG_INF)
    # The block's first key is inside the sequence, so m_new is finite and 2^(-inf - m_new) = 0 below.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_a = _load(v_base, tok_n, key_ok, stride8_vn, cols_a, ok_a)
    v_b = _load(v_base, tok_n, key_ok, stride8_vn, cols_b, ok_b)
    p = _to(p, v_a.dtype, INTERPRETER)  # P in the input dtype for the tensor-core P V, as FlashAttention does
    acc_a = _dot(p, v_a, acc_a * alpha[:, None], INTERPRETER, PRECISION)
    acc_b = _dot(p, v_b, acc_b * alpha[:, None], INTERPRETER, PRECISION)
    return m_new, l_i, acc_a, acc_b


@triton.jit
def _attn_fwd_kernel(Q, K, V, OUT, LSE, CU, COS, SIN, stride8_qn, stride8_qh, stride8_kn, stride8_kh, stride8_vn,
                     stride8_vh, stride8_on, stride8_oh, stride8_cs, n_tokens, n_heads, n_blocks, qk_scale,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
                     INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
    """out, lse of one query block; K already rotated when ROPE (q is rotated here)."""
    start, length, head, m0 = _program_block(CU, n_blocks, n_heads, BLOCK_M)
    if m0 >= length:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < length
    tok_m = start + offs_m
    cols_a, cols_b = tl.arange(0, DA), DA + tl.arange(0, DB)
    ok_a, ok_b = cols_a < HEAD_DIM, cols_b < HEAD_DIM
    q_base = Q + head * (stride8_qh * _UNIT)
    if ROPE:
        q_a = _load_rotated(q_base, tok_m, row_ok, stride8_qn, cols_a, ok_a, COS, SIN, stride8_cs, HALF)
        q_b = _load_rotated(q_base, tok_m, row_ok, stride8_qn, cols_b, ok_b, COS, SIN, stride8_cs, HALF)
        q_a, q_b = _to(q_a, Q.dtype.element_ty, INTERPRETER), _to(q_b, Q.dtype.element_ty, INTERPRETER)
    else:
        q_a = _load(q_base, tok_m, row_ok, stride8_qn, cols_a, ok_a)
        q_b = _load(q_base, tok_m, row_ok, stride8_qn, cols_b, ok_b)

    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, DA], tl.float32)
    acc_b = tl.zeros([BLOCK_M, DB], tl.float32)
    k_base, v_base = K + head * (stride8_kh * _UNIT), V + head * (stride8_vh * _UNIT)
    full_end = length - length % BLOCK_N  # key blocks before it lie inside the sequence
    if INTERPRETER:
        n0 = 0
        while n0 < full_end:
            m_i, l_i, acc_a, acc_b = _fwd_step(q_a, q_b, m_i, l_i, acc_a, acc_b, k_base, v_base, start, n0, length,
                                               stride8_kn, stride8_vn, cols_a, cols_b, ok_a, ok_b, qk_scale, BLOCK_N,
                                               False, INTERPRETER, PRECISION)
            n0 += BLOCK_N
    else:
        for n0 in tl.range(0, full_end, BLOCK_N):
            m_i, l_i, acc_a, acc_b = _fwd_step(q_a, q_b, m_i, l_i, acc_a, acc_b, k_base, v_base, start, n0, length,
                                               stride8_kn, stride8_vn, cols_a, cols_b, ok_a, ok_b, qk_scale, BLOCK_N,
                                               False, INTERPRETER, PRECISION)
    if full_end < length:
        m_i, l_i, acc_a, acc_b = _fwd_step(q_a, q_b, m_i, l_i, acc_a, acc_b, k_base, v_base, start, full_end, length,
                                           stride8_kn, stride8_vn, cols_a, cols_b, ok_a, ok_b, qk_scale, BLOCK_N, True,
                                           INTERPRETER, PRECISION)

    out_base = OUT + head * (stride8_oh * _UNIT)
    _store(out_base, tok_m, row_ok, stride8_on, cols_a, ok_a, acc_a / l_i[:, None], INTERPRETER)
    _store(out_base, tok_m, row_ok, stride8_on, cols_b, ok_b, acc_b / l_i[:, None], INTERPRETER)
    tl.store(LSE + head * n_tokens + tok_m, (m_i + tl.log2(l_i)) * _LN2, mask=row_ok)


@_device_fn
def _dq_step(q_a, q_b, do_a, do_b, lse2, delta, dq_a, dq_b, k_base, v_base, start, n0, length, stride8_kn,
             stride8_vn, cols_a, cols_b, ok_a, ok_b, qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
             INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
    """dq' += dS k' over one key block, dS = P * (dP - delta), P = 2^(scores - lse log2 e)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n < length
    tok_n = start + offs_n
    k_a = _load(k_base, tok_n, key_ok, stride8_kn, cols_a, ok_a)
    k_b = _load(k_base, tok_n, key_ok, stride8_kn, cols_b, ok_b)
    v_a = _load(v_base, tok_n, key_ok, stride8_vn, cols_a, ok_a)
    v_b = _load(v_base, tok_n, key_ok, stride8_vn, cols_b, ok_b)
    p = tl.exp2(_scores(q_a, q_b, k_a, k_b, qk_scale, INTERPRETER, PRECISION) - lse2[:, None])
    if MASK:
        p = tl.where(key_ok[None, :], p, 0.0)
    dp = _scores(do_a, do_b, v_a, v_b, 1.0, INTERPRETER, PRECISION)
    ds = _to(p * (dp - delta[:, None]), k_a.dtype, INTERPRETER)
    dq_a = _dot(ds, k_a, dq_a, INTERPRETER, PRECISION)
    dq_b = _dot(ds, k_b, dq_b, INTERPRETER, PRECISION)
    return dq_a, dq_b


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, OUT, DOUT, LSE, DELTA, DQ, SCRATCH, CU, COS, SIN, stride8_qn, stride8_qh,
                        stride8_kn, stride8_kh, stride8_vn, stride8_vh, stride8_on, stride8_oh, stride8_dn, stride8_dh,
                        stride8_cs, n_tokens, n_heads, n_blocks, sm_scale, qk_scale, HEAD_DIM: tl.constexpr,
                        HALF: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, ROPE: tl.constexpr, INTERPRETER: tl.constexpr,
                        PRECISION: tl.constexpr):
    """delta and dq of one query block. Q, K are the rotated q', k' when ROPE; DOUT, DQ, SCRATCH share the
    layout of a contiguous [N, H, D] tensor (strides stride8_dn, stride8_dh)."""
    start, length, head, m0 = _program_block(CU, n_blocks, n_heads, BLOCK_M)
    if m0 >= length:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < length
    tok_m = start + offs_m
    cols_a, cols_b = tl.arange(0, DA), DA + tl.arange(0, DB)
    ok_a, ok_b = cols_a < HEAD_DIM, cols_b < HEAD_DIM
    q_a = _load(Q + head * (stride8_qh * _UNIT), tok_m, row_ok, stride8_qn, cols_a, ok_a)
    q_b = _load(Q + head * (stride8_qh * _UNIT), tok_m, row_ok, stride8_qn, cols_b, ok_b)
    do_a = _load(DOUT + head * (stride8_dh * _UNIT), tok_m, row_ok, stride8_dn, cols_a, ok_a)
    do_b = _load(DOUT + head * (stride8_dh * _UNIT), tok_m, row_ok, stride8_dn, cols_b, ok_b)
    o_a = _load(OUT + head * (stride8_oh * _UNIT), tok_m, row_ok, stride8_on, cols_a, ok_a).to(tl.float32)
    o_b = _load(OUT + head * (stride8_oh * _UNIT), tok_m, row_ok, stride8_on, cols_b, ok_b).to(tl.float32)
    delta = tl.sum(do_a.to(tl.float32) * o_a, 1) + tl.sum(do_b.to(tl.float32) * o_b, 1)
    tl.store(DELTA + head * n_tokens + tok_m, delta, mask=row_ok)
    lse2 = tl.load(LSE + head * n_tokens + tok_m, mask=row_ok, other=0.0) * _LOG2E

    dq_a = tl.zeros([BLOCK_M, DA], tl.float32)
    dq_b = tl.zeros([BLOCK_M, DB], tl.float32)
    k_base, v_base = K + head * (stride8_kh * _UNIT), V + head * (stride8_vh * _UNIT)
    full_end = length - length % BLOCK_N
    if INTERPRETER:
        n0 = 0
        while n0 < full_end:
            dq_a, dq_b = _dq_step(q_a, q_b, do_a, do_b, lse2, delta, dq_a, dq_b, k_base, v_base, start, n0, length,
                                  stride8_kn, stride8_vn, cols_a, cols_b, ok_a, ok_b, qk_scale, BLOCK_N, False,
                                  INTERPRETER, PRECISION)
            n0 += BLOCK_N
    else:
        for n0 in tl.range(0, full_end, BLOCK_N):
            dq_a, dq_b = _dq_step(q_a, q_b, do_a, do_b, lse2, delta, dq_a, dq_b, k_base, v_base, start, n0, length,
                                  stride8_kn, stride8_vn, cols_a, cols_b, ok_a, ok_b, qk_scale, BLOCK_N, False,
                                  INTERPRETER, PRECISION)
    if full_end < length:
        dq_a, dq_b = _dq_step(q_a, q_b, do_a, do_b, lse2, delta, dq_a, dq_b, k_base, v_base, start, full_end, length,
                              stride8_kn, stride8_vn, cols_a, cols_b, ok_a, ok_b, qk_scale, BLOCK_N, True, INTERPRETER,
                              PRECISION)
    head_offset = head * (stride8_dh * _UNIT)
    _store_grad(dq_a * sm_scale, dq_b * sm_scale, DQ + head_offset, stride8_dn, SCRATCH + head_offset, stride8_dn,
                tok_m, row_ok, cols_a, cols_b, ok_a, ok_b, COS, SIN, stride8_cs, HALF, ROPE, INTERPRETER)


@_device_fn
def _dkdv_step(k_a, k_b, v_a, v_b, dk_a, dk_b, dv_a, dv_b, q_base, do_base, LSE_H, DELTA_H, start, m0, length,
               stride8_qn, stride8_dn, cols_a, cols_b, ok_a, ok_b, qk_scale, BLOCK_M: tl.constexpr,
               MASK: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
    """dv += P^T dout, dk' += dS^T q' over one query block (P^T, dS^T: [keys, queries])."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < length
    tok_m = start + offs_m
    q_a = _load(q_base, tok_m, row_ok, stride8_qn, cols_a, ok_a)
    q_b = _load(q_base, tok_m, row_ok, stride8_qn, cols_b, ok_b)
    do_a = _load(do_base, tok_m, row_ok, stride8_dn, cols_a, ok_a)
    do_b = _load(do_base, tok_m, row_ok, stride8_dn, cols_b, ok_b)
    lse2 = tl.load(LSE_H + tok_m, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(DELTA_H + tok_m, mask=row_ok, other=0.0)
    p_t = tl.exp2(_scores(k_a, k_b, q_a, q_b, qk_scale, INTERPRETER, PRECISION) - lse2[None, :])
    if MASK:
        p_t = tl.where(row_ok[None, :], p_t, 0.0)
    p_lo = _to(p_t, do_a.dtype, INTERPRETER)
    dv_a = _dot(p_lo, do_a, dv_a, INTERPRETER, PRECISION)
    dv_b = _dot(p_lo, do_b, dv_b, INTERPRETER, PRECISION)
    dp_t = _scores(v_a, v_b, do_a, do_b, 1.0, INTERPRETER, PRECISION)
    ds_t = _to(p_t * (dp_t - delta[None, :]), q_a.dtype, INTERPRETER)
    dk_a = _dot(ds_t, q_a, dk_a, INTERPRETER, PRECISION)
    dk_b = _dot(ds_t, q_b, dk_b, INTERPRETER, PRECISION)
    return dk_a, dk_b, dv_a, dv_b


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DOUT, LSE, DELTA, DK, DV, SCRATCH, CU, COS, SIN, stride8_qn, stride8_qh,
                          stride8_kn, stride8_kh, stride8_vn, stride8_vh, stride8_dn, stride8_dh, stride8_cs, n_tokens,
                          n_heads, n_blocks, sm_scale, qk_scale, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                          DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          ROPE: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
    """dk and dv of one key block (needs DELTA from the dq kernel). Same layouts as the dq kernel."""
    start, length, head, n0 = _program_block(CU, n_blocks, n_heads, BLOCK_N)
    if n0 >= length:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n < length
    tok_n = start + offs_n
    cols_a, cols_b = tl.arange(0, DA), DA + tl.arange(0, DB)
    ok_a, ok_b = cols_a < HEAD_DIM, cols_b < HEAD_DIM
    k_a = _load(K + head * (stride8_kh * _UNIT), tok_n, key_ok, stride8_kn, cols_a, ok_a)
    k_b = _load(K + head * (stride8_kh * _UNIT), tok_n, key_ok, stride8_kn, cols_b, ok_b)
    v_a = _load(V + head * (stride8_vh * _UNIT), tok_n, key_ok, stride8_vn, cols_a, ok_a)
    v_b = _load(V + head * (stride8_vh * _UNIT), tok_n, key_ok, stride8_vn, cols_b, ok_b)

    dk_a = tl.zeros([BLOCK_N, DA], tl.float32)
    dk_b = tl.zeros([BLOCK_N, DB], tl.float32)
    dv_a = tl.zeros([BLOCK_N, DA], tl.float32)
    dv_b = tl.zeros([BLOCK_N, DB], tl.float32)
    q_base, do_base = Q + head * (stride8_qh * _UNIT), DOUT + head * (stride8_dh * _UNIT)
    lse_h, delta_h = LSE + head * n_tokens, DELTA + head * n_tokens
    full_end = length - length % BLOCK_M
    if INTERPRETER:
        m0 = 0
        while m0 < full_end:
            dk_a, dk_b, dv_a, dv_b = _dkdv_step(k_a, k_b, v_a, v_b, dk_a, dk_b, dv_a, dv_b, q_base, do_base, lse_h,
                                                delta_h, start, m0, length, stride8_qn, stride8_dn, cols_a, cols_b,
                                                ok_a, ok_b, qk_scale, BLOCK_M, False, INTERPRETER, PRECISION)
            m0 += BLOCK_M
    else:
        for m0 in tl.range(0, full_end, BLOCK_M):
            dk_a, dk_b, dv_a, dv_b = _dkdv_step(k_a, k_b, v_a, v_b, dk_a, dk_b, dv_a, dv_b, q_base, do_base, lse_h,
                                                delta_h, start, m0, length, stride8_qn, stride8_dn, cols_a, cols_b,
                                                ok_a, ok_b, qk_scale, BLOCK_M, False, INTERPRETER, PRECISION)
    if full_end < length:
        dk_a, dk_b, dv_a, dv_b = _dkdv_step(k_a, k_b, v_a, v_b, dk_a, dk_b, dv_a, dv_b, q_base, do_base, lse_h,
                                            delta_h, start, full_end, length, stride8_qn, stride8_dn, cols_a, cols_b,
                                            ok_a, ok_b, qk_scale, BLOCK_M, True, INTERPRETER, PRECISION)
    head_offset = head * (stride8_dh * _UNIT)
    _store(DV + head_offset, tok_n, key_ok, stride8_dn, cols_a, ok_a, dv_a, INTERPRETER)
    _store(DV + head_offset, tok_n, key_ok, stride8_dn, cols_b, ok_b, dv_b, INTERPRETER)
    _store_grad(dk_a * sm_scale, dk_b * sm_scale, DK + head_offset, stride8_dn, SCRATCH + head_offset, stride8_dn,
                tok_n, key_ok, cols_a, cols_b, ok_a, ok_b, COS, SIN, stride8_cs, HALF, ROPE, INTERPRETER)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------
class _Blocks(NamedTuple):
    rows: int  # BLOCK_M (queries) of the forward / dq kernels, BLOCK_N (keys) of the dk-dv kernel
    loop: int  # the block size of the kernel's inner loop
    num_warps: int
    num_stages: int


def _pieces(head_dim: int) -> tuple[int, int]:
    """(DA, DB): power-of-two column pieces covering D, the second one at least the MMA k-step of 16."""
    da = 64 if head_dim > 64 else 32
    return da, max(16, triton.next_power_of_2(head_dim - da))


def _blocks(head_dim: int, dtype: torch.dtype, max_seqlen: int) -> tuple[_Blocks, _Blocks, _Blocks]:
    """(forward, dq, dk-dv) tilings for H100. bf16/fp16: 128-row tiles keep the tensor cores fed; the forward
    streams 128-key tiles (3 stages of K and V fit in 228 KB of shared memory up to D = 96; D = 128 takes
    64-key tiles); the backward kernels hold two [rows, D] fp32 accumulators (dq, or dk and dv) plus four
    [rows, loop] fp32 tiles in registers, so their loop blocks are 64 (dq) and 32 (dk-dv) rows with 2 stages.
    Sequences of at most 64 tokens (Qwen2.5-VL's windows) take 64-row tiles on one warpgroup (dk-dv: 32-query
    loop blocks, to hold its two accumulators without spilling): a 128-row tile would leave half its rows and
    three quarters of its products empty.
    fp32 (tests; IEEE products on the FMA units, no tensor cores) takes 32 x 32 tiles, the largest that fit the
    registers without spilling at D = 128. The interpreter runs numpy per program, so it takes the largest tiles
    (fewest programs and iterations); the tile sizes change no code path, only the masks' extent."""
    if triton_interpreting():
        large = _Blocks(128, 128, 4, 1)
        return large, large, large
    if dtype == torch.float32:
        small = _Blocks(32, 32, 4, 1)
        return small, small, small
    if max_seqlen <= 64:
        window = _Blocks(64, 64, 4, 2)
        return window, window, _Blocks(64, 32, 4, 2)
    fwd = _Blocks(128, 128 if head_dim <= 96 else 64, 8, 3)
    return fwd, _Blocks(128, 64, 8, 2), _Blocks(128, 32, 8, 2)


class _Launch:
    """Shapes and compile-time switches shared by the kernels of one call."""

    def __init__(self, q: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor | None):
        self.tokens, self.heads, self.head_dim = q.shape
        self.sequences = cu_seqlens.numel() - 1
        da, db = _pieces(self.head_dim)
        self.rope = cos is not None
        self.constexprs = dict(HEAD_DIM=self.head_dim, HALF=self.head_dim // 2, DA=da, DB=db, ROPE=self.rope,
                               INTERPRETER=triton_interpreting(),
                               PRECISION="ieee" if q.dtype == torch.float32 else "tf32")

    def grid(self, max_seqlen: int, block: int) -> tuple[int, int]:
        """(programs per head and sequence, total programs of the flattened 1-D grid)."""
        n_blocks = triton.cdiv(max_seqlen, block)
        total = n_blocks * self.heads * self.sequences
        if total > _MAX_PROGRAMS:
            raise ValueError(f"mgpt.vision_attention: cdiv(max_seqlen={max_seqlen}, {block}) x H={self.heads} x "
                             f"S={self.sequences} programs exceed one launch; pass the true longest sequence as "
                             f"'max_seqlen'")
        return n_blocks, total


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x itself when its token and head strides are multiples of 8 elements (any contiguous [N, H, D] tensor,
    any view of a packed qkv: every supported D is a multiple of 8), else a contiguous copy."""
    if x.stride(0) % _UNIT.value == 0 and x.stride(1) % _UNIT.value == 0:
        return x
    return x.contiguous()


def _strides8(x: torch.Tensor) -> tuple[int, int]:
    """(token stride, head stride) of an ``_aligned`` [N, H, D] tensor in units of 8 elements."""
    return x.stride(0) // _UNIT.value, x.stride(1) // _UNIT.value


def _rope_operands(q: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
    """(cos, sin, row stride) for the kernels; without RoPE, q stands in for the pointers no code reads."""
    if cos is None:
        return q, q, 0
    cos, sin = cos.contiguous(), sin.contiguous()  # no-op for the usual tables; one row stride for both
    return cos, sin, cos.stride(0) // _UNIT.value  # D is a multiple of 8


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x' = x cos + rotate_half(x) sin (fp32 math) as a contiguous [N, H, D] tensor in x's dtype."""
    x = _aligned(x)
    tokens, heads, head_dim = x.shape
    da, db = _pieces(head_dim)
    cos, sin, stride_cs = _rope_operands(x, cos, sin)
    out = torch.empty((tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    block_t = 128 if triton_interpreting() else 32
    if tokens and heads:
        _rope_kernel[(triton.cdiv(tokens, block_t), heads)](
            x, out, cos, sin, *_strides8(x), *_strides8(out), stride_cs, tokens,
            HEAD_DIM=head_dim, HALF=head_dim // 2, DA=da, DB=db, BLOCK_T=block_t, INTERPRETER=triton_interpreting(),
            num_warps=4)
    return out


def forward(q, k, v, cu_seqlens, max_seqlen: int, cos, sin, scale: float):
    """(out [N, H, D] in q's dtype, lse [H, N] fp32) -- see the contract."""
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    launch = _Launch(q, cu_seqlens, cos)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((launch.heads, launch.tokens), dtype=torch.float32, device=q.device)
    blocks = _blocks(launch.head_dim, q.dtype, max_seqlen)[0]
    n_blocks, programs = launch.grid(max_seqlen, blocks.rows)
    if programs == 0:
        return out, lse
    if launch.rope:
        k = rotate(k, cos, sin)
    cos, sin, stride_cs = _rope_operands(q, cos, sin)
    _attn_fwd_kernel[(programs,)](
        q, k, v, out, lse, cu_seqlens, cos, sin, *_strides8(q), *_strides8(k), *_strides8(v), *_strides8(out),
        stride_cs, launch.tokens, launch.heads, n_blocks, scale * _LOG2E.value, BLOCK_M=blocks.rows,
        BLOCK_N=blocks.loop, num_warps=blocks.num_warps, num_stages=blocks.num_stages, **launch.constexprs)
    return out, lse


def backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, cos, sin, scale: float):
    """(dq, dk, dv), contiguous, in the input dtypes: gradients w.r.t. the un-rotated q and k."""
    q, k, v, out = _aligned(q), _aligned(k), _aligned(v), _aligned(out)
    launch = _Launch(q, cu_seqlens, cos)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    _, dq_blocks, dkdv_blocks = _blocks(launch.head_dim, q.dtype, max_seqlen)
    dq_tiles, dq_programs = launch.grid(max_seqlen, dq_blocks.rows)
    dkdv_tiles, dkdv_programs = launch.grid(max_seqlen, dkdv_blocks.rows)
    if dq_programs == 0:
        return dq, dk, dv
    dout, lse = dout.contiguous(), lse.contiguous()  # dout shares the layout of dq, dk, dv in the kernels
    delta = torch.empty_like(lse)
    if launch.rope:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        scratch = torch.empty(dq.shape, dtype=torch.float32, device=dq.device)
    else:
        scratch = dq  # never touched without RoPE
    cos, sin, stride_cs = _rope_operands(q, cos, sin)
    common = dict(n_tokens=launch.tokens, n_heads=launch.heads, sm_scale=scale, qk_scale=scale * _LOG2E.value,
                  **launch.constexprs)
    _attn_bwd_dq_kernel[(dq_programs,)](
        q, k, v, out, dout, lse, delta, dq, scratch, cu_seqlens, cos, sin, *_strides8(q), *_strides8(k),
        *_strides8(v), *_strides8(out), *_strides8(dout), stride_cs, n_blocks=dq_tiles, BLOCK_M=dq_blocks.rows,
        BLOCK_N=dq_blocks.loop, num_warps=dq_blocks.num_warps, num_stages=dq_blocks.num_stages, **common)
    _attn_bwd_dkdv_kernel[(dkdv_programs,)](
        q, k, v, dout, lse, delta, dk, dv, scratch, cu_seqlens, cos, sin, *_strides8(q), *_strides8(k),
        *_strides8(v), *_strides8(dout), stride_cs, n_blocks=dkdv_tiles, BLOCK_M=dkdv_blocks.loop,
        BLOCK_N=dkdv_blocks.rows, num_warps=dkdv_blocks.num_warps, num_stages=dkdv_blocks.num_stages, **common)
    return dq, dk, dv
