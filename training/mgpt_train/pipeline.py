"""Pipeline parallelism for ``Qwen3VLModel`` on ``torch.distributed.pipelining`` (GPipe, 1F1B, interleaved 1F1B).

    pipe = build_pipeline(config, mesh["pp"], schedule="1F1B", n_microbatches=8, seq_len=4096, device=device)
    loss = pipe.step(microbatches)        # list of packed batches; the step's mean loss on the last stage's rank
    optimizers = [AdamW(m.parameters()) for m in pipe.stage_modules]   # or one over pipe.parameters()

Split. ``pp_size x virtual_stages`` stages; stage s runs on pp rank ``s % pp_size`` (the looped placement the
interleaved schedule expects). Stage 0 holds the vision tower and the token embedding, the last stage the final
norm and the head. Decoder layers are contiguous blocks: with L layers over S stages every stage gets L // S and
the L % S remaining layers go one each to stages 1, 2, ... (never stage 0: it already carries the vision tower),
unless ``layers_per_stage`` gives the counts explicitly. Every stage needs at least one layer (a clear error).
Stage modules keep the full model's attribute paths (``visual``, ``language_model.embed_tokens``,
``language_model.layers.<i>`` in a ModuleDict keyed by the global index, ``language_model.norm``, ``lm_head``), so
their parameter names and state dicts ARE the full model's: checkpoints (a list of parts, see checkpoint.py), the
HF adapter and per-module TP/FSDP plans work unchanged.

Fixed shapes between stages. The schedules send preallocated buffers, so every micro-batch is padded to
``seq_len`` tokens: the pad tokens (``pad_token_id``, labels -100) form one extra packed sample, so causal
attention inside the real samples (block-diagonal over cu_seqlens) never sees them and the real tokens compute
exactly what they would unpadded. Stages exchange only activations: hidden [1, seq_len, H]; while DeepStack
taps are still to be added by a later stage, the pending taps as a dense [1, k, seq_len, H] map (the vision
features scattered to the image-token rows, zeros elsewhere; the gradient flows back to the vision tower); for
a MoE model, the running router statistics [1, 2, E] (per-expert top-k counts and summed probabilities of the
MoE layers so far, fp32).
Everything else a stage needs -- MRoPE positions, cu_seqlens, the attention info, image rows, labels -- is
small and is computed on every rank from the micro-batch itself (``step`` takes the micro-batches on every pp
rank; only the first stage reads ``pixel_values``). The schedule hands each stage its micro-batch index as the
keyword tensor ``microbatch``.

Loss. The last stage returns the per-token log-probabilities [1, seq_len] (``mgpt_ops.fused_linear_logprobs`` on the
labelled rows only, zeros elsewhere); the schedule's loss is -sum(logprobs) / N with N the label tokens of the whole
step (or the caller's ``global_tokens``), and gradients are not rescaled by the schedule, so the summed loss and the
gradients equal one forward of the full model over the same micro-batches (token-weighted mean). MoE: every stage
adds its layers' router statistics to the running ones, so the last stage holds those of ALL MoE layers and adds
``router_aux_loss_coef * aux / (non-empty micro-batches)`` with aux the model's load-balancing loss (one product of
sums over all layers), through an identity op whose backward injects the aux gradient; it flows back through the
statistics to every stage's routers. Pad rows (the pipeline's and a batch's own ``pad_tokens``) are routed but left
out of the statistics, so that is the model's objective on the unpadded micro-batches exactly. The returned loss is
the cross-entropy only (the aux term of the step: ``last_aux``).

Tied embeddings (``tie_word_embeddings``) across pp ranks: the last stage keeps its own copy of the embedding as
``lm_head.weight``; ``init_weights`` copies stage 0's value to it and ``step`` sums the two gradients between
the two ranks (a point-to-point exchange), so both copies stay equal under any optimizer. On one rank the two
stages share the Parameter.

Composition with CP, TP, EP and FSDP2 / HSDP: ``build_pipeline(..., materialize=False)`` (meta device), then
``mgpt_train.parallelize.parallelize_pipeline`` (CP / TP / EP / activation checkpointing / ``fully_shard`` per
stage module, in place; it documents the order), then ``pipe.load_full_state_dict`` (full tensors, distributed
onto the DTensor parameters) or ``pipe.init_weights()``. The token layout (``Pipeline.shard_tokens``): under cp
the first stage keeps this rank's load-balanced context shard of the embeddings and DeepStack taps (chunks r and
2cp-1-r of 2cp, ``mgpt_train.parallel.shard_sequence``), so stages exchange [1, seq_len / cp, ...] shards, every
stage rotates with the MRoPE positions of its shard, attention all-gathers K/V over cp, the last stage scores
the shard's labels and the MoE router statistics are summed over cp. Under tp a stage runs its decoder layers on
its sequence piece of that shard and gathers it back at its end, so stages exchange plain tensors, identical on
the tp ranks. Set ``activation_dtype`` to what flows between stages (bf16 under an FSDP bf16 param policy).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor, distribute_tensor

from mgpt_ops import fused_linear_logprobs
from mgpt_train.model.config import Qwen3VLConfig
from mgpt_train.model.language import TextAttention, mrope_cos_sin
from mgpt_train.model.moe import RouterStats, load_balancing_loss
from mgpt_train.model.qwen3_vl import IGNORE_INDEX, Qwen3VLModel, greedy_at_labels, init_module_weights
from mgpt_train.parallel import make_cp_attention_fn
from mgpt_train.parallelize import DecoderTokenLayout, idle_vision, reshard_all, sequence_piece, whole_sequence
from mgpt_train.pipeline_plan import (SCHEDULE_NAMES, PaddedMicroBatch, StagePlan, check_schedule, pad_microbatch,
                                      plan_stages)

SCHEDULES = dict(zip(SCHEDULE_NAMES, (ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B), strict=True))


# --------------------------------------------------------------------------------------------------------------
# Stage modules
# --------------------------------------------------------------------------------------------------------------
class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``hidden`` whose backward also sends gradient 1 into ``aux``: a stage's MoE aux loss joins
    the backward pass without being an output the schedule would have to carry."""

    @staticmethod
    def forward(ctx, hidden, aux):
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        return grad_hidden, torch.ones((), dtype=torch.float32, device=grad_hidden.device)


class _TextPart(nn.Module):
    """The stage's share of ``Qwen3VLModel.language_model`` under the same attribute names."""

    def __init__(self, layers: dict[str, nn.Module], embed_tokens=None, norm=None):
        super().__init__()
        if embed_tokens is not None:
            self.embed_tokens = embed_tokens
        self.layers = nn.ModuleDict(layers)
        if norm is not None:
            self.norm = norm


class PipelineStageModule(nn.Module):
    """One pipeline stage: ``forward(*activations, microbatch)`` (see the module docstring for what flows)."""

    def __init__(self, plan: StagePlan, full: Qwen3VLModel):
        super().__init__()
        self.plan, self.config = plan, full.config
        text = full.language_model
        if plan.is_first:
            self.visual = full.visual
        self.language_model = _TextPart({str(i): text.layers[i] for i in plan.layers},
                                        embed_tokens=text.embed_tokens if plan.is_first else None,
                                        norm=text.norm if plan.is_last else None)
        if plan.is_last:
            if full.config.tie_word_embeddings and not plan.is_first:
                # The head's own copy of the tied embedding (kept equal by Pipeline, see the module docstring).
                weight = text.embed_tokens.weight
                self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                         dtype=weight.dtype)
            else:
                self.lm_head = full.lm_head
        self.moe_layers = sum(full.config.text.is_moe_layer(i) for i in range(full.config.text.num_hidden_layers))
        self.microbatches: list[PaddedMicroBatch] = []  # set by Pipeline.step for the duration of a step
        self.aux_terms: list[torch.Tensor] = []  # the last stage's MoE aux terms of the step (detached, for logs)
        self.predicting = False  # Pipeline.greedy_tokens: the last stage returns argmax tokens, no aux loss
        self.tokens = DecoderTokenLayout(None, None)  # Pipeline.shard_tokens: cp shards, tp sequence pieces
        # Set by parallelize_pipeline under FSDP: the vision tower runs on every micro-batch (idle_vision).
        self.vision_every_microbatch = False

    def _piece(self, x: torch.Tensor) -> torch.Tensor:
        tp_mesh = self.tokens.tp_mesh
        return x if tp_mesh is None else sequence_piece(x, tp_mesh)

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        tp_mesh = self.tokens.tp_mesh
        return x if tp_mesh is None else whole_sequence(x, tp_mesh)

    def tie_weights(self) -> None:
        """Share the embedding with the head when this one stage holds both (``to_empty`` unties them)."""
        if self.config.tie_word_embeddings and self.plan.is_first and self.plan.is_last:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def _first_stage_inputs(self, input_ids: torch.Tensor, mb: PaddedMicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [T, H] with the image features at the image rows, all DeepStack taps [k, T, H]), of the
        whole sequence: ``forward`` keeps this rank's context shard."""
        hidden = self.language_model.embed_tokens(input_ids.reshape(-1))
        taps = self.plan.deepstack_taps
        pending = hidden.new_zeros(taps, *hidden.shape)
        if mb.pixel_values is not None:
            image_embeds, deepstack = self.visual(mb.pixel_values, mb.image_grid_thw)
            if mb.image_rows.shape[0] != image_embeds.shape[0]:
                raise ValueError(f"pipeline: {mb.image_rows.shape[0]} image tokens in input_ids but the images "
                                 f"give {image_embeds.shape[0]} embeddings")
            hidden = hidden.index_copy(0, mb.image_rows, image_embeds.to(hidden.dtype))
            if taps:
                pending = pending.index_copy(1, mb.image_rows, torch.stack(deepstack).to(hidden.dtype))
        elif self.vision_every_microbatch:
            hidden = hidden + idle_vision(self).to(hidden.dtype)
        return hidden, pending

    def forward(self, *activations: torch.Tensor, microbatch: torch.Tensor):
        plan = self.plan
        mb = self.microbatches[int(microbatch.reshape(-1)[0])]
        tokens = self.tokens
        if plan.is_first:
            hidden, pending = self._first_stage_inputs(activations[0], mb)
            hidden, pending = tokens.cp_shard(hidden, 0), tokens.cp_shard(pending, 1)
            # a leaf, so the tensor always carries a gradient back (the schedule expects one for every input)
            running = (torch.zeros(2, self.config.text.num_experts, device=hidden.device, requires_grad=True)
                       if plan.moe else None)
        else:  # the previous stage sent this rank's context shard (and the running router statistics)
            hidden, *rest = (x[0] for x in activations)
            pending = rest.pop(0) if plan.pending_in else None
            running = rest.pop(0) if plan.moe else None
        # every row of the context shard (tp gathers q and k before rotating them)
        cos, sin = mrope_cos_sin(tokens.cp_shard(mb.position_ids, 1), self.config.text, hidden.dtype)
        hidden = self._piece(hidden)
        row_mask = tokens.row_mask_shard(mb.row_mask)
        for index in plan.layers:
            hidden, stats = self.language_model.layers[str(index)](hidden, cos, sin, mb.cu_seqlens, mb.info, row_mask)
            if stats is not None:
                running = running + torch.stack([stats.counts, stats.prob_sum])
            if index < plan.deepstack_taps:
                # Zeros outside the image rows: the same sum as the model's index_add at those rows.
                hidden = hidden + self._piece(pending[index - plan.layers.start])  # from this stage's first layer
        if plan.is_last:
            hidden = self._whole(self.language_model.norm(hidden))
            if self.predicting:
                return greedy_at_labels(hidden, _local(self.lm_head.weight), tokens.cp_shard(mb.labels, 0),
                                        tokens.tp_group)
            if plan.moe and self.moe_layers:
                hidden = _AttachAuxLoss.apply(hidden, self._aux_term(running))
            return self._logprobs(hidden, mb)
        outputs = [self._whole(hidden)]  # a tensor identical on the tp ranks crosses the stage boundary
        if plan.pending_out:
            outputs.append(pending[len(plan.layers):])
        if plan.moe:
            outputs.append(running)
        return tuple(_batched(x) for x in outputs) if len(outputs) > 1 else _batched(outputs[0])

    def _aux_term(self, running: torch.Tensor) -> torch.Tensor:
        """coef x the model's load-balancing loss of the micro-batch, from the router statistics of all MoE layers
        (summed by the stages, then over the tp and cp ranks: each rank routes its sequence piece), divided by the
        count of non-empty micro-batches (the step's mean)."""
        totals = self.tokens.sum_router_stats(RouterStats(running[0].detach(), running[1]))
        aux = load_balancing_loss([totals], self.config.text.num_experts, self.config.text.top_k)
        # an empty micro-batch (a short step split into pieces) has no statistics and is not counted
        pieces = max(1, sum(1 for mb in self.microbatches if mb.tokens))
        term = aux * (self.config.text.router_aux_loss_coef / pieces)
        self.aux_terms.append(term.detach())
        return term

    def _logprobs(self, hidden: torch.Tensor, mb: PaddedMicroBatch) -> torch.Tensor:
        """Per-token log-probability of the label [1, T / cp] over this rank's context shard (0 on unlabelled
        rows); the head runs on labelled rows (on its local vocabulary shard with the tp group under tp)."""
        labels = self.tokens.cp_shard(mb.labels, 0)
        rows = torch.nonzero(labels != IGNORE_INDEX).flatten()
        logprobs, _ = fused_linear_logprobs(hidden[rows], _local(self.lm_head.weight), labels[rows],
                                            ignore_index=IGNORE_INDEX, return_entropy=False,
                                            process_group=self.tokens.tp_group)
        return logprobs.new_zeros(1, hidden.shape[0]).index_copy(1, rows, logprobs[None])


def _activation_metas(plan: StagePlan, seq_len: int, config: Qwen3VLConfig, dtype: torch.dtype, input_len: int
                      ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(inputs, outputs) of a stage as meta tensors: the static shapes that spare the schedule a trial forward.
    ``seq_len``: the tokens of the activations (a context shard), ``input_len``: of the first stage's input ids.
    Between stages: hidden [1, seq_len, H], pending DeepStack taps [1, k, seq_len, H] (while k > 0), the running
    router statistics [1, 2, E] in fp32 (MoE models)."""
    hidden_size = config.text.hidden_size

    def activation(pending: int) -> tuple[torch.Tensor, ...]:
        tensors = [torch.empty(1, seq_len, hidden_size, dtype=dtype, device="meta", requires_grad=True)]
        if pending:
            tensors.append(torch.empty(1, pending, seq_len, hidden_size, dtype=dtype, device="meta",
                                       requires_grad=True))
        if plan.moe:
            tensors.append(torch.empty(1, 2, config.text.num_experts, device="meta", requires_grad=True))
        return tuple(tensors)

    inputs = ((torch.empty(1, input_len, dtype=torch.int64, device="meta"),) if plan.is_first
              else activation(plan.pending_in))
    outputs = ((torch.empty(1, seq_len, dtype=torch.float32, device="meta"),) if plan.is_last
               else activation(plan.pending_out))
    return inputs, outputs


def _batched(x: torch.Tensor) -> torch.Tensor:
    """``x[None]`` as a tensor of its own: FSDP2 warns when a module returns a view (an in-place op on it would
    skip its backward hook)."""
    return x[None].clone()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _distributed_like(full: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like ``current`` (a DTensor parameter of TP / FSDP: this rank's shard, cut locally
    since every rank holds the full tensor)."""
    if not isinstance(current, DTensor):
        return full
    return distribute_tensor(full.to(current.device), current.device_mesh, current.placements, src_data_rank=None)


# --------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------
class Pipeline:
    """The stages one pp rank runs, their schedule, and the full-model view of their parameters."""

    def __init__(self, config: Qwen3VLConfig, plans: list[StagePlan], pp_mesh, *, schedule: str,
                 n_microbatches: int, seq_len: int, device, activation_dtype: torch.dtype, pad_token_id: int):
        self.config, self.n_microbatches, self.seq_len = config, n_microbatches, seq_len
        self.activation_dtype = activation_dtype
        # FSDP averages gradients over this many data-parallel ranks (set by parallelize_pipeline); step scales
        # its backward loss by it.
        self.data_parallel_ranks = 1
        self.device = torch.device(device)
        self.pad_token_id = pad_token_id
        self.pp_group, self.pp_size = pp_mesh.get_group(), pp_mesh.size()
        pp_rank = pp_mesh.get_local_rank()
        self.plans = [plan for plan in plans if plan.rank == pp_rank]
        with torch.device("meta"):
            full = Qwen3VLModel(config)
        self.stage_modules = [PipelineStageModule(plan, full) for plan in self.plans]
        self._tie_local_stages()
        self.tokens = DecoderTokenLayout(None, None)  # shard_tokens: context shards and tp sequence pieces
        self.schedule_name = schedule
        self._schedule = None  # built by the first step, once the token layout (the shapes exchanged) is final
        self._loss_scale = 1.0
        self.last_aux: torch.Tensor | None = None  # see step()

        # Tied head and embedding on two ranks: each holds a copy, the pair exchanges values and gradients.
        first, last = plans[0], plans[-1]
        self._tied_is_source = pp_rank == first.rank
        self._tied_peer = None
        if config.tie_word_embeddings and first.rank != last.rank and pp_rank in (first.rank, last.rank):
            self._tied_peer = dist.get_global_rank(self.pp_group, last.rank if self._tied_is_source else first.rank)

    def shard_tokens(self, cp_group, tp_mesh) -> None:
        """Run the decoder on context shards over ``cp_group`` and tp sequence pieces over ``tp_mesh`` (either may be
        None; see the module docstring). Called by ``parallelize_pipeline`` before the first step."""
        if self._schedule is not None:
            raise RuntimeError("Pipeline.shard_tokens: call it before the first step (the schedule's buffers have "
                               "the shapes of the current layout)")
        tokens = DecoderTokenLayout(cp_group, tp_mesh)
        tokens.check_length(self.seq_len, "parallelize_pipeline: the pipeline's seq_len")
        self.tokens = tokens
        for module in self.stage_modules:
            module.tokens = tokens
        if cp_group is not None:
            self.set_attention_fn(make_cp_attention_fn(cp_group))

    def _build_schedule(self):
        """The schedule over this rank's stages; each exchanges [1, seq_len / cp, ...] activations."""
        local_len = self.seq_len // self.tokens.cp_size
        stages = []
        for plan, module in zip(self.plans, self.stage_modules):
            inputs, outputs = _activation_metas(plan, local_len, self.config, self.activation_dtype,
                                                input_len=self.seq_len)
            stages.append(PipelineStage(module, plan.index, plan.num_stages, self.device, input_args=inputs,
                                        output_args=outputs, group=self.pp_group))
        # The loss is already divided by the step's token count: no further scaling by the micro-batch count.
        interleaved = self.schedule_name == "Interleaved1F1B"
        return SCHEDULES[self.schedule_name](stages if interleaved else stages[0], self.n_microbatches,
                                             loss_fn=self._loss, scale_grads=False)

    # ----------------------------------------------------------------------------------------------------------
    @property
    def has_first_stage(self) -> bool:
        return self.plans[0].is_first

    @property
    def has_last_stage(self) -> bool:
        return self.plans[-1].is_last

    def _tie_local_stages(self) -> None:
        """Tied weights whose first and last stages both run here share one Parameter."""
        if self.config.tie_word_embeddings and self.has_first_stage and self.has_last_stage:
            self.stage_modules[-1].lm_head.weight = self.stage_modules[0].language_model.embed_tokens.weight

    @property
    def _tied_param(self) -> nn.Parameter | None:
        """This rank's copy of a tied weight shared with another rank (looked up now: ``to_empty`` and
        ``load_state_dict`` may replace the Parameter objects)."""
        if self._tied_peer is None:
            return None
        if self._tied_is_source:
            return self.stage_modules[0].language_model.embed_tokens.weight
        return self.stage_modules[-1].lm_head.weight

    def named_parameters(self):
        """(full-model name, parameter) of every parameter on this rank, each shared Parameter once."""
        seen = set()
        for module in self.stage_modules:
            for name, param in module.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield name, param

    def parameters(self):
        return (param for _, param in self.named_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's part of the full model's state dict: the same keys, disjoint between pp ranks, together
        all of them (a tied head is listed as ``lm_head.weight`` by the last stage, as the full model does)."""
        state = {}
        for module in self.stage_modules:
            state.update(module.state_dict())
        return state

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy this rank's parameters from a full model's state dict (plain full tensors; DTensor parameters of
        TP / FSDP get their shards)."""
        for module in self.stage_modules:
            if any(p.is_meta for p in module.parameters()):
                module.to_empty(device=self.device)
            current = module.state_dict()
            module.load_state_dict({name: _distributed_like(state[name], value) for name, value in current.items()},
                                   strict=True)
        self._tie_local_stages()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Materialise the stages on the device and initialise them as the model does; the last stage's tied
        head is then copied from stage 0 so both copies start equal."""
        for module in self.stage_modules:
            module.to_empty(device=self.device)
        self._tie_local_stages()
        for module in self.stage_modules:
            module.tie_weights()
            init_module_weights(module, std)  # the model's own initialisation rules
        if self._tied_peer is not None:
            weight = _local(self._tied_param)
            if self._tied_is_source:
                dist.send(weight.contiguous(), self._tied_peer, group=self.pp_group)
            else:
                dist.recv(weight, self._tied_peer, group=self.pp_group)

    @torch.no_grad()
    def greedy_tokens(self, batch: dict) -> torch.Tensor:
        """The argmax token [T] at every labelled position of one packed batch (at most ``seq_len`` tokens), -1
        elsewhere, on every pp rank: the held-out evaluation. One forward through the stages in stage order, the
        activations sent point to point to the rank of the next stage (no schedule, no backward), each rank holding
        its stages' weights only; the last stage's tokens gathered over cp and broadcast over pp. Collective over
        the pp (and cp / tp) groups."""
        mb = pad_microbatch(batch, self.config, self.seq_len, self.device, self.pad_token_id)
        local_len = self.seq_len // self.tokens.cp_size
        predicted = None
        for module in self.stage_modules:
            module.microbatches, module.predicting = [mb], True
        try:
            outputs: tuple[torch.Tensor, ...] = ()
            for plan, module in zip(self.plans, self.stage_modules):
                inputs, _ = _activation_metas(plan, local_len, self.config, self.activation_dtype,
                                              input_len=self.seq_len)
                previous = (plan.index - 1) % self.pp_size
                if plan.is_first:
                    inputs = (mb.input_ids[None],)
                elif previous == plan.rank:  # the previous stage ran on this rank (pp = 1 with several stages)
                    inputs = outputs
                else:
                    inputs = tuple(torch.empty(x.shape, dtype=x.dtype, device=self.device) for x in inputs)
                    for x in inputs:
                        dist.recv(x, group=self.pp_group, group_src=previous)
                out = module(*inputs, microbatch=torch.zeros(1, dtype=torch.int64))
                outputs = out if isinstance(out, tuple) else (out,)
                following = (plan.index + 1) % self.pp_size
                if plan.is_last:
                    predicted = self.tokens.gather_cp(outputs[0])
                elif following != plan.rank:
                    for x in outputs:
                        dist.send(x.contiguous(), group=self.pp_group, group_dst=following)
        finally:
            for module in self.stage_modules:
                module.microbatches, module.predicting = [], False
                reshard_all(module)
        if predicted is None:
            predicted = torch.empty(self.seq_len, dtype=torch.int64, device=self.device)
        last_stage = self.plans[0].num_stages - 1
        dist.broadcast(predicted, group=self.pp_group, group_src=last_stage % self.pp_size)
        return predicted[:batch["input_ids"].shape[0]]

    def set_attention_fn(self, fn) -> None:
        """Install ``fn(q, k, v, cu_seqlens, info)`` in every decoder layer of this rank's stages."""
        for module in self.stage_modules:
            for sub in module.modules():
                if isinstance(sub, TextAttention):
                    sub.attention_fn = fn

    # ----------------------------------------------------------------------------------------------------------
    def _loss(self, logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return -(logprobs * (labels != IGNORE_INDEX)).sum() * self._loss_scale

    @torch.no_grad()
    def _reduce_tied_grads(self) -> None:
        """Both copies of the tied weight get the sum of the embedding's and the head's gradients."""
        param = self._tied_param
        if param is None:
            return
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        if isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
            # the vocabulary-parallel embedding's gradient comes back replicated: keep this rank's shard of it
            param.grad = param.grad.redistribute(param.device_mesh, param.placements)
        mine = _local(param.grad)
        theirs = torch.empty_like(mine)
        ops = [dist.P2POp(dist.isend, mine.contiguous(), self._tied_peer, self.pp_group),
               dist.P2POp(dist.irecv, theirs, self._tied_peer, self.pp_group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        mine.add_(theirs)

    def step(self, microbatches: list[dict], *, global_tokens: int | None = None) -> torch.Tensor | None:
        """Forward and backward of ``n_microbatches`` packed batches (every pp rank passes the same list; only the
        first stage reads pixel_values). Gradients accumulate into the stage parameters' ``.grad``. Returns the
        step's loss, sum over label tokens of -log p / N, on the rank holding the last stage (None elsewhere).
        N = the step's label tokens, or ``global_tokens`` (the label tokens summed over the data-parallel ranks;
        then the returned loss is this rank's share and the backward loss is multiplied by
        ``data_parallel_ranks``, whose gradients FSDP averages). Under cp each rank scores its context shard's
        labels: the returned loss is the shard's share, to be summed over the cp (and data-parallel) ranks.
        ``last_aux`` then holds the step's MoE aux term (coef x the mean aux loss of the micro-batches; 0 for dense
        models) on the last stage's ranks, None elsewhere."""
        if not isinstance(microbatches, (list, tuple)) or len(microbatches) != self.n_microbatches:
            got = (f"{len(microbatches)} of them" if isinstance(microbatches, (list, tuple))
                   else type(microbatches).__name__)
            raise ValueError(f"Pipeline.step: 'microbatches' must be a list of {self.n_microbatches} packed batches, "
                             f"got {got}")
        padded = [pad_microbatch(batch, self.config, self.seq_len, self.device, self.pad_token_id)
                  for batch in microbatches]
        tokens = sum(mb.label_rows.shape[0] for mb in padded) if global_tokens is None else global_tokens
        self._loss_scale = self.data_parallel_ranks / max(int(tokens), 1)
        for module in self.stage_modules:
            module.microbatches, module.aux_terms = padded, []
        args = (torch.stack([mb.input_ids for mb in padded]),) if self.has_first_stage else ()
        target = (torch.stack([self.tokens.cp_shard(mb.labels, 0) for mb in padded]) if self.has_last_stage
                  else None)
        losses = [] if self.has_last_stage else None
        if self._schedule is None:
            self._schedule = self._build_schedule()
        try:
            # The index stays on the host: each stage reads it with int() and must not wait on the device.
            self._schedule.step(*args, target=target, losses=losses, microbatch=torch.arange(self.n_microbatches))
        finally:
            for module in self.stage_modules:
                module.microbatches = []
        self._reduce_tied_grads()
        if not self.has_last_stage:
            self.last_aux = None
            return None
        terms = [term for module in self.stage_modules for term in module.aux_terms]
        self.last_aux = torch.stack(terms).sum() if terms else torch.zeros((), device=self.device)
        return torch.stack(losses).sum().detach() / self.data_parallel_ranks


def local_stage_links_work(pp_mesh) -> bool:
    """Whether neighbouring stages on the same rank can exchange tensors: torch before 2.13 opens a point-to-point
    link between them at the first step even on one rank, and gloo has no link from a rank to itself."""
    return torch.__version__ >= "2.13" or dist.get_backend(pp_mesh.get_group()) != "gloo"


def build_pipeline(model_config: Qwen3VLConfig, pp_mesh, *, schedule: str = "1F1B", n_microbatches: int,
                   seq_len: int, device, virtual_stages: int = 1, layers_per_stage=None,
                   activation_dtype: torch.dtype = torch.float32, pad_token_id: int = 0,
                   materialize: bool = True) -> Pipeline:
    """The pipeline of ``model_config`` over the 1-D ``pp_mesh`` (``mesh["pp"]`` of ParallelDims).

    schedule: "GPipe", "1F1B" (one stage per rank) or "Interleaved1F1B" (``virtual_stages`` per rank).
    seq_len: every micro-batch is padded to this many tokens (see the module docstring).
    materialize: False keeps the stages on the meta device for TP/FSDP; then call ``init_weights`` (or
    ``load_full_state_dict``) yourself."""
    pp_size = pp_mesh.size()
    check_schedule(schedule, n_microbatches, pp_size, virtual_stages)
    if pp_size == 1 and virtual_stages > 1 and not local_stage_links_work(pp_mesh):
        raise ValueError(f"pipeline: virtual_stages={virtual_stages} on a 1-rank pipeline needs torch >= 2.13 with "
                         f"gloo: torch {torch.__version__} links neighbouring stages point to point even on one "
                         f"rank (a send to itself, which gloo cannot make); use pp >= 2, NCCL or a newer torch")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"pipeline: 'seq_len' must be an int >= 1, got {seq_len!r}")
    if not (0 <= pad_token_id < model_config.text.vocab_size) or pad_token_id == model_config.image_token_id:
        raise ValueError(f"pipeline: 'pad_token_id' must be a text token id in [0, {model_config.text.vocab_size}) "
                         f"other than image_token_id {model_config.image_token_id}, got {pad_token_id}")
    plans = plan_stages(model_config, pp_size, virtual_stages, layers_per_stage)
    pipeline = Pipeline(model_config, plans, pp_mesh, schedule=schedule, n_microbatches=n_microbatches,
                        seq_len=seq_len, device=device, activation_dtype=activation_dtype,
                        pad_token_id=pad_token_id)
    if materialize:
        pipeline.init_weights()
    return pipeline
