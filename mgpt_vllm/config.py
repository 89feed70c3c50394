"""vLLM ``QuantizationConfig`` classes of the mgpt checkpoint formats (``quantization_config.quant_method`` in
config.json): ``mgpt_fp8``, ``mgpt_fp8_block``, ``mgpt_int8``, ``mgpt_w4a16``.

Which layers are quantized: every linear layer (``LinearBase``) whose name matches no entry of the checkpoint's
``modules_to_not_convert`` (or ``ignored_layers``, the key of other FP8 tools). An entry matches a layer whose
dotted name contains it as whole components (``"visual"`` matches ``visual.blocks.0.attn.qkv``, ``"lm_head"``
matches ``lm_head``), the rule ``mgpt_ops.quant.quantize_`` used when it wrote the list. A fused vLLM layer
(``qkv_proj``, ``gate_up_proj``) is checked shard by shard under the checkpoint's names (``q_proj`` ...); its
shards must agree. Embeddings, ``lm_head``, attention and MoE routers (``GateLinear``) stay in the model's dtype;
MoE experts: see ``mgpt_vllm.moe``.

``mgpt_fp8_block`` also serves Qwen's published FP8 checkpoints (``"quant_method": "fp8"``, ``"weight_block_size":
[128, 128]``, dynamic activations) when asked for with ``--quantization mgpt_fp8_block``; without that flag vLLM
keeps its own ``fp8`` method for them.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from mgpt_vllm import linear, moe

W4A16_GROUP_SIZES = (32, 64, 128)
QWEN_FP8_METHOD = "fp8"


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` occurs in ``name`` as a run of whole dotted components."""
    parts, wanted = name.split("."), pattern.split(".")
    return any(parts[i:i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))


class _MgptConfig(QuantizationConfig):
    """Behaviour shared by the four methods; subclasses name themselves and pick their linear method."""

    NAME = ""
    MIN_CAPABILITY = 80  # Ampere: bf16 tensor cores for the Triton faces (fp8 methods raise it)
    LINEAR_METHOD: type = linear.MgptScaledLinearMethod

    def __init__(self, modules_to_not_convert: list[str] | None = None):
        super().__init__()
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    # --- vLLM's interface -------------------------------------------------------------------------------------
    @classmethod
    def get_name(cls) -> str:
        return cls.NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return cls.MIN_CAPABILITY

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _MgptConfig:
        method = config.get("quant_method")
        if method not in cls._accepted_methods():
            raise ValueError(f"{cls.NAME}: the checkpoint's quantization_config.quant_method is {method!r}, "
                             f"expected one of {cls._accepted_methods()}")
        scheme = config.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(f"{cls.NAME}: only activation_scheme 'dynamic' is supported, got {scheme!r}")
        skip = cls.get_from_keys_or(config, ["modules_to_not_convert", "ignored_layers"], None)
        return cls(skip, **cls._method_options(config))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # Multimodal models rename submodules (e.g. model.language_model. -> language_model.model.).
        self.modules_to_not_convert = hf_to_vllm_mapper.apply_list(self.modules_to_not_convert)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            # MoE routers stay in high precision (mgpt_ops.quant never quantizes them: they are no nn.Linear).
            skip = isinstance(layer, GateLinear) or self.is_skipped(prefix)
            return UnquantizedLinearMethod() if skip else self.LINEAR_METHOD(self)
        if isinstance(layer, RoutedExperts):
            return moe.experts_method(self, layer, prefix)
        return None

    # --- ours -------------------------------------------------------------------------------------------------
    @classmethod
    def _accepted_methods(cls) -> tuple[str, ...]:
        return (cls.NAME,)

    @classmethod
    def _method_options(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {}

    def is_skipped(self, prefix: str) -> bool:
        """Whether the layer ``prefix`` (vLLM's name; fused layers are expanded to their checkpoint shards)
        stays unquantized."""
        last = prefix.rsplit(".", 1)[-1]
        shards = [prefix[: len(prefix) - len(last)] + s for s in self.packed_modules_mapping.get(last, [])]
        names = shards or [prefix]
        skipped = [any(_matches(n, p) for p in self.modules_to_not_convert) for n in names]
        if any(skipped) and not all(skipped):
            raise ValueError(f"{self.NAME}: the fused layer '{prefix}' mixes quantized and unquantized shards "
                             f"({dict(zip(names, skipped))} by modules_to_not_convert={self.modules_to_not_convert}"
                             "); vLLM runs a fused layer with one method")
        return skipped[0]


class MgptFp8Config(_MgptConfig):
    """FP8 e4m3 weights with one scale per output channel, FP8 activations per token."""

    NAME = "mgpt_fp8"
    MIN_CAPABILITY = 89  # FP8 tensor cores (Ada / Hopper)
    weight_dtype = torch.float8_e4m3fn


class MgptInt8Config(_MgptConfig):
    """Symmetric INT8 weights per output channel, INT8 activations per token."""

    NAME = "mgpt_int8"
    weight_dtype = torch.int8


class MgptFp8BlockConfig(_MgptConfig):
    """FP8 weights in 128x128 blocks (``weight_scale_inv``), activations in 1x128 groups."""

    NAME = "mgpt_fp8_block"
    MIN_CAPABILITY = 89
    LINEAR_METHOD = linear.MgptBlockFp8LinearMethod
    BLOCK_SIZE = (128, 128)

    @classmethod
    def _accepted_methods(cls) -> tuple[str, ...]:
        return (cls.NAME, QWEN_FP8_METHOD)

    @classmethod
    def _method_options(cls, config: dict[str, Any]) -> dict[str, Any]:
        block = config.get("weight_block_size", list(cls.BLOCK_SIZE))
        if list(block) != list(cls.BLOCK_SIZE):
            raise ValueError(f"{cls.NAME}: weight_block_size must be [128, 128], got {block!r}")
        return {}

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        """Take over Qwen's ``fp8`` 128x128 checkpoints, but only when the user asked for this method."""
        if user_quant != cls.NAME or hf_quant_cfg.get("quant_method") != QWEN_FP8_METHOD:
            return None
        if list(hf_quant_cfg.get("weight_block_size") or []) != list(cls.BLOCK_SIZE):
            return None
        return cls.NAME


class MgptW4A16Config(_MgptConfig):
    """Int4 weights in groups along K (``qweight``/``scales``/``zeros``), 16-bit activations."""

    NAME = "mgpt_w4a16"
    LINEAR_METHOD = linear.MgptW4A16LinearMethod

    def __init__(self, modules_to_not_convert: list[str] | None = None, *, group_size: int = 128,
                 symmetric: bool = False):
        super().__init__(modules_to_not_convert)
        if group_size not in W4A16_GROUP_SIZES:
            raise ValueError(f"{self.NAME}: group_size must be one of {W4A16_GROUP_SIZES}, got {group_size!r}")
        if not isinstance(symmetric, bool):
            raise ValueError(f"{self.NAME}: symmetric must be true or false, got {symmetric!r}")
        self.group_size = group_size
        self.symmetric = symmetric

    @classmethod
    def _method_options(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"group_size": config.get("group_size", 128), "symmetric": config.get("symmetric", False)}


CONFIGS: tuple[type[_MgptConfig], ...] = (MgptFp8Config, MgptFp8BlockConfig, MgptInt8Config, MgptW4A16Config)
