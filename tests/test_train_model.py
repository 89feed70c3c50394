"""mgpt_train.model (compact Qwen3-VL / Qwen3-VL-MoE) against Hugging Face transformers' own models.

Reference: transformers 5's ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLMoeForConditionalGeneration`` built
locally from tiny random configs (no downloads), fp32, ``attn_implementation="eager"`` (HF's per-sequence softmax,
independent of our kernels), weights redrawn at unit scale (HF's 0.02 init makes every softmax flat and hides
errors), loaded into our model through ``hf_adapter``. Inputs: one packed sample with three images of different
sizes (= one HF batch row), and a two-sample packed batch compared with two separate HF calls.

Tolerances (fp32, both sides fp32 math, differing only in summation order): relative L2 error 1e-5 on logits,
losses and every parameter's gradient; the loss is checked against a float64 cross-entropy of HF's logits.
"""

import dataclasses
import json
import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (AutoConfig, Qwen3VLConfig as HFQwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeConfig as HFQwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)

from conftest import rel_err
from mgpt_train.model import (Qwen3VLConfig, Qwen3VLModel, experts_layouts_ambiguous, from_hf_state_dict,
                              published_experts, to_hf_state_dict)
from mgpt_train.model import qwen3_vl as qwen3_vl_module

TOL = 1e-5
VOCAB = 300
SPECIAL = dict(image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)
# Vision: head dim 72 (2 heads of 72), patch 16, 8x8 position table, DeepStack taps after both blocks.
HF_VISION = dict(depth=2, hidden_size=144, intermediate_size=96, num_heads=2, patch_size=16, out_hidden_size=96,
                 num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
# Text: GQA 4 q heads / 2 kv heads of 24 (mrope sections 4+4+4), 3 layers.
HF_TEXT = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=24,
               rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 4, 4]))
# MoE: 6 experts, top-2; layer 1 is dense (mlp_only_layers) so both layer kinds and the aux sum are exercised.
HF_MOE_TEXT = dict(HF_TEXT, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1],
                   router_aux_loss_coef=0.01)
GRIDS = [[1, 4, 6], [1, 2, 2], [1, 6, 4]]  # (t, h, w) in patches: 6, 1 and 6 image tokens after the 2x2 merge


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Unit-scale weights: matrices (and experts, conv kernels, the tied embedding) ~ N(0, 1/fan_in), norm scales
    ~ 1 + N(0, 0.1^2), other vectors ~ N(0, 0.1^2); the vision position table ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "pos_embed" in name:
                p.copy_(noise)
            elif p.dim() >= 2:
                fan_in = p[0].numel() if p.dim() != 3 else p.shape[-1]  # 3D experts: [E, out, in]
                p.copy_(noise / fan_in ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def hf_model(moe: bool, tie: bool, seed: int = 0):
    config_cls, model_cls = ((HFQwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe
                             else (HFQwen3VLConfig, Qwen3VLForConditionalGeneration))
    config = config_cls(vision_config=HF_VISION, text_config=HF_MOE_TEXT if moe else HF_TEXT,
                        tie_word_embeddings=tie, **SPECIAL)
    return randomize(model_cls._from_config(config, attn_implementation="eager"), seed).eval()


def ours_from(hf) -> Qwen3VLModel:
    config = Qwen3VLConfig.from_hf(hf.config)
    model = Qwen3VLModel(config)
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), config))
    return model


@pytest.fixture(scope="module")
def dense():
    hf = hf_model(moe=False, tie=True)
    return hf, ours_from(hf)


@pytest.fixture(scope="module")
def moe():
    hf = hf_model(moe=True, tie=False, seed=1)
    return hf, ours_from(hf)


def make_sample(grids, gen: torch.Generator, text_lens=(3, 2, 4, 5)) -> torch.Tensor:
    """Text, then per image <vision_start> image tokens <vision_end> text (as the chat template lays it out)."""
    ids = torch.randint(0, 280, (text_lens[0],), generator=gen).tolist()
    for i, (t, h, w) in enumerate(grids):
        ids += [SPECIAL["vision_start_token_id"]] + [SPECIAL["image_token_id"]] * (t * h * w // 4)
        ids += [SPECIAL["vision_end_token_id"]]
        ids += torch.randint(0, 280, (text_lens[(i + 1) % len(text_lens)],), generator=gen).tolist()
    return torch.tensor(ids)


def shifted_labels(ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """labels[i] = ids[i + 1] on a random half of the text positions, -100 elsewhere and on the last token."""
    labels = torch.full_like(ids, -100)
    keep = (torch.rand(len(ids) - 1, generator=gen) < 0.5) & (ids[1:] < 280)
    labels[:-1][keep] = ids[1:][keep]
    return labels


def packed_batch(samples, grids_per_sample, gen) -> dict:
    grids = [g for gs in grids_per_sample for g in gs]
    patches = sum(t * h * w for t, h, w in grids)
    lengths = [len(s) for s in samples]
    return dict(input_ids=torch.cat(samples), labels=torch.cat([shifted_labels(s, gen) for s in samples]),
                cu_seqlens=torch.tensor([0] + lengths).cumsum(0).to(torch.int32),
                pixel_values=torch.randn(patches, 3 * 2 * 16 * 16, generator=gen),
                image_grid_thw=torch.tensor(grids, dtype=torch.int64).reshape(-1, 3))


def hf_call(hf, ids, pixels, grids, **kwargs):
    """One HF batch row: mm_token_type_ids marks the image tokens (as the processor does)."""
    mm = (ids == SPECIAL["image_token_id"]).long()[None]
    return hf(input_ids=ids[None], pixel_values=pixels if len(grids) else None,
              image_grid_thw=torch.tensor(grids) if len(grids) else None, mm_token_type_ids=mm, **kwargs)


def float64_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.double(), labels, ignore_index=-100)


# ------------------------------------------------------------------------------------------------------------
# Forward parity
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dense", "moe"])
def test_logits_and_loss_match_hf_one_sample_three_images(which, request):
    hf, ours = request.getfixturevalue(which)
    gen = torch.Generator().manual_seed(10)
    batch = packed_batch([make_sample(GRIDS, gen)], [GRIDS], gen)
    with torch.no_grad():
        ref = hf_call(hf, batch["input_ids"], batch["pixel_values"], GRIDS, output_router_logits=which == "moe")
        logits = ours.logits(batch)
        out = ours(batch)
    assert rel_err(logits, ref.logits[0]) < TOL
    expected = float64_loss(ref.logits[0], batch["labels"])
    if which == "moe":
        expected = expected + hf.config.text_config.router_aux_loss_coef * ref.aux_loss.double()
        assert rel_err(out["aux_loss"], ref.aux_loss) < TOL
    else:
        assert out["aux_loss"].item() == 0
    assert rel_err(out["loss"], expected) < TOL
    assert out["n_tokens"].item() == int((batch["labels"] != -100).sum())


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_two_packed_samples_match_two_separate_hf_calls(which, request):
    hf, ours = request.getfixturevalue(which)
    gen = torch.Generator().manual_seed(11)
    grids = [[[1, 2, 4], [1, 4, 4]], [[1, 6, 2]]]
    samples = [make_sample(grids[0], gen), make_sample(grids[1], gen, text_lens=(1, 6))]
    batch = packed_batch(samples, grids, gen)
    with torch.no_grad():
        logits = ours.logits(batch)
        split = [sum(t * h * w for t, h, w in grids[0])]
        pixels = torch.split(batch["pixel_values"], split + [batch["pixel_values"].shape[0] - split[0]])
        bounds = batch["cu_seqlens"].tolist()
        for s in range(2):
            ref = hf_call(hf, samples[s], pixels[s], grids[s]).logits[0]
            assert rel_err(logits[bounds[s]:bounds[s + 1]], ref) < TOL


def test_text_only_batch_matches_hf(dense):
    hf, ours = dense
    gen = torch.Generator().manual_seed(12)
    samples = [torch.randint(0, 280, (n,), generator=gen) for n in (7, 1, 12)]
    batch = packed_batch(samples, [[], [], []], gen)
    assert batch["pixel_values"].shape[0] == 0 and batch["image_grid_thw"].shape == (0, 3)
    with torch.no_grad():
        logits = ours.logits(batch)
        bounds = batch["cu_seqlens"].tolist()
        for s, ids in enumerate(samples):
            assert rel_err(logits[bounds[s]:bounds[s + 1]], hf_call(hf, ids, None, []).logits[0]) < TOL


# ------------------------------------------------------------------------------------------------------------
# Backward parity
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dense", "moe"])
def test_gradients_of_every_parameter_match_hf(which, request):
    hf, ours = request.getfixturevalue(which)
    gen = torch.Generator().manual_seed(13)
    batch = packed_batch([make_sample(GRIDS, gen)], [GRIDS], gen)
    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    ref = hf_call(hf, batch["input_ids"], batch["pixel_values"], GRIDS, output_router_logits=which == "moe")
    hf_loss = F.cross_entropy(ref.logits[0], batch["labels"], ignore_index=-100)
    if which == "moe":
        hf_loss = hf_loss + hf.config.text_config.router_aux_loss_coef * ref.aux_loss
    hf_loss.backward()
    ours(batch)["loss"].backward()
    grads = to_hf_state_dict(ours, {name: p.grad for name, p in ours.named_parameters()})
    hf_params = dict(hf.named_parameters())
    assert set(grads) == set(hf_params)
    for name, p in hf_params.items():
        assert p.grad is not None and grads[name] is not None, name
        assert rel_err(grads[name], p.grad) < TOL, name


# ------------------------------------------------------------------------------------------------------------
# MoE auxiliary loss: independent float64 statement of the formula, from HF's router logits
# ------------------------------------------------------------------------------------------------------------
def test_aux_loss_is_hf_load_balancing_formula(moe):
    hf, ours = moe
    gen = torch.Generator().manual_seed(14)
    batch = packed_batch([make_sample(GRIDS, gen)], [GRIDS], gen)
    with torch.no_grad():
        ref = hf_call(hf, batch["input_ids"], batch["pixel_values"], GRIDS, output_router_logits=True)
        _, aux = ours.hidden_states(batch)
    experts, k = hf.config.text_config.num_experts, hf.config.text_config.num_experts_per_tok
    assert len(ref.router_logits) == 2  # layers 0 and 2 are MoE, layer 1 dense
    probs = torch.cat([torch.softmax(r.double(), -1) for r in ref.router_logits])  # [layers * T, E]
    chosen = F.one_hot(probs.topk(k, dim=-1).indices, experts).sum(1).double()  # top-k assignment counts
    expected = experts * (chosen.mean(0) * probs.mean(0)).sum()
    assert abs(aux.item() - expected.item()) < 1e-6 * expected.item()


# ------------------------------------------------------------------------------------------------------------
# Adapter, configs
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dense", "moe"])
def test_to_hf_state_dict_round_trip_is_exact(which, request):
    hf, ours = request.getfixturevalue(which)
    theirs, back = hf.state_dict(), to_hf_state_dict(ours)
    assert set(theirs) == set(back)
    for name, tensor in theirs.items():
        assert back[name].shape == tensor.shape and torch.equal(back[name], tensor), name
    fresh = hf_model(moe=which == "moe", tie=hf.config.tie_word_embeddings, seed=99)
    fresh.load_state_dict(back)
    assert all(torch.equal(fresh.state_dict()[n], t) for n, t in theirs.items())


def test_published_experts_layout_reads_like_transformers_and_round_trips(moe):
    """Qwen's published Qwen3-VL-MoE files hold the fused experts transposed ([E, H, 2I], [E, I, H]); transformers 5
    transposes them at load (by shape), and so does from_hf_state_dict; published_experts writes that layout."""
    hf, ours = moe
    config = ours.config
    assert not experts_layouts_ambiguous(config)  # H = 96, I = 32
    published = {name: published_experts(name, t, config).contiguous() for name, t in hf.state_dict().items()}
    gate_up = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert published[gate_up].shape == (6, 96, 64) and hf.state_dict()[gate_up].shape == (6, 64, 96)
    assert published["model.language_model.layers.2.mlp.experts.down_proj"].shape == (6, 32, 96)
    model = Qwen3VLModel(config)
    model.load_state_dict(from_hf_state_dict(published, config))
    assert all(torch.equal(t, ours.state_dict()[name]) for name, t in model.state_dict().items())
    # transformers 5 reads the same files into the same model (its own conversion, keyed by shape)
    with tempfile.TemporaryDirectory() as folder:
        hf.config.save_pretrained(folder)
        save_file(published, f"{folder}/model.safetensors", metadata={"format": "pt"})
        again = type(hf).from_pretrained(folder, attn_implementation="eager")
    assert all(torch.equal(t, hf.state_dict()[name]) for name, t in again.state_dict().items())
    assert experts_layouts_ambiguous(dataclasses.replace(config, text=dataclasses.replace(config.text,
                                                                                           moe_intermediate_size=48)))


def test_config_from_hf_round_trip_and_tiny_presets_build_hf_models():
    for config in (Qwen3VLConfig.tiny(), Qwen3VLConfig.tiny_moe()):
        assert Qwen3VLConfig.from_hf(config.to_hf()) == config
        ours = Qwen3VLModel(config)
        hf_cls = Qwen3VLMoeForConditionalGeneration if config.is_moe else Qwen3VLForConditionalGeneration
        hf = hf_cls._from_config(config.to_hf())
        ours.load_state_dict(from_hf_state_dict(hf.state_dict(), config))  # strict: same parameter set
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


# Qwen/Qwen3-VL-30B-A3B-Instruct's config.json as published (written by transformers 4.57: rope_scaling and
# rope_theta in the text config, which transformers 5 turns into rope_parameters when it reads the file).
PUBLISHED_30B_A3B = {
    "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": False,
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1,
        "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
        "mlp_only_layers": [], "model_type": "qwen3_vl_moe_text", "moe_intermediate_size": 768,
        "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936},
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
        "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304, "model_type": "qwen3_vl_moe",
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2},
}


def test_qwen3_vl_30b_a3b_preset_on_meta_device(tmp_path):
    """The published Qwen3-VL-30B-A3B-Instruct config.json, read by transformers and through from_hf, gives our
    preset; the parameter count equals HF's (both built on the meta device: nothing is allocated)."""
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_30B_A3B))
    hf_config = AutoConfig.from_pretrained(tmp_path)
    config = Qwen3VLConfig.qwen3_vl_30b_a3b()
    assert Qwen3VLConfig.from_hf(hf_config) == config
    with torch.device("meta"):
        ours = Qwen3VLModel(config)
        hf = Qwen3VLMoeForConditionalGeneration(hf_config)
    total = sum(p.numel() for p in ours.parameters())
    assert total == sum(p.numel() for p in hf.parameters())
    t = config.text
    idle_experts = t.num_hidden_layers * (t.num_experts - t.top_k) * 3 * t.hidden_size * t.moe_intermediate_size
    assert 30.5e9 < total < 31.5e9
    vision = sum(p.numel() for p in ours.visual.parameters())
    # "A3B": the language model uses about 3.3 B parameters per token (embedding and head included)
    assert 3.2e9 < total - idle_experts - vision < 3.5e9


# ------------------------------------------------------------------------------------------------------------
# The training path never materialises [T, V] logits
# ------------------------------------------------------------------------------------------------------------
def test_loss_goes_through_fused_linear_logprobs_and_never_calls_lm_head(dense, monkeypatch):
    _, ours = dense
    gen = torch.Generator().manual_seed(15)
    batch = packed_batch([make_sample(GRIDS, gen)], [GRIDS], gen)
    calls = []
    real = qwen3_vl_module.fused_linear_logprobs

    def spy(hidden, weight, labels, **kwargs):
        calls.append((hidden.shape, weight is ours.lm_head.weight, labels.clone()))
        return real(hidden, weight, labels, **kwargs)

    monkeypatch.setattr(qwen3_vl_module, "fused_linear_logprobs", spy)
    head_calls = []
    handle = ours.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    try:
        ours(batch)["loss"].backward()
    finally:
        handle.remove()
        ours.zero_grad(set_to_none=True)
    labelled = int((batch["labels"] != -100).sum())
    assert len(calls) == 1 and not head_calls
    shape, is_head, labels = calls[0]
    assert is_head and shape == (labelled, ours.config.text.hidden_size)  # only the labelled rows
    assert (labels != -100).all()

