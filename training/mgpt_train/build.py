"""The pieces a training run is built from, each usable on its own (the trainer, tests building a single-process
reference, benchmarks): the device and process group, the data, the model (whole, parallelized or as pipeline
stages) and the optimizer. ``mgpt_train.train`` documents how a run puts them together."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mgpt_train.config import ConfigError, TrainConfig
from mgpt_train.data import ByteTokenizer, Sample, SampleEncoder, load_jsonl, make_synthetic
from mgpt_train.export import run_image_config, run_model_config
from mgpt_train.initialization import fill_sharded, init_mode, init_model
from mgpt_train.model import Qwen3VLModel
from mgpt_train.parallel_dims import ParallelDims

def run_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the default process group when torchrun launched several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_data(cfg: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out) samples: the synthetic splits, or a JSONL file whose last lines are held out."""
    held = cfg.data.synthetic.heldout_samples
    if cfg.data.jsonl is None:
        return (make_synthetic(cfg.data.synthetic.num_samples, cfg.data.seed, "train"),
                make_synthetic(held, cfg.data.seed, "heldout"))
    samples = load_jsonl(cfg.data.jsonl)
    if held >= len(samples):
        raise ConfigError(f"config key 'data.synthetic.heldout_samples': {held} held-out lines leave no training "
                          f"data in {cfg.data.jsonl} ({len(samples)} samples)")
    return samples[:-held], samples[-held:]


def make_encoder(cfg: TrainConfig, model_config, tokenizer: ByteTokenizer) -> SampleEncoder:
    return SampleEncoder(tokenizer, run_image_config(cfg, model_config))


def check_layout(cfg: TrainConfig, dims: ParallelDims) -> None:
    """ConfigErrors for what this trainer does not combine: bf16 without FSDP."""
    if cfg.model.dtype == "bfloat16" and dims.world_size > 1 and dims.dp_replicate * dims.dp_shard * dims.cp == 1:
        raise ConfigError("config key 'model.dtype': bfloat16 is FSDP2's mixed precision (bf16 compute, fp32 "
                          "weights and reductions) and needs several data/context-parallel ranks (or one process, "
                          "where it is torch.autocast); use float32")


def build_model(cfg: TrainConfig, tokenizer: ByteTokenizer, device: torch.device,
                dims: ParallelDims | None = None, mesh=None) -> Qwen3VLModel:
    """The initial model of the run (module docstring, step 2), parallelized when ``dims`` spans several ranks."""
    config = run_model_config(cfg, tokenizer)
    sharded = init_mode(cfg, config, device) == "sharded"
    if sharded:
        with torch.device("meta"):
            model = Qwen3VLModel(config)
    else:
        model = init_model(cfg, tokenizer, device)
    if dims is not None and dims.world_size > 1:
        from mgpt_train.parallelize import parallelize_qwen3_vl

        model = parallelize_qwen3_vl(model, dims, mesh, activation_checkpointing=cfg.model.activation_checkpointing,
                                     mixed_precision="bf16" if cfg.model.dtype == "bfloat16" else "fp32")
    elif cfg.model.activation_checkpointing:
        from mgpt_train.parallelize import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    if sharded:
        model.to_empty(device=device)
        model.tie_weights()
        fill_sharded(model, cfg, config)
    if cfg.model.compile:
        compile_decoder_layers(model)
    return model


def compile_decoder_layers(part: torch.nn.Module) -> None:
    """``torch.compile`` every decoder layer of a model or pipeline stage (``model.compile``), in place: one
    compiled region per layer, so FSDP / TP / pipeline boundaries stay outside the graphs."""
    from mgpt_train.parallelize import decoder_layers

    for layer in decoder_layers(part):
        layer.compile()


def build_pipelined(cfg: TrainConfig, tokenizer: ByteTokenizer, device: torch.device, dims: ParallelDims, mesh):
    """``mgpt_train.pipeline`` stages parallelized by ``parallelize_pipeline`` and loaded with the seeded model's
    weights (those of a single-process run): 1F1B when there are at least pp micro-batches, else GPipe; every
    micro-batch padded to the largest stage token budget (rounded up to a multiple of 2 x cp x tp)."""
    from mgpt_train.parallelize import parallelize_pipeline
    from mgpt_train.pipeline import build_pipeline

    config = run_model_config(cfg, tokenizer)
    sharded = init_mode(cfg, config, device) == "sharded"
    count, bf16 = cfg.parallel.pp_microbatches, cfg.model.dtype == "bfloat16"
    seq_len = max(s.max_tokens for s in cfg.curriculum_stages())
    count *= cfg.data.grad_accum  # gradient accumulation = more pipeline micro-batches in one schedule step
    pipe = build_pipeline(config, mesh["pp"], schedule="1F1B" if count >= dims.pp else "GPipe",
                          n_microbatches=count, seq_len=seq_len + -seq_len % (2 * dims.cp * dims.tp),
                          device=device,
                          materialize=False, pad_token_id=tokenizer.pad_id,
                          activation_dtype=torch.bfloat16 if bf16 else torch.float32)
    parallelize_pipeline(pipe, dims, mesh, mixed_precision="bf16" if bf16 else "fp32",
                         activation_checkpointing=cfg.model.activation_checkpointing)
    if sharded:
        pipe.init_weights()  # materialises the stages and ties the head copies; the values are replaced next
        for module in pipe.stage_modules:
            fill_sharded(module, cfg, config)
    else:
        pipe.load_full_state_dict(init_model(cfg, tokenizer, device).state_dict())
    if cfg.model.compile:
        for module in pipe.stage_modules:
            compile_decoder_layers(module)
    return pipe


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only and its state created up front (module docstring, step 4)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optimizer.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optim = cfg.optimizer
    # foreach batches the kernel launches on CUDA; on the CPU it buys nothing and the loop is simplest
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                  foreach=device.type == "cuda")
    for param in params:
        optimizer.state[param] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                  "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
    return optimizer
