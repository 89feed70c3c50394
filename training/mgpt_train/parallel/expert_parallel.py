"""Expert parallelism for MoE layers on plain ``all_to_all_single`` collectives.

The E experts of a layer are split over the ``ep`` ranks of an expert-parallel group (rank r owns experts
[r * E/ep, (r+1) * E/ep)). Every rank routes its own tokens; ``expert_parallel_moe`` then

    flattens the top-k choices -> sorts them by expert -> exchanges per-expert counts (all_to_all of counts)
    -> sends each token copy to the rank owning its expert (all_to_all, uneven splits)
    -> regroups the received rows by local expert -> ``experts.compute`` -> undoes the regrouping
    -> sends the results back (the reverse all_to_all) -> weighted sum of the k results per token.

The all_to_all is an autograd Function whose backward is the reverse all_to_all, so gradients reach the inputs,
the router weights (through the combine) and the local expert parameters (summed over every rank's tokens).
The splits must be known on the host, so each layer synchronizes once on the exchanged counts.

EP is folded into dp_shard x cp (Megatron-LM / torchtitan): the group is ``ep`` consecutive ranks of the
"dp_shard_cp" sub-mesh of ``ParallelDims.build_mesh`` (``expert_parallel_group``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mgpt_train.parallel_dims import MESH_DIMS


def shard_experts(full_param: torch.Tensor, ep_rank: int, ep_size: int) -> torch.Tensor:
    """Rank ``ep_rank``'s experts of an [E, ...] expert parameter: rows [ep_rank * E/ep, (ep_rank+1) * E/ep),
    copied (detached) so the full tensor can be freed."""
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"shard_experts: 'ep_size' must be an int >= 1, got {ep_size!r}")
    if not isinstance(ep_rank, int) or not 0 <= ep_rank < ep_size:
        raise ValueError(f"shard_experts: 'ep_rank' must be an int in [0, {ep_size}), got {ep_rank!r}")
    if full_param.dim() < 1 or full_param.size(0) % ep_size:
        raise ValueError(f"shard_experts: the number of experts (dim 0 of 'full_param', shape "
                         f"{list(full_param.shape)}) must be divisible by ep_size={ep_size}")
    local = full_param.size(0) // ep_size
    return full_param.detach().narrow(0, ep_rank * local, local).clone()


def expert_parallel_group(mesh, ep: int):
    """The process group of this rank's ``ep`` consecutive ranks of "dp_shard_cp" on the mesh built by
    ``ParallelDims.build_mesh``. Every rank must call it (new groups are collective), and once: each call
    creates new process groups unless ep spans the whole of dp_shard x cp."""
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(f"expert_parallel_group: 'mesh' must be the root mesh of ParallelDims.build_mesh with dims "
                         f"{MESH_DIMS}, got {mesh.mesh_dim_names}")
    sizes = dict(zip(MESH_DIMS, mesh.mesh.shape))
    shard_cp = sizes["dp_shard"] * sizes["cp"]
    if not isinstance(ep, int) or ep < 1 or shard_cp % ep:
        raise ValueError(f"expert_parallel_group: 'ep' ({ep!r}) must be an int dividing dp_shard*cp = {shard_cp}")
    if ep == shard_cp:
        return mesh["dp_shard_cp"].get_group()
    group, _ = dist.new_subgroups_by_enumeration(expert_parallel_blocks(mesh.mesh, ep))
    return group


def expert_parallel_blocks(mesh_ranks: torch.Tensor, ep: int) -> list[list[int]]:
    """Every expert-parallel group of a mesh's rank tensor (dims MESH_DIMS): each "dp_shard_cp" group
    (dp_shard slower than cp, the order of the flattened sub-mesh) cut into blocks of ``ep`` ranks."""
    dims = [MESH_DIMS.index(n) for n in ("pp", "dp_replicate", "tp", "dp_shard", "cp")]
    return mesh_ranks.permute(*dims).reshape(-1, ep).tolist()


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` go to ranks in order, ``input_splits[r]`` rows to rank r; ``output_splits[r]`` rows arrive
    from rank r. The gradient travels back along the same routes: the reverse all_to_all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all_tokens(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None
                      ) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 with uneven (host) splits."""
    world = dist.get_world_size(group)
    for name, splits in (("output_splits", output_splits), ("input_splits", input_splits)):
        if len(splits) != world or any(s < 0 for s in splits):
            raise ValueError(f"all_to_all_tokens: '{name}' must hold {world} non-negative row counts, got {splits}")
    if sum(input_splits) != x.size(0):
        raise ValueError(f"all_to_all_tokens: 'input_splits' must sum to the rows of 'x' ({x.size(0)}), got "
                         f"{input_splits}")
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def _check_routing(x, topk_idx, topk_weight) -> None:
    where = "expert_parallel_moe"
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{where}: argument 'x' must be a floating tensor [M, hidden], got {x.dtype} of shape "
                         f"{list(x.shape)}")
    if topk_idx.dim() != 2 or topk_idx.size(0) != x.size(0) or topk_idx.is_floating_point():
        raise ValueError(f"{where}: argument 'topk_idx' must be an integer tensor [M={x.size(0)}, k], got "
                         f"{topk_idx.dtype} of shape {list(topk_idx.shape)}")
    if topk_weight.shape != topk_idx.shape or not topk_weight.is_floating_point():
        raise ValueError(f"{where}: argument 'topk_weight' must be a floating tensor of the shape of 'topk_idx' "
                         f"{list(topk_idx.shape)}, got {topk_weight.dtype} of shape {list(topk_weight.shape)}")


def expert_parallel_moe(experts: nn.Module, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                        *, num_experts: int, group=None) -> torch.Tensor:
    """MoE output [M, hidden] = sum_j topk_weight[m, j] * expert_{topk_idx[m, j]}(x[m]) with the experts
    sharded over ``group``: ``experts.compute(x_sorted [R, hidden], tokens_per_expert int64 [E_local])`` holds
    this rank's E_local = num_experts / ep experts. ``topk_idx`` holds GLOBAL expert ids."""
    _check_routing(x, topk_idx, topk_weight)
    ep = dist.get_world_size(group)
    if num_experts % ep:
        raise ValueError(f"expert_parallel_moe: num_experts={num_experts} is not divisible by the expert-parallel "
                         f"group size {ep}")
    local_experts = num_experts // ep
    top_k = topk_idx.size(1)

    # Token copies sorted by global expert, hence by owner rank and then by that rank's local expert.
    flat_expert = topk_idx.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    token_of_copy = order // top_k
    send_counts = torch.bincount(flat_expert, minlength=num_experts)
    if send_counts.numel() != num_experts:
        raise ValueError(f"expert_parallel_moe: argument 'topk_idx' must hold expert ids in [0, {num_experts}), got "
                         f"max {send_counts.numel() - 1}")
    recv_counts = torch.empty_like(send_counts)  # [source rank, local expert] of the copies this rank computes
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    recv_counts = recv_counts.view(ep, local_experts)
    splits = torch.cat([send_counts.view(ep, local_experts).sum(1), recv_counts.sum(1)]).tolist()
    input_splits, output_splits = splits[:ep], splits[ep:]

    received = all_to_all_tokens(x[token_of_copy], output_splits, input_splits, group)
    # Received rows come grouped by source rank, then local expert: regroup by local expert for compute().
    local_expert_of_row = torch.repeat_interleave(
        torch.arange(local_experts, device=x.device).repeat(ep), recv_counts.reshape(-1),
        output_size=received.size(0))
    by_expert = torch.argsort(local_expert_of_row, stable=True)
    grouped = received[by_expert]
    computed = experts.compute(grouped, recv_counts.sum(0))
    if grouped.requires_grad and not computed.requires_grad:
        # compute() may answer zero rows with a constant; the reverse all_to_all must still be in this rank's
        # graph, or the other ranks wait forever for it in backward.
        computed = computed + grouped * 0
    back_to_received = torch.empty_like(by_expert)
    back_to_received[by_expert] = torch.arange(by_expert.numel(), device=x.device)
    returned = all_to_all_tokens(computed[back_to_received], input_splits, output_splits, group)

    weights = topk_weight.reshape(-1)[order].to(returned.dtype)
    out = x.new_zeros(x.shape, dtype=returned.dtype)
    return out.index_add(0, token_of_copy, returned * weights[:, None])


class ExpertParallelMoE(nn.Module):
    """Wraps an experts module holding this rank's experts (``compute`` interface, e.g. the model's
    ``GroupedExperts`` after ``shard_experts``) with the same forward(x, topk_idx, topk_weight) as the
    unsharded module. Expert parameters keep their names under ``.experts``."""

    def __init__(self, experts: nn.Module, num_experts: int, group=None):
        super().__init__()
        if not callable(getattr(experts, "compute", None)):
            raise TypeError(f"ExpertParallelMoE: 'experts' must have a compute(x_sorted, tokens_per_expert) method, "
                            f"got {type(experts).__name__}")
        self.experts, self.num_experts, self.group = experts, num_experts, group

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        return expert_parallel_moe(self.experts, x, topk_idx, topk_weight, num_experts=self.num_experts,
                                   group=self.group)
