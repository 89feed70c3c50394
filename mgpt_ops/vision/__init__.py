"""Vision family: packed variable-length ViT attention with fused 2D RoPE, and Hugging Face drop-ins.

Layout (faces side by side):
    _contract.py           what every face computes (shapes, RoPE form, lse, gradients) + reference + fakes
    attention.py           vision_attention / vision_attention_packed: custom ops, autograd, validation
    attention_triton.py    its Triton kernels (FlashAttention-2 style, varlen, fused RoPE)
    hf_patch.py            patch_qwen2_5_vl / patch_qwen3_vl: route HF vision attention through the op
    (C++ CPU kernels: csrc/vision/attention_cpu.cpp)
"""

from mgpt_ops.vision.attention import vision_attention, vision_attention_packed
from mgpt_ops.vision.hf_patch import PatchHandle, patch_qwen2_5_vl, patch_qwen3_vl

__all__ = ["PatchHandle", "patch_qwen2_5_vl", "patch_qwen3_vl", "vision_attention", "vision_attention_packed"]
