"""Top-k routed mixture of experts (Qwen3-VL-MoE's ``Qwen3VLMoeTextSparseMoeBlock``, no shared expert).

    gate (router):  p = softmax(x @ W_r^T) in fp32; top-k of p; the k weights renormalised to sum to 1
    experts:        y = sum over the token's k experts e of weight_e * down_e(silu(gate_e(x)) * up_e(x))

``GroupedExperts`` keeps transformers 5's layout -- ``gate_up_proj [E, 2*I, H]`` (gate rows first, then up),
``down_proj [E, H, I]`` -- and splits the work in two levels so expert parallelism can wrap the lower one:
    forward(x [M, H], topk_idx [M, k], topk_weight [M, k]) -> [M, H]
        sorts the M*k (token, expert) rows by expert, calls ``compute``, weights and sums the rows back;
    compute(x_sorted [R, H], tokens_per_expert int64 [E_local]) -> [R, H]
        expert e's SwiGLU on its contiguous group of rows: torch's grouped GEMM (no host sync) where it runs,
        else a per-expert loop (one host read of the E_local counts).
An EP wrapper all-to-alls the sorted rows to the ranks owning the experts, calls ``compute`` with the local
slice of experts (``gate_up_proj`` / ``down_proj`` sharded on dim 0), and all-to-alls the results back.

Load balancing: each MoE block returns ``RouterStats`` (per-expert top-k counts and summed probabilities over
its rows); ``load_balancing_loss`` combines the layers as HF's ``load_balancing_loss_func`` does (a packed batch
has no padding):  aux = E * sum_e (counts_e / rows) * (probs_e / rows), with counts and probs summed over all
MoE layers and rows = tokens x layers = sum_e counts_e / k (every row makes k assignments). Padding added for
parallelism or pipelining (``pad_tokens`` trailing tokens of a batch) reaches the block as ``row_mask`` (False on
pad rows): pad rows are routed like any row but left out of the statistics, so the aux loss is the unpadded
batch's whatever the padding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from mgpt_train.model.config import TextConfig


class RouterStats(NamedTuple):
    counts: torch.Tensor  # fp32 [E]: top-k assignments per expert (no gradient); their sum is k x rows
    prob_sum: torch.Tensor  # fp32 [E]: sum over rows of the router probabilities (differentiable)


class TopKRouter(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, row_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, RouterStats]:
        """(topk_idx [M, k], topk_weight [M, k] in x's dtype, stats of the rows where ``row_mask`` [M] is True,
        or of all rows)."""
        probs = torch.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)
        top_probs, topk_idx = torch.topk(probs, self.top_k, dim=-1)
        topk_weight = (top_probs / top_probs.sum(dim=-1, keepdim=True)).to(x.dtype)
        if row_mask is None:
            counts = torch.bincount(topk_idx.flatten(), minlength=probs.shape[-1]).float()
            return topk_idx, topk_weight, RouterStats(counts, probs.sum(0))
        keep = row_mask.to(probs.dtype)[:, None]  # a multiply, not a boolean index: no host sync
        counts = torch.bincount(topk_idx.flatten(), weights=keep.expand_as(topk_idx).flatten(),
                                minlength=probs.shape[-1]).float()
        return topk_idx, topk_weight, RouterStats(counts, (probs * keep).sum(0))


_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_usable(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """torch's grouped GEMM takes fp32/bf16/fp16 operands whose row strides are multiples of 16 bytes (and, on
    older CPU builds, 16-byte aligned data), on CPU and on CUDA from sm_80; anything else (float64 tests, odd
    tiny widths, older GPUs) takes the per-expert loop."""
    dtype = x.dtype
    if _grouped_mm is None or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if gate_up_proj.dtype != dtype or down_proj.dtype != dtype:
        return False
    hidden, intermediate = x.shape[1], down_proj.shape[2]
    if (hidden * x.element_size()) % 16 or (intermediate * x.element_size()) % 16:
        return False
    if gate_up_proj.device.type == "cuda":
        return torch.cuda.get_device_capability(gate_up_proj.device) >= (8, 0)
    return gate_up_proj.device.type == "cpu" and all(t.data_ptr() % 16 == 0 for t in (x, gate_up_proj, down_proj))


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        for weight in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(weight, std=0.02)

    def compute(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """SwiGLU of local expert e on rows [sum(counts[:e]), sum(counts[:e+1])) of ``x_sorted``."""
        # Under expert parallelism the weights are DTensors sharded over experts: compute on the local shard.
        gate_up_proj, down_proj = (w.to_local() if isinstance(w, DTensor) else w
                                   for w in (self.gate_up_proj, self.down_proj))
        if tokens_per_expert.shape != (gate_up_proj.shape[0],):
            raise ValueError(f"GroupedExperts.compute: 'tokens_per_expert' must have shape "
                             f"[{gate_up_proj.shape[0]}] (one count per local expert), got "
                             f"{list(tokens_per_expert.shape)}")
        if _grouped_mm_usable(x_sorted, gate_up_proj, down_proj):
            # One grouped GEMM per projection for all experts, no host sync (offsets stay on the device); empty
            # experts are empty groups and get zero gradients.
            offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
            gate, up = _grouped_mm(x_sorted, gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
            return _grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offsets)
        outputs = []
        # unbind once: indexing gate_up_proj[e] per expert would make every backward of that index allocate
        # a zero [E, 2I, H] gradient (E^2 traffic); unbind's backward stacks the per-expert gradients once.
        experts = zip(gate_up_proj.unbind(0), down_proj.unbind(0))
        # Empty experts still run (an empty matmul): every expert weight stays in the autograd graph and gets a
        # zero gradient rather than None, so sharded gradient reductions (FSDP2, EP) stay in step across ranks.
        for rows, (gate_up_proj, down_proj) in zip(torch.split(x_sorted, tokens_per_expert.tolist()), experts):
            gate, up = F.linear(rows, gate_up_proj).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, down_proj))
        return torch.cat(outputs)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        k = topk_idx.shape[1]
        order = torch.argsort(topk_idx.flatten(), stable=True)  # (token, slot) rows grouped by expert
        tokens = order // k
        tokens_per_expert = torch.bincount(topk_idx.flatten(), minlength=self.num_experts)
        out_rows = self.compute(x[tokens], tokens_per_expert)
        out_rows = out_rows * topk_weight.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, out_rows.to(x.dtype))


class SparseMoeBlock(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate = TopKRouter(config)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x: torch.Tensor, row_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats]:
        topk_idx, topk_weight, stats = self.gate(x, row_mask)
        return self.experts(x, topk_idx, topk_weight), stats


def load_balancing_loss(stats: list[RouterStats], num_experts: int, top_k: int) -> torch.Tensor:
    """HF's router auxiliary loss over all MoE layers (see the module docstring)."""
    counts = torch.stack([s.counts for s in stats]).sum(0)
    probs = torch.stack([s.prob_sum for s in stats]).sum(0)
    rows = (counts.sum() / top_k).clamp_min(1)
    return num_experts * torch.sum((counts / rows) * (probs / rows))
