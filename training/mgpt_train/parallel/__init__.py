"""Parallelism primitives written on plain torch.distributed collectives (they run on gloo/CPU as on NCCL/GPU):
context parallelism for packed causal attention, expert parallelism for MoE layers, and the vision tower split
by images over the ranks sharing a micro-batch."""

from mgpt_train.parallel.context_parallel import (
    cp_attention,
    local_positions,
    make_cp_attention_fn,
    packed_causal_mask,
    shard_sequence,
    unshard_sequence,
)
from mgpt_train.parallel.expert_parallel import (
    ExpertParallelMoE,
    all_to_all_tokens,
    expert_parallel_group,
    expert_parallel_moe,
    shard_experts,
)
from mgpt_train.parallel.vision_split import assign_images, split_vision

__all__ = [
    "ExpertParallelMoE",
    "all_to_all_tokens",
    "assign_images",
    "cp_attention",
    "expert_parallel_group",
    "expert_parallel_moe",
    "local_positions",
    "make_cp_attention_fn",
    "packed_causal_mask",
    "shard_experts",
    "shard_sequence",
    "split_vision",
    "unshard_sequence",
]
