"""Pipeline parallelism (mgpt_train.pipeline): the layer split rule, the padding of micro-batches, the schedule
checks, and -- on 2 gloo ranks, fp32 -- two SGD steps of GPipe, 1F1B and interleaved 1F1B (2 stages per rank)
against the single-process model over the same micro-batches: loss = sum over label tokens of -log p / N (the
token-weighted mean of the micro-batches' losses), every parameter's gradient (gathered under the full model's
names) and the updated weights. Micro-batches hold images (vision tower on stage 0, DeepStack taps added on
stages 0 and 1 of the interleaved split), a text-only micro-batch, one that fills seq_len exactly, and a tied
head (its copy on the last stage). MoE cases (1F1B with MoE layers on both stages; interleaved, the router
statistics crossing three stage boundaries; micro-batches padded to seq_len but one) check the exact aux loss (pad
rows left out of the router statistics): its gradient reaches every stage's routers. One spawn of 2 ranks runs every
distributed case.

Reference: ``Qwen3VLModel`` forward/backward per micro-batch (no pipelining, no padding), weighted by its label
tokens; unit-scale random weights so that errors in masking or routing cannot hide in flat softmaxes.
"""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gloo_ranks import error_message, run_on_gloo_ranks
from mgpt_train.model import Qwen3VLConfig, Qwen3VLModel, mrope_position_ids
from mgpt_train.parallel_dims import ParallelDims
from mgpt_train.pipeline import build_pipeline, local_stage_links_work
from mgpt_train.pipeline_plan import check_schedule, pad_microbatch, plan_stages, split_layers

WORLD = 2
SEQ_LEN = 40
N_MICROBATCHES = 4
TOL = 1e-5
GRIDS = ([1, 4, 4], [1, 2, 4], [1, 2, 2])  # 4, 2 and 1 image tokens after the 2x2 merge


def dense_config() -> Qwen3VLConfig:
    """The tiny preset (tied head, DeepStack into layers 0 and 1) with 4 decoder layers."""
    config = Qwen3VLConfig.tiny()
    return dataclasses.replace(config, text=dataclasses.replace(config.text, num_hidden_layers=4))


def moe_config() -> Qwen3VLConfig:
    """Untied, 4 layers of which 1, 2 and 3 are MoE (on both stages when pp=2), a visible aux coefficient."""
    config = Qwen3VLConfig.tiny_moe()
    text = dataclasses.replace(config.text, num_hidden_layers=4, mlp_only_layers=(0,), router_aux_loss_coef=0.1)
    return dataclasses.replace(config, text=text)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.01), other vectors ~ N(0, 0.01)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            else:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * noise)
    return model


def make_microbatch(config: Qwen3VLConfig, gen: torch.Generator, *, images: bool, fill: bool) -> dict:
    """Packed samples (prompt, optional image, answer) up to SEQ_LEN tokens; ``fill`` makes exactly SEQ_LEN."""
    ids, labels, bounds, pixels, grids = [], [], [0], [], []

    def randint(low, high):
        return int(torch.randint(low, high, (1,), generator=gen))

    while True:
        prompt = torch.randint(0, 256, (randint(2, 6),), generator=gen).tolist()
        image = []
        if images and (not grids or randint(0, 2)):
            t, h, w = GRIDS[randint(0, len(GRIDS))]
            image = [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // 4)
            image.append(config.vision_end_token_id)
        answer = torch.randint(0, 256, (randint(2, 5),), generator=gen).tolist()
        sample = prompt + image + answer
        if len(ids) + len(sample) > SEQ_LEN:
            break
        if image:
            grids.append([t, h, w])
            pixels.append(torch.randn(t * h * w, config.vision.patch_dim, generator=gen))
        answer_start = len(prompt) + len(image)
        # Shifted targets: position i predicts token i + 1 when that token is part of the answer.
        labels += [sample[i + 1] if i + 1 >= answer_start else -100 for i in range(len(sample) - 1)] + [-100]
        ids += sample
        bounds.append(len(ids))
    if fill:  # stretch the last sample's answer to exactly SEQ_LEN tokens
        extra = torch.randint(0, 256, (SEQ_LEN - len(ids),), generator=gen).tolist()
        labels[-1:] = [extra[0]] + extra[1:] + [-100] if extra else labels[-1:]
        ids += extra
        bounds[-1] = len(ids)
    return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
                pixel_values=torch.cat(pixels) if pixels else torch.zeros(0, config.vision.patch_dim),
                image_grid_thw=torch.tensor(grids, dtype=torch.int64).reshape(-1, 3))


def make_step(config: Qwen3VLConfig, seed: int) -> list[dict]:
    """Micro-batch 0 and 2 hold images, 1 is text only, 3 fills SEQ_LEN exactly."""
    gen = torch.Generator().manual_seed(seed)
    return [make_microbatch(config, gen, images=i != 1, fill=i == 3) for i in range(N_MICROBATCHES)]


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float("inf") if torch.isnan(out).any() else ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference_steps(config, model, steps, lr) -> list[dict]:
    """Per optimizer step: the cross-entropy loss over all micro-batches, every state-dict key's gradient, and
    the weights after SGD. The MoE aux term is coef x the mean over micro-batches of each one's aux loss."""
    params = dict(model.state_dict(keep_vars=True))  # lists the tied lm_head.weight under its own name too
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    records = []
    for microbatches in steps:
        optimizer.zero_grad()
        tokens = sum(int((mb["labels"] != -100).sum()) for mb in microbatches)
        ce = 0.0
        for mb in microbatches:
            out = model(mb)
            n = int((mb["labels"] != -100).sum())
            aux = config.text.router_aux_loss_coef * out["aux_loss"] if config.is_moe else 0.0
            cross_entropy = out["loss"] - aux
            loss = cross_entropy * n / tokens + aux / len(microbatches)
            loss.backward()
            ce += cross_entropy.item() * n / tokens
        grads = {name: p.grad.clone() for name, p in params.items()}
        optimizer.step()
        records.append(dict(loss=ce, grads=grads, weights={n: p.detach().clone() for n, p in params.items()}))
    return records


# ----------------------------------------------------------------------------------- one process

@settings(max_examples=60, deadline=None)
@given(num_layers=st.integers(1, 40), num_stages=st.integers(1, 12))
def test_split_layers_is_contiguous_even_and_spares_stage_zero(num_layers, num_stages):
    if num_layers < num_stages:
        with pytest.raises(ValueError, match="cannot fill"):
            split_layers(num_layers, num_stages)
        return
    blocks = split_layers(num_layers, num_stages)
    assert [i for block in blocks for i in block] == list(range(num_layers))
    sizes = [len(block) for block in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes[0] == min(sizes)
    assert sizes == sorted(sizes[:1]) + sorted(sizes[1:], reverse=True)  # the extra layers go to stages 1, 2, ...


def test_explicit_layer_counts_and_their_errors():
    assert split_layers(5, 2, [1, 4]) == [range(0, 1), range(1, 5)]
    for counts in ([2, 2], [5, 0], [1, 1, 3]):
        with pytest.raises(ValueError, match="'layers_per_stage' must hold 2 counts >= 1 summing to the 5"):
            split_layers(5, 2, counts)


def test_plan_places_stages_round_robin_and_carries_deepstack_taps():
    plans = plan_stages(dense_config(), pp_size=2, virtual_stages=2)  # 4 stages of one layer, taps after 0 and 1
    assert [p.rank for p in plans] == [0, 1, 0, 1]
    assert [list(p.layers) for p in plans] == [[0], [1], [2], [3]]
    assert [(p.pending_in, p.pending_out) for p in plans] == [(0, 1), (1, 0), (0, 0), (0, 0)]
    assert plans[0].is_first and plans[-1].is_last and not plans[1].is_last
    with pytest.raises(ValueError, match="4 decoder layers cannot fill 6 stages"):
        plan_stages(dense_config(), pp_size=2, virtual_stages=3)
    with pytest.raises(ValueError, match="'virtual_stages' must be an int >= 1, got 0"):
        plan_stages(dense_config(), pp_size=2, virtual_stages=0)


@pytest.mark.parametrize("args, match", [
    (("Zero", 4, 2, 1), "unknown schedule 'Zero'"),
    (("Interleaved1F1B", 3, 2, 2), "needs n_microbatches \\(3\\) to be a multiple of pp_size \\(2\\)"),
    (("1F1B", 1, 2, 1), "needs n_microbatches \\(1\\) >= pp_size \\(2\\)"),
    (("1F1B", 4, 2, 2), "runs one stage per rank; virtual_stages=2 needs 'Interleaved1F1B'"),
    (("GPipe", 0, 2, 1), "'n_microbatches' must be an int >= 1, got 0"),
])
def test_schedule_errors(args, match):
    with pytest.raises(ValueError, match=match):
        check_schedule(*args)


def test_padding_adds_one_pad_sample_and_keeps_positions():
    config = dense_config()
    batch = make_step(config, seed=3)[0]
    tokens = batch["input_ids"].shape[0]
    padded = pad_microbatch(batch, config, SEQ_LEN, "cpu", pad_token_id=7)
    assert tokens < SEQ_LEN and padded.tokens == tokens
    assert padded.cu_seqlens.tolist() == batch["cu_seqlens"].tolist() + [SEQ_LEN]
    assert padded.input_ids[tokens:].eq(7).all() and padded.labels[tokens:].eq(-100).all()
    assert torch.equal(padded.labels[:tokens], batch["labels"])
    unpadded = mrope_position_ids(batch["input_ids"], batch["cu_seqlens"], batch["image_grid_thw"],
                                  config.image_token_id, 2)
    assert torch.equal(padded.position_ids[:, :tokens], unpadded)
    assert padded.position_ids[:, tokens:].eq(torch.arange(SEQ_LEN - tokens)).all()  # the pad sample restarts at 0
    assert padded.label_rows.tolist() == torch.nonzero(batch["labels"] != -100).flatten().tolist()
    full = make_step(config, seed=3)[3]
    assert pad_microbatch(full, config, SEQ_LEN, "cpu").cu_seqlens.tolist() == full["cu_seqlens"].tolist()
    with pytest.raises(ValueError, match=f"holds {tokens} tokens, more than seq_len={tokens - 1}"):
        pad_microbatch(batch, config, tokens - 1, "cpu")
    with pytest.raises(ValueError, match="every micro-batch needs 'labels'"):
        pad_microbatch({k: v for k, v in batch.items() if k != "labels"}, config, SEQ_LEN, "cpu")


# ----------------------------------------------------------------------------------- 2 gloo ranks

CASES = [("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2)]
LR = 0.1  # SGD: linear in the gradients (Adam's first step is sign(g) and would amplify 1e-7 noise)


def _run_case(config, full, reference, steps, pp_mesh, schedule, virtual_stages) -> dict:
    pipe = build_pipeline(config, pp_mesh, schedule=schedule, n_microbatches=N_MICROBATCHES, seq_len=SEQ_LEN,
                          device="cpu", virtual_stages=virtual_stages, materialize=False)
    pipe.load_full_state_dict(full.state_dict())
    optimizer = torch.optim.SGD(pipe.parameters(), lr=LR)
    state = pipe.state_dict()
    head, embedding = state.get("lm_head.weight"), state.get("language_model.embed_tokens.weight")
    result = {"loss_errors": [], "grad_errors": {}, "weight_errors": {}, "stages": [p.index for p in pipe.plans],
              "zero_grads": [], "shared_tied": head is not None and embedding is not None and
              head.data_ptr() == embedding.data_ptr()}
    for step, (microbatches, ref) in enumerate(zip(steps, reference)):
        optimizer.zero_grad()
        loss = pipe.step(microbatches)
        if pipe.has_last_stage:
            result["loss_errors"].append(abs(float(loss) - ref["loss"]) / abs(ref["loss"]))
        else:
            result["loss_errors"].append(None if loss is None else "loss off the last stage")
        for module in pipe.stage_modules:
            for name, param in module.state_dict(keep_vars=True).items():
                grad = param.grad
                result["grad_errors"][f"{step}/{name}"] = _rel(grad, ref["grads"][name]) if grad is not None else 1.0
                if grad is not None and grad.abs().max() == 0:
                    result["zero_grads"].append(name)
        optimizer.step()
    for name, tensor in pipe.state_dict().items():
        result["weight_errors"][name] = _rel(tensor, reference[-1]["weights"][name])
    # the held-out evaluation's forward-only pass (stage to stage, point to point) vs the trained reference model
    trained = Qwen3VLModel(config)
    trained.load_state_dict(reference[-1]["weights"])
    with torch.no_grad():
        result["greedy_equal"] = [torch.equal(pipe.greedy_tokens(mb), trained.greedy_tokens(mb)) for mb in steps[0]]
    return result


def _rank_body(rank: int) -> dict:
    torch.set_num_threads(1)  # two ranks on a few shared cores: more intra-op threads make every step far slower
    result = {"cases": {}, "errors": {}}
    torch.manual_seed(0)
    pp_mesh = ParallelDims(world_size=WORLD, pp=WORLD).build_mesh("cpu")["pp"]
    config = dense_config()
    full = randomize(Qwen3VLModel(config), seed=1)
    steps = [make_step(config, seed=10), make_step(config, seed=11)]
    ref_model = randomize(Qwen3VLModel(config), seed=1)
    reference = reference_steps(config, ref_model, steps, LR)
    for schedule, virtual_stages in CASES:
        result["cases"][f"{schedule}/v{virtual_stages}"] = _run_case(config, full, reference, steps, pp_mesh,
                                                                     schedule, virtual_stages)

    # pp=1 (a 1-rank pipeline on each rank): two local stages, the tied head and embedding one Parameter.
    # Before torch 2.13 the schedule links those stages with a send to the rank itself, which gloo lacks.
    single_mesh = ParallelDims(world_size=WORLD, pp=1).build_mesh("cpu")["pp"]
    if local_stage_links_work(single_mesh):
        result["single_rank"] = _run_case(config, full, reference, steps, single_mesh, "Interleaved1F1B", 2)
    else:
        result["errors"]["single_rank"] = error_message(lambda: build_pipeline(
            config, single_mesh, schedule="Interleaved1F1B", n_microbatches=4, seq_len=SEQ_LEN, device="cpu",
            virtual_stages=2))

    moe = moe_config()
    moe_full = randomize(Qwen3VLModel(moe), seed=2)
    moe_steps = [make_step(moe, seed=20), make_step(moe, seed=21)]
    moe_reference = reference_steps(moe, randomize(Qwen3VLModel(moe), seed=2), moe_steps, LR)
    result["cases"]["moe/1F1B/v1"] = _run_case(moe, moe_full, moe_reference, moe_steps, pp_mesh, "1F1B", 1)
    result["cases"]["moe/Interleaved1F1B/v2"] = _run_case(moe, moe_full, moe_reference, moe_steps, pp_mesh,
                                                          "Interleaved1F1B", 2)

    result["errors"]["layers"] = error_message(lambda: build_pipeline(
        config, pp_mesh, schedule="Interleaved1F1B", n_microbatches=4, seq_len=SEQ_LEN, device="cpu",
        virtual_stages=4))
    result["errors"]["microbatches"] = error_message(lambda: build_pipeline(
        config, pp_mesh, schedule="Interleaved1F1B", n_microbatches=3, seq_len=SEQ_LEN, device="cpu",
        virtual_stages=2))
    short = build_pipeline(config, pp_mesh, schedule="GPipe", n_microbatches=N_MICROBATCHES, seq_len=20,
                           device="cpu")
    result["errors"]["seq_len"] = error_message(lambda: short.step(steps[0]))
    # materialize=True: the model's initialisation on each stage, the tied head copied from stage 0.
    tied = (short.stage_modules[0].language_model.embed_tokens.weight if rank == 0
            else short.stage_modules[0].lm_head.weight)
    linear = short.stage_modules[0].language_model.layers[str(short.plans[0].layers[-1])].mlp.up_proj.weight
    norm = short.stage_modules[0].language_model.layers[str(short.plans[0].layers[-1])].input_layernorm.weight
    result["init"] = {"tied": tied.detach().double().pow(2).sum().item(), "std": linear.std().item(),
                      "norm_ones": bool(norm.eq(1).all()), "meta": any(p.is_meta for p in short.parameters())}
    result["errors"]["count"] = error_message(lambda: short.step(steps[0][:3]))
    result["errors"]["type"] = error_message(lambda: short.step(steps[0][0]))
    result["errors"]["pad"] = error_message(lambda: build_pipeline(
        config, pp_mesh, n_microbatches=4, seq_len=SEQ_LEN, device="cpu", pad_token_id=config.image_token_id))
    result["errors"]["seq_len_arg"] = error_message(lambda: build_pipeline(
        config, pp_mesh, n_microbatches=4, seq_len=0, device="cpu"))
    return result


@pytest.mark.distributed
def test_pipeline_schedules_match_single_process_training(tmp_path):
    results = run_on_gloo_ranks(_rank_body, WORLD, tmp_path)
    for case in results[0]["cases"]:
        config = moe_config() if case.startswith("moe") else dense_config()
        with torch.device("meta"):
            expected_names = set(Qwen3VLModel(config).state_dict())
        first, last = (results[rank]["cases"][case] for rank in range(WORLD))
        assert first["greedy_equal"] == last["greedy_equal"] == [True] * N_MICROBATCHES, case
        assert first["loss_errors"] == [None, None], (case, first["loss_errors"])
        assert max(last["loss_errors"]) < TOL, (case, last["loss_errors"])
        names = [set(r["weight_errors"]) for r in (first, last)]
        assert names[0] | names[1] == expected_names, case  # every parameter lives on some stage
        assert names[0] & names[1] <= {"lm_head.weight", "language_model.embed_tokens.weight"}, case
        assert any(n.startswith("visual.") for n in names[0]) and not any(n.startswith("visual.") for n in names[1])
        for r in (first, last):
            assert len(r["grad_errors"]) == 2 * len(r["weight_errors"]), case
            worst = max(r["grad_errors"].items(), key=lambda item: item[1])
            assert worst[1] < TOL, (case, worst)
            worst = max(r["weight_errors"].items(), key=lambda item: item[1])
            assert worst[1] < TOL, (case, worst)
            # Every parameter is trained (vision tower and DeepStack mergers included) except unrouted experts.
            assert all("experts" in name for name in r["zero_grads"]), (case, r["zero_grads"])
    assert results[0]["cases"]["Interleaved1F1B/v2"]["stages"] == [0, 2]
    assert results[1]["cases"]["Interleaved1F1B/v2"]["stages"] == [1, 3]
    with torch.device("meta"):
        dense_names = set(Qwen3VLModel(dense_config()).state_dict())
    assert all(("single_rank" in r) != ("single_rank" in r["errors"]) for r in results)
    if "single_rank" in results[0]["errors"]:  # torch < 2.13 with gloo: a clear error instead
        assert "needs torch >= 2.13 with gloo" in results[0]["errors"]["single_rank"], results[0]["errors"]
    for single in (r["single_rank"] for r in results if "single_rank" in r):
        assert single["stages"] == [0, 1] and single["shared_tied"] and set(single["weight_errors"]) == dense_names
        assert max(single["loss_errors"]) < TOL and max(single["grad_errors"].values()) < TOL, single["loss_errors"]
        assert max(single["weight_errors"].values()) < TOL
        assert single["greedy_equal"] == [True] * N_MICROBATCHES  # two local stages: activations handed over
    inits = [r["init"] for r in results]
    assert inits[0]["tied"] == inits[1]["tied"] > 0, inits  # embedding (rank 0) == its head copy (rank 1)
    for init in inits:
        assert abs(init["std"] - 0.02) < 0.002 and init["norm_ones"] and not init["meta"], init
    errors = results[0]["errors"]
    assert "4 decoder layers cannot fill 8 stages" in errors["layers"], errors
    assert "needs n_microbatches (3) to be a multiple of pp_size (2)" in errors["microbatches"], errors
    assert "more than seq_len=20" in errors["seq_len"], errors
    assert "must be a list of 4 packed batches, got 3 of them" in errors["count"], errors
    assert "must be a list of 4 packed batches, got dict" in errors["type"], errors
    assert "'pad_token_id' must be a text token id in [0, 320) other than image_token_id 300" in errors["pad"]
    assert "'seq_len' must be an int >= 1, got 0" in errors["seq_len_arg"], errors
