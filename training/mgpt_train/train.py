"""The training CLI: curriculum SFT of the compact Qwen3-VL, in one process or under torchrun.

    python -m mgpt_train.train --config training/configs/main_job.toml [--key.sub=value ...]
    torchrun --nproc-per-node 2 -m mgpt_train.train --config training/configs/tiny_cpu.toml --parallel.dp_shard=2

One run (every rank computes, rank 0 prints and writes the result files):
  1. the configuration (``mgpt_train.config``: file, then ``--key.sub=value`` overrides); a process group when
     WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); ``ParallelDims`` and its DeviceMesh.
  2. the model (``mgpt_train.build.build_model``): the preset / ``model.hf_config`` shape with the byte
     tokenizer's vocabulary, or a Hugging Face folder's shape, weights and tokenizer (``model.hf_checkpoint``, see
     ``mgpt_train.export``).
     ``model.init`` ("full", "sharded", "auto"; ``mgpt_train.initialization`` documents them): the whole seeded
     (or HF) model on every rank, then ``parallelize_qwen3_vl`` (FSDP2 / HSDP / TP / CP / EP, bf16 compute when
     ``model.dtype = "bfloat16"``; one process autocasts to bf16 instead) -- or parallelized on the meta device and only
     this rank's shards materialised and filled (what a 30B model needs; seeded values then depend on the layout).
     Pipeline parallelism (``parallel.pp`` > 1, combined with any of the other degrees):
     ``mgpt_train.pipeline`` stages on the meta device, ``parallelize_pipeline`` (CP / TP / EP / AC / FSDP2 per
     stage), then the same seeded weights loaded into them; each step's micro-batch is split by whole
     samples into ``parallel.pp_microbatches`` pipeline micro-batches (sharded init: the stages' shards are
     filled as above, with a tied head drawing the embedding's numbers), so the step, its loss and the curriculum
     are those of one process (of the data-parallel ranks' micro-batches together).
  3. data: the synthetic train and held-out splits (or ``data.jsonl``, whose last ``data.synthetic.heldout_samples``
     lines are held out) and the ``Curriculum`` over this rank's data-parallel shard; ``data.grad_accum`` packed
     micro-batches per data-parallel rank are one optimizer step (gradient accumulation: a forward and backward
     per micro-batch, FSDP reduce-scattering each one's gradients into the sharded sums; under pp they are
     ``grad_accum x pp_microbatches`` pipeline micro-batches of one schedule step). A background thread prepares
     ``data.prefetch`` micro-batches ahead (``mgpt_train.data.prefetch``; pinned on CUDA), and checkpoints record
     the curriculum state of the last micro-batch trained on.
  4. AdamW, weight decay on matrices only (not on norms, biases). Its state is created for every parameter up
     front (zeros and step 0, exactly what AdamW creates lazily), so checkpoints always hold every parameter's
     state, even of parts frozen so far.
  5. per step: on a stage change ``apply_trainable`` sets ``requires_grad`` of the vision / merger / language
     parts. A frozen parameter gets no gradient (``zero_grad`` sets them to None), and AdamW skips parameters
     without a gradient: frozen parts are neither updated nor decayed and keep their moments for the stage that
     unfreezes them -- one optimizer (one per pipeline stage), one param-group layout for the whole run. The
     learning rate of every group is the curriculum's for the step. Loss (``mgpt_train.objective``): the sum of -log p
     over the label tokens of ALL micro-batches of the step on ALL data/context ranks divided by their count,
     plus coef x the mean MoE aux loss over those micro-batches -- the single-process objective of one forward
     per micro-batch; gradient clipping by the global norm; NVTX ranges (data,
     vision_forward, language_forward, backward, optimizer) when ``profiling.nvtx``; ``StepMeter`` (tokens/s and
     MFU of this device, from ``profiling.qwen3_vl_flops`` with the stage's frozen parts, divided among the
     tp x cp x pp devices sharing a micro-batch; peak memory); a progress line on rank 0; an optional
     torch.profiler trace.
  6. at the end of every stage (and before the first step): ``evaluate_by_tag`` on the held-out set (greedy answer
     exact match, per tag and tag prefix), printed as a table with one column per evaluation, so forgetting of
     the general tasks between stages shows (``greedy_tokens`` of the model, sharded like training under tp / cp,
     forward only through the pipeline stages under pp: the whole model is never gathered on one rank;
     ``evaluation.enabled = false`` skips it). Checkpoints (``mgpt_train.checkpoint``: model, optimizer, curriculum
     position, metrics history) every ``checkpoint.every`` steps and at the end; ``checkpoint.resume`` continues
     from one.
  7. outputs in ``output_dir``: ``config.json`` (resolved), ``metrics.json`` (per-step metrics, per-stage
     evaluations, summary, environment), ``loss_throughput.png``; the summary table on stdout; with
     ``checkpoint.export_hf`` a Hugging Face folder ``hf/`` written by rank 0 from the final checkpoint
     (``mgpt_train.export.export_checkpoint``; ``python -m mgpt_train.export`` does the same afterwards).

Exit status: 0 done, 2 for a bad command line or configuration (one ``error:`` line on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mgpt_train import checkpoint, profiling
from mgpt_train.build import (build_model, build_optimizer, build_pipelined, check_layout, init_distributed,
                              load_data, make_encoder, run_device)
from mgpt_train.config import ConfigError, TrainConfig, config_from_argv
from mgpt_train.data import Curriculum, apply_trainable, evaluate_by_tag
from mgpt_train.data.prefetch import Prefetcher
from mgpt_train.export import export_checkpoint, run_tokenizer
from mgpt_train.objective import StepLoss, global_label_tokens
from mgpt_train.profiling import (RANGE_BACKWARD, RANGE_DATA, RANGE_LANGUAGE, RANGE_OPTIMIZER, RANGE_STEP,
                                  RANGE_VISION, nvtx_range)

USAGE = """usage: python -m mgpt_train.train [--config FILE.toml|FILE.json] [--section.key=value ...]
       torchrun --nproc-per-node N -m mgpt_train.train [same arguments]

Trains the compact Qwen3-VL with the curriculum of the config (defaults: the tiny CPU run).
Keys are dotted paths of mgpt_train.config.TrainConfig, e.g. --optimizer.lr=3e-4,
--curriculum.stages.0.steps=8, --parallel.dp_shard=2, --checkpoint.resume=never, --output_dir=runs/x."""

METRICS_FILE, PLOT_FILE, CONFIG_FILE, HF_DIR = "metrics.json", "loss_throughput.png", "config.json", "hf"


# ------------------------------------------------------------------------------------------------------------
# Step mechanics (the set-up pieces live in mgpt_train.build)
# ------------------------------------------------------------------------------------------------------------
def clip_gradients(parts: list[torch.nn.Module], max_norm: float | None, pp_group=None,
                   skip: tuple[torch.Tensor, ...] = ()) -> float:
    """The global L2 norm of all gradients of the model ``parts`` (clipped to ``max_norm`` when given), over every
    way they are split: DTensor gradients (FSDP / TP) per mesh, expert shards summed over their expert-parallel
    group, pipeline stages summed over ``pp_group``. ``skip``: parameters counted on another rank (a tied copy)."""
    from mgpt_train.parallel import ExpertParallelMoE

    expert_groups = {id(p): module.group for part in parts for module in part.modules()
                     if isinstance(module, ExpertParallelMoE) for p in module.parameters()}
    skipped = {id(p) for p in skip}
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for param in (p for part in parts for p in part.parameters()):
        if param.grad is not None and id(param) not in skipped:
            mesh = getattr(param.grad, "device_mesh", None)
            buckets.setdefault((mesh, expert_groups.get(id(param))), []).append(param.grad)
    square = torch.zeros((), dtype=torch.float64)
    for (_, expert_group), grads in buckets.items():
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        part = norm.double() ** 2
        if expert_group is not None:
            dist.all_reduce(part, group=expert_group)
        square += part.cpu()
    if pp_group is not None:
        dist.all_reduce(square, group=pp_group)
    total = square.sqrt().item()
    if max_norm is not None and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for param in (p for part in parts for p in part.parameters()):
            if param.grad is not None:  # skipped copies too: they hold the same gradient
                param.grad.mul_(scale)
    return total


def eval_table(evals: list[dict]) -> str:
    """Accuracy (%) per tag (rows) after each evaluation (columns: initial, then each stage)."""
    tags = sorted({tag for e in evals for tag in e["accuracy"]}, key=lambda tag: (tag != "all", tag))
    rows = [["tag"] + [e["name"] for e in evals]]
    for tag in tags:
        rows.append([tag] + [f"{100 * e['accuracy'][tag]:.1f}" if tag in e["accuracy"] else "-" for e in evals])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    rule = "-" * len(lines[0])
    return "\n".join([rule, lines[0], rule, *lines[1:], rule])


def split_packed(batch: dict, parts: int, vision_start_id: int) -> list[dict]:
    """``parts`` packed batches of consecutive whole samples of ``batch``, about equal in tokens (a sample goes to
    the part where its middle token falls; parts may be empty): the pipeline's micro-batches of one step."""
    bounds = batch["cu_seqlens"].tolist()
    total = max(bounds[-1], 1)
    owner = [min(parts - 1, parts * (a + b) // (2 * total)) for a, b in zip(bounds, bounds[1:])]
    images = [int((batch["input_ids"][a:b] == vision_start_id).sum()) for a, b in zip(bounds, bounds[1:])]
    first_image = [sum(images[:i]) for i in range(len(images) + 1)]
    patches = batch["image_grid_thw"].prod(-1).tolist()
    first_patch = [sum(patches[:i]) for i in range(len(patches) + 1)]
    pieces = []
    for part in range(parts):
        samples = [i for i, o in enumerate(owner) if o == part]
        lo, hi = (samples[0], samples[-1] + 1) if samples else (0, 0)
        start, end = bounds[lo], bounds[hi]
        image_lo, image_hi = first_image[lo], first_image[hi]
        pieces.append({"input_ids": batch["input_ids"][start:end], "labels": batch["labels"][start:end],
                       "cu_seqlens": batch["cu_seqlens"][lo:hi + 1] - start,
                       "pixel_values": batch["pixel_values"][first_patch[image_lo]:first_patch[image_hi]],
                       "image_grid_thw": batch["image_grid_thw"][image_lo:image_hi],
                       "sample_tags": batch["sample_tags"][lo:hi]})
    return pieces


class _RangeHooks:
    """An NVTX range from a module's forward pre-hook to its forward hook (vision tower, decoder)."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.name, self.open = name, []
        module.register_forward_pre_hook(self.enter)
        module.register_forward_hook(self.exit)

    def enter(self, _module, _args) -> None:
        opened = nvtx_range(self.name)
        opened.__enter__()
        self.open.append(opened)

    def exit(self, _module, _args, _output) -> None:
        self.open.pop().__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------
class Trainer:
    """Everything of one run; ``fit()`` trains to the end of the curriculum (resuming first when configured)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = run_device()
        self.rank, self.world = init_distributed(self.device)
        try:
            self.dims = cfg.parallel.dims(self.world)
        except ValueError as exc:
            raise ConfigError(f"config section 'parallel' on {self.world} rank(s): {exc}") from None
        check_layout(cfg, self.dims)
        self.mesh = self.dims.build_mesh(self.device.type) if self.world > 1 else None
        dp_rank, dp_size = (self.mesh["dp"].get_local_rank(), self.mesh["dp"].size()) if self.mesh else (0, 1)
        self.loss_group = self.mesh["dp_cp"].get_group() if self.mesh else None
        # One process has no FSDP mixed precision: bf16 is autocast there (fp32 weights, optimizer and loss math).
        self.autocast = cfg.model.dtype == "bfloat16" and self.world == 1
        self.split = self.dims.cp * self.dims.tp  # devices splitting one micro-batch's tokens
        self.share = self.split * self.dims.pp  # devices sharing one micro-batch's work

        self.tokenizer = run_tokenizer(cfg)
        self.pipeline = self.model = None
        if self.dims.pp > 1:
            self.pipeline = build_pipelined(cfg, self.tokenizer, self.device, self.dims, self.mesh)
            self.parts, self.model_config = list(self.pipeline.stage_modules), self.pipeline.config
            self.pp_group = self.mesh["pp"].get_group()
            self.last_stage_rank = dist.get_global_rank(self.pp_group, self.dims.pp - 1)
            # the last stage's copy of a tied embedding: its gradient norm is counted on the first stage
            tied_copy = (self.model_config.tie_word_embeddings and self.pipeline.has_last_stage
                         and not self.pipeline.has_first_stage)
            self.norm_skip = (self.parts[-1].lm_head.weight,) if tied_copy else ()
        else:
            self.model = build_model(cfg, self.tokenizer, self.device, self.dims, self.mesh)
            self.parts, self.model_config, self.pp_group, self.norm_skip = [self.model], self.model.config, None, ()
        self.encoder = make_encoder(cfg, self.model_config, self.tokenizer)
        train, self.heldout = load_data(cfg)
        # the longest held-out sample, counted once (counting may open the images of JSONL samples)
        self.heldout_longest = max(self.encoder.num_tokens(sample) for sample in self.heldout)
        if self.pipeline is not None and cfg.evaluation.enabled and self.heldout_longest > self.pipeline.seq_len:
            raise ConfigError(f"config key 'evaluation.enabled': a held-out sample has {self.heldout_longest} tokens, "
                              f"more than the pipeline's seq_len {self.pipeline.seq_len} (the largest stage "
                              f"max_tokens); raise data.max_tokens or set --evaluation.enabled=false")
        self.curriculum = Curriculum(cfg.curriculum_stages(), train, self.encoder, seed=cfg.data.seed,
                                     dp_rank=dp_rank, dp_size=dp_size, micro_batches=cfg.data.grad_accum)
        self.optimizers = [build_optimizer(part, cfg, self.device) for part in self.parts]

        profiling.enable_nvtx(cfg.profiling.nvtx)
        if cfg.profiling.nvtx:
            for part in self.parts:
                if hasattr(part, "visual"):
                    _RangeHooks(part.visual, RANGE_VISION)
            if self.model is not None:  # pipeline stages call their decoder layers one by one
                _RangeHooks(self.model.language_model, RANGE_LANGUAGE)
        peak = cfg.profiling.peak_flops or profiling.device_peak_flops(self.device)
        self.meter = profiling.StepMeter(peak_flops=peak, device=self.device)
        self.step, self.stage_name = 0, None
        self.batches: Prefetcher | None = None  # started by the first step (after resume() moved the curriculum)
        self.data_state: dict | None = None  # the curriculum's state after the last micro-batch trained on
        self.history: list[dict] = []  # one dict per step (metrics.json "steps")
        self.evals: list[dict] = []  # {"name", "step", "accuracy": {tag: fraction}}
        self.resume()

    # ----------------------------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def prepare(self, batch: dict) -> dict:
        """The batch on the run's device, padded for context / sequence parallelism when they split it (the
        pipeline pads and moves its micro-batches itself)."""
        if self.pipeline is not None:
            return batch
        if self.split > 1:
            from mgpt_train.parallelize import pad_packed_batch

            batch = pad_packed_batch(batch, 2 * self.split, pad_id=self.tokenizer.pad_id)
        return self.to_device(batch)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def enter_stage(self, stage) -> None:
        counts = {}
        for part in self.parts:
            for name, count in apply_trainable(part, stage).items():
                counts[name] = counts.get(name, 0) + count
        self.stage_name = stage.name
        frozen = [part for part, on in stage.trainable.items() if not on]
        self.log(f"stage {stage.name!r}: trainable elements {counts}, frozen parts {frozen or 'none'}")

    def train_step(self, stage, batches: list[dict], lr: float) -> dict:
        """One optimizer step on this rank's prepared micro-batches (``data.grad_accum`` of them): a forward and
        a backward per micro-batch, gradients accumulating; the loss is the step's global token mean."""
        if stage.name != self.stage_name:
            self.enter_stage(stage)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        if self.pipeline is not None:
            tokens = global_label_tokens(batches, self.loss_group, self.dims.cp, self.device)
            return self._pipeline_step(batches, int(tokens))
        objective = StepLoss(batches, self.loss_group, self.dims.cp, self.device)
        for index, batch in enumerate(batches):
            if len(batches) > 1:  # FSDP2's default all-reduces every backward; the step's last one is left so
                self._replica_all_reduce(index == len(batches) - 1)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model(batch)
            with nvtx_range(RANGE_BACKWARD):
                objective.backward(out)
        return {"loss": objective.value().item(), "grad_norm": self._optimizer_step(),
                "label_tokens": int(objective.label_tokens)}

    def _replica_all_reduce(self, enabled: bool) -> None:
        """HSDP (dp_replicate > 1) under gradient accumulation: every micro-batch's backward reduce-scatters
        within the shard group, but only the step's last one all-reduces across the replicas (FSDP2 keeps the
        partial sums meanwhile) -- one inter-node all-reduce per step, not per micro-batch."""
        if self.dims.dp_replicate > 1 and hasattr(self.model, "set_requires_all_reduce"):
            self.model.set_requires_all_reduce(enabled, recurse=True)

    def _pipeline_step(self, batches: list[dict], label_tokens: int) -> dict:
        """Each micro-batch split into ``pp_microbatches`` pieces, all of them the pipeline micro-batches of one
        schedule step (forward and backward). The loss is the token mean over the micro-batches of all
        data-parallel ranks, as in one process: each last stage returns its share (its context shard's -log p sum
        over the global label tokens), summed over the data and context ranks, plus the MoE aux term averaged over
        them, then sent from the last stage to every pp rank. MoE: the load-balancing loss is that of each
        pipeline micro-batch (averaged), not of the whole micro-batch -- 1F1B starts a piece's backward before the
        last piece's router statistics exist; Megatron's pipelines do the same."""
        pieces = [piece for batch in batches for piece in
                  split_packed(batch, self.pipeline.n_microbatches // len(batches), self.tokenizer.vision_start_id)]
        loss = self.pipeline.step(pieces, global_tokens=label_tokens)
        # (cross-entropy share, aux term) on the last stage, zeros elsewhere: their own groups sum zeros
        sums = (torch.stack([loss, self.pipeline.last_aux]).float() if loss is not None
                else torch.zeros(2, device=self.device))
        dist.all_reduce(sums, group=self.loss_group)
        logged = sums[0] + sums[1] / dist.get_world_size(self.loss_group)  # the aux term: mean over the ranks
        dist.broadcast(logged, src=self.last_stage_rank, group=self.pp_group)
        return {"loss": logged.item(), "grad_norm": self._optimizer_step(), "label_tokens": label_tokens}

    def _optimizer_step(self) -> float:
        with nvtx_range(RANGE_OPTIMIZER):
            grad_norm = clip_gradients(self.parts, self.cfg.optimizer.grad_clip, self.pp_group, self.norm_skip)
            for optimizer in self.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @torch.no_grad()
    def evaluate(self, name: str) -> None:
        """Held-out exact match per tag, appended to ``self.evals`` and printed (collective: every rank runs it);
        nothing with ``evaluation.enabled = false``."""
        if not self.cfg.evaluation.enabled:
            return
        if self.pipeline is not None:  # forward only through the stages; the batches fit seq_len (checked)
            accuracy = evaluate_by_tag(self.pipeline.greedy_tokens, self.heldout, self.encoder, self.pipeline.seq_len)
        else:
            # Through model.__call__ so FSDP's root hooks gather the root's parameters; forward = greedy_tokens
            # meanwhile (parallelize's sharded one under tp / cp: the batch is padded like a training batch).
            training_forward = self.model.__dict__.get("forward")  # parallelize's loss forward, if installed
            self.model.forward = self.model.greedy_tokens
            try:
                accuracy = evaluate_by_tag(lambda b: self.model(self.prepare(b))[:b["input_ids"].shape[0]],
                                           self.heldout, self.encoder,
                                           max(self.cfg.data.max_tokens, self.heldout_longest))
            finally:
                if training_forward is None:
                    del self.model.forward
                else:
                    self.model.forward = training_forward
            from mgpt_train.parallelize import reshard_all

            reshard_all(self.model)
        self.evals.append({"name": name, "step": self.step, "accuracy": accuracy})
        shown = ", ".join(f"{tag} {100 * accuracy[tag]:.1f}%" for tag in ("all", "general", "vertical")
                          if tag in accuracy)
        self.log(f"held-out exact match after {name} (step {self.step}): {shown}")

    def save(self) -> None:
        data_state = self.data_state if self.data_state is not None else self.curriculum.state_dict()
        extra = {"curriculum": data_state, "history": self.history, "evals": self.evals,
                 "train_config": self.cfg.to_dict()}  # what mgpt_train.export rebuilds the model from
        folder = checkpoint.save(self.step, self.parts, self.optimizers, extra, self.cfg.checkpoint_dir,
                                 keep=self.cfg.checkpoint.keep)
        self.log(f"checkpoint {folder}")

    def resume(self) -> None:
        """Continue from ``checkpoint.resume`` (a fresh start when "latest" finds none). "never" refuses a folder
        that already holds checkpoints: the run would fail when it reached one of their steps."""
        which, folder = self.cfg.checkpoint.resume_step, self.cfg.checkpoint_dir
        if which is None:
            if checkpoint.available_steps(folder):
                raise ConfigError(f"config key 'checkpoint.resume' is 'never' but {folder} holds checkpoints (steps "
                                  f"{checkpoint.available_steps(folder)}); resume them with --checkpoint.resume=latest "
                                  f"or write elsewhere (--output_dir / --checkpoint.dir)")
            return
        loaded = checkpoint.load(self.parts, self.optimizers, folder, which)
        if loaded is None:
            return
        self.step, extra = loaded
        # strict=False also accepts a checkpoint of another data-parallel size (same stage and step, new shards)
        self.curriculum.load_state_dict(extra["curriculum"], strict=False)
        self.history, self.evals = list(extra["history"]), list(extra["evals"])
        self.meter.records = [profiling.StepRecord(h["step"], h["seconds"], h["tokens"], h["loss"], h["flops"],
                                                   h["peak_memory"]) for h in self.history]
        self.log(f"resumed from step {self.step} of {self.cfg.checkpoint_dir}")

    # ----------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the end of the curriculum; returns what ``metrics.json`` holds."""
        cfg, total = self.cfg, self.curriculum.total_steps
        if self.rank == 0:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            cfg.save(Path(cfg.output_dir) / CONFIG_FILE)
        self.log(f"mgpt_train: {self.world} rank(s) on {self.device.type}, parallel {self.dims}, "
                 f"{sum(p.numel() for part in self.parts for p in part.parameters()):,} parameters here, stages "
                 f"{dict(zip([s.name for s in cfg.curriculum_stages()], self.curriculum.stage_steps))}")
        if self.step == 0:
            self.evaluate("initial")
        progress = profiling.ProgressBar(total, rank=self.rank, every=cfg.profiling.log_every)
        tracer = profiling.TraceProfiler(cfg.trace_dir, wait=cfg.profiling.trace_wait,
                                         warmup=cfg.profiling.trace_warmup, active=cfg.profiling.trace_active,
                                         rank=self.rank, enabled=cfg.profiling.trace)
        with tracer:
            while self.step < total:
                self.run_one_step(progress)
                tracer.step()
        progress.close()
        if self.batches is not None:
            self.batches.close()
        if not checkpoint.step_dir(cfg.checkpoint_dir, self.step).exists():
            self.save()
        if cfg.checkpoint.export_hf:
            self.export_hf()
        return self.finish()

    def export_hf(self) -> None:
        """Rank 0 writes ``<output_dir>/hf`` from the final checkpoint; the other ranks wait for it."""
        if self.rank == 0:
            out = export_checkpoint(checkpoint.step_dir(self.cfg.checkpoint_dir, self.step),
                                    Path(self.cfg.output_dir) / HF_DIR, self.cfg,
                                    dtype=self.cfg.checkpoint.export_dtype, log=self.log)
            self.log(f"exported the Hugging Face model folder {out}")
        if dist.is_initialized():
            dist.barrier()

    def run_one_step(self, progress: profiling.ProgressBar | None = None) -> None:
        self.meter.start()
        with nvtx_range(RANGE_STEP):
            with nvtx_range(RANGE_DATA):
                if self.batches is None:
                    self.batches = Prefetcher(self.curriculum, self.cfg.data.prefetch,
                                              pin_device=self.device if self.device.type == "cuda" else None)
                draws = [next(self.batches) for _ in range(self.curriculum.micro_batches)]
                stage, raws = draws[0].stage, [draw.batch for draw in draws]
                lr, position, self.data_state = draws[-1].lr, draws[-1].position, draws[-1].state
                batches = [self.prepare(raw) for raw in raws]
            result = self.train_step(stage, batches, lr)
        self.step += 1
        flops = sum(profiling.qwen3_vl_flops(self.model_config, raw["cu_seqlens"].diff().tolist(),
                                             raw["image_grid_thw"].tolist(), trainable=stage.trainable)["total"]
                    for raw in raws)
        tokens = sum(raw["input_ids"].numel() for raw in raws)
        # tp / cp / pp ranks share one micro-batch: each device's share of its tokens and FLOPs
        record = self.meter.stop(self.step, tokens / self.share, result["loss"], flops / self.share)
        self.history.append({"step": self.step, "stage": stage.name, "lr": lr, **result, "seconds": record.seconds,
                             "tokens": record.tokens, "tokens_per_s": record.tokens_per_s, "flops": record.flops,
                             "mfu": record.mfu(self.meter.peak_flops), "peak_memory": record.peak_memory})
        if progress is not None:
            progress.update(self.step, loss=result["loss"], lr=lr, tok_s=record.tokens_per_s)
        if position["step_in_stage"] == self.curriculum.stage_steps[position["stage_index"]] - 1:
            self.evaluate(stage.name)
        every = self.cfg.checkpoint.every
        if every and self.step % every == 0 and self.step < self.curriculum.total_steps:
            self.save()

    def finish(self) -> dict:
        out = Path(self.cfg.output_dir)
        results = {"steps": self.history, "evals": self.evals, "summary": self.meter.summary(),
                   "stage_steps": dict(zip([s.name for s in self.cfg.curriculum_stages()],
                                           self.curriculum.stage_steps)),
                   "world_size": self.world, "parallel": dataclasses.asdict(self.dims)}
        if self.rank == 0:
            results["environment"] = profiling.run_environment(self.device, self.meter.peak_flops)
            (out / METRICS_FILE).write_text(json.dumps(results, indent=2) + "\n")
            profiling.plot(self.meter, out / PLOT_FILE)
            if self.evals:
                self.log(f"held-out exact match (%) per evaluation:\n{eval_table(self.evals)}")
            self.log(f"profile summary ({self.device.type}, rank 0):\n{profiling.summary_table(self.meter)}")
            self.log(f"wrote {out / METRICS_FILE}, {out / PLOT_FILE}, {out / CONFIG_FILE}")
        return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return 0
    try:
        trainer = Trainer(config_from_argv(argv))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        # a bad command line / config file / data setting fails identically on every rank: one line, rank 0
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mgpt_train.train: error: {exc}\n(run with --help for usage)", file=sys.stderr)
        return 2
    trainer.fit()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
