"""Expert parallelism (mgpt_train.parallel.expert_parallel) on gloo ranks: ep=4 (the whole "dp_shard_cp" sub-mesh)
and ep=2 (two blocks of it) against a dense float64 MoE written from the formula over every rank's tokens:
output, d x, d router weight and d expert parameters (the shards gathered); and the model's GroupedExperts
sharded behind ExpertParallelMoE against its own unsharded forward. Routing is uneven on purpose: one
rank sends no token, some experts get none, and at ep=4 one rank receives none. One spawn runs every case.
"""


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gloo_ranks import error_message, run_on_gloo_ranks
from mgpt_train.parallel import ExpertParallelMoE, all_to_all_tokens, expert_parallel_group, shard_experts
from mgpt_train.parallel.expert_parallel import expert_parallel_blocks, expert_parallel_moe
from mgpt_train.parallel_dims import MESH_DIMS, ParallelDims

WORLD = 4
HIDDEN, INTER, EXPERTS, TOP_K = 8, 6, 8, 2
UNUSED_EXPERTS = (2, 6, 7)  # expert 2 idles while its owner works; at ep=4 rank 3 owns 6 and 7: receives nothing
TOKENS = {4: [5, 0, 9, 3], 2: [0, 7]}  # tokens per group rank: the second (first) rank sends nothing


class TinyExperts(nn.Module):
    """Stand-in for the model's GroupedExperts: SwiGLU experts in the transformers 5 layout, with compute()."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj)  # [E_local, 2 * I, H]
        self.down_proj = nn.Parameter(down_proj)  # [E_local, H, I]

    def compute(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        outputs = []
        for e, rows in enumerate(x_sorted.split(tokens_per_expert.tolist())):
            gate, up = (rows @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            outputs.append((F.silu(gate) * up) @ self.down_proj[e].T)
        return torch.cat(outputs)


def dense_moe64(x, router, gate_up, down, topk_idx):
    """sum_j w[m, j] * down_e(silu(gate_e x) * up_e x), e = topk_idx[m, j], w = renormalized top-k softmax."""
    probs = torch.softmax(x @ router.T, dim=-1).gather(1, topk_idx)
    weights = probs / probs.sum(-1, keepdim=True)
    gate_up_rows = torch.einsum("mkih,mh->mki", gate_up[topk_idx], x)
    hidden = F.silu(gate_up_rows[..., :INTER]) * gate_up_rows[..., INTER:]
    return torch.einsum("mk,mkhi,mki->mh", weights, down[topk_idx], hidden)


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float("inf") if torch.isnan(out).any() else ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------- one process

def test_shard_experts_takes_consecutive_experts_and_rejects_uneven():
    full = torch.randn(6, 3, 2, requires_grad=True)
    shards = [shard_experts(full, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(shards), full.detach())
    assert not shards[0].requires_grad and shards[0].untyped_storage().data_ptr() != full.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="shape \\[6, 3, 2\\]\\) must be divisible by ep_size=4"):
        shard_experts(full, 0, 4)
    with pytest.raises(ValueError, match="'ep_rank' must be an int in \\[0, 3\\), got 3"):
        shard_experts(full, 3, 3)


def test_expert_parallel_blocks_follow_the_dp_shard_cp_order():
    # 16 ranks: pp=1, dp_replicate=2, dp_shard=2, cp=2, tp=2 (tp fastest). dp_shard_cp groups: ranks with the same
    # (dp_replicate, tp) coordinates, dp_shard slower than cp; ep=2 cuts each into its two cp pairs.
    ranks = torch.arange(16).view(1, 2, 2, 2, 2)
    assert MESH_DIMS == ("pp", "dp_replicate", "dp_shard", "cp", "tp")
    assert expert_parallel_blocks(ranks, 4) == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert expert_parallel_blocks(ranks, 2) == [[0, 2], [4, 6], [1, 3], [5, 7], [8, 10], [12, 14], [9, 11],
                                                [13, 15]]


@pytest.mark.parametrize("args, match", [
    ((torch.randn(4), torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)), "'x' must be a floating tensor"),
    ((torch.randn(4, 8), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)), "'topk_idx' must be an integer"),
    ((torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 1)), "'topk_weight' must be a floating"),
])
def test_routing_input_errors(args, match):
    with pytest.raises(ValueError, match=match):
        expert_parallel_moe(nn.Identity(), *args, num_experts=8)  # checked before any collective


def test_wrapper_requires_compute():
    with pytest.raises(TypeError, match="'experts' must have a compute"):
        ExpertParallelMoE(nn.Linear(2, 2), num_experts=2)


# ----------------------------------------------------------------------------------- 4 gloo ranks

def _inputs(ep: int, seed: int):
    """Every group rank's tokens and routing plus the shared weights (identical on all ranks of the group)."""
    gen = torch.Generator().manual_seed(seed)
    router = torch.randn(EXPERTS, HIDDEN, generator=gen)
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * 0.4
    down = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * 0.4
    per_rank = []
    for tokens in TOKENS[ep]:
        x = torch.randn(tokens, HIDDEN, generator=gen)
        scores = torch.rand(tokens, EXPERTS, generator=gen)
        scores[:, 0] += 0.5  # expert 0 is popular: uneven loads
        scores[:, list(UNUSED_EXPERTS)] = -1.0
        per_rank.append((x, scores.topk(TOP_K, dim=-1).indices, torch.randn(tokens, HIDDEN, generator=gen)))
    return router, gate_up, down, per_rank


def _case(ep: int, group, seed: int) -> dict:
    ep_rank = dist.get_rank(group)
    assert dist.get_world_size(group) == ep
    router, gate_up, down, per_rank = _inputs(ep, seed)
    x, topk_idx, grad_out = per_rank[ep_rank]

    experts = TinyExperts(shard_experts(gate_up, ep_rank, ep), shard_experts(down, ep_rank, ep))
    moe = ExpertParallelMoE(experts, num_experts=EXPERTS, group=group)
    x_leaf, router_leaf = x.clone().requires_grad_(), router.clone().requires_grad_()
    probs = torch.softmax(x_leaf @ router_leaf.T, dim=-1).gather(1, topk_idx)
    out = moe(x_leaf, topk_idx, probs / probs.sum(-1, keepdim=True))
    (out * grad_out).sum().backward()
    received = experts.gate_up_proj.grad.abs().sum().item()
    expert_grads = [None] * ep
    dist.all_gather_object(expert_grads, (experts.gate_up_proj.grad, experts.down_proj.grad), group=group)

    # Dense reference over every group rank's tokens; each rank has its own router copy (replicated weight).
    x64 = [t.double().requires_grad_() for t, _, _ in per_rank]
    routers64 = [router.double().requires_grad_() for _ in per_rank]
    gate_up64, down64 = gate_up.double().requires_grad_(), down.double().requires_grad_()
    outs64 = [dense_moe64(xr, rr, gate_up64, down64, idx) for xr, rr, (_, idx, _) in zip(x64, routers64, per_rank)]
    loss64 = sum((o * g.double()).sum() for o, (_, _, g) in zip(outs64, per_rank))
    loss64.backward()

    errors = {"out": _rel(out, outs64[ep_rank]) if x.size(0) else out.abs().sum().item(),
              "d_gate_up": _rel(torch.cat([g for g, _ in expert_grads]), gate_up64.grad),
              "d_down": _rel(torch.cat([d for _, d in expert_grads]), down64.grad)}
    if x.size(0):
        errors["dx"] = _rel(x_leaf.grad, x64[ep_rank].grad)
        errors["d_router"] = _rel(router_leaf.grad, routers64[ep_rank].grad)
    else:  # a rank without tokens: its inputs get empty / zero gradients
        errors["d_router_zero"] = router_leaf.grad.abs().sum().item() if router_leaf.grad is not None else 0.0
    unused_local = [e - ep_rank * (EXPERTS // ep) for e in UNUSED_EXPERTS if e // (EXPERTS // ep) == ep_rank]
    return {"errors": errors, "shapes_ok": out.shape == x.shape and out.dtype == torch.float32,
            "gate_up_grad_nonzero": received > 0,
            "unused_experts_zero_grad": all(experts.gate_up_proj.grad[e].abs().sum().item() == 0
                                            for e in unused_local)}


def _grouped_experts_case(group) -> dict:
    """The model's GroupedExperts, sharded behind ExpertParallelMoE, against the unsharded module's forward over
    every group rank's tokens: output, d x, d topk_weight, d expert parameters (gathered)."""
    from mgpt_train.model.moe import GroupedExperts

    ep, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(21)  # the same full module on every rank
    full = GroupedExperts(EXPERTS, HIDDEN, INTER)
    local = GroupedExperts(EXPERTS // ep, HIDDEN, INTER)
    with torch.no_grad():
        local.gate_up_proj.copy_(shard_experts(full.gate_up_proj, ep_rank, ep))
        local.down_proj.copy_(shard_experts(full.down_proj, ep_rank, ep))
    gen = torch.Generator().manual_seed(22)
    per_rank = [(x, idx, torch.rand(idx.shape, generator=gen) + 0.1, g) for x, idx, g in _inputs(ep, seed=23)[3]]

    x, idx, weight, grad_out = per_rank[ep_rank]
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    out = ExpertParallelMoE(local, num_experts=EXPERTS, group=group)(leaves[0], idx, leaves[1])
    # A rank that receives no rows may leave its expert gradients unset (None -> zeros here).
    grads = torch.autograd.grad((out * grad_out).sum(), [*leaves, local.gate_up_proj, local.down_proj],
                                allow_unused=True, materialize_grads=True)
    gathered = [None] * ep
    dist.all_gather_object(gathered, grads[2:], group=group)

    dense_leaves = [[t.clone().requires_grad_() for t in (x_r, w_r)] for x_r, _, w_r, _ in per_rank]
    dense_outs = [full(xr, idx_r, wr) for (xr, wr), (_, idx_r, _, _) in zip(dense_leaves, per_rank)]
    sum((o * g).sum() for o, (*_, g) in zip(dense_outs, per_rank)).backward()
    errors = {"d_gate_up": _rel(torch.cat([g for g, _ in gathered]), full.gate_up_proj.grad),
              "d_down": _rel(torch.cat([d for _, d in gathered]), full.down_proj.grad)}
    if x.size(0):
        errors.update(out=_rel(out, dense_outs[ep_rank]), dx=_rel(grads[0], dense_leaves[ep_rank][0].grad),
                      d_weight=_rel(grads[1], dense_leaves[ep_rank][1].grad))
    return errors


def _rank_body(rank: int) -> dict:
    mesh = ParallelDims(world_size=WORLD, dp_shard=2, cp=2, ep=2).build_mesh("cpu")
    ep4, ep2 = expert_parallel_group(mesh, 4), expert_parallel_group(mesh, 2)
    result = {"ep2_peers": sorted(dist.get_process_group_ranks(ep2)),
              "ep4_peers": sorted(dist.get_process_group_ranks(ep4)),
              "ep4": _case(4, ep4, seed=3),
              "ep2": _case(2, ep2, seed=5 + rank // 2),  # the two ep=2 groups route different data
              "grouped_experts": _grouped_experts_case(ep4),
              "uneven_experts": error_message(lambda: expert_parallel_moe(
                  nn.Identity(), torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.long), torch.rand(2, 1),
                  num_experts=6, group=ep4)),
              "bad_expert_id": error_message(lambda: expert_parallel_moe(
                  nn.Identity(), torch.randn(2, 4), torch.full((2, 1), 8), torch.rand(2, 1), num_experts=8,
                  group=ep4)),
              "bad_splits": error_message(lambda: all_to_all_tokens(torch.randn(3, 2), [1, 2], [3, 0], group=ep4)),
              "bad_mesh_ep": error_message(lambda: expert_parallel_group(mesh, 3))}
    return result


@pytest.mark.distributed
def test_expert_parallel_matches_dense_float64_on_ep2_and_ep4(tmp_path):
    for rank, result in enumerate(run_on_gloo_ranks(_rank_body, WORLD, tmp_path)):
        assert result["ep4_peers"] == [0, 1, 2, 3]
        assert result["ep2_peers"] == [rank - rank % 2, rank - rank % 2 + 1]  # consecutive dp_shard_cp ranks
        assert "num_experts=6 is not divisible by the expert-parallel group size 4" in result["uneven_experts"]
        assert "'topk_idx' must hold expert ids in [0, 8), got max 8" in result["bad_expert_id"]
        assert "'output_splits' must hold 4 non-negative row counts" in result["bad_splits"]
        assert "'ep' (3) must be an int dividing dp_shard*cp = 4" in result["bad_mesh_ep"]
        for ep in ("ep4", "ep2"):
            case = result[ep]
            assert case["shapes_ok"] and case["unused_experts_zero_grad"], (rank, ep, case)
            assert max(case["errors"].values()) < 1e-5, (rank, ep, case["errors"])
        assert max(result["grouped_experts"].values()) < 1e-5, (rank, result["grouped_experts"])
        # At ep=4 rank 3 owns only unused experts (6, 7): it receives no token, and its expert gradients are 0.
        assert result["ep4"]["gate_up_grad_nonzero"] == (rank != 3), rank
