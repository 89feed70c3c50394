"""Train family: one whole training step of Qwen3-VL(-MoE) -- forward, backward, gradient clipping, AdamW --
on one packed multimodal batch, ours against the same model with reference ops and against transformers.

Contenders (the same weights, the same samples; every ``fn()`` is one full step)

    ours        ``mgpt_train.model.Qwen3VLModel`` with the mgpt ops choosing their faces (CUDA: Triton / CUDA
                kernels; CPU: the C++ kernels, else reference): ``vision_attention`` with fused 2D RoPE in every
                ViT block, ``fused_linear_logprobs`` for the loss (labelled rows only, no [T, V] logits).
    reference   the same model object under ``mgpt_ops.use_backend("reference")``: the vision attention is
                ``_contract.attention_reference`` (one fp32 softmax attention per image, a host loop; closed-form
                fp32 backward) and the loss materialises fp32 logits of the labelled rows (log_softmax + gather,
                closed-form backward). Everything that is not an mgpt op is unchanged -- in particular the
                decoder's causal attention (``mgpt_train.model.attention``: torch ``varlen_attn`` on CUDA bf16,
                block-diagonal SDPA elsewhere), which is plain torch in both. So ours / reference is what the mgpt
                kernels buy inside the same model.
    hf          transformers' ``Qwen3VLForConditionalGeneration`` (``Qwen3VLMoeForConditionalGeneration`` for MoE)
                from ``config.to_hf()``, its best attention here (``flash_attention_2`` when ``flash_attn`` is
                installed and the device is CUDA, else ``sdpa``; the JSON records which in ``params.hf_attn``) and
                its default experts implementation (``grouped_mm`` in transformers 5). Loss through its own
                ``labels`` path: full [B, L, V] logits, upcast to fp32 in the cross-entropy; MoE adds
                ``router_aux_loss_coef x aux_loss`` (``output_router_logits=True``), as ours does.

The batch. Samples are encoded with ``ByteTokenizer`` + ``SampleEncoder`` (HF processor image layout) and
packed: ours gets ``input_ids``/``labels`` [T] with ``cu_seqlens`` (no padding). HF takes padded batches, so it
gets one sample per row, right-padded to the longest sample with ``pad_id``, ``attention_mask`` 1 on the real
tokens, ``mm_token_type_ids`` 1 on image tokens (what HF's processor returns), the same ``pixel_values`` and
``image_grid_thw`` (images in the same order), and ``labels[row, j + 1] = ours' labels[start + j]`` (HF shifts
inside its loss; ours are pre-shifted) -- so both predict the same tokens from the same positions and average
over the same label count; MRoPE restarts per sample on both sides (HF per row, ours per ``cu_seqlens``). Token
counts are the same for every contender: ``params.tokens`` (real tokens, T) and ``params.label_tokens`` (labels
!= -100); ``params.hf_padded_tokens`` (rows x longest row) is what HF computes on, padding included.

The step. ``loss.backward()``, ``clip_grad_norm_(max_norm=1.0)`` (its total norm is returned and compared, a
check of every gradient at once), ``AdamW.step()`` (fused on CUDA, foreach on CPU), ``zero_grad(set_to_none)``.
The learning rate is 0: AdamW still does all its arithmetic (torch has no shortcut for lr = 0), but the weights
stay fixed, so every call -- the correctness check, the memory probe, each timed repetition -- trains on the same
weights, and the three contenders can share one copy of them (HF's parameters alias ours'; every contender has
its own gradients; ours and reference share one optimizer, HF has its own). Outputs compared before timing:
``loss`` and ``grad_norm`` (tolerance ``TOLERANCE``). Peak memory is measured above what exists before the call
(weights, optimizer state and the batch, equal for all contenders: ``params.parameters`` x (weight + 2 AdamW
moments)): it is the step's gradients, activations and temporaries.

Shapes (``cases``)
    CPU (and ``--quick``): ``Qwen3VLConfig.tiny()`` / ``tiny_moe()`` with the tokenizer's vocabulary, fp32, 4
        synthetic samples (``make_synthetic``, ``ImageProcessorConfig.tiny()``); 12 samples without --quick.
    CUDA: ``mid`` = Qwen3-VL-2B's text shape cut to 12 layers (hidden 2048, SwiGLU 6144, 16 q / 8 kv heads of 128,
        vocabulary 151936, tied head) with an 8-block tower (hidden 1152, 16 heads, DeepStack after blocks 2, 4,
        6), bf16 weights and AdamW state; ``mid_moe`` = its MoE twin: 32 experts, top-8, expert SwiGLU 768 (the
        same active MLP width as the dense 6144), untied head. Batch: 6 chat samples, one image each (448-672 px,
        7188 patches, 1797 image tokens) and ~1 KB of text per sample: 7992 tokens, 2705 labels (HF: 6 rows
        padded to 1474 = 8844 positions).
FLOPs: ``mgpt_train.profiling.qwen3_vl_flops`` (every part trained, causal attention counted half).

Goal (CUDA, full shapes): ours >= 1.3x HF's tokens/s, i.e. time ratio ours / hf <= 1/1.3 (the same tokens on
both sides). ``python -m bench.train_throughput RESULT.json`` prints tokens/s (all tokens and label tokens), step
times, peak memory and the ratios ours/hf, ours/reference per case.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from bench.common import CaseSetup, CaseSpec, Goal, Impl, load, pinned

try:
    from mgpt_train import profiling
    from mgpt_train.data import ByteTokenizer, ImageProcessorConfig, Sample, SampleEncoder, make_synthetic
    from mgpt_train.model import Qwen3VLConfig, Qwen3VLModel, TextConfig, VisionConfig, to_hf_state_dict
    _MISSING_TRAIN = None
except ImportError as exc:  # e.g. training/ not on PYTHONPATH: every case then fails with this reason
    _MISSING_TRAIN = f"the train family needs mgpt_train ({type(exc).__name__}: {exc})"
# At import time, so the CPU memory probe's fork server (it preloads this module) imports transformers once.
HF_CLASSES = {moe: load("transformers", name) for moe, name in
              ((False, "Qwen3VLForConditionalGeneration"), (True, "Qwen3VLMoeForConditionalGeneration"))}

TIMED_REGION = "one training step: forward, backward, clip_grad_norm_(1.0), AdamW (lr 0), zero_grad"
IGNORE_INDEX = -100
MAX_GRAD_NORM = 1.0
TIME_GOAL = 1 / 1.3  # ours / hf step time (same tokens): >= 1.3x HF's tokens/s
# ours vs a baseline, on the loss and the total gradient norm. fp32: summation order only. bf16: different kernels
# round activations differently (HF's full-logit loss vs our fp32-accumulated fused loss, SDPA vs our attention).
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
SEED = 0

# The CUDA case's images (height, width) in pixels, one per sample: multiples of 32 (patch 16 x 2x2 merge), so
# the processor keeps their size. Text per sample: a prompt and an answer of these many bytes (= tokens).
MID_IMAGES = [(448, 448), (672, 448), (448, 672), (672, 672), (576, 448), (512, 640)]
MID_PROMPT_BYTES, MID_ANSWER_BYTES = 560, 450
QUICK_SAMPLES, CPU_SAMPLES = 4, 12


# ------------------------------------------------------------------------------------------ model shapes

def mid_config(moe: bool, tokenizer) -> Qwen3VLConfig:
    """See the module docstring: Qwen3-VL-2B's text shape with 12 layers, an 8-block tower; MoE twin."""
    vision = VisionConfig(depth=8, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                          num_position_embeddings=2304, deepstack_visual_indexes=(2, 4, 6))
    text = TextConfig(vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, mrope_section=(24, 20, 20))
    if moe:
        text = dataclasses.replace(text, num_experts=32, top_k=8, moe_intermediate_size=768)
    # the byte tokenizer's special ids (all < 263) inside the full Qwen vocabulary: the head keeps its real size
    config = Qwen3VLConfig(vision=vision, text=text, tie_word_embeddings=not moe).with_tokenizer(tokenizer)
    return dataclasses.replace(config, text=text)


def model_config(params: dict) -> Qwen3VLConfig:
    tokenizer = ByteTokenizer()
    if params["size"] == "mid":
        return mid_config(params["moe"], tokenizer)
    return (Qwen3VLConfig.tiny_moe() if params["moe"] else Qwen3VLConfig.tiny()).with_tokenizer(tokenizer)


# ------------------------------------------------------------------------------------------ the batch

def _text(rng: random.Random, length: int) -> str:
    """``length`` bytes of lowercase pseudo-words (one token per byte with the byte tokenizer)."""
    words = []
    while sum(len(w) + 1 for w in words) < length:
        words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
    return " ".join(words)[:length]


def mid_samples(seed: int = SEED) -> list:
    """One sample per ``MID_IMAGES`` entry: random uint8 pixels, an image-first question, a long answer."""
    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    samples = []
    for index, (height, width) in enumerate(MID_IMAGES):
        image = pixels.integers(0, 256, (height, width, 3), dtype=np.uint8)
        messages = [{"role": "user", "content": "<image>" + _text(rng, MID_PROMPT_BYTES)},
                    {"role": "assistant", "content": _text(rng, MID_ANSWER_BYTES)}]
        samples.append(Sample(messages=messages, images=[image], tag=f"bench/mid{index}"))
    return samples


def packed_batch(params: dict) -> dict:
    """The packed batch dict (CPU tensors) of a case: the same for every contender."""
    tokenizer = ByteTokenizer()
    if params["size"] == "mid":
        return SampleEncoder(tokenizer, ImageProcessorConfig()).batch(mid_samples())
    return SampleEncoder(tokenizer, ImageProcessorConfig.tiny()).batch(make_synthetic(params["samples"], seed=SEED))


def hf_inputs(batch: dict, pad_id: int, image_token_id: int) -> dict:
    """HF's padded equivalent of a packed batch (module docstring): one sample per row, right padding."""
    bounds = batch["cu_seqlens"].tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    rows, width = len(lengths), max(lengths)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.int64)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((rows, width), dtype=torch.int64)
    for row, (start, length) in enumerate(zip(bounds, lengths)):
        input_ids[row, :length] = batch["input_ids"][start:start + length]
        attention_mask[row, :length] = 1
        # HF predicts labels[j + 1] from position j; ours predicts labels[i] from position i
        labels[row, 1:length] = batch["labels"][start:start + length - 1]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
              "mm_token_type_ids": (input_ids == image_token_id).to(torch.int32)}
    if batch["pixel_values"].shape[0]:
        inputs.update(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    return inputs


def batch_stats(batch: dict, config) -> dict:
    """Token, image and FLOP counts of a packed batch (JSON-able)."""
    bounds = batch["cu_seqlens"].tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    grids = batch["image_grid_thw"].tolist()
    flops = profiling.qwen3_vl_flops(config, lengths, grids)
    return {"tokens": len(batch["input_ids"]), "label_tokens": int((batch["labels"] != IGNORE_INDEX).sum()),
            "samples": len(lengths), "hf_padded_tokens": len(lengths) * max(lengths), "images": len(grids),
            "patches": int(batch["pixel_values"].shape[0]), "flops": flops["total"]}


# ------------------------------------------------------------------------------------------ cases

def _best_hf_attention(device: torch.device) -> str:
    cuda_flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if cuda_flash else "sdpa"


def cases(device: torch.device, quick: bool) -> list[CaseSpec]:
    if _MISSING_TRAIN is not None:
        raise RuntimeError(_MISSING_TRAIN)
    cuda = device.type == "cuda"
    mid = cuda and not quick
    dtype = "bf16" if cuda else "fp32"
    specs = []
    for moe in (False, True):
        params = dict(size="mid" if mid else "tiny", moe=moe, dtype=dtype, hf_attn=_best_hf_attention(device),
                      goal=mid, samples=len(MID_IMAGES) if mid else QUICK_SAMPLES if quick else CPU_SAMPLES)
        config = model_config(params)
        params.update(batch_stats(packed_batch(params), config))
        with torch.device("meta"):
            params["parameters"] = sum(p.numel() for p in Qwen3VLModel(config).parameters())
        t, v = config.text, config.vision
        layers = f"{t.num_hidden_layers}L h{t.hidden_size}" + (f" E{t.num_experts}k{t.top_k}" if moe else "")
        shape = (f"{layers} vit{v.depth}x{v.hidden_size} V={t.vocab_size} | {params['images']} img "
                 f"{params['patches']} patches | T={params['tokens']} ({params['label_tokens']} labels) {dtype}")
        specs.append(CaseSpec(f"{params['size']}{'_moe' if moe else ''}", params, shape))
    return specs


# ------------------------------------------------------------------------------------------ contenders

def adamw(parameters, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with lr = 0 (module docstring): fused on CUDA, as training runs it; foreach on the CPU."""
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(parameters, lr=0.0, weight_decay=0.1, **kind)


def train_step(loss_of_batch, parameters: list, optimizer: torch.optim.Optimizer):
    """One step as a contender: loss, backward, clip (its total norm is an output), AdamW, free the gradients."""

    def step() -> dict:
        loss = loss_of_batch()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach()}

    return step


def hf_model_sharing_weights(ours, config, attn: str, dtype: torch.dtype, device: torch.device):
    """transformers' model of ``config`` whose parameters alias ``ours``' (one copy of the weights in memory; the
    patch embedding is a reshaped view), re-tied like HF ties its head."""
    hf_class, why = HF_CLASSES[config.is_moe]
    if hf_class is None:
        raise RuntimeError(why)
    with torch.device(device):
        hf = hf_class._from_config(config.to_hf(), attn_implementation=attn, dtype=dtype)
    hf.load_state_dict(to_hf_state_dict(ours), strict=True, assign=True)
    if config.tie_word_embeddings:  # assign made two parameters of one tensor: one parameter again, as HF's
        hf.lm_head.weight = hf.model.language_model.embed_tokens.weight
    return hf.train()


def setup(name: str, params: dict, device: torch.device) -> CaseSetup:
    if _MISSING_TRAIN is not None:
        raise RuntimeError(_MISSING_TRAIN)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[params["dtype"]]
    config = model_config(params)
    cpu_batch = packed_batch(params)
    # pixel_values stay fp32 (as the data gives them): both models cast them to their patch embedding's dtype
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cpu_batch.items()}

    torch.manual_seed(SEED)
    with torch.device(device):
        ours = Qwen3VLModel(config).to(dtype).train()
    ours_params = list(ours.parameters())
    step = train_step(lambda: ours(batch)["loss"], ours_params, adamw(ours_params, device))
    impls = {"ours": Impl("ours", step, face="auto"),
             "reference": Impl("baseline", pinned("reference", step), face="reference")}

    try:
        hf = hf_model_sharing_weights(ours, config, params["hf_attn"], dtype, device)
    except Exception as exc:  # noqa: BLE001 - transformers missing or too old for this model: HF unavailable
        impls["hf"] = Impl("baseline", None, unavailable=f"transformers model: {type(exc).__name__}: {exc}")
    else:
        tokenizer = ByteTokenizer()
        inputs = {k: v.to(device) for k, v in hf_inputs(cpu_batch, tokenizer.pad_id, config.image_token_id).items()}
        extra = {"output_router_logits": True} if config.is_moe else {}
        hf_params = list(hf.parameters())
        impls["hf"] = Impl("baseline", train_step(lambda: hf(**inputs, **extra).loss, hf_params,
                                                  adamw(hf_params, device)))

    goal = Goal(baseline="hf", max_time_ratio=TIME_GOAL, max_memory_ratio=float("inf")) if params["goal"] else None
    return CaseSetup(impls, TOLERANCE[params["dtype"]], flops=params["flops"], goal=goal,
                     rates={"tokens": params["tokens"], "label_tokens": params["label_tokens"]})


# ------------------------------------------------------------------------------------------ throughput report

def _number(value, fmt: str) -> str:
    """``value`` formatted, "-" when absent; the JSON stores non-finite numbers as strings ("inf", "nan")."""
    return "-" if value is None else value if isinstance(value, str) else format(value, fmt)


def throughput_lines(result: dict) -> list[str]:
    """Per case and contender: step time, tokens/s (all tokens, label tokens), MFU (CUDA devices with a known
    bf16 peak), peak memory; then the ratios of ours to each baseline (tokens/s ratio = inverse time ratio: every
    contender trains on the same tokens)."""
    device_name = result.get("env", {}).get("device", {}).get("name")
    peak = profiling.peak_flops_for_name(device_name) if device_name and _MISSING_TRAIN is None else None
    lines = [f"train step throughput on {device_name or result.get('device_type', '?')}; goal (CUDA, full "
             f"shapes): ours >= {1 / TIME_GOAL:.1f}x hf tokens/s"]
    for case in result["cases"]:
        params = case["params"]
        lines.append(f"  {case['case']}: {case['shape']} (hf pads to {params['hf_padded_tokens']} tokens)")
        if not case.get("impls"):
            lines.append(f"    {case.get('status', '?')}: {case.get('reason', '')}"[:200])
        for label, entry in case.get("impls", {}).items():
            ms = entry.get("time_ms")
            if not ms:
                lines.append(f"    {label:<10} {entry['status']}: {entry.get('reason', '')}"[:200])
                continue
            per_s = 1e3 / ms
            mfu = f"  MFU {entry['tflop_per_s'] * 1e12 / peak:.1%}" if peak and entry.get("tflop_per_s") else ""
            lines.append(f"    {label:<10} {ms:9.1f} ms  {params['tokens'] * per_s:10.0f} tok/s  "
                         f"{params['label_tokens'] * per_s:10.0f} label tok/s  "
                         f"{_number(entry.get('peak_mib'), '.0f')} MiB peak{mfu}")
        for comp in case.get("comparisons", []):
            ratio = comp.get("time_ratio")
            speed = f"{1 / ratio:.2f}x tokens/s" if ratio else "no time ratio"
            verdict = {None: "-", True: "met", False: "MISSED"}[comp.get("goal_met")]
            lines.append(f"    ours/{comp['baseline']}: {speed}, memory {_number(comp.get('memory_ratio'), '.2f')}, "
                         f"max rel err {_number(comp['max_rel_err'], '.1e')} -> goal {verdict}")
    return lines


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print("\n".join(throughput_lines(json.loads(Path(path).read_text()))))
