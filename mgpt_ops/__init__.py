"""mgpt_ops: fused operators for post-training Qwen3-VL-class models.

Every op is a ``torch.library`` custom op in namespace ``mgpt`` with a fake (meta) implementation and
autograd, so it works under ``torch.compile(fullgraph=True)``. Backends are chosen by device; pin one with
``mgpt_ops.use_backend(...)`` or the environment variable ``MGPT_BACKEND``.
"""

from mgpt_ops import _ext  # noqa: F401  (load the compiled extension first: it defines the mgpt namespace)
from mgpt_ops._backend import BACKENDS, use_backend
from mgpt_ops.quant import (block_scaled_mm, grouped_block_scaled_mm, quantize_fp8_group, quantize_fp8_per_tensor,
                            quantize_fp8_per_token, quantize_int4_weight, quantize_int8_per_tensor,
                            quantize_int8_per_token, quantize_weight_block128, quantize_weight_per_channel, scaled_mm,
                            w4a16_mm)
from mgpt_ops.rl import fused_linear_logprobs, fused_linear_policy_loss, group_advantages, policy_loss
from mgpt_ops.vision import (PatchHandle, patch_qwen2_5_vl, patch_qwen3_vl, vision_attention,
                             vision_attention_packed)

__all__ = ["BACKENDS", "use_backend", "fused_linear_logprobs", "fused_linear_policy_loss", "group_advantages",
           "policy_loss", "vision_attention", "vision_attention_packed", "patch_qwen2_5_vl", "patch_qwen3_vl",
           "PatchHandle", "scaled_mm", "w4a16_mm", "quantize_fp8_per_token", "quantize_int8_per_token",
           "quantize_fp8_per_tensor", "quantize_int8_per_tensor", "quantize_fp8_group", "quantize_weight_per_channel",
           "quantize_weight_block128", "quantize_int4_weight", "block_scaled_mm", "grouped_block_scaled_mm"]
__version__ = "0.1.0"
