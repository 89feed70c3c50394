"""vLLM linear methods of the mgpt quantization formats: parameters shaped like the checkpoint tensors (so vLLM's
weight loaders shard and fuse them: q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``, column / row tensor
parallelism), and ``apply`` running mgpt's ops with dynamically quantized activations.

* mgpt_fp8 / mgpt_int8: ``weight`` fp8 / int8 [N, K], ``weight_scale`` fp32 [N, 1]; per-token activation
  quantizer + ``scaled_mm``.
* mgpt_fp8_block: ``weight`` fp8 [N, K], ``weight_scale_inv`` fp32 [ceil(N/128), ceil(K/128)]; 1x128 activation
  groups + ``block_scaled_mm``.
* mgpt_w4a16: ``qweight`` int32 [N, K/8], ``scales`` (+ ``zeros``) fp32 [N, K/group]; ``w4a16_mm``.

(per tensor-parallel rank; N = the sum of the fused output widths.)

w4a16 scales and zero points are held in fp32 whatever the checkpoint stores (bf16 / fp16 / fp32): the loader's
copy widens them exactly, and ``w4a16_mm`` accepts fp32 scales with activations of any supported dtype. The same
holds for ``weight_scale_inv``, which Qwen's FP8 checkpoints store in bf16.
"""

from __future__ import annotations

import math

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (BlockQuantScaleParameter, ChannelQuantScaleParameter,
                                           GroupQuantScaleParameter, ModelWeightParameter, PackedvLLMParameter)

import mgpt_ops

BLOCK = 128
PACK = 8  # int4 codes per int32 (mgpt_ops.quant.w4a16)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _freeze(layer: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Loader parameters (vLLM subclasses carrying loading hooks) -> plain frozen Parameters for inference."""
    for name in names:
        setattr(layer, name, Parameter(getattr(layer, name).data, requires_grad=False))


def _weight(rows: int, cols: int, dtype: torch.dtype, weight_loader) -> ModelWeightParameter:
    return ModelWeightParameter(data=torch.empty(rows, cols, dtype=dtype), input_dim=1, output_dim=0,
                                weight_loader=weight_loader)


class _MgptLinearMethod(LinearMethodBase):
    """Shared bookkeeping of the four methods (vLLM calls create_weights once per layer instance)."""

    def __init__(self, quant_config):
        self.quant_config = quant_config

    @staticmethod
    def _record_shapes(layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       params_dtype: torch.dtype) -> int:
        layer.logical_widths = output_partition_sizes
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = sum(output_partition_sizes)
        layer.orig_dtype = params_dtype
        return layer.output_size_per_partition


@register_weight_loader_v2_supported_method
class MgptScaledLinearMethod(_MgptLinearMethod):
    """mgpt_fp8 (float8_e4m3fn) and mgpt_int8: per-output-channel weight scales, per-token activation scales."""

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        loader = extra_weight_attrs.get("weight_loader")
        n = self._record_shapes(layer, input_size_per_partition, output_partition_sizes, params_dtype)
        layer.register_parameter("weight", _weight(n, input_size_per_partition, self.quant_config.weight_dtype,
                                                   loader))
        scale = ChannelQuantScaleParameter(data=torch.empty(n, 1, dtype=torch.float32), output_dim=0,
                                           weight_loader=loader)
        layer.register_parameter("weight_scale", scale)

    def process_weights_after_loading(self, layer) -> None:
        _freeze(layer, ("weight", "weight_scale"))

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        quantize = (mgpt_ops.quantize_fp8_per_token if self.quant_config.weight_dtype == torch.float8_e4m3fn
                    else mgpt_ops.quantize_int8_per_token)
        q, scale = quantize(_as_rows(x))
        out = mgpt_ops.scaled_mm(q, layer.weight, scale, layer.weight_scale, out_dtype=x.dtype, bias=bias)
        return out.view(*x.shape[:-1], out.shape[-1])


@register_weight_loader_v2_supported_method
class MgptBlockFp8LinearMethod(_MgptLinearMethod):
    """mgpt_fp8_block (and Qwen's ``fp8`` 128x128 checkpoints): block weight scales, 1x128 activation groups."""

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        loader = extra_weight_attrs.get("weight_loader")
        self._check_block_aligned(layer, input_size, input_size_per_partition, output_size, output_partition_sizes)
        n = self._record_shapes(layer, input_size_per_partition, output_partition_sizes, params_dtype)
        # vLLM's fused-layer loaders place each shard's block scales at ceil(offset / block) (they read this).
        layer.weight_block_size = [BLOCK, BLOCK]
        layer.register_parameter("weight", _weight(n, input_size_per_partition, torch.float8_e4m3fn, loader))
        scale = BlockQuantScaleParameter(
            data=torch.empty(math.ceil(n / BLOCK), math.ceil(input_size_per_partition / BLOCK), dtype=torch.float32),
            input_dim=1, output_dim=0, weight_loader=loader)
        layer.register_parameter("weight_scale_inv", scale)

    @staticmethod
    def _check_block_aligned(layer, input_size: int, input_size_per_partition: int, output_size: int,
                             output_partition_sizes: list[int]) -> None:
        """A 128-row block must never straddle two fused shards (nor two TP ranks): the checkpoint holds one
        scale grid per shard, which only concatenates into the fused grid when the shards before the last are
        whole blocks (true of Qwen's checkpoints: head_dim 128, intermediate sizes multiples of 128)."""
        prefix = getattr(layer, "prefix", "<layer>")
        tp_split_out = sum(output_partition_sizes) != output_size
        sizes = output_partition_sizes if tp_split_out else output_partition_sizes[:-1]
        bad = [s for s in sizes if s % BLOCK]
        if bad:
            raise ValueError(f"mgpt_fp8_block: layer '{prefix}' has fused/sharded output widths "
                             f"{output_partition_sizes} per rank; every width but the last of a fused layer (all of "
                             f"them under tensor parallelism) must be a multiple of {BLOCK}, got {bad}")
        if input_size_per_partition != input_size and input_size_per_partition % BLOCK:
            raise ValueError(f"mgpt_fp8_block: layer '{prefix}' splits K={input_size} into {input_size_per_partition}"
                             f" per rank, which is not a multiple of {BLOCK}; use a smaller tensor-parallel size")

    def process_weights_after_loading(self, layer) -> None:
        _freeze(layer, ("weight", "weight_scale_inv"))

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        q, scale = mgpt_ops.quantize_fp8_group(_as_rows(x), BLOCK)
        out = mgpt_ops.block_scaled_mm(q, layer.weight, scale, layer.weight_scale_inv, out_dtype=x.dtype,
                                       block=BLOCK, bias=bias)
        return out.view(*x.shape[:-1], out.shape[-1])


@register_weight_loader_v2_supported_method
class MgptW4A16LinearMethod(_MgptLinearMethod):
    """mgpt_w4a16: int4 weight groups along K (asymmetric with ``zeros`` unless symmetric), 16-bit activations."""

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        loader = extra_weight_attrs.get("weight_loader")
        group = self.quant_config.group_size
        if input_size_per_partition % group:
            raise ValueError(f"mgpt_w4a16: layer '{getattr(layer, 'prefix', '<layer>')}' has K="
                             f"{input_size_per_partition} per rank, not a multiple of group_size={group}")
        n = self._record_shapes(layer, input_size_per_partition, output_partition_sizes, params_dtype)
        qweight = PackedvLLMParameter(data=torch.empty(n, input_size_per_partition // PACK, dtype=torch.int32),
                                      input_dim=1, output_dim=0, packed_dim=1, packed_factor=PACK,
                                      weight_loader=loader)
        layer.register_parameter("qweight", qweight)
        for name in self._group_tensors():
            groups = GroupQuantScaleParameter(data=torch.empty(n, input_size_per_partition // group,
                                                               dtype=torch.float32),
                                              input_dim=1, output_dim=0, weight_loader=loader)
            layer.register_parameter(name, groups)

    def _group_tensors(self) -> tuple[str, ...]:
        return ("scales",) if self.quant_config.symmetric else ("scales", "zeros")

    def process_weights_after_loading(self, layer) -> None:
        _freeze(layer, ("qweight",) + self._group_tensors())

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        zeros = None if self.quant_config.symmetric else layer.zeros
        out = mgpt_ops.w4a16_mm(x, layer.qweight, layer.scales, zeros, group_size=self.quant_config.group_size)
        return out if bias is None else out + bias.to(out.dtype)
