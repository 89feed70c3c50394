"""Qwen3-VL text decoder on packed tokens [T, H] (names as HF's ``Qwen3VLTextModel``: ``layers.{i}.self_attn``,
``layers.{i}.mlp``, ``input_layernorm``, ``post_attention_layernorm``, ``norm``, ``embed_tokens``).

Layer: x += o_proj(attention(rope(q_norm(q_proj(rms(x)))), rope(k_norm(k_proj(rms(x)))), v_proj(rms(x))));
       x += mlp(rms(x))    with mlp = SwiGLU or the routed MoE (``moe.py``).
After layer i < len(deepstack), the i-th DeepStack feature map is added at the image-token rows.

Interleaved MRoPE: head_dim/2 frequencies f_j = theta^(-2j/head_dim); frequency j rotates by the h position when
j % 3 == 1 and j < 3 * mrope_section[1], by the w position when j % 3 == 2 and j < 3 * mrope_section[2], and by
the t position otherwise (HF's ``Qwen3VLTextRotaryEmbedding``); the angles are repeated twice (rotate-half).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mgpt_train.model.attention import AttentionInfo, attention
from mgpt_train.model.config import TextConfig
from mgpt_train.model.moe import RouterStats, SparseMoeBlock


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics whatever the activation dtype, rounded back before the scale (as HF)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def mrope_cos_sin(position_ids: torch.Tensor, config: TextConfig, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] in ``dtype`` (computed in fp32) from the (t, h, w) positions [3, T]."""
    half = config.head_dim // 2
    index = torch.arange(half, device=position_ids.device)
    inv_freq = 1.0 / config.rope_theta ** (2 * index.float() / config.head_dim)
    axis = torch.zeros(half, dtype=torch.int64, device=position_ids.device)
    for dim in (1, 2):
        axis[(index % 3 == dim) & (index < 3 * config.mrope_section[dim])] = dim
    angles = position_ids[axis].T.float() * inv_freq  # [T, half]: each frequency reads its own axis
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated with per-token cos/sin [T, D] (rotate-half form)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


class TextAttention(nn.Module):
    """GQA with RMSNorm on q and k per head. ``attention_fn`` is the kernel (``attention.attention`` unless
    replaced through ``Qwen3VLModel.set_attention_fn``)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * config.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.attention_fn = attention

    def forward(self, x, cos, sin, cu_seqlens, info: AttentionInfo):
        tokens = x.shape[0]
        q = rotate(self.q_norm(self.q_proj(x).view(tokens, -1, self.head_dim)), cos, sin)
        k = rotate(self.k_norm(self.k_proj(x).view(tokens, -1, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(tokens, -1, self.head_dim)
        return self.o_proj(self.attention_fn(q, k, v, cu_seqlens, info).reshape(tokens, -1))


class TextMLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"text hidden_act must be 'silu' (SwiGLU), got {config.hidden_act!r}")
        self.self_attn = TextAttention(config)
        self.mlp = SparseMoeBlock(config) if config.is_moe_layer(layer_idx) else TextMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens, info: AttentionInfo, row_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RouterStats | None]:
        """``row_mask`` [rows of x]: False on padding rows (left out of the MoE router statistics)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, info)
        if isinstance(self.mlp, SparseMoeBlock):
            out, stats = self.mlp(self.post_attention_layernorm(x), row_mask)
        else:
            out, stats = self.mlp(self.post_attention_layernorm(x)), None
        return x + out, stats


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                info: AttentionInfo, visual_rows: torch.Tensor | None = None,
                deepstack: list[torch.Tensor] = (), row_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[RouterStats]]:
        """(final normed hidden states [T, H], router stats of the MoE layers).

        visual_rows: int64 indices of the image-token rows, where ``deepstack[i]`` [len(visual_rows), H] is
        added after layer i. row_mask: bool [T], False on padding rows (None: no padding)."""
        cos, sin = mrope_cos_sin(position_ids, self.config, inputs_embeds.dtype)
        x, router_stats = inputs_embeds, []
        for index, layer in enumerate(self.layers):
            x, stats = layer(x, cos, sin, cu_seqlens, info, row_mask)
            if stats is not None:
                router_stats.append(stats)
            if index < len(deepstack):
                x = x.index_add(0, visual_rows, deepstack[index].to(x.dtype))
        return self.norm(x), router_stats
