"""Context parallelism for the language model's causal attention over one long PACKED sequence.

Sharding (load-balanced, as in Megatron-LM / Llama 3): the packed sequence of T tokens is cut into 2*cp equal
chunks and context rank r keeps chunks r and 2*cp-1-r. Under a causal mask a query's work grows with its
position, so pairing an early chunk with a late one gives every rank the same number of (query, key) pairs.
``shard_sequence`` applies this cut to any per-token tensor (input_ids, labels, MRoPE positions, ...);
``local_positions`` gives the global index of the local tokens; ``unshard_sequence`` undoes the cut.

``cp_attention`` lets the local queries attend to ALL keys of the packed sequence with the block-diagonal causal
mask of the packed batch (key j visible to query i iff both lie in the same sample and pos_j <= pos_i). K and V
are all-gathered (one collective for both) in the forward pass; the backward pass reduce-scatters dK/dV so each
rank receives the sum, over all ranks' queries, of the gradient of the keys it owns.

Memory trade-off, all-gather versus ring: all-gather holds the full K and V of the sequence on every rank
(2 * T * kv_heads * head_dim per layer, kept for backward), while ring attention holds two blocks of T/cp tokens
and overlaps cp point-to-point steps with compute. With grouped-query attention K/V are a small fraction of the
activations, and the all-gather form handles document masks of packed samples without per-step bookkeeping,
which is why Llama 3 trained long context this way. A ring variant can replace ``_GatherSequence`` later without
changing the interface. The attention itself runs on FlashAttention varlen on CUDA (no mask: each local chunk is
a contiguous global range, so its queries split by sample and attend one contiguous slice of the gathered K/V,
``chunk_segments``), and on SDPA with a boolean mask elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mgpt_train.model.attention import varlen_causal_kwargs

# torch >= 2.12 renames the single-tensor collectives; the GPU stack (2.11) only has the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _chunk_size(seq_len: int, cp_size: int, where: str) -> int:
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"{where}: 'cp_size' must be an int >= 1, got {cp_size!r}")
    if seq_len % (2 * cp_size):
        raise ValueError(f"{where}: sequence length {seq_len} is not divisible by 2*cp = {2 * cp_size} "
                         f"(context parallelism cuts the sequence into 2*cp load-balanced chunks); pad the packed "
                         f"sequence to a multiple of {2 * cp_size}")
    return seq_len // (2 * cp_size)


def _check_rank(cp_rank: int, cp_size: int, where: str) -> None:
    if not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise ValueError(f"{where}: 'cp_rank' must be an int in [0, {cp_size}), got {cp_rank!r}")


def shard_sequence(x: torch.Tensor, dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """The tokens of ``x`` (along ``dim``) that context rank ``cp_rank`` keeps: chunks cp_rank and
    2*cp_size-1-cp_rank of 2*cp_size, concatenated in that order."""
    chunk = _chunk_size(x.size(dim), cp_size, "shard_sequence")
    _check_rank(cp_rank, cp_size, "shard_sequence")
    late = 2 * cp_size - 1 - cp_rank
    return torch.cat([x.narrow(dim, cp_rank * chunk, chunk), x.narrow(dim, late * chunk, chunk)], dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of ``shard_sequence``: ``shards[r]`` is rank r's local tensor (all ranks, in rank order)."""
    cp_size = len(shards)
    if cp_size == 0:
        raise ValueError("unshard_sequence: 'shards' must hold one tensor per context rank, got none")
    local_len = shards[0].size(dim)
    if local_len % 2 or any(s.size(dim) != local_len for s in shards):
        sizes = [s.size(dim) for s in shards]
        raise ValueError(f"unshard_sequence: every shard must have the same even length along dim {dim}, "
                         f"got {sizes}")
    chunk = local_len // 2
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, shard in enumerate(shards):
        chunks[rank] = shard.narrow(dim, 0, chunk)
        chunks[2 * cp_size - 1 - rank] = shard.narrow(dim, chunk, chunk)
    return torch.cat(chunks, dim=dim)


def local_positions(seq_len: int, cp_rank: int, cp_size: int, device: torch.device | str | None = None
                    ) -> torch.Tensor:
    """Global indices (int64) in the packed sequence of the tokens rank ``cp_rank`` keeps, in local order."""
    chunk = _chunk_size(seq_len, cp_size, "local_positions")
    _check_rank(cp_rank, cp_size, "local_positions")
    late = 2 * cp_size - 1 - cp_rank
    early_pos = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    return torch.cat([early_pos, torch.arange(late * chunk, (late + 1) * chunk, device=device)])


def _gather_sequence(local: torch.Tensor, group) -> torch.Tensor:
    """All ranks' shards along dim 0, reassembled in global token order."""
    cp_size = dist.get_world_size(group)
    local = local.contiguous()
    gathered = local.new_empty((cp_size * local.size(0), *local.shape[1:]))
    _all_gather_single(gathered, local, group=group)
    return unshard_sequence(gathered.chunk(cp_size), 0)


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather the sequence shards (global order). Backward: every rank holds a gradient for the
    whole sequence (from its own queries); reduce-scatter sums them and hands each rank its own tokens."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _gather_sequence(local, group)

    @staticmethod
    def backward(ctx, grad_global: torch.Tensor):
        cp_size = dist.get_world_size(ctx.group)
        rank_major = torch.cat([shard_sequence(grad_global, 0, r, cp_size) for r in range(cp_size)])
        grad_local = grad_global.new_empty((grad_global.size(0) // cp_size, *grad_global.shape[1:]))
        _reduce_scatter_single(grad_local, rank_major, group=ctx.group)
        return grad_local, None


def _check_attention_inputs(q, k, v, cu_seqlens, global_pos) -> None:
    where = "cp_attention"
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens), ("global_pos", global_pos)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"{where}: argument '{name}' must be a floating tensor [T_local, heads, head_dim], "
                             f"got {t.dtype} of shape {list(t.shape)}")
    if k.shape[:2] != v.shape[:2] or k.size(0) != q.size(0):
        raise ValueError(f"{where}: 'q', 'k', 'v' must share T_local and 'k', 'v' the kv heads, got q "
                         f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if q.size(1) % k.size(1) or q.size(2) != k.size(2):
        raise ValueError(f"{where}: 'q' heads ({q.size(1)}) must be a multiple of 'k' heads ({k.size(1)}) and "
                         f"head dims must match, got q {list(q.shape)}, k {list(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{where}: 'q', 'k', 'v' must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"{where}: argument 'cu_seqlens' must be an integer tensor [num_samples + 1], got "
                         f"{cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}")
    if global_pos.shape != (q.size(0),) or global_pos.is_floating_point():
        raise ValueError(f"{where}: argument 'global_pos' must be an integer tensor [T_local = {q.size(0)}], got "
                         f"{global_pos.dtype} of shape {list(global_pos.shape)}")


def packed_causal_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Boolean [len(query_pos), len(key_pos)] mask, True where the key is visible: same packed sample (by
    ``cu_seqlens`` boundaries) and key position <= query position."""
    bounds = cu_seqlens.to(device=query_pos.device, dtype=torch.int64)
    query_sample = torch.searchsorted(bounds, query_pos.to(torch.int64), right=True)
    key_sample = torch.searchsorted(bounds, key_pos.to(torch.int64), right=True)
    return (query_sample[:, None] == key_sample[None, :]) & (key_pos[None, :] <= query_pos[:, None])


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 global_pos: torch.Tensor, group=None, scale: float | None = None,
                 boundaries: Sequence[int] | None = None) -> torch.Tensor:
    """Causal attention of the local queries over the whole packed sequence, sharded over ``group``.

    q [T_local, H, D], k [T_local, H_kv, D], v [T_local, H_kv, D_v] are this rank's ``shard_sequence`` shards
    (H a multiple of H_kv: grouped-query attention); ``cu_seqlens`` [S+1] are the GLOBAL sample boundaries
    (0, ..., T with T = T_local * cp); ``global_pos`` = ``local_positions(T, rank, cp)``. ``group`` is the
    context-parallel process group (``mesh["cp"].get_group()``; None = the default group). Returns
    [T_local, H, D_v]; differentiable in q, k and v.

    Kernels. CUDA fp16/bf16 with ``boundaries`` (``cu_seqlens`` on the host) -> FlashAttention varlen
    (``torch.nn.attention.varlen``), no mask: ``segmented_attention`` over the two local chunks. Otherwise a
    boolean [T_local, T] mask for torch SDPA (memory O(T_local * T): CPU, tests).
    """
    _check_attention_inputs(q, k, v, cu_seqlens, global_pos)
    cp_size = dist.get_world_size(group)
    chunk = _chunk_size(q.size(0) * cp_size, cp_size, "cp_attention")  # the local shard holds two equal chunks
    head_dim = k.size(-1)
    kv_global = _GatherSequence.apply(torch.cat([k, v], dim=-1), group)
    k_global, v_global = kv_global.split([head_dim, v.size(-1)], dim=-1)
    varlen = _cuda_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if varlen is not None and boundaries is not None:
        rank = dist.get_rank(group)
        late = 2 * cp_size - 1 - rank
        chunks = [(rank * chunk, (rank + 1) * chunk), (late * chunk, (late + 1) * chunk)]
        return segmented_attention(q, k_global, v_global, list(boundaries), chunks, varlen, scale)
    key_pos = torch.arange(kv_global.size(0), device=q.device)
    mask = packed_causal_mask(global_pos.to(q.device), key_pos, cu_seqlens)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k_global.transpose(0, 1), v_global.transpose(0, 1),
                                         attn_mask=mask, scale=scale, enable_gqa=q.size(1) != k.size(1))
    return out.transpose(0, 1)


def chunk_segments(boundaries: Sequence[int], start: int, end: int) -> tuple[list[int], list[int], int]:
    """The varlen layout of the queries of global tokens [start, end) (a chunk of the load-balanced shard) over
    the keys of the whole sequence: (cu_seqlens_q over the chunk's rows, cu_seqlens_k over the key rows from
    ``key_start``, key_start). Segment i = the chunk's tokens of sample i, [max(a, start), min(b, end)), whose
    keys are [a, min(b, end)) -- consecutive samples' key ranges are adjacent, so all of them form the one slice
    [key_start, end) of the global K/V. Causal attention aligned bottom-right (FlashAttention's rule for
    len_q < len_k) is then exactly the packed causal mask."""
    cu_q, cu_k, key_start = [0], [0], None
    for a, b in zip(boundaries[:-1], boundaries[1:]):
        if b <= start or a >= end or a == b:
            continue
        key_start = a if key_start is None else key_start
        cu_q.append(cu_q[-1] + min(b, end) - max(a, start))
        cu_k.append(min(b, end) - key_start)
    return cu_q, cu_k, start if key_start is None else key_start


def segmented_attention(q: torch.Tensor, k_global: torch.Tensor, v_global: torch.Tensor, boundaries: Sequence[int],
                        chunks: Sequence[tuple[int, int]], varlen, scale: float | None = None) -> torch.Tensor:
    """Causal packed attention of the local queries (the rows of ``chunks``, global ranges in local order) over
    the gathered K/V, one varlen call per chunk: ``varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale)`` with
    bottom-right causal alignment (``chunk_segments``)."""
    outs, row = [], 0
    for start, end in chunks:
        cu_q, cu_k, key_start, max_q, max_k = _chunk_layout(tuple(boundaries), start, end, q.device)
        rows = end - start
        outs.append(varlen(q[row:row + rows], k_global[key_start:end], v_global[key_start:end], cu_q, cu_k, max_q,
                           max_k, scale))
        row += rows
    return torch.cat(outs)


@functools.lru_cache(maxsize=8)
def _chunk_layout(boundaries: tuple[int, ...], start: int, end: int, device: torch.device):
    """``chunk_segments`` with its offsets as int32 tensors on ``device`` and the longest segments: the same for
    every decoder layer of a forward (and its backward), so it is built, and copied to the device, once."""
    cu_q, cu_k, key_start = chunk_segments(boundaries, start, end)
    max_q = max(b - a for a, b in zip(cu_q[:-1], cu_q[1:]))
    max_k = max(b - a for a, b in zip(cu_k[:-1], cu_k[1:]))
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return as_tensor(cu_q), as_tensor(cu_k), key_start, max_q, max_k


def _cuda_varlen():
    """torch's FlashAttention varlen kernel as ``segmented_attention`` calls it, or None where torch lacks it."""
    kwargs = varlen_causal_kwargs()
    if kwargs is None:
        return None
    from torch.nn.attention.varlen import varlen_attn

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        if "enable_gqa" not in kwargs and k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = {} if scale is None else {"scale": scale}
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs, **extra)

    return call


def make_cp_attention_fn(group=None):
    """An attention kernel with the model's signature ``fn(q, k, v, cu_seqlens, info)`` (install it with
    ``Qwen3VLModel.set_attention_fn``) that runs ``cp_attention`` over ``group``. The local tokens' global
    positions follow from the load-balanced layout; of ``info`` (built by the model from the GLOBAL
    ``cu_seqlens``) only the host copy of the boundaries is read (the varlen kernel's layout)."""

    def attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, info=None
                     ) -> torch.Tensor:
        cp_size = dist.get_world_size(group)
        global_pos = local_positions(q.size(0) * cp_size, dist.get_rank(group), cp_size, device=q.device)
        boundaries = getattr(info, "boundaries", None) or None  # the host copy, when the model built one
        return cp_attention(q, k, v, cu_seqlens, global_pos, group, boundaries=boundaries)

    return attention_fn
