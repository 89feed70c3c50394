"""Triton kernels for the two row ops of ``fused_linear_logprobs`` (contract: ``mgpt_ops/rl/_row_ops.py``).

Both kernels are memory-bound streams over a chunk of fp32 logits ``[C, Vs]``:

* ``row_stats``: one program per row makes ONE pass over the row, keeping per-lane online statistics
  (running max m, s = sum exp(z - m), centred u = sum exp(z - m) (z - m)) and merges the lanes at the end:
  ``M = max m_l``, ``s = sum s_l e^(m_l - M)``, ``u = sum e^(m_l - M) (u_l + (m_l - M) s_l)``. Keeping the
  statistics per lane instead of per row avoids a cross-warp reduction in every iteration.
* ``row_grad``: a 2-D grid (row, block of the vocabulary); each program reads its block of logits once and
  writes ``dlogits = inv_t * (g_lp (1[j == label] - p_j) - g_ent p_j (z_j - mean_z))`` in ``out_dtype``.

Sizes: BLOCK_V = 4096 fp32 with 8 warps gives each thread 16 contiguous elements (four 16-byte loads) per
iteration. For V = 151,936 and chunks of ~1-4K rows the stats grid has 1-4K programs and the grad grid
37 x C programs, which keeps all 132 SMs of an H100 busy. Offsets are int64 (C * V exceeds 2^31 for big
chunks). Imported only when the ``triton`` face runs, so ``import mgpt_ops`` works without Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Finite stand-in for -inf: keeps (m_old - m_new) * s and 0 * (z - m) free of inf * 0 = NaN for lanes
# that have not seen a real logit yet (masked tail lanes).
_NEG_BIG = tl.constexpr(-1.0e30)
_MAX_BLOCK_V = 4096


@triton.jit
def _row_stats_kernel(logits_ptr, labels_ptr, stats_ptr, n_cols, stride_row, inv_temperature, vocab_start,
                      ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], _NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    u = tl.zeros([BLOCK_V], tl.float32)
    # A while loop, not range(0, n_cols, BLOCK_V): the Triton 3.6 interpreter turns a runtime scalar
    # bound into a 1-element array that numpy >= 2.4 refuses to convert to an int.
    start = 0
    while start < n_cols:
        cols = start + lanes
        inside = cols < n_cols
        z = tl.load(row_ptr + cols, mask=inside, other=0.0) * inv_temperature
        z = tl.where(inside, z, _NEG_BIG)
        m_new = tl.maximum(m, z)
        rescale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        # Move the lane's centred sum from the old max to the new one, then add this element.
        u = rescale * (u + (m - m_new) * s) + e * (z - m_new)
        s = rescale * s + e
        m = m_new
        start += BLOCK_V
    row_max = tl.max(m, axis=0)
    lane_scale = tl.exp(m - row_max)
    row_s = tl.sum(s * lane_scale, axis=0)
    row_u = tl.sum(lane_scale * (u + (m - row_max) * s), axis=0)

    label = tl.load(labels_ptr + row)
    local = label - vocab_start
    has_label = (label != ignore_index) & (local >= 0) & (local < n_cols)
    z_label = tl.load(row_ptr + local, mask=has_label, other=0.0) * inv_temperature
    z_label = tl.where(has_label, z_label, 0.0)

    out = stats_ptr + row * 4
    tl.store(out, row_max)
    tl.store(out + 1, row_s)
    tl.store(out + 2, row_u)
    tl.store(out + 3, z_label)


@triton.jit
def _row_grad_kernel(logits_ptr, labels_ptr, lse_ptr, mean_z_ptr, grad_logprob_ptr, grad_entropy_ptr, out_ptr,
                     n_cols, stride_logits, stride_out, inv_temperature, vocab_start, ignore_index,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = cols < n_cols
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    mean_z = tl.load(mean_z_ptr + row)
    g_lp = tl.load(grad_logprob_ptr + row)
    g_ent = tl.load(grad_entropy_ptr + row)

    z = tl.load(logits_ptr + row * stride_logits + cols, mask=inside, other=0.0) * inv_temperature
    p = tl.exp(z - lse)
    dz = -p * (g_lp + g_ent * (z - mean_z))
    dz = tl.where(cols == label - vocab_start, dz + g_lp, dz)
    dz = tl.where(label == ignore_index, 0.0, dz) * inv_temperature
    tl.store(out_ptr + row * stride_out + cols, dz.to(out_ptr.dtype.element_ty), mask=inside)


def _block_v(n_cols: int) -> int:
    return min(_MAX_BLOCK_V, triton.next_power_of_2(max(n_cols, 16)))


def _check_chunk(logits: torch.Tensor, labels: torch.Tensor) -> None:
    # The op wrapper guarantees these; a direct caller gets an error instead of a wrong stride.
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("mgpt.logits_row_*: 'logits' must be a 2-D fp32 tensor with unit column stride")
    if not labels.is_contiguous() or labels.shape != logits.shape[:1]:
        raise ValueError("mgpt.logits_row_*: 'labels' must be contiguous with one entry per logits row")


def row_stats(logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float, vocab_start: int,
              ignore_index: int) -> torch.Tensor:
    """stats[C, 4] = (m, s, u, z_label) per row; see the module docstring of ``_row_ops``."""
    _check_chunk(logits, labels)
    rows, n_cols = logits.shape
    stats = torch.empty((rows, 4), dtype=torch.float32, device=logits.device)
    if rows == 0:
        return stats
    _row_stats_kernel[(rows,)](logits, labels, stats, n_cols, logits.stride(0), float(inv_temperature),
                               int(vocab_start), int(ignore_index), BLOCK_V=_block_v(n_cols), num_warps=8)
    return stats


def row_grad(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, mean_z: torch.Tensor,
             grad_logprob: torch.Tensor, grad_entropy: torch.Tensor, inv_temperature: float, vocab_start: int,
             ignore_index: int, out_dtype: torch.dtype) -> torch.Tensor:
    """dlogits[C, Vs] in ``out_dtype``; row vectors (lse, mean_z, grads) must be contiguous fp32."""
    _check_chunk(logits, labels)
    rows, n_cols = logits.shape
    out = torch.empty((rows, n_cols), dtype=out_dtype, device=logits.device)
    if rows == 0 or n_cols == 0:
        return out
    block = _block_v(n_cols)
    grid = (rows, triton.cdiv(n_cols, block))
    _row_grad_kernel[grid](logits, labels, lse, mean_z, grad_logprob, grad_entropy, out, n_cols,
                           logits.stride(0), out.stride(0), float(inv_temperature), int(vocab_start),
                           int(ignore_index), BLOCK_V=block, num_warps=8)
    return out
