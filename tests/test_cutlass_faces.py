"""The CUTLASS sm_90a faces of ``scaled_mm`` (row-scaled FP8) and ``block_scaled_mm`` (1x128 x 128x128 block-scaled
FP8) against the float64 formulas of their op tests -- GPU runs only (MGPT_TEST_DEVICE=cuda, an extension built
with CUTLASS); skipped elsewhere, where CI compiles the kernels to sm_90a objects instead.

A file of their own, run LAST by bench/device_check.sh: these kernels have not run on a GPU yet, and a fault in
one leaves the process's CUDA context unusable, which would fail every GPU test after it. Their CPU-side checks
(never chosen automatically, clear errors) stay in tests/test_scaled_mm.py and tests/test_block_scaled_mm.py.
"""

import pytest
import torch

import mgpt_ops
from conftest import DEVICE, rel_err
from mgpt_ops._backend import kernels_registered
from mgpt_ops.quant import block_gemm, block_scaled_mm, scaled_gemm, scaled_mm
import test_block_scaled_mm as block_tests
import test_scaled_mm as row_tests


def _needs(kernels, op):
    return pytest.mark.skipif(DEVICE != "cuda" or not kernels_registered("cuda", kernels),
                              reason=f"needs CUDA tensors and mgpt_ops._C built with CUTLASS (the cuda face of {op})")


@_needs(scaled_gemm.KERNELS, "scaled_mm")
def test_row_scaled_fp8():
    """Every output dtype, per-row / per-tensor scales, with and without bias; K = 1040 ends in a partial
    128-wide K tile."""
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        for M, per_row_a, per_row_b in ((1, True, True), (33, False, False), (300, True, False), (300, False, True)):
            a, b, sa, sb = row_tests.make(M, 264, 1040, row_tests.FP8, seed=M, per_row_a=per_row_a,
                                          per_row_b=per_row_b)
            bias = torch.randn(264, device=DEVICE) if M > 1 else None
            with mgpt_ops.use_backend("cuda"):
                out = scaled_mm(a, b, sa, sb, out_dtype=out_dtype, bias=bias)
            assert out.dtype == out_dtype and out.shape == (M, 264)
            want = row_tests.formula(a, b, sa, sb, torch.float64, bias)
            assert rel_err(out, want) < row_tests.TOL[out_dtype], (out_dtype, M)


@_needs(block_gemm.KERNELS["block_scaled_mm"], "block_scaled_mm")
def test_block_scaled_fp8():
    """Every output dtype, with and without bias, decode to prefill rows; N = 264 ends in a partial 128-block,
    K = 1040 in a partial 128-wide K block; scales spread over ~4 orders of magnitude."""
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        for M in (1, 33, 300, 4096):
            a, b, sa, sb = block_tests.make(M, 264, 1040, seed=M)
            bias = torch.randn(264, device=DEVICE) if M % 2 else None
            with mgpt_ops.use_backend("cuda"):
                out = block_scaled_mm(a, b, sa, sb, out_dtype=out_dtype, bias=bias)
            assert out.dtype == out_dtype and out.shape == (M, 264)
            assert rel_err(out, block_tests.formula(a, b, sa, sb, bias)) < block_tests.TOL[out_dtype], (out_dtype, M)
    torch.library.opcheck(torch.ops.mgpt.block_scaled_mm_kernel, (a, b, sa, sb, torch.float32, 128, None))
