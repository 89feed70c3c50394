"""Triton face of ``mgpt::scaled_mm`` (formulas and conventions: ``mgpt_ops/quant/scaled_gemm.py``, whose
``scaled_mm_reference`` is the spec).

One program computes a BLOCK_M x BLOCK_N tile of ``out``: it walks K in BLOCK_K steps, loading the FP8 / INT8
tiles of ``a [M, K]`` and of the weight ``b [N, K]`` (read as a [BLOCK_K, BLOCK_N] tile of b.T through its
strides, no copy) and feeding them to ``tl.dot`` unconverted -- fp32 accumulation for FP8, exact int32 for INT8.
The epilogue converts the accumulator to fp32, multiplies by the row scale of ``a`` and the column scale of
``b`` (or the per-tensor scalars), adds the bias in fp32 and casts to ``out``'s dtype on store.

Out-of-range elements are loaded as zeros (masked fp8 loads need a float ``other`` in the interpreter), so
zeros pad the K tail and contribute nothing. The K loop is a ``tl.range`` with 3 pipeline stages on a GPU and a
``while`` under the interpreter (which cannot take a runtime bound in ``range`` under numpy >= 2.4; a ``while``
would not be software-pipelined on a GPU). Offsets are int64. Tiles: 128x128x128 under the interpreter
(few large programs are fastest there); on a GPU BLOCK_M shrinks with M (16 for decode) and BLOCK_K = 128
(FP8 / INT8 MMA instructions take K = 32 per step). No autotuning yet.
Imported only when the ``triton`` face runs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from mgpt_ops._backend import triton_interpreting


@triton.jit
def _accumulate_tile(acc, a_rows, b_cols, k0, K, rk, m_ok, n_ok, stride_ak, stride_bk, IS_INT: tl.constexpr):
    """acc += a[rows, k0:k0+BLOCK_K] @ b[cols, k0:k0+BLOCK_K].T with the operands' own dtype in tl.dot."""
    k = k0 + rk
    k_ok = k < K
    a_mask = m_ok[:, None] & k_ok[None, :]
    b_mask = k_ok[:, None] & n_ok[None, :]
    if IS_INT:
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=a_mask, other=0)
        b = tl.load(b_cols + k[:, None] * stride_bk, mask=b_mask, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=a_mask, other=0.0)
        b = tl.load(b_cols + k[:, None] * stride_bk, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _scaled_mm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
                      IS_INT: tl.constexpr, SA_PER_ROW: tl.constexpr, SB_PER_ROW: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm[:, None] * stride_am
    b_cols = b_ptr + rn[None, :] * stride_bn
    if IS_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INTERPRET:  # the interpreter cannot take a runtime bound in range()
        k0 = 0
        while k0 < K:
            acc = _accumulate_tile(acc, a_rows, b_cols, k0, K, rk, m_ok, n_ok, stride_ak, stride_bk, IS_INT)
            k0 += BLOCK_K
    else:  # a for loop, so the compiler software-pipelines the loads (a while loop is not pipelined)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            acc = _accumulate_tile(acc, a_rows, b_cols, k0, K, rk, m_ok, n_ok, stride_ak, stride_bk, IS_INT)
    out = acc.to(tl.float32)
    if SA_PER_ROW:
        out = out * tl.load(sa_ptr + rm, mask=m_ok, other=0.0)[:, None]
    else:
        out = out * tl.load(sa_ptr)
    if SB_PER_ROW:
        out = out * tl.load(sb_ptr + rn, mask=n_ok, other=0.0)[None, :]
    else:
        out = out * tl.load(sb_ptr)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _tiles(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)."""
    if triton_interpreting():
        return 128, 128, 128, 4
    block_m = 16 if M <= 16 else (64 if M <= 64 else 128)
    return block_m, 128, 128, (4 if block_m < 128 else 8)


def scaled_mm(a, b, scale_a, scale_b, out_dtype, bias):
    """Launch on validated inputs (see ``mgpt_ops.quant.scaled_gemm.scaled_mm``); scales are fp32 [*, 1]."""
    M, K = a.shape
    N = b.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    block_m, block_n, block_k, num_warps = _tiles(M)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():  # launch on the data's GPU
        _scaled_mm_kernel[grid](
            a, b, scale_a, scale_b, bias if bias is not None else scale_a, out, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            IS_INT=a.dtype == torch.int8, SA_PER_ROW=scale_a.shape[0] != 1,
            SB_PER_ROW=scale_b.shape[0] != 1, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=3, INTERPRET=triton_interpreting(),
            num_warps=num_warps,
        )
    return out
