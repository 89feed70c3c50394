"""DCP checkpoints: exact resume of model, optimizer, run state and RNG, single process and FSDP2 on 2 gloo ranks."""

import functools
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_on_gloo_ranks
from mgpt_train import checkpoint


def _mlp() -> torch.nn.Module:
    # Dropout makes the next losses depend on the restored RNG state, not only on the weights.
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))


def _train_step(model, optimizer) -> float:
    x, y = torch.randn(5, 6), torch.randn(5, 3)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)


def test_single_process_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    optimizer = _optimizer(model)
    for _ in range(3):
        _train_step(model, optimizer)
    random.seed(7)
    np.random.seed(7)
    extra = {"data_position": 15, "stage": "domain_injection", "lr": [0.1, 0.2]}
    final = checkpoint.save(3, model, optimizer, extra, tmp_path)
    assert final == tmp_path / "step_3" and not (tmp_path / "step_3.tmp").exists()
    expected_state = {k: v.clone() for k, v in model.state_dict().items()}
    expected_adam = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
    expected_draws = (random.random(), np.random.rand())
    expected_losses = [_train_step(model, optimizer) for _ in range(2)]  # dropout draws from torch's generator

    torch.manual_seed(99)  # other weights, other optimizer settings and other RNG states: the load must fix all
    random.seed(99)
    np.random.seed(99)
    fresh = _mlp()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.5, betas=(0.5, 0.6))
    assert checkpoint.load(fresh, fresh_optimizer, tmp_path) == (3, extra)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected_state[name]), name
    for state, expected in zip(fresh_optimizer.state.values(), expected_adam, strict=True):
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    group = fresh_optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-2, (0.9, 0.95), 0.1)
    assert (random.random(), np.random.rand()) == expected_draws
    assert [_train_step(fresh, fresh_optimizer) for _ in range(2)] == expected_losses


def test_latest_keep_and_crash_leftovers(tmp_path):
    model = _mlp()
    optimizer = _optimizer(model)
    assert checkpoint.load(model, optimizer, tmp_path) is None  # a fresh run
    (tmp_path / "step_9.tmp").mkdir(parents=True)  # a save that crashed half-way
    assert checkpoint.latest_step(tmp_path) is None
    for step in (2, 4, 6):
        _train_step(model, optimizer)
        checkpoint.save(step, model, optimizer, {"step": step}, tmp_path, keep=2)
    assert checkpoint.available_steps(tmp_path) == [4, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_6"]
    assert checkpoint.load(model, optimizer, tmp_path)[1] == {"step": 6}
    assert checkpoint.load(model, None, tmp_path, step=4)[0] == 4  # model only


def _stages(seed: int):
    """Two pipeline-stage modules with the full model's parameter names, one optimizer each."""
    torch.manual_seed(seed)
    parts = [torch.nn.ModuleDict({"embed": torch.nn.Linear(4, 8)}),
             torch.nn.ModuleDict({"head": torch.nn.Linear(8, 2)})]
    return parts, [_optimizer(part) for part in parts]


def test_model_parts_with_one_optimizer_each(tmp_path):
    parts, optimizers = _stages(0)
    for _ in range(2):
        loss = parts[1]["head"](parts[0]["embed"](torch.randn(3, 4))).square().mean()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    checkpoint.save(2, parts, optimizers, {"stage": 0}, tmp_path)
    fresh, fresh_optimizers = _stages(1)
    assert checkpoint.load(fresh, fresh_optimizers, tmp_path) == (2, {"stage": 0})
    for part, loaded in zip(parts, fresh):
        for (name, value), (_, other) in zip(part.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(value, other), name
    for optimizer, loaded in zip(optimizers, fresh_optimizers):
        for state, other in zip(optimizer.state.values(), loaded.state.values()):
            assert all(torch.equal(state[k], other[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    with pytest.raises(ValueError, match="one optimizer per model part \\(2\\), got 1"):
        checkpoint.load(fresh, fresh_optimizers[0], tmp_path)
    twins = [_mlp(), _mlp()]
    with pytest.raises(ValueError, match="model parts share model keys"):
        checkpoint.save(3, twins, [_optimizer(m) for m in twins], {}, tmp_path)


def test_bad_arguments(tmp_path):
    model = _mlp()
    optimizer = _optimizer(model)
    with pytest.raises(ValueError, match="argument 'step' must be an int >= 0"):
        checkpoint.save(-1, model, optimizer, {}, tmp_path)
    with pytest.raises(ValueError, match="argument 'keep' must be None or an int >= 1"):
        checkpoint.save(1, model, optimizer, {}, tmp_path, keep=0)
    checkpoint.save(1, model, optimizer, {}, tmp_path)
    with pytest.raises(FileExistsError, match="never overwritten"):
        checkpoint.save(1, model, optimizer, {}, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"finished steps in .*: \[1\]"):
        checkpoint.load(model, optimizer, tmp_path, step=5)
    with pytest.raises(ValueError, match="argument 'step' must be an int or 'latest'"):
        checkpoint.load(model, optimizer, tmp_path, step="last")


def _fsdp_body(directory: str, resume: bool, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(123 if resume else 0)  # the resumed run starts from other weights: the load must fix them
    model = _mlp()
    for layer in (model[0], model[3], model):
        fully_shard(layer, mesh=mesh)
    optimizer = _optimizer(model)
    torch.manual_seed(1000 + rank)  # each rank reads other data and drops other units
    first, losses, extra, full_at_3 = 1, [], None, None
    if resume:
        first, extra = checkpoint.load(model, optimizer, directory)
        first += 1
    for step in range(first, 7):
        losses.append(_train_step(model, optimizer))
        if step == 3 and not resume:
            checkpoint.save(3, model, optimizer, {"data_position": 3 * 5, "rank": rank}, directory, keep=1)
            full_at_3 = {k: v.full_tensor().tolist() for k, v in model.state_dict().items()}  # exact in JSON
    return {"losses": losses, "extra": extra, "full_at_3": full_at_3}


def _spawn(directory, resume: bool, results_dir) -> list[dict]:
    results_dir.mkdir()
    return run_on_gloo_ranks(functools.partial(_fsdp_body, str(directory), resume), 2, results_dir)


@pytest.mark.distributed
def test_fsdp2_two_ranks_resume_matches_uninterrupted_run(tmp_path):
    directory = tmp_path / "checkpoints"
    uninterrupted = _spawn(directory, resume=False, results_dir=tmp_path / "first")
    resumed = _spawn(directory, resume=True, results_dir=tmp_path / "resumed")
    for rank, (full, again) in enumerate(zip(uninterrupted, resumed)):
        assert len(full["losses"]) == 6 and len(again["losses"]) == 3
        assert again["losses"] == full["losses"][3:]  # bitwise: same kernels, same reduction order
        assert again["extra"] == {"data_position": 15, "rank": rank}
    assert uninterrupted[0]["losses"] != uninterrupted[1]["losses"]  # the ranks really saw different data

    # Resharding 2 ranks -> 1 plain process: the full tensors come back, with a warning about the run state.
    plain = _mlp()
    with pytest.warns(UserWarning, match="saved by 2 ranks, loading on 1"):
        step, extra = checkpoint.load(plain, _optimizer(plain), directory)
    assert step == 3 and extra["rank"] == 0
    for name, value in plain.state_dict().items():
        assert torch.equal(value, torch.tensor(uninterrupted[0]["full_at_3"][name], dtype=value.dtype)), name
