"""The training objective of one optimizer step, over micro-batches and data / context-parallel ranks.

A step is ``A`` packed micro-batches (gradient accumulation, ``data.grad_accum``) on each of the N data x context
ranks (dp_replicate x dp_shard x cp; tp ranks hold identical losses and are not counted). Its single-process
objective is one forward per micro-batch:

    sum(-log p over ALL label tokens of the step) / (ALL label tokens)  +  coef * mean over micro-batches of aux

(coef = ``router_aux_loss_coef``, aux = the MoE load-balancing loss of a micro-batch, 0 for dense models). The
label-token count is known before the first forward (the labels are in the batches), so each micro-batch's
backward can run at once -- its activations are freed before the next forward. FSDP2 AVERAGES gradients over the
N ranks, so each rank backpropagates, per micro-batch,

    loss_sum_local * N / global_tokens  +  aux_term / A          (aux_term = coef * aux)

and the average of the N ranks' accumulated gradients is the gradient of the objective. Under cp each rank's
``loss_sum`` covers its context shard's labels while every cp rank holds the whole micro-batch: the label count
summed over the dp x cp group is divided by cp. ``mgpt_train.parallelize`` documents how expert and tp-summed
parameters keep that same divide-by-N rule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mgpt_train.model.qwen3_vl import IGNORE_INDEX


def global_label_tokens(batches: list[dict], dp_cp_group=None, cp: int = 1, device=None) -> torch.Tensor:
    """Label tokens of this rank's micro-batches summed over the data-parallel ranks (a 0-d int64 tensor on
    ``device``); ``dp_cp_group`` None: this rank's own count."""
    count = torch.stack([(batch["labels"] != IGNORE_INDEX).sum() for batch in batches]).sum().to(device)
    if dp_cp_group is None:
        return count
    dist.all_reduce(count, group=dp_cp_group)
    return count // cp  # the cp ranks of a data rank share its micro-batches


class StepLoss:
    """The objective of one step (module docstring). ``backward(out)`` once per micro-batch with the model's
    output ``{"loss_sum", "aux_term", ...}``, in any order; then ``value()`` is the step's loss (the same on
    every rank of the group; collective when there is a group)."""

    def __init__(self, batches: list[dict], dp_cp_group=None, cp: int = 1, device=None):
        if not isinstance(batches, (list, tuple)) or not batches:
            got = "none" if isinstance(batches, (list, tuple)) else f"a {type(batches).__name__}"
            raise ValueError(f"StepLoss: 'batches' must be a list of the step's micro-batches, got {got}")
        self.group = dp_cp_group
        self.ranks = 1 if dp_cp_group is None else dist.get_world_size(dp_cp_group)
        self.micro_batches = len(batches)
        self.label_tokens = global_label_tokens(batches, dp_cp_group, cp, device)
        self._loss_scale = self.ranks / self.label_tokens.clamp_min(1)
        self._sums = torch.zeros(2, device=device)  # this rank's -log p and aux-term sums over its micro-batches

    def backward(self, out: dict[str, torch.Tensor]) -> None:
        (out["loss_sum"] * self._loss_scale + out["aux_term"] / self.micro_batches).backward()
        self._sums += torch.stack([out["loss_sum"].detach(), out["aux_term"].detach()]).float()

    def value(self) -> torch.Tensor:
        sums = self._sums.clone()
        if self.group is not None:
            dist.all_reduce(sums, group=self.group)
        return sums[0] / self.label_tokens.clamp_min(1) + sums[1] / (self.ranks * self.micro_batches)
