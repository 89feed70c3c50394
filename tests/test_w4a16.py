"""mgpt.quantize_int4_weight and mgpt.w4a16_mm against a float64 transcription, written here, of the int4 group
format: codes unpacked bit by bit from the int32 words, w_hat = (q - z) * s, out = x @ w_hat.T.

Tolerances (norm-wise relative error of the output): fp32 activations 1e-5 (fp32 products of exact codes and
fp32 scales, fp32 accumulation); bf16 / fp16 activations 1e-2 (the kernel rounds the dequantized weight and the
output to 16 bits: ~2^-8 each). The quantizer is checked exactly: codes are the test's own round-to-nearest of
w / s, and |w - w_hat| <= s / 2 elementwise.
"""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mgpt_ops
from conftest import DEVICE, faces_here, rel_err
from hopper_compile import SHARED_MEMORY_PER_BLOCK, compile_in_subprocess
from mgpt_ops.quant.w4a16 import pack_int4, quantize_int4_weight, w4a16_mm

FACES = faces_here(("reference", "triton", "cpu"))
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GROUPS = [32, 64, 128]
SHAPES = [(1, 72, 128), (7, 200, 384), (16, 72, 256), (33, 200, 384)]  # (M, N, K); N not a tile multiple


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


# ------------------------------------------------------------------------------------------------------------
# the independent reference
# ------------------------------------------------------------------------------------------------------------


def unpack_by_hand(qweight):
    """Code of element k of row n = bits [4 (k % 8), 4 (k % 8) + 4) of word qweight[n, k // 8]."""
    words = qweight.cpu().to(torch.int64) % 2**32  # the unsigned 32-bit pattern
    n, k8 = words.shape
    codes = torch.empty((n, k8 * 8), dtype=torch.int64)
    for k in range(k8 * 8):
        codes[:, k] = (words[:, k // 8] // 16 ** (k % 8)) % 16
    return codes


def pack_by_hand(codes):
    n, k = codes.shape
    words = torch.zeros((n, k // 8), dtype=torch.int64)
    for kk in range(k):
        words[:, kk // 8] += codes[:, kk].to(torch.int64) * 16 ** (kk % 8)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequant_by_hand(qweight, scales, zeros, group_size):
    codes = unpack_by_hand(qweight).double()
    s = scales.cpu().double().repeat_interleave(group_size, dim=1)
    z = 8.0 if zeros is None else zeros.cpu().double().repeat_interleave(group_size, dim=1)
    return (codes - z) * s


def random_format(n, k, group_size, dtype, symmetric, device, scale_dtype=None):
    """Random packed codes (every bit pattern, incl. negative int32 words), scales and zero points."""
    qweight = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32)
    groups = k // group_size
    scales = (torch.rand(n, groups) * 0.1 + 0.01).to(scale_dtype or dtype)
    zeros = None if symmetric else torch.randint(0, 16, (n, groups)).to(scale_dtype or dtype)
    return qweight.to(device), scales.to(device), None if zeros is None else zeros.to(device)


# ------------------------------------------------------------------------------------------------------------
# packing and the quantizer
# ------------------------------------------------------------------------------------------------------------


def test_pack_layout_matches_hand_packing():
    codes = torch.randint(0, 16, (5, 64))
    assert torch.equal(pack_int4(codes), pack_by_hand(codes))
    assert torch.equal(unpack_by_hand(pack_by_hand(codes)), codes)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantizer_round_trip(device, dtype, group_size, symmetric):
    torch.manual_seed(group_size)
    w = (torch.randn(24, 384) * torch.rand(24, 1) * 3 + 0.2 * torch.randn(24, 1)).to(dtype).to(device)
    qweight, scales, zeros = quantize_int4_weight(w, group_size=group_size, symmetric=symmetric)
    assert qweight.dtype == torch.int32 and qweight.shape == (24, 48) and qweight.is_contiguous()
    assert scales.dtype == dtype and scales.shape == (24, 384 // group_size)
    assert (zeros is None) == symmetric

    v = w.cpu().double().reshape(24, -1, group_size)
    s = scales.cpu().double()
    if symmetric:
        z = torch.full_like(s, 8.0)
        exact_s = v.abs().amax(-1) / 7
    else:
        assert zeros.dtype == dtype and zeros.shape == scales.shape
        z = zeros.cpu().double()
        assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 15
        exact_s = (v.amax(-1).clamp(min=0) - v.amin(-1).clamp(max=0)) / 15
    # The stored scale is the formula's, rounded up to the storage dtype.
    assert (s >= exact_s).all() and (s <= exact_s * (1 + 2 * torch.finfo(dtype).eps)).all()
    codes = unpack_by_hand(qweight).reshape(24, -1, group_size).double()
    expected = (torch.round(v / s[..., None]) + z[..., None]).clamp(0, 15)
    assert torch.equal(codes, expected)
    w_hat = (codes - z[..., None]) * s[..., None]
    assert ((v - w_hat).abs() <= s[..., None] / 2 * (1 + 1e-12)).all()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantizer_constant_groups(device, dtype, symmetric):
    # Groups of 32: all zero, constant positive, constant negative, then a random group.
    w = torch.cat([torch.zeros(3, 32), torch.full((3, 32), 0.37), torch.full((3, 32), -2.5),
                   torch.randn(3, 32)], dim=1).to(dtype).to(device)
    qweight, scales, zeros = quantize_int4_weight(w, group_size=32, symmetric=symmetric)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    w_hat = dequant_by_hand(qweight, scales, zeros, 32)
    assert torch.isfinite(w_hat).all()
    s = scales.cpu().double().repeat_interleave(32, dim=1)
    assert ((w.cpu().double() - w_hat).abs() <= s / 2 * (1 + 1e-12)).all()
    assert (w_hat[:, :32] == 0).all()


# ------------------------------------------------------------------------------------------------------------
# the matmul
# ------------------------------------------------------------------------------------------------------------


def check_mm(face, device, m, n, k, group_size, dtype, symmetric, scale_dtype=None):
    qweight, scales, zeros = random_format(n, k, group_size, dtype, symmetric, device, scale_dtype)
    x = torch.randn(m, k).to(dtype).to(device)
    with mgpt_ops.use_backend(face):
        out = w4a16_mm(x, qweight, scales, zeros, group_size=group_size)
    assert out.dtype == dtype and out.shape == (m, n)
    ref = x.cpu().double() @ dequant_by_hand(qweight, scales, zeros, group_size).T
    assert rel_err(out, ref) < tol(dtype), (m, n, k)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("face", FACES)
def test_mm_matches_reference(device, face, dtype, group_size, symmetric):
    torch.manual_seed(group_size + symmetric)
    for m, n, k in SHAPES:
        check_mm(face, device, m, n, k, group_size, dtype, symmetric)


@pytest.mark.parametrize("face", FACES)
def test_mm_prefill_size_m4096(device, face):
    """M = 4096 rows (prefill): the large-M path, not the split-K decode path."""
    torch.manual_seed(4096)
    check_mm(face, device, 4096, 24, 128, 64, torch.bfloat16, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("face", FACES)
def test_mm_fp32_scales_and_ragged_k(device, face, dtype):
    """fp32 scales with 16-bit activations, and K = 96 (group 32): K is not a multiple of the 128-wide K tile."""
    torch.manual_seed(1)
    check_mm(face, device, 5, 40, 96, 32, dtype, False, scale_dtype=torch.float32)
    check_mm(face, device, 3, 9, 96, 32, dtype, True)


@pytest.mark.parametrize("split_k", [1, 2, 3, 4])
def test_triton_split_k(device, split_k):
    """Every split of K (incl. more splits than needed, which the launcher trims) sums to the same product."""
    if "triton" not in FACES:
        pytest.skip("triton face cannot run on this device here")
    from mgpt_ops.quant.w4a16_triton import w4a16_mm_triton

    torch.manual_seed(split_k)
    qweight, scales, zeros = random_format(50, 352, 32, torch.float32, False, device)
    x = torch.randn(4, 352, device=device)
    out = w4a16_mm_triton(x, qweight, scales, zeros, 32, split_k=split_k)
    ref = x.cpu().double() @ dequant_by_hand(qweight, scales, zeros, 32).T
    assert rel_err(out, ref) < 1e-5


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 140), k_groups=st.integers(1, 6), group_size=st.sampled_from(GROUPS),
       symmetric=st.booleans(), face=st.sampled_from(FACES))
def test_mm_random_shapes(m, n, k_groups, group_size, symmetric, face):
    torch.manual_seed(m * 1000 + n)
    check_mm(face, torch.device(DEVICE), m, n, k_groups * group_size, group_size, torch.float32, symmetric)


@pytest.mark.parametrize("face", FACES)
def test_mm_leading_dims_and_empty(device, face):
    torch.manual_seed(3)
    qweight, scales, zeros = random_format(24, 64, 64, torch.float32, False, device)
    x = torch.randn(2, 3, 64, device=device)
    with mgpt_ops.use_backend(face):
        out = w4a16_mm(x, qweight, scales, zeros, group_size=64)
        empty = w4a16_mm(x[:0, 0], qweight, scales, zeros, group_size=64)
    ref = x.cpu().double().reshape(6, 64) @ dequant_by_hand(qweight, scales, zeros, 64).T
    assert out.shape == (2, 3, 24) and rel_err(out.reshape(6, 24), ref) < 1e-5
    assert empty.shape == (0, 24)


def test_quantize_then_mm_end_to_end(device):
    """The quantizer's output is what w4a16_mm consumes: x @ w_hat.T is within the int4 error of x @ w.T."""
    torch.manual_seed(4)
    w = torch.randn(64, 256, device=device)
    x = torch.randn(3, 256, device=device)
    for symmetric in (False, True):
        qweight, scales, zeros = quantize_int4_weight(w, group_size=64, symmetric=symmetric)
        out = w4a16_mm(x, qweight, scales, zeros, group_size=64)
        ref = x.cpu().double() @ dequant_by_hand(qweight, scales, zeros, 64).T
        assert rel_err(out, ref) < 1e-5
        assert rel_err(out, x.cpu().double() @ w.cpu().double().T) < 0.15  # 4-bit codes: ~1/16 of the range


# ------------------------------------------------------------------------------------------------------------
# op contract: opcheck, torch.compile, bad input
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("face", FACES)
def test_opcheck(device, face):
    torch.manual_seed(5)
    qweight, scales, zeros = random_format(20, 128, 64, torch.float32, False, device)
    x = torch.randn(3, 128, device=device)
    with mgpt_ops.use_backend(face):
        torch.library.opcheck(torch.ops.mgpt.w4a16_mm.default, (x, qweight, scales, zeros, 64))
        torch.library.opcheck(torch.ops.mgpt.w4a16_mm.default, (x, qweight, scales, None, 64))
    w = torch.randn(20, 128, device=device)
    for symmetric in (False, True):
        torch.library.opcheck(torch.ops.mgpt.quantize_int4_weight.default, (w, 32, symmetric))


@pytest.mark.parametrize("face", FACES)
def test_torch_compile_fullgraph(device, face):
    torch.manual_seed(6)
    w = torch.randn(40, 128, device=device)
    x = torch.randn(2, 5, 128, device=device)

    def layer(x, w):
        qweight, scales, zeros = quantize_int4_weight(w, group_size=32)
        return w4a16_mm(x, qweight, scales, zeros, group_size=32)

    with mgpt_ops.use_backend(face):
        eager = layer(x, w)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, w)
    assert rel_err(compiled, eager) < 1e-6


def test_bad_input(device):
    torch.manual_seed(7)
    x = torch.randn(2, 128, device=device)
    qweight, scales, zeros = random_format(16, 128, 64, torch.float32, False, device)
    with pytest.raises(ValueError, match="'group_size' must be one of"):
        w4a16_mm(x, qweight, scales, zeros, group_size=48)
    with pytest.raises(ValueError, match="'group_size'=128 must divide K=96"):
        quantize_int4_weight(torch.randn(4, 96, device=device), group_size=128)
    with pytest.raises(ValueError, match="'group_size' must be one of"):
        quantize_int4_weight(torch.randn(4, 96, device=device), group_size=16)
    with pytest.raises(ValueError, match="must divide K=0"):
        w4a16_mm(x[:, :0], qweight[:, :0], scales[:, :0], None, group_size=32)
    with pytest.raises(TypeError, match="'w' must have dtype"):
        quantize_int4_weight(torch.randn(4, 128, device=device).double())
    with pytest.raises(TypeError, match="'symmetric' must be a bool"):
        quantize_int4_weight(torch.randn(4, 128, device=device), symmetric=1)
    with pytest.raises(TypeError, match="'x' must have dtype"):
        w4a16_mm(x.double(), qweight, scales, zeros, group_size=64)
    with pytest.raises(TypeError, match="'qweight' must have dtype"):
        w4a16_mm(x, qweight.to(torch.int64), scales, zeros, group_size=64)
    with pytest.raises(ValueError, match=r"'qweight' must have shape \[16, 8\], got \[16, 16\]"):
        w4a16_mm(x[:, :64], qweight, scales, zeros, group_size=64)
    wide = torch.randint(0, 2**30, (16, 32), dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="'qweight' must be contiguous"):
        w4a16_mm(x, wide[:, ::2], scales, zeros, group_size=64)
    with pytest.raises(ValueError, match=r"'scales' must have shape \[16, 2\]"):
        w4a16_mm(x, qweight, scales[:, :1], zeros, group_size=64)
    with pytest.raises(TypeError, match="'scales' must have dtype"):
        w4a16_mm(x.half(), qweight, scales.bfloat16(), None, group_size=64)
    with pytest.raises(TypeError, match="'zeros' must have dtype"):
        w4a16_mm(x, qweight, scales, zeros.half(), group_size=64)
    with pytest.raises(ValueError, match=r"'zeros' must have shape"):
        w4a16_mm(x, qweight, scales, zeros.T.contiguous(), group_size=64)


# ------------------------------------------------------------------------------------------------------------
# the compiled (non-interpreted) kernel: compiled for Hopper as launched (tests/hopper_compile.py)
# ------------------------------------------------------------------------------------------------------------
_LAUNCHES = """
from mgpt_ops.quant import w4a16_triton as kt
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATTERNS = {"wide loads": r"cp\\.async\\.cg\\.shared\\.global|ld\\.global[^\\n]*\\.v4", "mma": r"mma"}
with compile_launches_for_hopper() as kernels:
    n, k = 12288, 4096  # Qwen3-VL-8B's 4096 -> 12288 projection
    for dtype, group, zeros, m in (("bf16", 128, True, 1), ("bf16", 128, True, 16), ("fp16", 32, False, 7),
                                   ("bf16", 64, True, 64), ("fp32", 128, False, 16)):
        kernels.label = f"{dtype} {m}"
        kt.w4a16_mm_triton(torch.randn(m, k).to(DTYPES[dtype]), torch.empty(n, k // 8, dtype=torch.int32),
                           torch.rand(n, k // group).to(DTYPES[dtype]),
                           torch.rand(n, k // group).to(DTYPES[dtype]) if zeros else None, group)
"""


def test_triton_kernel_compiles_for_hopper_as_launched():
    """The interpreter accepts code the compiler rejects: compile the kernel as ``w4a16_mm`` launches it for
    sm_90 (no GPU needed) for bf16 / fp16 / fp32, with and without zero points, decode sizes and more: 16-byte
    weight loads, shared memory within an SM's; for 16-bit activations tensor-core products, no spills."""
    kernels = compile_in_subprocess(_LAUNCHES)
    assert len(kernels) == 5
    for kernel in kernels:
        half = not kernel.label.startswith("fp32")  # fp32 (tests only) runs on the FMA units and may spill
        assert kernel.count("wide loads") > 0 and kernel.shared_bytes <= SHARED_MEMORY_PER_BLOCK, kernel
        assert not half or (kernel.count("mma") > 0 and kernel.stack_bytes == 0), kernel
