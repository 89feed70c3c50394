"""vLLM MoE method for quantized routed experts (Qwen3-MoE / Qwen3-VL-MoE ``mlp.experts``) in the mgpt formats.

Checkpoint tensors are per expert, ``<experts>.{e}.{gate_proj,up_proj,down_proj}.<suffix>``; vLLM's expert
loader maps gate/up into ``w13_<suffix>`` [E, 2I, ...] (gate rows first) and down into ``w2_<suffix>`` [E, H, ...],
handling tensor-parallel slicing and expert parallel placement. Parameters (E local experts, I per TP rank):

* mgpt_fp8 / mgpt_int8: ``w13_weight`` [E, 2I, H], ``w13_weight_scale`` fp32 [E, 2I, 1]; ``w2_weight`` [E, H, I],
  ``w2_weight_scale`` [E, H, 1].
* mgpt_fp8_block: ``w13_weight``, ``w13_weight_scale_inv`` fp32 [E, 2 ceil(I/128), ceil(H/128)]; ``w2_weight``,
  ``w2_weight_scale_inv`` [E, ceil(H/128), ceil(I/128)].
* mgpt_w4a16: ``w13_qweight`` int32 [E, 2I, H/8], ``w13_scales`` (+ ``w13_zeros``) fp32 [E, 2I, H/group];
  ``w2_qweight`` [E, H, I/8], ``w2_scales`` (+ ``w2_zeros``) [E, H, I/group].

Gate and up keep separate block-scale grids (``ceil(I/128)`` rows each), so a 128-row block never straddles them
whatever I is; fp8_block therefore runs gate and up as two GEMMs.

``apply`` gets the routed top-k (vLLM's router did the softmax / renormalisation) and computes, for each token t,
``sum_j w_tj * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with e = topk_ids[t, j]: tokens are sorted by expert, every
projection of mgpt_fp8_block is ONE ``grouped_block_scaled_mm`` over all experts; the other methods loop over the
experts that received tokens (one ``scaled_mm`` / ``w4a16_mm`` each; the per-expert row counts are read on the
host). vLLM wraps the MoE layer in a custom op, so this host read does not break its torch.compile graph.
Supported: SiLU-gated experts without biases, router weights applied to the output (Qwen3 MoE); anything else is
refused when the model is built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.utils import set_weight_attrs

import mgpt_ops

BLOCK = 128
PACK = 8


def experts_method(config, layer, prefix: str) -> MgptExpertsMethod | None:
    """The method for a ``RoutedExperts`` layer, or None (vLLM's unquantized experts) when it is not converted."""
    if config.is_skipped(prefix):
        return None
    moe = layer.moe_config
    problems = []
    if moe.activation != MoEActivation.SILU or not moe.is_act_and_mul:
        problems.append(f"activation {moe.activation} (only SiLU-gated experts)")
    if moe.has_bias:
        problems.append("expert biases")
    if layer.apply_router_weight_on_input:
        problems.append("router weights applied to the input")
    if problems:
        raise NotImplementedError(f"{config.get_name()}: MoE layer '{prefix}' is not supported: "
                                  f"{', '.join(problems)}")
    return MgptExpertsMethod(config, moe)


class MgptExpertsMethod(FusedMoEMethodBase):
    """Routed experts in one of the four mgpt formats (parameter table and forward in the module docstring)."""

    def __init__(self, quant_config, moe):
        super().__init__(moe)
        self.quant_config = quant_config
        self.kind = quant_config.get_name()

    # --- parameters ---------------------------------------------------------------------------------------------
    def _specs(self, n: int, k: int, gate_up: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype, str | None]]:
        """suffix -> (shape of one expert, dtype, FusedMoeWeightScaleSupported value or None for weights)."""
        if self.kind in ("mgpt_fp8", "mgpt_int8"):
            qdtype = self.quant_config.weight_dtype
            return {"weight": ((n, k), qdtype, None),
                    "weight_scale": ((n, 1), torch.float32, FusedMoeWeightScaleSupported.CHANNEL.value)}
        if self.kind == "mgpt_fp8_block":
            rows = 2 * math.ceil(n // 2 / BLOCK) if gate_up else math.ceil(n / BLOCK)
            return {"weight": ((n, k), torch.float8_e4m3fn, None),
                    "weight_scale_inv": ((rows, math.ceil(k / BLOCK)), torch.float32,
                                         FusedMoeWeightScaleSupported.BLOCK.value)}
        group = self.quant_config.group_size
        specs = {"qweight": ((n, k // PACK), torch.int32, None),
                 "scales": ((n, k // group), torch.float32, FusedMoeWeightScaleSupported.GROUP.value)}
        if not self.quant_config.symmetric:
            specs["zeros"] = specs["scales"]
        return specs

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        inter = intermediate_size_per_partition
        self._check_shapes(layer, hidden_size, inter)
        self.params = []
        for stem, (n, k) in (("w13", (2 * inter, hidden_size)), ("w2", (hidden_size, inter))):
            for suffix, (shape, dtype, scale_kind) in self._specs(n, k, stem == "w13").items():
                param = torch.nn.Parameter(torch.empty(num_experts, *shape, dtype=dtype), requires_grad=False)
                name = f"{stem}_{suffix}"
                layer.register_parameter(name, param)
                attrs = dict(extra_weight_attrs)
                if scale_kind is not None:
                    attrs["quant_method"] = scale_kind
                set_weight_attrs(param, attrs)
                self.params.append(name)

    def _check_shapes(self, layer, hidden: int, inter: int) -> None:
        prefix = getattr(layer, "layer_name", "<experts>")
        if self.kind == "mgpt_w4a16":
            group = self.quant_config.group_size
            if hidden % group or inter % group:
                raise ValueError(f"mgpt_w4a16: MoE layer '{prefix}' needs hidden ({hidden}) and intermediate per "
                                 f"rank ({inter}) to be multiples of group_size={group}")
        tp = self.moe.tp_size
        if self.kind == "mgpt_fp8_block" and tp > 1 and inter % BLOCK:
            raise ValueError(f"mgpt_fp8_block: MoE layer '{prefix}' splits the expert intermediate size into "
                             f"{inter} per rank, not a multiple of {BLOCK}; use a smaller tensor-parallel size")

    def get_fused_moe_quant_config(self, layer):
        return None  # no vLLM modular kernel: apply runs mgpt's ops itself

    def process_weights_after_loading(self, layer) -> None:
        for name in self.params:
            setattr(layer, name, torch.nn.Parameter(getattr(layer, name).data, requires_grad=False))

    # --- forward ------------------------------------------------------------------------------------------------
    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        # Shared experts (if any) run outside: vLLM's MoE runner calls them for methods without a modular kernel.
        tokens, top_k = topk_ids.shape
        ids = topk_ids.reshape(-1).long()
        if layer.expert_map is not None:  # expert parallelism: global ids -> local ids, -1 = on another rank
            ids = layer.expert_map[ids].long()
        token_of = torch.arange(tokens, device=x.device).repeat_interleave(top_k)
        weight_of = topk_weights.reshape(-1)
        local = ids >= 0
        ids, token_of, weight_of = ids[local], token_of[local], weight_of[local]
        order = torch.argsort(ids, stable=True)
        ids, token_of, weight_of = ids[order], token_of[order], weight_of[order]
        out = torch.zeros(tokens, x.shape[1], dtype=torch.float32, device=x.device)
        if ids.numel() == 0:
            return out.to(x.dtype)
        num_experts = getattr(layer, self.params[0]).shape[0]
        counts = torch.bincount(ids, minlength=num_experts)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        rows = x[token_of]
        gate = self._project(layer, "w13", rows, offsets, half=0)
        up = self._project(layer, "w13", rows, offsets, half=1)
        hidden = self._project(layer, "w2", F.silu(gate) * up, offsets, half=None)
        out.index_add_(0, token_of, hidden.float() * weight_of.float()[:, None])
        return out.to(x.dtype)

    def _project(self, layer, stem: str, rows: torch.Tensor, offsets: torch.Tensor, half: int | None
                 ) -> torch.Tensor:
        """rows [M, K] sorted by expert (expert e owns rows offsets[e]:offsets[e+1]) @ W_e.T -> [M, N]. ``half``
        picks the gate (0) or up (1) rows of w13; every w13 tensor, block scales included, splits in two halves."""
        suffixes = [name.removeprefix(f"{stem}_") for name in self.params if name.startswith(f"{stem}_")]
        t = {s: getattr(layer, f"{stem}_{s}") for s in suffixes}
        if half is not None:
            t = {s: v.chunk(2, dim=1)[half] for s, v in t.items()}
        if self.kind == "mgpt_fp8_block":
            q, scale = mgpt_ops.quantize_fp8_group(rows, BLOCK)
            return mgpt_ops.grouped_block_scaled_mm(q, t["weight"], scale, t["weight_scale_inv"], offsets,
                                                    out_dtype=rows.dtype, block=BLOCK)
        if self.kind == "mgpt_w4a16":
            zeros = t.get("zeros")

            def gemm(e: int, lo: int, hi: int) -> torch.Tensor:
                return mgpt_ops.w4a16_mm(rows[lo:hi], t["qweight"][e], t["scales"][e],
                                         None if zeros is None else zeros[e], group_size=self.quant_config.group_size)
        else:
            quantize = (mgpt_ops.quantize_fp8_per_token if self.kind == "mgpt_fp8"
                        else mgpt_ops.quantize_int8_per_token)
            q, scale = quantize(rows)

            def gemm(e: int, lo: int, hi: int) -> torch.Tensor:
                return mgpt_ops.scaled_mm(q[lo:hi], t["weight"][e], scale[lo:hi], t["weight_scale"][e],
                                          out_dtype=rows.dtype)
        out = rows.new_empty(rows.shape[0], t[suffixes[0]].shape[1])
        bounds = offsets.tolist()  # host read: one GEMM per expert that received tokens
        for e in range(len(bounds) - 1):
            if bounds[e] < bounds[e + 1]:
                out[bounds[e]:bounds[e + 1]] = gemm(e, bounds[e], bounds[e + 1])
        return out
