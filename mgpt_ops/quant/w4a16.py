"""Int4 group-quantized weights with 16-bit activations: ``quantize_int4_weight`` and ``w4a16_mm``.

Format (weight ``w`` in ``nn.Linear`` layout [N, K], groups of ``group_size`` in {32, 64, 128} consecutive
elements along K in each output row; K % group_size == 0; G = K // group_size):

    qweight  int32 [N, K // 8], contiguous: element k of row n is the 4-bit code in bits
             [4 (k % 8), 4 (k % 8) + 4) of qweight[n, k // 8] (eight codes per int32, lowest k in the low bits).
    scales   [N, G], dtype bf16 / fp16 (the activation dtype) or fp32.
    zeros    [N, G], same dtype as ``scales``, holding the integer zero point z in [0, 15] as a float;
             None for symmetric weights (then z = 8).
    dequant  w_hat[n, k] = (q[n, k] - z[n, k // group_size]) * s[n, k // group_size]

Quantizer (round-to-nearest, no GPTQ), per group with values v:
    asymmetric: lo = min(min v, 0), hi = max(max v, 0) (the range always contains 0, as in GPTQ/AWQ, so the
                zero point needs no clamping and no element is clamped), s = (hi - lo) / 15,
                z = clamp(round(-lo / s), 0, 15), q = clamp(round(v / s) + z, 0, 15)
    symmetric:  s = max|v| / 7 (codes 1..15 are used, code 0 never: the range is +-7 s, so no element is
                clamped), z = 8, q = clamp(round(v / s) + 8, 0, 15)
    s is computed in float64, then rounded UP to the storage dtype (never down, which could push an element
    past the code range), floored at a tiny positive value (constant-zero groups: never 0 / 0 = NaN) and
    capped at the dtype's max (never inf * 0 = NaN). Hence |w - w_hat| <= s / 2 elementwise.

Matmul: ``w4a16_mm(x, qweight, scales, zeros, group_size=...)`` = x @ w_hat.T, fp32 accumulation, output in
x's dtype (bf16 / fp16; fp32 for tests). Faces: ``reference`` (dequantize in float64, then matmul -- the spec),
``triton`` (``w4a16_triton.py``: in-kernel unpacking, split-K for decode sizes) and ``cpu`` (the C++ kernel
``mgpt::w4a16_mm_kernel`` in ``mgpt_ops._C``, ``csrc/quant/w4a16_cpu.cpp``: fp32 weight panels decoded on the
fly, MKL sgemm; available where that kernel is registered). Automatic choice: CUDA -> triton; CPU -> cpu, else
reference. Both ops are inference only: they have no autograd formula (the weight codes are not
differentiable and no training path needs d/dx).
"""

from __future__ import annotations

from typing import Optional

import torch

from mgpt_ops import _ext
from mgpt_ops._backend import choose_backend
from mgpt_ops._checks import check_tensor

GROUP_SIZES = (32, 64, 128)
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PACK = 8  # int4 codes per int32
SYMMETRIC_ZERO = 8
# An older build of mgpt_ops._C may lack the kernel's schema: its fake is then not registered, and the C++ faces
# are simply unavailable (mgpt_ops._backend.kernels_registered).
_KERNEL_DECLARED = _ext.loaded() and hasattr(torch.ops.mgpt, "w4a16_mm_kernel")
_FACES = ("reference", "triton", "cpu")
_PREFERENCE = {"cuda": ("triton",), "cpu": ("cpu",)}
_KERNELS = ("mgpt::w4a16_mm_kernel",)  # what the cpu face calls


# ----------------------------------------------------------------------------------------------------------
# packing and the reference face
# ----------------------------------------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] integers in [0, 15] -> int32 [N, K // 8] in the layout of the module docstring."""
    n, k = codes.shape
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (codes.to(torch.int64).reshape(n, k // PACK, PACK) << shifts).sum(-1)
    # Values reach 2^32 - 1: wrap into int32's two's-complement range before the cast.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K // 8] -> int64 codes [N, K] (inverse of ``pack_int4``)."""
    n, k8 = qweight.shape
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int64)
    return ((qweight.to(torch.int64)[:, :, None] >> shifts) & 0xF).reshape(n, k8 * PACK)


def _round_up_to(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 scales -> ``dtype``, rounded up, in [tiny, max] of ``dtype``."""
    info = torch.finfo(dtype)
    s = s.clamp(min=info.tiny, max=info.max)
    stored = s.to(dtype)
    up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    stored = torch.where(stored.double() < s, up, stored)
    return stored.clamp(max=info.max)


def quantize_reference(w: torch.Tensor, group_size: int, symmetric: bool):
    """(qweight, scales, zeros) with zeros = 8 everywhere when symmetric; formulas in the module docstring."""
    n, k = w.shape
    v = w.double().reshape(n, k // group_size, group_size)
    if symmetric:
        s = _round_up_to(v.abs().amax(-1) / 7, w.dtype)
        z = torch.full_like(s, SYMMETRIC_ZERO)
    else:
        lo = v.amin(-1).clamp(max=0)
        hi = v.amax(-1).clamp(min=0)
        s = _round_up_to((hi - lo) / 15, w.dtype)
        z = torch.round(-lo / s.double()).clamp(0, 15).to(w.dtype)
    codes = torch.round(v / s.double()[..., None]) + z.double()[..., None]
    codes = codes.clamp(0, 15).reshape(n, k)
    return pack_int4(codes), s.contiguous(), z.contiguous()


def dequantize_reference(qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """w_hat [N, K] in float64."""
    codes = unpack_int4(qweight).double()
    s = scales.double().repeat_interleave(group_size, dim=1)
    z = SYMMETRIC_ZERO if zeros is None else zeros.double().repeat_interleave(group_size, dim=1)
    return (codes - z) * s


def w4a16_mm_reference(x, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    return (x.double() @ dequantize_reference(qweight, scales, zeros, group_size).T).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# the ops (inference only: no autograd registered)
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("mgpt::quantize_int4_weight", mutates_args=())
def _quantize_op(w: torch.Tensor, group_size: int, symmetric: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quantize_reference(w, group_size, symmetric)


@_quantize_op.register_fake
def _(w, group_size, symmetric):
    n, k = w.shape
    groups = k // group_size
    return (w.new_empty((n, k // PACK), dtype=torch.int32), w.new_empty((n, groups)), w.new_empty((n, groups)))


@torch.library.custom_op("mgpt::w4a16_mm", mutates_args=())
def _w4a16_mm_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 group_size: int) -> torch.Tensor:
    face = choose_backend("w4a16_mm", x.device, _FACES, _PREFERENCE, _KERNELS)
    if face == "triton":
        from mgpt_ops.quant.w4a16_triton import w4a16_mm_triton

        return w4a16_mm_triton(x, qweight, scales, zeros, group_size)
    if face == "cpu":
        return torch.ops.mgpt.w4a16_mm_kernel(x, qweight, scales, zeros, group_size)
    return w4a16_mm_reference(x, qweight, scales, zeros, group_size)


@_w4a16_mm_op.register_fake
def _(x, qweight, scales, zeros, group_size):
    return x.new_empty((x.shape[0], qweight.shape[0]))


if _KERNEL_DECLARED:
    @torch.library.register_fake("mgpt::w4a16_mm_kernel")
    def _(x, qweight, scales, zeros, group_size):
        return x.new_empty((x.shape[0], qweight.shape[0]))


# ----------------------------------------------------------------------------------------------------------
# public wrappers: validation (traceable: shapes and dtypes only)
# ----------------------------------------------------------------------------------------------------------


def _check_group_size(op: str, group_size, k: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"mgpt.{op}: argument 'group_size' must be one of {GROUP_SIZES}, got {group_size!r}")
    if k == 0 or k % group_size != 0:
        raise ValueError(f"mgpt.{op}: argument 'group_size'={group_size} must divide K={k} (the input "
                         f"features, > 0); pad K or choose another group size")


def quantize_int4_weight(w: torch.Tensor, group_size: int = 128, symmetric: bool = False):
    """Quantize ``w`` [N, K] (bf16 / fp16 / fp32) to int4 groups: returns ``(qweight, scales, zeros)`` in the
    format of the module docstring, ``scales``/``zeros`` in w's dtype, ``zeros`` None when ``symmetric``."""
    op = "quantize_int4_weight"
    check_tensor(op, "w", w, ndim=2, dtypes=ACT_DTYPES)
    _check_group_size(op, group_size, w.shape[1])
    if not isinstance(symmetric, bool):
        raise TypeError(f"mgpt.{op}: argument 'symmetric' must be a bool, got {symmetric!r}")
    qweight, scales, zeros = _quantize_op(w.detach(), group_size, symmetric)
    return qweight, scales, None if symmetric else zeros


def w4a16_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], *,
             group_size: int) -> torch.Tensor:
    """out[..., N] = x[..., K] @ w_hat.T (fp32 accumulation, x's dtype); w_hat from the int4 format of the
    module docstring. ``zeros`` None means symmetric (z = 8). Inference only (no gradient)."""
    op = "w4a16_mm"
    check_tensor(op, "x", x, dtypes=ACT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"mgpt.{op}: argument 'x' must have shape [..., K], got a 0-d tensor")
    k = x.shape[-1]
    _check_group_size(op, group_size, k)
    dev = x.device
    check_tensor(op, "qweight", qweight, ndim=2, dtypes=(torch.int32,), device=dev)
    n = qweight.shape[0]
    check_tensor(op, "qweight", qweight, shape=(n, k // PACK))
    check_tensor(op, "qweight", qweight, contiguous=True)
    check_tensor(op, "scales", scales, shape=(n, k // group_size), device=dev,
                 dtypes=tuple(dict.fromkeys((x.dtype, torch.float32))))
    if zeros is not None:
        check_tensor(op, "zeros", zeros, shape=(n, k // group_size), dtypes=(scales.dtype,), device=dev)
    lead = x.shape[:-1]
    out = _w4a16_mm_op(x.reshape(-1, k), qweight, scales, zeros, group_size)
    return out.reshape(*lead, n)
