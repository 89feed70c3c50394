"""Compact Qwen3-VL(-MoE) for training on packed batches (see qwen3_vl.py for the forward contract).

    from mgpt_train.model import Qwen3VLConfig, Qwen3VLModel
    model = Qwen3VLModel(Qwen3VLConfig.tiny())
    out = model(batch)            # {"loss", "n_tokens", "aux_loss"}

Files: config.py (configs, presets, HF configs), positions.py (MRoPE / vision positions), vision.py (tower),
language.py (decoder), moe.py (router, GroupedExperts, aux loss), attention.py (the replaceable causal kernel),
hf_adapter.py (HF state dicts in and out).
"""

from mgpt_train.model.attention import AttentionInfo, attention
from mgpt_train.model.config import Qwen3VLConfig, TextConfig, VisionConfig
from mgpt_train.model.hf_adapter import (experts_layouts_ambiguous, from_hf_state_dict, published_experts,
                                         to_hf_state_dict)
from mgpt_train.model.moe import GroupedExperts, load_balancing_loss
from mgpt_train.model.positions import mrope_position_ids
from mgpt_train.model.qwen3_vl import Qwen3VLModel

__all__ = ["AttentionInfo", "attention", "Qwen3VLConfig", "TextConfig", "VisionConfig", "from_hf_state_dict",
           "to_hf_state_dict", "experts_layouts_ambiguous", "published_experts", "GroupedExperts",
           "load_balancing_loss", "mrope_position_ids", "Qwen3VLModel"]
