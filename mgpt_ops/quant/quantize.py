"""Dynamic activation quantizers and offline weight quantizers (symmetric, FP8 e4m3 and INT8).

Conventions (shared with ``scaled_mm``):

* FP8 = ``torch.float8_e4m3fn`` (largest finite value QMAX = 448); INT8 is symmetric, QMAX = 127.
* Scales are fp32 DEQUANTISATION scales: ``x ≈ q * scale`` (broadcast), i.e. ``scale ≈ amax / QMAX`` of the
  elements it covers. To keep all-zero (or denormal) groups away from a division by zero the amax is floored:

      scale = max(amax, AMAX_FLOOR) * fp32(1 / QMAX)      AMAX_FLOOR = 1e-12, in fp32
      q     = clamp(x / scale, -QMAX, QMAX)  -> fp8 (round to nearest even by the cast)
      q     = clamp(round(x / scale), -QMAX, QMAX) -> int8 (round half to even)

  The scale is a product with the fp32 reciprocal, not a division, so every face and device rounds it
  identically (some torch kernels turn a division by a scalar into exactly that product, others do not).
  The floor gives an all-zero group q = 0 and a finite scale. ``x / scale`` is clamped before the cast: the quotient
  of the largest element can round to slightly above QMAX, and an fp8 cast of a value above 448 gives NaN.
  Results saturate, never NaN, for finite input (non-finite input is not supported).
* One scale per ROW of the operand it belongs to, or one per tensor, always 2-D:
  per-token ``[M, 1]``, per-tensor ``[1, 1]``, weight per-channel ``[N, 1]`` (weights use the ``nn.Linear``
  layout ``w [N, K]``: one scale per output channel = per row of w). ``w ≈ q * scale`` broadcasts as is.
* 1x128 groups (``quantize_fp8_group``): ``scale [M, ceil(K/g)]``, ``x[m, k] ≈ q[m, k] * scale[m, k // g]``;
  a last partial group covers the K % g remaining columns.
* 128x128 weight blocks (``quantize_weight_block128``): ``scale_inv [ceil(N/128), ceil(K/128)]``,
  ``w[n, k] ≈ q[n, k] * scale_inv[n // 128, k // 128]`` -- the ``weight_scale_inv`` tensors of Qwen's and
  DeepSeek's published FP8 checkpoints (their name: the inverse of the quantisation scale, i.e. our
  dequantisation scale).

Inputs: fp32, bf16, fp16 or float64, any shape with the quantised axis last (``[..., K]``; leading dims are
flattened as tokens) for activations, 2-D for weights; the math runs in fp32.

Not differentiable: quantisation is for inference (the wrappers detach their input; outputs never require
grad). Faces: ``reference`` and ``triton`` (``quantize_triton.py``) for every quantizer, Triton chosen
automatically on CUDA. The Triton faces are bit-identical to the reference (same fp32 scale product, IEEE
division, round-to-nearest-even on the e4m3 / int8 grid), on a GPU and under the interpreter.
"""

from __future__ import annotations

import math

import torch

from mgpt_ops._backend import choose_backend
from mgpt_ops._checks import FLOAT_DTYPES, check_tensor

FP8 = torch.float8_e4m3fn
INT8 = torch.int8
QMAX = {FP8: 448.0, INT8: 127.0}
INV_QMAX = {dtype: float(torch.tensor(1.0 / qmax, dtype=torch.float32)) for dtype, qmax in QMAX.items()}
AMAX_FLOOR = 1e-12
WEIGHT_BLOCK = 128
_FACES = ("reference", "triton")
_PREFERENCE = {"cuda": ("triton",)}


# --------------------------------------------------------------------------------------------------------
# Reference math (the spec)
# --------------------------------------------------------------------------------------------------------
def _scale_of(amax: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    return amax.clamp_min(AMAX_FLOOR) * INV_QMAX[qdtype]


def _quantize_with(x: torch.Tensor, scale: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """q = saturate(x / scale) in ``qdtype`` (x fp32, scale broadcastable to x); contiguous whatever x's
    strides (the fakes promise contiguous outputs)."""
    y = x / scale
    if qdtype == INT8:
        y = torch.round(y)
    qmax = QMAX[qdtype]
    return y.clamp(-qmax, qmax).to(qdtype).contiguous()


def quantize_rows_reference(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (q [R, K], scale [R, 1]): one scale per row."""
    xf = x.float()
    scale = _scale_of(xf.abs().amax(dim=1, keepdim=True), qdtype)
    return _quantize_with(xf, scale, qdtype), scale


def quantize_tensor_reference(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (q [R, K], scale [1, 1]): one scale for the whole tensor."""
    xf = x.float()
    scale = _scale_of(xf.abs().amax().reshape(1, 1), qdtype)
    return _quantize_with(xf, scale, qdtype), scale


def quantize_blocks_reference(x: torch.Tensor, block_rows: int, block_cols: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (q fp8 [R, K], scale [ceil(R/br), ceil(K/bc)]): one scale per br x bc block.

    Partial edge blocks are zero-padded for the amax (zeros never raise it) and cropped afterwards."""
    R, K = x.shape
    gr, gc = math.ceil(R / block_rows), math.ceil(K / block_cols)
    padded = torch.nn.functional.pad(x.float(), (0, gc * block_cols - K, 0, gr * block_rows - R))
    blocks = padded.view(gr, block_rows, gc, block_cols)
    scale = _scale_of(blocks.abs().amax(dim=(1, 3)), FP8)  # [gr, gc]
    q = _quantize_with(blocks, scale[:, None, :, None], FP8)
    return q.reshape(gr * block_rows, gc * block_cols)[:R, :K].contiguous(), scale


# --------------------------------------------------------------------------------------------------------
# Custom ops (faces: see the module docstring)
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("mgpt::quantize_per_row", mutates_args=())
def _quantize_per_row_op(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if choose_backend("quantize_per_row", x.device, _FACES, _PREFERENCE) == "triton":
        from mgpt_ops.quant import quantize_triton  # lazy: triton is optional

        return quantize_triton.quantize_rows(x, qdtype)
    return quantize_rows_reference(x, qdtype)


@_quantize_per_row_op.register_fake
def _(x, qdtype):
    return x.new_empty(x.shape, dtype=qdtype), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("mgpt::quantize_per_tensor", mutates_args=())
def _quantize_per_tensor_op(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if choose_backend("quantize_per_tensor", x.device, _FACES, _PREFERENCE) == "triton":
        from mgpt_ops.quant import quantize_triton

        return quantize_triton.quantize_tensor(x, qdtype)
    return quantize_tensor_reference(x, qdtype)


@_quantize_per_tensor_op.register_fake
def _(x, qdtype):
    return x.new_empty(x.shape, dtype=qdtype), x.new_empty((1, 1), dtype=torch.float32)


@torch.library.custom_op("mgpt::quantize_fp8_blocks", mutates_args=())
def _quantize_fp8_blocks_op(x: torch.Tensor, block_rows: int, block_cols: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    if choose_backend("quantize_fp8_blocks", x.device, _FACES, _PREFERENCE) == "triton":
        from mgpt_ops.quant import quantize_triton

        return quantize_triton.quantize_blocks(x, block_rows, block_cols)
    return quantize_blocks_reference(x, block_rows, block_cols)


@_quantize_fp8_blocks_op.register_fake
def _(x, block_rows, block_cols):
    R, K = x.shape
    return (x.new_empty(x.shape, dtype=FP8),
            x.new_empty((math.ceil(R / block_rows), math.ceil(K / block_cols)), dtype=torch.float32))


# --------------------------------------------------------------------------------------------------------
# Public wrappers: validation (traceable), then the ops
# --------------------------------------------------------------------------------------------------------
def _as_rows(op: str, x: torch.Tensor) -> torch.Tensor:
    """[..., K] activations -> [tokens, K] (a view where possible)."""
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"mgpt.{op}: argument 'x' must have shape [..., K] with K >= 1, got {list(x.shape)}")
    return x.detach().reshape(-1, x.shape[-1])


def _check_nonempty(op: str, x: torch.Tensor) -> None:
    if x.numel() == 0:  # a per-tensor amax needs at least one element
        raise ValueError(f"mgpt.{op}: argument 'x' must be non-empty, got shape {list(x.shape)}")


def _unflatten(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, per_row: bool):
    lead = x.shape[:-1]
    return q.view(x.shape), (scale.view(*lead, scale.shape[-1]) if per_row else scale)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8: x [..., K] -> (q fp8 [..., K], scale fp32 [..., 1]); x ≈ q * scale."""
    rows = _as_rows("quantize_fp8_per_token", x)
    return _unflatten(x, *_quantize_per_row_op(rows, FP8), per_row=True)


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric INT8: x [..., K] -> (q int8 [..., K], scale fp32 [..., 1])."""
    rows = _as_rows("quantize_int8_per_token", x)
    return _unflatten(x, *_quantize_per_row_op(rows, INT8), per_row=True)


def quantize_fp8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor FP8: x [..., K] -> (q fp8 [..., K], scale fp32 [1, 1])."""
    rows = _as_rows("quantize_fp8_per_tensor", x)
    _check_nonempty("quantize_fp8_per_tensor", x)
    return _unflatten(x, *_quantize_per_tensor_op(rows, FP8), per_row=False)


def quantize_int8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor symmetric INT8: x [..., K] -> (q int8 [..., K], scale fp32 [1, 1])."""
    rows = _as_rows("quantize_int8_per_tensor", x)
    _check_nonempty("quantize_int8_per_tensor", x)
    return _unflatten(x, *_quantize_per_tensor_op(rows, INT8), per_row=False)


def quantize_fp8_group(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x ``group`` FP8 groups along K: x [..., K] -> (q fp8 [..., K], scale fp32 [..., ceil(K/group)]),
    x[..., k] ≈ q[..., k] * scale[..., k // group] (the activation layout of Qwen/DeepSeek FP8 block GEMMs)."""
    op = "quantize_fp8_group"
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise ValueError(f"mgpt.{op}: argument 'group' must be an int >= 1, got {group!r}")
    rows = _as_rows(op, x)
    return _unflatten(x, *_quantize_fp8_blocks_op(rows, 1, group), per_row=True)


def _check_weight(op: str, w: torch.Tensor) -> torch.Tensor:
    check_tensor(op, "w", w, ndim=2, dtypes=FLOAT_DTYPES)
    if w.numel() == 0:
        raise ValueError(f"mgpt.{op}: argument 'w' must be non-empty, got shape {list(w.shape)}")
    return w.detach()


def quantize_weight_per_channel(w: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``w [N, K]`` (nn.Linear layout) -> (q [N, K] in ``dtype`` (float8_e4m3fn or int8), scale fp32
    [N, 1]): one scale per output channel, w ≈ q * scale. Feed ``scale`` to ``scaled_mm`` as ``scale_b``."""
    op = "quantize_weight_per_channel"
    if dtype not in QMAX:
        raise TypeError(f"mgpt.{op}: argument 'dtype' must be torch.float8_e4m3fn or torch.int8, got {dtype}")
    return _quantize_per_row_op(_check_weight(op, w), dtype)


def quantize_weight_block128(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``w [N, K]`` -> (q fp8 [N, K], scale_inv fp32 [ceil(N/128), ceil(K/128)]) with
    w[n, k] ≈ q[n, k] * scale_inv[n // 128, k // 128] (Qwen FP8 checkpoints' ``weight_scale_inv``)."""
    w = _check_weight("quantize_weight_block128", w)
    return _quantize_fp8_blocks_op(w, WEIGHT_BLOCK, WEIGHT_BLOCK)
