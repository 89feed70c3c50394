"""Triton faces of ``mgpt::block_scaled_mm`` and ``mgpt::grouped_block_scaled_mm`` (formulas and conventions:
``mgpt_ops/quant/block_gemm.py``, whose ``*_reference`` functions are the spec).

One program computes a BLOCK_M x BLOCK_N tile of ``out``. BLOCK_K equals the quantisation block (128), so each
K step covers exactly one activation group and one weight block column: the step's FP8 product is accumulated
by ``tl.dot`` in fp32 (a fresh accumulator), multiplied by the group scales of its rows ``scale_a[m, kb]`` and
the block scales of its columns ``scale_b[n // 128, kb]`` and added to the running fp32 sum (DeepSeek-V3's
promotion scheme: each FP8 product stays short, the scales never touch the FP8 operands). Column scales are
loaded per column (``n // 128``), so any BLOCK_N works. Bias and the cast to ``out``'s dtype are the epilogue.

Out-of-range elements load as zeros (masked fp8 loads need a float ``other`` under the interpreter), so zeros
pad the K tail -- and the partial last block needs nothing else. Under the interpreter the FP8 tiles are cast
to fp32 before ``tl.dot`` (its fp8 dot gives garbage) and the K loop is a ``while`` (no runtime bound in
``range`` with numpy >= 2.4); on a GPU it is a ``tl.range`` with software pipelining. Offsets are int64.

Grouped (MoE), ONE launch for all experts: grid axis 0 enumerates the row tiles of every expert in turn
(expert e owns ceil(rows_e / BLOCK_M) tiles), axis 1 the N tiles. The grid cannot know the per-expert counts
without a host sync, so it launches the upper bound ceil(M_total / BLOCK_M) + E row programs; each program
loads all E + 1 offsets, takes the cumulative sum of tiles per expert to find its expert and tile, and returns
at once if it lies past the last tile. Negative row counts (invalid offsets, rejected before the launch) count
as empty and every row index is masked to [0, M_total), so no offsets can make the kernel read out of bounds.
Imported only when the ``triton`` face runs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from mgpt_ops._backend import triton_interpreting
from mgpt_ops.quant.block_gemm import BLOCK


@triton.jit
def _block_scaled_tile(a_rows, b_cols, sa_rows, sb_cols, m_ok, n_ok, K, stride_ak, stride_bk,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """sum over K blocks kb of (a[rows, kb] @ b[cols, kb].T) * scale_a[rows, kb] * scale_b[cols, kb], fp32.
    ``a_rows``/``b_cols``: pointers to the tile's rows of a / columns of b.T; ``sa_rows``/``sb_cols``: pointers
    to the scale rows of those rows / columns (the K-block index is added here)."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INTERPRET:  # the interpreter cannot take a runtime bound in range()
        kb = 0
        while kb * BLOCK_K < K:
            k = kb * BLOCK_K + rk
            k_ok = k < K
            a = tl.load(a_rows + k[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_cols + k[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            partial = tl.dot(a.to(tl.float32), b.to(tl.float32))  # its fp8 dot is wrong: products are exact
            sa = tl.load(sa_rows + kb, mask=m_ok, other=0.0)
            sb = tl.load(sb_cols + kb, mask=n_ok, other=0.0)
            acc += partial * sa[:, None] * sb[None, :]
            kb += 1
    else:  # a for loop, so the compiler software-pipelines the loads (a while loop is not pipelined)
        for kb in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
            k = kb * BLOCK_K + rk
            k_ok = k < K
            a = tl.load(a_rows + k[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_cols + k[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            partial = tl.dot(a, b)
            sa = tl.load(sa_rows + kb, mask=m_ok, other=0.0)
            sb = tl.load(sb_cols + kb, mask=n_ok, other=0.0)
            acc += partial * sa[:, None] * sb[None, :]
    return acc


@triton.jit
def _store_tile(acc, out_ptr, bias_ptr, rm, rn, m_ok, n_ok, stride_om, stride_on, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _block_scaled_mm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K, k_blocks,
                            stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
                            HAS_BIAS: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                            INTERPRET: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = _block_scaled_tile(a_ptr + rm[:, None] * stride_am, b_ptr + rn[None, :] * stride_bn,
                             sa_ptr + rm * k_blocks, sb_ptr + (rn // QBLOCK) * k_blocks, m_ok, n_ok, K,
                             stride_ak, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, INTERPRET)
    _store_tile(acc, out_ptr, bias_ptr, rm, rn, m_ok, n_ok, stride_om, stride_on, HAS_BIAS)


@triton.jit
def _grouped_block_scaled_mm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, offsets_ptr, out_ptr, M, N, K, E, k_blocks,
                                    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_sbe,
                                    stride_om, stride_on, QBLOCK: tl.constexpr, E_POW2: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                    NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    valid = experts < E
    starts = tl.load(offsets_ptr + experts, mask=valid, other=0).to(tl.int64)
    ends = tl.load(offsets_ptr + experts + 1, mask=valid, other=0).to(tl.int64)
    tiles = tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M)
    tiles_through = tl.cumsum(tiles, 0)  # row tiles of experts 0..e
    expert = tl.sum((tiles_through <= pid).to(tl.int32), 0)  # the first expert whose tiles reach past pid
    if expert >= E:  # past the last tile: the grid is an upper bound
        return
    first_tile = tl.sum(tl.where(experts < expert, tiles, 0), 0)
    start = tl.load(offsets_ptr + expert).to(tl.int64)
    end = tl.load(offsets_ptr + expert + 1).to(tl.int64)
    rm = start + (pid - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = (rm < end) & (rm < M) & (rm >= 0)
    n_ok = rn < N
    b_expert = b_ptr + expert.to(tl.int64) * stride_be
    sb_expert = sb_ptr + expert.to(tl.int64) * stride_sbe
    acc = _block_scaled_tile(a_ptr + rm[:, None] * stride_am, b_expert + rn[None, :] * stride_bn,
                             sa_ptr + rm * k_blocks, sb_expert + (rn // QBLOCK) * k_blocks, m_ok, n_ok, K,
                             stride_ak, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, INTERPRET)
    _store_tile(acc, out_ptr, out_ptr, rm, rn, m_ok, n_ok, stride_om, stride_on, False)


def _tiles(rows_per_group: float) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps); BLOCK_K is the quantisation block. For decode sizes (``rows_per_group``:
    M, or the mean rows per expert) BLOCK_M shrinks to 16 and BLOCK_N to 64, so a [1 x 4096] output still
    spreads over 64 programs (the weight stream, not the math, bounds it)."""
    if triton_interpreting():
        return 32, 128, 4
    if rows_per_group <= 16:
        return 16, 64, 4
    block_m = 64 if rows_per_group <= 64 else 128
    return block_m, 128, (4 if block_m < 128 else 8)


def _launch_context(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()  # launch on the data's GPU


def block_scaled_mm(a, b, scale_a, scale_b, out_dtype, bias):
    """Launch on validated inputs (``mgpt_ops.quant.block_gemm.block_scaled_mm``); scales contiguous."""
    M, K = a.shape
    N = b.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    block_m, block_n, num_warps = _tiles(M)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    with _launch_context(a):
        _block_scaled_mm_kernel[grid](
            a, b, scale_a, scale_b, bias if bias is not None else scale_a, out, M, N, K, scale_a.shape[1],
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, QBLOCK=BLOCK, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK,
            NUM_STAGES=3, INTERPRET=triton_interpreting(), num_warps=num_warps)
    return out


def grouped_block_scaled_mm(a, b, scale_a, scale_b, offsets, out_dtype):
    """Launch on validated inputs (``mgpt_ops.quant.block_gemm.grouped_block_scaled_mm``); scales contiguous."""
    M, K = a.shape
    E, N = b.shape[0], b.shape[1]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    block_m, block_n, num_warps = _tiles(M / E)
    # every expert may end in a partial tile: at most ceil(M / BLOCK_M) + E - 1 row tiles in all
    grid = (triton.cdiv(M, block_m) + E - 1, triton.cdiv(N, block_n))
    with _launch_context(a):
        _grouped_block_scaled_mm_kernel[grid](
            a, b, scale_a, scale_b, offsets, out, M, N, K, E, scale_a.shape[1],
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), scale_b.stride(0),
            out.stride(0), out.stride(1), QBLOCK=BLOCK, E_POW2=triton.next_power_of_2(E), BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=BLOCK, NUM_STAGES=3, INTERPRET=triton_interpreting(), num_warps=num_warps)
    return out
