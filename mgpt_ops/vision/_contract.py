"""Contract of the packed variable-length vision attention kernels (every face implements exactly this).

Inputs (N packed tokens of S sequences, H heads, head dim D in {64, 72, 80, 96, 128}):
    q, k, v      [N, H, D]  fp16 / bf16 / fp32; last dimension contiguous (other strides free, so views of a
                 packed qkv [N, 3, H, D] work without a copy)
    cu_seqlens   [S + 1] int32, cu_seqlens[0] = 0, non-decreasing, cu_seqlens[S] = N; sequence s is tokens
                 [cu_seqlens[s], cu_seqlens[s+1]) (one image / video frame / window); length 0 allowed
    max_seqlen   int >= the longest sequence (kernels size their grid with it: no host sync needed)
    cos, sin     [N, D] fp32 or both None. When given, q and k are rotated first, in fp32, exactly as
                 Hugging Face's ``apply_rotary_pos_emb_vision``:  x' = x * cos + rotate_half(x) * sin with
                 rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])   (same cos/sin row for every head)
    scale        softmax scale (the public API defaults it to D ** -0.5)

Outputs of the forward, for each sequence s, head h, token i of s (bidirectional, no mask inside s):
    scores_ij = scale * <q'_i, k'_j>  for j in s
    lse[h, i] = logsumexp_j scores_ij                                [H, N] fp32 (natural log)
    out[i, h] = sum_j softmax_j(scores_ij) v_j                       [N, H, D] in q's dtype

The backward returns (dq, dk, dv) [N, H, D] in the input dtypes: gradients with respect to the UN-rotated q
and k (the rotation's transpose applied to d q', d k': dx = dx' * cos + rotate_half^T(dx' * sin), with
rotate_half^T(y) = cat(y[..., D/2:], -y[..., :D/2])), recomputing the attention from (q, k, v, out, lse)
as FlashAttention-2 does, with D_i = <dout_i, out_i>.

C++/CUDA faces register ``mgpt::varlen_attention_fwd`` / ``mgpt::varlen_attention_bwd`` (schemas in
csrc/registration.cpp); their fakes are below. ``attention_reference`` is the plain statement: one
attention per sequence in the working precision, used as the ``reference`` face.
"""

from __future__ import annotations

import torch

from mgpt_ops import _ext


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated in fp32 (float64 stays float64) with cos/sin [N, D]; returned in that precision."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(work)
    cos, sin = cos.to(work)[:, None, :], sin.to(work)[:, None, :]
    return x * cos + rotate_half(x) * sin


def attention_reference(q, k, v, cu_seqlens, cos=None, sin=None, scale=None):
    """(out [N, H, D] in q's dtype, lse [H, N] fp32): one softmax attention per sequence, computed in fp32
    (float64 for float64 inputs), differentiable by autograd. The specification; slow (host loop)."""
    out_dtype = q.dtype
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q, k, v = q.to(work), k.to(work), v.to(work)
    outs, lses = [], []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        scores = scale * qs @ ks.transpose(1, 2)
        lses.append(torch.logsumexp(scores, dim=-1))
        outs.append((torch.softmax(scores, dim=-1) @ vs).transpose(0, 1))
    out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, 1) if lses else q.new_zeros(q.shape[1], 0)
    return out.to(out_dtype), lse.float()


if _ext.loaded():
    @torch.library.register_fake("mgpt::varlen_attention_fwd")
    def _(q, k, v, cu_seqlens, max_seqlen, cos, sin, scale):
        return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))

    @torch.library.register_fake("mgpt::varlen_attention_bwd")
    def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, cos, sin, scale):
        return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                torch.empty(k.shape, dtype=k.dtype, device=k.device),
                torch.empty(v.shape, dtype=v.dtype, device=v.device))
