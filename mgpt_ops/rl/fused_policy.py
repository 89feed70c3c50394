"""The policy loss straight from hidden states: ``fused_linear_logprobs`` then ``policy_loss``.

The two ops compose through autograd without any [N, V] tensor: the first keeps memory at O(chunk x V) in
forward and backward, the second works on [B, T]. So the fused loss is this composition rather than a third
kernel: one implementation of each formula, and every backend choice of the two ops applies.
"""

from __future__ import annotations

import torch

from mgpt_ops.rl.logprobs import fused_linear_logprobs
from mgpt_ops.rl.policy_loss import policy_loss

OP = "fused_linear_policy_loss"


def fused_linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                             bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                             process_group=None, chunk_size: int | None = None, **policy_kwargs
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family loss of a batch of completions from the final hidden states.

    Args:
        hidden: [B, T, H] (or [B*T, H]) final hidden states of the completion tokens.
        weight, bias, temperature, ignore_index, process_group, chunk_size: as in ``fused_linear_logprobs``
            (``weight`` is the ``lm_head`` weight or its vocabulary shard).
        labels: [B, T] next-token ids; positions where ``mask`` is 0 may hold ``ignore_index``.
        old_logprobs, advantages, mask and ``**policy_kwargs``: as in ``policy_loss`` (loss_type, eps_low,
            eps_high, dual_clip, delta, ref_logprobs, beta, kl_type, agg_mode, ...).

    Returns:
        (loss, metrics): ``policy_loss``'s, plus ``entropy_mean`` (masked token mean of the policy entropy,
        detached) — the usual RL health signal, free because the forward computes it anyway.
    """
    if labels.dim() != 2:
        raise ValueError(f"mgpt.{OP}: argument 'labels' must have shape [B, T], got {list(labels.shape)}")
    batch, steps = labels.shape
    if hidden.dim() == 2:
        hidden = hidden.reshape(batch, steps, hidden.shape[-1]) if hidden.shape[0] == batch * steps else hidden
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (batch, steps):
        raise ValueError(f"mgpt.{OP}: argument 'hidden' must have shape [B, T, H] or [B*T, H] with "
                         f"[B, T] = {[batch, steps]} (the shape of 'labels'), got {list(hidden.shape)}")
    logprobs, entropy = fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                              ignore_index=ignore_index, return_entropy=True,
                                              process_group=process_group, chunk_size=chunk_size)
    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, **policy_kwargs)
    with torch.no_grad():
        weights = mask.to(entropy.dtype)
        metrics["entropy_mean"] = (entropy * weights).sum() / weights.sum().clamp(min=1.0)
    return loss, metrics
