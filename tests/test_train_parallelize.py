"""parallelize_qwen3_vl (mgpt_train.parallelize) on gloo ranks against the single-process model.

For every layout, each rank builds the same tiny model (unit-scale random weights: the 0.02 init makes every
softmax flat and hides errors), parallelizes it and trains 3 SGD (momentum) steps on its data-parallel
micro-batch (packed samples with images, DeepStack on, padded with ``pad_packed_batch``) with
``mgpt_train.objective.StepLoss``. The reference is the UNPARALLELIZED model in one process on all micro-batches of
the step, unpadded (the MoE router statistics leave pad rows out, so padding changes nothing): loss = sum(-log p) /
all label tokens + coef * mean aux, from the plain ``model(batch)`` outputs (mean loss, n_tokens, aux_loss).
Compared every step: the logged loss and every parameter's gradient (DTensor.full_tensor()), relative L2 error <
1e-5 for losses and first-step gradients, < 2e-5 for later gradients (fp32; the two sides differ only in summation
order and in where the collectives sum, and later steps start from parameters that already differ by that rounding).
The state dict's names and global shapes must be the unparallelized model's.

With 2 data ranks, rank 1's batch holds no image: under FSDP it must still run the vision tower's collectives.
Under cp / tp the ranks sharing a batch split its 3 images (checked on the first vision block's input rows; with
cp x tp = 4 one rank runs a blank block), and the vision gradients are complete after the FSDP reduction.
Layouts: 2 ranks -- dp_shard=2 (+ activation checkpointing), tp=2, cp=2, ep=2 (MoE, dp_shard=2, + activation
checkpointing: the all-to-alls run again in the recomputation), tp=2 with MoE (each tp rank routes its sequence
piece -- checked on every MoE block's input rows -- and FSDP over the tp ranks sums the MoE gradients), bf16 mixed
precision as a smoke test (loss within 5e-2), and the meta-device flow (parallelize, to_empty, init_weights, one
step); 4 ranks -- dp_replicate=2 x dp_shard=2 (HSDP), cp=2 x tp=2 (untied head, uneven vocabulary shards),
dp_shard=2 x cp=2 x ep=2 (MoE: router statistics summed over cp, experts FSDP-sharded over 2 ranks), dp_shard=2 x
tp=2 x ep=2 and dp_shard=2 x tp=2 (MoE on sequence pieces; the first also in bf16 mixed precision, loss within
5e-2), and pipeline parallelism composed by ``parallelize_pipeline`` (2 steps, 2 pipeline micro-batches per data
rank, 1F1B; the second micro-batch text only): pp=2 x dp_shard=2 (+ activation checkpointing; tied head, its copy on
the last stage; one data rank's micro-batch without images while the other's has some) and pp=2 x tp=2 (untied head
with uneven vocabulary shards; tied head, whose vocabulary-sharded copy on the last stage exchanges gradient shards
with the embedding; DeepStack taps crossing the stage boundary; MoE), and pp=2 x dp_shard=2 x ep=2 (MoE layers on
both stages: the exact aux loss from router statistics passed between the stages, experts split over the data ranks;
the logged loss is the cross-entropy, as a pipeline returns it), pp=2 x cp=2 (+ activation checkpointing; context
shards crossing the stage boundary, FSDP over the cp ranks) and pp=2 x cp=2 x ep=2 (router statistics summed over cp
on the last stage); 8 ranks -- pp=2 x cp=2 x tp=2 x ep=2 and dp_shard=2 x pp=2 x cp=2 x ep=2; 16 ranks -- all five
at once, dp_shard=2 x pp=2 x cp=2 x tp=2 with ep=2 folded into dp_shard x cp. Bad configurations raise clear errors.
One spawn per world size runs all its layouts.
"""

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from conftest import rel_err
from gloo_ranks import error_message, run_on_gloo_ranks
from mgpt_train.model import Qwen3VLConfig, Qwen3VLModel
from mgpt_train.model.moe import SparseMoeBlock
from mgpt_train.parallel import assign_images
from mgpt_train.parallel_dims import ParallelDims
from mgpt_train.objective import StepLoss
from mgpt_train.parallelize import pad_packed_batch, parallelize_pipeline, parallelize_qwen3_vl
from mgpt_train.pipeline import build_pipeline

TOL = 1e-5  # losses, and the first step's gradients (~2e-6 achieved)
LATER_STEP_TOL = 2e-5  # gradients after 1-2 updates, whose rounding differences compound (~8e-6 achieved)
BF16_TOL = 5e-2
STEPS = 3
PIPELINE_STEPS = 2
PIPELINE_MICROBATCHES = 2  # per data-parallel rank
PAD_MULTIPLE = 8  # 2 * cp * tp for every layout below


def dense_config() -> Qwen3VLConfig:
    return Qwen3VLConfig.tiny()


def untied_config() -> Qwen3VLConfig:
    """Untied head, and a vocabulary (321) that tp=2 splits unevenly."""
    config = Qwen3VLConfig.tiny()
    return dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=321), tie_word_embeddings=False)


def moe_config() -> Qwen3VLConfig:
    config = Qwen3VLConfig.tiny_moe()
    return dataclasses.replace(config, text=dataclasses.replace(config.text, router_aux_loss_coef=0.1))


# (name, ParallelDims keywords, model config, options)
LAYOUTS = {
    2: [("dp_shard2_ac", dict(dp_shard=2), dense_config, dict(activation_checkpointing=True)),
        ("tp2", dict(dp_shard=1, tp=2), dense_config, {}),
        ("cp2", dict(dp_shard=1, cp=2), dense_config, {}),
        ("dp_shard2_ep2_moe_ac", dict(dp_shard=2, ep=2), moe_config, dict(activation_checkpointing=True)),
        ("tp2_moe", dict(dp_shard=1, tp=2), moe_config, {}),
        ("dp_shard2_bf16", dict(dp_shard=2), dense_config, dict(mixed_precision="bf16"))],
    4: [("dp_replicate2_dp_shard2", dict(dp_replicate=2, dp_shard=2), dense_config, {}),
        ("cp2_tp2_untied_head", dict(dp_shard=1, cp=2, tp=2), untied_config, {}),
        ("dp_shard2_cp2_ep2_moe", dict(dp_shard=2, cp=2, ep=2), moe_config, {}),
        ("dp_shard2_tp2_ep2_moe", dict(dp_shard=2, tp=2, ep=2), moe_config, {}),
        ("dp_shard2_tp2_moe", dict(dp_shard=2, tp=2), moe_config, {}),
        ("dp_shard2_tp2_ep2_moe_bf16", dict(dp_shard=2, tp=2, ep=2), moe_config, dict(mixed_precision="bf16")),
        ("pp2_tp2_moe", dict(pp=2, dp_shard=1, tp=2), moe_config, {}),
        ("pp2_dp_shard2_ac", dict(pp=2, dp_shard=2), dense_config, dict(activation_checkpointing=True)),
        ("pp2_tp2_untied_head", dict(pp=2, dp_shard=1, tp=2), untied_config, {}),
        ("pp2_tp2_tied_head", dict(pp=2, dp_shard=1, tp=2), dense_config, {}),
        ("pp2_dp_shard2_ep2_moe", dict(pp=2, dp_shard=2, ep=2), moe_config, {}),
        ("pp2_cp2", dict(pp=2, dp_shard=1, cp=2), dense_config, dict(activation_checkpointing=True)),
        ("pp2_cp2_ep2_moe", dict(pp=2, dp_shard=1, cp=2, ep=2), moe_config, {})],
    8: [("pp2_cp2_tp2_ep2_moe", dict(pp=2, dp_shard=1, cp=2, tp=2, ep=2), moe_config, {}),
        ("dp_shard2_pp2_cp2_ep2_moe", dict(pp=2, dp_shard=2, cp=2, ep=2), moe_config, {})],
    16: [("dp_shard2_pp2_cp2_tp2_ep2_moe", dict(pp=2, dp_shard=2, cp=2, tp=2, ep=2), moe_config, {})],
}


# ----------------------------------------------------------------------------------- model and data

def build_model(config: Qwen3VLConfig) -> Qwen3VLModel:
    """The same model on every rank: matrices (embeddings, experts) ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1),
    biases ~ N(0, 0.1)."""
    torch.manual_seed(0)
    model = Qwen3VLModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                noise = 0.1 * torch.randn_like(param)
                param.copy_(1 + noise if name.endswith("weight") else noise)
            else:
                param.normal_(std=param.shape[-1] ** -0.5)
    return model


def make_sample(config: Qwen3VLConfig, gen: torch.Generator, text_lens: tuple[int, ...], grids) -> torch.Tensor:
    ids = torch.randint(0, 280, (text_lens[0],), generator=gen).tolist()
    for (t, h, w), text_len in zip(grids, text_lens[1:]):
        ids += [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // 4)
        ids += [config.vision_end_token_id] + torch.randint(0, 280, (text_len,), generator=gen).tolist()
    return torch.tensor(ids)


def shifted_labels(ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """labels[i] = ids[i + 1] on ~60% of the text successors, -100 elsewhere and on the sample's last token."""
    labels = torch.full_like(ids, -100)
    keep = (torch.rand(len(ids) - 1, generator=gen) < 0.6) & (ids[1:] < 280)
    labels[:-1][keep] = ids[1:][keep]
    return labels


def make_batch(config: Qwen3VLConfig, seed: int, images: bool = True) -> dict:
    """``unpadded_batch`` padded to PAD_MULTIPLE tokens."""
    return pad_packed_batch(unpadded_batch(config, seed, images), PAD_MULTIPLE)


def unpadded_batch(config: Qwen3VLConfig, seed: int, images: bool = True) -> dict:
    """Three packed samples: two images, then text only, then one image (42 to 44 tokens); without ``images``
    three text-only samples (39 to 41 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    specs = [((5 + seed % 3, 4, 3), [(1, 4, 4), (1, 2, 4)]), ((7,), []), ((3, 6), [(1, 4, 2)])]
    if not images:
        specs = [((15 + seed % 3,), []), ((7,), []), ((17,), [])]
    samples = [make_sample(config, gen, lens, grids) for lens, grids in specs]
    grids = [g for _, gs in specs for g in gs]
    batch = dict(input_ids=torch.cat(samples), labels=torch.cat([shifted_labels(s, gen) for s in samples]),
                 cu_seqlens=torch.tensor([0] + [len(s) for s in samples]).cumsum(0).to(torch.int32),
                 pixel_values=torch.randn(sum(t * h * w for t, h, w in grids), config.vision.patch_dim, generator=gen),
                 image_grid_thw=torch.tensor(grids, dtype=torch.int64).reshape(-1, 3))
    return batch


def optimizer(model):
    """SGD: a linear update keeps the two runs' parameters as close as their gradients (AdamW's first steps are
    sign-like and amplify summation-order differences of near-zero gradient entries)."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)


def reference_run(config: Qwen3VLConfig, batches: list[dict], steps_count: int = STEPS, log_aux: bool = True
                  ) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """Per step: (loss, gradients) of the unparallelized model over all micro-batches of the step. ``log_aux``
    False: the loss recorded is the cross-entropy part only (what a pipeline returns)."""
    model = build_model(config)
    opt = optimizer(model)
    coef = config.text.router_aux_loss_coef if config.is_moe else 0.0
    steps = []
    for _ in range(steps_count):
        opt.zero_grad()
        outs = [model(batch) for batch in batches]
        total_tokens = sum(out["n_tokens"] for out in outs)
        token_sum = sum((out["loss"] - coef * out["aux_loss"]) * out["n_tokens"] for out in outs)
        loss = token_sum / total_tokens + coef * sum(out["aux_loss"] for out in outs) / len(outs)
        loss.backward()
        logged = loss if log_aux else token_sum / total_tokens
        steps.append((logged.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return steps


def test_pad_packed_batch_appends_one_label_free_sample_and_keeps_the_loss():
    config = dense_config()
    model = build_model(config)
    unpadded = unpadded_batch(config, seed=3)
    length = unpadded["input_ids"].shape[0]
    padded = pad_packed_batch(unpadded, 12)
    assert padded["input_ids"].shape[0] % 12 == 0 and padded["input_ids"].shape[0] - length < 12
    assert padded["cu_seqlens"].tolist() == unpadded["cu_seqlens"].tolist() + [padded["input_ids"].shape[0]]
    assert (padded["labels"][length:] == -100).all() and (padded["input_ids"][length:] == 0).all()
    assert padded["cu_seqlens"].dtype == torch.int32 and padded["pixel_values"] is unpadded["pixel_values"]
    with torch.no_grad():  # the padding sample attends only to itself and carries no label
        assert rel_err(model(padded)["loss"], model(unpadded)["loss"]) < 1e-6
    same = pad_packed_batch(padded, 12)
    assert all(same[k] is padded[k] for k in padded)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5000), max_size=20), st.integers(1, 8))
def test_assign_images_gives_every_image_to_one_rank_and_balances_patches(patches, ranks):
    owned = assign_images(patches, ranks)
    assert len(owned) == ranks and sorted(i for images in owned for i in images) == list(range(len(patches)))
    assert all(images == sorted(images) for images in owned)
    loads = [sum(patches[i] for i in images) for images in owned]
    if patches:  # largest first to the least loaded rank: loads differ by at most one image
        assert max(loads) - min(loads) <= max(patches)
    with pytest.raises(ValueError, match="'ranks' must be an int >= 1, got 0"):
        assign_images(patches, 0)


# ----------------------------------------------------------------------------------- parallel side

def full_gradients(model) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient under the reference's name (collective: every rank calls it)."""
    return {name.replace("._checkpoint_wrapped_module", ""):
            param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            for name, param in model.named_parameters()}


def state_dict_shapes(model) -> dict[str, list[int]]:
    """Names and GLOBAL shapes that a DCP checkpoint of the model records."""
    return {name: list(tensor.shape) for name, tensor in get_model_state_dict(model).items()}


def parallel_run(config: Qwen3VLConfig, dims: ParallelDims, batches: list[dict], options: dict):
    mesh = dims.build_mesh("cpu")
    model = parallelize_qwen3_vl(build_model(config), dims, mesh, **{"mixed_precision": "fp32", **options})
    opt = optimizer(model)
    batch = batches[mesh["dp"].get_local_rank()]
    moe_rows = set()  # every MoE block routes this rank's sequence piece only: no MoE work repeated over tp
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.register_forward_pre_hook(lambda _module, args: moe_rows.add(args[0].shape[0]))
    vision_rows = set()  # the vision tower runs on this rank's share of the images (cp x tp ranks split them)
    model.visual.blocks[0].register_forward_pre_hook(lambda _module, args: vision_rows.add(args[0].shape[0]))
    steps = [state_dict_shapes(model)]
    for _ in range(STEPS):
        opt.zero_grad()
        objective = StepLoss([batch], mesh["dp_cp"].get_group(), dims.cp)
        objective.backward(model(batch))
        steps.append((objective.value().item(), full_gradients(model)))
        opt.step()
    if config.is_moe:
        assert moe_rows == {batch["input_ids"].shape[0] // (dims.cp * dims.tp)}, moe_rows
    if batch["image_grid_thw"].shape[0]:
        patches = batch["image_grid_thw"].prod(1).tolist()
        mine = assign_images(patches, dims.cp * dims.tp)[mesh["cp_tp"].get_local_rank()]
        assert vision_rows == {sum(patches[i] for i in mine) if mine else 4}, (vision_rows, patches, mine)
    return steps


def pipeline_run(config: Qwen3VLConfig, dims: ParallelDims, batches: list[dict], options: dict):
    """``parallel_run`` for pp > 1: stages on the meta device, ``parallelize_pipeline``, the reference's weights
    loaded; each data rank steps its PIPELINE_MICROBATCHES micro-batches. Shapes and gradients of all stages are
    merged on every rank (gathered under the full model's names; the tied head's copy as ``lm_head.weight``)."""
    mesh = dims.build_mesh("cpu")
    pipe = build_pipeline(config, mesh["pp"], schedule="1F1B", n_microbatches=PIPELINE_MICROBATCHES,
                          seq_len=max(b["input_ids"].shape[0] for b in batches), device="cpu", materialize=False)
    parallelize_pipeline(pipe, dims, mesh, mixed_precision="fp32", **options)
    pipe.load_full_state_dict(build_model(config).state_dict())
    opt = optimizer(pipe)
    dp_rank, loss_group = mesh["dp"].get_local_rank(), mesh["dp_cp"].get_group()
    microbatches = batches[dp_rank * PIPELINE_MICROBATCHES:(dp_rank + 1) * PIPELINE_MICROBATCHES]
    global_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    last_stage_rank = dist.get_global_rank(mesh["pp"].get_group(), dims.pp - 1)

    def merged(local: dict) -> dict:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        return {name: value for part in parts for name, value in part.items()}

    steps = [merged({n: s for m in pipe.stage_modules for n, s in state_dict_shapes(m).items()})]
    for _ in range(PIPELINE_STEPS):
        opt.zero_grad()
        loss = pipe.step(microbatches, global_tokens=global_tokens)
        logged = loss if loss is not None else torch.zeros(())
        dist.all_reduce(logged, group=loss_group)
        dist.broadcast(logged, src=last_stage_rank, group=mesh["pp"].get_group())
        steps.append((logged.item(), merged({n: g for m in pipe.stage_modules for n, g in full_gradients(m).items()})))
        opt.step()
    return steps


def compare(steps, ref_steps, ref_shapes) -> dict:
    """Worst relative errors over the steps: loss, and gradients (each parameter's L2 error over its norm)."""
    shapes, steps = steps[0], steps[1:]
    loss_err, grad_errors, worst = 0.0, [], []
    for (loss, grads), (ref_loss, ref_grads) in zip(steps, ref_steps):
        loss_err = max(loss_err, abs(loss - ref_loss) / abs(ref_loss))
        assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
        errors = {name: rel_err(grads[name], ref) for name, ref in ref_grads.items()}
        worst.append(max(errors, key=errors.get))
        grad_errors.append(errors[worst[-1]])
    return {"state_dict_ok": shapes == ref_shapes, "loss": loss_err, "grad_per_step": grad_errors, "worst": worst,
            "losses": [s[0] for s in steps], "ref_losses": [s[0] for s in ref_steps]}


def bad_configs(world: int) -> dict[str, str]:
    """Each error is raised on every rank before any rank diverges, so the job continues afterwards."""
    dense, moe = dense_config(), moe_config()
    three_heads = dataclasses.replace(dense, text=dataclasses.replace(dense.text, num_attention_heads=3,
                                                                       num_key_value_heads=1))
    five_experts = dataclasses.replace(moe, text=dataclasses.replace(moe.text, num_experts=5))
    tp_dims, ep_dims = ParallelDims(world, dp_shard=1, tp=2), ParallelDims(world, ep=2)
    cp_dims, pp_dims = ParallelDims(world, dp_shard=world // 2, cp=2), ParallelDims(world, dp_shard=1, pp=2)

    def odd_length():
        model = parallelize_qwen3_vl(build_model(dense), cp_dims, cp_dims.build_mesh("cpu"), mixed_precision="fp32")
        model(unpadded_batch(dense, seed=1))  # 43 tokens

    return {
        "heads": error_message(lambda: parallelize_qwen3_vl(Qwen3VLModel(three_heads), tp_dims,
                                                            tp_dims.build_mesh("cpu"))),
        "experts": error_message(lambda: parallelize_qwen3_vl(Qwen3VLModel(five_experts), ep_dims,
                                                              ep_dims.build_mesh("cpu"))),
        "precision": error_message(lambda: parallelize_qwen3_vl(Qwen3VLModel(dense), tp_dims, tp_dims.build_mesh("cpu"),
                                                         mixed_precision="fp16")),
        "odd_length": error_message(odd_length),
        "mesh": error_message(lambda: parallelize_qwen3_vl(Qwen3VLModel(dense), ep_dims, tp_dims.build_mesh("cpu"))),
        "pp": error_message(lambda: parallelize_qwen3_vl(Qwen3VLModel(dense), pp_dims, pp_dims.build_mesh("cpu"))),
    }


def pipeline_bad_configs(world: int) -> dict[str, str]:
    """parallelize_pipeline's errors (4 ranks: pp=2 with another degree of 2); raised before any collective."""
    dense = dense_config()

    def attempt(seq_len: int = 48, mixed_precision: str = "fp32", **degrees):
        dims = ParallelDims(world, pp=2, **degrees)
        mesh = dims.build_mesh("cpu")
        pipe = build_pipeline(dense, mesh["pp"], n_microbatches=2, seq_len=seq_len, device="cpu", materialize=False)
        return lambda: parallelize_pipeline(pipe, dims, mesh, mixed_precision=mixed_precision)

    return {"seq_len_tp": error_message(attempt(seq_len=47, dp_shard=1, tp=2)),
            "seq_len_cp": error_message(attempt(seq_len=46, dp_shard=1, cp=2)),
            "bf16": error_message(attempt(dp_shard=1, cp=2, mixed_precision="bf16"))}


def meta_device_step(world: int) -> dict:
    """The big-model flow: build on the meta device, parallelize, materialise (to_empty + init_weights), train."""
    config = moe_config()
    dims = ParallelDims(world, ep=2)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = Qwen3VLModel(config)
    parallelize_qwen3_vl(model, dims, mesh, mixed_precision="fp32", activation_checkpointing=True)
    model.to_empty(device="cpu")
    model.init_weights()
    batch = make_batch(config, seed=mesh["dp"].get_local_rank())
    objective = StepLoss([batch], mesh["dp_cp"].get_group(), dims.cp)
    objective.backward(model(batch))
    grads = full_gradients(model)
    return {"loss": objective.value().item(), "grads_finite": all(bool(g.isfinite().all()) for g in grads.values()),
            "expert_grad_norm": grads["language_model.layers.0.mlp.experts.gate_up_proj"].norm().item()}


def _rank_body(rank: int) -> dict:
    """Every layout of this world size, then its error cases; rank 0 also runs the references and compares."""
    world = dist.get_world_size()
    torch.set_num_threads(1)
    result, references = {}, {}
    for name, dims_kwargs, make_config, options in LAYOUTS[world]:
        config = make_config()
        dims = ParallelDims(world_size=world, **dims_kwargs)
        data_ranks = dims.dp_replicate * dims.dp_shard
        # The reference trains on the unpadded batches: padding (pad_packed_batch's, then the pipeline's up to the
        # longest padded batch) must change nothing, the MoE aux loss included.
        if dims.pp > 1:  # micro-batch 1 (data rank 0) is text only: the other data rank's has images
            unpadded = [unpadded_batch(config, seed=10 + i, images=i != 1)
                        for i in range(data_ranks * PIPELINE_MICROBATCHES)]
            batches = [pad_packed_batch(batch, PAD_MULTIPLE) for batch in unpadded]
            steps = pipeline_run(config, dims, batches, options)
        else:  # with 2 data ranks, rank 1's batch is text only (FSDP runs the vision tower idle there)
            unpadded = [unpadded_batch(config, seed=10 + i, images=i != 1 or data_ranks != 2)
                        for i in range(data_ranks)]
            batches = [pad_packed_batch(batch, PAD_MULTIPLE) for batch in unpadded]
            steps = parallel_run(config, dims, batches, options)
        if rank == 0:
            key = (make_config.__name__, len(batches), len(steps) - 1, dims.pp)
            if key not in references:
                references[key] = reference_run(config, unpadded, len(steps) - 1, log_aux=dims.pp == 1)
            ref_steps = references[key]
            if dims.pp > 1 and config.tie_word_embeddings:  # the last stage's copy: the embedding's gradient
                ref_steps = [(loss, {**grads, "lm_head.weight": grads["language_model.embed_tokens.weight"]})
                             for loss, grads in ref_steps]
            ref_shapes = {n: list(t.shape) for n, t in build_model(config).state_dict().items()}
            result[name] = compare(steps, ref_steps, ref_shapes)
        dist.barrier()
    if world == 2:
        result["meta"] = meta_device_step(world)
        result["errors"] = bad_configs(world)
    elif world == 4:
        result["errors"] = pipeline_bad_configs(world)
    return result


def _spawn(world: int, tmp_path) -> list[dict]:
    return run_on_gloo_ranks(_rank_body, world, tmp_path, timeout_s=300)


def _check_layouts(result: dict, world: int) -> None:
    for name, _, _, options in LAYOUTS[world]:
        case = result[name]
        assert case["state_dict_ok"], name  # names and global shapes of the unparallelized model
        assert case["losses"][-1] < case["losses"][0], (name, case)  # the steps train
        if options.get("mixed_precision") == "bf16":  # smoke test: bf16 compute against the fp32 reference
            assert case["loss"] < BF16_TOL, (name, case)
            continue
        assert case["loss"] < TOL, (name, case)
        first, *later = case["grad_per_step"]
        assert first < TOL and max(later) < LATER_STEP_TOL, (name, case)


@pytest.mark.distributed
def test_two_ranks_fsdp_tp_cp_ep_match_single_process(tmp_path):
    results = _spawn(2, tmp_path)
    _check_layouts(results[0], 2)
    meta = results[0]["meta"]  # 0.02 init: near-uniform predictions over the 320 tokens, plus 0.1 * aux (~1)
    assert abs(meta["loss"] - math.log(320) - 0.1) < 0.3 and meta["grads_finite"], meta
    assert meta["expert_grad_norm"] > 0, meta
    errors = results[0]["errors"]
    assert "num_heads=3 is not divisible by tp=2" in errors["heads"], errors
    assert "num_experts=5 is not divisible by ep=2" in errors["experts"], errors
    assert "'mixed_precision' must be one of ['bf16', 'fp32'], got 'fp16'" in errors["precision"], errors
    assert "packed sequence length 43 must be divisible by 2*cp = 4" in errors["odd_length"], errors
    assert "'mesh' has shape (1, 1, 1, 1, 2) but parallel_dims say (1, 1, 2, 1, 1)" in errors["mesh"], errors
    assert "pp=2 needs the pipeline stages: build them with build_pipeline(..., materialize=False), then call " \
           "parallelize_pipeline" in errors["pp"], errors


@pytest.mark.distributed
def test_four_ranks_hsdp_cp_tp_dp_cp_ep_and_pipeline_compositions_match_single_process(tmp_path):
    results = _spawn(4, tmp_path)
    _check_layouts(results[0], 4)
    errors = results[0]["errors"]
    assert "the pipeline's seq_len 47 must be divisible by 2*cp = 2 and by cp*tp = 2" in errors["seq_len_tp"], errors
    assert "the pipeline's seq_len 46 must be divisible by 2*cp = 4 and by cp*tp = 2" in errors["seq_len_cp"], errors
    assert "build the pipeline with activation_dtype=torch.bfloat16, got torch.float32" in errors["bf16"], errors


@pytest.mark.distributed
def test_eight_ranks_pipeline_with_context_tensor_expert_and_sharded_data_parallelism_match_single_process(tmp_path):
    results = _spawn(8, tmp_path)
    _check_layouts(results[0], 8)


@pytest.mark.distributed
def test_sixteen_ranks_all_five_dimensions_match_single_process(tmp_path):
    results = _spawn(16, tmp_path)
    _check_layouts(results[0], 16)
