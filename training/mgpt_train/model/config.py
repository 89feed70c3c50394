"""Configuration of the compact Qwen3-VL(-MoE) model: a vision sub-config, a text sub-config, special ids.

Field names follow Hugging Face's ``Qwen3VLVisionConfig`` / ``Qwen3VLTextConfig`` / ``Qwen3VLMoeTextConfig``
where they exist; the MoE fields are ``num_experts`` (0 = dense SwiGLU everywhere), ``top_k`` (HF:
``num_experts_per_tok``), ``moe_intermediate_size``, ``router_aux_loss_coef``, ``decoder_sparse_step`` and
``mlp_only_layers``.

Presets: ``tiny()`` (dense, seconds on 2 CPU cores), ``tiny_moe()``, ``qwen3_vl_30b_a3b()`` (the shape of
Qwen3-VL-30B-A3B: build it on the meta device unless you have the memory). ``from_hf`` mirrors a transformers
config, ``to_hf`` builds one, ``with_tokenizer`` takes the vocabulary and special ids from a tokenizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

_HF_VISION_FIELDS = ("depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels",
                     "patch_size", "spatial_merge_size", "temporal_patch_size", "out_hidden_size",
                     "num_position_embeddings")
_HF_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "attention_bias")
_SPECIAL_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 2
    hidden_size: int = 128
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 256
    num_heads: int = 2  # head dim = hidden_size / num_heads must be one mgpt.vision_attention supports
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 128  # = the text hidden size
    num_position_embeddings: int = 256  # a square learned table (16 x 16 here, 48 x 48 in the real models)
    deepstack_visual_indexes: tuple[int, ...] = (0, 1)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch in ``pixel_values``: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 320
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (6, 5, 5)  # frequencies per (t, h, w) axis; sums to head_dim / 2
    # Mixture of experts (num_experts == 0: every layer is a dense SwiGLU MLP).
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.001
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, layer_idx: int) -> bool:
        """HF's rule: sparse unless listed in mlp_only_layers, on every decoder_sparse_step-th layer."""
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)


@dataclass(frozen=True)
class Qwen3VLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 300
    video_token_id: int = 301
    vision_start_token_id: int = 302
    vision_end_token_id: int = 303
    tie_word_embeddings: bool = True

    def __post_init__(self):
        v, t = self.vision, self.text
        problems = []
        if v.hidden_size % v.num_heads:
            problems.append(f"vision hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
        if v.out_hidden_size != t.hidden_size:
            problems.append(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        if int(v.num_position_embeddings ** 0.5) ** 2 != v.num_position_embeddings:
            problems.append(f"vision num_position_embeddings {v.num_position_embeddings} is not a square")
        if any(not 0 <= i < v.depth for i in v.deepstack_visual_indexes):
            problems.append(f"deepstack_visual_indexes {v.deepstack_visual_indexes} must lie in [0, {v.depth})")
        if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
            problems.append("more DeepStack taps than text layers")
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append(f"num_attention_heads {t.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {t.num_key_value_heads}")
        if sum(t.mrope_section) * 2 != t.head_dim:
            problems.append(f"mrope_section {t.mrope_section} must sum to head_dim / 2 = {t.head_dim // 2}")
        if t.num_experts and not (0 < t.top_k <= t.num_experts and t.moe_intermediate_size > 0):
            problems.append(f"MoE needs 0 < top_k <= num_experts and moe_intermediate_size > 0, got top_k="
                            f"{t.top_k}, num_experts={t.num_experts}, moe_intermediate_size="
                            f"{t.moe_intermediate_size}")
        if max(getattr(self, name) for name in _SPECIAL_IDS) >= t.vocab_size:
            problems.append(f"special token ids {[getattr(self, n) for n in _SPECIAL_IDS]} must be < vocab_size "
                            f"{t.vocab_size}")
        if problems:
            raise ValueError("Qwen3VLConfig: " + "; ".join(problems))

    @property
    def is_moe(self) -> bool:
        return self.text.num_experts > 0

    # ----------------------------------------------------------------------------------------------------
    # Presets
    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls) -> "Qwen3VLConfig":
        """Dense, all features on (DeepStack into 2 of 3 layers, GQA, tied head): a few ms per step on a CPU."""
        return cls()

    @classmethod
    def tiny_moe(cls) -> "Qwen3VLConfig":
        """The tiny model with 8 routed experts (top-2) in every layer and an untied head, as in the 30B-A3B.
        Expert width 96: hidden 128 is neither I nor 2I, so the two fused-experts layouts differ in shape (as in the
        30B-A3B: 2048 vs 768), which exported folders need (``hf_adapter``)."""
        text = dataclasses.replace(TextConfig(), num_experts=8, top_k=2, moe_intermediate_size=96)
        return cls(text=text, tie_word_embeddings=False)

    @classmethod
    def qwen3_vl_30b_a3b(cls) -> "Qwen3VLConfig":
        """The shape of Qwen/Qwen3-VL-30B-A3B (about 31.1 B parameters, 3.3 B active per token)."""
        vision = VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                              num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24))
        text = TextConfig(vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, rope_theta=5_000_000.0,
                          mrope_section=(24, 20, 20), num_experts=128, top_k=8, moe_intermediate_size=768)
        return cls(vision=vision, text=text, image_token_id=151_655, video_token_id=151_656,
                   vision_start_token_id=151_652, vision_end_token_id=151_653, tie_word_embeddings=False)

    def with_tokenizer(self, tokenizer) -> "Qwen3VLConfig":
        """A copy whose vocabulary size and image ids are the tokenizer's (``vocab_size``, ``image_token_id``,
        ``vision_start_id``, ``vision_end_id``; ``video_token_id`` is kept unless the tokenizer has one)."""
        text = dataclasses.replace(self.text, vocab_size=tokenizer.vocab_size)
        return dataclasses.replace(
            self, text=text, image_token_id=tokenizer.image_token_id,
            video_token_id=getattr(tokenizer, "video_token_id", min(self.video_token_id, tokenizer.vocab_size - 1)),
            vision_start_token_id=tokenizer.vision_start_id, vision_end_token_id=tokenizer.vision_end_id)

    # ----------------------------------------------------------------------------------------------------
    # Hugging Face configs
    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config) -> "Qwen3VLConfig":
        """Mirror a transformers ``Qwen3VLConfig`` or ``Qwen3VLMoeConfig`` (video settings are not used)."""
        hv, ht = hf_config.vision_config, hf_config.text_config
        rope_v = getattr(hv, "rope_parameters", None) or {}
        rope_t = ht.rope_parameters or {}
        if rope_t.get("rope_type", "default") != "default":
            raise ValueError(f"Qwen3VLConfig.from_hf: text rope_type {rope_t['rope_type']!r} is not supported "
                             f"(only 'default' MRoPE)")
        vision = VisionConfig(**{name: getattr(hv, name) for name in _HF_VISION_FIELDS},
                              deepstack_visual_indexes=tuple(hv.deepstack_visual_indexes),
                              rope_theta=float(rope_v.get("rope_theta", 10000.0)))
        moe = {}
        if getattr(ht, "num_experts", 0):
            moe = dict(num_experts=ht.num_experts, top_k=ht.num_experts_per_tok,
                       moe_intermediate_size=ht.moe_intermediate_size, router_aux_loss_coef=ht.router_aux_loss_coef,
                       decoder_sparse_step=ht.decoder_sparse_step, mlp_only_layers=tuple(ht.mlp_only_layers))
        text = TextConfig(**{name: getattr(ht, name) for name in _HF_TEXT_FIELDS},
                          rope_theta=float(rope_t["rope_theta"]),
                          mrope_section=tuple(rope_t.get("mrope_section", (24, 20, 20))), **moe)
        return cls(vision=vision, text=text, tie_word_embeddings=bool(hf_config.tie_word_embeddings),
                   **{name: getattr(hf_config, name) for name in _SPECIAL_IDS})

    def to_hf(self):
        """The transformers config of the same model (``Qwen3VLMoeConfig`` when MoE, else ``Qwen3VLConfig``)."""
        from transformers import Qwen3VLConfig as HFDense, Qwen3VLMoeConfig as HFMoe

        v, t = self.vision, self.text
        vision = {name: getattr(v, name) for name in _HF_VISION_FIELDS}
        vision.update(deepstack_visual_indexes=list(v.deepstack_visual_indexes),
                      rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
        text = {name: getattr(t, name) for name in _HF_TEXT_FIELDS}
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": t.rope_theta,
                                   "mrope_section": list(t.mrope_section), "mrope_interleaved": True}
        if self.is_moe:
            # norm_topk_prob: the router renormalises the top-k weights (always, in Qwen3-VL-MoE); Qwen's published
            # configs say so and vLLM reads the key.
            text.update(num_experts=t.num_experts, num_experts_per_tok=t.top_k,
                        moe_intermediate_size=t.moe_intermediate_size, router_aux_loss_coef=t.router_aux_loss_coef,
                        decoder_sparse_step=t.decoder_sparse_step, mlp_only_layers=list(t.mlp_only_layers),
                        norm_topk_prob=True)
        hf_class = HFMoe if self.is_moe else HFDense
        # architectures: the model class, as in published configs (vLLM picks its model by it)
        architectures = ["Qwen3VLMoeForConditionalGeneration" if self.is_moe else "Qwen3VLForConditionalGeneration"]
        return hf_class(vision_config=vision, text_config=text, tie_word_embeddings=self.tie_word_embeddings,
                        architectures=architectures, **{name: getattr(self, name) for name in _SPECIAL_IDS})
