"""Scaled GEMM of FP8 / INT8 operands as the op ``mgpt::scaled_mm``.

With the activation ``a [M, K]`` and the weight ``b [N, K]`` in ``nn.Linear`` layout (same dtype,
``torch.float8_e4m3fn`` or ``torch.int8``) and fp32 DEQUANTISATION scales (``a ≈ q_a * scale_a``):

    out[m, n] = cast_out( scale_a[m] * scale_b[n] * sum_k a[m, k] * b[n, k]  + bias[n] )
              = (a * scale_a) @ (b * scale_b).T + bias

* ``scale_a``: ``[1, 1]`` (per-tensor) or ``[M, 1]`` (per-token); ``scale_b``: ``[1, 1]`` or ``[N, 1]``
  (per output channel). Rule: one scale per ROW of its operand, or one per tensor -- so the outputs of
  ``quantize_fp8_per_token`` and ``quantize_weight_per_channel`` feed in unchanged. A 0-d or ``[1]`` scale is
  accepted as per-tensor. Any mix of per-tensor and per-row scales works. ``scale_b`` may also be given as
  ``[1, N]`` (the convention of ``torch._scaled_mm``, see below); it is read as ``[N, 1]``.
* ``torch._scaled_mm`` takes the transposed weight: ``torch._scaled_mm(a, b.T, scale_a, scale_b.T, ...)``
  computes the same product (its per-channel scale is ``[1, N]`` because its operand is ``[K, N]``).
* Accumulation: fp32 for FP8, exact int32 for INT8 (which therefore requires K <= (2^31 - 1) / 128^2 = 131071,
  so no sum can overflow); scales, bias (any float dtype, added in fp32) and the cast to ``out_dtype`` (bf16,
  fp16 or fp32) happen in the epilogue.

Faces: ``reference`` dequantises in float64 and multiplies (the spec); ``triton`` runs ``tl.dot`` on the
FP8 / INT8 tiles (``scaled_gemm_triton.py``); ``cpu`` is the C++ kernel ``mgpt::scaled_mm_kernel`` in
``mgpt_ops._C`` (``csrc/quant/scaled_mm_cpu.cpp``: fp32 weight panels decoded on the fly, MKL sgemm; int8 summed
exactly in K slices), available where that kernel is registered. Automatic choice: CUDA -> triton; CPU -> cpu,
else reference. ``cuda`` is a CUTLASS sm_90a FP8 kernel (``csrc/quant/scaled_mm_sm90.cu``; fp8 only, K % 16 == 0
and 16-byte aligned output rows) that has been compiled but never run on a GPU, so it is NOT chosen
automatically: it runs only when pinned with ``mgpt_ops.use_backend("cuda")``.

Not differentiable (inference only): the wrapper detaches scales and bias, and the output never requires
grad (FP8 / INT8 operands cannot carry gradients anyway).
"""

from __future__ import annotations

import torch

from mgpt_ops import _ext
from mgpt_ops._backend import choose_backend
from mgpt_ops._checks import check_tensor

OP = "scaled_mm"
# An older build of mgpt_ops._C may lack the kernel's schema: its fake is then not registered, and the C++ faces
# are simply unavailable (mgpt_ops._backend.kernels_registered).
_KERNEL_DECLARED = _ext.loaded() and hasattr(torch.ops.mgpt, "scaled_mm_kernel")
FACES = ("reference", "triton", "cpu", "cuda")
# The cuda face is left out of the automatic choice until it has been verified on a GPU (module docstring).
PREFERENCE = {"cuda": ("triton",), "cpu": ("cpu",)}
KERNELS = ("mgpt::scaled_mm_kernel",)  # what the cpu and cuda faces call (one op, dispatched by device)
QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCALE_DTYPES = (torch.float32,)
BIAS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest K whose int8 dot products cannot overflow the int32 accumulator: K * 128 * 128 <= 2^31 - 1.
INT8_MAX_K = (2 ** 31 - 1) // (128 * 128)


def scaled_mm_reference(a, b, scale_a, scale_b, out_dtype: torch.dtype, bias=None) -> torch.Tensor:
    """Dequantise in float64, multiply, add bias, cast once (the spec)."""
    a64 = a.to(torch.float64) * scale_a.to(torch.float64)
    b64 = b.to(torch.float64) * scale_b.to(torch.float64)
    out = a64 @ b64.T
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out.to(out_dtype)


@torch.library.custom_op("mgpt::scaled_mm", mutates_args=())
def _scaled_mm_op(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    face = choose_backend(OP, a.device, FACES, PREFERENCE, KERNELS)
    if face == "triton":
        from mgpt_ops.quant import scaled_gemm_triton  # lazy: triton is optional

        return scaled_gemm_triton.scaled_mm(a, b, scale_a, scale_b, out_dtype, bias)
    if face in ("cpu", "cuda"):
        return torch.ops.mgpt.scaled_mm_kernel(a, b, scale_a, scale_b, out_dtype, bias)
    return scaled_mm_reference(a, b, scale_a, scale_b, out_dtype, bias)


@_scaled_mm_op.register_fake
def _(a, b, scale_a, scale_b, out_dtype, bias):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


if _KERNEL_DECLARED:
    @torch.library.register_fake("mgpt::scaled_mm_kernel")
    def _(a, b, scale_a, scale_b, out_dtype, bias):
        return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def _normalise_scale(name: str, scale, rows: int, operand: str, row_vector_ok: bool = False) -> torch.Tensor:
    """Per-tensor (0-d, [1], [1, 1]) -> [1, 1]; per-row must be [rows, 1] (or [1, rows] when ``row_vector_ok``:
    torch._scaled_mm's layout of per-channel weight scales). Returns a contiguous fp32 [*, 1]."""
    check_tensor(OP, name, scale, dtypes=SCALE_DTYPES)
    if scale.numel() == 1 and scale.dim() <= 2:
        return scale.detach().reshape(1, 1)
    if row_vector_ok and scale.dim() == 2 and scale.shape[0] == 1 and scale.shape[1] == rows:
        return scale.detach().reshape(rows, 1).contiguous()
    if scale.dim() != 2 or scale.shape[1] != 1 or scale.shape[0] != rows:
        also = f" or [1, {rows}]" if row_vector_ok else ""
        raise ValueError(f"mgpt.{OP}: argument '{name}' must have shape [1, 1] (per-tensor) or [{rows}, 1]{also} "
                         f"(one per row of '{operand}'), got {list(scale.shape)}")
    return scale.detach().contiguous()


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, *,
              out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out [M, N] = (a * scale_a) @ (b * scale_b).T + bias`` in ``out_dtype`` (formulas: module docstring).

    a: [M, K] float8_e4m3fn or int8; b: weight [N, K] of the same dtype (nn.Linear layout); scale_a: fp32 [1, 1]
    or [M, 1]; scale_b: fp32 [1, 1], [N, 1] or [1, N]; bias: [N] (fp32/bf16/fp16) or None; out_dtype: bf16/fp16/fp32.
    Operands are used as they are strided (any strides); scales are made contiguous.
    """
    check_tensor(OP, "a", a, ndim=2, dtypes=QUANT_DTYPES)
    check_tensor(OP, "b", b, ndim=2, dtypes=QUANT_DTYPES, device=a.device)
    if a.dtype != b.dtype:
        raise TypeError(f"mgpt.{OP}: arguments 'a' and 'b' must share one dtype (float8_e4m3fn or int8), got "
                        f"a={str(a.dtype).replace('torch.', '')}, b={str(b.dtype).replace('torch.', '')}")
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"mgpt.{OP}: argument 'b' must be the weight [N, K] with K={K} (the last dim of 'a'), "
                         f"got shape {list(b.shape)}")
    if a.dtype == torch.int8 and K > INT8_MAX_K:
        raise ValueError(f"mgpt.{OP}: int8 operands need K <= {INT8_MAX_K} (exact int32 accumulation), got K={K}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"mgpt.{OP}: argument 'out_dtype' must be one of bfloat16, float16, float32, got "
                        f"{out_dtype}")
    scale_a = _normalise_scale("scale_a", scale_a, M, "a")
    scale_b = _normalise_scale("scale_b", scale_b, N, "b", row_vector_ok=True)
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        check_tensor(OP, name, s, device=a.device)
    if bias is not None:
        check_tensor(OP, "bias", bias, shape=(N,), dtypes=BIAS_DTYPES, device=a.device)
        bias = bias.detach().contiguous()
    return _scaled_mm_op(a.detach(), b.detach(), scale_a, scale_b, out_dtype, bias)
