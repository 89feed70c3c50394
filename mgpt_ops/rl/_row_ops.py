"""Contract of the two per-row kernels that every face of ``fused_linear_logprobs`` is built from.

A chunk of raw logits ``logits[C, Vs]`` (fp32, contiguous; ``hidden_chunk @ weight_shard.T + bias``)
covers vocabulary ids ``[vocab_start, vocab_start + Vs)`` (``vocab_start`` > 0 only for a
vocabulary-parallel shard). With ``z = logits * inv_temperature``:

``logits_row_stats(logits, labels, inv_temperature, vocab_start, ignore_index) -> stats[C, 4]`` fp32:
    stats[:, 0] = m      = max_j z_j
    stats[:, 1] = s      = sum_j exp(z_j - m)
    stats[:, 2] = u      = sum_j exp(z_j - m) * (z_j - m)          (centred: stable in fp32)
    stats[:, 3] = zy     = z[label - vocab_start] if that index lies in [0, Vs) and label != ignore_index,
                           else 0
    From these: lse = m + log s, mean_z = sum_j p_j z_j = m + u / s, entropy = lse - mean_z,
    logprob = zy - lse. Shards combine exactly (see ``combine_row_stats``).

``logits_row_grad(logits, labels, lse, mean_z, grad_logprob, grad_entropy, inv_temperature, vocab_start,
ignore_index, out_dtype) -> dlogits[C, Vs]`` (dtype ``out_dtype``): gradient w.r.t. the raw logits of
``sum_i grad_logprob_i * logprob_i + grad_entropy_i * entropy_i`` where, with p_j = exp(z_j - lse):
    dz_j      = grad_logprob * (1[j == label - vocab_start] - p_j) - grad_entropy * p_j * (z_j - mean_z)
    dlogits_j = dz_j * inv_temperature
    rows whose label == ignore_index are all zero.

The C++ (``cpu``), CUDA (``cuda``) and Triton (``triton``) kernels implement exactly this; the functions
below are the plain-PyTorch statement of it, used as the test oracle and as the ``reference`` face.
"""

from __future__ import annotations

import torch

from mgpt_ops import _ext  # noqa: F401  (loads the schemas of mgpt::logits_row_* when the extension exists)


def row_stats_torch(logits, labels, inv_temperature: float, vocab_start: int, ignore_index: int):
    z = logits * inv_temperature
    m = z.amax(dim=-1)
    e = torch.exp(z - m[:, None])
    s = e.sum(-1)
    u = (e * (z - m[:, None])).sum(-1)
    local = labels.long() - vocab_start
    valid = (labels != ignore_index) & (local >= 0) & (local < z.shape[1])
    zy = torch.where(valid, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), torch.zeros_like(m))
    return torch.stack([m, s, u, zy], dim=1)


def row_grad_torch(logits, labels, lse, mean_z, grad_logprob, grad_entropy, inv_temperature: float,
                   vocab_start: int, ignore_index: int, out_dtype: torch.dtype):
    z = logits * inv_temperature
    p = torch.exp(z - lse[:, None])
    dz = -grad_logprob[:, None] * p - grad_entropy[:, None] * p * (z - mean_z[:, None])
    local = labels.long() - vocab_start
    valid = (labels != ignore_index) & (local >= 0) & (local < z.shape[1])
    onehot = torch.zeros_like(dz)
    onehot.scatter_(1, local.clamp(0, z.shape[1] - 1)[:, None], 1.0)
    dz = dz + grad_logprob[:, None] * onehot * valid[:, None]
    dz = torch.where((labels != ignore_index)[:, None], dz, torch.zeros_like(dz))
    return (dz * inv_temperature).to(out_dtype)


def _recentred(m, s, u, new_max):
    """(s, u) of a block moved from its own max ``m`` to ``new_max`` >= m: the one merge rule of row stats."""
    scale = torch.exp(m - new_max)
    return s * scale, scale * (u + (m - new_max) * s)


def merge_row_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stats [C, 4] of two disjoint vocabulary blocks -> stats of their union (label logits add: at most
    one block holds the label)."""
    (m1, s1, u1, z1), (m2, s2, u2, z2) = a.unbind(1), b.unbind(1)
    m = torch.maximum(m1, m2)
    (s1, u1), (s2, u2) = _recentred(m1, s1, u1, m), _recentred(m2, s2, u2, m)
    return torch.stack([m, s1 + s2, u1 + u2, z1 + z2], 1)


def combine_row_stats(stats: torch.Tensor, process_group=None):
    """Turn per-shard stats [C, 4] into (lse, mean_z, label_z), all-reducing over ``process_group``
    (vocabulary-parallel shards) when given. Exact: no approximation beyond fp32 rounding."""
    m, s, u, zy = stats.unbind(1)
    if process_group is not None:
        import torch.distributed as dist

        gm = m.clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=process_group)
        # Re-centre each shard's sums on the global max, then add them up in one collective.
        part = torch.stack([*_recentred(m, s, u, gm), zy], dim=1)
        dist.all_reduce(part, group=process_group)
        m, (s, u, zy) = gm, part.unbind(1)
    lse = m + torch.log(s)
    mean_z = m + u / s
    return lse, mean_z, zy


if _ext.loaded():
    @torch.library.register_fake("mgpt::logits_row_stats")
    def _(logits, labels, inv_temperature, vocab_start, ignore_index):
        return logits.new_empty((logits.shape[0], 4), dtype=torch.float32)

    @torch.library.register_fake("mgpt::logits_row_grad")
    def _(logits, labels, lse, mean_z, grad_logprob, grad_entropy, inv_temperature, vocab_start, ignore_index,
          out_dtype):
        return logits.new_empty(logits.shape, dtype=out_dtype)
