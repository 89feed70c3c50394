"""Triton face of ``mgpt::quantize_per_row`` (formulas: ``mgpt_ops/quant/quantize.py``, whose
``quantize_rows_reference`` is the spec): one scale per row of ``x [R, K]``.

One program owns BLOCK_R rows and sweeps K twice in BLOCK_K chunks: first the fp32 row amax, then
``q = saturate(x / scale)``. The division uses ``div_rn`` (IEEE round-to-nearest; Triton's ``/`` is an
approximate division on NVIDIA GPUs) and the scale is the same fp32 product as the reference's, so scales and
quantised values are bit-identical to the reference. INT8 rounding is
round-half-to-even through the fp32 magic-number trick ``(y + 1.5 * 2^23) - 1.5 * 2^23`` (exact for
|y| < 2^22; y is clamped to +-127 first), which needs no libdevice call and also runs in the interpreter.
FP8: the Triton interpreter rounds in-kernel fp32 -> e4m3 casts wrongly (a known trap), so the kernel rounds
to the e4m3 grid itself in fp32 (``_round_to_e4m3``) and casts an exactly representable value: bit-identical
to the reference on GPU and under the interpreter.
``while`` loops: the Triton 3.6 interpreter cannot take a runtime bound in ``range``. Offsets are int64.
Imported only when the ``triton`` face runs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from mgpt_ops._backend import triton_interpreting
from mgpt_ops.quant.quantize import AMAX_FLOOR, INT8, INV_QMAX, QMAX

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
