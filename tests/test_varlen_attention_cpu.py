"""C++ CPU kernels mgpt::varlen_attention_fwd / mgpt::varlen_attention_bwd against a float64 statement.

Written here, independently of mgpt_ops/vision/_contract.py. Per sequence s (tokens cu[s]..cu[s+1]) and head h,
in float64, with the rotation of Hugging Face's apply_rotary_pos_emb_vision:
    x' = x cos + rotate_half(x) sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])   (q and k)
    S = scale q' k'^T,   m = max_j S,   lse = m + log sum_j exp(S - m),   out = exp(S - lse) v
and dq, dk, dv from float64 autograd through that statement (so with respect to the un-rotated q and k).
Most tests use general rotary tables (independent cos and sin per column, halves not duplicated), which
catch mixed-up halves that HF's duplicated tables would hide; one test uses HF-shaped tables.

Tolerances (norm-wise relative error, conftest.rel_err): fp32 inputs 3e-6 for out, lse and gradients (fp32
accumulation; measured <= 8e-7 up to 1000 keys), plus 1e-7 * max|S|: a score S carries an fp32 rounding
of |S| * 6e-8, which exp turns into that relative error of its probability (scale 1.7 reaches |S| ~ 120).
bf16 1e-2 and fp16 2e-3: the kernels compute in fp32 from the rounded inputs, so the error is the single
rounding of each output (at most 2^-9 / 2^-12 relative per element; measured ~1.8e-3 / ~2.2e-4); lse stays
fp32 (3e-6) for every input dtype.
"""

from __future__ import annotations

import conftest
import pytest
import torch
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import mgpt_ops  # noqa: F401  (loads the extension: the ops' schemas and CPU kernels)
import mgpt_ops.vision._contract  # noqa: F401  (registers the ops' fakes, which opcheck needs)

# These kernels are the `cpu` face by definition (TORCH_LIBRARY_IMPL(mgpt, CPU)); on a CUDA test run the
# same ops dispatch to other kernels, tested by their own files, so this module has nothing to run there.
if conftest.DEVICE != "cpu":
    pytest.skip("tests of the C++ CPU kernels run only with CPU tensors", allow_module_level=True)

FWD = torch.ops.mgpt.varlen_attention_fwd
BWD = torch.ops.mgpt.varlen_attention_bwd
HEAD_DIMS = (64, 72, 80, 96, 128)
OUT_TOL = {torch.float32: 3e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LSE_TOL = 3e-6


# ------------------------------------------------------------------------------------------------------
# Inputs and the float64 statement
# ------------------------------------------------------------------------------------------------------
def cu_seqlens_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def rotary_tables(tokens, head_dim, gen, hf_shaped=False):
    """cos, sin [N, D] fp32. General: every entry independent. HF-shaped: cat(freqs, freqs) of angles."""
    if hf_shaped:
        angles = torch.rand(tokens, head_dim // 2, generator=gen) * 40.0
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()
    return (torch.rand(tokens, head_dim, generator=gen) * 2 - 1, torch.rand(tokens, head_dim, generator=gen) * 2 - 1)


def make_inputs(lengths, heads, head_dim, dtype=torch.float32, rope=True, seed=0, hf_shaped=False):
    gen = torch.Generator().manual_seed(seed)
    cu = cu_seqlens_of(lengths)
    tokens = int(cu[-1])
    q = (torch.randn(tokens, heads, head_dim, generator=gen) * 1.5).to(dtype)
    k = (torch.randn(tokens, heads, head_dim, generator=gen) * 1.5).to(dtype)
    v = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    dout = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    cos, sin = rotary_tables(tokens, head_dim, gen, hf_shaped) if rope else (None, None)
    return q, k, v, dout, cu, cos, sin


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference(q, k, v, cu_seqlens, cos, sin, scale):
    """(out [N, H, D], lse [H, N], max |score|) in float64 from float64 q, k, v (autograd flows back to them).
    One softmax attention per sequence; sequences of equal length are batched (same math, fewer steps)."""
    if cos is not None:
        c, s = cos.double()[:, None, :], sin.double()[:, None, :]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
    tokens, heads, head_dim = q.shape
    out, lse = q.new_zeros(tokens, heads, head_dim), q.new_zeros(heads, tokens)
    max_abs_score = 0.0
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    for length in lengths.unique().tolist():
        if length == 0:
            continue
        rows = (starts[lengths == length][:, None] + torch.arange(length)).reshape(-1)  # each sequence's tokens
        qs, ks, vs = (t[rows].reshape(-1, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = scale * qs @ ks.transpose(-1, -2)  # [B, H, L, L]
        max_abs_score = max(max_abs_score, scores.detach().abs().max().item())
        m = scores.amax(dim=-1, keepdim=True)
        lse_b = m + torch.log(torch.exp(scores - m).sum(dim=-1, keepdim=True))
        out_b = torch.exp(scores - lse_b) @ vs  # [B, H, L, D]
        out = out.index_put((rows,), out_b.transpose(1, 2).reshape(-1, heads, head_dim))
        lse_rows = lse_b.squeeze(-1).transpose(0, 1).reshape(heads, -1)  # [H, B * L] in the order of rows
        lse = lse.index_put((torch.arange(heads)[:, None], rows[None, :]), lse_rows)
    return out, lse, max_abs_score


def run_kernels(q, k, v, dout, cu, cos, sin, scale, max_seqlen=None):
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    out, lse = FWD(q, k, v, cu, max_seqlen, cos, sin, scale)
    dq, dk, dv = BWD(dout, q, k, v, out, lse, cu, max_seqlen, cos, sin, scale)
    return out, lse, dq, dk, dv


def check(lengths, heads, head_dim, dtype=torch.float32, rope=True, scale=None, seed=0, hf_shaped=False):
    q, k, v, dout, cu, cos, sin = make_inputs(lengths, heads, head_dim, dtype, rope, seed, hf_shaped)
    scale = head_dim**-0.5 if scale is None else scale
    out, lse, dq, dk, dv = run_kernels(q, k, v, dout, cu, cos, sin, scale)
    tokens = q.shape[0]
    assert out.shape == (tokens, heads, head_dim) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (heads, tokens) and lse.dtype == torch.float32
    for grad in (dq, dk, dv):
        assert grad.shape == q.shape and grad.dtype == dtype

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse, max_abs_score = reference(q64, k64, v64, cu, cos, sin, scale)
    ref_out.backward(dout.double())
    score_rounding = 1e-7 * max_abs_score
    tol = OUT_TOL[dtype] + score_rounding
    assert rel_err(out, ref_out) < tol
    assert rel_err(lse, ref_lse) < LSE_TOL + score_rounding
    assert rel_err(dq, q64.grad) < tol
    assert rel_err(dk, k64.grad) < tol
    assert rel_err(dv, v64.grad) < tol


# ------------------------------------------------------------------------------------------------------
# Agreement with the statement
# ------------------------------------------------------------------------------------------------------
AWKWARD_LENGTHS = [1, 2, 63, 64, 65, 0, 130]  # around the 64-token tile, plus an empty sequence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no_rope"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_head_dim_dtype_and_rope(head_dim, rope, dtype):
    check(AWKWARD_LENGTHS, heads=2, head_dim=head_dim, dtype=dtype, rope=rope)


def test_hf_shaped_rotary_tables():
    check([37, 100, 5], heads=3, head_dim=80, hf_shaped=True)


@pytest.mark.parametrize("lengths", [[1000], [37], [1000, 3, 64, 0, 517]], ids=["one_1000", "one_37", "mixed"])
def test_long_and_single_sequences(lengths):
    check(lengths, heads=2, head_dim=72)


def test_two_thousand_tiny_sequences():
    lengths = torch.randint(0, 5, (2000,), generator=torch.Generator().manual_seed(3)).tolist()
    check(lengths, heads=2, head_dim=64)


@pytest.mark.parametrize("scale", [0.3, 1.7])
def test_scale_other_than_default(scale):
    check([70, 9], heads=2, head_dim=96, scale=scale)


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 150), min_size=1, max_size=6),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from(HEAD_DIMS),
    rope=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_lengths(lengths, heads, head_dim, rope, seed):
    if sum(lengths) == 0:
        lengths = [*lengths, 1]
    check(lengths, heads, head_dim, rope=rope, seed=seed)


def test_no_tokens():
    q = torch.randn(0, 2, 64)
    for cu in (torch.tensor([0], dtype=torch.int32), torch.tensor([0, 0, 0], dtype=torch.int32)):
        out, lse, dq, dk, dv = run_kernels(q, q, q, q, cu, None, None, 0.125, max_seqlen=0)
        assert out.shape == (0, 2, 64) and lse.shape == (2, 0) and dq.shape == dk.shape == dv.shape == (0, 2, 64)


# ------------------------------------------------------------------------------------------------------
# Layouts, determinism, rounding
# ------------------------------------------------------------------------------------------------------
def test_strided_views_give_the_contiguous_results():
    """q, k, v as views of a packed qkv [N, 3, H, D]; cos/sin, dout, out and lse strided too: the kernels read
    exactly the same numbers, so every result must be bit-identical to the contiguous call (and correct)."""
    lengths, heads, head_dim = [65, 3, 130], 4, 72
    q, k, v, dout, cu, cos, sin = make_inputs(lengths, heads, head_dim, seed=5)
    scale = head_dim**-0.5
    qkv = torch.stack((q, k, v), dim=1)  # [N, 3, H, D]
    qv, kv, vv = qkv.unbind(1)
    assert not qv.is_contiguous() and qv.stride(-1) == 1
    tables = torch.cat((cos, sin), dim=-1)  # [N, 2D]: cos and sin become row-strided views
    cos_v, sin_v = tables[:, :head_dim], tables[:, head_dim:]
    dout_v = torch.cat((dout, dout), dim=-1)[..., :head_dim]

    out, lse = FWD(q, k, v, cu, 130, cos, sin, scale)
    out_s, lse_s = FWD(qv, kv, vv, cu, 130, cos_v, sin_v, scale)
    assert torch.equal(out_s, out) and torch.equal(lse_s, lse)
    out_v = torch.cat((out, out), dim=-1)[..., :head_dim]
    lse_v = lse.t().contiguous().t()  # [H, N] with strides (1, H)
    grads = BWD(dout, q, k, v, out, lse, cu, 130, cos, sin, scale)
    grads_s = BWD(dout_v, qv, kv, vv, out_v, lse_v, cu, 130, cos_v, sin_v, scale)
    for g, g_s in zip(grads, grads_s):
        assert torch.equal(g_s, g)
    check(lengths, heads, head_dim, seed=5)  # and the contiguous results are right


def test_results_do_not_depend_on_the_thread_count():
    q, k, v, dout, cu, cos, sin = make_inputs([300, 7, 64, 129], 3, 80, seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_kernels(q, k, v, dout, cu, cos, sin, 0.11)
    finally:
        torch.set_num_threads(threads)
    for one, many in zip(single, run_kernels(q, k, v, dout, cu, cos, sin, 0.11)):
        assert torch.equal(one, many)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_loads_and_stores_round_like_torch(dtype):
    """Every finite bf16/fp16 value passes the kernels' conversion exactly, and fp32 results are rounded to
    nearest-even as torch rounds. A one-token sequence returns v itself; a two-token sequence whose two keys
    are equal has p = 1/2 exactly, so out = (v_1 + v_2) * 0.5 in fp32 (often a tie, or subnormal), rounded."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[torch.isfinite(values)]
    head_dim = 64
    tokens = values.numel() // head_dim
    v = values[: tokens * head_dim].reshape(tokens, 1, head_dim)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(tokens, 1, head_dim, generator=gen).to(dtype)
    k = torch.randn(tokens, 1, head_dim, generator=gen).to(dtype)

    one_each = torch.arange(tokens + 1, dtype=torch.int32)
    out, _ = FWD(q, k, v, one_each, 1, None, None, 0.125)
    assert torch.equal(out, v)

    pairs = tokens // 2
    v = v[torch.randperm(tokens, generator=gen)][: 2 * pairs]
    k = k[: 2 * pairs].reshape(pairs, 2, 1, head_dim)[:, :1].expand(pairs, 2, 1, head_dim).reshape(-1, 1, head_dim)
    out, _ = FWD(q[: 2 * pairs], k, v, torch.arange(0, 2 * pairs + 1, 2, dtype=torch.int32), 2, None, None, 0.125)
    v1, v2 = v.float().reshape(pairs, 2, 1, head_dim).unbind(1)
    expected = ((v1 + v2) * 0.5).to(dtype)
    assert torch.equal(out.reshape(pairs, 2, 1, head_dim), torch.stack((expected, expected), 1))


# ------------------------------------------------------------------------------------------------------
# Op registration
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no_rope"])
def test_opcheck(rope):
    q, k, v, dout, cu, cos, sin = make_inputs([3, 0, 7], 2, 64, rope=rope, seed=8)
    torch.library.opcheck(FWD, (q, k, v, cu, 7, cos, sin, 0.125))
    out, lse = FWD(q, k, v, cu, 7, cos, sin, 0.125)
    torch.library.opcheck(BWD, (dout, q, k, v, out, lse, cu, 7, cos, sin, 0.125))


# ------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument (the C++ checks behind the Python wrapper's)
# ------------------------------------------------------------------------------------------------------
def bad_fwd_cases():
    q, k, v, _, cu, cos, sin = make_inputs([5, 7], 2, 64, seed=9)
    ok = dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=7, cos=cos, sin=sin, scale=0.125)
    q60 = torch.randn(12, 2, 60)
    return [
        ("cu_int64", dict(ok, cu_seqlens=cu.long()), "'cu_seqlens' must have dtype int32"),
        ("head_dim_60", dict(ok, q=q60, k=q60, v=q60, cos=None, sin=None), "head dim .* must be one of 64, 72"),
        ("k_shape", dict(ok, k=k[:, :1]), "'k' must have the shape of 'q'"),
        ("v_dtype", dict(ok, v=v.double()), "'v' must have the dtype of 'q'"),
        ("q_dtype", dict(ok, q=q.double(), k=k.double(), v=v.double()), "'q' must have dtype float32, bfloat16"),
        ("q_last_dim_strided", dict(ok, q=torch.randn(12, 2, 128)[..., ::2]), "'q' must have a contiguous last"),
        ("cu_start", dict(ok, cu_seqlens=torch.tensor([1, 5, 12], dtype=torch.int32)), "must start at 0"),
        ("cu_decreasing", dict(ok, cu_seqlens=torch.tensor([0, 9, 5, 12], dtype=torch.int32)), "non-decreasing"),
        ("cu_last", dict(ok, cu_seqlens=torch.tensor([0, 5, 11], dtype=torch.int32)), "must equal the number of"),
        ("max_seqlen_small", dict(ok, max_seqlen=6), "'max_seqlen' .* smaller than the longest"),
        ("cos_without_sin", dict(ok, sin=None), "'cos' and 'sin' must be given together"),
        ("cos_shape", dict(ok, cos=cos[:, :32]), "'cos' must have shape \\[N, D\\]"),
        ("sin_dtype", dict(ok, sin=sin.double()), "'sin' must have dtype float32"),
        ("scale_nan", dict(ok, scale=float("nan")), "'scale' must be finite"),
    ]


@pytest.mark.parametrize("case", bad_fwd_cases(), ids=lambda c: c[0])
def test_bad_input_raises(case):
    _, kwargs, message = case
    with pytest.raises(RuntimeError, match=message):
        FWD(**kwargs)


def test_bad_backward_input_raises():
    q, k, v, dout, cu, cos, sin = make_inputs([5, 7], 2, 64, seed=10)
    out, lse = FWD(q, k, v, cu, 7, cos, sin, 0.125)
    with pytest.raises(RuntimeError, match="'lse' must have shape \\[H, N\\]"):
        BWD(dout, q, k, v, out, lse.t(), cu, 7, cos, sin, 0.125)
    with pytest.raises(RuntimeError, match="'dout' must have the dtype of 'q'"):
        BWD(dout.double(), q, k, v, out, lse, cu, 7, cos, sin, 0.125)
    with pytest.raises(RuntimeError, match="'out' must have the shape of 'q'"):
        BWD(dout, q, k, v, out[:-1], lse, cu, 7, cos, sin, 0.125)
