"""Samples -> token ids with shifted answer labels -> greedy packed micro-batches (the batch dict).

Batch layout (agreed with the model): ``input_ids``/``labels`` int64 [T], ``cu_seqlens`` int32 [S+1],
``pixel_values`` float32 [P, patch_dim], ``image_grid_thw`` int64 [num_images, 3], ``sample_tags`` list[str].
``labels[i]`` is the token to predict from position i (``input_ids[i+1]`` of the same sample) where that token
is part of an answer, else -100; the last position of every sample is -100, so packing never leaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mgpt_train.data.images import ImageProcessorConfig, image_size, patchify
from mgpt_train.data.sample import Sample
from mgpt_train.data.tokenizer import ByteTokenizer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedSample:
    input_ids: torch.Tensor  # int64 [L]
    labels: torch.Tensor  # int64 [L], shifted (module docstring)
    pixel_values: torch.Tensor  # float32 [P, patch_dim]
    image_grid_thw: torch.Tensor  # int64 [num_images, 3]
    tag: str

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def shift_labels(ids: Sequence[int], is_answer: Sequence[bool]) -> list[int]:
    """``labels[i] = ids[i+1]`` where token i+1 is an answer token, else -100; the last label is -100."""
    return [ids[i + 1] if is_answer[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]


class SampleEncoder:
    """Turns :class:`Sample` objects into token ids, labels and patches with one tokenizer and image config."""

    def __init__(self, tokenizer: ByteTokenizer, image_config: ImageProcessorConfig) -> None:
        self.tokenizer = tokenizer
        self.image_config = image_config

    def _chat(self, sample: Sample, grids: Sequence[tuple[int, int, int]]) -> tuple[list[int], list[bool]]:
        counts = [self.image_config.merged_tokens(grid) for grid in grids]
        return self.tokenizer.encode_chat(sample.messages, counts)

    def num_tokens(self, sample: Sample) -> int:
        """Token count of the encoded sample, from image sizes alone (no resizing or patching)."""
        grids = [self.image_config.grid_for_size(*image_size(image)) for image in sample.images]
        return len(self._chat(sample, grids)[0])

    def encode(self, sample: Sample) -> EncodedSample:
        patches, grids = [], []
        for image in sample.images:
            pixel_values, grid = patchify(image, self.image_config)
            patches.append(pixel_values)
            grids.append(grid)
        ids, is_answer = self._chat(sample, grids)
        return EncodedSample(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            labels=torch.tensor(shift_labels(ids, is_answer), dtype=torch.int64),
            pixel_values=torch.cat(patches) if patches else torch.zeros(0, self.image_config.patch_dim),
            image_grid_thw=torch.tensor(grids, dtype=torch.int64).reshape(-1, 3),
            tag=sample.tag,
        )

    def batch(self, samples: Sequence[Sample]) -> dict:
        """One micro-batch dict of these samples, in order (no token budget applied here)."""
        return collate([self.encode(sample) for sample in samples], self.image_config.patch_dim)


def pack_greedy(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of consecutive samples grouped into micro-batches of at most ``max_tokens`` tokens.

    Order-preserving next-fit: a sample that does not fit closes the current micro-batch and opens the next.
    A sample is never split; one longer than ``max_tokens`` is an error.
    """
    if max_tokens < 1:
        raise ValueError(f"pack_greedy: max_tokens must be >= 1, got {max_tokens}")
    groups: list[list[int]] = []
    used = max_tokens + 1  # forces a new group for the first sample
    for index, length in enumerate(lengths):
        if length > max_tokens:
            raise ValueError(
                f"pack_greedy: sample {index} has {length} tokens, more than max_tokens={max_tokens}; "
                "raise max_tokens or filter long samples (CurriculumStage.max_sample_tokens)"
            )
        if used + length > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return groups


def collate(encoded: Sequence[EncodedSample], patch_dim: int) -> dict:
    """Concatenate encoded samples into the batch dict described in the module docstring."""
    if not encoded:
        raise ValueError("collate: at least one sample is needed")
    lengths = torch.tensor([0] + [sample.num_tokens for sample in encoded], dtype=torch.int64)
    return {
        "input_ids": torch.cat([sample.input_ids for sample in encoded]),
        "labels": torch.cat([sample.labels for sample in encoded]),
        "cu_seqlens": torch.cumsum(lengths, 0).to(torch.int32),
        "pixel_values": torch.cat([sample.pixel_values.reshape(-1, patch_dim) for sample in encoded]),
        "image_grid_thw": torch.cat([sample.image_grid_thw for sample in encoded]).reshape(-1, 3),
        "sample_tags": [sample.tag for sample in encoded],
    }
