"""Hugging Face weights in and out of the trainer (mgpt_train.export, mgpt_train.initialization, model.hf_checkpoint,
checkpoint.export_hf, python -m mgpt_train.export), against transformers' own Qwen3-VL(-MoE) models.

Fixtures: a tiny HF Qwen3-VL (dense, tied head) and Qwen3-VL-MoE (untied) built locally from random configs,
weights redrawn at unit scale (HF's 0.02 init makes every softmax flat and hides errors), saved with
``save_pretrained`` next to a local byte-level BPE tokenizer carrying Qwen's special tokens (no downloads) and a
preprocessor_config.json.

- a run from the folder: its config is mirrored, its tokenizer's ids are used, its first step's loss equals a
  float64 cross-entropy of HF's own logits on the same first batch;
- export at the end of the run and ``python -m mgpt_train.export``: transformers loads the folder and its logits
  equal the trained model's (dense and MoE), the tokenizer and preprocessor files come along;
- torchrun, 2 gloo ranks, FSDP2 with ``model.init=sharded``: from the HF folder (its first step's loss equals the
  single-process loss on both ranks' first micro-batches) and on the tiny preset (the exported weights load in
  transformers and reproduce the final checkpoint's logits);
- init "full" vs "sharded" in one process, "auto"'s threshold; bad folders / mismatching image sizes are clear
  errors with exit status 2.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (AutoTokenizer, Qwen3VLConfig as HFQwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeConfig as HFQwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)

from conftest import rel_err
from test_train_model import HF_MOE_TEXT, HF_TEXT, HF_VISION, randomize
from mgpt_train import checkpoint, export, initialization
from mgpt_train.build import load_data
from mgpt_train.config import ConfigError, load_config
from mgpt_train.data import Curriculum
from mgpt_train.data.tokenizer import HFTokenizer
from mgpt_train.model import Qwen3VLConfig, Qwen3VLModel, to_hf_state_dict
from mgpt_train.train import METRICS_FILE, Trainer, main

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
QWEN_SPECIAL = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SMALL = ["--data.synthetic.num_samples=24", "--data.synthetic.heldout_samples=3", "--data.max_tokens=256",
         "--optimizer.lr=1e-3"]
TWO_STEPS = ('--curriculum.stages=[{"name": "sft", "mixture": {"general/shape": 0.5, "vertical/compare": 0.5}, '
             '"steps": 2}]')  # samples with images


def save_tokenizer(folder: Path) -> None:
    """Byte-level BPE without merges (every byte one token) + Qwen's special tokens, saved like a hub tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            additional_special_tokens=QWEN_SPECIAL).save_pretrained(folder)


def save_hf_model(folder: Path, moe: bool, seed: int, patch_size: int = 16) -> None:
    save_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config_cls, model_cls = ((HFQwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe
                             else (HFQwen3VLConfig, Qwen3VLForConditionalGeneration))
    text = dict(HF_MOE_TEXT if moe else HF_TEXT, vocab_size=320)
    config = config_cls(vision_config=HF_VISION, text_config=text, tie_word_embeddings=not moe, **ids)
    randomize(model_cls._from_config(config), seed).save_pretrained(folder)
    (folder / export.PREPROCESSOR_FILE).write_text(json.dumps(
        {"patch_size": patch_size, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.5, 0.5, 0.5]}))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_dense")
    save_hf_model(folder, moe=False, seed=3)
    return folder


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_moe")
    save_hf_model(folder, moe=True, seed=4)
    return folder


def hf_logits(hf, batch: dict, image_token_id: int, vision_start_id: int) -> torch.Tensor:
    """HF's logits of a packed batch: one HF call per sample (its images' patches sliced out), concatenated."""
    bounds = batch["cu_seqlens"].tolist()
    grids = batch["image_grid_thw"]
    patches = grids.prod(-1).tolist()
    out, image, patch = [], 0, 0
    for start, end in zip(bounds, bounds[1:]):
        ids = batch["input_ids"][start:end]
        count = int((ids == vision_start_id).sum())
        used = sum(patches[image:image + count])
        kwargs = {}
        if count:
            kwargs = dict(pixel_values=batch["pixel_values"][patch:patch + used],
                          image_grid_thw=grids[image:image + count])
        mm = (ids == image_token_id).long()[None]
        out.append(hf(input_ids=ids[None], mm_token_type_ids=mm, **kwargs).logits[0])
        image, patch = image + count, patch + used
    return torch.cat(out)


def first_batches(cfg, encoder, world: int) -> list[dict]:
    """The first micro-batch of each data-parallel rank, as the trainer draws them."""
    train, _ = load_data(cfg)
    return [next(Curriculum(cfg.curriculum_stages(), train, encoder, seed=cfg.data.seed, dp_rank=r,
                            dp_size=world))[1] for r in range(world)]


def float64_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.cross_entropy(logits.double(), labels, ignore_index=-100).item()


def load_exported(folder: Path, moe: bool):
    cls = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


# ----------------------------------------------------------------------------------- in: config, tokenizer, loss

def test_run_from_hf_folder_starts_at_hf_loss_and_exports_what_transformers_loads(dense_dir, tmp_path):
    cfg = load_config(None, [*SMALL, TWO_STEPS, f"--model.hf_checkpoint={dense_dir}", "--checkpoint.export_hf=true",
                             f"--output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    hf_source = Qwen3VLForConditionalGeneration.from_pretrained(dense_dir, attn_implementation="eager").eval()
    assert trainer.model.config == Qwen3VLConfig.from_hf(hf_source.config)

    # the tokenizer is the folder's: its ids, its encoding
    tok = AutoTokenizer.from_pretrained(dense_dir)
    assert isinstance(trainer.tokenizer, HFTokenizer)
    for name, token in (("image_token_id", "<|image_pad|>"), ("vision_start_id", "<|vision_start|>"),
                        ("vision_end_id", "<|vision_end|>"), ("im_start_id", "<|im_start|>"),
                        ("im_end_id", "<|im_end|>")):
        assert getattr(trainer.tokenizer, name) == tok.convert_tokens_to_ids(token), name
    text = "How many 3s? ünïcode\n"
    assert trainer.tokenizer.encode(text) == tok(text, add_special_tokens=False)["input_ids"]
    assert trainer.tokenizer.eos_id == tok.eos_token_id and trainer.tokenizer.pad_id == tok.pad_token_id

    (batch,) = first_batches(cfg, trainer.encoder, world=1)
    assert (batch["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).any()
    with torch.no_grad():
        expected = float64_loss(hf_logits(hf_source, batch, trainer.tokenizer.image_token_id,
                                          trainer.tokenizer.vision_start_id), batch["labels"])
    results = trainer.fit()
    assert results["steps"][0]["loss"] == pytest.approx(expected, rel=TOL)
    assert results["steps"][1]["loss"] != results["steps"][0]["loss"]

    # export at the end of the run: transformers loads it and computes the trained model's logits
    exported = tmp_path / "run" / "hf"
    hf_trained = load_exported(exported, moe=False)
    with torch.no_grad():
        ours = trainer.model.logits(batch)
        theirs = hf_logits(hf_trained, batch, trainer.tokenizer.image_token_id, trainer.tokenizer.vision_start_id)
    assert rel_err(ours, theirs) < TOL
    trained_head = hf_trained.lm_head.weight
    assert trained_head.data_ptr() == hf_trained.model.language_model.embed_tokens.weight.data_ptr()  # still tied
    assert not torch.equal(trained_head, hf_source.lm_head.weight)  # the trained weights, not the source's
    assert AutoTokenizer.from_pretrained(exported).convert_tokens_to_ids("<|image_pad|>") == \
        trainer.tokenizer.image_token_id
    assert (exported / export.PREPROCESSOR_FILE).read_text() == (dense_dir / export.PREPROCESSOR_FILE).read_text()

    # the export command writes the same folder from the checkpoint alone
    again = tmp_path / "again"
    assert export.main(["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--out", str(again)]) == 0
    first, second = load_file(exported / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # checkpoint.export_dtype=bfloat16: the same folder with the weights rounded to bf16
    trainer.cfg.checkpoint.export_dtype = "bfloat16"
    trainer.export_hf()
    halved = load_file(exported / "model.safetensors")
    assert halved.keys() == first.keys()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, first[k].to(torch.bfloat16)) for k, v in halved.items())


def test_moe_folder_round_trip_through_export(moe_dir, tmp_path):
    cfg = load_config(None, [*SMALL, TWO_STEPS, f"--model.hf_checkpoint={moe_dir}", "--checkpoint.export_hf=true",
                             f"--output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    assert trainer.model.config.is_moe and not trainer.model.config.tie_word_embeddings
    trainer.fit()
    hf_trained = load_exported(tmp_path / "hf", moe=True)
    (batch,) = first_batches(cfg, trainer.encoder, world=1)
    with torch.no_grad():
        ours = trainer.model.logits(batch)
        theirs = hf_logits(hf_trained, batch, trainer.tokenizer.image_token_id, trainer.tokenizer.vision_start_id)
    assert rel_err(ours, theirs) < TOL
    # the source folder (transformers 5's layout) in, Qwen's published layout out: fused experts transposed
    experts = "model.language_model.layers.0.mlp.experts"
    source, exported = load_file(moe_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert source[f"{experts}.gate_up_proj"].shape == (6, 64, 96)
    assert source[f"{experts}.down_proj"].shape == (6, 96, 32)
    assert exported[f"{experts}.gate_up_proj"].shape == (6, 96, 64)
    assert exported[f"{experts}.down_proj"].shape == (6, 32, 96)
    # ... which the trainer reads back (the published layout in)
    again = Qwen3VLModel(trainer.model.config)
    export.load_hf_weights(again, tmp_path / "hf", trainer.model.config)
    assert all(torch.equal(t, trainer.model.state_dict()[name]) for name, t in again.state_dict().items())


def test_export_of_ambiguous_expert_shapes_keeps_transformers_layout_and_warns(tmp_path):
    """hidden 128 == 2 x 64: both fused-experts layouts have one shape, transformers would read the published one
    untransposed -- the export writes transformers 5's layout and says what that means for vLLM."""
    cfg = load_config(None, [*SMALL, "--model.preset=tiny_moe", "--model.text.moe_intermediate_size=64"])
    config = export.run_model_config(cfg, export.run_tokenizer(cfg))
    torch.manual_seed(0)
    model = Qwen3VLModel(config)
    step = checkpoint.save(0, model, None, {}, tmp_path / "checkpoints")
    lines = []
    export.export_checkpoint(step, tmp_path / "hf", cfg, log=lines.append)
    assert "warning: hidden_size 128 equals moe_intermediate_size (x2)" in lines[0] and "vLLM" in lines[0]
    hf = load_exported(tmp_path / "hf", moe=True)
    ours = to_hf_state_dict(model)
    assert all(torch.equal(t, ours[name]) for name, t in hf.state_dict().items())


# ----------------------------------------------------------------------------------- initialisation modes

def test_full_and_sharded_init_in_one_process(tmp_path):
    models = {}
    for mode in ("full", "sharded"):
        trainer = Trainer(load_config(None, [*SMALL, TWO_STEPS, f"--model.init={mode}",
                                             f"--output_dir={tmp_path / mode}"]))
        models[mode] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        results = trainer.fit()
        assert all(math.isfinite(s["loss"]) for s in results["steps"])
        assert trainer.model.lm_head.weight is trainer.model.language_model.embed_tokens.weight
    # the same rules (normal(0, 0.02) matrices, unit norms), other draws
    for name, full in models["full"].items():
        sharded = models["sharded"][name]
        if full.dim() >= 2:
            assert not torch.equal(full, sharded), name
            assert sharded.std().item() == pytest.approx(0.02, rel=0.2), name
        else:
            assert torch.equal(full, sharded), name


def test_auto_init_is_sharded_above_a_quarter_of_device_memory(monkeypatch):
    cfg = load_config()
    config = Qwen3VLConfig.tiny()
    parameter_bytes = 4 * sum(p.numel() for p in Qwen3VLModel(config).parameters())
    monkeypatch.setattr(initialization, "device_memory", lambda device: 4 * parameter_bytes)
    assert initialization.init_mode(cfg, config, torch.device("cpu")) == "full"
    monkeypatch.setattr(initialization, "device_memory", lambda device: 4 * parameter_bytes - 4)
    assert initialization.init_mode(cfg, config, torch.device("cpu")) == "sharded"
    assert initialization.init_mode(load_config(None, ["--model.init=full"]), config, torch.device("cpu")) == "full"


# ----------------------------------------------------------------------------------- torchrun, 2 ranks

def torchrun(tmp_path: Path, *overrides: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                          "mgpt_train.train", *overrides, f"--output_dir={tmp_path}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads((tmp_path / METRICS_FILE).read_text())


# data ranks: whose first micro-batches make the first step (tp / pp ranks share one)
@pytest.mark.distributed
@pytest.mark.parametrize("layout, data_ranks", [
    (["--parallel.dp_shard=2"], 2),
    (["--parallel.dp_shard=1", "--parallel.tp=2"], 1),
    (["--parallel.dp_shard=1", "--parallel.pp=2", "--parallel.pp_microbatches=2"], 1),
], ids=["fsdp", "tp", "pp"])
def test_torchrun_sharded_init_from_hf_folder_starts_at_its_loss(dense_dir, tmp_path, layout, data_ranks):
    common = [*SMALL, TWO_STEPS, f"--model.hf_checkpoint={dense_dir}"]
    saved = torchrun(tmp_path, *common, "--model.init=sharded", *layout)
    reference = Trainer(load_config(None, [*common, f"--output_dir={tmp_path / 'reference'}"]))
    with torch.no_grad():
        outs = [reference.model(batch) for batch in first_batches(reference.cfg, reference.encoder, data_ranks)]
    tokens = sum(int(out["n_tokens"]) for out in outs)
    expected = sum(out["loss"].item() * int(out["n_tokens"]) for out in outs) / tokens
    assert saved["steps"][0]["loss"] == pytest.approx(expected, rel=TOL)


@pytest.mark.distributed
def test_torchrun_fsdp_sharded_init_tiny_preset_exports_loadable_weights(tmp_path):
    saved = torchrun(tmp_path, *SMALL, TWO_STEPS, "--model.init=sharded", "--parallel.dp_shard=2",
                     "--checkpoint.export_hf=true")
    assert all(math.isfinite(s["loss"]) for s in saved["steps"])
    cfg = load_config(tmp_path / "config.json")
    tokenizer = export.run_tokenizer(cfg)
    with torch.device("meta"):
        ours = Qwen3VLModel(export.run_model_config(cfg, tokenizer))
    ours.to_empty(device="cpu")
    ours.tie_weights()
    with pytest.warns(UserWarning, match="saved by 2 ranks, loading on 1"):
        checkpoint.load(ours, None, tmp_path / "checkpoints", restore_rng=False)
    # each FSDP rank drew its own shard: the two row halves of every matrix are independent draws (identical
    # seeds would leave them equal up to two small optimizer steps)
    for name, param in ours.named_parameters():
        if param.dim() == 2 and param.shape[0] % 2 == 0:
            top, bottom = param.detach().chunk(2)
            assert rel_err(top, bottom) > 0.5, name
    hf = load_exported(tmp_path / "hf", moe=False)
    # the folder (no tokenizer files: the byte tokenizer's ids are in its config) starts a new run
    again = Trainer(load_config(None, [*SMALL, TWO_STEPS, f"--model.hf_checkpoint={tmp_path / 'hf'}",
                                       f"--output_dir={tmp_path / 'again'}"]))
    assert type(again.tokenizer).__name__ == "ByteTokenizer"
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    (batch,) = first_batches(cfg, again.encoder, world=1)
    with torch.no_grad():
        assert rel_err(ours.logits(batch), hf_logits(hf, batch, tokenizer.image_token_id,
                                                     tokenizer.vision_start_id)) < TOL

    # streamed into several files (at most 200 kB each unless one tensor is larger) in bf16: the same tensors
    # rounded, an index transformers follows, one progress line per file
    lines = []
    step_folder = checkpoint.step_dir(tmp_path / "checkpoints", checkpoint.latest_step(tmp_path / "checkpoints"))
    sharded = export.export_checkpoint(step_folder, tmp_path / "hf_bf16",
                                       dtype="bfloat16", max_shard_bytes=200_000, log=lines.append)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(lines) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all(line.startswith("export: wrote ") for line in lines)
    single = load_file(tmp_path / "hf" / "model.safetensors")
    streamed = {name: tensor for file in files for name, tensor in load_file(sharded / file).items()}
    assert streamed.keys() == single.keys() == index["weight_map"].keys()
    for name, tensor in streamed.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, single[name].to(torch.bfloat16)), name
        size = tensor.numel() * 2
        assert size > 200_000 or sum(t.numel() * 2 for n, t in streamed.items()
                                     if index["weight_map"][n] == index["weight_map"][name]) <= 200_000, name
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in streamed.values())
    hf_bf16 = load_exported(sharded, moe=False)
    assert hf_bf16.config.dtype == torch.bfloat16
    assert torch.equal(hf_bf16.lm_head.weight, hf.lm_head.weight.to(torch.bfloat16))
    # a configuration that is not the checkpoint's model, a dtype we do not write: clear errors
    other = load_config(None, [*SMALL, "--model.preset=tiny_moe"])
    with pytest.raises(ConfigError, match="does not hold the model of the run's config: missing \\['language_model"):
        export.export_checkpoint(step_folder, tmp_path / "hf_moe", other)
    with pytest.raises(ValueError, match="'dtype' must be one of \\['bfloat16', 'float32'\\], got 'float16'"):
        export.export_checkpoint(step_folder, tmp_path / "hf_fp16", dtype="float16")
    with pytest.raises(ConfigError, match="'checkpoint.export_dtype': expected 'float32' or 'bfloat16'"):
        load_config(None, ["--checkpoint.export_dtype=float16"])


# ----------------------------------------------------------------------------------- bad inputs

def test_bad_hf_folders_are_clear_errors(tmp_path, dense_dir, capsys):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((dense_dir / "config.json").read_text())
    no_tokenizer = tmp_path / "no_tokenizer"  # its special ids are not the byte tokenizer's
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((dense_dir / name).read_bytes())
    mismatch = tmp_path / "mismatch"
    save_hf_model(mismatch, moe=False, seed=5, patch_size=14)
    capsys.readouterr()  # transformers' progress bars
    cases = [(tmp_path / "missing", "is not a Hugging Face model folder (no config.json there)"),
             (no_weights, "holds no *.safetensors weights"),
             (no_tokenizer, "the ByteTokenizer does not fit the model config: (config, tokenizer) ids "
                            "{'image_token_id': (261, 262)"),
             (mismatch, "preprocessor_config.json does not match the vision config: patch_size 14 (vision config: "
                        "16)")]
    for folder, message in cases:
        assert main([*SMALL, f"--model.hf_checkpoint={folder}", f"--output_dir={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mgpt_train.train: error: config key 'model.hf_checkpoint'") and message in err, err


def test_bad_init_keys_and_export_arguments(tmp_path, dense_dir, capsys):
    with pytest.raises(ConfigError, match="'model.init': expected one of \\['auto', 'full', 'sharded'\\], got 'lazy'"):
        load_config(None, ["--model.init=lazy"])
    with pytest.raises(ConfigError, match="set one of them"):
        load_config(None, [f"--model.hf_checkpoint={dense_dir}", f"--model.hf_config={dense_dir}"])
    assert export.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "no finished checkpoint in" in capsys.readouterr().err
