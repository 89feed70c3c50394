"""mgpt::vision_attention against an independent float64 reference written here from the formulas

    x' = x cos + rotate_half(x) sin,  rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])   (HF vision RoPE)
    out_i = sum_{j in seq(i)} softmax_j(scale <q'_i, k'_j>) v_j                          (per sequence)

with gradients (w.r.t. the un-rotated q, k and v) from float64 autograd. Tolerances (relative L2 error,
``conftest.rel_err``): 1e-5 for fp32 inputs (fp32 math end to end); 1e-2 for bf16 and 3e-3 for fp16 inputs.
The reference sees the same rounded inputs; the Triton kernels round q', k' to the input dtype as Hugging Face
does, feed P and dS to the matmuls in it and round the outputs to it, which measured 4-6e-3 (bf16, a few units of
2^-9) and 5-7e-4 (fp16) here; the reference and C++ faces keep q', k' and P in fp32 (2-3e-3 and 3e-4).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mgpt_ops
from conftest import DEVICE, rel_err
from hopper_compile import SHARED_MEMORY_PER_BLOCK, compile_in_subprocess
from mgpt_ops.vision.attention import (SUPPORTED_HEAD_DIMS, kernel_registered, usable_faces, vision_attention,
                                       vision_attention_packed)

FACES = usable_faces(torch.device(DEVICE))
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}


# ---------------------------------------------------------------------------------------------------------
# Independent reference and inputs
# ---------------------------------------------------------------------------------------------------------
def reference(q, k, v, cu_seqlens, cos, sin, scale):
    """float64 attention with the HF rotate-half RoPE in float64: one dense softmax over all N tokens in which a
    token sees exactly the tokens of its own sequence (the block-diagonal mask of cu_seqlens)."""
    q, k, v = q.double(), k.double(), v.double()
    if cos is not None:
        half = q.shape[-1] // 2
        c, s = cos.double()[:, None, :], sin.double()[:, None, :]
        q, k = (x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s for x in (q, k))
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(q.device)
    same_sequence = seq_of_token[:, None] == seq_of_token[None, :]
    scores = scale * torch.einsum("ihd,jhd->hij", q, k)
    scores = scores.masked_fill(~same_sequence, float("-inf"))
    return torch.einsum("hij,jhd->ihd", torch.softmax(scores, -1), v)


def offsets(lengths, device):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def make_inputs(lengths, heads, head_dim, dtype, device, *, rope=True, tied=True, seed=0):
    """q, k, v with scores spread over several units (neither a flat nor a one-hot softmax), cu_seqlens,
    rotary tables (HF's layout, cos = cat(cos(f), cos(f)), when ``tied``; any values otherwise), upstream grad."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, heads, head_dim, generator=gen) * 1.5 for _ in range(3))
    cos = sin = None
    if rope:
        if tied:
            angles = torch.randn(n, head_dim // 2, generator=gen) * 3
            angles = torch.cat((angles, angles), -1)
            cos, sin = angles.cos(), angles.sin()
        else:
            cos, sin = torch.randn(n, head_dim, generator=gen), torch.randn(n, head_dim, generator=gen)
        cos, sin = cos.to(device), sin.to(device)
    grad = torch.randn(n, heads, head_dim, generator=gen)
    move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return move(q), move(k), move(v), offsets(lengths, device), cos, sin, grad.to(device)


def run_and_compare(face, q, k, v, cu_seqlens, cos, sin, grad, *, scale=None, tol=None, max_seqlen=None):
    tol = tol if tol is not None else TOL[q.dtype]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    max_seqlen = max(lengths, default=0) if max_seqlen is None else max_seqlen
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with mgpt_ops.use_backend(face):
        out = vision_attention(*leaves, cu_seqlens, max_seqlen, cos=cos, sin=sin, scale=scale)
        grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert all(g.dtype == q.dtype and g.shape == q.shape for g in grads)

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_scale = q.shape[-1] ** -0.5 if scale is None else scale
    ref_out = reference(*ref_leaves, cu_seqlens, cos, sin, ref_scale)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad.double())
    errors = {"out": rel_err(out, ref_out)}
    errors.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    assert max(errors.values()) < tol, errors
    return out, grads


# ---------------------------------------------------------------------------------------------------------
# Numerics against the reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("rope", [True, False])
def test_awkward_lengths_every_head_dim(face, head_dim, rope, device):
    # Around the block sizes (63, 64, 65), single tokens, and an empty sequence in the middle.
    inputs = make_inputs([1, 2, 63, 0, 64, 65], 2, head_dim, torch.float32, device, rope=rope, seed=head_dim)
    run_and_compare(face, *inputs)


@pytest.mark.parametrize("face", FACES)
def test_long_sequence(face, device):
    # 1000 tokens: several query and key blocks whatever the tiling, plus a short tail sequence.
    inputs = make_inputs([1000, 37], 1, 72, torch.float32, device, seed=1)
    run_and_compare(face, *inputs)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [72, 80])
def test_half_precision(face, dtype, head_dim, device):
    inputs = make_inputs([5, 130, 64, 1], 2, head_dim, dtype, device, seed=2)
    run_and_compare(face, *inputs)


@pytest.mark.parametrize("face", FACES)
def test_half_precision_windows(face, device):
    # Qwen2.5-VL windowed blocks: sequences of at most 64 tokens (the GPU kernels switch to 64-row tiles).
    inputs = make_inputs([64, 48, 64, 16, 1, 64], 2, 80, torch.bfloat16, device, seed=12)
    run_and_compare(face, *inputs)


@pytest.mark.parametrize("face", FACES)
def test_two_thousand_tiny_sequences(face, device):
    # 2,000 sequences in ONE call (the kernels launch one grid, programs past a sequence's end return at
    # once). Three in four are empty, the rest hold 1-3 tokens, spread over the whole range: each non-empty
    # sequence costs the Triton interpreter ~10 ms per kernel, and this keeps the test at ~20 s.
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 4, (2000,), generator=gen) * (torch.rand(2000, generator=gen) < 0.25)
    lengths = lengths.tolist()[:-1] + [2]  # the last program of the grid has work
    assert sum(n > 0 for n in lengths) > 400
    inputs = make_inputs(lengths, 1, 64, torch.float32, device, seed=3)
    run_and_compare(face, *inputs)


@pytest.mark.parametrize("face", FACES)
def test_one_sequence_many_heads_untied_tables_and_scale(face, device):
    # S = 1; cos/sin that are not a rotation (the contract's general formula); scale != D^-0.5; a loose
    # max_seqlen (programs past the sequence's end must do nothing).
    inputs = make_inputs([77], 5, 96, torch.float32, device, tied=False, seed=4)
    run_and_compare(face, *inputs, scale=0.3, max_seqlen=300)


@pytest.mark.parametrize("face", FACES)
def test_packed_qkv_and_strided_tables(face, device):
    q, k, v, cu, cos, sin, grad = make_inputs([9, 70, 3], 2, 80, torch.float32, device, seed=5)
    qkv = torch.stack((q, k, v), 1).requires_grad_()  # [N, 3, H, D]: q, k, v are strided views
    wide = torch.cat((cos, sin), -1)  # cos/sin as column slices of one table: row stride 2D
    with mgpt_ops.use_backend(face):
        out = vision_attention_packed(qkv, cu, 70, cos=wide[:, :80], sin=wide[:, 80:])
        (dqkv,) = torch.autograd.grad(out, (qkv,), grad)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves, cu, cos, sin, 80 ** -0.5)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    assert rel_err(out, ref) < 1e-5
    assert rel_err(dqkv, torch.stack(ref_grads, 1)) < 1e-5


@pytest.mark.parametrize("face", FACES)
def test_views_whose_strides_are_not_multiples_of_8(face, device):
    """The Triton kernels take strides in units of 8 elements; views with other strides (rows of D + 3 here,
    and a cos/sin table sliced out of a wider one) are copied to contiguous tensors first, not misread."""
    q, k, v, cu, cos, sin, grad = make_inputs([9, 70, 3], 2, 72, torch.float32, device, seed=6)
    padded = [torch.cat((t, torch.randn(*t.shape[:2], 3, device=device)), -1).requires_grad_() for t in (q, k, v)]
    tables = torch.cat((cos, sin, cos[:, :5]), -1)  # row stride 2 D + 5
    with mgpt_ops.use_backend(face):
        views = [t[..., :72] for t in padded]
        assert views[0].stride()[:2] == (2 * 75, 75)
        out = vision_attention(*views, cu, 70, cos=tables[:, :72], sin=tables[:, 72:144])
        grads = torch.autograd.grad(out, padded, grad)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves, cu, cos, sin, 72 ** -0.5)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    assert rel_err(out, ref) < 1e-5
    for g, ref_g in zip(grads, ref_grads):
        assert rel_err(g[..., :72], ref_g) < 1e-5 and (g[..., 72:] == 0).all()


@pytest.mark.parametrize("face", FACES)
@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(0, 150), min_size=1, max_size=4), head_dim=st.sampled_from(SUPPORTED_HEAD_DIMS),
       heads=st.integers(1, 3), rope=st.booleans(), seed=st.integers(0, 2**16))
def test_random_lengths(face, lengths, head_dim, heads, rope, seed):
    inputs = make_inputs(lengths, heads, head_dim, torch.float32, torch.device(DEVICE), rope=rope, seed=seed)
    run_and_compare(face, *inputs)


@pytest.mark.parametrize("face", FACES)
def test_empty_batch(face, device):
    q, k, v, cu, cos, sin, _ = make_inputs([0, 0], 2, 64, torch.float32, device)
    with mgpt_ops.use_backend(face):
        assert vision_attention(q, k, v, cu, 0, cos=cos, sin=sin).shape == (0, 2, 64)
        assert vision_attention(q, k, v, cu[:1], 0).shape == (0, 2, 64)  # S = 0


@pytest.mark.parametrize("face", FACES)
def test_backward_is_deterministic(face, device):
    q, k, v, cu, cos, sin, grad = make_inputs([150, 31], 1, 72, torch.bfloat16, device, seed=6)
    results = []
    for flag in (True, False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with mgpt_ops.use_backend(face):
            out = vision_attention(*leaves, cu, 150, cos=cos, sin=sin, deterministic=flag)
            results.append(torch.autograd.grad(out, leaves, grad.to(out.dtype)))
    assert all(torch.equal(a, b) for run in results[1:] for a, b in zip(run, results[0]))


# ---------------------------------------------------------------------------------------------------------
# Op registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("rope", [True, False])
def test_opcheck_both_ops(face, rope, device):
    q, k, v, cu, cos, sin, grad = make_inputs([3, 20, 0, 9], 1, 64, torch.float32, device, rope=rope, seed=7)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with mgpt_ops.use_backend(face):
        torch.library.opcheck(torch.ops.mgpt.vision_attention.default, (q, k, v, cu, 20, cos, sin, 0.2, False))
        out, lse = torch.ops.mgpt.vision_attention(q.detach(), k.detach(), v.detach(), cu, 20, cos, sin, 0.2, False)
        assert lse.shape == (1, q.shape[0]) and lse.dtype == torch.float32
        torch.library.opcheck(torch.ops.mgpt.vision_attention_backward.default,
                              (grad, q.detach(), k.detach(), v.detach(), out, lse, cu, 20, cos, sin, 0.2, True))


@pytest.mark.parametrize("face", FACES)
def test_compile_fullgraph_with_backward(face, device):
    q, k, v, cu, cos, sin, grad = make_inputs([6, 40, 1], 2, 80, torch.float32, device, seed=8)

    def loss_fn(q, k, v):
        out = vision_attention(q, k, v, cu, 40, cos=cos, sin=sin)
        return (out * grad).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with mgpt_ops.use_backend(face):
            loss = fn(*leaves)
            results.append([loss] + list(torch.autograd.grad(loss, leaves)))
    assert all(rel_err(c, e) < 1e-6 for e, c in zip(*results))


def test_value_checks_run_inside_the_compiled_op(device):
    # Data-dependent checks live in the op, so a compiled caller still gets the clear error.
    q, k, v, cu, cos, sin, _ = make_inputs([4, 6], 1, 64, torch.float32, device, seed=9)
    torch._dynamo.reset()
    compiled = torch.compile(lambda c: vision_attention(q, k, v, c, 6, cos=cos, sin=sin), fullgraph=True)
    compiled(cu)
    bad = cu.clone()
    bad[1] = 7  # [0, 7, 10]: well-formed offsets, but the first sequence (7 tokens) exceeds max_seqlen = 6
    with pytest.raises(ValueError, match="'max_seqlen'=6 is smaller than the longest sequence"):
        compiled(bad)


def test_checked_offsets_are_rechecked_after_in_place_change(device):
    q, k, v, cu, _, _, _ = make_inputs([4, 6], 1, 64, torch.float32, device, rope=False, seed=10)
    vision_attention(q, k, v, cu, 6)  # valid: the result is remembered for this tensor and version
    cu[1] = 8  # [0, 8, 10] (in place: the version changes)
    with pytest.raises(ValueError, match="longest sequence"):
        vision_attention(q, k, v, cu, 6)
    with torch.inference_mode():  # inference tensors have no version counter: checked on every call
        offsets_now = offsets([4, 6], device)
        vision_attention(q, k, v, offsets_now, 6)
        offsets_now[1] = 8
        with pytest.raises(ValueError, match="longest sequence"):
            vision_attention(q, k, v, offsets_now, 6)


def test_pinning_a_face_without_its_kernel_is_an_error(device, monkeypatch):
    monkeypatch.delenv("MGPT_BACKEND", raising=False)
    q, k, v, cu, _, _, _ = make_inputs([4], 1, 64, torch.float32, device, rope=False)
    for face in ("cpu", "cuda"):
        if not kernel_registered(face):
            with mgpt_ops.use_backend(face), pytest.raises(RuntimeError, match=f"{face!r} is pinned but"):
                vision_attention(q, k, v, cu, 4)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
def _bad(**change):
    return lambda a: {**a, **{name: fn(a) for name, fn in change.items()}}


BAD_INPUTS = {
    # case: (change to valid arguments, expected error, pattern its message must match)
    "cu_seqlens int64": (_bad(cu_seqlens=lambda a: a["cu_seqlens"].long()), TypeError, "'cu_seqlens'.*int32"),
    "cu_seqlens 2-D": (_bad(cu_seqlens=lambda a: a["cu_seqlens"][None]), ValueError, "'cu_seqlens'.*1 dim"),
    "cu_seqlens empty": (_bad(cu_seqlens=lambda a: a["cu_seqlens"][:0]), ValueError, "'cu_seqlens'.*S \\+ 1"),
    "cu_seqlens not from 0": (_bad(cu_seqlens=lambda a: a["cu_seqlens"] + 1), ValueError, "'cu_seqlens'.*start at 0"),
    "cu_seqlens decreasing": (_bad(cu_seqlens=lambda a: torch.tensor([0, 7, 3, 10], dtype=torch.int32)),
                              ValueError, "'cu_seqlens'.*non-decreasing.*cu_seqlens\\[1\\]=7"),
    "cu_seqlens end != N": (_bad(cu_seqlens=lambda a: torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError,
                            "'cu_seqlens'.*end at N=10"),
    "max_seqlen too small": (_bad(max_seqlen=lambda a: 5), ValueError, "'max_seqlen'=5.*longest sequence \\(6"),
    "max_seqlen tensor": (_bad(max_seqlen=lambda a: torch.tensor(6)), TypeError, "'max_seqlen'.*Python int"),
    "max_seqlen negative": (_bad(max_seqlen=lambda a: -1), TypeError, "'max_seqlen'"),
    "head dim 48": (_bad(**{n: (lambda a, n=n: a[n][..., :48]) for n in ("q", "k", "v", "cos", "sin")}),
                    ValueError, "'q'.*D=48.*\\(64, 72, 80, 96, 128\\)"),
    "k shape": (_bad(k=lambda a: a["k"][:, :1]), ValueError, "'k'.*shape"),
    "v tokens": (_bad(v=lambda a: a["v"][:9]), ValueError, "'v'.*shape"),
    "q/k/v dtypes differ": (_bad(v=lambda a: a["v"].half()), TypeError, "q, k, v.*v=float16"),
    "float64 q": (_bad(q=lambda a: a["q"].double()), TypeError, "'q'.*float64"),
    "2-D q": (_bad(q=lambda a: a["q"][:, 0]), ValueError, "'q'.*3 dim"),
    "k on meta": (_bad(k=lambda a: a["k"].to("meta")), ValueError, "'k'.*meta"),
    "q last dim strided": (_bad(q=lambda a: torch.cat((a["q"], a["q"]), -1)[..., ::2]), ValueError,
                           "'q'.*contiguous last dimension"),
    "cos without sin": (_bad(sin=lambda a: None), ValueError, "'cos' and 'sin' must be given together"),
    "sin without cos": (_bad(cos=lambda a: None), ValueError, "'cos' and 'sin' must be given together"),
    "cos shape": (_bad(cos=lambda a: a["cos"][:, :32]), ValueError, "'cos'.*shape \\[10, 64\\]"),
    "cos per head": (_bad(cos=lambda a: a["cos"][:, None].expand(10, 2, 64)), ValueError, "'cos'.*shape"),
    "sin dtype": (_bad(sin=lambda a: a["sin"].bfloat16()), TypeError, "'sin'.*float32"),
    "sin last dim strided": (_bad(sin=lambda a: torch.cat((a["sin"], a["sin"]), -1)[:, ::2]), ValueError,
                             "'sin'.*contiguous last dimension"),
    "scale nan": (_bad(scale=lambda a: float("nan")), ValueError, "'scale'"),
    "deterministic str": (_bad(deterministic=lambda a: "yes"), TypeError, "'deterministic'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_argument(case, device):
    q, k, v, cu, cos, sin, _ = make_inputs([4, 6], 2, 64, torch.float32, device, seed=11)
    valid = dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=6, cos=cos, sin=sin, scale=None, deterministic=False)
    change, error, pattern = BAD_INPUTS[case]
    args = change(valid)
    if isinstance(args["cu_seqlens"], torch.Tensor):
        args["cu_seqlens"] = args["cu_seqlens"].to(device)
    with pytest.raises(error, match=pattern):
        vision_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens"), args.pop("max_seqlen"),
                         **args)


def test_cu_seqlens_values_checked_in_eager_but_not_during_graph_capture(device, monkeypatch):
    """A device->host read is illegal inside CUDA-graph capture: the value check runs in the eager warm-up
    (which always precedes capture) and is skipped while capturing. Simulated on any device."""
    from mgpt_ops.vision import attention as attention_module

    q, k, v, _, cos, sin, _ = make_inputs([4, 6], 2, 64, torch.float32, device, seed=12)
    bad = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)  # ends at 9, q has 10 tokens
    with pytest.raises(ValueError, match="end at N=10"):
        vision_attention(q, k, v, bad, 6, cos=cos, sin=sin)
    monkeypatch.setattr(attention_module, "_capturing_cuda_graph", lambda: True)
    attention_module.check_cu_seqlens_values(bad, 10, 6)  # would raise if it read the values


def test_bad_packed_qkv(device):
    qkv = torch.randn(10, 2, 2, 64, device=device)
    with pytest.raises(ValueError, match="'qkv'.*\\[N, 3, H, D\\]"):
        vision_attention_packed(qkv, offsets([10], device), 10)
    with pytest.raises(ValueError, match="'qkv'.*4 dim"):
        vision_attention_packed(qkv[0], offsets([10], device), 10)


# ---------------------------------------------------------------------------------------------------------
# The compiled (non-interpreted) Triton kernels: compiled for Hopper as launched (tests/hopper_compile.py)
# ---------------------------------------------------------------------------------------------------------
# (label, dtype, head dim, RoPE, max_seqlen): a packed qkv (the vision tower's layout) of 16 heads for every head
# dim in bf16; 64-token windows; fp16 without RoPE; fp32.
HOPPER_CASES = ([("bf16", d, True, 4096) for d in SUPPORTED_HEAD_DIMS]
                + [("bf16", 80, True, 64), ("fp16", 72, False, 4096), ("fp32", 72, True, 4096)])
_LAUNCHES = """
from mgpt_ops.vision import attention_triton as at
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATTERNS = {"wgmma": r"wgmma.mma_async"}
with compile_launches_for_hopper() as kernels:
    for dtype, head_dim, rope, max_seqlen in CASES:
        kernels.label = f"{dtype} {head_dim} {rope} {max_seqlen}"
        n = 2 * max_seqlen
        q, k, v = torch.randn(n, 3, 16, head_dim).to(DTYPES[dtype]).unbind(1)
        cu = torch.tensor([0, max_seqlen // 2, n], dtype=torch.int32)
        cos, sin = (torch.randn(n, head_dim), torch.randn(n, head_dim)) if rope else (None, None)
        out, lse = at.forward(q, k, v, cu, max_seqlen, cos, sin, head_dim ** -0.5)
        at.backward(torch.randn_like(out), q, k, v, out, lse, cu, max_seqlen, cos, sin, head_dim ** -0.5)
"""


def test_triton_kernels_compile_for_hopper_as_launched():
    """The interpreter accepts code that the compiler rejects (non-constexpr globals, unsupported dot shapes,
    shared memory overflow), and only a real launch shows what Triton specialises: compile every kernel as the
    op launches it for sm_90 (no GPU needed). Half precision: tensor cores (wgmma), shared memory within an
    SM's, no register spills; D = 72 (pieces 64 + 16) compiles to D = 80's tiles -- with its head stride of 72
    seen as unaligned, its loads left the software pipeline (40 KB of shared memory instead of 140 KB) and
    every kernel spilled."""
    kernels = compile_in_subprocess(f"CASES = {HOPPER_CASES!r}" + _LAUNCHES)
    attention = ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel")
    for dtype, head_dim, rope, max_seqlen in HOPPER_CASES:
        label = f"{dtype} {head_dim} {rope} {max_seqlen}"
        for name in attention:
            kernel = kernels.named(label, name)
            assert kernel.shared_bytes <= SHARED_MEMORY_PER_BLOCK, kernel
            if dtype != "fp32":  # fp32 (tests only) runs on the FMA units and may spill
                assert kernel.count("wgmma") > 0 and kernel.stack_bytes == 0, kernel
        assert all(k.stack_bytes == 0 for k in kernels if k.label == label and k.name == "_rope_kernel")
    for name in attention:
        d72, d80 = kernels.named("bf16 72 True 4096", name), kernels.named("bf16 80 True 4096", name)
        assert d72.shared_bytes == d80.shared_bytes, (d72, d80)
