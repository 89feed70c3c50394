"""C++/CUDA kernels mgpt::logits_row_stats and mgpt::logits_row_grad against a float64 statement of the math.

Written here, independently of mgpt_ops/rl/_row_ops.py, with z = logits * inv_temperature (float64):
    lse = logsumexp(z),  p = exp(z - lse),  mean_z = sum p z,  zy = z[label - vocab_start] (0 if absent)
    dlogits = inv_t * (g_lp * (onehot(label) - p) - g_ent * p * (z - mean_z)),  ignored rows all 0.
The kernels return stats = (m, s, u, zy) with lse = m + log s and mean_z = m + u / s; the tests compare
those derived values (plus m == max z exactly), not the raw (s, u), which are a representation detail.

Tolerances: fp32 results within ~1e-5 relative; where |z| is large the fp32 rounding of z itself
(|z| * 6e-8 absolute in an exponent) dominates, so the bound grows with max|z|. bf16 output 1e-2, fp16 1e-3
(norm-wise relative error; the rounding of the output dtype alone is 4e-3 / 5e-4 per element at worst).
"""

from __future__ import annotations

import conftest
import pytest
import torch
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import mgpt_ops  # noqa: F401  (loads the extension: the ops' schemas and kernels)
from mgpt_ops.rl._row_ops import combine_row_stats  # importing it also registers the ops' fakes

DEVICE = conftest.test_device()
STATS = torch.ops.mgpt.logits_row_stats
GRAD = torch.ops.mgpt.logits_row_grad
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


# ------------------------------------------------------------------------------------------------------
# Inputs and the float64 statement
# ------------------------------------------------------------------------------------------------------
def make_inputs(rows, vocab, *, scale=5.0, offset=0.0, vocab_start=0, labels="inside", ignore_index=-100,
                seed=0):
    """Random logits (never zeros) and labels. labels: 'inside' the shard, 'below' / 'above' it, or
    'mixed' (all three); row 0 is ignored whenever there are 3 or more rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * scale + offset
    inside = vocab_start + torch.randint(0, vocab, (rows,), generator=gen)
    below = torch.randint(0, max(vocab_start, 1), (rows,), generator=gen)
    above = vocab_start + vocab + torch.randint(0, 1000, (rows,), generator=gen)
    pick = {"inside": inside, "below": below, "above": above}
    if labels == "mixed":
        choice = torch.randint(0, 3, (rows,), generator=gen)
        lab = torch.where(choice == 0, inside, torch.where(choice == 1, below, above))
    else:
        lab = pick[labels]
    if rows >= 3:
        lab[0] = ignore_index
    return logits.to(DEVICE), lab.to(DEVICE)


def label_columns(labels, vocab_start, vocab, ignore_index):
    lab = labels.cpu().long()
    col = lab - vocab_start
    in_shard = (lab != ignore_index) & (col >= 0) & (col < vocab)
    return col.clamp(0, vocab - 1), in_shard, lab == ignore_index


def reference_stats(logits, labels, inv_t, vocab_start, ignore_index):
    """(lse, mean_z, zy) in float64 on the CPU."""
    z = logits.double().cpu() * inv_t
    lse = torch.logsumexp(z, dim=1)
    p = torch.exp(z - lse[:, None])
    mean_z = torch.where(p > 0, p * z, 0.0).sum(1)  # p log p -> 0 at masked (-inf) entries
    col, in_shard, _ = label_columns(labels, vocab_start, z.shape[1], ignore_index)
    zy = torch.where(in_shard, z.gather(1, col[:, None])[:, 0], 0.0)
    return lse, mean_z, zy


def reference_grad(logits, labels, lse, mean_z, g_lp, g_ent, inv_t, vocab_start, ignore_index):
    """dlogits in float64 on the CPU; lse/mean_z/g_* are the (fp32) tensors the kernel gets."""
    z = logits.double().cpu() * inv_t
    lse, mean_z, g_lp, g_ent = (t.double().cpu()[:, None] for t in (lse, mean_z, g_lp, g_ent))
    p = torch.exp(z - lse)
    col, in_shard, ignored = label_columns(labels, vocab_start, z.shape[1], ignore_index)
    onehot = torch.zeros_like(z).scatter_(1, col[:, None], 1.0) * in_shard[:, None]
    dz = g_lp * (onehot - p) - g_ent * torch.where(p > 0, p * (z - mean_z), 0.0)
    return torch.where(ignored[:, None], 0.0, dz) * inv_t


def derived(stats):
    m, s, u, zy = stats.double().cpu().unbind(1)
    return m + torch.log(s), m + u / s, zy


def check_stats(logits, labels, inv_t, vocab_start=0, ignore_index=-100):
    stats = STATS(logits, labels, inv_t, vocab_start, ignore_index)
    assert stats.shape == (logits.shape[0], 4) and stats.dtype == torch.float32 and stats.device == logits.device
    # m is the exact fp32 max of z: a max of rounded products, no arithmetic of its own.
    assert torch.equal(stats[:, 0], (logits * inv_t).amax(dim=1))
    lse, mean_z, zy = reference_stats(logits, labels, inv_t, vocab_start, ignore_index)
    got_lse, got_mean, got_zy = derived(stats)
    zmax = max(1.0, logits.abs().max().item() * inv_t)
    tol = 1e-5 + 2e-7 * zmax  # fp32 rounding of z (|z| * 2^-24 per product) grows with |z|
    torch.testing.assert_close(got_lse, lse, rtol=tol, atol=tol * zmax)
    torch.testing.assert_close(got_mean, mean_z, rtol=tol, atol=tol * zmax)
    torch.testing.assert_close(got_zy, zy, rtol=1e-6, atol=1e-6 * zmax)
    return stats


def check_grad(logits, labels, inv_t, out_dtype, vocab_start=0, ignore_index=-100, seed=1):
    """Gradient with lse/mean_z from the float64 statement (rounded to fp32, as a caller passes them)."""
    lse, mean_z, _ = reference_stats(logits, labels, inv_t, vocab_start, ignore_index)
    gen = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(logits.shape[0], generator=gen)
    g_ent = torch.randn(logits.shape[0], generator=gen)
    args = [t.float().to(DEVICE) for t in (lse, mean_z, g_lp, g_ent)]
    out = GRAD(logits, labels, *args, inv_t, vocab_start, ignore_index, out_dtype)
    assert out.shape == logits.shape and out.dtype == out_dtype and out.device == logits.device
    ref = reference_grad(logits, labels, *args, inv_t, vocab_start, ignore_index)
    zmax = max(1.0, logits.abs().max().item() * inv_t)
    # Norm-wise relative error; the absolute floor covers rows whose true gradient is ~0 (Vs = 1: p = 1),
    # where only the fp32 rounding of lse/mean_z (|z| * 6e-8) is left.
    floor = 1e-6 * zmax * logits.shape[0] ** 0.5 / max(ref.norm().item(), 1e-30)
    assert rel_err(out, ref) < OUT_TOL[out_dtype] + 2e-7 * zmax + floor
    ignored = labels.cpu().long() == ignore_index
    assert not out.cpu()[ignored].any(), "ignored rows must be exactly zero"
    return out, args


# ------------------------------------------------------------------------------------------------------
# Shapes: awkward vocab sizes (1, odd, not a multiple of 4, a full Qwen vocabulary), few and many rows
# ------------------------------------------------------------------------------------------------------
VOCABS = [1, 3, 7, 4096 + 5, 151936]
ROWS = [1, 5, 64]


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", ROWS)
def test_stats_match_float64(rows, vocab):
    logits, labels = make_inputs(rows, vocab, seed=rows * 7 + vocab)
    check_stats(logits, labels, 0.7)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", ROWS)
def test_grad_matches_float64(rows, vocab, out_dtype):
    logits, labels = make_inputs(rows, vocab, seed=rows * 11 + vocab)
    check_grad(logits, labels, 0.7, out_dtype)


@pytest.mark.parametrize("where", ["inside", "below", "above", "mixed"])
def test_label_relative_to_vocab_shard(where):
    """A shard [vocab_start, vocab_start + Vs): zy and the one-hot only where the label falls inside."""
    logits, labels = make_inputs(9, 1001, vocab_start=5000, labels=where, seed=3)
    stats = check_stats(logits, labels, 1.0, vocab_start=5000)
    _, in_shard, _ = label_columns(labels, 5000, 1001, -100)
    assert not stats[:, 3].cpu()[~in_shard].any()
    check_grad(logits, labels, 1.0, torch.float32, vocab_start=5000)


@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_ignored_rows(ignore_index):
    """Rows labelled ignore_index get zy = 0 and an all-zero gradient, also when ignore_index is a valid id."""
    logits, labels = make_inputs(6, 50, ignore_index=ignore_index, seed=4)
    labels[3] = ignore_index
    labels[4] = 7 if ignore_index != 7 else 8
    stats = check_stats(logits, labels, 1.0, ignore_index=ignore_index)
    assert stats[0, 3].item() == 0.0 and stats[3, 3].item() == 0.0
    out, _ = check_grad(logits, labels, 1.0, torch.bfloat16, ignore_index=ignore_index)
    assert out[4].float().abs().sum() > 0


@pytest.mark.parametrize("inv_t", [0.25, 1.0, 1.7])
def test_temperature(inv_t):
    logits, labels = make_inputs(5, 4101, seed=5)
    check_stats(logits, labels, inv_t)
    check_grad(logits, labels, inv_t, torch.float32)


@pytest.mark.parametrize("scale,offset", [(80.0, 0.0), (3.0, 500.0), (30.0, -2000.0)])
def test_large_magnitude_logits(scale, offset):
    """No overflow: everything is centred on the row max before exponentiating."""
    logits, labels = make_inputs(5, 20011, scale=scale, offset=offset, seed=6)
    stats = check_stats(logits, labels, 1.0)
    assert torch.isfinite(stats).all()
    out, _ = check_grad(logits, labels, 1.0, torch.float32)
    assert torch.isfinite(out).all()


def test_masked_vocabulary_minus_inf():
    """-inf logits (masked ids) have p = 0: finite stats, exactly zero gradient there."""
    logits, labels = make_inputs(5, 3001, seed=7)
    mask = torch.rand(5, 3001, generator=torch.Generator().manual_seed(8)) < 0.3
    mask[:, 0:4] = True  # masked head elements, including a whole aligned group
    labels_cpu = labels.cpu()
    for row in range(5):
        if 0 <= labels_cpu[row] < 3001:
            mask[row, labels_cpu[row]] = False
    logits = logits.masked_fill(mask.to(DEVICE), float("-inf"))
    stats = check_stats(logits, labels, 0.7)
    assert torch.isfinite(stats).all()
    out, _ = check_grad(logits, labels, 0.7, torch.float32)
    assert torch.isfinite(out).all() and not out.cpu()[mask].any()


def test_many_rows():
    """Enough rows that the CUDA kernels keep one CTA per row (no row pieces); odd Vs: misaligned rows."""
    logits, labels = make_inputs(700, 257, labels="mixed", vocab_start=100, seed=9)
    check_stats(logits, labels, 1.3, vocab_start=100)
    check_grad(logits, labels, 1.3, torch.bfloat16, vocab_start=100)


def test_unaligned_storage_offset():
    """A contiguous logits view that starts 4 bytes past an aligned address."""
    base, labels = make_inputs(1, 6 * 1001 + 1, seed=10)
    logits = base.view(-1)[1:].view(6, 1001)
    labels = make_inputs(6, 1001, seed=10)[1]
    assert logits.is_contiguous() and logits.data_ptr() % 16 != 0
    check_stats(logits, labels, 0.7)
    for dtype in (torch.float32, torch.bfloat16):
        check_grad(logits, labels, 0.7, dtype)


def test_int32_labels():
    logits, labels = make_inputs(5, 777, labels="mixed", vocab_start=30, seed=11)
    check_stats(logits, labels.int(), 0.7, vocab_start=30)
    check_grad(logits, labels.int(), 0.7, torch.float32, vocab_start=30)


@pytest.mark.parametrize("rows", [1, 3])
def test_rows_cut_into_pieces(rows):
    """With more threads than rows, the CPU kernel cuts each row into pieces merged afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        logits, labels = make_inputs(rows, 151936, seed=12)
        check_stats(logits, labels, 0.7)
        check_grad(logits, labels, 0.7, torch.float32)
    finally:
        torch.set_num_threads(old)


def test_no_rows():
    logits = torch.empty(0, 10, device=DEVICE)
    labels = torch.empty(0, dtype=torch.long, device=DEVICE)
    assert STATS(logits, labels, 1.0, 0, -100).shape == (0, 4)
    vec = torch.empty(0, device=DEVICE)
    assert GRAD(logits, labels, vec, vec, vec, vec, 1.0, 0, -100, torch.bfloat16).shape == (0, 10)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 700), vocab_start=st.integers(0, 40),
       inv_t=st.sampled_from([0.5, 1.0, 1.3]), scale=st.sampled_from([1.0, 8.0]),
       labels=st.sampled_from(["inside", "mixed"]), seed=st.integers(0, 2**16))
def test_random_shapes(rows, vocab, vocab_start, inv_t, scale, labels, seed):
    logits, lab = make_inputs(rows, vocab, scale=scale, vocab_start=vocab_start, labels=labels, seed=seed)
    check_stats(logits, lab, inv_t, vocab_start=vocab_start)
    check_grad(logits, lab, inv_t, torch.float32, vocab_start=vocab_start)


# ------------------------------------------------------------------------------------------------------
# Vocabulary-parallel shards: per-shard stats merged as the all-reduce would == the unsharded row
# ------------------------------------------------------------------------------------------------------
def test_three_shards_combine_to_the_full_row():
    vocab, bounds = 10007, [0, 3001, 7000, 10007]
    logits, labels = make_inputs(7, vocab, labels="inside", seed=13)
    inv_t = 0.8
    shards = [STATS(logits[:, a:b].contiguous(), labels, inv_t, a, -100).double() for a, b in zip(bounds, bounds[1:])]
    m = torch.stack([s[:, 0] for s in shards]).amax(0)  # all_reduce(MAX)
    scale = [torch.exp(s[:, 0] - m) for s in shards]  # then one all_reduce(SUM) of re-centred sums
    s = sum(c * sh[:, 1] for c, sh in zip(scale, shards))
    u = sum(c * (sh[:, 2] + (sh[:, 0] - m) * sh[:, 1]) for c, sh in zip(scale, shards))
    zy = sum(sh[:, 3] for sh in shards)
    merged = torch.stack([m, s, u, zy], dim=1).float()

    lse, mean_z, label_z = combine_row_stats(merged)
    full_lse, full_mean, full_zy = combine_row_stats(STATS(logits, labels, inv_t, 0, -100))
    ref_lse, ref_mean, ref_zy = reference_stats(logits, labels, inv_t, 0, -100)
    for got, full, ref in ((lse, full_lse, ref_lse), (mean_z, full_mean, ref_mean), (label_z, full_zy, ref_zy)):
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-4)

    # The gradient of each shard, given the global lse/mean_z, is that slice of the full gradient.
    g_lp, g_ent = torch.randn(7, device=DEVICE), torch.randn(7, device=DEVICE)
    full = GRAD(logits, labels, full_lse, full_mean, g_lp, g_ent, inv_t, 0, -100, torch.float32)
    parts = [GRAD(logits[:, a:b].contiguous(), labels, full_lse, full_mean, g_lp, g_ent, inv_t, a, -100,
                  torch.float32) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------------
# Op registration and input validation
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_opcheck(label_dtype):
    logits, labels = make_inputs(4, 37, labels="mixed", vocab_start=5, seed=14)
    labels = labels.to(label_dtype)
    torch.library.opcheck(STATS, (logits, labels, 0.7, 5, -100))
    vecs = [torch.randn(4, device=DEVICE) for _ in range(4)]
    for out_dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(GRAD, (logits, labels, *vecs, 0.7, 5, -100, out_dtype))


def _bad_calls():
    logits, labels = make_inputs(4, 9, seed=15)
    vec = torch.randn(4, device=DEVICE)
    grad_args = dict(logits=logits, labels=labels, lse=vec, mean_z=vec, grad_logprob=vec, grad_entropy=vec,
                     inv_temperature=1.0, out_dtype=torch.float32)

    def stats_call(**over):
        a = {"logits": logits, "labels": labels, "inv_temperature": 1.0, **over}
        return lambda: STATS(a["logits"], a["labels"], a["inv_temperature"], 0, -100)

    def grad_call(**over):
        a = {**grad_args, **over}
        return lambda: GRAD(a["logits"], a["labels"], a["lse"], a["mean_z"], a["grad_logprob"], a["grad_entropy"],
                            a["inv_temperature"], 0, -100, a["out_dtype"])

    cases = [
        ("float64 logits", stats_call(logits=logits.double()), "'logits'"),
        ("bf16 logits", grad_call(logits=logits.bfloat16()), "'logits'"),
        ("non-contiguous logits", stats_call(logits=logits.t().contiguous().t()), "contiguous"),
        ("1-D logits", stats_call(logits=logits[0]), "'logits'"),
        ("no columns", stats_call(logits=logits[:, :0]), "'logits'"),
        ("labels too short", stats_call(labels=labels[:3]), "'labels'"),
        ("float labels", stats_call(labels=labels.float()), "'labels'"),
        ("zero temperature", stats_call(inv_temperature=0.0), "'inv_temperature'"),
        ("lse wrong length", grad_call(lse=vec[:2]), "'lse'"),
        ("mean_z float64", grad_call(mean_z=vec.double()), "'mean_z'"),
        ("grad_logprob 2-D", grad_call(grad_logprob=vec[:, None]), "'grad_logprob'"),
        ("grad_entropy non-contiguous", grad_call(grad_entropy=torch.randn(4, 2, device=DEVICE)[:, 0]),
         "'grad_entropy'"),
        ("int out_dtype", grad_call(out_dtype=torch.int32), "'out_dtype'"),
    ]
    if DEVICE.type == "cuda":
        cases.append(("labels on the CPU", stats_call(labels=labels.cpu()), "'labels'"))
        cases.append(("lse on the CPU", grad_call(lse=vec.cpu()), "'lse'"))
    return cases


@pytest.mark.parametrize("case", [name for name, _, _ in _bad_calls()])
def test_bad_input_raises_naming_the_argument(case):
    call, needle = {name: (call, needle) for name, call, needle in _bad_calls()}[case]
    with pytest.raises(RuntimeError, match=needle):
        call()
