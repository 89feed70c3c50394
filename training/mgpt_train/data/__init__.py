"""Data for mgpt_train: byte tokenizer, HF-layout image patches, synthetic and JSONL samples, packing into the
batch dict, the collaborative curriculum and per-tag evaluation."""

from mgpt_train.data.curriculum import (
    MERGER_PREFIXES,
    TRAINABLE_PARTS,
    VISION_PREFIX,
    Curriculum,
    CurriculumStage,
    apply_trainable,
    default_curriculum,
    parameter_part,
)
from mgpt_train.data.evaluation import evaluate_by_tag
from mgpt_train.data.images import ImageProcessorConfig, patchify, smart_resize
from mgpt_train.data.jsonl import load_jsonl
from mgpt_train.data.packing import IGNORE_INDEX, EncodedSample, SampleEncoder, collate, pack_greedy, shift_labels
from mgpt_train.data.sample import Sample, tag_matches
from mgpt_train.data.synthetic import TASKS, make_synthetic, synthetic_sample
from mgpt_train.data.tokenizer import ByteTokenizer, HFTokenizer

__all__ = [
    "IGNORE_INDEX",
    "MERGER_PREFIXES",
    "TASKS",
    "TRAINABLE_PARTS",
    "VISION_PREFIX",
    "ByteTokenizer",
    "HFTokenizer",
    "Curriculum",
    "CurriculumStage",
    "EncodedSample",
    "ImageProcessorConfig",
    "Sample",
    "SampleEncoder",
    "apply_trainable",
    "collate",
    "default_curriculum",
    "evaluate_by_tag",
    "load_jsonl",
    "make_synthetic",
    "pack_greedy",
    "parameter_part",
    "patchify",
    "shift_labels",
    "smart_resize",
    "synthetic_sample",
    "tag_matches",
]
