"""Hugging Face weights in and out: transformers 5's ``Qwen3VLForConditionalGeneration`` /
``Qwen3VLMoeForConditionalGeneration`` state dicts <-> ``Qwen3VLModel`` state dicts.

Names: HF ``model.visual.X`` <-> ``visual.X``, ``model.language_model.X`` <-> ``language_model.X``, ``lm_head.weight``
unchanged; every other part of the name is the same (the MoE experts keep HF's fused 3D layout). One value
changes shape: the patch embedding, a Conv3d weight [hidden, C, T, p, p] in HF, a Linear weight
[hidden, C*T*p*p] here (the same numbers, flattened in the same order).

Tied embeddings: with ``tie_word_embeddings`` our ``lm_head.weight`` is the embedding; ``from_hf_state_dict``
accepts a HF dict with or without ``lm_head.weight`` and ``to_hf_state_dict`` writes both names, as
``state_dict()`` of a tied HF model does.

Fused MoE experts come in two layouts. transformers 5 holds (and ``save_pretrained`` writes) ``gate_up_proj``
[E, 2I, H] and ``down_proj`` [E, H, I], as we do; Qwen's published Qwen3-VL-MoE checkpoints store them transposed,
[E, H, 2I] and [E, I, H] ("published" layout, the one vLLM reads). ``from_hf_state_dict`` takes either, told apart
by shape as transformers does (when H == 2I, resp. H == I, the shapes agree and the tensor is read as
transformers 5's); ``published_experts`` turns ours into the published layout for export.
"""

from __future__ import annotations

import torch

from mgpt_train.model.config import Qwen3VLConfig

_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "language_model."), ("lm_head.", "lm_head."))
_PATCH_EMBED = "visual.patch_embed.proj.weight"


def hf_name(name: str) -> str:
    """Our parameter name -> HF's."""
    for theirs, ours in _PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(f"hf_name: {name!r} is not a Qwen3VLModel parameter name")


def our_name(name: str) -> str:
    """HF's parameter name -> ours."""
    for theirs, ours in _PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    raise KeyError(f"our_name: {name!r} is not a Qwen3-VL(-MoE) ForConditionalGeneration parameter name")


def _experts_shapes(name: str, config: Qwen3VLConfig) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(transformers 5 shape, published shape) of a fused experts tensor named ``name`` (ours), else None."""
    t = config.text
    if name.endswith(".mlp.experts.gate_up_proj"):
        return (t.num_experts, 2 * t.moe_intermediate_size, t.hidden_size), \
            (t.num_experts, t.hidden_size, 2 * t.moe_intermediate_size)
    if name.endswith(".mlp.experts.down_proj"):
        return (t.num_experts, t.hidden_size, t.moe_intermediate_size), \
            (t.num_experts, t.moe_intermediate_size, t.hidden_size)
    return None


def experts_layouts_ambiguous(config: Qwen3VLConfig) -> bool:
    """True when a fused experts tensor has the same shape in both layouts (H == 2I or H == I)."""
    t = config.text
    return config.is_moe and t.hidden_size in (t.moe_intermediate_size, 2 * t.moe_intermediate_size)


def published_experts(name: str, tensor: torch.Tensor, config: Qwen3VLConfig) -> torch.Tensor:
    """A tensor of ``to_hf_state_dict`` (HF name) in the layout Qwen publishes: fused experts transposed to
    [E, H, 2I] / [E, I, H] (a view), everything else unchanged."""
    if _experts_shapes(our_name(name), config) is None:
        return tensor
    return tensor.transpose(1, 2)


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], config: Qwen3VLConfig) -> dict[str, torch.Tensor]:
    """A state dict for ``Qwen3VLModel(config).load_state_dict`` from a HF one (tensors are views, not copies,
    where the layout allows)."""
    out = {}
    for name, tensor in state_dict.items():
        mine = our_name(name)
        if mine == _PATCH_EMBED:
            if tensor.dim() != 5:
                raise ValueError(f"from_hf_state_dict: {name!r} must be a Conv3d weight [hidden, C, T, p, p], got "
                                 f"{list(tensor.shape)}")
            tensor = tensor.reshape(tensor.shape[0], -1)
        experts = _experts_shapes(mine, config)
        if experts is not None and tuple(tensor.shape) != experts[0] and tuple(tensor.shape) == experts[1]:
            tensor = tensor.transpose(1, 2)  # Qwen's published layout -> ours
        out[mine] = tensor
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["language_model.embed_tokens.weight"]
    elif "lm_head.weight" not in out:
        raise KeyError("from_hf_state_dict: 'lm_head.weight' is missing and the config does not tie the embeddings")
    return out


def to_hf_state_dict(model, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """HF names and layouts of ``model.state_dict()`` -- or of ``tensors`` (our names -> tensors with the
    parameters' shapes, e.g. gradients) when given."""
    tensors = model.state_dict() if tensors is None else tensors
    vision = model.config.vision
    out = {}
    for name, tensor in tensors.items():
        if name == _PATCH_EMBED:
            tensor = tensor.reshape(tensor.shape[0], vision.in_channels, vision.temporal_patch_size,
                                    vision.patch_size, vision.patch_size)
        out[hf_name(name)] = tensor
    return out
