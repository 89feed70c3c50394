"""The language model's attention kernel: causal attention, block-diagonal over the packed samples.

    attention(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], cu_seqlens int32 [S + 1], info: AttentionInfo)
        -> out [T, Hq, D]

q and k arrive normed and rotated (MRoPE); token i attends to tokens j <= i of its own sample; Hq must be a
multiple of Hkv (grouped-query attention); softmax scale D ** -0.5.

This is the ONE place the decoder computes attention, so a context-parallel (ring / all-gather) version can
replace it: ``Qwen3VLModel.set_attention_fn(fn)`` installs ``fn`` (same signature) in every decoder layer. The
model builds ``info`` once per forward from the packed batch; a replacement may ignore it or read
``info.sample_ids`` (the sample of every token) and ``info.max_seqlen``.

Backends: CUDA with fp16/bf16 -> ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen, no mask
tensor; its keyword for causality differs between torch versions and is looked up once). Otherwise -> SDPA
with a [T, T] boolean mask built from ``sample_ids`` (exact, O(T^2) memory: fine on CPU and for tests).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionInfo:
    """What the default kernel needs besides q, k, v and cu_seqlens; built once per forward."""
    max_seqlen: int  # longest sample (host int: sizes FlashAttention's grid without a device sync)
    sample_ids: torch.Tensor  # int64 [T]: index of the sample each token belongs to
    boundaries: tuple[int, ...] = ()  # cu_seqlens on the host (read once per forward, with max_seqlen)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor) -> "AttentionInfo":
        bounds = tuple(int(b) for b in cu_seqlens.tolist())
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        sample_ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths,
                                             output_size=bounds[-1] if bounds else 0)
        max_seqlen = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
        return cls(max_seqlen=max_seqlen, sample_ids=sample_ids, boundaries=bounds)


@functools.cache
def varlen_causal_kwargs() -> dict | None:
    """Keyword arguments that make torch's varlen_attn causal and GQA-aware, or None when unusable."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # newer torch: (left, right) = (-1, 0) is causal
        kwargs = {"window_size": (-1, 0)}
    elif "is_causal" in params:  # its first release
        kwargs = {"is_causal": True}
    else:
        return None
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs


def _block_causal_sdpa(q, k, v, info: AttentionInfo) -> torch.Tensor:
    ids = info.sample_ids
    positions = torch.arange(ids.shape[0], device=ids.device)
    mask = (ids[:, None] == ids[None, :]) & (positions[None, :] <= positions[:, None])
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
              info: AttentionInfo) -> torch.Tensor:
    """Causal attention inside each packed sample (see the module docstring)."""
    varlen_kwargs = varlen_causal_kwargs()
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_kwargs is not None:
        from torch.nn.attention.varlen import varlen_attn

        if "enable_gqa" not in varlen_kwargs and k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, info.max_seqlen, info.max_seqlen, **varlen_kwargs)
    return _block_causal_sdpa(q, k, v, info)
