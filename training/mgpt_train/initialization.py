"""How the run's initial weights come to be (``model.init``; ``mgpt_train.build.build_model`` uses these):

    "full"     every rank builds the whole model (meta device, ``to_empty``), initialises it by ``init_weights``
               after ``torch.manual_seed(data.seed)`` or loads the HF checkpoint (``init_model``), then parallelizes
               it: the same weights on every rank, in every run and for every layout.
    "sharded"  the model is built and parallelized on the meta device; ``to_empty`` then materialises only this
               rank's shards, which ``fill_sharded`` fills: seeded per module and shard (``init_sharded_weights``)
               or from the HF checkpoint (``mgpt_train.export.load_hf_weights``, every rank reading the files and
               keeping its shards). No rank ever holds the full model -- what a 30B model needs. Seeded values
               DEPEND ON THE LAYOUT: a run with other parallel degrees starts from other random weights (HF
               weights do not).
    "auto"     "sharded" when the fp32 parameters take more than a quarter of the device's memory (CPU: of the
               physical RAM), else "full" (``init_mode``).
"""

from __future__ import annotations

import os
import zlib

import torch

from mgpt_train.config import TrainConfig
from mgpt_train.data.tokenizer import ByteTokenizer
from mgpt_train.export import load_hf_weights, run_model_config
from mgpt_train.model import Qwen3VLConfig, Qwen3VLModel
from mgpt_train.model.qwen3_vl import init_module_weights


def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device`` (CPU: physical RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def init_mode(cfg: TrainConfig, config: Qwen3VLConfig, device: torch.device) -> str:
    """``model.init`` with "auto" resolved (module docstring)."""
    if cfg.model.init != "auto":
        return cfg.model.init
    with torch.device("meta"):
        parameter_bytes = sum(p.numel() * p.element_size() for p in Qwen3VLModel(config).parameters())
    return "sharded" if parameter_bytes > device_memory(device) / 4 else "full"


def init_model(cfg: TrainConfig, tokenizer: ByteTokenizer, device: torch.device) -> Qwen3VLModel:
    """The run's full initial model on ``device``: built on the meta device, materialised, then loaded from the HF
    checkpoint or initialised after ``torch.manual_seed(data.seed)``."""
    with torch.device("meta"):
        model = Qwen3VLModel(run_model_config(cfg, tokenizer))
    model.to_empty(device=device)
    if cfg.model.hf_checkpoint is not None:
        model.tie_weights()
        load_hf_weights(model, cfg.model.hf_checkpoint, model.config)
    else:
        torch.manual_seed(cfg.data.seed)
        model.init_weights()
    return model


def _shard_coordinate(param: torch.Tensor) -> tuple:
    """(mesh dim name, index) of each mesh dimension that shards ``param`` (empty for a plain tensor)."""
    placements = getattr(param, "placements", None)
    if placements is None:
        return ()
    mesh = param.device_mesh
    names = mesh.mesh_dim_names or tuple(range(mesh.ndim))
    coordinate = mesh.get_coordinate()
    return tuple((names[i], coordinate[i]) for i, placement in enumerate(placements) if not placement.is_replicate())


@torch.no_grad()
def init_sharded_weights(root: torch.nn.Module, seed: int, tie_word_embeddings: bool) -> None:
    """Initialise the materialised (``to_empty``) parameters of ``root`` -- a model or a pipeline stage, plain
    tensors or DTensor shards -- by the model's rules (``init_module_weights``) on the local shards, each module
    after ``torch.manual_seed`` of a hash of (seed, module name, the mesh coordinates of its shards): replicas of a
    shard (HSDP replicas, the tp ranks of the unsplit vision tower) draw the same numbers and different shards
    different ones, on any device (DTensor's own random ops are layout-aware only on CUDA). A tied head draws
    with the embedding's name, so its copy on the last pipeline stage equals stage 0's embedding."""
    from torch.distributed.tensor import DTensor

    for name, module in root.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        key = name.replace("_checkpoint_wrapped_module.", "")
        if tie_word_embeddings and key == "lm_head":
            key = "language_model.embed_tokens"
        coordinates = [_shard_coordinate(p) for p in own.values()]
        torch.manual_seed(zlib.crc32(f"{seed}|{key}|{coordinates}".encode()))
        originals = dict(module._parameters)
        # the module sees its local shards as plain parameters (same storage) while the rules fill them
        module._parameters.update({n: torch.nn.Parameter(p.to_local(), requires_grad=False)
                                   for n, p in own.items() if isinstance(p, DTensor)})
        try:
            init_module_weights(module)
        finally:
            module._parameters.update(originals)
    torch.manual_seed(seed)  # leave every rank's generator as a full init does, not at its last shard's seed


def fill_sharded(module: torch.nn.Module, cfg: TrainConfig, config: Qwen3VLConfig) -> None:
    """The values of the materialised shards of a sharded init: the HF checkpoint's, else seeded."""
    if cfg.model.hf_checkpoint is not None:
        load_hf_weights(module, cfg.model.hf_checkpoint, config)
    else:
        init_sharded_weights(module, cfg.data.seed, config.tie_word_embeddings)
