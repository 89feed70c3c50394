"""The training CLI and loop (mgpt_train.train) on the tiny model with small synthetic data.

- a fixed micro-batch trained for a few steps lowers its loss; a short run writes finite per-step metrics, the
  per-stage evaluations, the plot, the resolved config and prints the profile summary;
- a run resumed from a mid-stage checkpoint continues bit for bit like the uninterrupted run, across a stage
  boundary (per-step losses, evaluations and final weights identical);
- freezing: parameters of a frozen part do not change during its stage and do change when it trains again; the
  learning rate follows each stage's warm-up + cosine schedule (recomputed here from the formula);
- gradient accumulation (data.grad_accum) in one process, dense and MoE, equals the reference's step over the
  same micro-batches;
- the CLI under torchrun with 2 gloo ranks -- dp_shard=2 (FSDP2), pp=2 (pipeline, tied head copy), tp=2, and
  with grad_accum=2 the MoE preset on dp_shard=2 x ep=2 and on pp=2 -- and with 4 -- pp=2 x dp_shard=2 (pipeline
  stages sharded by FSDP2), pp=2 x cp=2, the MoE preset on dp_shard=2 x tp=2 x ep=2 -- exits 0 and its losses and
  gradient norms equal an unparallelized single-process reference trained on the same step data (for dp: the
  union of the data ranks' micro-batches, token-weighted mean loss);
- bad command lines fail with one clear error line and exit status 2.
"""

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gloo_ranks import run_on_gloo_ranks
from mgpt_train import checkpoint
from mgpt_train.build import build_model, build_optimizer, check_layout, load_data, make_encoder
from mgpt_train.config import ConfigError, load_config
from mgpt_train.data import ByteTokenizer, Curriculum, apply_trainable, evaluate_by_tag, parameter_part
from mgpt_train.parallel_dims import ParallelDims
from mgpt_train.train import CONFIG_FILE, METRICS_FILE, PLOT_FILE, Trainer, main, split_packed

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--data.synthetic.num_samples=40", "--data.synthetic.heldout_samples=6", "--data.max_tokens=256",
         "--profiling.log_every=1"]


def stages_override(*stages: tuple[int, dict]) -> list[str]:
    """--curriculum.stages=[...] for stages of (steps, trainable) with distinct mixtures and lr scales."""
    mixtures = [{"vertical": 0.8, "general": 0.2}, {"general": 0.7, "vertical": 0.3}, {"general": 1.0}]
    spec = [{"name": f"stage{i}", "mixture": mixtures[i], "steps": steps, "lr_scale": 1.0 / (i + 1),
             "warmup_ratio": 0.25, "trainable": trainable} for i, (steps, trainable) in enumerate(stages)]
    return [f"--curriculum.stages={json.dumps(spec)}"]


def config(tmp_path, *overrides: str):
    return load_config(None, [*SMALL, f"--output_dir={tmp_path}", *overrides])


# ----------------------------------------------------------------------------------- (a) the loop trains

def test_fixed_batch_loss_decreases(tmp_path):
    trainer = Trainer(config(tmp_path, *stages_override((1, {}))))
    stage, batch = next(trainer.curriculum)
    batch = trainer.prepare(batch)
    results = [trainer.train_step(stage, [batch], lr=2e-3) for _ in range(6)]
    losses = [r["loss"] for r in results]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in results)
    assert results[0]["label_tokens"] == int((batch["labels"] != -100).sum())
    assert losses[-1] < 0.8 * losses[0], losses


def test_run_writes_metrics_plot_config_and_summary(tmp_path, capsys):
    cfg = config(tmp_path, *stages_override((2, {}), (2, {"vision": False})), "--profiling.nvtx=true",
                 "--profiling.trace=true", "--profiling.trace_wait=1", "--profiling.trace_warmup=1",
                 "--profiling.trace_active=1")
    results = Trainer(cfg).fit()
    printed = capsys.readouterr().out
    assert "tokens / s (this rank)" in printed and "MFU" in printed and "held-out exact match" in printed

    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    assert saved["steps"] == results["steps"] and len(saved["steps"]) == 4
    assert [s["stage"] for s in saved["steps"]] == ["stage0", "stage0", "stage1", "stage1"]
    for step in saved["steps"]:
        for key in ("loss", "grad_norm", "seconds", "tokens_per_s", "flops", "mfu"):
            assert math.isfinite(step[key]) and step[key] > 0, (key, step)
    assert [e["name"] for e in saved["evals"]] == ["initial", "stage0", "stage1"]
    assert all(0 <= acc <= 1 for e in saved["evals"] for acc in e["accuracy"].values())
    assert {"all", "general", "vertical"} <= saved["evals"][-1]["accuracy"].keys()
    assert saved["summary"]["steps"] == 4 and saved["stage_steps"] == {"stage0": 2, "stage1": 2}
    assert "peak_flops" in saved["environment"]
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(tmp_path / CONFIG_FILE) == cfg
    assert checkpoint.available_steps(tmp_path / "checkpoints") == [4]
    trace = json.loads((tmp_path / "traces" / "trace_rank0_step3.json").read_text())
    assert any(event.get("name") == "Optimizer.step#AdamW.step" for event in trace["traceEvents"])


# ----------------------------------------------------------------------------------- (b) resume

def test_resume_is_identical_across_a_stage_boundary(tmp_path):
    stages = [*stages_override((2, {}), (2, {"vision": False})), "--checkpoint.every=1", "--checkpoint.keep=none"]
    full_dir = tmp_path / "full"
    full = Trainer(config(full_dir, *stages))
    full_results = full.fit()
    assert checkpoint.available_steps(full_dir / "checkpoints") == [1, 2, 3, 4]

    # runs stopped after step 1 (mid stage 0) and after step 2 (the stage boundary): only that checkpoint
    # survives, and a fresh Trainer resumes it
    for stop in (1, 2):
        resumed_dir = tmp_path / f"resumed_{stop}"
        shutil.copytree(full_dir / "checkpoints" / f"step_{stop}", resumed_dir / "checkpoints" / f"step_{stop}")
        resumed = Trainer(config(resumed_dir, *stages))
        assert resumed.step == stop and len(resumed.history) == stop
        resumed_results = resumed.fit()
        for key in ("loss", "grad_norm", "lr", "label_tokens", "stage"):
            assert [s[key] for s in resumed_results["steps"]] == [s[key] for s in full_results["steps"]], key
        assert resumed_results["evals"] == full_results["evals"]
        for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
            assert torch.equal(a, b), (stop, name)


def test_background_data_gives_the_inline_run(tmp_path):
    """data.prefetch=3 (micro-batches prepared in a thread, the default path) and 0 (inline) train on the same
    stream: identical losses, gradient norms and label counts; the thread is gone after fit()."""
    runs = {}
    for depth in (0, 3):
        trainer = Trainer(config(tmp_path / str(depth), *stages_override((2, {}), (2, {"vision": False})),
                                 f"--data.prefetch={depth}", "--data.grad_accum=2"))
        runs[depth] = [(s["loss"], s["grad_norm"], s["label_tokens"]) for s in trainer.fit()["steps"]]
        assert (trainer.batches._thread is None) == (depth == 0)
        assert depth == 0 or not trainer.batches._thread.is_alive()
    assert runs[0] == runs[3]


# ----------------------------------------------------------------------------------- (c) freezing and lr

def expected_lr(peak: float, min_lr: float, warmup_ratio: float, step: int, steps: int) -> float:
    warmup = round(warmup_ratio * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return min_lr + (peak - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def test_frozen_parts_do_not_change_and_lr_follows_the_stages(tmp_path):
    steps = (2, 4, 2)
    cfg = config(tmp_path, *stages_override((steps[0], {}), (steps[1], {"vision": False}),
                                            (steps[2], {"language": False, "merger": False})),
                 "--optimizer.lr=2e-3", "--optimizer.min_lr_ratio=0.2")
    trainer = Trainer(cfg)
    parts = {name: parameter_part(name) for name, _ in trainer.model.named_parameters()}
    assert set(parts.values()) == {"vision", "merger", "language"}

    def snapshot():
        return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}

    changed_by_stage = []
    for stage_steps in steps:
        before = snapshot()
        for _ in range(stage_steps):
            trainer.run_one_step()
        after = snapshot()
        changed = {part: [not torch.equal(before[n], after[n]) for n in parts if parts[n] == part]
                   for part in ("vision", "merger", "language")}
        changed_by_stage.append({part: (all(flags), any(flags)) for part, flags in changed.items()})
    # (all changed, any changed) per part
    assert changed_by_stage[0] == {"vision": (True, True), "merger": (True, True), "language": (True, True)}
    assert changed_by_stage[1] == {"vision": (False, False), "merger": (True, True), "language": (True, True)}
    assert changed_by_stage[2] == {"vision": (True, True), "merger": (False, False), "language": (False, False)}

    lrs = [s["lr"] for s in trainer.history]
    expected = [expected_lr(2e-3 / (i + 1), 2e-3 / (i + 1) * 0.2, 0.25, k, n) for i, n in enumerate(steps)
                for k in range(n)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert all(group["lr"] == lrs[-1] for group in trainer.optimizers[0].param_groups)


# ----------------------------------------------------------------------------------- (d) torchrun, 2 ranks

def reference_steps(cfg, world: int) -> tuple[list[tuple[float, float]], dict[str, float]]:
    """(loss, gradient norm) per step of a single process without parallelism, each step on the union of every
    data-parallel rank's ``data.grad_accum`` micro-batches (curricula built for dp ranks 0..world-1), one forward
    per micro-batch, with the token-weighted mean loss and torch's own gradient clipping; and the held-out accuracy
    per tag of the final weights. MoE: + coef x the aux loss averaged over each rank's micro-batches, then over the
    ranks; under pp the aux loss is that of each pipeline micro-batch (``split_packed`` pieces, the empty ones
    left out), the pipeline's definition."""
    tokenizer = ByteTokenizer()
    model = build_model(cfg, tokenizer, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    encoder = make_encoder(cfg, model.config, tokenizer)
    train, heldout = load_data(cfg)
    accum = cfg.data.grad_accum
    pieces = cfg.parallel.pp_microbatches if cfg.parallel.pp > 1 else 1
    curricula = [Curriculum(cfg.curriculum_stages(), train, encoder, seed=cfg.data.seed, dp_rank=r, dp_size=world,
                            micro_batches=accum) for r in range(world)]
    steps, stage_name = [], None
    micro = zip(*curricula)  # per micro-batch: every rank's (stage, batch)
    while step_draws := list(itertools.islice(micro, accum)):
        stage = step_draws[0][0][0]
        if stage.name != stage_name:
            apply_trainable(model, stage)
            stage_name = stage.name
        for group in optimizer.param_groups:
            group["lr"] = curricula[0].lr
        tokens, loss_sum, aux = 0, 0.0, 0.0
        for rank in range(world):
            units = [piece for group in step_draws for piece in split_packed(group[rank][1], pieces,
                                                                                tokenizer.vision_start_id)]
            outs = [model(unit) for unit in units if unit["input_ids"].numel()]
            tokens += sum(out["n_tokens"] for out in outs)
            loss_sum = loss_sum + sum(out["loss_sum"] for out in outs)
            aux = aux + sum(out["aux_term"] for out in outs) / len(outs) / world
        loss = loss_sum / tokens + aux
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                              cfg.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append((loss.item(), norm.item()))
    budget = max(cfg.data.max_tokens, max(encoder.num_tokens(sample) for sample in heldout))
    with torch.no_grad():
        accuracy = evaluate_by_tag(lambda b: model.logits(b).argmax(-1), heldout, encoder, budget)
    return steps, accuracy


# ranks, and the data-parallel ranks whose micro-batches make one step; pp: the step's micro-batch split into 3
# (some empty), decoder layers compiled; tp: DTensor gradients of several placements in the norm, evaluation with
# the vocabulary-parallel argmax;
# pp x dp_shard: the loss normalised over both data ranks' label tokens, the norm over FSDP shards and stages;
# pp x cp: context shards between stages, the cp ranks' label tokens counted once, FSDP over the cp ranks;
# MoE dp x tp x ep: the aux loss's mean over data ranks, MoE gradients summed over tp, norms of expert shards;
# grad_accum: two forward / backward passes per step (FSDP + EP: the aux loss's mean over ranks and micro-batches;
# MoE pp: 2 x 2 pipeline micro-batches in one schedule step, the aux loss per pipeline micro-batch, logged too)
@pytest.mark.distributed
@pytest.mark.parametrize("world, layout, data_ranks", [
    (2, ["--parallel.dp_shard=2"], 2),
    (2, ["--parallel.dp_shard=1", "--parallel.pp=2", "--parallel.pp_microbatches=3", "--model.compile=true"], 1),
    (2, ["--parallel.dp_shard=1", "--parallel.tp=2"], 1),
    (4, ["--parallel.dp_shard=2", "--parallel.pp=2", "--parallel.pp_microbatches=2"], 2),
    (4, ["--parallel.dp_shard=1", "--parallel.pp=2", "--parallel.cp=2", "--parallel.pp_microbatches=2"], 1),
    (4, ["--model.preset=tiny_moe", "--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.ep=2"], 2),
    (2, ["--model.preset=tiny_moe", "--parallel.dp_shard=2", "--parallel.ep=2", "--data.grad_accum=2"], 2),
    (2, ["--model.preset=tiny_moe", "--parallel.dp_shard=1", "--parallel.pp=2", "--parallel.pp_microbatches=2",
         "--data.grad_accum=2"], 1),
], ids=["fsdp_dp_shard2", "pipeline_pp2", "tensor_tp2", "pipeline_pp2_fsdp_dp_shard2", "pipeline_pp2_context_cp2",
        "moe_dp_shard2_tp2_ep2", "moe_dp_shard2_ep2_grad_accum2", "moe_pipeline_pp2_grad_accum2"])
def test_torchrun_matches_single_process(tmp_path, world, layout, data_ranks):
    overrides = [*SMALL, *stages_override((2, {}), (2, {"vision": False})), *layout, "--optimizer.grad_clip=0.5",
                 f"--output_dir={tmp_path}"]
    # gloo ranks on the CPU, like the reference, also on a machine with a GPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "-m",
                          "mgpt_train.train", *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "profile summary" in run.stdout
    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    assert saved["world_size"] == world
    steps = [(s["loss"], s["grad_norm"]) for s in saved["steps"]]
    reference, final_accuracy = reference_steps(load_config(None, overrides), world=data_ranks)
    assert len(steps) == len(reference) == 4
    for (loss, norm), (ref_loss, ref_norm) in zip(steps, reference):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5), (steps,
                                                                                                       reference)
    assert min(norm for _, norm in reference) > 0.5  # clipping was active on every step
    assert steps[-1][0] < steps[0][0]
    evaluated = [e["name"] for e in saved["evals"]]
    assert evaluated == ["initial", "stage0", "stage1"]  # every layout evaluates (tp / cp / pp: sharded)
    assert saved["evals"][-1]["accuracy"] == final_accuracy  # of the same weights as one process's
    assert "Slicing a flattened dim" not in run.stderr


@pytest.mark.parametrize("preset", ["tiny", "tiny_moe"])
def test_gradient_accumulation_steps_once_per_group_of_micro_batches(tmp_path, preset):
    """data.grad_accum=3 in one process: every optimizer step takes the next 3 micro-batches of the curriculum,
    one forward and backward each, and equals the reference's step on them (token mean over the three, MoE aux
    loss averaged over them); tokens and label tokens of a step are the three micro-batches'."""
    overrides = [*SMALL, *stages_override((2, {}), (2, {"vision": False})), f"--model.preset={preset}",
                 "--data.grad_accum=3", "--optimizer.grad_clip=0.5", f"--output_dir={tmp_path}"]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    results = trainer.fit()
    steps = [(s["loss"], s["grad_norm"]) for s in results["steps"]]
    reference, final_accuracy = reference_steps(cfg, world=1)
    assert len(steps) == len(reference) == 4
    for (loss, norm), (ref_loss, ref_norm) in zip(steps, reference):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5), (steps,
                                                                                                       reference)
    assert results["evals"][-1]["accuracy"] == final_accuracy
    draws = list(Curriculum(cfg.curriculum_stages(), load_data(cfg)[0], trainer.encoder, seed=cfg.data.seed,
                            micro_batches=3))
    assert len(draws) == 3 * 4
    tokens = [sum(batch["input_ids"].numel() for _, batch in draws[3 * k:3 * k + 3]) for k in range(4)]
    labels = [sum(int((batch["labels"] != -100).sum()) for _, batch in draws[3 * k:3 * k + 3]) for k in range(4)]
    assert [s["tokens"] for s in results["steps"]] == tokens
    assert [s["label_tokens"] for s in results["steps"]] == labels


HSDP_ACCUM = [*SMALL, *stages_override((2, {}), (1, {"vision": False})), "--parallel.dp_replicate=2",
              "--parallel.dp_shard=2", "--optimizer.grad_clip=0.5", "--checkpoint.every=0"]


def _hsdp_accumulation_rank(rank: int) -> dict:
    """HSDP 2 x 2 with grad_accum 1 and 3: all-reduces across the replicas per optimizer step, and the losses."""
    import tempfile

    import torch.distributed as dist

    torch.set_num_threads(1)
    counts, losses = {}, {}
    for accum in (1, 3):
        trainer = Trainer(load_config(None, [*HSDP_ACCUM, f"--data.grad_accum={accum}",
                                             f"--output_dir={tempfile.mkdtemp()}"]))
        replicas = sorted(dist.get_process_group_ranks(trainer.mesh["dp_replicate"].get_group()))
        calls, original = [], dist.all_reduce

        def counting(tensor, *args, group=None, **kwargs):
            if group is not None and sorted(dist.get_process_group_ranks(group)) == replicas:
                calls.append(tensor.numel())
            return original(tensor, *args, group=group, **kwargs)

        dist.all_reduce = counting
        try:
            for _ in range(trainer.curriculum.total_steps):
                trainer.run_one_step()
        finally:
            dist.all_reduce = original
        counts[accum] = len(calls) / trainer.curriculum.total_steps
        losses[accum] = [(h["loss"], h["grad_norm"]) for h in trainer.history]
    return {"counts": counts, "losses": losses}


def _unfreeze_rank(rank: int) -> dict:
    """tp=2 (the vision tower is FSDP-sharded over the tp pair, a root of its own): vision frozen, then trainable."""
    import tempfile

    torch.set_num_threads(1)
    overrides = [*SMALL, *stages_override((1, {"vision": False}), (2, {})), "--parallel.dp_shard=1",
                 "--parallel.tp=2", "--optimizer.grad_clip=0.5", "--evaluation.enabled=false",
                 f"--output_dir={tempfile.mkdtemp()}"]  # no evaluation: it reshards too
    trainer = Trainer(load_config(None, overrides))
    vision_grads = []
    step = trainer._optimizer_step

    def recording():
        vision_grads.append(sum(1 for name, p in trainer.model.named_parameters()
                                if parameter_part(name) == "vision" and p.grad is not None))
        return step()

    trainer._optimizer_step = recording
    for _ in range(trainer.curriculum.total_steps):
        trainer.run_one_step()
    return {"vision_grads": vision_grads, "steps": [(h["loss"], h["grad_norm"]) for h in trainer.history],
            "overrides": overrides}


@pytest.mark.distributed
def test_a_frozen_then_unfrozen_vision_tower_trains_again_under_tp(tmp_path):
    """A curriculum that freezes the vision tower, then trains it again, under tp (where the tower is a FSDP2 root
    of its own, which copies requires_grad into its gathered parameters only when it gathers them): no vision
    gradients in stage 0, all of them in stage 1, and the steps equal the single-process reference."""
    result = run_on_gloo_ranks(_unfreeze_rank, 2, tmp_path, timeout_s=300)[0]
    vision_params = sum(1 for name, _ in build_model(load_config(), ByteTokenizer(), torch.device("cpu"))
                        .named_parameters() if parameter_part(name) == "vision")
    assert result["vision_grads"] == [0, vision_params, vision_params], result["vision_grads"]
    reference, _ = reference_steps(load_config(None, result["overrides"]), world=1)
    for (loss, norm), (ref_loss, ref_norm) in zip(result["steps"], reference, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)


@pytest.mark.distributed
def test_hsdp_gradient_accumulation_all_reduces_across_replicas_once_per_step(tmp_path):
    """dp_replicate=2 x dp_shard=2 with grad_accum=3: the cross-replica all-reduces per optimizer step are those of
    grad_accum=1 (only the last micro-batch's backward all-reduces; FSDP2 keeps the partial sums), and the steps
    equal the single-process reference over the 4 data ranks' 3 micro-batches each."""
    results = run_on_gloo_ranks(_hsdp_accumulation_rank, 4, tmp_path, timeout_s=300)
    counts = results[0]["counts"]
    assert counts["1"] == counts["3"] > 0, counts
    reference, _ = reference_steps(load_config(None, [*HSDP_ACCUM, "--data.grad_accum=3"]), world=4)
    for (loss, norm), (ref_loss, ref_norm) in zip(results[0]["losses"]["3"], reference, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)


# ----------------------------------------------------------------------------------- (e) bad command lines

def test_bad_key_in_a_subprocess_exits_2_with_one_clear_line():
    run = subprocess.run([sys.executable, "-m", "mgpt_train.train", "--optimizer.lrr=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "error: unknown config key 'optimizer.lrr'; did you mean: optimizer.lr" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("argv, message", [
    (["--config", "no/such/file.toml"], "config file no/such/file.toml does not exist"),
    (["--optimizer.lr=fast"], "config key 'optimizer.lr': expected float, got 'fast'"),
    (["--parallel.tp=2"], "config section 'parallel' on 1 rank(s): ParallelDims: dp_replicate*cp*tp*pp = 2"),
    (["--curriculum.stages.0.mixture={\"cockpit\": 1}"], "mixture prefix 'cockpit' matches no sample tag"),
    (["--data.max_tokens=64"], "raise max_tokens or set max_sample_tokens"),
    (["--curriculum.stages.0.steps"], "override '--curriculum.stages.0.steps': expected --key.sub=value"),
])
def test_bad_configuration_is_reported(tmp_path, capsys, argv, message):
    assert main([*argv, f"--output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mgpt_train.train: error: ") and message in err, err


def test_unsupported_layouts_are_config_errors():
    check_layout(load_config(None, ["--model.compile=true"]), ParallelDims(world_size=4, pp=2))
    for dims in (ParallelDims(world_size=8, pp=2, dp_replicate=2), ParallelDims(world_size=8, pp=2, tp=2),
                 ParallelDims(world_size=8, pp=2, ep=2), ParallelDims(world_size=8, pp=2, cp=2)):
        check_layout(load_config(), dims)
    with pytest.raises(ConfigError, match="'model.dtype': bfloat16 is FSDP2's mixed precision"):
        check_layout(load_config(None, ["--model.dtype=bfloat16"]), ParallelDims(world_size=2, dp_shard=1, tp=2))
    check_layout(load_config(None, ["--model.dtype=bfloat16"]), ParallelDims(world_size=2))
    check_layout(load_config(None, ["--model.dtype=bfloat16"]), ParallelDims(world_size=1))  # autocast


def test_evaluation_can_be_switched_off_and_must_fit_the_pipeline(tmp_path, capsys):
    """evaluation.enabled=false: a run without held-out evaluations. Under pp the held-out batches go through the
    stages padded to seq_len: a held-out sample longer than that is refused at start-up, naming the key."""
    results = Trainer(config(tmp_path, *stages_override((1, {}), (1, {})), "--evaluation.enabled=false")).fit()
    assert results["evals"] == [] and len(results["steps"]) == 2
    assert "held-out" not in capsys.readouterr().out
    stage = {"name": "short", "mixture": {"vertical": 1.0}, "steps": 1, "max_sample_tokens": 128}
    overrides = [*SMALL, "--data.max_tokens=128", "--data.synthetic.heldout_samples=32",
                 f"--curriculum.stages={json.dumps([stage])}", "--parallel.dp_shard=1", "--parallel.pp=2",
                 f"--output_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                          "mgpt_train.train", *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert re.search(r"config key 'evaluation.enabled': a held-out sample has \d+ tokens, more than the pipeline's "
                     r"seq_len 128 \(the largest stage max_tokens\); raise data.max_tokens", run.stderr), \
        run.stderr[-2000:]


def test_compiled_decoder_layers_train_like_eager(tmp_path):
    """model.compile=true: every decoder layer under torch.compile (inductor; C++ on the CPU) gives the eager
    run's losses (the pipeline case runs under torchrun above)."""
    losses = {}
    for compiled in ("false", "true"):
        trainer = Trainer(config(tmp_path / compiled, *stages_override((1, {})), f"--model.compile={compiled}"))
        stage, batch = next(trainer.curriculum)
        losses[compiled] = [trainer.train_step(stage, [trainer.prepare(batch)], lr=2e-3)["loss"] for _ in range(3)]
    layer = trainer.model.language_model.layers[0]
    assert layer._compiled_call_impl is not None  # nn.Module.compile() wraps the layer's call
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5), losses


def test_single_process_bf16_is_autocast_with_fp32_weights(tmp_path):
    """One process: model.dtype=bfloat16 runs the forward under torch.autocast; weights, gradients and optimizer
    state stay fp32 and the first loss is the fp32 run's up to bf16 rounding."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        trainer = Trainer(config(tmp_path / dtype, *stages_override((1, {})), f"--model.dtype={dtype}"))
        stage, batch = next(trainer.curriculum)
        losses[dtype] = [trainer.train_step(stage, [trainer.prepare(batch)], lr=2e-3)["loss"] for _ in range(3)]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.autocast and all(math.isfinite(v) for v in losses["bfloat16"])
    assert abs(losses["bfloat16"][0] - losses["float32"][0]) < 2e-2 * losses["float32"][0]
    assert losses["bfloat16"] != losses["float32"]  # bf16 compute really happened


def test_never_resume_refuses_existing_checkpoints_and_help_exits_0(tmp_path, capsys):
    (tmp_path / "checkpoints" / "step_3").mkdir(parents=True)
    assert main([*SMALL, f"--output_dir={tmp_path}", "--checkpoint.resume=never"]) == 2
    assert "'never' but" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "usage: python -m mgpt_train.train" in capsys.readouterr().out
