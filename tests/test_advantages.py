"""mgpt.group_advantages against float64 transcriptions of verl's compute_grpo_outcome_advantage /
compute_rloo_outcome_advantage (per-prompt dictionaries, as verl writes them) and TRL's scale_rewards="batch".
Tolerance: fp32 results 1e-6 relative, float64 results 1e-12."""

from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE, faces_here, rel_err
import mgpt_ops
from mgpt_ops.rl.advantages import group_advantages

FACES = faces_here(("reference",))
EPS = 1e-6


def verl_style_reference(rewards: torch.Tensor, group_size: int, mode: str, eps: float = EPS) -> torch.Tensor:
    """Scores grouped by a prompt index, singletons get mean 0 / std 1 (verl); 'batch' divides by the std of
    the whole batch (TRL), with a one-reward batch taken as std 1 (our documented convention)."""
    scores = rewards.detach().double().cpu().clone()
    index = [i // group_size for i in range(scores.shape[0])]
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx, group in id2score.items():
        if len(group) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
        else:
            id2mean[idx] = torch.mean(torch.stack(group))
            id2std[idx] = torch.std(torch.stack(group))
    batch_std = scores.std() if scores.numel() > 1 else torch.tensor(1.0, dtype=torch.float64)
    out = scores.clone()
    for i in range(scores.shape[0]):
        n = len(id2score[index[i]])
        if mode == "grpo":
            out[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
        elif mode == "dr_grpo":
            out[i] = scores[i] - id2mean[index[i]]
        elif mode == "rloo":
            if n > 1:
                out[i] = scores[i] * n / (n - 1) - id2mean[index[i]] * n / (n - 1)
        else:
            out[i] = (scores[i] - id2mean[index[i]]) / (batch_std + eps)
    return out


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo", "batch"])
@pytest.mark.parametrize("group_size", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_verl_and_trl(face, mode, group_size, dtype):
    torch.manual_seed(group_size)
    rewards = torch.randn(4 * group_size, dtype=dtype, device=DEVICE) * 2 + 0.5
    with mgpt_ops.use_backend(face):
        out = group_advantages(rewards, group_size, mode=mode)
    assert out.dtype == dtype and out.shape == rewards.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_err(out, verl_style_reference(rewards, group_size, mode)) < tol


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo", "batch"])
def test_constant_group_gives_zero_not_nan(face, mode):
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 1.0], device=DEVICE)
    with mgpt_ops.use_backend(face):
        out = group_advantages(rewards, 3, mode=mode)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:3].cpu(), torch.zeros(3))
    assert rel_err(out, verl_style_reference(rewards, 3, mode)) < 1e-6


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo", "batch"])
def test_single_reward(mode):
    rewards = torch.tensor([0.7], device=DEVICE)
    out = group_advantages(rewards, 1, mode=mode)
    assert torch.isfinite(out).all()
    assert rel_err(out, verl_style_reference(rewards, 1, mode)) < 1e-6


def test_rloo_is_leave_one_out_baseline():
    """r_i minus the mean of the OTHER rewards of the group: the definition, independent of verl's algebra."""
    rewards = torch.randn(12, dtype=torch.float64, device=DEVICE)
    out = group_advantages(rewards, 4, mode="rloo").cpu()
    groups = rewards.cpu().view(3, 4)
    for g in range(3):
        for j in range(4):
            others = torch.cat([groups[g, :j], groups[g, j + 1:]])
            assert abs(out[4 * g + j] - (groups[g, j] - others.mean())) < 1e-12


@settings(max_examples=12, deadline=None)
@given(groups=st.integers(1, 6), group_size=st.integers(1, 7),
       mode=st.sampled_from(["grpo", "dr_grpo", "rloo", "batch"]), seed=st.integers(0, 2**16))
def test_random_shapes(groups, group_size, mode, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.randn(groups * group_size, generator=g) * 3).to(DEVICE)
    out = group_advantages(rewards, group_size, mode=mode)
    assert rel_err(out, verl_style_reference(rewards, group_size, mode)) < 1e-5


def test_not_differentiable():
    rewards = torch.randn(6, device=DEVICE, requires_grad=True)
    out = group_advantages(rewards, 3)
    assert not out.requires_grad


def test_opcheck():
    rewards = torch.randn(8, device=DEVICE)
    for mode in ("grpo", "rloo", "batch"):
        torch.library.opcheck(torch.ops.mgpt.group_advantages.default, (rewards, 4, mode, 1e-6))


def test_torch_compile_fullgraph():
    rewards = torch.randn(8, device=DEVICE)
    fn = torch.compile(lambda r: group_advantages(r, 4, mode="grpo") * 2, fullgraph=True, backend="aot_eager")
    assert rel_err(fn(rewards), 2 * verl_style_reference(rewards, 4, "grpo")) < 1e-6


def test_pinned_face_it_lacks_keeps_the_reference():
    # group_advantages has only the reference face: a pin meant for other ops of a pipeline does not break it
    rewards = torch.randn(4, device=DEVICE)
    with mgpt_ops.use_backend("triton"):
        pinned = group_advantages(rewards, 2)
    torch.testing.assert_close(pinned, group_advantages(rewards, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(rewards=torch.randn(7), group_size=2), "not a positive multiple of group_size=2"),
    (dict(rewards=torch.randn(0), group_size=1), "positive multiple"),
    (dict(rewards=torch.randn(4, 2), group_size=2), "'rewards' must have 1 dimension"),
    (dict(rewards=torch.arange(4), group_size=2), "'rewards' must have dtype"),
    (dict(rewards=[1.0, 2.0], group_size=2), "'rewards' must be a torch.Tensor"),
    (dict(rewards=torch.randn(4), group_size=0), "'group_size' must be an int >= 1"),
    (dict(rewards=torch.randn(4), group_size=2.0), "'group_size' must be an int >= 1"),
    (dict(rewards=torch.randn(4), group_size=2, mode="gae"), "'mode' must be one of"),
    (dict(rewards=torch.randn(4), group_size=2, eps=0.0), "'eps' must be a finite number > 0"),
])
def test_bad_input(kwargs, match):
    rewards = kwargs.pop("rewards")
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.to(DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        group_advantages(rewards, **kwargs)
