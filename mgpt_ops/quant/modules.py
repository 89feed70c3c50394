"""Model layer of quantized inference: ``quantize_(model, config)`` swaps a model's linear layers (and the fused
MoE experts of transformers 5 models) for modules that run mgpt's quantized GEMMs.

Methods (``QuantConfig.method``; checkpoint name in brackets, format in ``checkpoint.py``):

* ``fp8_rowwise`` (``mgpt_fp8``): FP8 e4m3 weight with one scale per output channel; activations quantized per
  token at run time; ``scaled_mm``.
* ``fp8_block128`` (``mgpt_fp8_block``, also Qwen's ``fp8``): FP8 weight with one scale per 128x128 block
  (``weight_scale_inv``); activations in 1x128 groups; ``block_scaled_mm`` / ``grouped_block_scaled_mm``.
* ``int8_w8a8`` (``mgpt_int8``): symmetric INT8 weight per output channel, INT8 activations per token; ``scaled_mm``.
* ``w4a16`` (``mgpt_w4a16``): int4 weight in groups of ``group_size`` along K (asymmetric unless ``symmetric``),
  16-bit activations; ``w4a16_mm``.

Module state uses the checkpoint's tensor names (``weight``, ``weight_scale``, ``weight_scale_inv``, ``qweight``,
``scales``, ``zeros``, ``bias``) as buffers, so ``state_dict()`` is the checkpoint apart from MoE experts.

MoE experts (Qwen3-MoE / Qwen3-VL-MoE ``*Experts``: 3-D ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]`` --
transformers 5 holds both models in this layout in memory; the Qwen3-VL-MoE hub files store the fused tensors
transposed, which transformers undoes on load) become ``QuantizedExperts`` with three children ``gate_proj``,
``up_proj``, ``down_proj`` holding the per-expert tensors stacked along a leading E dim. Gate and up are
quantized separately (so a 128-row block never straddles them, whatever I is). Routing (the router and its top-k)
stays in high precision. ``fp8_block128`` runs each projection as ONE ``grouped_block_scaled_mm`` over the tokens
sorted by expert; the other methods loop over the experts that received tokens, one per-expert GEMM each (as
the transformers eager path does) -- correct, but not a fused kernel.

By default the vision tower (``visual``), embeddings and ``lm_head`` stay in high precision, and so does every
layer whose shape the method cannot take (reported in ``model.mgpt_quantization.skipped``, or an error with
``QuantConfig(skip_incompatible=False)``). Inference only: the quantized modules hold no parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mgpt_ops.quant.block_gemm import block_scaled_mm, grouped_block_scaled_mm
from mgpt_ops.quant.quantize import (quantize_fp8_group, quantize_fp8_per_token, quantize_int8_per_token,
                                     quantize_weight_block128, quantize_weight_per_channel)
from mgpt_ops.quant.scaled_gemm import INT8_MAX_K, scaled_mm
from mgpt_ops.quant.w4a16 import GROUP_SIZES, PACK, quantize_int4_weight, w4a16_mm

logger = logging.getLogger(__name__)

METHODS = ("fp8_rowwise", "fp8_block128", "int8_w8a8", "w4a16")
CHECKPOINT_METHOD = {"fp8_rowwise": "mgpt_fp8", "fp8_block128": "mgpt_fp8_block", "int8_w8a8": "mgpt_int8",
                     "w4a16": "mgpt_w4a16"}
DEFAULT_NOT_CONVERTED = ("lm_head", "visual", "embed_tokens")
BLOCK = 128
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class QuantConfig:
    """What ``quantize_`` does. ``group_size`` and ``symmetric`` apply to ``w4a16`` only.

    ``modules_to_not_convert``: dotted name patterns kept in high precision; a pattern matches a module whose
    qualified name contains it as whole components ("visual" matches "model.visual.blocks.0.attn.qkv", not
    "model.visualizer"). Giving it replaces the default list. ``skip_incompatible``: keep layers whose shape the
    method cannot take in high precision (True) or raise (False)."""

    method: str
    group_size: int = 128
    symmetric: bool = False
    modules_to_not_convert: tuple[str, ...] = DEFAULT_NOT_CONVERTED
    skip_incompatible: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"mgpt.quantize_: unknown method {self.method!r}; expected one of {METHODS}")
        if self.method == "w4a16":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or \
                    self.group_size not in GROUP_SIZES:
                raise ValueError(f"mgpt.quantize_: w4a16 'group_size' must be one of {GROUP_SIZES}, "
                                 f"got {self.group_size!r}")
            if not isinstance(self.symmetric, bool):
                raise TypeError(f"mgpt.quantize_: 'symmetric' must be a bool, got {self.symmetric!r}")
        elif self.group_size != 128 or self.symmetric:
            raise ValueError(f"mgpt.quantize_: 'group_size' and 'symmetric' apply to method 'w4a16' only, got "
                             f"group_size={self.group_size!r}, symmetric={self.symmetric!r} for {self.method!r}")
        if isinstance(self.modules_to_not_convert, str) or not all(
                isinstance(p, str) and p for p in self.modules_to_not_convert):
            raise TypeError("mgpt.quantize_: 'modules_to_not_convert' must be a sequence of non-empty strings, "
                            f"got {self.modules_to_not_convert!r}")
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))

    @classmethod
    def of(cls, config: str | QuantConfig) -> QuantConfig:
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            return cls(config)
        raise TypeError(f"mgpt.quantize_: 'config' must be a method name {METHODS} or a QuantConfig, "
                        f"got {type(config).__name__}")


@dataclass
class QuantizationState:
    """Attached to a quantized model as ``model.mgpt_quantization``: what was converted and what was kept."""

    config: QuantConfig
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # qualified name -> why it stays high precision
    not_converted: list[str] = field(default_factory=list)  # prefixes for the checkpoint's modules_to_not_convert


# ------------------------------------------------------------------------------------------------------------
# Per-method tensors, quantizers and GEMMs (weights in nn.Linear layout [N, K])
# ------------------------------------------------------------------------------------------------------------
def tensor_specs(config: QuantConfig, n: int, k: int, act_dtype: torch.dtype) -> dict[str, tuple[tuple, torch.dtype]]:
    """Checkpoint suffix -> (shape, dtype) of one quantized [N, K] weight (the table of the format file)."""
    m = config.method
    if m in ("fp8_rowwise", "int8_w8a8"):
        qdtype = torch.float8_e4m3fn if m == "fp8_rowwise" else torch.int8
        return {"weight": ((n, k), qdtype), "weight_scale": ((n, 1), torch.float32)}
    if m == "fp8_block128":
        return {"weight": ((n, k), torch.float8_e4m3fn),
                "weight_scale_inv": ((math.ceil(n / BLOCK), math.ceil(k / BLOCK)), torch.float32)}
    groups = (n, k // config.group_size)
    specs = {"qweight": ((n, k // PACK), torch.int32), "scales": (groups, act_dtype)}
    if not config.symmetric:
        specs["zeros"] = (groups, act_dtype)
    return specs


def incompatibility(config: QuantConfig, n: int, k: int, dtype: torch.dtype) -> str | None:
    """Why a [N, K] weight of ``dtype`` cannot take the method, or None."""
    if dtype not in WEIGHT_DTYPES:
        return f"weight dtype {dtype} is not bf16/fp16/fp32"
    if config.method == "w4a16" and k % config.group_size:
        return f"K={k} is not divisible by group_size={config.group_size}"
    if config.method == "int8_w8a8" and k > INT8_MAX_K:
        return f"K={k} > {INT8_MAX_K} (int32 accumulation of int8 products could overflow)"
    return None


def quantize_weight(config: QuantConfig, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [N, K] -> the method's tensors (names of ``tensor_specs``)."""
    m = config.method
    if m in ("fp8_rowwise", "int8_w8a8"):
        q, s = quantize_weight_per_channel(w, torch.float8_e4m3fn if m == "fp8_rowwise" else torch.int8)
        return {"weight": q, "weight_scale": s}
    if m == "fp8_block128":
        q, s = quantize_weight_block128(w)
        return {"weight": q, "weight_scale_inv": s}
    qweight, scales, zeros = quantize_int4_weight(w, config.group_size, config.symmetric)
    out = {"qweight": qweight, "scales": scales}
    if zeros is not None:
        out["zeros"] = zeros
    return out


def quantized_matmul(config: QuantConfig, x: torch.Tensor, t: dict[str, torch.Tensor],
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ dequant(W).T + bias, output in x's dtype; activations quantized dynamically."""
    m = config.method
    if m in ("fp8_rowwise", "int8_w8a8"):
        quantize = quantize_fp8_per_token if m == "fp8_rowwise" else quantize_int8_per_token
        q, s = quantize(x)
        return scaled_mm(q, t["weight"], s, t["weight_scale"], out_dtype=x.dtype, bias=bias)
    if m == "fp8_block128":
        q, s = quantize_fp8_group(x, BLOCK)
        return block_scaled_mm(q, t["weight"], s, t["weight_scale_inv"], out_dtype=x.dtype, block=BLOCK, bias=bias)
    out = w4a16_mm(x, t["qweight"], t["scales"], t.get("zeros"), group_size=config.group_size)
    return out if bias is None else out + bias.to(out.dtype)


def _describe(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name}={str(t.dtype).replace('torch.', '')}{list(t.shape)}" for name, t in tensors.items())


def _check_activation(where: str, x: torch.Tensor, k: int) -> None:
    if x.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"mgpt.{where}: input must be bf16/fp16/fp32, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"mgpt.{where}: input must have shape [..., {k}], got {list(x.shape)}")


# ------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` (inference): y = x @ dequant(W).T + b with the method's dynamic activation
    quantization. Buffers carry the checkpoint names; ``bias`` is kept in its original dtype."""

    def __init__(self, config: QuantConfig, tensors: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.quant_config, self.in_features, self.out_features = config, in_features, out_features
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)
        self._names = tuple(tensors)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantizedLinear:
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(config, quantize_weight(config, linear.weight.detach()), linear.in_features,
                   linear.out_features, bias)

    @classmethod
    def empty(cls, config: QuantConfig, in_features: int, out_features: int, *, bias: bool, act_dtype: torch.dtype,
              device: torch.device | str = "meta") -> QuantizedLinear:
        """Uninitialised module of the right structure (``load_state_dict(..., assign=True)`` fills it)."""
        tensors = {name: torch.empty(shape, dtype=dtype, device=device)
                   for name, (shape, dtype) in tensor_specs(config, out_features, in_features, act_dtype).items()}
        b = torch.empty(out_features, dtype=act_dtype, device=device) if bias else None
        return cls(config, tensors, in_features, out_features, b)

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_activation(f"QuantizedLinear[{self.quant_config.method}]", x, self.in_features)
        out = quantized_matmul(self.quant_config, x.reshape(-1, self.in_features), self.quantized_tensors(), self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        extra = f", group_size={self.quant_config.group_size}, symmetric={self.quant_config.symmetric}" \
            if self.quant_config.method == "w4a16" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.quant_config.method}{extra}, {_describe(self.quantized_tensors())}")


class ExpertWeights(nn.Module):
    """One projection of every expert: the method's tensors for weights [E, N, K], stacked along E."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self._names = tuple(tensors)

    def tensors(self, expert: int | None = None) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) if expert is None else getattr(self, name)[expert] for name in self._names}

    def extra_repr(self) -> str:
        return _describe(self.tensors())


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5 fused MoE experts in the Qwen3-MoE layout (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        return False
    e, two_i, h = gate_up.shape
    return (not getattr(module, "is_transposed", False) and two_i % 2 == 0 and down.shape == (e, h, two_i // 2)
            and hasattr(module, "act_fn") and getattr(module, "gate_up_proj_bias", None) is None)


class QuantizedExperts(nn.Module):
    """Quantized drop-in for the fused MoE experts: forward(hidden [T, H], top_k_index [T, k], top_k_weights
    [T, k]) -> [T, H], the sum over each token's experts of weight * down(act(gate(x)) * up(x))."""

    def __init__(self, config: QuantConfig, projections: dict[str, dict[str, torch.Tensor]], num_experts: int,
                 hidden_dim: int, intermediate_dim: int, act_fn: Callable):
        super().__init__()
        self.quant_config, self.num_experts = config, num_experts
        self.hidden_dim, self.intermediate_dim, self.act_fn = hidden_dim, intermediate_dim, act_fn
        for name in EXPERT_PROJECTIONS:
            self.add_module(name, ExpertWeights(projections[name]))

    @staticmethod
    def shapes(hidden_dim: int, intermediate_dim: int) -> dict[str, tuple[int, int]]:
        """Per-expert [N, K] of each projection."""
        return {"gate_proj": (intermediate_dim, hidden_dim), "up_proj": (intermediate_dim, hidden_dim),
                "down_proj": (hidden_dim, intermediate_dim)}

    @classmethod
    def from_fused(cls, experts: nn.Module, config: QuantConfig) -> QuantizedExperts:
        num_experts, two_i, hidden = experts.gate_up_proj.shape
        inter = two_i // 2
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        per_expert = {"gate_proj": lambda e: gate_up[e, :inter], "up_proj": lambda e: gate_up[e, inter:],
                      "down_proj": lambda e: down[e]}
        projections = {}
        for name, weight_of in per_expert.items():
            parts = [quantize_weight(config, weight_of(e)) for e in range(num_experts)]
            projections[name] = {key: torch.stack([p[key] for p in parts]) for key in parts[0]}
        return cls(config, projections, num_experts, hidden, inter, experts.act_fn)

    @classmethod
    def empty(cls, config: QuantConfig, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: Callable,
              *, act_dtype: torch.dtype, device: torch.device | str = "meta") -> QuantizedExperts:
        projections = {
            name: {key: torch.empty((num_experts, *shape), dtype=dtype, device=device)
                   for key, (shape, dtype) in tensor_specs(config, n, k, act_dtype).items()}
            for name, (n, k) in cls.shapes(hidden_dim, intermediate_dim).items()}
        return cls(config, projections, num_experts, hidden_dim, intermediate_dim, act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        _check_activation(f"QuantizedExperts[{self.quant_config.method}]", hidden_states, self.hidden_dim)
        top_k = top_k_index.shape[-1]
        flat_expert = top_k_index.reshape(-1)
        # Slots routed to index E (transformers' "no expert", e.g. under expert parallelism) contribute nothing.
        slots = torch.nonzero(flat_expert < self.num_experts).squeeze(1)
        slots = slots[torch.argsort(flat_expert[slots], stable=True)]
        token_of, expert_of = slots // top_k, flat_expert[slots]
        x = hidden_states[token_of]
        counts = torch.bincount(expert_of, minlength=self.num_experts)
        if self.quant_config.method == "fp8_block128":
            out = self._grouped_fp8_block(x, counts)
        else:
            out = self._per_expert(x, counts)
        out = out * top_k_weights.reshape(-1)[slots, None]  # promotes like transformers' experts, cast once below
        return torch.zeros_like(hidden_states).index_add_(0, token_of, out.to(hidden_states.dtype))

    def _grouped_fp8_block(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = torch.zeros(self.num_experts + 1, dtype=torch.int32, device=x.device)
        offsets[1:] = torch.cumsum(counts, 0)

        def project(name: str, a: torch.Tensor) -> torch.Tensor:
            q, s = quantize_fp8_group(a, BLOCK)
            t = getattr(self, name).tensors()
            return grouped_block_scaled_mm(q, t["weight"], s, t["weight_scale_inv"], offsets, out_dtype=x.dtype,
                                           block=BLOCK)

        return project("down_proj", self.act_fn(project("gate_proj", x)) * project("up_proj", x))

    def _per_expert(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], self.hidden_dim)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                xe = x[start:start + count]
                gate, up = (quantized_matmul(self.quant_config, xe, getattr(self, n).tensors(expert), None)
                            for n in ("gate_proj", "up_proj"))
                out[start:start + count] = quantized_matmul(self.quant_config, self.act_fn(gate) * up,
                                                            self.down_proj.tensors(expert), None)
                start += count
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, method={self.quant_config.method}")


# ------------------------------------------------------------------------------------------------------------
# quantize_
# ------------------------------------------------------------------------------------------------------------
def matched_prefix(name: str, patterns: tuple[str, ...]) -> str | None:
    """The prefix of ``name`` ending with the first pattern found in it as whole dotted components, or None."""
    parts = name.split(".")
    for pattern in patterns:
        wanted = pattern.split(".")
        for start in range(len(parts) - len(wanted) + 1):
            if parts[start:start + len(wanted)] == wanted:
                return ".".join(parts[:start + len(wanted)])
    return None


def _incompatibility_of(module: nn.Module, config: QuantConfig) -> str | None:
    if isinstance(module, nn.Linear):
        return incompatibility(config, module.out_features, module.in_features, module.weight.dtype)
    _, two_i, hidden = module.gate_up_proj.shape
    for name, (n, k) in QuantizedExperts.shapes(hidden, two_i // 2).items():
        reason = incompatibility(config, n, k, module.gate_up_proj.dtype)
        if reason:
            return f"{name}: {reason}"
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_(model: nn.Module, config: str | QuantConfig, *,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Quantize ``model`` in place (torchao style) and return it.

    Every ``nn.Linear`` and every transformers-5 fused experts module becomes a ``QuantizedLinear`` /
    ``QuantizedExperts`` unless its name matches ``config.modules_to_not_convert``, ``filter_fn(module, fqn)``
    returns False, or the method cannot take its shape (kept and reported, see ``QuantConfig.skip_incompatible``).
    Weights are quantized on their current device; the original float weights are released.
    ``model.mgpt_quantization`` records what happened (``save_quantized`` reads it)."""
    config = QuantConfig.of(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"mgpt.quantize_: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear) or is_fused_experts(model):
        raise TypeError("mgpt.quantize_: 'model' is itself a layer; quantize_ replaces submodules, so pass its "
                        "parent (or use QuantizedLinear.from_linear / QuantizedExperts.from_fused)")
    if getattr(model, "mgpt_quantization", None) is not None:
        raise ValueError("mgpt.quantize_: this model is already quantized; start from the high-precision model")
    state = QuantizationState(config)
    prefixes: dict[str, None] = {}
    # Names, not modules: holding every module would keep each replaced float weight alive until the end.
    for name in [name for name, _ in model.named_modules()]:
        if state.converted and name.startswith(state.converted[-1] + "."):
            continue  # inside the module just replaced (named_modules is pre-order), e.g. the experts' act_fn
        module = model.get_submodule(name)
        prefix = matched_prefix(name, config.modules_to_not_convert)
        if prefix is not None:
            prefixes[prefix] = None
        is_linear = isinstance(module, nn.Linear)
        if not (is_linear or is_fused_experts(module)) or prefix is not None:
            continue
        if filter_fn is not None and not filter_fn(module, name):
            state.skipped[name] = "filter_fn returned False"
            prefixes[name] = None
            continue
        reason = _incompatibility_of(module, config)
        if reason is not None:
            if not config.skip_incompatible:
                raise ValueError(f"mgpt.quantize_: module '{name}' cannot be quantized with {config.method!r}: "
                                 f"{reason} (QuantConfig(skip_incompatible=True) keeps it in high precision)")
            state.skipped[name] = reason
            prefixes[name] = None
            continue
        new = QuantizedLinear.from_linear(module, config) if is_linear else QuantizedExperts.from_fused(module, config)
        _set_submodule(model, name, new)
        state.converted.append(name)
    state.not_converted = list(prefixes)
    for name, reason in state.skipped.items():
        logger.warning("mgpt.quantize_: kept '%s' in high precision: %s", name, reason)
    model.mgpt_quantization = state
    return model
