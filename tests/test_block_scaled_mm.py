"""mgpt.block_scaled_mm against the block formula written here in float64, one K block at a time:

    out[m, n] = sum_kb scale_a[m, kb] * scale_b[n // 128, kb] * sum_{k in block kb} a[m, k] * b[n, k]  + bias[n]

Operands are random FP8 values (never zeros-only), scales random positive fp32 that differ from block to block
over several orders of magnitude (a wrong block index changes the result by far more than the tolerance).
Tolerances (relative, norm-wise): fp32 output 1e-5 (fp8 products are exact in fp32; the K sums and the scale
products round), fp16 output 1e-3, bf16 output 1e-2 (one rounding of the result; the interpreter truncates).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mgpt_ops
from conftest import DEVICE, rel_err
from hopper_compile import SHARED_MEMORY_PER_BLOCK, compile_in_subprocess
from mgpt_ops.quant import block_scaled_mm, quantize_fp8_group, quantize_weight_block128
from mgpt_ops.quant import block_gemm
from mgpt_ops._backend import choose_backend, kernels_registered
from mgpt_ops.quant.block_gemm import usable_faces

# The CUTLASS face runs only when pinned and needs K % 16 == 0: its own tests are below.
FACES = [f for f in usable_faces("block_scaled_mm", torch.device(DEVICE)) if f != "cuda"]
FP8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def formula(a, b, scale_a, scale_b, bias=None):
    """The block formula above, literally: one K block at a time, float64."""
    a64, b64, sa, sb = a.cpu().double(), b.cpu().double(), scale_a.cpu().double(), scale_b.cpu().double()
    M, K = a64.shape
    N = b64.shape[0]
    out = torch.zeros(M, N, dtype=torch.float64)
    for kb in range(math.ceil(K / 128)):
        cols = slice(kb * 128, (kb + 1) * 128)
        col_scale = sb[torch.arange(N) // 128, kb]  # block row of each output column
        out += (a64[:, cols] @ b64[:, cols].T) * sa[:, kb:kb + 1] * col_scale[None, :]
    if bias is not None:
        out += bias.cpu().double()
    return out


def random_fp8(rows, cols, g):
    return (torch.randn(rows, cols, generator=g) * 60).clamp(-448, 448).to(FP8).to(DEVICE)


def random_scales(shape, g, magnitude=1e-3):
    """Positive scales spread over ~4 orders of magnitude around ``magnitude``."""
    return (torch.exp(torch.randn(shape, generator=g) * 2) * magnitude).to(DEVICE)


def make(M, N, K, seed, magnitude=1e-3):
    g = torch.Generator().manual_seed(seed)
    a, b = random_fp8(M, K, g), random_fp8(N, K, g)
    sa = random_scales((M, math.ceil(K / 128)), g, magnitude)
    sb = random_scales((math.ceil(N / 128), math.ceil(K / 128)), g, magnitude)
    return a, b, sa, sb


SHAPES = [(72, 200), (256, 384), (130, 129), (1, 1)]  # (N, K): partial blocks in N and/or K, and exact multiples


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("M", [1, 7, 33])
@pytest.mark.parametrize("N,K", SHAPES)
def test_matches_formula(face, M, N, K):
    a, b, sa, sb = make(M, N, K, seed=M + N + K)
    bias = torch.randn(N, device=DEVICE) if M % 2 else None
    with mgpt_ops.use_backend(face):
        out = block_scaled_mm(a, b, sa, sb, out_dtype=torch.float32, bias=bias)
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert rel_err(out, formula(a, b, sa, sb, bias)) < TOL[torch.float32]


@pytest.mark.parametrize("face", FACES)
def test_prefill_size_m4096(face):
    """M = 4096 tokens with partial blocks in N and K: many row tiles, every group scale distinct."""
    a, b, sa, sb = make(4096, 40, 200, seed=4096)
    with mgpt_ops.use_backend(face):
        out = block_scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)
    assert rel_err(out, formula(a, b, sa, sb)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_out_dtypes_and_bias(face, out_dtype, bias_dtype):
    a, b, sa, sb = make(33, 144, 300, seed=2)
    bias = None if bias_dtype is None else (torch.randn(144) * 4).to(bias_dtype).to(DEVICE)
    with mgpt_ops.use_backend(face):
        out = block_scaled_mm(a, b, sa, sb, out_dtype=out_dtype, bias=bias)
    assert out.dtype == out_dtype
    assert rel_err(out, formula(a, b, sa, sb, bias)) < TOL[out_dtype]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("magnitude", [1e-18, 1e15])
def test_tiny_and_huge_scales(face, magnitude):
    """Scale products around 1e-36 and 1e30 (spread 1e+-4 more): fp32 promotion must neither flush nor overflow."""
    a, b, sa, sb = make(7, 144, 300, seed=4, magnitude=magnitude)
    with mgpt_ops.use_backend(face):
        out = block_scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
    want = formula(a, b, sa, sb)
    assert torch.isfinite(out).all() and (out != 0).any()
    assert rel_err(out, want) < TOL[torch.float32]


@pytest.mark.parametrize("face", FACES)
def test_each_block_uses_its_own_scale(face):
    """One-hot scales: only block (i, j) of the weight scales is non-zero, so out is that block's product
    alone -- in the rows of output block i and nowhere else."""
    a, b, _, _ = make(5, 260, 300, seed=5)
    sa = torch.ones(5, 3, device=DEVICE)
    for i, j in ((0, 0), (2, 1), (1, 2)):
        sb = torch.zeros(3, 3, device=DEVICE)
        sb[i, j] = 1.0
        with mgpt_ops.use_backend(face):
            out = block_scaled_mm(a, b, sa, sb, out_dtype=torch.float32).cpu()
        rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
        want = torch.zeros(5, 260, dtype=torch.float64)
        want[:, rows] = a.cpu().double()[:, cols] @ b.cpu().double()[rows, cols].T
        assert torch.equal(out != 0, want != 0) and rel_err(out, want) < TOL[torch.float32]


@pytest.mark.parametrize("face", FACES)
def test_strided_operands(face):
    """Transposed / sliced FP8 views are accepted (read through their strides, or copied by the C++ face)."""
    g = torch.Generator().manual_seed(8)
    a = random_fp8(200, 33, g).T  # [33, 200], column-major
    b = random_fp8(144, 400, g)[::2, ::2]  # [72, 200] with strides (800, 2)
    sa, sb = random_scales((33, 2), g), random_scales((1, 2), g)
    with mgpt_ops.use_backend(face):
        out = block_scaled_mm(a, b, sa.T.contiguous().T, sb, out_dtype=torch.float32)
    assert rel_err(out, formula(a, b, sa, sb)) < TOL[torch.float32]


@pytest.mark.parametrize("face", FACES)
def test_quantized_linear_end_to_end(face):
    """quantize_fp8_group(x) and quantize_weight_block128(w) feed in unchanged: close to x @ w.T (fp8 ~4%),
    exactly the formula on the quantized values; zero rows of x give bias rows of out."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(33, 300, generator=g).to(DEVICE)
    x[5] = 0
    w = (torch.randn(200, 300, generator=g) * 0.05).to(DEVICE)
    w[:128, :128] *= 100  # blocks of very different magnitude
    bias = torch.randn(200, generator=g).to(DEVICE)
    with mgpt_ops.use_backend(face):
        qx, sx = quantize_fp8_group(x, 128)
        qw, sw = quantize_weight_block128(w)
        out = block_scaled_mm(qx, qw, sx, sw, out_dtype=torch.float32, bias=bias)
    assert rel_err(out, formula(qx, qw, sx, sw, bias)) < TOL[torch.float32]
    assert rel_err(out - bias, x.double() @ w.double().T) < 0.06
    assert torch.equal(out[5].cpu(), bias.cpu())


@settings(max_examples=8, deadline=None)
@given(M=st.integers(1, 40), N=st.integers(1, 300), K=st.integers(1, 300), seed=st.integers(0, 99))
def test_hypothesis_shapes(M, N, K, seed):
    a, b, sa, sb = make(M, N, K, seed=seed)
    want = formula(a, b, sa, sb)
    for face in FACES:
        with mgpt_ops.use_backend(face):
            out = block_scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
        assert rel_err(out, want) < TOL[torch.float32]


# opcheck's test_schema compares inputs with torch.allclose, which has no CPU kernel for float8; the other
# utilities run and the no-mutation / no-alias contract is checked bitwise here.
OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _bits(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    a, b, sa, sb = make(7, 144, 300, seed=11)
    bias = torch.randn(144, device=DEVICE)
    calls = [(a, b, sa, sb, torch.bfloat16, 128, None), (a, b, sa, sb, torch.float32, 128, bias)]
    with mgpt_ops.use_backend(face):
        for args in calls:
            torch.library.opcheck(torch.ops.mgpt.block_scaled_mm.default, args, test_utils=OPCHECK_UTILS)
            tensors = [t for t in args if isinstance(t, torch.Tensor)]
            before = [t.clone() for t in tensors]
            out = torch.ops.mgpt.block_scaled_mm.default(*args)
            assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(before, tensors))
            assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in tensors)


@pytest.mark.parametrize("face", FACES)
def test_torch_compile_fullgraph(face):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(33, 200, generator=g).to(DEVICE)
    w = torch.randn(72, 200, generator=g).to(DEVICE)
    bias = torch.randn(72, generator=g).to(DEVICE)

    def linear_fp8_block(x, w, bias):
        qx, sx = quantize_fp8_group(x, 128)
        qw, sw = quantize_weight_block128(w)
        return block_scaled_mm(qx, qw, sx, sw, out_dtype=torch.bfloat16, bias=bias) * 2

    compiled = torch.compile(linear_fp8_block, fullgraph=True)
    with mgpt_ops.use_backend(face):
        eager, traced = linear_fp8_block(x, w, bias), compiled(x, w, bias)
    assert torch.equal(eager, traced)


def test_not_differentiable():
    a, b, sa, sb = make(7, 72, 200, seed=13)
    bias = torch.randn(72, device=DEVICE, requires_grad=True)
    out = block_scaled_mm(a, b, sa.requires_grad_(True), sb, out_dtype=torch.float32, bias=bias)
    assert not out.requires_grad


def test_cpu_face_only_with_its_kernel():
    """CPU tensors run the C++ face automatically when mgpt_ops._C registered its kernel; without it,
    pinning "cpu" is an error naming the missing kernel (never a silent fallback)."""
    a, b, sa, sb = (t.cpu() for t in make(3, 72, 200, seed=14))
    if "cpu" in usable_faces("block_scaled_mm", torch.device("cpu")):
        assert block_gemm._choose("block_scaled_mm", torch.device("cpu")) == "cpu"
    else:
        with mgpt_ops.use_backend("cpu"), pytest.raises(RuntimeError, match="block_scaled_mm_kernel"):
            block_scaled_mm(a, b, sa, sb, out_dtype=torch.float32)


def bad_cases():
    a, b, sa, sb = make(7, 144, 300, seed=14)
    ok = dict(a=a, b=b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, bias=None)
    return [
        (dict(a=a.float()), TypeError, "'a' must have dtype in \\(float8_e4m3fn\\)"),
        (dict(b=b.to(torch.float8_e5m2)), TypeError, "'b' must have dtype"),
        (dict(a=a[None]), ValueError, "'a' must have 2 dimension"),
        (dict(b=b[None]), ValueError, "'b' must have 2 dimension"),
        (dict(b=b[:, :200]), ValueError, "'b' must be the weight \\[N, K\\] with K=300"),
        (dict(scale_a=sa[:, :2]), ValueError, "'scale_a' must have shape \\[7, 3\\]"),
        (dict(scale_a=sa[:6]), ValueError, "'scale_a' must have shape \\[7, 3\\]"),
        (dict(scale_b=sb.T), ValueError, "'scale_b' must have shape \\[2, 3\\]"),
        (dict(scale_b=sb[:1, :, None]), ValueError, "'scale_b' must have shape \\[2, 3\\]"),
        (dict(scale_b=sb.double()), TypeError, "'scale_b' must have dtype"),
        (dict(scale_a="1.0"), TypeError, "'scale_a' must be a torch.Tensor"),
        (dict(out_dtype=torch.float64), TypeError, "'out_dtype' must be one of"),
        (dict(bias=torch.randn(143, device=DEVICE)), ValueError, "'bias' must have shape \\[144\\]"),
        (dict(bias=torch.randn(144, dtype=torch.float64, device=DEVICE)), TypeError, "'bias' must have dtype"),
        (dict(block=64), ValueError, "'block' must be 128"),
        (dict(block=128.0), ValueError, "'block' must be 128"),
        (dict(a=torch.ones(7, 0, device=DEVICE).to(FP8), b=torch.ones(144, 0, device=DEVICE).to(FP8),
              scale_a=sa[:, :0], scale_b=sb[:, :0]), ValueError, "K=0"),
    ], ok


@pytest.mark.parametrize("case", range(17))
def test_bad_input(case):
    cases, ok = bad_cases()
    over, exc, msg = cases[case]
    args = {**ok, **over}
    with pytest.raises(exc, match=msg):
        block_scaled_mm(args.pop("a"), args.pop("b"), args.pop("scale_a"), args.pop("scale_b"), **args)


# ------------------------------------------------------------------------------------------------------------
# the CUTLASS face (csrc/quant/block_scaled_mm_sm90.cu): pinned only
# ------------------------------------------------------------------------------------------------------------
def test_cuda_face_is_never_chosen_automatically():
    """Compiled but not yet verified on a GPU: the automatic choice on CUDA stays triton; pinning cuda where it
    cannot run is an error naming the backend (the grouped op has no cuda kernel at all)."""
    for op in ("block_scaled_mm", "grouped_block_scaled_mm"):
        assert choose_backend(op, torch.device("cuda"), block_gemm.FACES, block_gemm.PREFERENCE,
                              block_gemm.KERNELS[op]) == "triton"
    a, b, sa, sb = make(7, 144, 256, seed=17)
    if DEVICE == "cpu":
        with mgpt_ops.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda'"):
            block_scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
    elif kernels_registered("cuda", block_gemm.KERNELS["block_scaled_mm"]):
        a, b, sa, sb = make(7, 144, 200, seed=17)  # K % 16 != 0: TMA cannot load the rows
        with mgpt_ops.use_backend("cuda"), pytest.raises(RuntimeError, match="needs K % 16 == 0"):
            block_scaled_mm(a, b, sa, sb, out_dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------------
# the compiled (non-interpreted) kernels: compiled for Hopper as launched (tests/hopper_compile.py)
# ------------------------------------------------------------------------------------------------------------
_LAUNCHES = """
from mgpt_ops.quant import block_gemm_triton as kt
FP8 = torch.float8_e4m3fn
OUT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATTERNS = {"fp8 wgmma": r"wgmma[.a-z0-9_]*\\.e4m3\\.e4m3", "mma.sync": r"\\bmma\\.sync"}
with compile_launches_for_hopper() as kernels:
    for m, out in ((1, "bf16"), (16, "fp16"), (64, "bf16"), (4096, "bf16"), (4096, "fp32")):
        kernels.label = f"dense {m} {out}"  # Qwen3-VL-8B's 4096 -> 12288 projection, with a bias
        n, k = 12288, 4096
        kt.block_scaled_mm(torch.empty(m, k, dtype=FP8), torch.empty(n, k, dtype=FP8), torch.rand(m, k // 128),
                           torch.rand(n // 128, k // 128), OUT[out], torch.randn(n).to(OUT[out]))
        kernels.label = f"grouped {m} {out}"  # Qwen3-VL-30B-A3B's experts (gate + up: 2048 -> 2 x 768), top-8
        rows, e, n, k = 8 * m, 128, 1536, 2048
        offsets = torch.linspace(0, rows, e + 1).to(torch.int32)
        kt.grouped_block_scaled_mm(torch.empty(rows, k, dtype=FP8), torch.empty(e, n, k, dtype=FP8),
                                   torch.rand(rows, k // 128), torch.rand(e, n // 128, k // 128), offsets, OUT[out])
"""


def test_triton_kernels_compile_for_hopper_as_launched():
    """The interpreter accepts code the compiler rejects, and only a real launch shows what Triton specialises:
    compile both kernels as the ops launch them for sm_90 (no GPU needed), decode to prefill sizes: FP8
    operands straight into e4m3 x e4m3 -> f32 wgmma for 64+ row tiles (16-row decode tiles: mma.sync on FP8
    converted to f16, exact), shared memory within an SM's, no register spills."""
    kernels = compile_in_subprocess(_LAUNCHES)
    assert len(kernels) == 10
    for kernel in kernels:
        kind, m, _ = kernel.label.split()
        rows = int(m) if kind == "dense" else 8 * int(m) / 128  # what picks the tile: rows (per expert)
        assert kernel.count("fp8 wgmma" if rows > 16 else "mma.sync") > 0, kernel
        assert kernel.stack_bytes == 0 and kernel.shared_bytes <= SHARED_MEMORY_PER_BLOCK, kernel
