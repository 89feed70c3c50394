"""mgpt.grouped_block_scaled_mm (MoE experts) against the block formula written here in float64, expert by expert:
rows offsets[e]:offsets[e+1] of out are

    sum_kb scale_a[m, kb] * scale_b[e, n // 128, kb] * sum_{k in block kb} a[m, k] * b[e, n, k]

Random FP8 operands, random positive block scales spread over orders of magnitude, uneven expert sizes with
empty experts first, in the middle and last. Tolerances as ``test_block_scaled_mm.py``.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mgpt_ops
from conftest import DEVICE, rel_err
from mgpt_ops.quant import grouped_block_scaled_mm, quantize_fp8_group, quantize_weight_block128
from mgpt_ops.quant import block_gemm
from mgpt_ops.quant.block_gemm import usable_faces

FACES = usable_faces("grouped_block_scaled_mm", torch.device(DEVICE))
FP8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def formula(a, b, scale_a, scale_b, offsets):
    a64, b64, sa, sb = a.cpu().double(), b.cpu().double(), scale_a.cpu().double(), scale_b.cpu().double()
    M, K = a64.shape
    E, N, _ = b64.shape
    out = torch.zeros(M, N, dtype=torch.float64)
    bounds = offsets.cpu().tolist()
    for e in range(E):
        rows = slice(bounds[e], bounds[e + 1])
        for kb in range(math.ceil(K / 128)):
            cols = slice(kb * 128, (kb + 1) * 128)
            col_scale = sb[e, torch.arange(N) // 128, kb]
            out[rows] += (a64[rows, cols] @ b64[e, :, cols].T) * sa[rows, kb:kb + 1] * col_scale[None, :]
    return out


def make(sizes, N, K, seed, magnitude=1e-3, offset_dtype=torch.int32):
    """Rows per expert ``sizes``; returns a, b, scale_a, scale_b, offsets [E + 1] (leading 0)."""
    g = torch.Generator().manual_seed(seed)
    E, M, kb = len(sizes), sum(sizes), math.ceil(K / 128)
    a = (torch.randn(M, K, generator=g) * 60).clamp(-448, 448).to(FP8).to(DEVICE)
    b = (torch.randn(E, N, K, generator=g) * 60).clamp(-448, 448).to(FP8).to(DEVICE)
    sa = (torch.exp(torch.randn(M, kb, generator=g) * 2) * magnitude).to(DEVICE)
    sb = (torch.exp(torch.randn(E, math.ceil(N / 128), kb, generator=g) * 2) * magnitude).to(DEVICE)
    offsets = torch.tensor([0] + sizes).cumsum(0).to(offset_dtype).to(DEVICE)
    return a, b, sa, sb, offsets


# rows per expert: uneven, empty experts first / middle / last, one expert, all rows in one expert, no rows
SIZES = [[3, 0, 17, 1], [0, 33, 0], [7], [0, 0, 0, 40, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0]]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
def test_matches_formula(face, sizes, offset_dtype):
    a, b, sa, sb, offsets = make(sizes, 200, 300, seed=len(sizes) + sum(sizes), offset_dtype=offset_dtype)
    with mgpt_ops.use_backend(face):
        out = grouped_block_scaled_mm(a, b, sa, sb, offsets, out_dtype=torch.float32)
    assert out.shape == (sum(sizes), 200) and out.dtype == torch.float32
    assert rel_err(out, formula(a, b, sa, sb, offsets)) < TOL[torch.float32]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("N,K", [(1, 1), (130, 129), (256, 256)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_shapes_and_out_dtypes(face, N, K, out_dtype):
    a, b, sa, sb, offsets = make([5, 0, 28], N, K, seed=N + K)
    with mgpt_ops.use_backend(face):
        out = grouped_block_scaled_mm(a, b, sa, sb, offsets, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (33, N)
    assert rel_err(out, formula(a, b, sa, sb, offsets)) < TOL[out_dtype]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("magnitude", [1e-18, 1e15])
def test_tiny_and_huge_scales(face, magnitude):
    a, b, sa, sb, offsets = make([4, 0, 3], 144, 300, seed=4, magnitude=magnitude)
    with mgpt_ops.use_backend(face):
        out = grouped_block_scaled_mm(a, b, sa, sb, offsets, out_dtype=torch.float32)
    assert torch.isfinite(out).all() and (out != 0).any()
    assert rel_err(out, formula(a, b, sa, sb, offsets)) < TOL[torch.float32]


@pytest.mark.parametrize("face", FACES)
def test_each_expert_uses_its_own_weights(face):
    """Zeroing one expert's weight scales zeroes exactly its rows; the other rows do not change."""
    a, b, sa, sb, offsets = make([6, 9, 5], 72, 200, seed=5)
    with mgpt_ops.use_backend(face):
        full = grouped_block_scaled_mm(a, b, sa, sb, offsets, out_dtype=torch.float32)
        sb[1] = 0
        part = grouped_block_scaled_mm(a, b, sa, sb, offsets, out_dtype=torch.float32)
    assert (full[6:15] != 0).any() and (part[6:15] == 0).all()
    assert torch.equal(part[:6], full[:6]) and torch.equal(part[15:], full[15:])


@pytest.mark.parametrize("face", FACES)
def test_moe_end_to_end(face):
    """Quantize tokens (1x128 groups) and each expert's weight (128x128 blocks): close to x_e @ w_e.T per expert."""
    g = torch.Generator().manual_seed(9)
    sizes = [5, 0, 11, 2]
    x = torch.randn(sum(sizes), 256, generator=g).to(DEVICE)
    w = (torch.randn(4, 192, 256, generator=g) * 0.05).to(DEVICE)
    offsets = torch.tensor([0] + sizes).cumsum(0).to(DEVICE)
    with mgpt_ops.use_backend(face):
        qx, sx = quantize_fp8_group(x, 128)
        qw, sw = zip(*(quantize_weight_block128(w[e]) for e in range(4)))
        out = grouped_block_scaled_mm(qx, torch.stack(qw), sx, torch.stack(sw), offsets, out_dtype=torch.float32)
    want = torch.cat([x[offsets[e]:offsets[e + 1]].double() @ w[e].double().T for e in range(4)])
    assert rel_err(out, want) < 0.06


@settings(max_examples=6, deadline=None)
@given(sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6), N=st.integers(1, 200), K=st.integers(1, 260),
       seed=st.integers(0, 99))
def test_hypothesis_shapes(sizes, N, K, seed):
    a, b, sa, sb, offsets = make(sizes, N, K, seed=seed)
    want = formula(a, b, sa, sb, offsets)
    for face in FACES:
        with mgpt_ops.use_backend(face):
            out = grouped_block_scaled_mm(a, b, sa, sb, offsets, out_dtype=torch.float32)
        assert rel_err(out, want) < TOL[torch.float32]


OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")  # see test_block


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    a, b, sa, sb, offsets = make([3, 0, 4], 144, 300, seed=11)
    args = (a, b, sa, sb, offsets, torch.bfloat16, 128)
    with mgpt_ops.use_backend(face):
        torch.library.opcheck(torch.ops.mgpt.grouped_block_scaled_mm.default, args, test_utils=OPCHECK_UTILS)
        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        before = [t.clone() for t in tensors]
        out = torch.ops.mgpt.grouped_block_scaled_mm.default(*args)
    bits = lambda t: t.view(torch.uint8) if t.dtype == FP8 else t  # noqa: E731
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(before, tensors))
    assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in tensors)


@pytest.mark.parametrize("face", FACES)
def test_torch_compile_fullgraph(face):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(20, 200, generator=g).to(DEVICE)
    qw, sw = zip(*(quantize_weight_block128(torch.randn(72, 200, generator=g).to(DEVICE)) for _ in range(3)))
    qw, sw = torch.stack(qw), torch.stack(sw)
    offsets = torch.tensor([0, 8, 8, 20], device=DEVICE)

    def experts(x, offsets):
        qx, sx = quantize_fp8_group(x, 128)
        return grouped_block_scaled_mm(qx, qw, sx, sw, offsets, out_dtype=torch.bfloat16) * 2

    compiled = torch.compile(experts, fullgraph=True)
    with mgpt_ops.use_backend(face):
        assert torch.equal(experts(x, offsets), compiled(x, offsets))


def test_cpu_face_only_with_its_kernel():
    a, b, sa, sb, offsets = (t.cpu() for t in make([2, 3], 72, 200, seed=14))
    if "cpu" in usable_faces("grouped_block_scaled_mm", torch.device("cpu")):
        assert block_gemm._choose("grouped_block_scaled_mm", torch.device("cpu")) == "cpu"
    else:
        with mgpt_ops.use_backend("cpu"), pytest.raises(RuntimeError, match="grouped_block_scaled_mm_kernel"):
            grouped_block_scaled_mm(a, b, sa, sb, offsets, out_dtype=torch.float32)


def test_offsets_checked_again_after_in_place_change():
    """The value check is remembered per tensor version: an in-place edit is checked again."""
    a, b, sa, sb, offsets = make([2, 3], 72, 200, seed=15)
    grouped_block_scaled_mm(a, b, sa, sb, offsets, out_dtype=torch.float32)
    offsets[2] = 4
    with pytest.raises(ValueError, match="must end at M_total=5"):
        grouped_block_scaled_mm(a, b, sa, sb, offsets, out_dtype=torch.float32)


def bad_cases():
    a, b, sa, sb, offsets = make([3, 0, 4], 144, 300, seed=16)
    ok = dict(a=a, b=b, scale_a=sa, scale_b=sb, offsets=offsets, out_dtype=torch.bfloat16)
    off = lambda *v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return [
        (dict(a=a.half()), TypeError, "'a' must have dtype"),
        (dict(b=b.to(torch.float8_e5m2)), TypeError, "'b' must have dtype"),
        (dict(b=b[0]), ValueError, "'b' must have 3 dimension"),
        (dict(b=b[:, :, :200]), ValueError, "'b' must be the expert weights \\[E, N, K\\] with E >= 1 and K=300"),
        (dict(b=b[:0], scale_b=sb[:0], offsets=off(0)), ValueError, "E >= 1"),
        (dict(scale_a=sa[:, :2]), ValueError, "'scale_a' must have shape \\[7, 3\\]"),
        (dict(scale_b=sb[0]), ValueError, "'scale_b' must have shape \\[3, 2, 3\\]"),
        (dict(scale_b=sb[:2]), ValueError, "'scale_b' must have shape \\[3, 2, 3\\]"),
        (dict(scale_b=sb.half()), TypeError, "'scale_b' must have dtype"),
        (dict(offsets=offsets.float()), TypeError, "'offsets' must have dtype in \\(int32, int64\\)"),
        (dict(offsets=offsets[1:]), ValueError, "'offsets' must have shape \\[4\\]"),
        (dict(offsets=off(1, 3, 3, 7)), ValueError, "'offsets' must start at 0"),
        (dict(offsets=off(0, 4, 3, 7)), ValueError, "must be non-decreasing, got offsets\\[1\\]=4 > offsets\\[2\\]=3"),
        (dict(offsets=off(0, 3, 3, 6)), ValueError, "'offsets' must end at M_total=7"),
        (dict(offsets=off(0, 3, 3, 8)), ValueError, "'offsets' must end at M_total=7"),
        (dict(out_dtype=torch.int32), TypeError, "'out_dtype' must be one of"),
        (dict(block=256), ValueError, "'block' must be 128"),
    ], ok


@pytest.mark.parametrize("case", range(17))
def test_bad_input(case):
    cases, ok = bad_cases()
    over, exc, msg = cases[case]
    args = {**ok, **over}
    with pytest.raises(exc, match=msg):
        grouped_block_scaled_mm(args.pop("a"), args.pop("b"), args.pop("scale_a"), args.pop("scale_b"),
                                args.pop("offsets"), **args)
