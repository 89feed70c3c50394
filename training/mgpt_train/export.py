"""Hugging Face model folders in and out of the trainer (``model.hf_checkpoint``, ``checkpoint.export_hf``), and
the export command:

    python -m mgpt_train.export --checkpoint runs/x/checkpoints[/step_N] --out runs/x/hf [--config FILE]

In: a folder written by transformers' ``save_pretrained`` of ``Qwen3VLForConditionalGeneration`` /
``Qwen3VLMoeForConditionalGeneration`` (config.json + model.safetensors or shards with their index).
  * ``run_tokenizer``: its tokenizer (``HFTokenizer``) when the folder has one, else the byte tokenizer;
  * ``run_model_config``: the folder's config as it is (the tokenizer's special ids must equal the config's);
  * ``run_image_config``: patch / temporal / merge sizes of the vision config, image mean / std from
    ``preprocessor_config.json`` when present (its sizes must equal the vision config's); the pixel budget stays
    ``data.min_pixels`` / ``data.max_pixels``;
  * ``load_hf_weights``: every rank reads the safetensors files itself, one file at a time (``safe_open``),
    converts its tensors with ``from_hf_state_dict`` and keeps what its parameters hold: a plain parameter is
    copied, a DTensor parameter (FSDP / TP / EP) gets its shard by ``distribute_tensor(src_data_rank=None)``,
    which slices locally without communication. Peak memory beyond the model: one safetensors file.

Out: ``export_checkpoint`` writes config.json (``Qwen3VLConfig.to_hf``, its ``dtype`` the exported one), the
tokenizer files when the run's tokenizer is a Hugging Face one, the source folder's preprocessor_config.json, and
the weights streamed from a DCP checkpoint of any layout (FSDP / TP / PP / EP / CP shards; DCP reassembles full
tensors): the tensors are planned into safetensors files of at most 5 GB in model order (HF names and layouts,
``to_hf_state_dict``, fused MoE experts in Qwen's published layout -- see ``hf_adapter``; ``model.safetensors``
alone, else ``model-0000i-of-0000n.safetensors`` + the index), and each file's tensors are read from the
checkpoint, converted and written before the next file's are read. Peak memory: one file's tensors (a 30B-A3B
model exports in ~5 GB of CPU memory, not the 124 GB of its fp32 weights).
``--dtype bfloat16`` halves the folder (the checkpoint's fp32 values rounded). The run's configuration comes
from the checkpoint (the trainer stores it there) or from ``--config``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from mgpt_train import checkpoint
from mgpt_train.config import ConfigError, TrainConfig, config_from_dict, load_config, safetensors_files
from mgpt_train.data.images import ImageProcessorConfig
from mgpt_train.data.tokenizer import ByteTokenizer, HFTokenizer
from mgpt_train.model import (Qwen3VLConfig, Qwen3VLModel, experts_layouts_ambiguous, from_hf_state_dict,
                              published_experts, to_hf_state_dict)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
PREPROCESSOR_FILE = "preprocessor_config.json"
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size "5GB"
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_STEP = re.compile(r"^step_(\d+)$")


# ------------------------------------------------------------------------------------------------------------
# In
# ------------------------------------------------------------------------------------------------------------
def run_tokenizer(cfg: TrainConfig) -> ByteTokenizer:
    """The HF checkpoint's tokenizer when its folder has tokenizer files, else the byte tokenizer."""
    folder = cfg.model.hf_checkpoint
    if folder is not None and any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        try:
            return HFTokenizer(folder)
        except ValueError as exc:
            raise ConfigError(f"config key 'model.hf_checkpoint': {exc}") from None
    return ByteTokenizer()


def run_model_config(cfg: TrainConfig, tokenizer: ByteTokenizer) -> Qwen3VLConfig:
    """The model config of the run: preset / hf_config with the tokenizer's vocabulary and image ids, or an HF
    checkpoint's own config (its embedding fixes the vocabulary), checked against the tokenizer."""
    config = cfg.model.build()
    if cfg.model.hf_checkpoint is None:
        return config.with_tokenizer(tokenizer)
    pairs = {"image_token_id": tokenizer.image_token_id, "vision_start_token_id": tokenizer.vision_start_id,
             "vision_end_token_id": tokenizer.vision_end_id}
    wrong = {name: (getattr(config, name), ours) for name, ours in pairs.items() if getattr(config, name) != ours}
    if wrong or tokenizer.vocab_size > config.text.vocab_size:
        kind = type(tokenizer).__name__
        raise ConfigError(f"config key 'model.hf_checkpoint': the {kind} does not fit the model config: "
                          f"(config, tokenizer) ids {wrong}, tokenizer vocabulary {tokenizer.vocab_size} vs "
                          f"embedding rows {config.text.vocab_size}"
                          + ("; add the model's tokenizer files to the folder" if kind == "ByteTokenizer" else ""))
    return config


def run_image_config(cfg: TrainConfig, model_config: Qwen3VLConfig) -> ImageProcessorConfig:
    """Image processing of the run (module docstring)."""
    vision = model_config.vision
    sizes = {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
             "merge_size": vision.spatial_merge_size}
    normalise = {}
    folder = cfg.model.hf_checkpoint
    if folder is not None and (Path(folder) / PREPROCESSOR_FILE).is_file():
        path = Path(folder) / PREPROCESSOR_FILE
        saved = json.loads(path.read_text())
        wrong = {key: (saved[key], ours) for key, ours in sizes.items() if key in saved and saved[key] != ours}
        if wrong:
            raise ConfigError(f"config key 'model.hf_checkpoint': {path} does not match the vision config: "
                              + ", ".join(f"{key} {theirs} (vision config: {ours})"
                                          for key, (theirs, ours) in wrong.items()))
        normalise = {key: tuple(saved[key]) for key in ("image_mean", "image_std") if key in saved}
    return ImageProcessorConfig(**sizes, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                                **normalise)


def _hf_placeholders(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor name of the folder -> a meta tensor of its shape (nothing read)."""
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as opened:
            for name in opened.keys():
                shapes[name] = torch.empty(opened.get_slice(name).get_shape(), device="meta")
    return shapes


@torch.no_grad()
def load_hf_weights(module: torch.nn.Module, folder: str | Path, config: Qwen3VLConfig) -> None:
    """Copy the weights of the HF folder into ``module`` -- a materialised ``Qwen3VLModel`` or pipeline stage,
    plain or parallelized (its state-dict keys are full-model names) -- one safetensors file at a time. The folder
    must hold exactly the parameters of ``Qwen3VLModel(config)`` (ConfigError naming the difference)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    files = safetensors_files(folder)
    placeholders = _hf_placeholders(files)
    try:
        expected = from_hf_state_dict(placeholders, config)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"config key 'model.hf_checkpoint': {exc}") from None
    with torch.device("meta"):
        wanted = Qwen3VLModel(config).state_dict()
    missing, unexpected = sorted(wanted.keys() - expected.keys()), sorted(expected.keys() - wanted.keys())
    wrong = [name for name in wanted.keys() & expected.keys() if wanted[name].shape != expected[name].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"config key 'model.hf_checkpoint': the weights in {folder} do not fit its config: "
                          f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]}")
    targets = module.state_dict()
    for file in files:
        with safe_open(file, framework="pt") as opened:
            real = {name: opened.get_tensor(name) for name in opened.keys()}
        for name, value in from_hf_state_dict({**placeholders, **real}, config).items():
            target = targets.get(name)
            if value.is_meta or target is None:  # in another file / another pipeline stage's parameter
                continue
            value = value.to(device=target.device, dtype=target.dtype)
            if isinstance(target, DTensor):
                value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
                target, value = target.to_local(), value.to_local()
            target.copy_(value)
        del real


# ------------------------------------------------------------------------------------------------------------
# Out
# ------------------------------------------------------------------------------------------------------------
def checkpoint_config(folder: Path) -> TrainConfig | None:
    """The run configuration the trainer stored in checkpoint ``folder`` (None for older checkpoints)."""
    state = torch.load(folder / "rank_0.pt", weights_only=True)
    saved = state["extra"].get("train_config")
    return None if saved is None else config_from_dict(saved)


def export_checkpoint(step_folder: str | Path, out: str | Path, cfg: TrainConfig | None = None, *,
                      dtype: str = "float32", max_shard_bytes: int = SHARD_BYTES, log=print) -> Path:
    """Write the HF folder ``out`` from the DCP checkpoint ``step_folder`` (``.../step_N``) in this process,
    streaming (module docstring). ``cfg``: the run configuration, default the one stored in the checkpoint.
    ``dtype``: "float32" (the checkpoint's values) or "bfloat16" (half the size, as Qwen publishes its weights).
    ``log``: called with one progress line per safetensors file (None: quiet)."""
    from safetensors.torch import save_file

    step_folder, out = Path(step_folder), Path(out)
    if _STEP.match(step_folder.name) is None or not step_folder.is_dir():
        raise FileNotFoundError(f"export: {step_folder} is not a finished checkpoint folder (.../step_N)")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export: 'dtype' must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"export: 'max_shard_bytes' must be an int >= 1, got {max_shard_bytes!r}")
    cfg = cfg or checkpoint_config(step_folder)
    if cfg is None:
        raise ConfigError(f"export: {step_folder} stores no run configuration; pass --config with the run's")
    tokenizer = run_tokenizer(cfg)
    config = run_model_config(cfg, tokenizer)
    with torch.device("meta"):
        model = Qwen3VLModel(config)  # names and shapes only
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:  # the head IS the embedding: transformers re-ties it on load
        shapes.pop("lm_head.weight")
    stored = _stored_tensors(step_folder, shapes)
    torch_dtype = EXPORT_DTYPES[dtype]
    files = _plan_files(shapes, torch_dtype.itemsize, max_shard_bytes)

    # Fused MoE experts go out in Qwen's published layout (transformers 5 and vLLM read it), unless its shapes
    # equal transformers 5's own: transformers would then read it untransposed.
    published = config.is_moe and not experts_layouts_ambiguous(config)
    if config.is_moe and not published and log is not None:
        log(f"export: warning: hidden_size {config.text.hidden_size} equals moe_intermediate_size (x2): the fused "
            "experts are written in transformers 5's layout, which transformers reads; vLLM reads fused Qwen3-VL-MoE "
            "experts in Qwen's published (transposed) layout and would misread them")
    out.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf()
    hf_config.dtype = dtype
    hf_config.save_pretrained(out)
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(out)
    source = cfg.model.hf_checkpoint
    if source is not None and (Path(source) / PREPROCESSOR_FILE).is_file():
        shutil.copyfile(Path(source) / PREPROCESSOR_FILE, out / PREPROCESSOR_FILE)
    weight_map, total = {}, 0
    for index, names in enumerate(files):
        file = "model.safetensors" if len(files) == 1 else f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        # DCP reads only the requested tensors (any layout: FSDP / TP / PP / EP shards reassembled), in this
        # process alone -- also rank 0 of a running job, whose other ranks wait: no collectives.
        state = {"model": {name: torch.empty(shapes[name], dtype=stored[name]) for name in names}}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(state, checkpoint_id=step_folder, no_dist=True)
        tensors = {name: (published_experts(name, value, config) if published else value).to(torch_dtype).contiguous()
                   for name, value in to_hf_state_dict(model, state["model"]).items()}
        del state
        save_file(tensors, out / file, metadata={"format": "pt"})
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        total += size
        del tensors
        if log is not None:
            log(f"export: wrote {out / file} ({index + 1}/{len(files)}, {size / 1e9:.2f} GB)")
    if len(files) > 1:
        index_file = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")
    return out


def _stored_tensors(step_folder: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.dtype]:
    """The dtype of every model tensor in the checkpoint, checked against the model's names and shapes."""
    metadata = dcp.FileSystemReader(str(step_folder)).read_metadata().state_dict_metadata
    found, wrong = {}, []
    for name, shape in shapes.items():
        entry = metadata.get(f"model.{name}")
        if entry is None or not hasattr(entry, "size"):
            continue
        if tuple(entry.size) != shape:
            wrong.append(f"{name} {list(entry.size)} (model: {list(shape)})")
        found[name] = entry.properties.dtype
    missing = sorted(shapes.keys() - found.keys())
    if missing or wrong:
        raise ConfigError(f"export: the checkpoint {step_folder} does not hold the model of the run's config: "
                          f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, wrong shape {wrong[:4]}; "
                          f"pass --config with the run's configuration")
    return found


def _plan_files(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    """The tensors of each safetensors file, in model order, each file at most ``max_bytes`` unless one tensor
    alone is larger (it then gets a file of its own), as transformers' ``save_pretrained`` shards."""
    files, current, current_bytes = [], [], 0
    for name, shape in shapes.items():
        size = math.prod(shape) * itemsize
        if current and current_bytes + size > max_bytes:
            files.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        files.append(current)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgpt_train.export",
                                     description="Write a Hugging Face model folder from a training checkpoint.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder (.../step_N) or a folder of them (the latest is exported)")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--config", default=None, help="the run's config file (default: the one in the checkpoint)")
    parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES),
                        help="dtype of the exported weights (default float32: the checkpoint's values)")
    args = parser.parse_args(argv)
    try:
        folder = Path(args.checkpoint)
        if not _STEP.match(folder.name):
            latest = checkpoint.latest_step(folder)
            if latest is None:
                raise FileNotFoundError(f"export: no finished checkpoint in {folder}")
            folder = checkpoint.step_dir(folder, latest)
        cfg = load_config(args.config) if args.config else None
        out = export_checkpoint(folder, args.out, cfg, dtype=args.dtype)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"mgpt_train.export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
