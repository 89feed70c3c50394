"""Context parallelism (mgpt_train.parallel.context_parallel): load-balanced sharding, and cp_attention on gloo
ranks (cp=4 on the world group, cp=2 on the "cp" sub-mesh of ParallelDims) against a float64 per-sample causal
attention over the whole packed sequence: output and dq/dk/dv, packed samples whose boundaries fall inside
chunks, grouped-query attention, samples of length 1. One spawn of 4 ranks runs every distributed case.
The varlen layout of the GPU kernel (``segmented_attention`` / ``chunk_segments``) is checked in one process
with a CPU stand-in for FlashAttention varlen (per-segment SDPA, causal aligned bottom-right) on random
packings, against the same float64 reference: output and gradients.
"""

import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE, rel_err
from gloo_ranks import run_on_gloo_ranks
from mgpt_train.parallel import (cp_attention, local_positions, make_cp_attention_fn, packed_causal_mask,
                                shard_sequence, unshard_sequence)
from mgpt_train.parallel.context_parallel import _cuda_varlen, chunk_segments, segmented_attention
from mgpt_train.parallel_dims import ParallelDims

WORLD = 4
# (name, cu_seqlens, q heads, kv heads, head dim, v head dim, scale); T = 24 -> chunks of 3 (cp=4) or 6 (cp=2).
CASES = [
    ("packed_gqa", [0, 1, 5, 13, 14, 24], 4, 2, 8, 8, None),  # lengths 1, 4, 8, 1, 10: boundaries inside chunks
    ("one_sample_mha", [0, 24], 3, 3, 4, 6, 0.3),            # one causal sample, v wider than q/k, custom scale
    ("single_tokens_mqa", [0, 1, 2, 3, 9, 10, 24], 4, 1, 8, 8, None),
]


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float("inf") if torch.isnan(out).any() else ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference_attention64(q, k, v, cu_seqlens, scale):
    """Per-sample causal softmax attention in float64 (grouped heads repeated), written from the formula."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    outputs = []
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        scores = torch.einsum("ihd,jhd->hij", q[start:end], k[start:end]) * scale
        future = torch.ones(end - start, end - start, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        outputs.append(torch.einsum("hij,jhd->ihd", probs, v[start:end]))
    return torch.cat(outputs)


# ----------------------------------------------------------------------------------- sharding (one process)

@settings(max_examples=25, deadline=None)
@given(cp_size=st.integers(1, 5), chunk=st.integers(1, 4), width=st.integers(1, 3))
def test_shard_unshard_roundtrip_and_positions(cp_size, chunk, width):
    seq_len = 2 * cp_size * chunk
    x = torch.randn(width, seq_len, 2)  # sharded along dim 1
    shards = [shard_sequence(x, 1, r, cp_size) for r in range(cp_size)]
    assert torch.equal(unshard_sequence(shards, 1), x)
    owners = torch.cat([local_positions(seq_len, r, cp_size) for r in range(cp_size)])
    assert sorted(owners.tolist()) == list(range(seq_len))  # every token on exactly one rank
    for rank, shard in enumerate(shards):
        positions = local_positions(seq_len, rank, cp_size)
        assert torch.equal(shard, x[:, positions])
        # Causal work of a query at position p is p + 1 keys: equal on every rank (the point of 2*cp chunks).
        assert (positions + 1).sum().item() * cp_size == seq_len * (seq_len + 1) // 2


def test_sharding_errors_name_the_numbers():
    with pytest.raises(ValueError, match="sequence length 10 is not divisible by 2\\*cp = 4"):
        shard_sequence(torch.randn(10, 3), 0, 0, 2)
    with pytest.raises(ValueError, match="sequence length 12 is not divisible by 2\\*cp = 8"):
        local_positions(12, 1, 4)
    with pytest.raises(ValueError, match="'cp_rank' must be an int in \\[0, 2\\), got 2"):
        shard_sequence(torch.randn(8), 0, 2, 2)
    with pytest.raises(ValueError, match="same even length"):
        unshard_sequence([torch.randn(4), torch.randn(6)], 0)


def test_packed_causal_mask_matches_per_sample_triangles():
    cu_seqlens = torch.tensor([0, 1, 4, 9, 10], dtype=torch.int32)
    expected = torch.zeros(10, 10, dtype=torch.bool)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    positions = local_positions(10, 1, 5)  # the rows a rank at cp=5 would own
    assert torch.equal(packed_causal_mask(positions, torch.arange(10), cu_seqlens), expected[positions])


def varlen_on_cpu(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """FlashAttention varlen's contract written with SDPA: segment i of q attends segment i of k/v, causal with
    the last query aligned to the last key (bottom-right)."""
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    assert max_q == max(b - a for a, b in zip(cu_q[:-1], cu_q[1:]))
    assert max_k == max(b - a for a, b in zip(cu_k[:-1], cu_k[1:]))
    outs = []
    for i in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        lq, lk = qs.shape[0], ks.shape[0]
        visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        out = torch.nn.functional.scaled_dot_product_attention(
            qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), attn_mask=visible, scale=scale,
            enable_gqa=qs.shape[1] != ks.shape[1])
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


@settings(max_examples=40, deadline=None)
@given(cp_size=st.integers(1, 4), chunk=st.integers(1, 5), cuts=st.lists(st.integers(0, 40), max_size=8),
       kv_heads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_segmented_varlen_layout_equals_packed_causal_attention(cp_size, chunk, cuts, kv_heads, seed):
    total = 2 * cp_size * chunk
    bounds = sorted({0, total} | {c % (total + 1) for c in cuts})
    bounds = [0] + [b for b in bounds if 0 < b < total] + [total]
    if cuts and cuts[0] % 3 == 0:  # an empty sample too (a repeated boundary)
        bounds.insert(1, bounds[1])
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(total, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(total, kv_heads, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(total, kv_heads, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    grad = torch.randn(total, 2, 4, dtype=torch.float64, generator=gen)
    reference = reference_attention64(q, k, v, bounds, None)
    ref_grads = torch.autograd.grad(reference, (q, k, v), grad)
    outs = []
    for rank in range(cp_size):
        late = 2 * cp_size - 1 - rank
        chunks = [(rank * chunk, (rank + 1) * chunk), (late * chunk, (late + 1) * chunk)]
        local_q = shard_sequence(q, 0, rank, cp_size)
        outs.append(segmented_attention(local_q, k, v, bounds, chunks, varlen_on_cpu))
    out = unshard_sequence(outs, 0)
    assert _rel(out, reference) < 1e-12
    for mine, ref in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads):
        assert _rel(mine, ref) < 1e-12


@pytest.mark.skipif(DEVICE != "cuda", reason="FlashAttention varlen runs on CUDA only (MGPT_TEST_DEVICE=cuda)")
def test_segmented_attention_on_flash_varlen_matches_float64():
    """The CUDA kernel cp_attention uses, on bf16 inputs of a cp=2 layout: output and gradients."""
    varlen = _cuda_varlen()
    assert varlen is not None, "this torch has no torch.nn.attention.varlen"
    bounds, cp_size, chunk = [0, 100, 357, 512, 1024], 2, 256
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1024, heads, 128, generator=gen) for heads in (8, 2, 2))
    grad = torch.randn(1024, 8, 128, generator=gen)
    reference = reference_attention64(q, k, v, bounds, None)
    cuda = [x.to("cuda", torch.bfloat16).requires_grad_() for x in (q, k, v)]
    outs = []
    for rank in range(cp_size):
        late = 2 * cp_size - 1 - rank
        chunks = [(rank * chunk, (rank + 1) * chunk), (late * chunk, (late + 1) * chunk)]
        outs.append(segmented_attention(shard_sequence(cuda[0], 0, rank, cp_size), cuda[1], cuda[2], bounds, chunks,
                                        varlen))
    out = unshard_sequence(outs, 0)
    assert rel_err(out, reference) < 2e-2
    out.backward(grad.to("cuda", torch.bfloat16))
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref_grads = torch.autograd.grad(reference_attention64(q64, k64, v64, bounds, None), (q64, k64, v64), grad.double())
    for mine, ref in zip((x.grad for x in cuda), ref_grads):
        assert rel_err(mine, ref) < 3e-2


def test_chunk_segments_layout():
    # samples [0, 3) [3, 10) [10, 12); the chunk [5, 11): rows 5..9 of sample 1 see keys 3..9, row 10 sees 10
    assert chunk_segments([0, 3, 10, 12], 5, 11) == ([0, 5, 6], [0, 7, 8], 3)
    assert chunk_segments([0, 12], 4, 8) == ([0, 4], [0, 8], 0)


@pytest.mark.parametrize("change, match", [
    (dict(q=torch.randn(4, 2)), "'q' must be a floating tensor \\[T_local, heads, head_dim\\]"),
    (dict(k=torch.randn(4, 3, 8), v=torch.randn(4, 3, 8)), "'q' heads \\(4\\) must be a multiple of 'k' heads"),
    (dict(v=torch.randn(3, 2, 8)), "must share T_local"),
    (dict(k=torch.randn(4, 2, 8, dtype=torch.float64)), "must share one dtype"),
    (dict(cu_seqlens=torch.tensor([0.0, 8.0])), "'cu_seqlens' must be an integer tensor"),
    (dict(global_pos=torch.arange(5)), "'global_pos' must be an integer tensor \\[T_local = 4\\]"),
])
def test_attention_input_errors(change, match):
    args = dict(q=torch.randn(4, 4, 8), k=torch.randn(4, 2, 8), v=torch.randn(4, 2, 8),
                cu_seqlens=torch.tensor([0, 8], dtype=torch.int32), global_pos=torch.tensor([0, 1, 6, 7]))
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        cp_attention(**args)  # checked before any collective: no process group needed


# ----------------------------------------------------------------------------------- cp_attention (4 gloo ranks)

def _case(case, group, seed: int) -> dict:
    name, cu_list, heads, kv_heads, head_dim, v_dim, scale = case
    cp_rank, cp_size = dist.get_rank(group), dist.get_world_size(group)
    seq_len = cu_list[-1]
    gen = torch.Generator().manual_seed(seed)  # identical full tensors on every rank of the group
    q = torch.randn(seq_len, heads, head_dim, generator=gen)
    k = torch.randn(seq_len, kv_heads, head_dim, generator=gen)
    v = torch.randn(seq_len, kv_heads, v_dim, generator=gen)
    grad_out = torch.randn(seq_len, heads, v_dim, generator=gen)
    cu_seqlens = torch.tensor(cu_list, dtype=torch.int32)

    local = [shard_sequence(t, 0, cp_rank, cp_size).requires_grad_() for t in (q, k, v)]
    out = cp_attention(*local, cu_seqlens, local_positions(seq_len, cp_rank, cp_size), group, scale=scale)
    grads = torch.autograd.grad(out, local, shard_sequence(grad_out, 0, cp_rank, cp_size))

    full = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention64(*full, cu_list, scale)
    ref_grads = torch.autograd.grad(ref_out, full, grad_out.double())

    gathered = [None] * cp_size  # every rank's local output, reassembled: exercises unshard_sequence
    dist.all_gather_object(gathered, out.detach(), group=group)
    names = ("out", "dq", "dk", "dv")
    errors = {n: _rel(got, shard_sequence(ref, 0, cp_rank, cp_size))
              for n, got, ref in zip(names, (out, *grads), (ref_out, *ref_grads))}
    if scale is None:  # the model-signature kernel (default scale), global positions from the layout
        with torch.no_grad():
            kernel_out = make_cp_attention_fn(group)(*local, cu_seqlens, None)
        errors["kernel_fn_out"] = _rel(kernel_out, shard_sequence(ref_out, 0, cp_rank, cp_size))
    return {"errors": errors,
            "unsharded_out": _rel(unshard_sequence(gathered, 0), ref_out),
            "dtype_ok": out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)}


def _rank_body(rank: int) -> dict:
    mesh = ParallelDims(world_size=WORLD, dp_shard=2, cp=2).build_mesh("cpu")
    cp2_group = mesh["cp"].get_group()
    result = {"cp_peers": sorted(dist.get_process_group_ranks(cp2_group)), "cases": {}}
    for case in CASES:
        result["cases"][f"cp4/{case[0]}"] = _case(case, dist.group.WORLD, seed=7)
        # The two cp=2 groups get different data (seed from the dp_shard coordinate).
        result["cases"][f"cp2/{case[0]}"] = _case(case, cp2_group, seed=11 + mesh["dp_shard"].get_local_rank())
    try:  # 3 local tokens cannot be two equal chunks: T = 12 is not divisible by 2*cp = 8
        cp_attention(torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4),
                     torch.tensor([0, 12]), torch.arange(3), dist.group.WORLD)
        result["odd_error"] = "no error"
    except ValueError as exc:
        result["odd_error"] = str(exc)
    return result


@pytest.mark.distributed
def test_cp_attention_matches_float64_reference_on_cp2_and_cp4(tmp_path):
    for rank, result in enumerate(run_on_gloo_ranks(_rank_body, WORLD, tmp_path)):
        assert result["cp_peers"] == [rank - rank % 2, rank - rank % 2 + 1]  # cp is the fast mesh dim
        assert "sequence length 12 is not divisible by 2*cp = 8" in result["odd_error"], result["odd_error"]
        assert len(result["cases"]) == 2 * len(CASES)
        for name, case in result["cases"].items():
            assert case["dtype_ok"], (rank, name)
            assert ("kernel_fn_out" in case["errors"]) == (not name.endswith("one_sample_mha")), (rank, name)
            assert max(case["errors"].values()) < 1e-5, (rank, name, case["errors"])
            assert case["unsharded_out"] < 1e-5, (rank, name, case["unsharded_out"])
