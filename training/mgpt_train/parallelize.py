"""Apply tensor, context, expert and (hybrid-)sharded data parallelism to a ``Qwen3VLModel``, on torch.distributed
only (DTensor plans, plain collectives, FSDP2), in torchtitan's order -- see ``parallelize_qwen3_vl``, whose
docstring is THE place that documents the order; ``parallelize_pipeline`` composes pipeline stages (step 0)
with TP, activation checkpointing and FSDP2 / HSDP.

Where the tokens live (T = packed tokens of one micro-batch, the batch layout of the train interfaces):
    * every rank runs the embedding on the WHOLE packed sequence and computes the MRoPE positions of all T tokens
      (they depend on the images and sample boundaries, not on the shard); the cp x tp ranks sharing the
      micro-batch split its images for the vision tower and all-gather the image features
      (``mgpt_train.parallel.split_vision``);
    * a forward pre-hook on ``model.language_model`` (the decoder) then keeps this rank's tokens:
      context parallelism (cp) keeps the load-balanced ``shard_sequence`` shard (chunks r and 2cp-1-r of 2cp),
      and sequence parallelism (tp) splits that shard into tp contiguous pieces for the norms and residuals;
      attention and dense MLPs all-gather the tp pieces (DTensor plans), MoE blocks route the piece itself,
      and attention all-gathers K/V over cp (``make_cp_attention_fn``); DeepStack features become dense [T, H]
      additions sharded the same way;
    * a forward hook gathers the final hidden states over tp (the head needs every token of the cp shard on
      every tp rank) and sums the MoE router statistics over tp and cp, so the load-balancing loss is the one of
      the whole sequence;
    * ``model.forward`` is replaced (an instance attribute; names and the state dict do not change) by one that
      keeps this rank's labels and runs ``fused_linear_logprobs`` on the local vocabulary shard of the head with
      the tp group (vocabulary parallelism), returning sums instead of a mean:
          {"loss_sum": -sum log p over this rank's label tokens, "n_tokens": their count, "aux_loss",
           "aux_term": router_aux_loss_coef * aux_loss (0 for dense), "loss": loss_sum / n_tokens + aux_term}
      ``model.greedy_tokens`` (the evaluation) is replaced likewise: the argmax over the vocabulary-parallel head at
      this rank's labelled rows, gathered over cp. ``model.logits`` (tests) is not parallelized: call it on an
      unparallelized model.
Packed lengths must be divisible by 2*cp and T/cp by tp: pad with ``pad_packed_batch`` (a separate sample of
label -100 tokens) or get a ValueError naming the sizes.

Loss normalisation (``mgpt_train.objective.StepLoss``): FSDP2 AVERAGES gradients over the dp_replicate x dp_shard x
cp ranks (N of them), so each rank backpropagates loss_sum_local * N / global_tokens + aux_term (per micro-batch,
aux_term divided by the micro-batches of the step) and the average of the N gradients is the gradient of the
single-process objective (tp ranks hold identical losses and are not averaged). Expert parameters under EP receive
the sum over their ep group's tokens already (the all-to-all backward), so their FSDP reduction divides by N as well
(not by its own N/ep ranks). Under tp, the MoE parameters and the vision tower get from each tp rank the gradient of
its own tokens / images only: their FSDP reduction also SUMS over the tp ranks and still divides by N.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from mgpt_ops import fused_linear_logprobs
from mgpt_train.model.moe import RouterStats, SparseMoeBlock
from mgpt_train.model.qwen3_vl import IGNORE_INDEX, Qwen3VLModel, greedy_at_labels
from mgpt_train.parallel import (expert_parallel_moe, make_cp_attention_fn, shard_experts, shard_sequence,
                                 split_vision, unshard_sequence)
from mgpt_train.parallel.expert_parallel import expert_parallel_blocks
from mgpt_train.parallel_dims import MESH_DIMS, ParallelDims, ParallelMesh

if TYPE_CHECKING:
    from mgpt_train.pipeline import Pipeline, PipelineStageModule

# No input casting: the model casts where it needs to (patch embedding, embeddings' dtype downstream), and the
# vision attention kernel takes its rotary tables in fp32.
_MIXED_PRECISION = {"bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                 cast_forward_inputs=False),
                    "fp32": MixedPrecisionPolicy(cast_forward_inputs=False)}


def parallelize_qwen3_vl(model: Qwen3VLModel, parallel_dims: ParallelDims, mesh: ParallelMesh, *,
                         mixed_precision: str = "bf16", activation_checkpointing: bool = False) -> Qwen3VLModel:
    """Parallelize ``model`` in place for ``parallel_dims`` on ``mesh`` (``parallel_dims.build_mesh(...)``) and
    return it. Every rank calls it with the same (identically initialised) model. Order (torchtitan's):

        0. PP: with pp > 1 the model is split into pipeline stages FIRST (``build_pipeline(..., materialize=False)``)
           and ``parallelize_pipeline`` applies steps 1 to 5 to every stage module. This function takes the whole
           model: pp must be 1.
        1. TP + sequence parallel (mesh "tp"): q/k/v/gate/up colwise, o/down rowwise with sequence-sharded
           outputs, RMSNorms sequence-parallel (q_norm/k_norm shard over heads), embedding rowwise (vocabulary),
           the head's weight sharded by vocabulary rows for ``fused_linear_logprobs(process_group=tp)``. MoE blocks
           run on this rank's sequence piece: each tp rank routes and computes T / (cp tp) tokens (experts split
           by ep, parameters summed over tp by step 5), so no MoE work is repeated over tp. The vision tower is
           split by images over the cp x tp ranks of the micro-batch (``split_vision``; its parameters summed
           over tp by step 5), so no vision work is repeated either.
        2. CP (mesh "cp"): ``make_cp_attention_fn`` installed in every decoder layer, the decoder's input /
           output hooks and the loss forward (module docstring).
        3. EP (ep consecutive ranks of "dp_shard_cp", the groups of ``expert_parallel_group``): every MoE layer
           keeps E/ep experts (``shard_experts``; DTensors sharded over the experts dim, so names and global shapes
           do not change) and routes tokens with ``expert_parallel_moe`` (the function of ``ExpertParallelMoE``).
        4. Activation checkpointing of every decoder layer and vision block (``activation_checkpointing``).
        5. FSDP2 over "dp_shard_cp" (HSDP over ("dp_replicate", "dp_shard_cp") when dp_replicate > 1; the mesh
           ``mesh.fsdp``): one ``fully_shard`` per vision block and decoder layer, then the root (the model, or
           each pipeline stage module). Parameters whose replicas see different tokens first get their own
           ``fully_shard`` (``apply_fsdp``, also with tp alone): the experts over the ranks holding the same
           experts and their tp ranks (dp_replicate x dp_shard_cp x tp / ep), the routers and the vision tower
           under tp over dp_replicate x dp_shard_cp x tp; those sum over their ranks and divide by N only (module
           docstring). ``mixed_precision``: "bf16" (bf16 parameters in compute, fp32 gradient reduction) or
           "fp32".
           A batch (pipeline micro-batch) without images then runs the vision tower idle (``idle_vision``), so
           every data rank issues the same FSDP collectives.
    """
    _check_arguments("parallelize_qwen3_vl", parallel_dims, mesh, mixed_precision)
    if parallel_dims.pp > 1:
        raise ValueError(f"parallelize_qwen3_vl: pp={parallel_dims.pp} needs the pipeline stages: build them with "
                         f"build_pipeline(..., materialize=False), then call parallelize_pipeline (docstring, step 0)")
    text = model.config.text
    parallel_dims.check_model(num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
                              num_experts=text.num_experts if model.config.is_moe else None)

    tp_mesh = mesh["tp"] if parallel_dims.tp > 1 else None
    cp_group = mesh["cp"].get_group() if parallel_dims.cp > 1 else None
    tokens = DecoderTokenLayout(cp_group, tp_mesh)
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh)
    if cp_group is not None:
        model.set_attention_fn(make_cp_attention_fn(cp_group))
    if tokens.sharded:
        model.language_model.register_forward_pre_hook(tokens.shard_decoder_inputs)
        model.language_model.register_forward_hook(tokens.gather_decoder_outputs)
        split_vision(model.visual, mesh["cp_tp"].get_group(), replicas=parallel_dims.tp)
    n_ranks = parallel_dims.dp_replicate * parallel_dims.dp_shard * parallel_dims.cp
    model.forward = _sharded_loss_forward(model, tokens, vision_every_batch=n_ranks > 1)
    model.greedy_tokens = _sharded_greedy_tokens(model, tokens)
    meshes = replica_meshes(mesh, parallel_dims, model.config.is_moe)
    if parallel_dims.ep > 1:
        apply_expert_parallel(model, meshes.ep)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, mesh, meshes, mixed_precision, n_ranks)
    return model


def parallelize_pipeline(pipe: Pipeline, parallel_dims: ParallelDims, mesh: ParallelMesh, *,
                         mixed_precision: str = "bf16", activation_checkpointing: bool = False) -> Pipeline:
    """Parallelize ``pipe`` in place and return it: the token layout of steps 1 and 2 of ``parallelize_qwen3_vl``
    (``Pipeline.shard_tokens``), then steps 1, 3, 4 and 5 on every stage module, in that order; then load the
    weights with ``pipe.load_full_state_dict`` (or ``pipe.init_weights``).
    ``pipe`` = ``build_pipeline(config, mesh["pp"], ..., materialize=False)`` on every rank, with
    ``activation_dtype=torch.bfloat16`` under bf16 mixed precision (the dtype that flows between stages).

    Token layout (``Pipeline.shard_tokens``, detailed in mgpt_train.pipeline): under cp the first stage keeps
    this rank's load-balanced context shard, stages exchange [1, seq_len / cp, ...] shards and attention
    all-gathers K/V over cp (``make_cp_attention_fn``); under tp the decoder runs on this rank's sequence piece
    of the shard (``sequence_piece``: the tp split of the stage's input and of each DeepStack tap) and the
    stage's output is gathered back (``whole_sequence``); the last stage computes the log-probabilities of the
    shard's labels with the vocabulary-parallel head (``fused_linear_logprobs(process_group=tp)``). seq_len
    must be divisible by 2*cp and seq_len / cp by tp. Under FSDP the first stage runs the vision tower on every
    micro-batch (a blank image block, times 0, when it has none), so every data rank runs the same collectives.
    Loss: FSDP averages gradients over the N = dp_replicate x dp_shard x cp ranks, so ``Pipeline.step``
    multiplies its backward loss by N (``pipe.data_parallel_ranks``); pass the label tokens of all data ranks'
    micro-batches as ``global_tokens`` and sum the returned losses over the N ranks (``Trainer._pipeline_step``).
    Gradient clipping: ``clip_gradients`` of mgpt_train.train sums the squared norms of the DTensor gradients per
    mesh, then over the pp ranks. MoE: the aux loss is the pipeline's (``mgpt_train.pipeline``) with the router
    statistics summed over cp, averaged over the data ranks by FSDP."""
    _check_arguments("parallelize_pipeline", parallel_dims, mesh, mixed_precision)
    if parallel_dims.pp == 1:
        raise ValueError("parallelize_pipeline: needs pp > 1 (pp=1: use parallelize_qwen3_vl)")
    if pipe.pp_size != parallel_dims.pp:
        raise ValueError(f"parallelize_pipeline: 'pipe' runs over {pipe.pp_size} pp ranks but parallel_dims say "
                         f"pp={parallel_dims.pp}; build it over mesh['pp']")
    text = pipe.config.text
    parallel_dims.check_model(num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
                              num_experts=text.num_experts if pipe.config.is_moe else None)
    fsdp_ranks = parallel_dims.dp_replicate * parallel_dims.dp_shard * parallel_dims.cp
    if fsdp_ranks > 1 and mixed_precision == "bf16" and pipe.activation_dtype != torch.bfloat16:
        raise ValueError(f"parallelize_pipeline: bf16 mixed precision sends bf16 activations between stages; build "
                         f"the pipeline with activation_dtype=torch.bfloat16, got {pipe.activation_dtype}")
    tp_mesh = mesh["tp"] if parallel_dims.tp > 1 else None
    pipe.shard_tokens(mesh["cp"].get_group() if parallel_dims.cp > 1 else None, tp_mesh)  # checks seq_len
    meshes = replica_meshes(mesh, parallel_dims, pipe.config.is_moe)
    for module in pipe.stage_modules:
        if tp_mesh is not None:
            apply_tensor_parallel(module, tp_mesh)
        if hasattr(module, "visual") and pipe.tokens.sharded:
            split_vision(module.visual, mesh["cp_tp"].get_group(), replicas=parallel_dims.tp)
        if parallel_dims.ep > 1:
            apply_expert_parallel(module, meshes.ep)
        if activation_checkpointing:
            apply_activation_checkpointing(module)
        apply_fsdp(module, mesh, meshes, mixed_precision, fsdp_ranks)
        module.vision_every_microbatch = fsdp_ranks > 1  # same FSDP collectives on every data rank
    pipe.data_parallel_ranks = fsdp_ranks
    return pipe


def _check_arguments(caller: str, parallel_dims: ParallelDims, mesh: ParallelMesh, mixed_precision: str) -> None:
    if mixed_precision not in _MIXED_PRECISION:
        raise ValueError(f"{caller}: 'mixed_precision' must be one of {sorted(_MIXED_PRECISION)}, got "
                         f"{mixed_precision!r}")
    if not isinstance(mesh, ParallelMesh):
        raise ValueError(f"{caller}: 'mesh' must be the ParallelMesh of ParallelDims.build_mesh, got "
                         f"{type(mesh).__name__}")
    if tuple(mesh.mesh.shape) != parallel_dims.sizes:
        raise ValueError(f"{caller}: 'mesh' has shape {tuple(mesh.mesh.shape)} but parallel_dims say "
                         f"{parallel_dims.sizes}")


def sequence_piece(x: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
    """[T, ...] identical on the tp ranks -> this rank's contiguous [T/tp, ...] piece (sequence parallelism). A
    DTensor redistribution, so that its backward all-gathers the gradient: every tp rank then holds the complete
    gradient of what came before (embeddings, vision tower, the previous pipeline stage)."""
    replicated = DTensor.from_local(x, tp_mesh, [Replicate()], run_check=False)
    return replicated.redistribute(tp_mesh, [Shard(0)]).to_local()


def whole_sequence(x: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
    """This rank's sequence piece (a local tensor, or the Shard(0) DTensor of a sequence-parallel norm) -> the
    whole [T, ...] on every tp rank. Its backward is a local slice: what follows (the vocabulary-parallel loss, the
    next pipeline stage's ``sequence_piece``) hands every tp rank the same complete gradient."""
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, tp_mesh, [Shard(0)], run_check=False)
    return x.redistribute(tp_mesh, [Replicate()]).to_local()


# --------------------------------------------------------------------------------------------------------
# Token layout of the decoder (context + sequence parallelism) and the loss
# --------------------------------------------------------------------------------------------------------
class DecoderTokenLayout:
    """Which tokens of the packed sequence this rank's decoder holds (see the module docstring)."""

    def __init__(self, cp_group, tp_mesh: DeviceMesh | None):
        self.cp_group, self.tp_mesh = cp_group, tp_mesh
        self.cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
        self.cp_rank = dist.get_rank(cp_group) if cp_group is not None else 0
        self.tp_size = tp_mesh.size() if tp_mesh is not None else 1
        self.tp_group = tp_mesh.get_group() if tp_mesh is not None else None

    @property
    def sharded(self) -> bool:
        return self.cp_size > 1 or self.tp_size > 1

    def check_length(self, seq_len: int, what: str = "parallelize_qwen3_vl: packed sequence length") -> None:
        if seq_len % (2 * self.cp_size) or (seq_len // self.cp_size) % self.tp_size:
            raise ValueError(f"{what} {seq_len} must be divisible by 2*cp = {2 * self.cp_size} and by cp*tp = "
                             f"{self.cp_size * self.tp_size} (load-balanced context chunks, then tp sequence pieces); "
                             f"pad it with pad_packed_batch")

    def cp_shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.cp_size == 1 else shard_sequence(x, dim, self.cp_rank, self.cp_size)

    def decoder_shard(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] identical on the cp x tp ranks -> this rank's residual-stream rows (``sequence_piece``)."""
        x = self.cp_shard(x, 0)
        return x if self.tp_mesh is None else sequence_piece(x, self.tp_mesh)

    def gather_cp(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's context shard [T / cp, ...] -> the whole [T, ...] on every cp rank (no autograd)."""
        if self.cp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.cp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.cp_group)
        return unshard_sequence(parts, 0)

    def row_mask_shard(self, row_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The padding row mask [T] -> this rank's rows of it (those of ``decoder_shard``; no autograd)."""
        if row_mask is None:
            return None
        row_mask = self.cp_shard(row_mask, 0)
        return row_mask if self.tp_mesh is None else row_mask.chunk(self.tp_size)[self.tp_mesh.get_local_rank()]

    def shard_decoder_inputs(self, _module, args):
        """Forward pre-hook of ``TextModel``: (embeds [T,H], position_ids [3,T], cu_seqlens, info, visual_rows,
        deepstack, row_mask) -> this rank's rows. ``cu_seqlens`` stays global (context-parallel attention reads
        it); the MRoPE positions keep the whole cp shard (tp ranks rotate the all-gathered q/k). DeepStack features
        turn into dense [T, H] additions sharded like the embeddings; the decoder then adds them at every local
        row. The padding row mask follows the rows."""
        embeds, position_ids, cu_seqlens, info, visual_rows, deepstack, row_mask = args
        self.check_length(embeds.shape[0])
        local_embeds = self.decoder_shard(embeds)
        local_deepstack = [self.decoder_shard(torch.zeros_like(embeds).index_add(0, visual_rows, f.to(embeds.dtype)))
                           for f in deepstack]
        local_rows = torch.arange(local_embeds.shape[0], device=embeds.device)
        return (local_embeds, self.cp_shard(position_ids, 1), cu_seqlens, info, local_rows, local_deepstack,
                self.row_mask_shard(row_mask))

    def gather_decoder_outputs(self, _module, _args, output):
        """Forward hook of ``TextModel``: hidden states of the whole cp shard on every tp rank, router statistics
        summed over the cp ranks (the load-balancing loss of the whole sequence)."""
        hidden, router_stats = output
        if isinstance(hidden, DTensor):  # the tp-sequence-parallel final norm
            hidden = whole_sequence(hidden, self.tp_mesh)
        return hidden, [self.sum_router_stats(stats) for stats in router_stats]

    def sum_router_stats(self, stats: RouterStats) -> RouterStats:
        """One MoE layer's router statistics of the whole sequence, from those of this rank's piece: summed over
        the tp ranks (MoE blocks route sequence pieces), then over the cp ranks.

        Gradients: every rank's aux loss depends on every rank's router probabilities. Over cp the backward sums
        the ranks' gradients (FSDP then averages over the cp ranks, as over data ranks). Over tp the backward is
        the identity: each tp rank keeps d aux / d(its own probabilities), and the MoE FSDP step sums the tp
        ranks' parameter gradients, which also completes the cross-entropy part (each rank's tokens)."""
        counts, prob_sum = stats.counts, stats.prob_sum
        if self.tp_size > 1:
            counts, prob_sum = counts.clone(), _SumForward.apply(prob_sum, self.tp_group)
            dist.all_reduce(counts, group=self.tp_group)
        if self.cp_size > 1:
            counts, prob_sum = counts.clone(), _SumOverGroup.apply(prob_sum, self.cp_group)
            dist.all_reduce(counts, group=self.cp_group)
        return RouterStats(counts, prob_sum)


class _SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) with autograd: y = sum_r x_r on every rank, so dL/dx_r = sum over ranks of dL_r/dy (torch's
    ``torch.distributed.nn.functional.all_reduce``, deprecated since 2.13, does the same)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumForward(torch.autograd.Function):
    """all_reduce(SUM) in the forward pass, identity in the backward pass (see ``sum_router_stats``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def idle_vision(model: Qwen3VLModel | PipelineStageModule) -> torch.Tensor:
    """0 x the vision tower's outputs on one blank merge block, for a batch without images under FSDP: every data
    rank must run the same collectives in the same order (the vision blocks' all-gathers before the decoder's,
    their gradient reduce-scatters) whether or not its batch holds images. Run it where the vision tower would
    run. The vision parameters get zero gradients from it (a step without any image on any rank therefore
    gives them zeros rather than no gradient)."""
    vision = model.config.vision
    merge = vision.spatial_merge_size
    pixels = torch.zeros(merge * merge, vision.patch_dim, device=next(model.visual.parameters()).device)
    embeds, deepstack = model.visual(pixels, torch.tensor([[1, merge, merge]]))
    return 0.0 * sum(x.float().sum() for x in (embeds, *deepstack))


def _sharded_loss_forward(model: Qwen3VLModel, tokens: DecoderTokenLayout, vision_every_batch: bool):
    """The replacement of ``model.forward``: the model's hidden states (sharded by the hooks), this rank's labels,
    and the head's local vocabulary shard with the tp group. Returns sums for ``mgpt_train.objective.StepLoss``.
    ``vision_every_batch`` (FSDP): ``idle_vision`` for a batch without images."""

    def forward(batch: dict) -> dict[str, torch.Tensor]:
        pixels = batch.get("pixel_values")
        idle = idle_vision(model) if vision_every_batch and (pixels is None or not pixels.shape[0]) else None
        hidden, aux = model.hidden_states(batch)
        labels = tokens.cp_shard(batch["labels"], 0)
        rows = torch.nonzero(labels != IGNORE_INDEX).flatten()
        weight = model.lm_head.weight
        weight = weight.to_local() if isinstance(weight, DTensor) else weight
        logprobs, _ = fused_linear_logprobs(hidden[rows], weight, labels[rows], ignore_index=IGNORE_INDEX,
                                            return_entropy=False, process_group=tokens.tp_group)
        loss_sum = -logprobs.sum() if idle is None else idle - logprobs.sum()
        aux_term = model.config.text.router_aux_loss_coef * aux if model.config.is_moe else torch.zeros_like(loss_sum)
        return {"loss_sum": loss_sum, "n_tokens": torch.tensor(rows.shape[0], device=hidden.device),
                "aux_loss": aux, "loss": loss_sum / max(rows.shape[0], 1) + aux_term, "aux_term": aux_term}

    return forward


def reshard_all(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 module under ``module`` after a forward without backward (the
    evaluation). FSDP2 keeps a root -- the model, a pipeline stage, and the tp-summed vision tower or MoE blocks,
    which are roots of their own groups -- gathered after its forward and copies ``requires_grad`` into the
    gathered parameters only when it gathers them; left so, a curriculum stage freezing the vision tower next would
    not reach them and the frozen parameters would get gradients (measured: the tp2 CLI run's grad norm 3e-4 off)."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def _sharded_greedy_tokens(model: Qwen3VLModel, tokens: DecoderTokenLayout):
    """The replacement of ``model.greedy_tokens`` (the held-out evaluation): the sharded model's hidden states,
    the argmax over the vocabulary-parallel head at this rank's labelled rows, gathered over cp -- the whole
    model is never gathered on one rank. The batch must be padded like a training batch (``pad_packed_batch``)."""

    def greedy_tokens(batch: dict) -> torch.Tensor:
        hidden, _ = model.hidden_states(batch)
        weight = model.lm_head.weight
        weight = weight.to_local() if isinstance(weight, DTensor) else weight
        local = greedy_at_labels(hidden, weight, tokens.cp_shard(batch["labels"], 0), tokens.tp_group)
        return tokens.gather_cp(local)

    return greedy_tokens


def pad_packed_batch(batch: dict, multiple: int, pad_id: int = 0) -> dict:
    """A copy of ``batch`` whose packed length is a multiple of ``multiple`` (2*cp*tp covers both rules): the
    missing tokens form one extra sample of ``pad_id`` tokens with label -100 (no loss), counted in
    ``pad_tokens`` (left out of the MoE router statistics). ``pad_id`` must not be the image token."""
    length = batch["input_ids"].shape[0]
    missing = -length % multiple
    if not missing:
        return dict(batch)
    ids, labels, cu = batch["input_ids"], batch["labels"], batch["cu_seqlens"]
    padded = dict(batch)
    padded["input_ids"] = torch.cat([ids, ids.new_full((missing,), pad_id)])
    padded["labels"] = torch.cat([labels, labels.new_full((missing,), IGNORE_INDEX)])
    padded["cu_seqlens"] = torch.cat([cu, cu.new_tensor([length + missing])])
    padded["pad_tokens"] = int(batch.get("pad_tokens", 0)) + missing
    return padded


# --------------------------------------------------------------------------------------------------------
# The individual parallelisms
# --------------------------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a ``Qwen3VLModel`` (a ModuleList) or of a pipeline stage (a ModuleDict)."""
    layers = model.language_model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def apply_tensor_parallel(model: Qwen3VLModel | PipelineStageModule, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism on the decoder (token dim 0 of the [T, H] residual stream), for
    the whole model or a pipeline stage (whatever of embedding, layers, final norm and head it holds)."""
    layer_plan = {
        "input_layernorm": SequenceParallel(sequence_dim=0),
        # (x, cos, sin, cu_seqlens, info): gather x's sequence pieces; cos/sin already cover the cp shard.
        "self_attn": PrepareModuleInput(input_layouts=(Shard(0), None, None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None, None),
                                        use_local_output=True),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        # q/k are [T, heads / tp, head_dim]: the per-head norm sees a head shard; as a "sequence" split over dim 1
        # its replicated weight gets the gradient summed over the tp ranks.
        "self_attn.q_norm": SequenceParallel(sequence_dim=1, use_local_output=True),
        "self_attn.k_norm": SequenceParallel(sequence_dim=1, use_local_output=True),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(0)),
        "post_attention_layernorm": SequenceParallel(sequence_dim=0),
    }
    dense_mlp_plan = {
        "mlp": PrepareModuleInput(input_layouts=(Shard(0),), desired_input_layouts=(Replicate(),),
                                  use_local_output=True),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(0)),
    }
    # MoE blocks run on this rank's sequence piece (tokens are routed independently): router, experts and the
    # expert-parallel all-to-all see T / (cp tp) tokens, not the gathered cp shard, so no MoE work is repeated
    # over tp. Their parameters' gradients are then partial sums over the tp ranks' pieces, which the MoE FSDP
    # step (``apply_fsdp``) adds up; the router statistics are summed over tp for the aux loss.
    moe_plan = {"mlp": PrepareModuleInput(input_layouts=(Shard(0), None), desired_input_layouts=(Shard(0), None),
                                          use_local_output=True)}  # (hidden, padding row mask: local already)
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, layer_plan | (moe_plan if isinstance(layer.mlp, SparseMoeBlock)
                                                         else dense_mlp_plan))
    text = model.language_model
    # The embedding output stays whole (image embeddings are scattered into it); the decoder hook (or the stage)
    # then takes the sequence piece.
    text_plan = {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
                 "norm": SequenceParallel(sequence_dim=0)}
    text_plan = {name: style for name, style in text_plan.items() if hasattr(text, name)}
    if text_plan:
        parallelize_module(text, tp_mesh, text_plan)
    if not hasattr(model, "lm_head"):
        return
    if model.config.tie_word_embeddings and hasattr(text, "embed_tokens"):
        model.tie_weights()  # the head shares the (now vocabulary-sharded) embedding parameter
    else:  # an untied head, or the last pipeline stage's copy of a tied one: sharded like the embedding
        head = model.lm_head.weight
        model.lm_head.weight = nn.Parameter(distribute_tensor(head.detach(), tp_mesh, [Shard(0)]),
                                            requires_grad=head.requires_grad)


@dataclass(frozen=True)
class ReplicaMeshes:
    """FSDP meshes of parameters whose replicas see different tokens -- their gradients are SUMMED over those
    ranks, not averaged (``replica_meshes``) -- and the expert-parallel groups."""

    ep: DeviceMesh | None  # the expert-parallel groups (ep > 1)
    experts: DeviceMesh | None  # expert weights (MoE, ep > 1 or tp > 1): ranks holding the same experts, x tp
    data_tp: DeviceMesh | None  # routers and the vision tower under tp: dp_shard x cp x tp (x dp_replicate)


def replica_meshes(mesh: ParallelMesh, parallel_dims: ParallelDims, moe: bool) -> ReplicaMeshes:
    """The meshes of ``ReplicaMeshes`` this layout needs (None where the decoder layers' FSDP covers the
    parameters). Collective (new process groups): build them once per run, for all pipeline stages. Each FSDP
    mesh is ("dp_replicate", "edp") for HSDP, else "edp" (of ``_replica_mesh``)."""
    ep, tp = parallel_dims.ep, parallel_dims.tp
    data_tp = _replica_mesh(mesh, 1) if tp > 1 else None
    experts = None
    if moe and (ep > 1 or tp > 1):
        experts = data_tp if ep == 1 else _replica_mesh(mesh, ep)
    return ReplicaMeshes(experts["ep"] if ep > 1 else None, _fsdp_part(experts), _fsdp_part(data_tp))


def _fsdp_part(replica_mesh: DeviceMesh | None) -> DeviceMesh | None:
    if replica_mesh is None:
        return None
    return replica_mesh["dp_replicate", "edp"] if replica_mesh.size(1) > 1 else replica_mesh["edp"]


def apply_expert_parallel(model: Qwen3VLModel | PipelineStageModule, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over the ep ranks of ``ep_mesh`` and route its tokens with
    ``expert_parallel_moe``.

    The expert parameters become DTensors sharded over the experts dim on the "ep" dim of one expert mesh, so
    names, global shapes and DCP checkpoints are those of the unparallelized model; ``GroupedExperts.forward`` is
    replaced (instance attribute) by the all-to-all routing around ``compute`` on the local shards."""
    for block in model.modules():
        if isinstance(block, SparseMoeBlock):
            experts = block.experts
            for name in ("gate_up_proj", "down_proj"):
                local = shard_experts(getattr(experts, name), ep_mesh.get_local_rank(), ep_mesh.size())
                setattr(experts, name, nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)))
            experts.forward = functools.partial(expert_parallel_moe, experts,
                                                num_experts=experts.num_experts, group=ep_mesh.get_group())


def _replica_mesh(mesh: ParallelMesh, ep: int) -> DeviceMesh:
    """Mesh ("pp", "dp_replicate", "edp", "ep") over the same ranks: "ep" holds the groups of
    ``expert_parallel_group`` (``expert_parallel_blocks``: ep consecutive ranks of "dp_shard_cp"), "edp" the
    ranks at the same position of their ep block (they hold the same experts) together with their tp ranks
    (they hold the same MoE parameters and route different sequence pieces)."""
    sizes = dict(zip(MESH_DIMS, mesh.mesh.shape))
    pp, replicate, tp = sizes["pp"], sizes["dp_replicate"], sizes["tp"]
    edp = sizes["dp_shard"] * sizes["cp"] // ep
    blocks = torch.tensor(expert_parallel_blocks(mesh.mesh, ep))  # (pp, dp_replicate, tp, edp) blocks of ep
    ranks = blocks.view(pp, replicate, tp, edp, ep).permute(0, 1, 3, 2, 4).reshape(pp, replicate, edp * tp, ep)
    return DeviceMesh(mesh.device_type, ranks, mesh_dim_names=("pp", "dp_replicate", "edp", "ep"))


def apply_activation_checkpointing(model: Qwen3VLModel | PipelineStageModule) -> None:
    """Recompute every decoder layer and vision block (those a pipeline stage holds) in backward (state-dict names
    are unchanged)."""
    groups = [model.language_model.layers] + ([model.visual.blocks] if hasattr(model, "visual") else [])
    for blocks in groups:
        keys = list(blocks.keys()) if isinstance(blocks, nn.ModuleDict) else range(len(blocks))
        for key in keys:
            blocks[key] = checkpoint_wrapper(blocks[key], preserve_rng_state=False)


def apply_fsdp(model: Qwen3VLModel | PipelineStageModule, mesh: ParallelMesh, meshes: ReplicaMeshes,
               mixed_precision: str, n_ranks: int) -> None:
    """Step 5 of ``parallelize_qwen3_vl``: ``fully_shard`` the parameters with replicas seeing different tokens on
    their own meshes first -- experts (``meshes.experts``), routers and the vision tower under tp
    (``meshes.data_tp``), reduce-scatters that SUM over those ranks and divide by the N = ``n_ranks`` data
    ranks only -- then, with N > 1, every vision block, every decoder layer and the root over ``mesh.fsdp``
    (gradients averaged over N). Without data ranks the other parameters stay unsharded fp32 and so do the
    summed ones in compute."""
    mp_policy = _MIXED_PRECISION[mixed_precision if n_ranks > 1 else "fp32"]
    for layer in decoder_layers(model):
        for block in layer.modules():
            if isinstance(block, SparseMoeBlock) and meshes.experts is not None:
                _fully_shard_summing(block.experts, meshes.experts, mp_policy, n_ranks)
                if meshes.data_tp is not None:
                    _fully_shard_summing(block.gate, meshes.data_tp, mp_policy, n_ranks)
    if hasattr(model, "visual"):
        if meshes.data_tp is not None:  # split by images over tp (split_vision): summed over the tp ranks
            for block in model.visual.blocks:
                _fully_shard_summing(block, meshes.data_tp, mp_policy, n_ranks)
            _fully_shard_summing(model.visual, meshes.data_tp, mp_policy, n_ranks)
        elif n_ranks > 1:
            for block in model.visual.blocks:
                fully_shard(block, mesh=mesh.fsdp, mp_policy=mp_policy)
    if n_ranks > 1:
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh.fsdp, mp_policy=mp_policy)
        fully_shard(model, mesh=mesh.fsdp, mp_policy=mp_policy)


def _fully_shard_summing(module: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy, n_ranks: int) -> None:
    fully_shard(module, mesh=mesh, mp_policy=mp_policy)
    module.set_gradient_divide_factor(float(n_ranks))
    # A custom factor reduce-scatters with PREMUL_SUM, which gloo lacks: sum, then divide. Only when the
    # reduce-scatter really communicates: over one rank torch divides while copying, and forcing would divide twice.
    if mesh.size(-1) > 1 and hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)
