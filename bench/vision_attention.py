"""Vision family: packed variable-length ViT attention with 2D RoPE (``mgpt_ops.vision.attention``).

What is timed (forward + backward unless the case name ends in ``:fwd``; random upstream gradient):

    q', k' = rope(q), rope(k)        x' = x cos + rotate_half(x) sin, in fp32, cos/sin [N, D] (HF vision RoPE)
    out_s  = softmax(q'_s k'_s^T / sqrt(D)) v_s   for every sequence s of ``cu_seqlens`` (bidirectional)

q, k, v are views of one packed ``qkv [N, 3, H, D]`` as the QKV linear produces them; gradients are taken with
respect to it (the un-rotated q, k). Ours fuses the RoPE; every baseline applies it first, exactly as HF's
``apply_rotary_pos_emb_vision`` does, and that time counts (HF pays it in every block).

Contenders
    ours:<face>   ``vision_attention(q, k, v, cu_seqlens, max_seqlen, cos=cos, sin=sin)`` per kernel face.
    hf_sdpa       HF's default vision path for ``sdpa``: ``cu_seqlens.tolist()`` (a host sync), split, one
                  ``scaled_dot_product_attention`` per sequence on [1, H, L, D], concatenate.
    varlen_attn   ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention kernels inside torch; CUDA only;
                  absent from older torch): one call for all sequences.
    flash_attn    ``flash_attn.flash_attn_varlen_func`` (HF's ``flash_attention_2``) when installed; CUDA only.

Shapes (``SCENARIOS``; token layout as HF builds it)
    qwen3_vl_images     Qwen3-VL tower (H=16, D=72, 16-px patches): 8 images of 1024x1024 -> 8 x 4096 tokens.
    qwen3_vl_mixed      same tower, 6 images from 224x224 to 1792x1008 (each side snapped to a multiple of 32 px
                        = patch x 2x2 merge, with Python's round as the processor's ``smart_resize``; its min/max
                        pixel clamps are not modelled): 196 + 1200 + 3072 + 3520 + 4096 + 7168 = 19252 tokens.
    qwen2_5_vl_full     Qwen2.5-VL tower (H=16, D=80, 14-px patches): 4 images of 1344x1344 -> 4 x 9216 tokens,
                        full-attention blocks (one sequence per image).
    qwen2_5_vl_windows  the same tokens in its windowed blocks: 112-px windows = 8x8 patches = 64 tokens,
                        144 windows per image, 576 sequences.
    Tokens of an image are ordered by 2x2 merge block (HF ``get_vision_position_ids``); for Qwen2.5-VL they are
    further permuted window by window (HF ``get_vision_window_index``), in both of its cases, as in the model.

FLOPs (FlashAttention's convention): forward 4 * sum_s L_s^2 * H * D (QK^T and PV, 2 per multiply-add, no
causal halving); backward 2.5x the forward (five L x L matmuls); fwd+bwd 3.5x. RoPE and softmax not counted.

Goals (GPU, bf16, full shapes): fwd+bwd time <= 1/1.3 of the best baseline present (the JSON ``goal`` names the
baseline expected to be fastest: flash_attn, else varlen_attn, else hf_sdpa; no memory target), and the
forward-only cases of the image batches (not the memory-bound 64-token windows) at >= 60% of the bf16 matmul
peak measured in the same run (``torch.mm`` 8192^3, recorded as ``matmul_peak_tflops`` in every case's params). ``python -m bench.vision_attention RESULT.json`` prints
both checks against the measured numbers, the first against whichever baseline was actually fastest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import CaseSetup, CaseSpec, Goal, Impl, dtype_of, generator, kernel_faces, load, pinned, randn

ROPE_THETA = 10_000.0            # vision rotary base of both towers
MERGE = 2                        # 2x2 spatial merge: RoPE positions and windows follow merge blocks
TIME_GOAL = 1 / 1.3              # ours / best baseline, fwd+bwd
PEAK_FRACTION_GOAL = 0.6         # forward TFLOP/s / bf16 matmul peak
PEAK_MATMUL_SIZE = 8192
# Relative-error tolerances between ours and a baseline. fp32: same math, different summation order.
# bf16: the baselines round the rotated q, k to bf16 before attention (ours may keep them in fp32) and
# every FlashAttention-style kernel rounds P to bf16 for the PV product: a few 1e-3, up to ~1e-2 on dq, dk.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}

# name -> tower and images (height, width in pixels). ``window_px``: tokens ordered window by window (Qwen2.5-VL,
# all its blocks); ``sequences``: one attention sequence per image (default) or per window.
SCENARIOS = {
    "qwen3_vl_images": dict(heads=16, head_dim=72, patch=16, images=[(1024, 1024)] * 8),
    "qwen3_vl_mixed": dict(heads=16, head_dim=72, patch=16,
                           images=[(224, 224), (480, 640), (768, 1024), (720, 1280), (1024, 1024), (1008, 1792)]),
    "qwen2_5_vl_full": dict(heads=16, head_dim=80, patch=14, images=[(1344, 1344)] * 4, window_px=112),
    "qwen2_5_vl_windows": dict(heads=16, head_dim=80, patch=14, images=[(1344, 1344)] * 4, window_px=112,
                               sequences="windows"),
}
# CPU (fp32, ~1 minute for the family on 2 cores) and --quick stand-ins: same structure, small images.
_SMALL = {
    "qwen3_vl_images": dict(heads=4, images=[(256, 256)] * 4),                      # 4 x 16x16 patches
    "qwen3_vl_mixed": dict(heads=4, images=[(224, 224), (256, 320), (384, 448), (96, 128)]),
    "qwen2_5_vl_full": dict(heads=4, images=[(448, 448)] * 2),                      # 2 x 32x32 patches
    "qwen2_5_vl_windows": dict(heads=4, images=[(448, 448)] * 2),                   # 32 windows of 64
}
_TINY = {
    "qwen3_vl_images": dict(heads=2, images=[(128, 96), (64, 64)]),
    # 16x12 patches: windows of 8x8 and 8x4 patches (edge windows are smaller, as in HF)
    "qwen2_5_vl_windows": dict(heads=2, images=[(224, 168)]),
}


# ------------------------------------------------------------------------------------------ token layout

def snapped_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of an image, each side rounded to a multiple of patch * MERGE pixels with
    Python's round (half to even), as the Qwen-VL processors' ``smart_resize`` does."""
    factor = patch * MERGE
    return round(height / factor) * MERGE, round(width / factor) * MERGE


def merge_order_positions(rows: int, cols: int) -> torch.Tensor:
    """(row, col) of each patch token [rows * cols, 2] in HF's order: 2x2 merge blocks row-major, and the
    four patches of a block row-major inside it."""
    bi, bj, di, dj = torch.meshgrid(torch.arange(rows // MERGE), torch.arange(cols // MERGE),
                                    torch.arange(MERGE), torch.arange(MERGE), indexing="ij")
    return torch.stack([bi * MERGE + di, bj * MERGE + dj], dim=-1).reshape(-1, 2)


def window_partition(rows: int, cols: int, window_blocks: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows over one image: (order, lengths). ``order`` lists the merge blocks (indices into
    the merge-order layout) window by window -- windows row-major over the image, blocks row-major inside a
    window of ``window_blocks`` x ``window_blocks`` merge blocks; edge windows are cut by the image border.
    ``lengths`` are tokens per window (MERGE^2 per block). Same result as HF's ``get_vision_window_index``."""
    block_rows, block_cols = rows // MERGE, cols // MERGE
    block_id = torch.arange(block_rows * block_cols).reshape(block_rows, block_cols)
    order, lengths = [], []
    for r0 in range(0, block_rows, window_blocks):
        for c0 in range(0, block_cols, window_blocks):
            blocks = block_id[r0:r0 + window_blocks, c0:c0 + window_blocks].reshape(-1)
            order.append(blocks)
            lengths.append(blocks.numel() * MERGE * MERGE)
    return torch.cat(order), lengths


def token_layout(scenario: dict) -> dict:
    """Positions [N, 2] (int64, patch row/col of every token, in packed order) and ``cu_seqlens`` [S + 1]
    (int32) of a scenario: one sequence per image, or per window with ``sequences="windows"``."""
    patch, window_px = scenario["patch"], scenario.get("window_px")
    per_window = scenario.get("sequences", "images") == "windows"
    positions, lengths = [], []
    for height, width in scenario["images"]:
        rows, cols = snapped_grid(height, width, patch)
        pos = merge_order_positions(rows, cols)
        image_lengths = [rows * cols]
        if window_px:
            order, window_lengths = window_partition(rows, cols, window_px // patch // MERGE)
            # permute whole merge blocks (MERGE^2 consecutive tokens), as HF permute_input_for_window_attn
            pos = pos.reshape(-1, MERGE * MERGE, 2)[order].reshape(-1, 2)
            image_lengths = window_lengths if per_window else image_lengths
        elif per_window:
            raise ValueError("sequences='windows' needs window_px")
        positions.append(pos)
        lengths += image_lengths
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return {"positions": torch.cat(positions), "cu_seqlens": cu_seqlens, "max_seqlen": max(lengths)}


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float = ROPE_THETA):
    """(cos, sin) [N, D] fp32 of the HF vision RoPE: inv_freq_j = theta^(-4j/D), j < D/4; angles
    [row * inv_freq, col * inv_freq] (D/2), repeated twice for the rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2))
    angles = (positions.float()[:, :, None] * inv_freq).reshape(positions.shape[0], -1)  # [N, D/2]: rows, cols
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def attention_flops(cu_seqlens: torch.Tensor, heads: int, head_dim: int) -> float:
    """Forward FLOPs: 4 * sum_s L_s^2 * H * D."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return 4.0 * float((lengths * lengths).sum()) * heads * head_dim


# ------------------------------------------------------------------------------------------ cases

def _scenario(name: str, params: dict) -> dict:
    return {**SCENARIOS[name], **params.get("size", {})}


def cases(device: torch.device, quick: bool) -> list[CaseSpec]:
    cuda = device.type == "cuda"
    sizes = _TINY if quick else ({name: {} for name in SCENARIOS} if cuda else _SMALL)
    dtype = "bf16" if cuda else "fp32"
    # the forward-only cases serve the GPU peak goal; with --quick one of them keeps the path exercised
    forward_only = ["qwen2_5_vl_windows"] if quick else list(sizes) if cuda else []
    peak = matmul_peak_tflops(device) if cuda else None
    specs = []
    for name, size in sizes.items():
        for backward in (True, False) if name in forward_only else (True,):
            scenario = _scenario(name, dict(size=size))
            # goal: the GPU goals apply (fwd+bwd: time vs the best baseline; forward: fraction of the peak, on
            # the image batches only -- 64-token windows are bound by memory traffic, not by the matmuls)
            windows = scenario.get("sequences") == "windows"
            params = dict(size=size, dtype=dtype, backward=backward, faces=list(kernel_faces(device)),
                          goal=cuda and not quick and (backward or not windows), matmul_peak_tflops=peak)
            layout = token_layout(scenario)
            cu = layout["cu_seqlens"]
            shape = (f"{len(scenario['images'])} img N={int(cu[-1])} S={cu.numel() - 1} "
                     f"maxL={layout['max_seqlen']} H={scenario['heads']} D={scenario['head_dim']} {dtype}")
            specs.append(CaseSpec(name if backward else f"{name}:fwd", params, shape))
    return specs


def matmul_peak_tflops(device: torch.device) -> float:
    """Median TFLOP/s of ``torch.mm`` on random bf16 [8192, 8192] matrices (the ceiling the forward is
    compared with), timed like every contender (``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    gen = generator(device, 7)
    n = PEAK_MATMUL_SIZE
    a = randn((n, n), gen=gen, device=device, dtype=torch.bfloat16)
    b = randn((n, n), gen=gen, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: torch.mm(a, b), warmup=50, rep=300, return_mode="median")
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


def setup(name: str, params: dict, device: torch.device) -> CaseSetup:
    scenario_name = name.removesuffix(":fwd")
    scenario = _scenario(scenario_name, params)
    layout = token_layout(scenario)
    heads, head_dim, dtype = scenario["heads"], scenario["head_dim"], dtype_of(params["dtype"])
    n = layout["positions"].shape[0]
    gen = generator(device, 0)
    qkv = randn((n, 3, heads, head_dim), gen=gen, device=device, dtype=dtype, grad=True)
    dout = randn((n, heads, head_dim), gen=gen, device=device, dtype=dtype)
    cos, sin = (t.to(device) for t in rotary_tables(layout["positions"], head_dim))
    cu_seqlens, max_seqlen = layout["cu_seqlens"].to(device), layout["max_seqlen"]
    run = _runner(qkv, dout, params["backward"])

    op, why = load("mgpt_ops.vision.attention", "vision_attention")
    impls = _ours_per_face(params["faces"], device, why if op is None else None,
                           run(lambda q, k, v: op(q, k, v, cu_seqlens, max_seqlen, cos=cos, sin=sin)))
    impls["hf_sdpa"] = Impl("baseline", run(lambda q, k, v: hf_sdpa_attention(q, k, v, cu_seqlens, cos, sin)))
    impls["varlen_attn"] = _fused_varlen_baseline(device, "torch.nn.attention.varlen", "varlen_attn", run,
                                                  cu_seqlens, max_seqlen, cos, sin)
    impls["flash_attn"] = _fused_varlen_baseline(device, "flash_attn", "flash_attn_varlen_func", run,
                                                 cu_seqlens, max_seqlen, cos, sin)

    forward = attention_flops(layout["cu_seqlens"], heads, head_dim)
    elem, qkv_elems, table_bytes = dtype.itemsize, n * heads * head_dim, 2 * n * head_dim * 4
    if params["backward"]:  # read q, k, v, cos, sin, dout; write out, dq, dk, dv
        flops, min_bytes = 3.5 * forward, 8 * qkv_elems * elem + table_bytes
    else:  # read q, k, v, cos, sin; write out
        flops, min_bytes = forward, 4 * qkv_elems * elem + table_bytes
    goal = None
    if params.get("goal") and params["backward"]:
        best = next(label for label in ("flash_attn", "varlen_attn", "hf_sdpa") if impls[label].fn is not None)
        goal = Goal(baseline=best, max_time_ratio=TIME_GOAL, max_memory_ratio=float("inf"))
    return CaseSetup(impls, TOLERANCE[params["dtype"]], flops=flops, min_bytes=min_bytes, goal=goal)


def _runner(qkv: torch.Tensor, dout: torch.Tensor, backward: bool):
    """Wrap ``attend(q, k, v) -> out [N, H, D]`` into a contender: q, k, v are views of the packed qkv;
    returns the output and (with ``backward``) the gradients of q, k, v (slices of d qkv)."""

    def make(attend):
        def fn():
            if not backward:
                with torch.no_grad():
                    return {"out": attend(*qkv.unbind(1))}
            out = attend(*qkv.unbind(1))
            (grad,) = torch.autograd.grad(out, (qkv,), dout)
            return {"out": out.detach(), "grad_q": grad[:, 0], "grad_k": grad[:, 1], "grad_v": grad[:, 2]}

        return fn

    return make


def _ours_per_face(faces: list[str], device: torch.device, why_unavailable: str | None, fn) -> dict[str, Impl]:
    """One contender per kernel face. A pinned face an op lacks would silently become its automatic choice
    (mgpt_ops._backend), and the op's C++/CUDA faces exist only where their kernels are registered, so faces
    the op does not declare (``FACES``) or cannot run here (``usable_faces``) are reported unavailable
    instead of timed under a wrong label or counted as failures."""
    module = "mgpt_ops.vision.attention"
    declared = load(module, "FACES")[0]
    usable_faces = load(module, "usable_faces")[0]
    usable = usable_faces(device) if usable_faces is not None and why_unavailable is None else None
    impls = {}
    for face in faces:
        if why_unavailable is not None:
            why = why_unavailable
        elif declared is not None and face not in declared:
            why = f"vision_attention has no {face!r} face (faces: {', '.join(declared)})"
        elif usable is not None and face not in usable:
            why = (f"vision_attention's {face!r} face cannot run on {device.type} in this process "
                   f"(usable: {', '.join(usable)}; C++/CUDA faces need their kernels built into mgpt_ops._C)")
        else:
            why = None
        impls[f"ours:{face}"] = Impl("ours", None if why else pinned(face, fn), face, why)
    return impls


# ------------------------------------------------------------------------------------------ baselines

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_apply_rotary(q, k, cos, sin):
    """HF ``apply_rotary_pos_emb_vision``: rotate q, k [N, H, D] in fp32, return them in their dtype."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q_rot = q.float() * cos + rotate_half(q.float()) * sin
    k_rot = k.float() * cos + rotate_half(k.float()) * sin
    return q_rot.to(q.dtype), k_rot.to(k.dtype)


def hf_sdpa_attention(q, k, v, cu_seqlens, cos, sin):
    """HF's vision attention for ``attn_implementation="sdpa"`` (its default): RoPE, then per sequence
    (``lengths.tolist()``: a host sync) SDPA on [1, H, L, D] and a transpose back, then concatenate."""
    q, k = hf_apply_rotary(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, N, D]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outs = [F.scaled_dot_product_attention(qs, ks, vs, dropout_p=0.0, is_causal=False).transpose(1, 2).contiguous()
            for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
    return torch.cat(outs, dim=1).squeeze(0)  # [N, H, D]


def _fused_varlen_baseline(device, module: str, attr: str, run, cu_seqlens, max_seqlen, cos, sin) -> Impl:
    """A one-call varlen kernel after HF's separate RoPE. Both candidates take (q, k, v, cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k) positionally in every released version (torch's keyword-only
    extras changed between 2.9 and 2.13) and default to scale 1/sqrt(D), non-causal."""
    fn, why = load(module, attr)
    if fn is None:
        return Impl("baseline", None, unavailable=why)
    if device.type != "cuda":
        return Impl("baseline", None, unavailable=f"{module}.{attr} runs FlashAttention CUDA kernels only")

    def attend(q, k, v):
        q, k = hf_apply_rotary(q, k, cos, sin)
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)

    return Impl("baseline", run(attend))


# ------------------------------------------------------------------------------------------ goal report

def goal_lines(result: dict) -> list[str]:
    """The two GPU goals against measured numbers, for the fastest of our faces: per fwd+bwd case its time
    over the fastest baseline's, per forward-only case its TFLOP/s over the matmul peak of the same run.
    Cases without a goal (CPU, --quick) get the numbers and "-"."""
    lines = [f"vision goals (GPU, bf16, full shapes): fwd+bwd time <= {TIME_GOAL:.3f}x the fastest baseline; "
             f"forward >= {PEAK_FRACTION_GOAL:.0%} of the bf16 matmul peak"]
    for case in result["cases"]:
        timed = {label: e for label, e in case.get("impls", {}).items() if e.get("time_ms")}
        ours = {label: e for label, e in timed.items() if e["role"] == "ours"}
        bases = {label: e for label, e in timed.items() if e["role"] == "baseline"}
        if not ours:
            lines.append(f"  {case['case']}: ours not timed")
            continue
        label = min(ours, key=lambda k: ours[k]["time_ms"])
        mine = ours[label]
        if case["case"].endswith(":fwd"):
            peak = case["params"].get("matmul_peak_tflops")
            if not peak:
                lines.append(f"  {case['case']}: {label} {mine['time_ms']:.3g} ms (no matmul peak measured) -> -")
                continue
            score = mine["tflop_per_s"] / peak
            met = score >= PEAK_FRACTION_GOAL
            text = f"{label} {mine['tflop_per_s']:.0f} TFLOP/s = {score:.0%} of the {peak:.0f} TFLOP/s peak"
        elif bases:
            best = min(bases, key=lambda k: bases[k]["time_ms"])
            score = mine["time_ms"] / bases[best]["time_ms"]
            met = score <= TIME_GOAL
            text = (f"{label} {mine['time_ms']:.3g} ms vs fastest baseline {best} {bases[best]['time_ms']:.3g} ms "
                    f"= {score:.2f}x")
        else:
            lines.append(f"  {case['case']}: no baseline timed")
            continue
        verdict = ("met" if met else "MISSED") if case["params"].get("goal") else "-"
        lines.append(f"  {case['case']}: {text} -> {verdict}")
    return lines


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print("\n".join(goal_lines(json.loads(Path(path).read_text()))))
