"""Triton face of ``mgpt::w4a16_mm`` (format and formulas: ``mgpt_ops/quant/w4a16.py``).

At decode sizes (M <= 16) the GEMM is a stream over the packed weight (N K / 2 bytes) and nothing else
matters, so the kernel is built to keep every SM reading:

* grid = (M blocks, N blocks of BLOCK_N, SPLIT_K): with only a few N blocks (N = 2048-4096 gives 32-64), K is
  split so that the grid has ~4 programs per SM (several co-reside, which evens out the tail); each split
  writes fp32 partial sums to its own slice of a [SPLIT_K, M, N] buffer that the host sums (deterministic, no
  atomics). The split is capped so that buffer (SPLIT_K M N 4 bytes) stays under 1/4 of the weight bytes
  (N K / 2), i.e. SPLIT_K <= K / (32 M): at M = 1 that never binds, at M = 16 it keeps the extra traffic small;
* each program loads a [BLOCK_N, BLOCK_K / 8] int32 tile (BLOCK_K = 128 -> 64 contiguous bytes per row,
  vectorised 16-byte loads), unpacks it in registers with shifts and masks into [BLOCK_N, BLOCK_K / 8, 8]
  codes (k = 8 j + i), applies the group's scale and zero point (gathered per packed column: group_size is a
  multiple of 8), reshapes to [BLOCK_N, BLOCK_K] and feeds ``tl.dot`` in x's dtype with fp32 accumulation;
* the K loop has a constexpr trip count (TILES_PER_SPLIT) so the compiler can software-pipeline it and the
  interpreter needs no runtime ``range`` bound (a Triton 3.6 + numpy 2.4 interpreter trap).

Under TRITON_INTERPRET=1 bf16 ``tl.dot`` is wrong, so operands are upcast to fp32 there (INTERPRET flag).
Imported only when the ``triton`` face runs, so ``import mgpt_ops`` works without Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mgpt_ops._backend import triton_interpreting

_GPU_PROGRAMS = 528  # ~4 programs per SM on an H100 (132 SMs)
_INTERPRET_PROGRAMS = 4  # the interpreter pays per program: few, big ones (still exercises split-K)


@triton.jit
def _w4a16_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, partial_ptr, M, N, K, n_groups,
                  GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
                  INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PACKED_K: tl.constexpr = BLOCK_K // 8
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    k_lanes = tl.arange(0, BLOCK_K)
    j_lanes = tl.arange(0, PACKED_K)
    shifts = tl.arange(0, 8) * 4
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    q_rows = qweight_ptr + cols.to(tl.int64)[:, None] * (K // 8)
    g_rows = cols.to(tl.int64)[:, None] * n_groups

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_first = pid_k * TILES_PER_SPLIT * BLOCK_K
    for t in range(TILES_PER_SPLIT):
        k0 = k_first + t * BLOCK_K
        # K % BLOCK_K may be != 0 (K = 96 with group 32): mask by element, in codes and in x.
        ks = k0 + k_lanes
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
        js = k0 // 8 + j_lanes
        j_ok = col_ok[:, None] & (js < K // 8)[None, :]
        packed = tl.load(q_rows + js[None, :], mask=j_ok, other=0)
        codes = ((packed[:, :, None] >> shifts[None, None, :]) & 0xF).to(tl.float32)
        groups = (js * 8) // GROUP_SIZE
        scale = tl.load(scales_ptr + g_rows + groups[None, :], mask=j_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + g_rows + groups[None, :], mask=j_ok, other=0.0).to(tl.float32)
        else:
            zero = tl.full([BLOCK_N, PACKED_K], 8.0, tl.float32)
        w = (codes - zero[:, :, None]) * scale[:, :, None]
        w = tl.reshape(w, [BLOCK_N, BLOCK_K])
        if INTERPRET:
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        elif x.dtype == tl.float32:  # fp32 activations (tests): exact products, not TF32
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))

    out = partial_ptr + pid_k.to(tl.int64) * M * N + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


def launch_config(m: int, n: int, k: int, interpreting: bool) -> dict:
    """Tile sizes and split-K for one problem (see the module docstring for the reasoning)."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))  # tl.dot needs >= 16 rows
    block_n = 128 if interpreting else 64
    block_k = 128
    k_tiles = triton.cdiv(k, block_k)
    programs_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    target = _INTERPRET_PROGRAMS if interpreting else _GPU_PROGRAMS
    split = max(1, min(k_tiles, target // programs_mn, k // (32 * m)))
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty trailing split
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, TILES_PER_SPLIT=tiles_per_split,
                split_k=split)


def w4a16_mm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros, group_size: int,
                    split_k: int | None = None) -> torch.Tensor:
    """out [M, N] in x's dtype; ``split_k`` overrides the heuristic (tests)."""
    if x.dim() != 2 or qweight.dtype != torch.int32 or not qweight.is_contiguous():
        raise ValueError("mgpt.w4a16_mm: triton face needs 2-D x and a contiguous int32 qweight")
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    interpreting = triton_interpreting()
    cfg = launch_config(m, n, k, interpreting)
    if split_k is not None:
        k_tiles = triton.cdiv(k, cfg["BLOCK_K"])
        cfg["TILES_PER_SPLIT"] = triton.cdiv(k_tiles, split_k)
        cfg["split_k"] = triton.cdiv(k_tiles, cfg["TILES_PER_SPLIT"])
    split = cfg.pop("split_k")
    partial = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    scales = scales.contiguous()
    zeros_arg = scales if zeros is None else zeros.contiguous()  # unread when HAS_ZEROS is False
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    _w4a16_kernel[grid](x.contiguous(), qweight, scales, zeros_arg, partial, m, n, k, k // group_size,
                        GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, INTERPRET=interpreting,
                        num_warps=4, num_stages=3 if not interpreting else 1, **cfg)
    return out.copy_(partial.sum(0) if split > 1 else partial[0])
