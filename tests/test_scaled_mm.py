"""mgpt.scaled_mm against the float64 formula written here: out = (a * scale_a) @ (b * scale_b).T + bias, cast
once to out_dtype. Operands are random FP8 / INT8 values (never zeros-only), scales random positive fp32.
Tolerances (relative, norm-wise): fp32 output 1e-5 (fp8 products are exact in fp32; only the K-sum rounds),
fp16 output 1e-3, bf16 output 1e-2 (one rounding of the result: 2^-9 relative)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE, faces_here, rel_err
from hopper_compile import SHARED_MEMORY_PER_BLOCK, compile_in_subprocess
import mgpt_ops
from mgpt_ops._backend import choose_backend, kernels_registered
from mgpt_ops.quant import quantize_fp8_per_token, quantize_int8_per_token, quantize_weight_per_channel, scaled_mm
from mgpt_ops.quant import scaled_gemm

# The cuda face (CUTLASS, fp8 with aligned K only) has its own tests below; it is never chosen automatically.
FACES = faces_here(("reference", "triton", "cpu"))
FP8, INT8 = torch.float8_e4m3fn, torch.int8
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def formula(a, b, scale_a, scale_b, out_dtype, bias=None):
    out = (a.cpu().double() * scale_a.cpu().double()) @ (b.cpu().double() * scale_b.cpu().double()).T
    if bias is not None:
        out = out + bias.cpu().double()
    return out.to(out_dtype)


def random_operand(rows, cols, qdtype, g):
    if qdtype == INT8:
        return torch.randint(-128, 128, (rows, cols), generator=g, dtype=torch.int8).to(DEVICE)
    return (torch.randn(rows, cols, generator=g) * 60).clamp(-448, 448).to(FP8).to(DEVICE)


def random_scale(rows, g, magnitude=1.0):
    return (torch.rand(rows, 1, generator=g) + 0.5).mul(magnitude).to(DEVICE)


def make(M, N, K, qdtype, seed, per_row_a=True, per_row_b=True, magnitude=1e-3):
    g = torch.Generator().manual_seed(seed)
    a, b = random_operand(M, K, qdtype, g), random_operand(N, K, qdtype, g)
    sa = random_scale(M if per_row_a else 1, g, magnitude)
    sb = random_scale(N if per_row_b else 1, g, magnitude)
    return a, b, sa, sb


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
@pytest.mark.parametrize("M", [1, 7, 33, 130])
@pytest.mark.parametrize("per_row_a,per_row_b", [(True, True), (False, False), (True, False), (False, True)])
def test_matches_formula(face, qdtype, M, per_row_a, per_row_b):
    a, b, sa, sb = make(M, 72, 200, qdtype, seed=M, per_row_a=per_row_a, per_row_b=per_row_b)
    bias = torch.randn(72, device=DEVICE)
    with mgpt_ops.use_backend(face):
        out = scaled_mm(a, b, sa, sb, out_dtype=torch.float32, bias=bias if M % 2 else None)
    assert out.shape == (M, 72) and out.dtype == torch.float32
    assert rel_err(out, formula(a, b, sa, sb, torch.float64, bias if M % 2 else None)) < TOL[torch.float32]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
def test_prefill_size_m4096(face, qdtype):
    """M = 4096 tokens (a prefill / training micro-batch): many row tiles, per-token scales all distinct."""
    a, b, sa, sb = make(4096, 40, 136, qdtype, seed=4096)
    with mgpt_ops.use_backend(face):
        out = scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)
    assert rel_err(out, formula(a, b, sa, sb, torch.float64)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_out_dtypes_and_bias(face, qdtype, out_dtype, bias_dtype):
    a, b, sa, sb = make(33, 72, 200, qdtype, seed=2)
    bias = None if bias_dtype is None else (torch.randn(72) * 4).to(bias_dtype).to(DEVICE)
    with mgpt_ops.use_backend(face):
        out = scaled_mm(a, b, sa, sb, out_dtype=out_dtype, bias=bias)
    assert out.dtype == out_dtype
    assert rel_err(out, formula(a, b, sa, sb, torch.float64, bias)) < TOL[out_dtype]


@pytest.mark.parametrize("face", FACES)
def test_per_tensor_scale_shapes(face):
    """0-d, [1] and [1, 1] scales all mean per-tensor."""
    a, b, sa, sb = make(7, 72, 200, FP8, seed=3, per_row_a=False, per_row_b=False)
    with mgpt_ops.use_backend(face):
        want = scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
        for sa_, sb_ in ((sa.reshape(()), sb.reshape(1)), (sa.reshape(1), sb.reshape(()))):
            assert torch.equal(scaled_mm(a, b, sa_, sb_, out_dtype=torch.float32), want)
    assert rel_err(want, formula(a, b, sa, sb, torch.float64)) < TOL[torch.float32]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
@pytest.mark.parametrize("magnitude", [1e-18, 1e15])
def test_tiny_and_huge_scales(face, qdtype, magnitude):
    """Scale products of 1e-36 and 1e30: the fp32 epilogue must neither flush nor overflow."""
    a, b, sa, sb = make(7, 72, 200, qdtype, seed=4, magnitude=magnitude)
    with mgpt_ops.use_backend(face):
        out = scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert rel_err(out, formula(a, b, sa, sb, torch.float64)) < TOL[torch.float32]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
def test_saturated_operands(face, qdtype):
    """Every operand at the format's extremes (+-448; int8 -128 and 127): the largest accumulators there are."""
    g = torch.Generator().manual_seed(6)
    lo, hi = (-448.0, 448.0) if qdtype == FP8 else (-128, 127)
    pick = lambda r, c: torch.where(torch.rand(r, c, generator=g) < 0.5, lo, hi)  # noqa: E731
    a = pick(33, 300).to(qdtype).to(DEVICE)
    b = pick(72, 300).to(qdtype).to(DEVICE)
    b[0] = hi  # one column of out at the maximum |sum| for rows of a that are all hi
    a[0] = hi
    sa, sb = random_scale(33, g), random_scale(72, g)
    with mgpt_ops.use_backend(face):
        out = scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
    assert rel_err(out, formula(a, b, sa, sb, torch.float64)) < TOL[torch.float32]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
def test_strided_operands(face, qdtype):
    """Transposed / sliced views are read through their strides (no copy needed)."""
    g = torch.Generator().manual_seed(8)
    a = random_operand(200, 33, qdtype, g).T  # [33, 200], column-major
    b = random_operand(144, 400, qdtype, g)[::2, ::2]  # [72, 200] with strides (800, 2)
    sa, sb = random_scale(33, g), random_scale(72, g)
    with mgpt_ops.use_backend(face):
        out = scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
    assert rel_err(out, formula(a, b, sa, sb, torch.float64)) < TOL[torch.float32]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
def test_quantized_linear_end_to_end(face, qdtype):
    """Quantize x per token and w per channel, multiply: close to x @ w.T (fp8 ~4% / int8 ~1.5% relative) and
    exactly the formula on the quantized values; zero rows of x give zero (+ bias) rows of out."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(33, 200, generator=g).to(DEVICE)
    x[5] = 0
    w = (torch.randn(72, 200, generator=g) * 0.05).to(DEVICE)
    bias = torch.randn(72, generator=g).to(DEVICE)
    with mgpt_ops.use_backend(face):
        qx, sx = (quantize_fp8_per_token if qdtype == FP8 else quantize_int8_per_token)(x)
        qw, sw = quantize_weight_per_channel(w, qdtype)
        out = scaled_mm(qx, qw, sx, sw, out_dtype=torch.float32, bias=bias)
    assert rel_err(out, formula(qx, qw, sx, sw, torch.float64, bias)) < TOL[torch.float32]
    assert rel_err(out - bias, x.double() @ w.double().T) < (0.06 if qdtype == FP8 else 0.02)
    assert torch.equal(out[5].cpu(), bias.cpu())


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
def test_scale_b_as_row_vector(face, qdtype):
    """Per-channel weight scales given as [1, N] (torch._scaled_mm's convention) mean the same as [N, 1]."""
    a, b, sa, sb = make(33, 72, 200, qdtype, seed=15)
    with mgpt_ops.use_backend(face):
        out = scaled_mm(a, b, sa, sb.T, out_dtype=torch.float32)
        assert torch.equal(out, scaled_mm(a, b, sa, sb, out_dtype=torch.float32))
    assert rel_err(out, formula(a, b, sa, sb, torch.float64)) < TOL[torch.float32]


def test_cuda_face_runs_only_when_pinned():
    """The CUTLASS kernel (unverified on a GPU so far) is never the automatic choice on CUDA; pinning it where it
    cannot run is an error, never a silent fallback."""
    assert choose_backend("scaled_mm", torch.device("cuda"), scaled_gemm.FACES, scaled_gemm.PREFERENCE,
                          scaled_gemm.KERNELS) == "triton"
    if DEVICE == "cpu":
        a, b, sa, sb = make(7, 72, 208, FP8, seed=16)
        with mgpt_ops.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda'"):
            scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
    elif kernels_registered("cuda", scaled_gemm.KERNELS):
        a, b, sa, sb = make(7, 72, 200, FP8, seed=16)  # K % 16 != 0: TMA cannot load the rows
        with mgpt_ops.use_backend("cuda"), pytest.raises(RuntimeError, match="needs K % 16 == 0"):
            scaled_mm(a, b, sa, sb, out_dtype=torch.float32)


@pytest.mark.parametrize("per_row", [False, True])
def test_same_as_torch_scaled_mm(per_row):
    """The documented equivalence: scaled_mm(a, b, sa, sb) == torch._scaled_mm(a, b.T, sa, sb.T)."""
    a, b, sa, sb = make(32, 48, 64, FP8, seed=10, per_row_a=per_row, per_row_b=per_row)
    ours = scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)
    try:
        theirs = torch._scaled_mm(a, b.T, sa, sb.T, out_dtype=torch.bfloat16)
    except RuntimeError as error:  # torch < 2.13 on the CPU: per-tensor scales only
        if per_row and DEVICE == "cpu" and "only supports per-tensor scaling" in str(error):
            pytest.skip(f"torch {torch.__version__}'s _scaled_mm on the CPU takes per-tensor scales only")
        raise
    assert rel_err(ours, theirs) < TOL[torch.bfloat16]
    # The same scale tensors torch._scaled_mm takes ([1, N] per-channel) are accepted as they are.
    assert torch.equal(scaled_mm(a, b, sa, sb.T, out_dtype=torch.bfloat16), ours)


@settings(max_examples=10, deadline=None)
@given(M=st.integers(1, 40), N=st.integers(1, 150), K=st.integers(1, 300), seed=st.integers(0, 99),
       qdtype=st.sampled_from([FP8, INT8]))
def test_hypothesis_shapes(M, N, K, seed, qdtype):
    a, b, sa, sb = make(M, N, K, qdtype, seed=seed)
    for face in FACES:
        with mgpt_ops.use_backend(face):
            out = scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
        assert rel_err(out, formula(a, b, sa, sb, torch.float64)) < TOL[torch.float32]


# opcheck's test_schema detects input mutation with torch.allclose, which has no CPU kernel for float8 inputs;
# for FP8 the other opcheck utilities run and the no-mutation / no-alias contract is checked bitwise here.
OPCHECK_UTILS = {INT8: ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
                 FP8: ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")}


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
def test_opcheck(face, qdtype):
    a, b, sa, sb = make(7, 72, 200, qdtype, seed=11)
    bias = torch.randn(72, device=DEVICE)
    calls = [(a, b, sa, sb, torch.bfloat16, None), (a, b, sa[:1], sb, torch.float32, bias)]
    with mgpt_ops.use_backend(face):
        for args in calls:
            torch.library.opcheck(torch.ops.mgpt.scaled_mm.default, args, test_utils=OPCHECK_UTILS[qdtype])
            before = [t.clone() for t in args if isinstance(t, torch.Tensor)]
            out = torch.ops.mgpt.scaled_mm.default(*args)
            after = [t for t in args if isinstance(t, torch.Tensor)]
            assert all(torch.equal(x.view(torch.uint8) if x.dtype == FP8 else x, y.view(torch.uint8) if y.dtype == FP8
                                   else y) for x, y in zip(before, after))
            assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in after)


@pytest.mark.parametrize("face", FACES)
def test_torch_compile_fullgraph(face):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(33, 200, generator=g).to(DEVICE)
    w = torch.randn(72, 200, generator=g).to(DEVICE)
    bias = torch.randn(72, generator=g).to(DEVICE)

    def linear_fp8(x, w, bias):
        qx, sx = quantize_fp8_per_token(x)
        qw, sw = quantize_weight_per_channel(w)
        return scaled_mm(qx, qw, sx, sw, out_dtype=torch.bfloat16, bias=bias) * 2

    compiled = torch.compile(linear_fp8, fullgraph=True)
    with mgpt_ops.use_backend(face):
        eager, traced = linear_fp8(x, w, bias), compiled(x, w, bias)
    assert torch.equal(eager, traced)


def test_not_differentiable():
    a, b, sa, sb = make(7, 72, 200, FP8, seed=13)
    bias = torch.randn(72, device=DEVICE, requires_grad=True)
    out = scaled_mm(a, b, sa.requires_grad_(True), sb, out_dtype=torch.float32, bias=bias)
    assert not out.requires_grad


def bad_cases():
    a, b, sa, sb = make(7, 72, 200, FP8, seed=14)
    ai, bi, _, _ = make(7, 72, 200, INT8, seed=14)
    ok = dict(a=a, b=b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, bias=None)
    return [
        (dict(a=a.float()), TypeError, "'a' must have dtype"),
        (dict(b=bi), TypeError, "'a' and 'b' must share one dtype"),
        (dict(a=ai, b=b), TypeError, "'a' and 'b' must share one dtype"),
        (dict(a=a[None]), ValueError, "'a' must have 2 dimension"),
        (dict(b=b[:, :100]), ValueError, "'b' must be the weight \\[N, K\\] with K=200"),
        (dict(scale_a=sa[:6]), ValueError, "'scale_a' must have shape \\[1, 1\\] .* or \\[7, 1\\]"),
        (dict(scale_a=sa.expand(7, 2)), ValueError, "'scale_a' must have shape"),
        (dict(scale_b=sb[:71].T), ValueError, "'scale_b' must have shape \\[1, 1\\] .* or \\[72, 1\\] or \\[1, 72\\]"),
        (dict(scale_b=sb.half()), TypeError, "'scale_b' must have dtype"),
        (dict(out_dtype=torch.float64), TypeError, "'out_dtype' must be one of"),
        (dict(out_dtype=torch.int8), TypeError, "'out_dtype' must be one of"),
        (dict(bias=torch.randn(71, device=DEVICE)), ValueError, "'bias' must have shape \\[72\\]"),
        (dict(bias=torch.randn(72, dtype=torch.float64, device=DEVICE)), TypeError, "'bias' must have dtype"),
        (dict(a=torch.ones(1, 131073, dtype=INT8, device=DEVICE), b=torch.ones(72, 131073, dtype=INT8, device=DEVICE),
              scale_a=sa[:1]), ValueError, "int8 operands need K <= 131071"),
    ], ok


@pytest.mark.parametrize("case", range(14))
def test_bad_input(case):
    cases, ok = bad_cases()
    over, exc, msg = cases[case]
    args = {**ok, **over}
    with pytest.raises(exc, match=msg):
        scaled_mm(args.pop("a"), args.pop("b"), args.pop("scale_a"), args.pop("scale_b"), **args)


# ------------------------------------------------------------------------------------------------------------
# the compiled (non-interpreted) kernel: compiled for Hopper as launched (tests/hopper_compile.py)
# ------------------------------------------------------------------------------------------------------------
_LAUNCHES = """
from mgpt_ops.quant import scaled_gemm_triton as kt
PATTERNS = {"fp8 wgmma": r"wgmma[.a-z0-9_]*\\.e4m3\\.e4m3", "int8 wgmma": r"wgmma[.a-z0-9_]*\\.s8\\.s8",
            "mma.sync": r"\\bmma\\.sync"}
with compile_launches_for_hopper() as kernels:
    n, k = 12288, 4096  # Qwen3-VL-8B's 4096 -> 12288 projection
    for qdtype in ("fp8", "int8"):
        dtype = torch.float8_e4m3fn if qdtype == "fp8" else torch.int8
        for m in (1, 16, 64, 4096):
            kernels.label = f"{qdtype} {m}"
            bias = torch.randn(n, dtype=torch.bfloat16) if m == 64 else None
            kt.scaled_mm(torch.empty(m, k, dtype=dtype), torch.empty(n, k, dtype=dtype), torch.rand(m, 1),
                         torch.rand(n, 1), torch.bfloat16, bias)
"""


def test_triton_kernel_compiles_for_hopper_as_launched():
    """Compile the kernel as ``scaled_mm`` launches it for sm_90 (no GPU needed), decode to prefill sizes: FP8
    and INT8 operands straight into wgmma for 64+ row tiles (16-row decode tiles: mma.sync), shared memory
    within an SM's, no register spills."""
    kernels = compile_in_subprocess(_LAUNCHES)
    assert len(kernels) == 8
    for kernel in kernels:
        qdtype, m = kernel.label.split()
        assert kernel.count(f"{qdtype} wgmma" if int(m) > 16 else "mma.sync") > 0, kernel
        assert kernel.stack_bytes == 0 and kernel.shared_bytes <= SHARED_MEMORY_PER_BLOCK, kernel
