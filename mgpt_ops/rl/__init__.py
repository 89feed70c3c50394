"""RL loss family: token log-probabilities/entropy straight from hidden states, policy losses, advantages.

Layout (one file per face, findable side by side):
    _row_ops.py            contract of the per-row kernels (+ their plain-PyTorch statement and fakes)
    logprobs.py            fused_linear_logprobs: vocabulary-block loop, custom ops, autograd, vocabulary parallelism
    logprobs_triton.py     its Triton row kernels      (C++/CUDA twins: csrc/rl/logits_rows_*.{cpp,cu})
    policy_loss.py         policy_loss: formulas (reference face), custom op, autograd
    policy_loss_triton.py  its fused Triton kernel
    advantages.py          group_advantages
    fused_policy.py        fused_linear_policy_loss = fused_linear_logprobs -> policy_loss
"""

from mgpt_ops.rl.advantages import group_advantages
from mgpt_ops.rl.fused_policy import fused_linear_policy_loss
from mgpt_ops.rl.logprobs import fused_linear_logprobs
from mgpt_ops.rl.policy_loss import policy_loss

__all__ = ["fused_linear_logprobs", "fused_linear_policy_loss", "group_advantages", "policy_loss"]
