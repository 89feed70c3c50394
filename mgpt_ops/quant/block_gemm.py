"""Block-scaled FP8 GEMMs (DeepSeek-V3 / Qwen3 FP8 checkpoints): ``block_scaled_mm`` and, for MoE experts,
``grouped_block_scaled_mm``.

Operands are ``torch.float8_e4m3fn`` with fp32 DEQUANTISATION scales (``x ≈ q * scale``), block B = 128:

* activations ``a [M, K]`` in 1 x B groups along K: ``scale_a [M, ceil(K/B)]``, a[m, k] ≈ q * scale_a[m, k // B]
  (exactly what ``quantize_fp8_group(x, 128)`` returns);
* weights ``b [N, K]`` (``nn.Linear`` layout) in B x B blocks: ``scale_b [ceil(N/B), ceil(K/B)]``,
  b[n, k] ≈ q * scale_b[n // B, k // B] (Qwen's ``weight_scale_inv``; ``quantize_weight_block128``).

    out[m, n] = cast_out( sum_k (a[m, k] scale_a[m, k // B]) (b[n, k] scale_b[n // B, k // B]) + bias[n] )

K and N need NOT be multiples of 128: the last group / block is partial and covers the remaining columns / rows
(as the quantizers produce them). ``block`` must be 128 (the only layout of published checkpoints; anything
else is an error). Accumulation is fp32: per K block, the FP8 products are summed in fp32 and the partial sum
is multiplied by its two scales before it is added (the DeepSeek-V3 scheme); bias (fp32 / bf16 / fp16) and the
cast to ``out_dtype`` (bf16, fp16 or fp32) happen in the epilogue.

Grouped (MoE): ``a [M_total, K]`` holds the tokens sorted by expert, ``b [E, N, K]`` the expert weights,
``scale_a [M_total, ceil(K/B)]``, ``scale_b [E, ceil(N/B), ceil(K/B)]`` and ``offsets [E + 1]`` (int32 or
int64) the CUMULATIVE row offsets with a leading 0: expert e owns rows ``offsets[e] : offsets[e + 1]``, so
offsets[0] = 0, offsets non-decreasing, offsets[E] = M_total (empty experts, i.e. equal neighbours, are fine).
``out[offsets[e]:offsets[e+1]] = block_scaled_mm(a[rows], b[e], ...)``; no bias.

Checks: dtypes, shapes and devices in the public wrappers (traceable). The VALUES of ``offsets`` are checked
inside the op, which costs one copy of the E + 1 offsets to the host (a sync when they live on a GPU); the
result is remembered for that tensor object and version (``mgpt_ops._checks.offsets_summary``, shared with
``cu_seqlens``), so the layers of one forward that share an ``offsets`` tensor pay it once. The Triton kernel never reads out of
bounds whatever the offsets hold.

Faces: ``reference`` (dequantise in float64, matmul -- the spec), ``triton`` (``block_gemm_triton.py``; the
grouped op is ONE launch for all experts) and ``cpu`` (``mgpt::block_scaled_mm_kernel`` /
``mgpt::grouped_block_scaled_mm_kernel`` in ``mgpt_ops._C``, available only where those kernels are
registered). Automatic choice: CUDA -> triton; CPU -> cpu if registered, else reference. ``cuda`` (dense op
only) is a CUTLASS sm_90a kernel with CUTLASS's blockwise-scaling mainloop (``csrc/quant/block_scaled_mm_sm90.cu``;
block 128, K % 16 == 0 and 16-byte aligned output rows) that has been compiled but never run on a GPU, so it is
NOT chosen automatically: it runs only when pinned with ``mgpt_ops.use_backend("cuda")``.

Inference only (not differentiable): the wrappers detach their inputs and the output never requires grad.
"""

from __future__ import annotations

from typing import Optional

import torch

from mgpt_ops import _ext
from mgpt_ops._backend import available_backends, choose_backend
from mgpt_ops._checks import check_tensor, offsets_summary

BLOCK = 128
FP8 = torch.float8_e4m3fn
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BIAS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OFFSET_DTYPES = (torch.int32, torch.int64)
FACES = ("reference", "triton", "cpu", "cuda")
# The cuda face is left out of the automatic choice until it has been verified on a GPU (module docstring).
PREFERENCE = {"cuda": ("triton",), "cpu": ("cpu",)}
KERNELS = {"block_scaled_mm": ("mgpt::block_scaled_mm_kernel",),
           "grouped_block_scaled_mm": ("mgpt::grouped_block_scaled_mm_kernel",)}


def usable_faces(op: str, device: torch.device) -> list[str]:
    """The faces of ``op`` ("block_scaled_mm" or "grouped_block_scaled_mm") that can run on ``device`` here."""
    return available_backends(device, FACES, KERNELS[op])


def _choose(op: str, device: torch.device) -> str:
    return choose_backend(op, device, FACES, PREFERENCE, KERNELS[op])


# --------------------------------------------------------------------------------------------------------
# Reference face (the spec)
# --------------------------------------------------------------------------------------------------------
def _expand(scale: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> torch.Tensor:
    """Per-block scales -> one per element [rows, cols] (partial last blocks cropped)."""
    return scale.repeat_interleave(block_rows, dim=0)[:rows].repeat_interleave(block_cols, dim=1)[:, :cols]


def dequantize_groups(a: torch.Tensor, scale_a: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """a [M, K] fp8, scale_a [M, ceil(K/block)] -> float64 [M, K]."""
    return a.double() * _expand(scale_a.double(), *a.shape, 1, block)


def dequantize_blocks(b: torch.Tensor, scale_b: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """b [N, K] fp8, scale_b [ceil(N/block), ceil(K/block)] -> float64 [N, K]."""
    return b.double() * _expand(scale_b.double(), *b.shape, block, block)


def block_scaled_mm_reference(a, b, scale_a, scale_b, out_dtype: torch.dtype, block: int = BLOCK,
                              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = dequantize_groups(a, scale_a, block) @ dequantize_blocks(b, scale_b, block).T
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


def grouped_block_scaled_mm_reference(a, b, scale_a, scale_b, offsets, out_dtype: torch.dtype,
                                      block: int = BLOCK) -> torch.Tensor:
    out = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        out[start:end] = block_scaled_mm_reference(a[start:end], b[e], scale_a[start:end], scale_b[e], out_dtype,
                                                   block)
    return out


# --------------------------------------------------------------------------------------------------------
# Value checks of offsets (inside the op: they read tensor values)
# --------------------------------------------------------------------------------------------------------
def check_offsets_values(offsets: torch.Tensor, m_total: int) -> None:
    last, _ = offsets_summary("grouped_block_scaled_mm", "offsets", offsets)
    if last != m_total:
        raise ValueError(f"mgpt.grouped_block_scaled_mm: argument 'offsets' must end at M_total={m_total} (the "
                         f"rows of 'a'), got {last}")


# --------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("mgpt::block_scaled_mm", mutates_args=())
def _block_scaled_mm_op(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                        out_dtype: torch.dtype, block: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    face = _choose("block_scaled_mm", a.device)
    if face == "triton":
        from mgpt_ops.quant import block_gemm_triton  # lazy: triton is optional

        return block_gemm_triton.block_scaled_mm(a, b, scale_a, scale_b, out_dtype, bias)
    if face in ("cpu", "cuda"):
        return torch.ops.mgpt.block_scaled_mm_kernel(a.contiguous(), b.contiguous(), scale_a, scale_b, out_dtype,
                                                     block, bias)
    return block_scaled_mm_reference(a, b, scale_a, scale_b, out_dtype, block, bias)


@_block_scaled_mm_op.register_fake
def _(a, b, scale_a, scale_b, out_dtype, block, bias):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@torch.library.custom_op("mgpt::grouped_block_scaled_mm", mutates_args=())
def _grouped_block_scaled_mm_op(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                                offsets: torch.Tensor, out_dtype: torch.dtype, block: int) -> torch.Tensor:
    check_offsets_values(offsets, a.shape[0])
    face = _choose("grouped_block_scaled_mm", a.device)
    if face == "triton":
        from mgpt_ops.quant import block_gemm_triton

        return block_gemm_triton.grouped_block_scaled_mm(a, b, scale_a, scale_b, offsets, out_dtype)
    if face == "cpu":
        return torch.ops.mgpt.grouped_block_scaled_mm_kernel(a.contiguous(), b.contiguous(), scale_a, scale_b,
                                                             offsets, out_dtype, block)
    return grouped_block_scaled_mm_reference(a, b, scale_a, scale_b, offsets, out_dtype, block)


@_grouped_block_scaled_mm_op.register_fake
def _(a, b, scale_a, scale_b, offsets, out_dtype, block):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


# Fakes of the C++ kernels themselves (so they trace and opcheck on their own); an older build of mgpt_ops._C may
# not declare them.
if _ext.loaded() and hasattr(torch.ops.mgpt, "block_scaled_mm_kernel"):
    @torch.library.register_fake("mgpt::block_scaled_mm_kernel")
    def _(a, b, scale_a, scale_b, out_dtype, block, bias):
        return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)

if _ext.loaded() and hasattr(torch.ops.mgpt, "grouped_block_scaled_mm_kernel"):
    @torch.library.register_fake("mgpt::grouped_block_scaled_mm_kernel")
    def _(a, b, scale_a, scale_b, offsets, out_dtype, block):
        return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


# --------------------------------------------------------------------------------------------------------
# Public wrappers: validation (traceable: shapes, dtypes, devices), then the ops
# --------------------------------------------------------------------------------------------------------
def _blocks(n):
    """ceil(n / BLOCK), also for symbolic sizes under torch.compile."""
    return (n + BLOCK - 1) // BLOCK


def _check_common(op: str, a, b, b_ndim: int, out_dtype, block) -> None:
    if not isinstance(block, int) or isinstance(block, bool) or block != BLOCK:
        raise ValueError(f"mgpt.{op}: argument 'block' must be {BLOCK} (1x128 activation groups, 128x128 weight "
                         f"blocks), got {block!r}")
    check_tensor(op, "a", a, ndim=2, dtypes=(FP8,))
    check_tensor(op, "b", b, ndim=b_ndim, dtypes=(FP8,), device=a.device)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"mgpt.{op}: argument 'out_dtype' must be one of bfloat16, float16, float32, got {out_dtype}")


def _check_scale(op: str, name: str, scale, shape: tuple, meaning: str, device) -> torch.Tensor:
    check_tensor(op, name, scale, dtypes=(torch.float32,), device=device)
    if tuple(scale.shape) != tuple(shape):
        raise ValueError(f"mgpt.{op}: argument '{name}' must have shape {list(shape)} ({meaning}), "
                         f"got {list(scale.shape)}")
    return scale.detach().contiguous()


def block_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, *,
                    out_dtype: torch.dtype, block: int = BLOCK, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out [M, N] = dequant(a, scale_a) @ dequant(b, scale_b).T + bias`` in ``out_dtype`` (module docstring).

    a: fp8 e4m3 [M, K]; scale_a: fp32 [M, ceil(K/128)] (1x128 groups, ``quantize_fp8_group(x, 128)``);
    b: fp8 e4m3 weight [N, K]; scale_b: fp32 [ceil(N/128), ceil(K/128)] (``weight_scale_inv``);
    bias: [N] fp32/bf16/fp16 or None; out_dtype: bf16/fp16/fp32; block: 128. Any K, N >= 1 (partial blocks).
    Operands may be strided; scales and bias are made contiguous.
    """
    op = "block_scaled_mm"
    _check_common(op, a, b, 2, out_dtype, block)
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K or K == 0:
        raise ValueError(f"mgpt.{op}: argument 'b' must be the weight [N, K] with K={K} (the last dim of 'a', "
                         f"> 0), got shape {list(b.shape)}")
    scale_a = _check_scale(op, "scale_a", scale_a, (M, _blocks(K)), "one per row of 'a' and 128 columns",
                           a.device)
    scale_b = _check_scale(op, "scale_b", scale_b, (_blocks(N), _blocks(K)), "one per 128x128 block of 'b'",
                           a.device)
    if bias is not None:
        check_tensor(op, "bias", bias, shape=(N,), dtypes=BIAS_DTYPES, device=a.device)
        bias = bias.detach().contiguous()
    return _block_scaled_mm_op(a.detach(), b.detach(), scale_a, scale_b, out_dtype, block, bias)


def grouped_block_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                            offsets: torch.Tensor, *, out_dtype: torch.dtype, block: int = BLOCK) -> torch.Tensor:
    """MoE experts: ``out[offsets[e]:offsets[e+1]] = block_scaled_mm(a[rows], b[e], scale_a[rows], scale_b[e])``.

    a: fp8 e4m3 [M_total, K], rows sorted by expert; b: fp8 e4m3 [E, N, K]; scale_a: fp32 [M_total, ceil(K/128)];
    scale_b: fp32 [E, ceil(N/128), ceil(K/128)]; offsets: int32/int64 [E + 1] cumulative row offsets
    (0 = offsets[0] <= offsets[1] <= ... <= offsets[E] = M_total; empty experts allowed);
    out_dtype: bf16/fp16/fp32; block: 128. Returns [M_total, N]. Any K, N >= 1 (partial blocks).
    """
    op = "grouped_block_scaled_mm"
    _check_common(op, a, b, 3, out_dtype, block)
    M, K = a.shape
    E, N = b.shape[0], b.shape[1]
    if b.shape[2] != K or K == 0 or E == 0:
        raise ValueError(f"mgpt.{op}: argument 'b' must be the expert weights [E, N, K] with E >= 1 and K={K} "
                         f"(the last dim of 'a', > 0), got shape {list(b.shape)}")
    scale_a = _check_scale(op, "scale_a", scale_a, (M, _blocks(K)), "one per row of 'a' and 128 columns",
                           a.device)
    scale_b = _check_scale(op, "scale_b", scale_b, (E, _blocks(N), _blocks(K)),
                           "one per 128x128 block of each expert of 'b'", a.device)
    check_tensor(op, "offsets", offsets, shape=(E + 1,), dtypes=OFFSET_DTYPES, device=a.device)
    return _grouped_block_scaled_mm_op(a.detach(), b.detach(), scale_a, scale_b, offsets.detach().contiguous(),
                                       out_dtype, block)
