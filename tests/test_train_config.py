"""Training config: defaults, TOML/JSON files, typed command-line overrides, errors naming the bad key."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mgpt_train.config import ConfigError, TrainConfig, config_from_argv, load_config
from mgpt_train.data.curriculum import default_curriculum
from mgpt_train.model.config import Qwen3VLConfig

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"


def test_defaults_are_the_tiny_cpu_file():
    cfg = load_config()
    assert cfg == load_config(CONFIGS / "tiny_cpu.toml")
    # The three stages are the data package's default curriculum, shortened, with this run's lr and token budget.
    assert cfg.curriculum_stages() == default_curriculum(steps=(4, 4, 4), peak_lr=cfg.optimizer.lr,
                                                         max_tokens=cfg.data.max_tokens)
    assert cfg.model.build().text.num_experts == 0  # the tiny dense preset
    assert cfg.checkpoint_dir == Path("runs/tiny_cpu/checkpoints") and cfg.checkpoint.resume_step == "latest"
    assert cfg.trace_dir == Path("runs/tiny_cpu/traces")
    assert cfg.parallel.dims(world_size=2).dp_shard == 2


def test_qwen3_vl_30b_a3b_file_fits_two_h100_nodes():
    cfg = load_config(CONFIGS / "qwen3_vl_30b_a3b.toml")
    p = cfg.parallel
    world = p.pp * p.dp_replicate * p.dp_shard * p.cp * p.tp
    assert world == 16 and world % 8 == 0
    dims = p.dims(world_size=world)
    model = cfg.model.build()
    text = model.text
    assert (text.num_hidden_layers, text.hidden_size, text.num_experts, text.top_k) == (48, 2048, 128, 8)
    assert model.vision.depth == 27
    dims.check_model(num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
                     num_experts=text.num_experts)
    assert text.num_hidden_layers % dims.pp == 0 and p.pp_microbatches >= dims.pp
    assert 8 % (dims.tp * dims.cp) == 0 and (dims.tp * dims.dp_shard * dims.cp) == 8  # one stage per node
    assert cfg.model.dtype == "bfloat16" and cfg.profiling.nvtx and cfg.checkpoint.every == 250


def test_qwen3_vl_30b_a3b_layout_gives_each_rank_a_sixteenth_of_the_parameters():
    """The file's layout built for real on 16 simulated ranks (torch's fake process group: this process plays one
    rank at a time, collectives do nothing; stages on the meta device): each rank's parameter shards are ~1/16
    of the model -- nothing of size is replicated (experts and routers are sharded over their tp ranks too) --
    so weights, gradients and two Adam moments in fp32 take under 32 GiB of an 80 GB H100."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mgpt_train.model import Qwen3VLModel
    from mgpt_train.parallelize import parallelize_pipeline
    from mgpt_train.pipeline import build_pipeline

    cfg = load_config(CONFIGS / "qwen3_vl_30b_a3b.toml")
    config, world = cfg.model.build(), 16
    local_counts = []
    for rank in range(world):
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        try:
            dims = cfg.parallel.dims(world_size=world)
            mesh = dims.build_mesh("cpu")
            pipe = build_pipeline(config, mesh["pp"], n_microbatches=cfg.parallel.pp_microbatches, seq_len=4096,
                                  device="cpu", materialize=False, activation_dtype=torch.bfloat16)
            parallelize_pipeline(pipe, dims, mesh, mixed_precision="bf16", activation_checkpointing=True)
            local_counts.append(sum((p.to_local() if isinstance(p, DTensor) else p).numel()
                                    for p in pipe.parameters()))
        finally:
            dist.destroy_process_group()
    with torch.device("meta"):
        total = sum(p.numel() for p in Qwen3VLModel(config).parameters())  # 31.07 B
    assert total <= sum(local_counts) < 1.001 * total  # only norm weights are replicated (over tp)
    assert max(local_counts) < 1.02 * total / world
    assert max(local_counts) * 16 / 2**30 < 32  # fp32 weights, gradients, Adam moments: GiB per GPU


def test_typed_overrides():
    cfg = load_config(overrides=[
        "--optimizer.lr=3e-4", "--optimizer.betas=[0.8,0.99]", "--optimizer.grad_clip=none",
        "--curriculum.stages.0.steps=7", "--curriculum.stages.1.mixture.general=0.25", "--profiling.nvtx=yes",
        "--model.text.num_hidden_layers=2", "--data.synthetic={\"num_samples\": 9}", "checkpoint.resume=12",
        "--output_dir=/tmp/x", "--optimizer.lr=5e-4",  # applied in order: the last one wins
    ])
    assert cfg.optimizer.lr == 5e-4 and cfg.optimizer.betas == (0.8, 0.99) and cfg.optimizer.grad_clip is None
    assert cfg.curriculum.stages[0].steps == 7
    assert cfg.curriculum.stages[1].mixture == {"general": 0.25, "vertical": 0.3}
    assert cfg.curriculum_stages()[1].peak_lr == 5e-4 * 0.5 and cfg.curriculum_stages()[1].min_lr == 5e-4 * 0.05
    assert cfg.profiling.nvtx is True
    assert cfg.model.text == {"num_hidden_layers": 2} and cfg.model.build().text.num_hidden_layers == 2
    assert cfg.data.synthetic.num_samples == 9 and cfg.data.synthetic.heldout_samples == 64
    assert cfg.checkpoint.resume_step == 12 and cfg.checkpoint_dir == Path("/tmp/x/checkpoints")
    assert cfg.trace_dir == Path("/tmp/x/traces")


@settings(max_examples=25, deadline=None)
@given(lr=st.floats(1e-9, 10.0), steps=st.integers(1, 10**6), nvtx=st.booleans())
def test_override_values_round_trip(lr, steps, nvtx):
    cfg = load_config(overrides=[f"--optimizer.lr={lr!r}", f"--curriculum.stages.2.steps={steps}",
                                 f"--profiling.nvtx={str(nvtx).lower()}"])
    assert (cfg.optimizer.lr, cfg.curriculum.stages[2].steps, cfg.profiling.nvtx) == (lr, steps, nvtx)


def test_partial_file_and_json_round_trip(tmp_path):
    partial = tmp_path / "partial.toml"
    partial.write_text('[optimizer]\nlr = 2e-5\n[data.synthetic]\nnum_samples = 5\n'
                       '[[curriculum.stages]]\nname = "only"\nmixture = { general = 1 }\nepochs = 0.5\n')
    cfg = load_config(partial, ["--model.text.mrope_section=[8,4,4]"])
    assert cfg.optimizer.lr == 2e-5 and cfg.optimizer.weight_decay == TrainConfig().optimizer.weight_decay
    assert cfg.data.synthetic.num_samples == 5 and cfg.data.max_tokens == TrainConfig().data.max_tokens
    assert [(s.name, s.epochs, s.mixture) for s in cfg.curriculum.stages] == [("only", 0.5, {"general": 1.0})]
    saved = tmp_path / "resolved.json"
    cfg.save(saved)
    assert json.loads(saved.read_text())["model"]["text"] == {"mrope_section": [8, 4, 4]}
    assert load_config(saved) == cfg


def test_model_from_a_hugging_face_config(tmp_path):
    Qwen3VLConfig.tiny_moe().to_hf().save_pretrained(tmp_path)
    cfg = load_config(overrides=[f"--model.hf_config={tmp_path}", "--model.text.top_k=3"])
    assert cfg.model.build() == dataclasses.replace(
        Qwen3VLConfig.tiny_moe(), text=dataclasses.replace(Qwen3VLConfig.tiny_moe().text, top_k=3))
    with pytest.raises(ConfigError, match="config key 'model.hf_config': cannot read"):
        load_config(overrides=[f"--model.hf_config={tmp_path / 'missing'}"])


def test_config_from_argv(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"optimizer": {"lr": 0.5}}))
    assert config_from_argv(["--config", str(path), "--optimizer.eps=0.1"]).optimizer.eps == 0.1
    assert config_from_argv([f"--config={path}"]).optimizer.lr == 0.5
    with pytest.raises(ConfigError, match="--config needs a path"):
        config_from_argv(["--config"])


@pytest.mark.parametrize("override, match", [
    ("--optimizer.lrr=1", r"unknown config key 'optimizer.lrr'; did you mean: optimizer.lr"),
    ("--checkpoint.evry=3", r"unknown config key 'checkpoint.evry'; did you mean: checkpoint.every"),
    ("--model.text.hiden_size=3", r"unknown config key 'model.text.hiden_size'; did you mean: model.text.hidden_size"),
    ("--optimizer.lr=abc", r"config key 'optimizer.lr': expected float, got 'abc'"),
    ("--parallel.tp=1.5", r"config key 'parallel.tp': expected int, got '1.5'"),
    ("--profiling.nvtx=maybe", r"config key 'profiling.nvtx': expected bool"),
    ("--optimizer.betas=[0.9]", r"config key 'optimizer.betas': expected 2 values"),
    ("--optimizer.betas=(0.9,0.9)", r"config key 'optimizer.betas': expected JSON"),
    ("--curriculum.stages.5.steps=1", r"'5' is not an index of curriculum.stages \(length 3\)"),
    ("--optimizer.lr.x=1", r"optimizer.lr is a value, not a table"),
    ("optimizer.lr", r"expected --key.sub=value"),
    ("--parallel.tp=0", r"config key 'parallel.tp': expected an int >= 1, got 0"),
    ("--optimizer.betas=[0.9,1.0]", r"config key 'optimizer.betas': expected two floats in \[0, 1\)"),
    ("--curriculum.stages.0.mixture.general=-1", r"'curriculum.stages.0': CurriculumStage 'domain_injection': "
                                                 r"mixture weight of 'general' must be a finite number > 0"),
    ("--curriculum.stages.2.epochs=1", r"'curriculum.stages.2': .* give exactly one of steps or epochs"),
    ("--curriculum.stages.1.trainable.eyes=false", r"unknown trainable parts \['eyes'\]"),
    ("--curriculum.stages.1.max_sample_tokens=2000", r"max_sample_tokens must be in \[1, max_tokens=1024\]"),
    ("--checkpoint.resume=soon", r"config key 'checkpoint.resume': expected 'latest', 'never' or a step number"),
    ("--model.preset=huge", r"config key 'model.preset': unknown preset 'huge'; known: \['tiny'"),
    ("--model.dtype=float16", r"config key 'model.dtype': expected 'float32' or 'bfloat16'"),
    ("--model.text.head_dim=48", r"config key 'model': Qwen3VLConfig: mrope_section .* must sum to head_dim"),
    ("--data.min_pixels=100000", r"config key 'data.min_pixels': expected <= data.max_pixels"),
    ("--data.grad_accum=0", r"config key 'data.grad_accum': expected an int >= 1, got 0"),
    ("--data.prefetch=-1", r"config key 'data.prefetch': expected an int >= 0, got -1"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "c.yaml").write_text("a: 1\n")
    with pytest.raises(ConfigError, match="expected a .toml or .json file"):
        load_config(tmp_path / "c.yaml")
    cases = {
        '[optimiser]\nlr = 1.0\n': r"unknown config key 'optimiser'; did you mean: optimizer",
        '[data]\nmax_token = 5\n': r"unknown config key 'data.max_token'; did you mean: data.max_tokens",
        '[[curriculum.stages]]\nname = "a"\n': r"'curriculum.stages.0': missing required field\(s\) \['mixture'\]",
        '[[curriculum.stages]]\nname = "a"\nmixture = {x = 1}\nsteps = 1\n[[curriculum.stages]]\nname = "a"\n'
        'mixture = {x = 1}\nsteps = 2\n': r"config key 'curriculum.stages': expected unique stage names",
        '[optimizer]\nlr = "fast"\n': r"config key 'optimizer.lr': expected float, got 'fast'",
        '[parallel]\ntp = true\n': r"config key 'parallel.tp': expected int, got True",
        'model = 3\n': r"config key 'model': expected a table of ModelConfig fields",
    }
    for i, (text, match) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config(path)
