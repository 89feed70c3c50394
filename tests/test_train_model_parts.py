"""mgpt_train.model parts on their own: MRoPE positions (against HF's get_rope_index), the vision position
table resize (against F.interpolate), the packed causal attention kernel (against a float64 per-sample softmax),
GroupedExperts (against a per-token float64 loop), the aux-loss fixed point, the replaceable attention hook,
meta-device construction, and one test per bad input."""

import dataclasses
import re
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen3VLForConditionalGeneration

from conftest import rel_err
from mgpt_train.model import (AttentionInfo, GroupedExperts, Qwen3VLConfig, Qwen3VLModel, attention,
                              load_balancing_loss, mrope_position_ids)
from mgpt_train.model.moe import TopKRouter
from mgpt_train.model.positions import vision_position_taps

CONFIG = Qwen3VLConfig.tiny()
IMAGE = CONFIG.image_token_id


@pytest.fixture(scope="module")
def hf_rope_model():
    """HF's Qwen3VLModel, only for its get_rope_index (weights unused)."""
    return Qwen3VLForConditionalGeneration._from_config(CONFIG.to_hf()).model


def tiny_batch(config: Qwen3VLConfig, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    grids = [[1, 4, 2], [1, 2, 2]]
    ids = [5, 6, config.vision_start_token_id] + [IMAGE] * 2 + [config.vision_end_token_id, 7, 8, 9]
    ids += [10, config.vision_start_token_id, IMAGE, config.vision_end_token_id, 11, 12]
    ids = torch.tensor(ids)
    labels = torch.full_like(ids, -100)
    labels[6:8] = ids[7:9]
    labels[-3:-1] = ids[-2:]
    return dict(input_ids=ids, labels=labels, cu_seqlens=torch.tensor([0, 9, len(ids)], dtype=torch.int32),
                pixel_values=torch.randn(12, config.vision.patch_dim, generator=gen),
                image_grid_thw=torch.tensor(grids))


# ------------------------------------------------------------------------------------------------------------
# MRoPE positions
# ------------------------------------------------------------------------------------------------------------
layouts = st.lists(st.one_of(st.integers(0, 4).map(lambda n: ("text", n)),
                             st.tuples(st.sampled_from([1, 2]), st.integers(1, 3), st.integers(1, 3))
                             .map(lambda g: ("image", (g[0], 2 * g[1], 2 * g[2])))), min_size=0, max_size=5)


def build_sample(layout):
    """Tokens of one sample: text runs and images (each wrapped in vision start/end tokens)."""
    ids, grids = [], []
    for kind, value in layout:
        if kind == "text":
            ids += [40 + i for i in range(value)]
        else:
            t, h, w = value
            ids += [CONFIG.vision_start_token_id] + [IMAGE] * (t * h * w // 4) + [CONFIG.vision_end_token_id]
            grids.append(list(value))
    return ids or [41], grids


@settings(max_examples=40, deadline=None)
@given(st.lists(layouts, min_size=1, max_size=3))
def test_mrope_positions_match_hf_get_rope_index_per_sample(hf_rope_model, samples):
    built = [build_sample(layout) for layout in samples]
    ids = torch.tensor([i for sample, _ in built for i in sample])
    grids = torch.tensor([g for _, gs in built for g in gs], dtype=torch.int64).reshape(-1, 3)
    cu = torch.tensor([0] + [len(s) for s, _ in built]).cumsum(0).to(torch.int32)
    ours = mrope_position_ids(ids, cu, grids, IMAGE, 2)
    bounds = cu.tolist()
    for s, (sample, sample_grids) in enumerate(built):
        sample = torch.tensor(sample)[None]
        ref, _ = hf_rope_model.get_rope_index(sample, (sample == IMAGE).int(),
                                              image_grid_thw=torch.tensor(sample_grids) if sample_grids else None)
        assert torch.equal(ours[:, bounds[s]:bounds[s + 1]], ref[:, 0]), (s, sample_grids)


def test_mrope_positions_bad_inputs():
    ids = torch.tensor([1, IMAGE, IMAGE, 2, IMAGE, IMAGE])
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="4 image tokens but image_grid_thw"):
        mrope_position_ids(ids, cu, torch.tensor([[1, 2, 2]]), IMAGE, 2)
    with pytest.raises(ValueError, match="not contiguous"):
        mrope_position_ids(ids, cu, torch.tensor([[1, 4, 4]]), IMAGE, 2)
    with pytest.raises(ValueError, match="crosses the sample boundary"):
        mrope_position_ids(ids[:3], torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([[1, 4, 2]]), IMAGE, 2)


# ------------------------------------------------------------------------------------------------------------
# Vision position table: bilinear resize with aligned corners, patches in 2x2 merge-block order
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [[1, 2, 2], [1, 6, 4], [2, 4, 10], [1, 18, 2]])
def test_position_taps_equal_interpolated_table(grid):
    side, width = 8, 5
    table = torch.randn(side * side, width, dtype=torch.float64)
    taps, weights = vision_position_taps(torch.tensor([grid]), 2, side, "cpu", torch.float64)
    ours = (table[taps] * weights[:, :, None]).sum(1)
    t, h, w = grid
    resized = F.interpolate(table.T.reshape(1, width, side, side), size=(h, w), mode="bilinear",
                            align_corners=True)[0]  # [width, h, w]
    expected = [resized[:, 2 * br + r, 2 * bc + c] for _ in range(t) for br in range(h // 2) for bc in range(w // 2)
                for r in range(2) for c in range(2)]
    assert torch.allclose(ours, torch.stack(expected), atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# The packed causal attention kernel
# ------------------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=4), st.sampled_from([(4, 2), (2, 2), (6, 1)]),
       st.integers(0, 2 ** 16))
def test_attention_is_causal_inside_each_sample(lengths, heads, seed):
    gen = torch.Generator().manual_seed(seed)
    q_heads, kv_heads = heads
    total = sum(lengths)
    q = torch.randn(total, q_heads, 16, generator=gen)
    k, v = (torch.randn(total, kv_heads, 16, generator=gen) for _ in range(2))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    out = attention(q, k, v, cu, AttentionInfo.from_cu_seqlens(cu))
    assert out.shape == q.shape
    expected, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start:start + n].double().transpose(0, 1) for x in (q, k, v))
        ks, vs = (x.repeat_interleave(q_heads // kv_heads, dim=0) for x in (ks, vs))
        scores = qs @ ks.transpose(1, 2) / 16 ** 0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        expected.append((torch.softmax(scores, -1) @ vs).transpose(0, 1))
        start += n
    assert torch.allclose(out.double(), torch.cat(expected), atol=1e-5)


def test_set_attention_fn_replaces_the_kernel_of_every_layer():
    model = Qwen3VLModel(CONFIG)
    batch = tiny_batch(CONFIG)
    with torch.no_grad():
        expected = model.logits(batch)
    seen = []

    def recording(q, k, v, cu_seqlens, info):
        seen.append((q.shape[0], cu_seqlens.tolist(), info.max_seqlen))
        return attention(q, k, v, cu_seqlens, info)

    model.set_attention_fn(recording)
    with torch.no_grad():
        assert torch.equal(model.logits(batch), expected)
    assert seen == [(15, [0, 9, 15], 9)] * CONFIG.text.num_hidden_layers


# ------------------------------------------------------------------------------------------------------------
# MoE parts
# ------------------------------------------------------------------------------------------------------------
def test_grouped_experts_match_per_token_loop():
    gen = torch.Generator().manual_seed(3)
    experts = GroupedExperts(5, 12, 7).double()
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / 3)
    x = torch.randn(9, 12, generator=gen, dtype=torch.float64)
    idx = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(9)])  # expert 4 never chosen
    weight = torch.rand(9, 2, generator=gen, dtype=torch.float64)
    out = experts(x, idx, weight)
    expected = torch.zeros_like(x)
    for token in range(9):
        for slot in range(2):
            e = idx[token, slot]
            gate, up = (experts.gate_up_proj[e] @ x[token]).chunk(2)
            expected[token] += weight[token, slot] * (experts.down_proj[e] @ (F.silu(gate) * up))
    assert torch.allclose(out, expected, atol=1e-12)
    with pytest.raises(ValueError, match="'tokens_per_expert' must have shape \\[5\\]"):
        experts.compute(x, torch.tensor([9, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_path_equals_the_per_expert_loop(dtype, monkeypatch):
    """torch's grouped GEMM (no host sync) and the per-expert loop agree, outputs and gradients, empty experts
    included (their gradient is zero, not None)."""
    from mgpt_train.model import moe

    gen = torch.Generator().manual_seed(5)
    experts = GroupedExperts(6, 32, 16)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / 4)
    experts = experts.to(dtype)
    x = torch.randn(11, 32, generator=gen).to(dtype)
    counts = torch.tensor([3, 0, 4, 0, 4, 0])

    def run(grouped: bool):
        assert moe._grouped_mm_usable(x, experts.gate_up_proj, experts.down_proj) or not grouped
        monkeypatch.setattr(moe, "_grouped_mm_usable", lambda *_: grouped)
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = experts.compute(xi, counts)
        out.backward(torch.ones_like(out))
        return out, xi.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    grouped, loop = run(True), run(False)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(grouped, loop):
        assert rel_err(a.float(), b.float()) < tol
    assert (grouped[2][[1, 3, 5]] == 0).all()


def test_aux_loss_of_a_uniform_router_is_top_k():
    """With identical router probabilities 1/E, HF's loss is E * sum_e f_e / E = sum_e f_e = top_k."""
    config = dataclasses.replace(Qwen3VLConfig.tiny_moe().text, num_experts=6, top_k=3)
    router = TopKRouter(config)
    with torch.no_grad():
        router.weight.zero_()
    stats = [router(torch.randn(n, config.hidden_size))[2] for n in (5, 11)]
    assert torch.allclose(load_balancing_loss(stats, 6, 3), torch.tensor(3.0))


def test_masked_router_statistics_are_those_of_the_kept_rows():
    """row_mask leaves rows out of the statistics (counts and probability sums, their gradient too), not out of
    the routing: the top-k choice of every row is unchanged."""
    config = dataclasses.replace(Qwen3VLConfig.tiny_moe().text, num_experts=6, top_k=2)
    router = TopKRouter(config)
    x = torch.randn(13, config.hidden_size)
    mask = torch.rand(13) < 0.6
    idx, weight, masked = router(x, mask)
    sub_idx, sub_weight, kept = router(x[mask])
    assert torch.equal(idx[mask], sub_idx) and torch.equal(weight[mask], sub_weight)
    assert torch.equal(masked.counts, kept.counts) and masked.counts.sum() == 2 * int(mask.sum())
    assert torch.allclose(masked.prob_sum, kept.prob_sum, atol=1e-6)
    assert load_balancing_loss([masked], 6, 2).item() == pytest.approx(load_balancing_loss([kept], 6, 2).item(),
                                                                       rel=1e-6)
    grad_masked, = torch.autograd.grad(load_balancing_loss([masked], 6, 2), router.weight)
    grad_kept, = torch.autograd.grad(load_balancing_loss([router(x[mask])[2]], 6, 2), router.weight)
    assert rel_err(grad_masked, grad_kept) < 1e-5


def test_padding_tokens_leave_the_moe_loss_and_gradients_unchanged():
    """A batch padded with a label-free sample and ``pad_tokens`` gives the unpadded batch's loss, aux loss and
    gradients (MoE: the pad rows are out of the router statistics); without ``pad_tokens`` the aux loss differs."""
    from mgpt_train.parallelize import pad_packed_batch

    config = Qwen3VLConfig.tiny_moe()
    torch.manual_seed(0)
    model = Qwen3VLModel(config)
    batch = tiny_batch(config)
    padded = pad_packed_batch(batch, 16, pad_id=3)
    assert padded["pad_tokens"] == 16 - batch["input_ids"].shape[0] % 16 > 0
    outs, grads = [], []
    for b in (batch, padded):
        model.zero_grad()
        outs.append(model(b))
        outs[-1]["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for key in ("loss", "aux_loss", "loss_sum", "n_tokens"):
        assert outs[1][key].item() == pytest.approx(outs[0][key].item(), rel=1e-6), key
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert rel_err(grads[1][name], grad) < 1e-5, name
    unmarked = {k: v for k, v in padded.items() if k != "pad_tokens"}
    assert abs(model(unmarked)["aux_loss"].item() - outs[0]["aux_loss"].item()) > 1e-4
    with pytest.raises(ValueError, match=r"batch\['pad_tokens'\] \(trailing padding tokens\) must be an int in"):
        model({**batch, "pad_tokens": batch["input_ids"].shape[0] + 1})


# ------------------------------------------------------------------------------------------------------------
# Construction, initialisation, the tiny presets
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "tiny_moe"])
def test_meta_construction_then_init_weights_trains(preset):
    config = getattr(Qwen3VLConfig, preset)()
    with torch.device("meta"):
        model = Qwen3VLModel(config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert (model.config.tie_word_embeddings) == (model.lm_head.weight is model.language_model.embed_tokens.weight)
    out = model(tiny_batch(config))
    out["loss"].backward()
    assert out["n_tokens"].item() == 4 and torch.isfinite(out["loss"])
    # small-std init: near-uniform predictions, so the loss sits near log(V)
    assert abs(out["loss"].item() - torch.log(torch.tensor(config.text.vocab_size)).item()) < 1.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (out["aux_loss"].item() > 0) == config.is_moe


def test_with_tokenizer_takes_vocabulary_and_ids():
    tokenizer = types.SimpleNamespace(vocab_size=270, image_token_id=260, vision_start_id=261, vision_end_id=262)
    config = Qwen3VLConfig.tiny().with_tokenizer(tokenizer)
    assert (config.text.vocab_size, config.image_token_id, config.vision_start_token_id,
            config.vision_end_token_id) == (270, 260, 261, 262)
    assert config.video_token_id < 270


# ------------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda c: dataclasses.replace(c, text=dataclasses.replace(c.text, mrope_section=(6, 5, 4))),
     "mrope_section"),
    (lambda c: dataclasses.replace(c, vision=dataclasses.replace(c.vision, num_heads=3)), "not divisible"),
    (lambda c: dataclasses.replace(c, vision=dataclasses.replace(c.vision, out_hidden_size=64)), "out_hidden_size"),
    (lambda c: dataclasses.replace(c, text=dataclasses.replace(c.text, num_experts=4, top_k=5,
                                                                moe_intermediate_size=8)), "top_k"),
    (lambda c: dataclasses.replace(c, image_token_id=999), "special token ids"),
])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        change(CONFIG)


@pytest.mark.parametrize("key, value, message", [
    ("labels", torch.zeros(3, dtype=torch.int64), "batch['labels'] must have the shape"),
    ("cu_seqlens", torch.tensor([0, 15]), "batch['cu_seqlens'] must be int32"),
    ("input_ids", torch.zeros(15, dtype=torch.int32), "batch['input_ids'] must be int64"),
    ("pixel_values", torch.randn(12, 5), "batch['pixel_values'] must be"),
    ("image_grid_thw", torch.tensor([[1, 4, 2]]), "batch['image_grid_thw'] must be"),
])
def test_batch_errors(key, value, message):
    model = Qwen3VLModel(CONFIG)
    batch = dict(tiny_batch(CONFIG), **{key: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        model(batch)


def test_image_token_count_mismatch_is_an_error():
    model = Qwen3VLModel(CONFIG)
    batch = tiny_batch(CONFIG)
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][3] = 7  # one image token fewer than the images' 3 embeddings
    with pytest.raises(ValueError, match="2 image tokens in input_ids but the images give 3"):
        model(batch)
