"""Triton faces of ``mgpt::quantize_per_row``, ``mgpt::quantize_per_tensor`` and ``mgpt::quantize_fp8_blocks``
(formulas: ``mgpt_ops/quant/quantize.py``, whose ``quantize_*_reference`` functions are the spec).

Per row: one program owns BLOCK_R rows and sweeps K twice in BLOCK_K chunks: first the fp32 row amax, then
``q = saturate(x / scale)``. Per tensor, two launches: each program writes the amax of its rows to a partial
buffer, then each program of the second launch reduces all partials (a few hundred floats: cheaper than a third
launch), derives the one scale (program 0 stores it) and quantises its rows -- no atomics, deterministic.
Blocks (1 x g groups and 128 x 128 weight blocks): one program per quantisation block, or per TILE_R rows of
1-row groups; it sweeps its block twice in TILE_R x TILE_C tiles (amax, then quantise), so any block size
works with bounded registers. The division uses ``div_rn`` (IEEE round-to-nearest; Triton's ``/`` is an
approximate division on NVIDIA GPUs) and the scale is the same fp32 product as the reference's, so scales and
quantised values are bit-identical to the reference. INT8 rounding is
round-half-to-even through the fp32 magic-number trick ``(y + 1.5 * 2^23) - 1.5 * 2^23`` (exact for
|y| < 2^22; y is clamped to +-127 first), which needs no libdevice call and also runs in the interpreter.
FP8: the Triton interpreter rounds in-kernel fp32 -> e4m3 casts wrongly (a known trap), so the kernel rounds
to the e4m3 grid itself in fp32 (``_round_to_e4m3``) and casts an exactly representable value: bit-identical
to the reference on GPU and under the interpreter.
``while`` loops: the Triton 3.6 interpreter cannot take a runtime bound in ``range``. Offsets are int64 (row
indices are promoted before they multiply a stride).
Imported only when the ``triton`` face runs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from mgpt_ops._backend import triton_interpreting
from mgpt_ops.quant.quantize import AMAX_FLOOR, FP8, INT8, INV_QMAX, QMAX

_FLOOR = tl.constexpr(AMAX_FLOOR)
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23


@triton.jit
def _round_to_e4m3(y):
    """Round fp32 ``y`` (|y| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.

    e4m3 keeps 3 mantissa bits, so its step (ulp) at y is 2^(exponent(y) - 3), and 2^-9 throughout the
    subnormal range (exponent < -6). y / ulp and r * ulp are exact (powers of two), |y / ulp| < 16, and the
    magic-number addition rounds to an integer with ties to even. The exponent is read from the bits.
    (Multiplying by the exact reciprocal power of two avoids Triton's approximate GPU division.)"""
    biased_exp = (y.to(tl.int32, bitcast=True) >> 23) & 0xFF
    ulp_exp = tl.maximum(biased_exp, 127 - 6) - 3  # biased exponent of the step
    ulp = (ulp_exp << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((254 - ulp_exp) << 23).to(tl.float32, bitcast=True)  # 2^-(exponent of ulp), exact
    r = ((y * inv_ulp + _RNE_MAGIC) - _RNE_MAGIC) * ulp
    return tl.where(r == 0.0, y * 0.0, r)  # keep the sign of zero, as the reference's cast does (-0 stays -0)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, R, K, stride_xr, stride_xk, stride_qr, QMAX_: tl.constexpr,
                          INV_QMAX_: tl.constexpr, IS_INT: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xr
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    k0 = 0
    while k0 < K:
        k = k0 + cols
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=r_ok[:, None] & (k < K)[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        k0 += BLOCK_K
    scale = tl.maximum(amax, _FLOOR) * INV_QMAX_
    tl.store(scale_ptr + rows, scale, mask=r_ok)
    k0 = 0
    while k0 < K:
        k = k0 + cols
        mask = r_ok[:, None] & (k < K)[None, :]
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x, scale[:, None])
        y = tl.minimum(tl.maximum(y, -QMAX_), QMAX_)
        if IS_INT:
            q = ((y + _RNE_MAGIC) - _RNE_MAGIC).to(tl.int8)
        else:
            q = _round_to_e4m3(y).to(tl.float8e4nv)  # an exact value: no cast rounding involved
        tl.store(q_ptr + rows[:, None] * stride_qr + k[None, :], q, mask=mask)
        k0 += BLOCK_K


def _tiles(K: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps): whole rows up to 4096 wide per chunk on a GPU, one row per program."""
    if triton_interpreting():
        return 64, 256, 4
    block_k = min(4096, triton.next_power_of_2(max(K, 16)))
    return 1, block_k, (4 if block_k <= 1024 else 8)


def quantize_rows(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] float -> (q [R, K] in qdtype, scale fp32 [R, 1]); x may be strided."""
    R, K = x.shape
    q = torch.empty((R, K), dtype=qdtype, device=x.device)
    scale = torch.empty((R, 1), dtype=torch.float32, device=x.device)
    if R == 0:
        return q, scale
    block_r, block_k, num_warps = _tiles(K)
    grid = (triton.cdiv(R, block_r),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # launch on the data's GPU
        _quantize_rows_kernel[grid](x, q, scale, R, K, x.stride(0), x.stride(1), q.stride(0),
                                    QMAX_=QMAX[qdtype], INV_QMAX_=INV_QMAX[qdtype], IS_INT=qdtype == INT8,
                                    BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps)
    return q, scale


# --------------------------------------------------------------------------------------------------------
# Shared sweeps over a [r_lo, r_hi) x [c_lo, c_hi) region (per-tensor and block quantizers)
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _region_amax(x_ptr, r_lo, r_hi, c_lo, c_hi, stride_xr, stride_xk, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """fp32 amax of |x| per tile row position [TILE_R] (rows r_lo + i, r_lo + TILE_R + i, ... fold into i)."""
    amax = tl.zeros((TILE_R,), dtype=tl.float32)
    r0 = r_lo
    while r0 < r_hi:
        rows = r0 + tl.arange(0, TILE_R)
        r_ok = rows < r_hi
        c0 = c_lo
        while c0 < c_hi:
            cols = c0 + tl.arange(0, TILE_C)
            mask = r_ok[:, None] & (cols < c_hi)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xk, mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
            c0 += TILE_C
        r0 += TILE_R
    return amax


@triton.jit
def _region_quantize(x_ptr, q_ptr, scale, r_lo, r_hi, c_lo, c_hi, stride_xr, stride_xk, stride_qr,
                     QMAX_: tl.constexpr, IS_INT: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """q = saturate(x / scale) over the region; ``scale`` [TILE_R] per tile row position (as ``_region_amax``)."""
    r0 = r_lo
    while r0 < r_hi:
        rows = r0 + tl.arange(0, TILE_R)
        r_ok = rows < r_hi
        c0 = c_lo
        while c0 < c_hi:
            cols = c0 + tl.arange(0, TILE_C)
            mask = r_ok[:, None] & (cols < c_hi)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xk, mask=mask, other=0.0)
            y = tl.math.div_rn(x.to(tl.float32), scale[:, None])
            y = tl.minimum(tl.maximum(y, -QMAX_), QMAX_)
            if IS_INT:
                q = ((y + _RNE_MAGIC) - _RNE_MAGIC).to(tl.int8)
            else:
                q = _round_to_e4m3(y).to(tl.float8e4nv)
            tl.store(q_ptr + rows[:, None] * stride_qr + cols[None, :], q, mask=mask)
            c0 += TILE_C
        r0 += TILE_R


# --------------------------------------------------------------------------------------------------------
# Per tensor: amax partials, then reduce + quantise
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _tensor_amax_kernel(x_ptr, partial_ptr, R, K, rows_per_program, stride_xr, stride_xk, TILE_R: tl.constexpr,
                        TILE_C: tl.constexpr):
    pid = tl.program_id(0)
    r_lo = pid.to(tl.int64) * rows_per_program
    r_hi = tl.minimum(r_lo + rows_per_program, R)
    amax = _region_amax(x_ptr, r_lo, r_hi, 0, K, stride_xr, stride_xk, TILE_R, TILE_C)
    tl.store(partial_ptr + pid, tl.max(amax, axis=0))


@triton.jit
def _tensor_quantize_kernel(x_ptr, q_ptr, partial_ptr, scale_ptr, R, K, rows_per_program, n_partials, stride_xr,
                            stride_xk, stride_qr, QMAX_: tl.constexpr, INV_QMAX_: tl.constexpr, IS_INT: tl.constexpr,
                            TILE_R: tl.constexpr, TILE_C: tl.constexpr, TILE_P: tl.constexpr):
    pid = tl.program_id(0)
    amax = tl.zeros((TILE_P,), dtype=tl.float32)
    p0 = 0
    while p0 < n_partials:
        p = p0 + tl.arange(0, TILE_P)
        amax = tl.maximum(amax, tl.load(partial_ptr + p, mask=p < n_partials, other=0.0))
        p0 += TILE_P
    scale = tl.maximum(tl.max(amax, axis=0), _FLOOR) * INV_QMAX_
    if pid == 0:
        tl.store(scale_ptr, scale)
    r_lo = pid.to(tl.int64) * rows_per_program
    r_hi = tl.minimum(r_lo + rows_per_program, R)
    scales = tl.zeros((TILE_R,), dtype=tl.float32) + scale
    _region_quantize(x_ptr, q_ptr, scales, r_lo, r_hi, 0, K, stride_xr, stride_xk, stride_qr, QMAX_, IS_INT,
                     TILE_R, TILE_C)


def quantize_tensor(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] float (non-empty, any strides) -> (q [R, K] in qdtype, scale fp32 [1, 1])."""
    R, K = x.shape
    q = torch.empty((R, K), dtype=qdtype, device=x.device)
    scale = torch.empty((1, 1), dtype=torch.float32, device=x.device)
    tile_r, tile_c, max_programs = (16, 256, 64) if triton_interpreting() else (4, 512, 1024)
    rows_per_program = triton.cdiv(triton.cdiv(R, max_programs), tile_r) * tile_r
    programs = triton.cdiv(R, rows_per_program)
    partial = torch.empty(programs, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _tensor_amax_kernel[(programs,)](x, partial, R, K, rows_per_program, x.stride(0), x.stride(1),
                                         TILE_R=tile_r, TILE_C=tile_c)
        _tensor_quantize_kernel[(programs,)](x, q, partial, scale, R, K, rows_per_program, programs, x.stride(0),
                                             x.stride(1), q.stride(0), QMAX_=QMAX[qdtype],
                                             INV_QMAX_=INV_QMAX[qdtype], IS_INT=qdtype == INT8, TILE_R=tile_r,
                                             TILE_C=tile_c, TILE_P=triton.next_power_of_2(min(programs, 1024)))
    return q, scale


# --------------------------------------------------------------------------------------------------------
# Blocks: 1 x g groups (ROW_GROUPS) and br x bc blocks, FP8
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _quantize_blocks_kernel(x_ptr, q_ptr, scale_ptr, R, K, block_rows, block_cols, scale_cols, stride_xr,
                            stride_xk, stride_qr, QMAX_: tl.constexpr, INV_QMAX_: tl.constexpr,
                            ROW_GROUPS: tl.constexpr,
                            TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    c_lo = pid_c * block_cols
    c_hi = tl.minimum(c_lo + block_cols, K)
    if ROW_GROUPS:  # TILE_R rows, each row its own group (scale per row)
        r_lo = pid_r * TILE_R
        r_hi = tl.minimum(r_lo + TILE_R, R)
        scale = tl.maximum(_region_amax(x_ptr, r_lo, r_hi, c_lo, c_hi, stride_xr, stride_xk, TILE_R, TILE_C),
                           _FLOOR) * INV_QMAX_
        rows = r_lo + tl.arange(0, TILE_R)
        tl.store(scale_ptr + rows * scale_cols + pid_c, scale, mask=rows < R)
    else:  # one block_rows x block_cols block (one scale)
        r_lo = pid_r * block_rows
        r_hi = tl.minimum(r_lo + block_rows, R)
        amax = tl.max(_region_amax(x_ptr, r_lo, r_hi, c_lo, c_hi, stride_xr, stride_xk, TILE_R, TILE_C), axis=0)
        block_scale = tl.maximum(amax, _FLOOR) * INV_QMAX_
        tl.store(scale_ptr + pid_r * scale_cols + pid_c, block_scale)
        scale = tl.zeros((TILE_R,), dtype=tl.float32) + block_scale
    _region_quantize(x_ptr, q_ptr, scale, r_lo, r_hi, c_lo, c_hi, stride_xr, stride_xk, stride_qr, QMAX_, False, TILE_R,
                     TILE_C)


def quantize_blocks(x: torch.Tensor, block_rows: int, block_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] float (any strides) -> (q fp8 [R, K], scale fp32 [ceil(R/br), ceil(K/bc)])."""
    R, K = x.shape
    gr, gc = triton.cdiv(R, block_rows), triton.cdiv(K, block_cols)
    q = torch.empty((R, K), dtype=FP8, device=x.device)
    scale = torch.empty((gr, gc), dtype=torch.float32, device=x.device)
    if R == 0 or K == 0:
        return q, scale
    row_groups = block_rows == 1
    tile_c = min(triton.next_power_of_2(block_cols), 256 if triton_interpreting() else 128)
    if row_groups:
        tile_r = 32 if triton_interpreting() else 16
        grid = (triton.cdiv(R, tile_r), gc)
    else:
        tile_r = min(triton.next_power_of_2(block_rows), 128 if triton_interpreting() else 32)
        grid = (gr, gc)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _quantize_blocks_kernel[grid](x, q, scale, R, K, block_rows, block_cols, gc, x.stride(0), x.stride(1),
                                      q.stride(0), QMAX_=QMAX[FP8], INV_QMAX_=INV_QMAX[FP8], ROW_GROUPS=row_groups,
                                      TILE_R=tile_r, TILE_C=tile_c)
    return q, scale
