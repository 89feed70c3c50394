"""Quant family: quantized GEMMs of ``mgpt_ops.quant`` against a bf16 matmul and the quantized GEMMs of torch.

Cases (forward only: the ops are inference-only; operands are quantized once in ``setup``, not timed):

``scaled_mm``                fp8 e4m3 a [M, K] per-token scales x fp8 weight [N, K] per-channel scales, bf16 out.
    torch_scaled_mm  ``torch._scaled_mm(a, b.T, scale_a, scale_b.T)`` (row-wise scaling; CUDA only).
``block_scaled_mm``          fp8 a with 1x128 group scales x fp8 weight with 128x128 block scales, bf16 out.
    torchao_blockwise  torchao's blockwise FP8 inference GEMM when ``torchao`` imports (CUDA only).
``w4a16_mm``                 bf16 x [M, K] x int4 weight (group 128, with zero points), decode sizes M = 1, 16.
``grouped_block_scaled_mm``  MoE experts: tokens x top-8 routed rows sorted by expert over 128 experts (random
                             router), fp8 block-scaled expert weights [E, N, K], one call.
    bf16_loop  one bf16 ``torch.mm`` per non-empty expert (the loop of HF's eager MoE).
Every case also has ``bf16_mm``: ``torch.mm`` of bf16 operands holding the DEQUANTIZED values (so outputs agree
up to bf16 rounding, and its time is that of the unquantized layer).

Shapes: Qwen3-VL-8B MLP (hidden 4096, intermediate 12288: gate/up [12288 x 4096], down [4096 x 12288]) and one
Qwen3-VL-30B-A3B expert (hidden 2048, expert intermediate 768: gate_up [1536 x 2048], down [2048 x 768]);
M in {1, 16, 4096, 8192} tokens (w4a16: 1, 16). CPU shapes are cut down; ``--quick`` uses tiny ones.
FLOPs 2 M N K (grouped: 2 M_rows N K); min bytes: every operand and scale read once, the output written once.
"""

from __future__ import annotations

import torch

from bench.common import CaseSetup, CaseSpec, Impl, generator, kernel_faces, load, pinned
from bench.face_probe import unverified_face_problem

FP8 = torch.float8_e4m3fn
TIMED_REGION = "forward only: one inference GEMM on operands quantized beforehand (quantization not timed)"
BLOCK = 128
TOP_K = 8
# ours vs bf16 baselines: bf16 rounding of the dequantized operands and of the output (~2^-8 relative each)
TOLERANCE = 2e-2

QWEN3_VL_8B = {"gate_up": (12288, 4096), "down": (4096, 12288)}  # name -> (N, K)
QWEN3_VL_30B_A3B_EXPERT = {"expert_gate_up": (1536, 2048), "expert_down": (2048, 768)}
EXPERTS = 128


def _dense_shapes(device: torch.device, quick: bool) -> tuple[dict, list[int], list[int]]:
    """(name -> (N, K), token counts, decode token counts)."""
    if quick:
        return {"tiny": (192, 256)}, [16], [1]
    if device.type == "cuda":
        return {**QWEN3_VL_8B, **QWEN3_VL_30B_A3B_EXPERT}, [1, 16, 4096, 8192], [1, 16]
    return dict(QWEN3_VL_30B_A3B_EXPERT), [1, 16, 256], [1, 16]


def cases(device: torch.device, quick: bool) -> list[CaseSpec]:
    faces = list(kernel_faces(device))
    shapes, tokens, decode = _dense_shapes(device, quick)
    specs = []
    for op in ("scaled_mm", "block_scaled_mm"):
        specs += [CaseSpec(op, dict(M=m, N=n, K=k, layer=name, faces=faces), f"{name} M={m} N={n} K={k} fp8")
                  for name, (n, k) in shapes.items() for m in tokens]
    specs += [CaseSpec("w4a16_mm", dict(M=m, N=n, K=k, layer=name, faces=faces), f"{name} M={m} N={n} K={k} int4")
              for name, (n, k) in shapes.items() for m in decode]
    if quick:
        moe = [("tiny_experts", 4, 192, 256, 4)]
    elif device.type == "cuda":
        moe = [(name, EXPERTS, n, k, t) for name, (n, k) in QWEN3_VL_30B_A3B_EXPERT.items()
               for t in (1, 16, 4096, 8192)]
    else:
        moe = [("expert_gate_up", 16, 1536, 2048, t) for t in (1, 64)]
    specs += [CaseSpec("grouped_block_scaled_mm", dict(E=e, N=n, K=k, tokens=t, layer=name, faces=faces),
                       f"{name} E={e} tokens={t}x{TOP_K} N={n} K={k} fp8") for name, e, n, k, t in moe]
    return specs


def setup(name: str, params: dict, device: torch.device) -> CaseSetup:
    return {"scaled_mm": _scaled_mm_case, "block_scaled_mm": _block_case, "w4a16_mm": _w4a16_case,
            "grouped_block_scaled_mm": _grouped_case}[name](params, device)


# ------------------------------------------------------------------------------------------ inputs

def random_fp8(shape, gen, device) -> torch.Tensor:
    """FP8 values spread over the e4m3 range (normal draws times 60, saturated at +-448)."""
    return torch.randn(shape, generator=gen, device=device).mul_(60).clamp_(-448, 448).to(FP8)


def random_scales(shape, gen, device, magnitude: float) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, device=device) + 0.5).mul_(magnitude)


def expand_blocks(scale: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> torch.Tensor:
    """One scale per element [rows, cols] from per-block scales (partial last blocks cropped)."""
    return scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]


def dequant_bf16(q: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    return (q.float() * scale_full).to(torch.bfloat16)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] -> codes [N, K] (element k in bits 4 (k % 8).. of word k // 8, as mgpt_ops.w4a16)."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    return ((qweight[:, :, None] >> shifts) & 0xF).reshape(qweight.shape[0], -1)


# ------------------------------------------------------------------------------------------ contenders

def _ours(faces: list[str], device: torch.device, module: str, op_name: str, call) -> dict[str, Impl]:
    """One contender per kernel face of ``module.op_name``; faces the op lacks or cannot run here (C++ faces need
    their kernels registered in mgpt_ops._C) are reported unavailable, never timed under a wrong label. The
    CUTLASS (``cuda``) faces, not yet verified on a GPU, run here only after a child process ran them correctly
    (``bench.face_probe``)."""
    op, why = load(module, op_name)
    usable = _usable_faces(module, op_name, device) if op is not None else []
    impls = {}
    for face in faces:
        reason = why or (None if face in usable else f"{op_name} has no usable {face!r} face on {device.type} "
                                                      f"here (usable: {', '.join(usable)})")
        if reason is None and face == "cuda":
            reason = unverified_face_problem(__name__, op_name, face, "bf16_mm", TOLERANCE)
        impls[f"ours:{face}"] = Impl("ours", None if reason else pinned(face, lambda: {"out": call(op)}), face,
                                     reason)
    return impls


def _usable_faces(module: str, op_name: str, device: torch.device) -> list[str]:
    if module.endswith("block_gemm"):
        return load(module, "usable_faces")[0](op_name, device)
    from mgpt_ops._backend import available_backends

    # the op modules name these FACES / KERNELS or, private, _FACES / _KERNELS
    faces = load(module, "FACES")[0] or load(module, "_FACES")[0] or ("reference", "triton")
    kernels = load(module, "KERNELS")[0] or load(module, "_KERNELS")[0] or ()
    if not all(hasattr(torch.ops.mgpt, name.removeprefix("mgpt::")) for name in kernels):
        faces = tuple(f for f in faces if f not in ("cpu", "cuda"))  # a build that predates these kernels
    return available_backends(device, faces, kernels)


def _cuda_only(device: torch.device, what: str) -> str | None:
    return None if device.type == "cuda" else f"{what} runs on CUDA only"


def _scaled_mm_case(p: dict, device) -> CaseSetup:
    m, n, k = p["M"], p["N"], p["K"]
    gen = generator(device, 0)
    a, b = random_fp8((m, k), gen, device), random_fp8((n, k), gen, device)
    sa, sb = random_scales((m, 1), gen, device, 1e-2), random_scales((n, 1), gen, device, 1e-3)
    a16, b16 = dequant_bf16(a, sa), dequant_bf16(b, sb)
    impls = _ours(p["faces"], device, "mgpt_ops.quant.scaled_gemm", "scaled_mm",
                  lambda op: op(a, b, sa, sb, out_dtype=torch.bfloat16))
    impls["bf16_mm"] = Impl("baseline", lambda: {"out": torch.mm(a16, b16.T)})
    why = _cuda_only(device, "torch._scaled_mm")
    impls["torch_scaled_mm"] = Impl("baseline", None if why else lambda: {
        "out": torch._scaled_mm(a, b.T, scale_a=sa, scale_b=sb.T, out_dtype=torch.bfloat16)}, unavailable=why)
    return CaseSetup(impls, TOLERANCE, flops=2.0 * m * n * k, min_bytes=float(m * k + n * k + 4 * (m + n) + 2 * m * n))


def _block_operands(m, n, k, gen, device):
    kb = -(-k // BLOCK)
    a, b = random_fp8((m, k), gen, device), random_fp8((n, k), gen, device)
    sa = random_scales((m, kb), gen, device, 1e-2)
    sb = random_scales((-(-n // BLOCK), kb), gen, device, 1e-3)
    return a, b, sa, sb


def _block_case(p: dict, device) -> CaseSetup:
    m, n, k = p["M"], p["N"], p["K"]
    a, b, sa, sb = _block_operands(m, n, k, generator(device, 1), device)
    a16 = dequant_bf16(a, expand_blocks(sa, m, k, 1, BLOCK))
    b16 = dequant_bf16(b, expand_blocks(sb, n, k, BLOCK, BLOCK))
    impls = _ours(p["faces"], device, "mgpt_ops.quant.block_gemm", "block_scaled_mm",
                  lambda op: op(a, b, sa, sb, out_dtype=torch.bfloat16))
    impls["bf16_mm"] = Impl("baseline", lambda: {"out": torch.mm(a16, b16.T)})
    impls["torchao_blockwise"] = _torchao_blockwise(device, a, b, sa, sb)
    scales = 4 * (sa.numel() + sb.numel())
    return CaseSetup(impls, TOLERANCE, flops=2.0 * m * n * k, min_bytes=float(m * k + n * k + scales + 2 * m * n))


def _torchao_blockwise(device, a, b, sa, sb) -> Impl:
    """torchao's blockwise FP8 GEMM (prototype API: ``blockwise_fp8_gemm(a, a_s, b, b_s)``, same scale layouts)."""
    fn, why = load("torchao.prototype.blockwise_fp8_inference", "blockwise_fp8_gemm")
    why = why or _cuda_only(device, "torchao's blockwise FP8 GEMM")
    if why:
        return Impl("baseline", None, unavailable=why)
    return Impl("baseline", lambda: {"out": fn(a, sa, b, sb).to(torch.bfloat16)})


def _w4a16_case(p: dict, device) -> CaseSetup:
    m, n, k, group = p["M"], p["N"], p["K"], 128
    gen = generator(device, 2)
    x = torch.randn((m, k), generator=gen, device=device).to(torch.bfloat16)
    # every int32 bit pattern is a valid word of eight 4-bit codes
    qweight = torch.randint(-2**31, 2**31 - 1, (n, k // 8), generator=gen, device=device, dtype=torch.int32)
    scales = random_scales((n, k // group), gen, device, 2e-3).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (n, k // group), generator=gen, device=device).to(torch.bfloat16)
    w16 = ((unpack_int4(qweight).float() - expand_blocks(zeros.float(), n, k, 1, group))
           * expand_blocks(scales.float(), n, k, 1, group)).to(torch.bfloat16)
    impls = _ours(p["faces"], device, "mgpt_ops.quant.w4a16", "w4a16_mm",
                  lambda op: op(x, qweight, scales, zeros, group_size=group))
    impls["bf16_mm"] = Impl("baseline", lambda: {"out": torch.mm(x, w16.T)})
    return CaseSetup(impls, TOLERANCE, flops=2.0 * m * n * k,
                     min_bytes=float(2 * m * k + n * k // 2 + 4 * scales.numel() + 2 * m * n))


def route(tokens: int, experts: int, device) -> torch.Tensor:
    """Rows per expert of ``tokens`` x TOP_K routed rows under a random router: each token picks TOP_K distinct
    experts uniformly (seeded, on the CPU so every device sees the same split). Returns offsets [E + 1] int32."""
    gen = torch.Generator().manual_seed(3)
    picks = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :min(TOP_K, experts)]
    counts = torch.bincount(picks.reshape(-1), minlength=experts)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).to(device)


def _grouped_case(p: dict, device) -> CaseSetup:
    e, n, k = p["E"], p["N"], p["K"]
    offsets = route(p["tokens"], e, device)
    bounds = offsets.tolist()
    rows = bounds[-1]
    gen, kb = generator(device, 4), -(-k // BLOCK)
    a, b = random_fp8((rows, k), gen, device), random_fp8((e, n, k), gen, device)
    sa = random_scales((rows, kb), gen, device, 1e-2)
    sb = random_scales((e, -(-n // BLOCK), kb), gen, device, 1e-3)
    a16 = dequant_bf16(a, expand_blocks(sa, rows, k, 1, BLOCK))
    b16 = torch.stack([dequant_bf16(b[i], expand_blocks(sb[i], n, k, BLOCK, BLOCK)) for i in range(e)])
    impls = _ours(p["faces"], device, "mgpt_ops.quant.block_gemm", "grouped_block_scaled_mm",
                  lambda op: op(a, b, sa, sb, offsets, out_dtype=torch.bfloat16))

    def bf16_loop():
        out = torch.empty((rows, n), dtype=torch.bfloat16, device=device)
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi > lo:
                torch.mm(a16[lo:hi], b16[i].T, out=out[lo:hi])
        return {"out": out}

    impls["bf16_loop"] = Impl("baseline", bf16_loop)
    scales = 4 * (sa.numel() + sb.numel())
    return CaseSetup(impls, TOLERANCE, flops=2.0 * rows * n * k,
                     min_bytes=float(rows * k + e * n * k + scales + 2 * rows * n))
