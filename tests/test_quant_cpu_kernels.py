"""C++ CPU kernels of the quantized GEMMs, called directly (torch.ops.mgpt.*_kernel), against float64 statements
written here from the published formulas (scales are dequantisation scales, x ≈ q * s):

    scaled_mm_kernel        out[m, n] = sa[m] sb[n] sum_k a[m, k] b[n, k] + bias[n]       (sa / sb: [1, 1] or per row)
    block_scaled_mm_kernel  out[m, n] = sum_k a[m, k] sa[m, k // B] b[n, k] sb[n // B, k // B] + bias[n]
    grouped_block_scaled_mm_kernel   rows offsets[e] .. offsets[e + 1] of out = the block product of those rows of a
                            with b[e] (scale_b[e]); no bias
    w4a16_mm_kernel         out = x @ ((code - z) * s).T, codes unpacked bit by bit here

Tolerances (norm-wise relative error, conftest.rel_err): fp32 output 1e-5 (fp8 values and their products are exact
in fp32; the K sums and, for the block kernels, the operand * scale products round once each), fp16 1e-3 and bf16
1e-2 (one rounding of the output). int8 is checked bit for bit: the int32 sum is exact, so with unit scales the
fp32 output equals the exact integer rounded once to fp32.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import conftest
import mgpt_ops  # noqa: F401  (loads the extension: schemas and CPU kernels; registers the kernels' fakes)
from conftest import rel_err

if conftest.DEVICE != "cpu":
    pytest.skip("tests of the C++ CPU kernels run only with CPU tensors", allow_module_level=True)
if not hasattr(torch.ops.mgpt, "scaled_mm_kernel"):
    pytest.fail("mgpt_ops._C is not built (or is stale): rebuild with pip install --no-build-isolation -e .")

SCALED = torch.ops.mgpt.scaled_mm_kernel
BLOCK = torch.ops.mgpt.block_scaled_mm_kernel
GROUPED = torch.ops.mgpt.grouped_block_scaled_mm_kernel
W4A16 = torch.ops.mgpt.w4a16_mm_kernel
FP8, INT8 = torch.float8_e4m3fn, torch.int8
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [1, 7, 33, 300]


# ------------------------------------------------------------------------------------------------------------
# Inputs and the float64 statements
# ------------------------------------------------------------------------------------------------------------
def operand(rows, cols, qdtype, gen):
    """Random non-zero-heavy quantized values: fp8 over most of its range, int8 over all of it."""
    if qdtype == INT8:
        return torch.randint(-128, 128, (rows, cols), generator=gen, dtype=torch.int8)
    return (torch.randn(rows, cols, generator=gen) * 60).clamp(-448, 448).to(FP8)


def positive(*shape, gen):
    return torch.rand(*shape, generator=gen) + 0.5


def scaled_statement(a, b, sa, sb, bias=None):
    out = (a.double() * sa.double()) @ (b.double() * sb.double()).T
    return out if bias is None else out + bias.double()


def per_element(scale, rows, cols, block_rows, block_cols):
    """Block scales -> one per element: entry [i, j] = scale[i // block_rows, j // block_cols]."""
    return scale.double()[torch.arange(rows) // block_rows][:, torch.arange(cols) // block_cols]


def block_statement(a, b, sa, sb, block, bias=None):
    (m, k), n = a.shape, b.shape[0]
    out = (a.double() * per_element(sa, m, k, 1, block)) @ (b.double() * per_element(sb, n, k, block, block)).T
    return out if bias is None else out + bias.double()


def block_inputs(m, n, k, block, gen):
    kb, nb = -(-k // block), -(-n // block)
    # Scales ~1e-2 keep the outputs well inside fp16's range.
    sa, sb = positive(m, kb, gen=gen) * 1e-2, positive(nb, kb, gen=gen) * 1e-2
    return operand(m, k, FP8, gen), operand(n, k, FP8, gen), sa, sb


# ------------------------------------------------------------------------------------------------------------
# scaled_mm_kernel
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qdtype", [FP8, INT8])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("per_row", [(True, True), (False, True), (True, False)])
def test_scaled_matches_statement(qdtype, m, per_row):
    gen = torch.Generator().manual_seed(m)
    n, k = 197, 301  # neither a multiple of 8 nor of the 64-row weight panels
    a, b = operand(m, k, qdtype, gen), operand(n, k, qdtype, gen)
    sa = positive(m if per_row[0] else 1, 1, gen=gen) * 1e-3
    sb = positive(n if per_row[1] else 1, 1, gen=gen) * 1e-3
    bias = torch.randn(n, generator=gen)
    out = SCALED(a, b, sa, sb, torch.float32, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_err(out, scaled_statement(a, b, sa, sb, bias)) < TOL[torch.float32]


@pytest.mark.parametrize("qdtype", [FP8, INT8])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_scaled_out_and_bias_dtypes(qdtype, out_dtype, bias_dtype):
    gen = torch.Generator().manual_seed(1)
    a, b = operand(33, 130, qdtype, gen), operand(70, 130, qdtype, gen)
    sa, sb = positive(33, 1, gen=gen) * 1e-2, positive(70, 1, gen=gen) * 1e-2
    bias = None if bias_dtype is None else (torch.randn(70, generator=gen) * 4).to(bias_dtype)
    out = SCALED(a, b, sa, sb, out_dtype, bias)
    assert out.dtype == out_dtype
    assert rel_err(out, scaled_statement(a, b, sa, sb, bias)) < TOL[out_dtype]


def test_int8_sums_are_exact():
    """Sums far above 2^24 (where fp32 accumulation would round) up to the int32 limit: with unit scales the fp32
    output is exactly the exact integer rounded once."""
    gen = torch.Generator().manual_seed(2)
    k = 131071  # the largest K the op allows: K * 128^2 <= 2^31 - 1
    a = torch.randint(40, 128, (3, k), generator=gen, dtype=torch.int8)
    b = torch.randint(40, 128, (5, k), generator=gen, dtype=torch.int8)
    a[0], b[0] = -128, -128  # out[0, 0] = 131071 * 16384 = 2^31 - 16384
    one = torch.ones(1, 1)
    out = SCALED(a, b, one, one, torch.float32, None)
    exact = a.long() @ b.long().T
    assert exact.abs().max() > 2**30 and exact[0, 0] == k * 128 * 128
    assert torch.equal(out, exact.to(torch.float32))


def test_every_fp8_code():
    """All 256 bit patterns decode to their fp8 value (subnormals, zeros, +-448); 0x7F / 0xFF give NaN. (The sign
    of a zero does not survive a sum of products, so -0 comes out as 0, as from any GEMM.)"""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).reshape(256, 1)
    one = torch.ones(1, 1)
    out = SCALED(codes, one.to(FP8), one, one, torch.float32, None)[:, 0]
    want = codes.float()[:, 0]
    assert torch.equal(out.isnan(), want.isnan()) and want.isnan().sum() == 2
    finite = ~want.isnan()
    assert torch.equal(out[finite], want[finite])


def test_scaled_empty_shapes_and_k_zero():
    gen = torch.Generator().manual_seed(3)
    a, b = operand(4, 16, FP8, gen), operand(6, 16, FP8, gen)
    one = torch.ones(1, 1)
    assert SCALED(a[:0], b, one, one, torch.bfloat16, None).shape == (0, 6)
    assert SCALED(a, b[:0], one, one, torch.bfloat16, None).shape == (4, 0)
    bias = torch.randn(6, generator=gen)
    out = SCALED(a[:, :0], b[:, :0], one, one, torch.float32, bias)  # empty sums: the output is the bias
    assert torch.equal(out, bias.expand(4, 6))


def test_scaled_strided_operands_and_repeatable():
    gen = torch.Generator().manual_seed(4)
    a = operand(150, 40, FP8, gen).T  # [40, 150] column-major
    b = operand(130, 300, FP8, gen)[::2, ::2]  # [65, 150]
    sa, sb = positive(40, 1, gen=gen), positive(65, 1, gen=gen)
    out = SCALED(a, b, sa, sb, torch.float32, None)
    assert rel_err(out, scaled_statement(a, b, sa, sb)) < TOL[torch.float32]
    assert torch.equal(out, SCALED(a, b, sa, sb, torch.float32, None))  # no schedule-dependent sums


# ------------------------------------------------------------------------------------------------------------
# block_scaled_mm_kernel
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", [(197, 301), (128, 256), (5, 129)])
def test_block_matches_statement(m, n, k):
    """Partial last blocks in N and K (197 = 128 + 69, 301 = 2 * 128 + 45) as well as exact multiples."""
    gen = torch.Generator().manual_seed(m + n)
    a, b, sa, sb = block_inputs(m, n, k, 128, gen)
    bias = torch.randn(n, generator=gen)
    out = BLOCK(a, b, sa, sb, torch.float32, 128, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_err(out, block_statement(a, b, sa, sb, 128, bias)) < TOL[torch.float32]


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16])
def test_block_out_dtypes(out_dtype, bias_dtype):
    gen = torch.Generator().manual_seed(5)
    a, b, sa, sb = block_inputs(33, 150, 260, 128, gen)
    bias = None if bias_dtype is None else torch.randn(150, generator=gen).to(bias_dtype)
    out = BLOCK(a, b, sa, sb, out_dtype, 128, bias)
    assert out.dtype == out_dtype
    assert rel_err(out, block_statement(a, b, sa, sb, 128, bias)) < TOL[out_dtype]


def test_block_scales_are_per_block():
    """One huge scale in a single weight block / activation group changes exactly the outputs it should."""
    gen = torch.Generator().manual_seed(6)
    a, b, sa, sb = block_inputs(7, 200, 300, 128, gen)
    sb[1, 2] = 1e4  # weight rows 128..199, columns 256..299
    sa[3, 0] = 1e-4  # activation row 3, columns 0..127
    out = BLOCK(a, b, sa, sb, torch.float32, 128, None)
    assert rel_err(out, block_statement(a, b, sa, sb, 128)) < TOL[torch.float32]


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 300), k=st.integers(1, 400), block=st.sampled_from([128, 64, 32]),
       seed=st.integers(0, 99))
def test_block_random_shapes(m, n, k, block, seed):
    """Any block size works in the kernel (the public op accepts only 128)."""
    gen = torch.Generator().manual_seed(seed)
    a, b, sa, sb = block_inputs(m, n, k, block, gen)
    out = BLOCK(a, b, sa, sb, torch.float32, block, None)
    assert rel_err(out, block_statement(a, b, sa, sb, block)) < TOL[torch.float32]


# ------------------------------------------------------------------------------------------------------------
# grouped_block_scaled_mm_kernel
# ------------------------------------------------------------------------------------------------------------
def grouped_inputs(rows_per_expert, n, k, gen, offsets_dtype=torch.int64):
    experts, m = len(rows_per_expert), sum(rows_per_expert)
    kb, nb = -(-k // 128), -(-n // 128)
    a, sa = operand(m, k, FP8, gen), positive(m, kb, gen=gen) * 1e-2
    b = torch.stack([operand(n, k, FP8, gen) for _ in range(experts)])
    sb = positive(experts, nb, kb, gen=gen) * 1e-2
    offsets = torch.tensor([0, *torch.tensor(rows_per_expert).cumsum(0).tolist()], dtype=offsets_dtype)
    return a, b, sa, sb, offsets


def grouped_statement(a, b, sa, sb, offsets):
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float64)
    bounds = offsets.tolist()
    for e in range(b.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        out[lo:hi] = block_statement(a[lo:hi], b[e], sa[lo:hi], sb[e], 128)
    return out


@pytest.mark.parametrize("rows_per_expert", [[3, 0, 33, 1], [300], [0, 0, 7], [1, 1, 1, 1, 1, 1]])
@pytest.mark.parametrize("offsets_dtype", [torch.int64, torch.int32])
def test_grouped_matches_statement(rows_per_expert, offsets_dtype):
    gen = torch.Generator().manual_seed(sum(rows_per_expert))
    a, b, sa, sb, offsets = grouped_inputs(rows_per_expert, 197, 301, gen, offsets_dtype)
    out = GROUPED(a, b, sa, sb, offsets, torch.float32, 128)
    assert out.shape == (sum(rows_per_expert), 197)
    assert rel_err(out, grouped_statement(a, b, sa, sb, offsets)) < TOL[torch.float32]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_grouped_out_dtypes_and_no_rows(out_dtype):
    gen = torch.Generator().manual_seed(7)
    a, b, sa, sb, offsets = grouped_inputs([5, 9, 2], 70, 140, gen)
    out = GROUPED(a, b, sa, sb, offsets, out_dtype, 128)
    assert out.dtype == out_dtype and rel_err(out, grouped_statement(a, b, sa, sb, offsets)) < TOL[out_dtype]
    empty = GROUPED(a[:0], b, sa[:0], sb, torch.zeros(4, dtype=torch.int64), out_dtype, 128)
    assert empty.shape == (0, 70)


# ------------------------------------------------------------------------------------------------------------
# w4a16_mm_kernel (the public op's cpu face is tested in test_w4a16.py)
# ------------------------------------------------------------------------------------------------------------
def int4_statement(x, qweight, scales, zeros, group):
    words = qweight.long() % 2**32
    codes = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(qweight.shape[0], -1)
    z = 8.0 if zeros is None else zeros.double().repeat_interleave(group, dim=1)
    w_hat = (codes.double() - z) * scales.double().repeat_interleave(group, dim=1)
    return x.double() @ w_hat.T


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_w4a16_matches_statement(m, dtype, symmetric):
    gen = torch.Generator().manual_seed(m)
    n, k, group = 197, 384, 64
    qweight = torch.randint(-2**31, 2**31 - 1, (n, k // 8), generator=gen, dtype=torch.int32)
    scales = (torch.rand(n, k // group, generator=gen) * 0.1 + 0.01).to(dtype)
    zeros = None if symmetric else torch.randint(0, 16, (n, k // group), generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    out = W4A16(x, qweight, scales, zeros, group)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, int4_statement(x, qweight, scales, zeros, group)) < TOL[dtype]


# ------------------------------------------------------------------------------------------------------------
# Op contract of the kernels that have fakes (the public ops are opchecked in their own test files)
# ------------------------------------------------------------------------------------------------------------
def test_opcheck_kernels():
    gen = torch.Generator().manual_seed(8)
    ai, bi = operand(7, 72, INT8, gen), operand(40, 72, INT8, gen)
    sa, sb = positive(7, 1, gen=gen), positive(40, 1, gen=gen)
    torch.library.opcheck(SCALED, (ai, bi, sa, sb, torch.bfloat16, torch.randn(40, generator=gen)))
    # fp8 inputs: opcheck's schema test compares inputs with allclose, which has no fp8 kernel on the CPU.
    a8, b8 = operand(7, 72, FP8, gen), operand(40, 72, FP8, gen)
    torch.library.opcheck(SCALED, (a8, b8, sa[:1], sb, torch.float32, None),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    qweight = torch.randint(-2**31, 2**31 - 1, (20, 16), generator=gen, dtype=torch.int32)
    scales, zeros = positive(20, 2, gen=gen), torch.randint(0, 16, (20, 2), generator=gen).float()
    torch.library.opcheck(W4A16, (torch.randn(3, 128, generator=gen), qweight, scales, zeros, 64))
    fp8_utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    a8, b8 = operand(7, 200, FP8, gen), operand(130, 200, FP8, gen)
    torch.library.opcheck(BLOCK, (a8, b8, positive(7, 2, gen=gen), positive(2, 2, gen=gen), torch.float32, 128,
                                  None), test_utils=fp8_utils)
    experts = torch.stack([operand(130, 200, FP8, gen) for _ in range(3)])
    offsets = torch.tensor([0, 3, 3, 7])
    torch.library.opcheck(GROUPED, (a8, experts, positive(7, 2, gen=gen), positive(3, 2, 2, gen=gen), offsets,
                                    torch.bfloat16, 128), test_utils=fp8_utils)


# ------------------------------------------------------------------------------------------------------------
# The kernels' own checks (second line of defence behind the Python wrappers): one test per error
# ------------------------------------------------------------------------------------------------------------
def scaled_args(**over):
    gen = torch.Generator().manual_seed(9)
    args = dict(a=operand(7, 72, FP8, gen), b=operand(40, 72, FP8, gen), scale_a=positive(7, 1, gen=gen),
                scale_b=positive(40, 1, gen=gen), out_dtype=torch.float32, bias=None)
    args.update(over)
    return tuple(args.values())


def block_args(**over):
    gen = torch.Generator().manual_seed(10)
    a, b, sa, sb = block_inputs(7, 200, 300, 128, gen)
    args = dict(a=a, b=b, scale_a=sa, scale_b=sb, out_dtype=torch.float32, block=128, bias=None)
    args.update(over)
    return tuple(args.values())


def grouped_args(**over):
    gen = torch.Generator().manual_seed(11)
    a, b, sa, sb, offsets = grouped_inputs([3, 4], 70, 140, gen)
    args = dict(a=a, b=b, scale_a=sa, scale_b=sb, offsets=offsets, out_dtype=torch.float32, block=128)
    args.update(over)
    return tuple(args.values())


def w4a16_args(**over):
    gen = torch.Generator().manual_seed(12)
    args = dict(x=torch.randn(3, 128, generator=gen), qweight=torch.zeros(20, 16, dtype=torch.int32),
                scales=positive(20, 2, gen=gen), zeros=None, group_size=64)
    args.update(over)
    return tuple(args.values())


BAD_CALLS = [
    (SCALED, lambda: scaled_args(a=torch.ones(7, 72)), "'a' must have dtype Float8_e4m3fn or Char"),
    (SCALED, lambda: scaled_args(b=torch.ones(40, 72, dtype=INT8)), "'a' and 'b' must share one dtype"),
    (SCALED, lambda: scaled_args(b=torch.ones(40, 71).to(FP8)), "'b' must be the weight \\[N, K\\] with K = 72"),
    (SCALED, lambda: scaled_args(scale_a=torch.ones(6, 1)), "'scale_a' must have shape \\[1, 1\\] or \\[7, 1\\]"),
    (SCALED, lambda: scaled_args(scale_b=torch.ones(1, 40)), "'scale_b' must have shape \\[1, 1\\] or \\[40, 1\\]"),
    (SCALED, lambda: scaled_args(scale_b=torch.ones(40, 1, dtype=torch.float64)), "'scale_b' must have dtype Float"),
    (SCALED, lambda: scaled_args(out_dtype=torch.float64), "'out_dtype' must be float32, bfloat16 or float16"),
    (SCALED, lambda: scaled_args(bias=torch.ones(39)), "'bias' must have shape \\[40\\]"),
    (SCALED, lambda: scaled_args(a=torch.ones(1, 131072, dtype=INT8), b=torch.ones(2, 131072, dtype=INT8),
                                 scale_a=torch.ones(1, 1), scale_b=torch.ones(1, 1)), "int8 operands need K <= 131071"),
    (BLOCK, lambda: block_args(a=torch.ones(7, 300, dtype=INT8)), "'a' must have dtype Float8_e4m3fn, got Char"),
    (BLOCK, lambda: block_args(block=0), "'block' must be >= 1"),
    (BLOCK, lambda: block_args(scale_a=torch.ones(7, 2)), "'scale_a' must have shape \\[7, 3\\], got \\[7, 2\\]"),
    (BLOCK, lambda: block_args(scale_b=torch.ones(1, 3)), "'scale_b' must have shape \\[2, 3\\]"),
    (GROUPED, lambda: grouped_args(b=torch.ones(2, 70, 141).to(FP8)), "'b' must be the expert weights \\[E, N, K\\]"),
    (GROUPED, lambda: grouped_args(scale_b=torch.ones(2, 1, 1)), "'scale_b' must have shape \\[2, 1, 2\\]"),
    (GROUPED, lambda: grouped_args(offsets=torch.tensor([0, 3])), "'offsets' must have shape \\[E \\+ 1\\] = \\[3\\]"),
    (GROUPED, lambda: grouped_args(offsets=torch.tensor([0.0, 3.0, 7.0])), "'offsets' must have dtype int64 or int32"),
    (GROUPED, lambda: grouped_args(offsets=torch.tensor([1, 3, 7])), "'offsets' must start at 0, got 1"),
    (GROUPED, lambda: grouped_args(offsets=torch.tensor([0, 5, 4])), "must be non-decreasing, got offsets\\[1\\] = 5"),
    (GROUPED, lambda: grouped_args(offsets=torch.tensor([0, 3, 6])), "'offsets' must end at M_total = 7"),
    (W4A16, lambda: w4a16_args(x=torch.ones(3, 128, dtype=torch.float64)), "'x' must have dtype float32, bfloat16"),
    (W4A16, lambda: w4a16_args(group_size=48), "'group_size' must be a positive multiple of 8 that divides K = 128"),
    (W4A16, lambda: w4a16_args(qweight=torch.zeros(20, 16, dtype=torch.int64)), "'qweight' must have dtype Int"),
    (W4A16, lambda: w4a16_args(qweight=torch.zeros(20, 15, dtype=torch.int32)),
     "'qweight' must have shape \\[20, 16\\]"),
    (W4A16, lambda: w4a16_args(scales=torch.ones(20, 3)), "'scales' must have shape \\[20, 2\\]"),
    (W4A16, lambda: w4a16_args(zeros=torch.ones(20, 2, dtype=torch.float16)), "'zeros' must have dtype Float"),
]


@pytest.mark.parametrize("case", range(len(BAD_CALLS)))
def test_kernel_rejects_bad_input(case):
    kernel, make_args, message = BAD_CALLS[case]
    with pytest.raises(RuntimeError, match=message):
        kernel(*make_args())
