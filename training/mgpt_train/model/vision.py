"""Qwen3-VL vision tower (names as Hugging Face's ``Qwen3VLVisionModel``, so ``visual.blocks.{i}.attn.qkv``...).

    patches [P, C*T*p*p] --patch_embed (the stride = kernel Conv3d, stored as a Linear)--> [P, hidden]
      + learned position table (side x side) bilinearly resized to each image's grid
      -> blocks (LayerNorm, packed bidirectional attention per frame with 2D RoPE fused into
         ``mgpt_ops.vision_attention``, LayerNorm, GELU-tanh MLP)
      -> merger (LayerNorm, 2x2 merge = 4 consecutive patches concatenated, MLP) -> [P/4, out_hidden]
    DeepStack: after the blocks listed in ``deepstack_visual_indexes`` a post-shuffle merger (merge first, then
    LayerNorm over 4*hidden) makes a feature map that the language model adds into its early layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mgpt_ops import vision_attention_packed
from mgpt_train.model.config import VisionConfig
from mgpt_train.model.positions import vision_cu_seqlens, vision_patch_coords, vision_position_taps

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


class PatchEmbed(nn.Module):
    """HF's Conv3d with stride = kernel over one patch is a matmul: ``proj`` holds weight [hidden, C*T*p*p]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(config.patch_dim, config.hidden_size, bias=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches.to(self.proj.weight.dtype))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x, cu_seqlens, max_seqlen: int, cos, sin):
        qkv = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1)
        out = vision_attention_packed(qkv, cu_seqlens, max_seqlen, cos=cos, sin=sin)
        return self.proj(out.reshape(x.shape[0], -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act_fn = activation(config.hidden_act)

    def forward(self, x):
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x, cu_seqlens, max_seqlen: int, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """2x2 merge: LayerNorm per patch then concatenate 4 (``postshuffle_norm=False``: the final merger), or
    concatenate then LayerNorm over 4*hidden (DeepStack mergers); then Linear-GELU-Linear to the text width."""

    def __init__(self, config: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.merged_size = config.hidden_size * config.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged_size if postshuffle_norm else config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_size, self.merged_size, bias=True)
        self.linear_fc2 = nn.Linear(self.merged_size, config.out_hidden_size, bias=True)

    def forward(self, x):
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_size))
        else:
            x = self.norm(x).reshape(-1, self.merged_size)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def vision_rotary(coords: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin [P, head_dim] of the 2D RoPE: head_dim/4 frequencies theta^(-2i/(head_dim/2)) on the row,
    the same on the column, concatenated, then repeated twice (rotate-half layout)."""
    quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float32, device=coords.device)
    inv_freq = 1.0 / theta ** (quarter / (head_dim // 2))
    angles = (coords.float()[:, :, None] * inv_freq).reshape(coords.shape[0], -1)  # [P, (row, col) x freq]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(config, postshuffle_norm=True)
                                                   for _ in config.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(image embeddings [P/4, out_hidden], DeepStack features: one [P/4, out_hidden] per tap)."""
        c, device = self.config, pixel_values.device
        side = int(c.num_position_embeddings ** 0.5)
        x = self.patch_embed(pixel_values)
        taps, weights = vision_position_taps(grid_thw, c.spatial_merge_size, side, device)  # fp32 weights
        x = x + (self.pos_embed(taps) * weights[:, :, None]).sum(1).to(x.dtype)
        cos, sin = vision_rotary(vision_patch_coords(grid_thw, c.spatial_merge_size, device), c.head_dim,
                                 c.rope_theta)
        cu_seqlens, max_seqlen = vision_cu_seqlens(grid_thw, device)
        deepstack = []
        for index, block in enumerate(self.blocks):
            x = block(x, cu_seqlens, max_seqlen, cos, sin)
            if index in c.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[c.deepstack_visual_indexes.index(index)](x))
        return self.merger(x), deepstack
