"""Held-out accuracy per tag: exact match of the greedy answer.

``predict_fn(batch) -> int64 [T]`` is supplied by the trainer: the argmax token at every position of the packed
batch (teacher forcing: ``model.greedy_tokens(batch)``, or ``model.logits(batch).argmax(-1)``; only the answer
positions are read). A sample counts as correct when the argmax equals the label at every answer position. That is
the same as exact match of free greedy decoding: if every teacher-forced argmax equals the target, greedy decoding
reproduces the answer (and its ``<|im_end|>``) token by token, and the first mismatch makes greedy decoding differ -
so one forward pass per batch suffices.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from mgpt_train.data.packing import IGNORE_INDEX, SampleEncoder, collate, pack_greedy
from mgpt_train.data.sample import Sample, tag_prefixes


def evaluate_by_tag(
    predict_fn: Callable[[dict], torch.Tensor],
    heldout: Sequence[Sample],
    encoder: SampleEncoder,
    max_tokens: int = 4096,
) -> dict[str, float]:
    """Accuracy for every tag, every tag prefix ("vertical") and ``"all"``; samples packed in order."""
    if not heldout:
        raise ValueError("evaluate_by_tag: heldout is empty")
    encoded = [encoder.encode(sample) for sample in heldout]
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for group in pack_greedy([sample.num_tokens for sample in encoded], max_tokens):
        batch = collate([encoded[i] for i in group], encoder.image_config.patch_dim)
        predicted = torch.as_tensor(predict_fn(batch)).reshape(-1).cpu()
        if predicted.shape != batch["input_ids"].shape:
            raise ValueError(
                f"evaluate_by_tag: predict_fn must return one token per position, shape "
                f"{list(batch['input_ids'].shape)}, got {list(predicted.shape)}"
            )
        bounds = batch["cu_seqlens"].tolist()
        for position, tag in enumerate(batch["sample_tags"]):
            labels = batch["labels"][bounds[position] : bounds[position + 1]]
            answer = labels != IGNORE_INDEX
            hit = bool((predicted[bounds[position] : bounds[position + 1]][answer] == labels[answer]).all())
            for key in ["all", *tag_prefixes(tag)]:
                correct[key] += hit
                total[key] += 1
    return {key: correct[key] / total[key] for key in sorted(total)}
