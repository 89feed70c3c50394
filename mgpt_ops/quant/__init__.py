"""Quantized inference: FP8 / INT8 quantizers and scaled GEMMs, block-scaled FP8 GEMMs (dense and grouped MoE),
int4 weight-only (W4A16) GEMMs.

Conventions (all ops): weights in ``nn.Linear`` layout ``w [N, K]``; scales are DEQUANTISATION scales
(``x ≈ q * scale``). FP8 / INT8 (``quantize.py``, ``scaled_gemm.py``): fp32 scales, one per row of their
operand (per-token ``[M, 1]``, per-channel ``[N, 1]``) or one per tensor (``[1, 1]``); FP8 is
``torch.float8_e4m3fn`` (max 448), INT8 is symmetric (max 127). Int4 (``w4a16.py``): 8 codes per int32,
per-group scales (and zero points) ``[N, K // group_size]`` in the activation dtype or fp32. Block-scaled FP8
(``block_gemm.py``): 1x128 activation groups ``[M, ceil(K/128)]`` x 128x128 weight blocks
``[ceil(N/128), ceil(K/128)]`` (Qwen's ``weight_scale_inv``). Inference only:
none of these ops is differentiable.

Model layer: ``quantize_(model, config)`` swaps ``nn.Linear`` / MoE experts for quantized modules
(``modules.py``); ``save_quantized`` / ``load_quantized`` (``checkpoint.py``) write and read the Hugging Face
folder the vLLM plugin serves; ``accuracy_report`` (``accuracy.py``) compares a quantized model with its original.
"""

from mgpt_ops.quant.block_gemm import block_scaled_mm, grouped_block_scaled_mm
from mgpt_ops.quant.quantize import (quantize_fp8_group, quantize_fp8_per_tensor, quantize_fp8_per_token,
                                     quantize_int8_per_tensor, quantize_int8_per_token,
                                     quantize_weight_block128, quantize_weight_per_channel)
from mgpt_ops.quant.scaled_gemm import scaled_mm
from mgpt_ops.quant.w4a16 import quantize_int4_weight, w4a16_mm
from mgpt_ops.quant.modules import QuantConfig, QuantizedExperts, QuantizedLinear, quantize_
from mgpt_ops.quant.checkpoint import load_quantized, save_quantized
from mgpt_ops.quant.accuracy import accuracy_report

__all__ = ["QuantConfig", "QuantizedExperts", "QuantizedLinear", "accuracy_report", "block_scaled_mm",
           "grouped_block_scaled_mm", "load_quantized", "quantize_", "quantize_fp8_group",
           "quantize_fp8_per_tensor", "quantize_fp8_per_token", "quantize_int4_weight", "quantize_int8_per_tensor",
           "quantize_int8_per_token", "quantize_weight_block128", "quantize_weight_per_channel", "save_quantized",
           "scaled_mm", "w4a16_mm"]
