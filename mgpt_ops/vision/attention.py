"""Packed variable-length vision-token attention with fused 2D RoPE (the ViT attention of Qwen2.5-VL / Qwen3-VL).

    vision_attention(q, k, v, cu_seqlens, max_seqlen, cos=, sin=, scale=) -> out [N, H, D]
    vision_attention_packed(qkv [N, 3, H, D], cu_seqlens, max_seqlen, ...) -> out   (views of qkv, no copy)

For each sequence s = tokens [cu_seqlens[s], cu_seqlens[s+1]) (one image, video frame or window), head h and
token i of s, with q', k' the rotated q, k when cos/sin are given (x' = x cos + rotate_half(x) sin in fp32,
Hugging Face's ``apply_rotary_pos_emb_vision``; otherwise x' = x):

    out[i, h] = sum_{j in s} softmax_j(scale <q'_i, k'_j>) v_j         (bidirectional: no mask inside s)

Differentiable w.r.t. q, k, v (gradients w.r.t. the UN-rotated q, k); cos/sin are data. The exact contract
(layouts, lse, gradient formulas) is ``mgpt_ops/vision/_contract.py``.

Ops: ``mgpt::vision_attention(q, k, v, cu_seqlens, max_seqlen, cos, sin, scale, deterministic) -> (out, lse)``
saves lse [H, N] (fp32, natural log) for ``mgpt::vision_attention_backward(dout, q, k, v, out, lse, ...)
-> (dq, dk, dv)``, which recomputes the probabilities as FlashAttention-2 does.

Faces: ``reference`` (``_contract.attention_reference`` and the closed-form backward below, one sequence at a
time, fp32 math), ``triton`` (``attention_triton.py``), ``cpu`` and ``cuda`` (``mgpt::varlen_attention_fwd/bwd``
in ``mgpt_ops._C``). A C++/CUDA face counts as available only when a kernel for that dispatch key is
registered (``_dispatch_has_kernel_for_dispatch_key``), not merely when the extension loaded or was built
with CUDA: the schemas exist before their kernels do. Automatic choice: CUDA tensors -> cuda, then triton;
CPU tensors -> cpu; ``reference`` last. Pinning a C++/CUDA face whose kernel is not registered is an error.

Determinism: every face computes each gradient element in one place (no atomics), so the backward is bitwise
reproducible; ``deterministic`` is accepted for API parity with FlashAttention and changes nothing.

Checks: shapes, dtypes, devices and layouts in the public wrappers (traceable); the VALUES of ``cu_seqlens``
(starts at 0, non-decreasing, ends at N, longest sequence <= ``max_seqlen``) inside the forward op, which
costs one copy of the S + 1 offsets to the host (a sync on CUDA). The result is remembered for that tensor
object and version, so the blocks of a ViT forward sharing one ``cu_seqlens`` pay it once.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from mgpt_ops._backend import available_backends, choose_backend, kernels_registered
from mgpt_ops._checks import check_same_dtype, check_tensor, offsets_summary
from mgpt_ops.vision._contract import attention_reference, rotate_half

OP = "vision_attention"
FACES = ("reference", "triton", "cpu", "cuda")
PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
SUPPORTED_HEAD_DIMS = (64, 72, 80, 96, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNELS = ("mgpt::varlen_attention_fwd", "mgpt::varlen_attention_bwd")  # what the cpu/cuda faces call


# --------------------------------------------------------------------------------------------------------
# Faces
# --------------------------------------------------------------------------------------------------------
def kernel_registered(face: str) -> bool:
    """True when mgpt_ops._C registered both varlen attention kernels for the face's dispatch key."""
    return kernels_registered(face, KERNELS)


def usable_faces(device: torch.device) -> list[str]:
    """The faces of this op that can run on ``device`` in this process."""
    return available_backends(device, FACES, KERNELS)


def choose_face(device: torch.device) -> str:
    return choose_backend(OP, device, FACES, PREFERENCE, KERNELS)


def unrotate(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Transpose of the rotation: dx = dx' cos + rotate_half^T(dx' sin), rotate_half^T(y) = cat(y2, -y1)."""
    cos, sin = cos.to(grad.dtype)[:, None, :], sin.to(grad.dtype)[:, None, :]
    return grad * cos - rotate_half(grad * sin)


def attention_backward_reference(dout, q, k, v, out, lse, cu_seqlens, cos, sin, scale: float):
    """(dq, dk, dv) in closed form, one sequence at a time in fp32 (autograd cannot record inside a custom op):
    P = exp(scale q' k'^T - lse), dv = P^T dout, dS = P * (dout v^T - rowsum(dout * out)),
    dq' = scale dS k', dk' = scale dS^T q', then the rotation transpose for q and k."""
    work = torch.float32
    qr, kr = q.to(work), k.to(work)
    if cos is not None:
        qr, kr = (x * cos[:, None, :] + rotate_half(x) * sin[:, None, :] for x in (qr, kr))
    vw, dow, ow = v.to(work), dout.to(work), out.to(work)
    dq, dk, dv = (torch.zeros(t.shape, dtype=work, device=t.device) for t in (q, k, v))
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        rows = slice(start, end)
        qs, ks, vs, dos, os_ = (t[rows].transpose(0, 1) for t in (qr, kr, vw, dow, ow))  # [H, L, D]
        p = torch.exp(scale * qs @ ks.transpose(1, 2) - lse[:, rows, None])
        delta = (dos * os_).sum(-1, keepdim=True)
        ds = p * (dos @ vs.transpose(1, 2) - delta)
        dq[rows] = (scale * ds @ ks).transpose(0, 1)
        dk[rows] = (scale * ds.transpose(1, 2) @ qs).transpose(0, 1)
        dv[rows] = (p.transpose(1, 2) @ dos).transpose(0, 1)
    if cos is not None:
        dq, dk = unrotate(dq, cos, sin), unrotate(dk, cos, sin)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _forward_face(face: str):
    if face == "reference":
        return lambda q, k, v, cu, max_seqlen, cos, sin, scale: attention_reference(q, k, v, cu, cos, sin, scale)
    if face == "triton":
        from mgpt_ops.vision import attention_triton  # lazy: triton is optional

        return attention_triton.forward
    return torch.ops.mgpt.varlen_attention_fwd


def _backward_face(face: str):
    if face == "reference":
        return lambda dout, q, k, v, out, lse, cu, max_seqlen, cos, sin, scale: attention_backward_reference(
            dout, q, k, v, out, lse, cu, cos, sin, scale)
    if face == "triton":
        from mgpt_ops.vision import attention_triton

        return attention_triton.backward
    return torch.ops.mgpt.varlen_attention_bwd


# --------------------------------------------------------------------------------------------------------
# Value checks of cu_seqlens (inside the op: they read tensor values)
# --------------------------------------------------------------------------------------------------------
def _capturing_cuda_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, n_tokens: int, max_seqlen: int) -> None:
    # Reading the values is a device->host copy, which is illegal while a CUDA graph is being captured.
    # Graph capture always follows eager warm-up calls (torch.cuda.graphs / torch.compile "reduce-overhead"
    # both warm up first), where the same offsets were checked; during capture the check is skipped.
    if _capturing_cuda_graph():
        return
    last, longest = offsets_summary(OP, "cu_seqlens", cu_seqlens)
    if last != n_tokens:
        raise ValueError(f"mgpt.{OP}: argument 'cu_seqlens' must end at N={n_tokens} (the tokens of q), got {last}")
    if longest > max_seqlen:
        raise ValueError(f"mgpt.{OP}: argument 'max_seqlen'={max_seqlen} is smaller than the longest sequence "
                         f"({longest} tokens) of 'cu_seqlens'")


# --------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("mgpt::vision_attention", mutates_args=())
def _vision_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], scale: float,
                         deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
    out, lse = _forward_face(choose_face(q.device))(q, k, v, cu_seqlens, max_seqlen, cos, sin, scale)
    return out.contiguous(), lse.contiguous()


@_vision_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, cos, sin, scale, deterministic):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@torch.library.custom_op("mgpt::vision_attention_backward", mutates_args=())
def _vision_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                  cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], scale: float,
                                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of sum(dout * out): gradients w.r.t. the un-rotated q and k (see the contract)."""
    grads = _backward_face(choose_face(q.device))(dout.contiguous(), q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                  cos, sin, scale)
    return tuple(g.contiguous() for g in grads)


@_vision_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, cos, sin, scale, deterministic):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, cos, sin, scale, deterministic = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # internal: the public API returns out only
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cos, sin)
    ctx.scalars = (max_seqlen, scale, deterministic)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens, cos, sin = ctx.saved_tensors
    max_seqlen, scale, deterministic = ctx.scalars
    dq, dk, dv = torch.ops.mgpt.vision_attention_backward(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens,
                                                          max_seqlen, cos, sin, scale, deterministic)
    return dq, dk, dv, None, None, None, None, None, None


_vision_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def _check_last_dim(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"mgpt.{OP}: argument '{name}' must have a contiguous last dimension (stride 1), got "
                         f"strides {tuple(t.stride())}; call .contiguous() first")


def _validate(q, k, v, cu_seqlens, max_seqlen, cos, sin, scale, deterministic) -> None:
    check_tensor(OP, "q", q, ndim=3, dtypes=DTYPES)
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"mgpt.{OP}: argument 'q' has head dim D={q.shape[-1]}; supported head dims are "
                         f"{SUPPORTED_HEAD_DIMS}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(OP, name, t, dtypes=DTYPES, shape=list(q.shape), device=q.device)
    check_same_dtype(OP, ("q", "k", "v"), (q, k, v))
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_last_dim(name, t)
    check_tensor(OP, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    if cu_seqlens.numel() < 1:
        raise ValueError(f"mgpt.{OP}: argument 'cu_seqlens' must hold S + 1 >= 1 offsets, got an empty tensor")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
        raise TypeError(f"mgpt.{OP}: argument 'max_seqlen' must be a Python int >= 0 (the longest sequence; "
                        f"call .item() on a tensor), got {max_seqlen!r}")
    if (cos is None) != (sin is None):
        raise ValueError(f"mgpt.{OP}: arguments 'cos' and 'sin' must be given together (or both None)")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            check_tensor(OP, name, t, dtypes=(torch.float32,), shape=[q.shape[0], q.shape[-1]], device=q.device)
            _check_last_dim(name, t)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"mgpt.{OP}: argument 'scale' must be None or a finite float, got {scale!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"mgpt.{OP}: argument 'deterministic' must be a bool, got {deterministic!r}")


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     *, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, scale: float | None = None,
                     deterministic: bool = False) -> torch.Tensor:
    """Bidirectional attention inside each packed sequence, with optional fused rotate-half RoPE.

    Args:
        q, k, v: [N, H, D] fp16 / bf16 / fp32, one dtype, D in (64, 72, 80, 96, 128); the last dimension must
            be contiguous, other strides are free (views of a packed qkv work without a copy).
        cu_seqlens: [S + 1] int32 offsets: 0, non-decreasing, ending at N; empty sequences allowed.
        max_seqlen: Python int >= the longest sequence (sizes the kernels' grid without a host sync).
        cos, sin: [N, D] fp32 rotary tables (both or neither): q and k are rotated in fp32 first.
        scale: softmax scale, default D ** -0.5.
        deterministic: accepted for FlashAttention parity; every backend is deterministic.

    Returns:
        out [N, H, D] in q's dtype, differentiable w.r.t. q, k and v.
    """
    _validate(q, k, v, cu_seqlens, max_seqlen, cos, sin, scale, deterministic)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cu_seqlens = cu_seqlens.contiguous()  # the kernels index it as a plain array
    out, _ = torch.ops.mgpt.vision_attention(q, k, v, cu_seqlens, max_seqlen, cos, sin, scale, deterministic)
    return out


def vision_attention_packed(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
                            cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                            scale: float | None = None, deterministic: bool = False) -> torch.Tensor:
    """``vision_attention`` on the [N, 3, H, D] output of a fused QKV projection (q, k, v are views of it;
    its gradient is assembled by one stack of dq, dk, dv)."""
    check_tensor(OP, "qkv", qkv, ndim=4, dtypes=DTYPES)
    if qkv.shape[1] != 3:
        raise ValueError(f"mgpt.{OP}: argument 'qkv' must have shape [N, 3, H, D], got {list(qkv.shape)}")
    _check_last_dim("qkv", qkv)
    q, k, v = qkv.unbind(1)
    return vision_attention(q, k, v, cu_seqlens, max_seqlen, cos=cos, sin=sin, scale=scale,
                            deterministic=deterministic)
