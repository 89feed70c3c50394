"""Group-relative outcome advantages (GRPO family) as the op ``mgpt::group_advantages``.

``rewards[B]`` holds one scalar reward per completion, ordered group by group (completions of the same
prompt are contiguous, ``group_size`` of them). With the group mean mu_g and the UNBIASED group std sigma_g
(``torch.std``, as verl's ``compute_grpo_outcome_advantage`` and TRL's ``rewards.view(-1, G).std(dim=1)``):

    grpo     A = (r - mu_g) / (sigma_g + eps)           verl grpo; TRL scale_rewards="group"
    dr_grpo  A = r - mu_g                               verl norm_adv_by_std_in_grpo=False; TRL scale_rewards="none"
    rloo     A = r - (sum_g - r) / (G - 1)              verl compute_rloo_outcome_advantage
               = (r - mu_g) G / (G - 1)
    batch    A = (r - mu_g) / (sigma_batch + eps)       TRL scale_rewards="batch" (sigma over all B rewards)

Singleton groups (``group_size == 1``) follow verl: mu = 0 and sigma = 1, so grpo gives r / (1 + eps),
dr_grpo and rloo give r (verl leaves an RLOO singleton's score unchanged), batch gives r / (sigma_batch + eps).
(TRL's per-group mean would make every singleton advantage 0.) A batch of ONE reward has no batch std; it is
taken as 1 the same way. A constant group has sigma = 0 and gets A = 0 (hence ``eps`` > 0 is required).
``eps`` defaults to verl's 1e-6 (TRL uses 1e-4).

Rewards are data, not parameters: the op is non-differentiable (the wrapper detaches its input).
Computed in float64 for float64 rewards, else float32; the result has the dtype of ``rewards``.
Only a ``reference`` face: B scalars are far too few to be worth a kernel.
"""

from __future__ import annotations

import torch

from mgpt_ops._backend import choose_backend
from mgpt_ops._checks import FLOAT_DTYPES, check_tensor

MODES = ("grpo", "dr_grpo", "rloo", "batch")
_OP = "group_advantages"


def group_advantages_reference(rewards: torch.Tensor, group_size: int, mode: str, eps: float) -> torch.Tensor:
    cd = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(cd).view(-1, group_size)
    if group_size == 1:  # verl: a lone completion has mean 0 and std 1
        centred, std = r.clone(), torch.ones_like(r)  # a copy: the op must not return its input
    else:
        centred = r - r.mean(1, keepdim=True)
        std = r.std(1, keepdim=True)
    if mode == "grpo":
        adv = centred / (std + eps)
    elif mode == "dr_grpo":
        adv = centred
    elif mode == "rloo":
        adv = centred * (group_size / (group_size - 1)) if group_size > 1 else centred
    else:  # batch
        batch_std = r.std() if r.numel() > 1 else r.new_ones(())
        adv = centred / (batch_std + eps)
    return adv.reshape(-1).to(rewards.dtype)


@torch.library.custom_op("mgpt::group_advantages", mutates_args=())
def _group_advantages_op(rewards: torch.Tensor, group_size: int, mode: str, eps: float) -> torch.Tensor:
    choose_backend(_OP, rewards.device, ("reference",), {})
    return group_advantages_reference(rewards, group_size, mode, eps)


@_group_advantages_op.register_fake
def _(rewards, group_size, mode, eps):
    return torch.empty_like(rewards)


def group_advantages(rewards: torch.Tensor, group_size: int, *, mode: str = "grpo", eps: float = 1e-6
                     ) -> torch.Tensor:
    """Advantages[B] of ``rewards[B]`` in groups of ``group_size`` (formulas: module docstring).

    Not differentiable: rewards are data (the input is detached, the result never requires grad).
    """
    check_tensor(_OP, "rewards", rewards, ndim=1, dtypes=FLOAT_DTYPES)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"mgpt.{_OP}: argument 'group_size' must be an int >= 1, got {group_size!r}")
    B = rewards.shape[0]
    if B == 0 or B % group_size != 0:
        raise ValueError(f"mgpt.{_OP}: argument 'rewards' must hold a positive whole number of groups: "
                         f"its length {B} is not a positive multiple of group_size={group_size}")
    if mode not in MODES:
        raise ValueError(f"mgpt.{_OP}: argument 'mode' must be one of {MODES}, got {mode!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (0 < eps < float("inf")):
        raise ValueError(f"mgpt.{_OP}: argument 'eps' must be a finite number > 0, got {eps!r}")
    return _group_advantages_op(rewards.detach(), group_size, mode, float(eps))
