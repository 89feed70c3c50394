"""Pipeline parallelism, the plan: which decoder layers each stage runs (``split_layers``, ``plan_stages``,
``StagePlan``), which schedules fit (``check_schedule``), and the micro-batches padded to the fixed length the
stages exchange (``pad_microbatch``). ``mgpt_train.pipeline`` documents the design and builds the stages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mgpt_train.model.attention import AttentionInfo
from mgpt_train.model.config import Qwen3VLConfig
from mgpt_train.model.positions import mrope_position_ids
from mgpt_train.model.qwen3_vl import IGNORE_INDEX, check_batch, padding_row_mask

SCHEDULE_NAMES = ("GPipe", "1F1B", "Interleaved1F1B")  # torch.distributed.pipelining's schedules we run

# --------------------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StagePlan:
    index: int  # global stage index in [0, num_stages)
    num_stages: int
    rank: int  # pp rank that runs it
    layers: range  # global decoder-layer indices
    deepstack_taps: int  # DeepStack taps of the model (added after layers 0 .. taps - 1)
    moe: bool  # the model has MoE layers: the running router statistics cross every stage boundary

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def pending_in(self) -> int:
        """DeepStack taps received from the previous stage (the first stage makes them itself)."""
        return 0 if self.is_first else max(0, self.deepstack_taps - self.layers.start)

    @property
    def pending_out(self) -> int:
        """DeepStack taps passed on: those of layers after this stage."""
        return 0 if self.is_last else max(0, self.deepstack_taps - self.layers.stop)


def split_layers(num_layers: int, num_stages: int, layers_per_stage=None) -> list[range]:
    """Contiguous layer blocks: L // S each, the L % S extra layers to stages 1, 2, ... (see the module doc)."""
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"pipeline: 'layers_per_stage' must hold {num_stages} counts >= 1 summing to the "
                             f"{num_layers} decoder layers, got {counts}")
    else:
        if num_layers < num_stages:
            raise ValueError(f"pipeline: {num_layers} decoder layers cannot fill {num_stages} stages (pp_size x "
                             f"virtual_stages); every stage needs at least one layer")
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (1 <= s <= extra) for s in range(num_stages)]
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def plan_stages(config: Qwen3VLConfig, pp_size: int, virtual_stages: int = 1, layers_per_stage=None
                ) -> list[StagePlan]:
    """Every stage of the pipeline (all ranks), in stage order."""
    for name, value in (("pp_size", pp_size), ("virtual_stages", virtual_stages)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"pipeline: '{name}' must be an int >= 1, got {value!r}")
    num_stages = pp_size * virtual_stages
    blocks = split_layers(config.text.num_hidden_layers, num_stages, layers_per_stage)
    taps = len(config.vision.deepstack_visual_indexes)
    return [StagePlan(s, num_stages, s % pp_size, block, taps, config.is_moe) for s, block in enumerate(blocks)]


def check_schedule(schedule: str, n_microbatches: int, pp_size: int, virtual_stages: int) -> None:
    """Errors for a schedule that cannot run these degrees (checked before any stage is built)."""
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"pipeline: unknown schedule {schedule!r}; expected one of {sorted(SCHEDULE_NAMES)}")
    if not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ValueError(f"pipeline: 'n_microbatches' must be an int >= 1, got {n_microbatches!r}")
    if schedule == "Interleaved1F1B":
        # Stricter than torch's current rule, and the rule of its older releases: whole rounds of pp micro-batches.
        if n_microbatches % pp_size:
            raise ValueError(f"pipeline: schedule 'Interleaved1F1B' needs n_microbatches ({n_microbatches}) to be "
                             f"a multiple of pp_size ({pp_size})")
        return
    if virtual_stages != 1:
        raise ValueError(f"pipeline: schedule {schedule!r} runs one stage per rank; virtual_stages="
                         f"{virtual_stages} needs 'Interleaved1F1B'")
    if schedule == "1F1B" and n_microbatches < pp_size:
        raise ValueError(f"pipeline: schedule '1F1B' needs n_microbatches ({n_microbatches}) >= pp_size "
                         f"({pp_size})")


# --------------------------------------------------------------------------------------------------------------
# Micro-batches padded to a fixed length
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PaddedMicroBatch:
    input_ids: torch.Tensor  # int64 [seq_len]
    labels: torch.Tensor  # int64 [seq_len], -100 on the pad sample
    cu_seqlens: torch.Tensor  # int32 [S + 1 (+ 1 for the pad sample)]
    position_ids: torch.Tensor  # int64 [3, seq_len]
    info: AttentionInfo
    label_rows: torch.Tensor  # int64 rows with a label
    image_rows: torch.Tensor  # int64 rows holding image tokens
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor  # int64 [N, 3]
    tokens: int  # real (unpadded) tokens
    row_mask: torch.Tensor | None  # bool [seq_len], False on padding (MoE router statistics); None: dense / no pad


def pad_microbatch(batch: dict, config: Qwen3VLConfig, seq_len: int, device, pad_token_id: int = 0
                   ) -> PaddedMicroBatch:
    """One packed batch padded to ``seq_len`` with a pad sample (see the module docstring)."""
    check_batch(batch, config)
    if "labels" not in batch:
        raise ValueError("pipeline: every micro-batch needs 'labels' (the last stage computes the loss)")
    tokens = batch["input_ids"].shape[0]
    if tokens > seq_len:
        raise ValueError(f"pipeline: a micro-batch holds {tokens} tokens, more than seq_len={seq_len}; pack "
                         f"micro-batches to at most seq_len tokens")
    pad = seq_len - tokens
    real = tokens - int(batch.get("pad_tokens", 0))  # a batch may arrive padded already (pad_packed_batch)
    input_ids = torch.cat([batch["input_ids"].cpu(), torch.full((pad,), pad_token_id, dtype=torch.int64)])
    labels = torch.cat([batch["labels"].cpu(), torch.full((pad,), IGNORE_INDEX, dtype=torch.int64)])
    cu_seqlens = batch["cu_seqlens"].cpu()
    if pad:
        cu_seqlens = torch.cat([cu_seqlens, torch.tensor([seq_len], dtype=torch.int32)])
    grid = batch.get("image_grid_thw")
    grid = torch.zeros(0, 3, dtype=torch.int64) if grid is None else grid.cpu()
    pixels = batch.get("pixel_values")
    pixels = pixels.to(device) if pixels is not None and pixels.shape[0] else None
    positions = mrope_position_ids(input_ids, cu_seqlens, grid, config.image_token_id,
                                   config.vision.spatial_merge_size)
    cu_seqlens, device_ids = cu_seqlens.to(device), input_ids.to(device)
    return PaddedMicroBatch(
        input_ids=device_ids, labels=labels.to(device), cu_seqlens=cu_seqlens,
        position_ids=positions.to(device), info=AttentionInfo.from_cu_seqlens(cu_seqlens),
        label_rows=torch.nonzero(labels != IGNORE_INDEX).flatten().to(device),
        image_rows=torch.nonzero(input_ids == config.image_token_id).flatten().to(device),
        pixel_values=pixels, image_grid_thw=grid, tokens=real,
        row_mask=padding_row_mask({"input_ids": device_ids, "pad_tokens": seq_len - real}, config))
