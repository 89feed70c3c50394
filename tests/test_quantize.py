"""FP8 / INT8 quantizers against formulas written here, on random data with rows of very different magnitudes:

* scale = max(amax, 1e-12) * fp32(1 / QMAX) in fp32 (QMAX = 448 for float8_e4m3fn, 127 for int8; the
  documented product with the rounded reciprocal): checked bit-exactly;
* q = clamp(x / scale, -QMAX, QMAX) cast to fp8 (round to nearest even), or round-half-even then clamp for
  int8: checked bit-exactly;
* round-trip |x - q * scale| <= scale / 2 (int8); <= max(|x| * 2^-4, scale * 2^-10) for fp8 (e4m3 keeps 3
  mantissa bits: half an ulp is 2^-4 of the value for normals, and the subnormal step is 2^-9 * scale);
* all-zero rows give q = 0 and a finite scale; nothing is ever NaN.
Every face is checked against these formulas bit-exactly (the Triton kernels round on the e4m3 grid themselves,
so this holds under the interpreter too), and the Triton kernels are compiled for sm_90.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE, faces_here
from hopper_compile import SHARED_MEMORY_PER_BLOCK, compile_in_subprocess
import mgpt_ops
from mgpt_ops.quant import (quantize_fp8_group, quantize_fp8_per_tensor, quantize_fp8_per_token,
                            quantize_int8_per_tensor, quantize_int8_per_token, quantize_weight_block128,
                            quantize_weight_per_channel)

FACES = faces_here(("reference", "triton"))  # every quantizer has both faces
FP8, INT8 = torch.float8_e4m3fn, torch.int8
QMAX = {FP8: 448.0, INT8: 127.0}


def expected_scale(x: torch.Tensor, qdtype, dims) -> torch.Tensor:
    """max(amax, 1e-12) * fp32(1 / QMAX) in fp32 over ``dims`` (keepdim)."""
    amax = x.float().abs().amax(dim=dims, keepdim=True)
    inv_qmax = torch.tensor(1 / QMAX[qdtype], dtype=torch.float32, device=amax.device)
    return torch.clamp(amax, min=1e-12) * inv_qmax


def check_round_trip(x: torch.Tensor, q: torch.Tensor, scale_full: torch.Tensor, qdtype) -> None:
    """q matches the exact rounding of x / scale, and |x - q * scale| is within half a quantisation step."""
    x64, s64 = x.double().cpu(), scale_full.double().cpu()
    q64 = q.cpu().double()
    assert torch.isfinite(q64).all()
    assert q64.abs().max() <= QMAX[qdtype]
    y = (x.float().cpu() / scale_full.cpu()).clamp(-QMAX[qdtype], QMAX[qdtype])
    exact = y.round().to(INT8) if qdtype == INT8 else y.to(FP8)
    assert torch.equal(q.cpu().view(torch.int8), exact.view(torch.int8))
    err = (x64 - q64 * s64).abs()
    if qdtype == INT8:
        bound = s64 * 0.5 * (1 + 1e-5)
    else:  # e4m3: half-ulp is 2^-4 of the value for normals, 2^-10 absolute below 2^-6
        bound = torch.maximum(x64.abs() * 2.0 ** -4, s64 * 2.0 ** -10) * (1 + 1e-5)
    assert (err <= bound).all(), float((err - bound).max())


def random_activations(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes: per-row scales must follow each row
    mag = torch.exp(torch.randn(shape[:-1] + (1,), generator=g) * 3)
    return (torch.randn(shape, generator=g) * mag).to(dtype).to(DEVICE)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
@pytest.mark.parametrize("M", [1, 7, 33, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token(face, qdtype, M, dtype):
    x = random_activations((M, 200), seed=M, dtype=dtype)
    fn = quantize_fp8_per_token if qdtype == FP8 else quantize_int8_per_token
    with mgpt_ops.use_backend(face):
        q, scale = fn(x)
    assert q.dtype == qdtype and q.shape == x.shape and scale.shape == (M, 1) and scale.dtype == torch.float32
    assert torch.equal(scale.cpu(), expected_scale(x, qdtype, -1).cpu())
    check_round_trip(x, q, scale.expand_as(x), qdtype)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
def test_per_tensor_and_leading_dims(face, qdtype):
    x = random_activations((2, 5, 72), seed=3)
    fn = quantize_fp8_per_tensor if qdtype == FP8 else quantize_int8_per_tensor
    with mgpt_ops.use_backend(face):
        q, scale = fn(x)
        qt, st_ = (quantize_fp8_per_token if qdtype == FP8 else quantize_int8_per_token)(x)
    assert q.shape == x.shape and scale.shape == (1, 1)
    assert torch.equal(scale.cpu(), expected_scale(x.reshape(1, -1), qdtype, -1).cpu())
    check_round_trip(x, q, scale.expand(x.shape), qdtype)
    assert qt.shape == x.shape and st_.shape == (2, 5, 1)  # per-token keeps leading dims
    check_round_trip(x, qt, st_.expand(x.shape), qdtype)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("M,K,group", [(1, 128, 128), (7, 200, 128), (33, 384, 128), (5, 100, 32)])
def test_fp8_group(face, M, K, group):
    x = random_activations((M, K), seed=K)
    # one group of each row far larger than the others: groups must not share scales
    x[:, :min(group, K)] *= 50
    with mgpt_ops.use_backend(face):
        q, scale = quantize_fp8_group(x, group)
    G = math.ceil(K / group)
    assert q.shape == (M, K) and scale.shape == (M, G)
    for gi in range(G):
        cols = slice(gi * group, min(K, (gi + 1) * group))
        assert torch.equal(scale[:, gi:gi + 1].cpu(), expected_scale(x[:, cols], FP8, -1).cpu())
    full = scale.repeat_interleave(group, dim=1)[:, :K]
    check_round_trip(x, q, full, FP8)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
def test_weight_per_channel(face, qdtype):
    w = random_activations((72, 200), seed=11)
    with mgpt_ops.use_backend(face):
        q, scale = quantize_weight_per_channel(w, qdtype)
    assert q.dtype == qdtype and scale.shape == (72, 1)
    assert torch.equal(scale.cpu(), expected_scale(w, qdtype, -1).cpu())
    check_round_trip(w, q, scale.expand_as(w), qdtype)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("N,K", [(72, 200), (256, 128), (130, 300)])
def test_weight_block128(face, N, K):
    w = random_activations((N, K), seed=N + K)
    w[:64, :64] *= 1000  # one block far larger: blocks must not share scales
    with mgpt_ops.use_backend(face):
        q, scale_inv = quantize_weight_block128(w)
    gn, gk = math.ceil(N / 128), math.ceil(K / 128)
    assert q.dtype == FP8 and q.shape == (N, K) and scale_inv.shape == (gn, gk)
    for i in range(gn):
        for j in range(gk):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].reshape(1, -1)
            assert torch.equal(scale_inv[i:i + 1, j:j + 1].cpu(), expected_scale(blk, FP8, -1).cpu())
    full = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:N, :K]
    check_round_trip(w, q, full, FP8)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
@pytest.mark.parametrize("where", [0, 299])
def test_per_tensor_amax_anywhere(face, qdtype, where):
    """300 rows (several programs of the two-pass Triton face): the tensor amax sits in the first or the last
    row and sets the scale of every element; strided input gives the same result."""
    x = random_activations((300, 72), seed=where, dtype=torch.bfloat16)
    x[where, 5] = 1e7  # far above every other element
    fn = quantize_fp8_per_tensor if qdtype == FP8 else quantize_int8_per_tensor
    with mgpt_ops.use_backend(face):
        q, scale = fn(x)
        qt, scale_t = fn(x.T.contiguous().T)
    assert torch.equal(scale.cpu(), expected_scale(x.reshape(1, -1), qdtype, -1).cpu())
    assert q[where, 5].item() == QMAX[qdtype]
    check_round_trip(x, q, scale.expand(x.shape), qdtype)
    assert torch.equal(scale_t, scale) and torch.equal(qt.view(torch.int8), q.view(torch.int8))


@pytest.mark.parametrize("face", FACES)
def test_blocks_of_strided_and_zero_input(face):
    """Transposed weights quantise as their contiguous copy; all-zero blocks / groups give q = 0 and the
    floored scale, next to non-zero ones."""
    w = random_activations((300, 200), seed=21)
    w[128:256, :128] = 0
    with mgpt_ops.use_backend(face):
        q, scale = quantize_weight_block128(w.T)
        q_c, scale_c = quantize_weight_block128(w.T.contiguous())
        qg, scale_g = quantize_fp8_group(w.T, 128)
    assert torch.equal(scale, scale_c) and torch.equal(q.view(torch.int8), q_c.view(torch.int8))
    assert scale[0, 1].item() == pytest.approx(1e-12 / 448) and (q[:128, 128:256].float() == 0).all()
    assert (scale_g[:128, 1] == scale[0, 1]).all()
    check_round_trip(w.T, qg, scale_g.repeat_interleave(128, dim=1)[:, :300], FP8)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("qdtype", [FP8, INT8])
def test_zero_tiny_huge_rows(face, qdtype):
    """All-zero rows give q = 0 with a finite positive scale; tiny and huge rows stay finite and saturate at
    +-QMAX exactly for their largest element; a row below the amax floor (1e-12) quantises to within 1e-12."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 200, generator=g)
    x[0] = 0
    x[1] *= 1e-8
    x[2] *= 1e30
    x[3, 7] = -3e38  # near the fp32 limit
    x[4] *= 1e-20
    x = x.to(DEVICE)
    fn = quantize_fp8_per_token if qdtype == FP8 else quantize_int8_per_token
    with mgpt_ops.use_backend(face):
        q, scale = fn(x)
    qf = q.cpu().float()
    assert torch.isfinite(qf).all() and torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(qf[0], torch.zeros(200))
    assert scale[0, 0].item() == scale[4, 0].item() == pytest.approx(1e-12 / QMAX[qdtype])
    assert qf[1:4].abs().amax(dim=1).tolist() == [QMAX[qdtype]] * 3
    assert qf[3, 7].item() == -QMAX[qdtype]
    check_round_trip(x[1:4], q[1:4], scale[1:4].expand(3, 200), qdtype)
    assert ((x[4].cpu().double() - qf[4].double() * scale[4].cpu().double()).abs() <= 1e-12).all()


@settings(max_examples=12, deadline=None)
@given(M=st.integers(1, 40), K=st.integers(1, 300), group=st.sampled_from([32, 64, 128]), seed=st.integers(0, 99))
def test_hypothesis_shapes(M, K, group, seed):
    x = random_activations((M, K), seed=seed)
    q, s = quantize_fp8_group(x, group)
    check_round_trip(x, q, s.repeat_interleave(group, dim=1)[:, :K], FP8)
    for face in FACES:
        with mgpt_ops.use_backend(face):
            for qdtype, fn in ((INT8, quantize_int8_per_token), (FP8, quantize_fp8_per_token)):
                q, s = fn(x)
                check_round_trip(x, q, s.expand_as(x), qdtype)


@pytest.mark.parametrize("face", FACES)
def test_e4m3_grid_and_ties(face):
    """Every e4m3 value and every midpoint between neighbours (ties round to the even mantissa), with the row
    amax at 448 so the scale is exactly 1: q must be the round-to-nearest-even cast, sign of zero included."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    grid = torch.sort(grid[torch.isfinite(grid)].unique()).values
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, -grid, -mids, torch.tensor([-0.0])]).reshape(1, -1).to(DEVICE)
    with mgpt_ops.use_backend(face):
        q, scale = quantize_fp8_per_token(x)
    assert scale.item() == 1.0
    assert torch.equal(q.cpu().view(torch.int8), x.cpu().to(FP8).view(torch.int8))


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    x = random_activations((7, 200), seed=9)
    with mgpt_ops.use_backend(face):
        for qdtype in (FP8, INT8):
            torch.library.opcheck(torch.ops.mgpt.quantize_per_row.default, (x, qdtype))
            torch.library.opcheck(torch.ops.mgpt.quantize_per_row.default, (x.T, qdtype))  # strided rows
            torch.library.opcheck(torch.ops.mgpt.quantize_per_tensor.default, (x, qdtype))
            torch.library.opcheck(torch.ops.mgpt.quantize_per_tensor.default, (x.T, qdtype))
        torch.library.opcheck(torch.ops.mgpt.quantize_fp8_blocks.default, (x, 1, 128))
        torch.library.opcheck(torch.ops.mgpt.quantize_fp8_blocks.default, (x, 128, 128))
        torch.library.opcheck(torch.ops.mgpt.quantize_fp8_blocks.default, (x.T, 128, 128))


@pytest.mark.parametrize("face", FACES)
def test_torch_compile_fullgraph(face):
    x = random_activations((33, 200), seed=10)

    def fn(x):
        q, s = quantize_fp8_per_token(x)
        qg, sg = quantize_fp8_group(x)
        qi, si = quantize_int8_per_tensor(x)
        return q.float() * s, qg.float().sum() + sg.sum(), qi.float() * si

    compiled = torch.compile(fn, fullgraph=True)
    with mgpt_ops.use_backend(face):
        for a, b in zip(fn(x), compiled(x)):
            assert torch.equal(a, b)


def test_not_differentiable():
    x = random_activations((3, 16), seed=1).requires_grad_(True)
    q, s = quantize_fp8_per_token(x)
    assert not q.requires_grad and not s.requires_grad


BAD = [
    (lambda: quantize_fp8_per_token(torch.ones(3, 4, dtype=torch.int32)), TypeError, "'x' must have dtype"),
    (lambda: quantize_fp8_per_token(torch.ones(3, 0)), ValueError, "K >= 1"),
    (lambda: quantize_fp8_per_tensor(torch.ones(0, 4)), ValueError, "must be non-empty"),
    (lambda: quantize_fp8_group(torch.ones(3, 4), 0), ValueError, "'group' must be an int >= 1"),
    (lambda: quantize_weight_per_channel(torch.ones(3, 4), torch.float16), TypeError, "'dtype' must be"),
    (lambda: quantize_weight_per_channel(torch.ones(3, 4, 5)), ValueError, "'w' must have 2 dimension"),
    (lambda: quantize_weight_block128(torch.ones(3, 4, dtype=torch.int8)), TypeError, "'w' must have dtype"),
]


@pytest.mark.parametrize("call,exc,msg", BAD)
def test_bad_input(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


# ------------------------------------------------------------------------------------------------------------
# the compiled (non-interpreted) kernels: compiled for Hopper as launched (tests/hopper_compile.py)
# ------------------------------------------------------------------------------------------------------------
_LAUNCHES = """
from mgpt_ops.quant import quantize_triton as kt
with compile_launches_for_hopper() as kernels:
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (1, 4096):
            x = torch.randn(rows, 4096).to(dtype)
            kernels.label = f"{dtype} {rows}"
            for qdtype in (torch.float8_e4m3fn, torch.int8):
                kt.quantize_rows(x, qdtype)
                kt.quantize_tensor(x, qdtype)
            kt.quantize_blocks(x, 1, 128)  # activation groups
            kt.quantize_blocks(x[:, :1000], 128, 128)  # weight blocks, partial last block, strided view
"""


def test_triton_kernels_compile_for_hopper_as_launched():
    """The interpreter accepts code the compiler rejects: compile every quantizer kernel as the quantizers launch
    it for sm_90 (no GPU needed), bf16 and fp32 input, one row and 4096."""
    kernels = compile_in_subprocess(_LAUNCHES)
    assert {k.name for k in kernels} == {"_quantize_rows_kernel", "_tensor_amax_kernel", "_tensor_quantize_kernel",
                                        "_quantize_blocks_kernel"}
    assert len(kernels) == 4 * 8
    assert all(k.shared_bytes <= SHARED_MEMORY_PER_BLOCK for k in kernels)
