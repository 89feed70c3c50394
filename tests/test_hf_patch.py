"""patch_qwen2_5_vl / patch_qwen3_vl: Hugging Face vision towers routed through mgpt::vision_attention.

The reference for every comparison is the UNPATCHED Hugging Face model with ``attn_implementation="eager"``
(a per-sequence softmax attention written by HF, independent of our op), holding the same weights (deepcopy).
Tiny random configs are built locally (no downloads): Qwen2.5-VL vision with head dim 80 and windowed + full
blocks, Qwen3-VL vision with head dims 72 and 64 and deepstack mergers, Qwen3-VL-MoE vision; inputs are several
images of different sizes plus a 3-frame video. Weights are redrawn at unit scale so attention is far from
uniform (HF's 0.02 init would make every softmax flat and hide errors).

Tolerance: relative L2 error 1e-5 (``conftest.rel_err``) in fp32, on the tower's outputs, on the gradients of
every parameter and of the pixels, and on the whole model's logits: both sides do fp32 math, they differ only
in summation order. In bf16/fp16 both the patched and HF's own 16-bit tower are measured against HF in fp32,
and ours must stay within 1.5x of HF's error.
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration)
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_qwen2_5
from transformers.models.qwen3_vl import modeling_qwen3_vl as hf_qwen3
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf_qwen3_moe
from transformers.vision_utils import get_vision_window_index

import mgpt_ops
from conftest import DEVICE, faces_here, rel_err
from mgpt_ops.vision.attention import usable_faces
from mgpt_ops.vision import hf_patch
from mgpt_ops.vision.hf_patch import patch_qwen2_5_vl, patch_qwen3_vl

# the faces this process can run (a C++/CUDA face counts once its kernel is registered: attention.usable_faces)
FACES = [f for f in faces_here(("reference", "triton", "cpu", "cuda")) if f in usable_faces(torch.device(DEVICE))]
TOL = 1e-5
# (t, h, w) in patches: images of 4x4, 2x2 and 6x4 patches and a 2-frame video (few tokens: the Triton face
# runs in the interpreter). With window_size 56, patch 14 and merge 2, Qwen2.5-VL windows are 4x4 patches, so
# the windows have 4, 8 and 16 tokens and the frames 4 to 24.
GRID = [[1, 4, 4], [1, 2, 2], [1, 6, 4], [2, 4, 6]]

DEPTH = 2  # vision blocks per tower: Qwen2.5-VL block 0 is windowed, block 1 full; both feed Qwen3-VL deepstack
QWEN2_5_VISION = dict(depth=DEPTH, hidden_size=160, num_heads=2, intermediate_size=64, out_hidden_size=48,
                      patch_size=14, window_size=56, fullatt_block_indexes=[1])  # head dim 80
QWEN3_VISION = dict(depth=DEPTH, hidden_size=144, num_heads=2, intermediate_size=64, out_hidden_size=48,
                    patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])  # head dim 72

VISION_TOWERS = {
    "qwen2_5_vl_hd80": (hf_qwen2_5.Qwen2_5_VisionTransformerPretrainedModel, hf_qwen2_5.Qwen2_5_VLVisionConfig,
                        QWEN2_5_VISION, patch_qwen2_5_vl),
    "qwen3_vl_hd72": (hf_qwen3.Qwen3VLVisionModel, hf_qwen3.Qwen3VLVisionConfig, QWEN3_VISION, patch_qwen3_vl),
    "qwen3_vl_hd64": (hf_qwen3.Qwen3VLVisionModel, hf_qwen3.Qwen3VLVisionConfig,
                      dict(QWEN3_VISION, hidden_size=128), patch_qwen3_vl),
    "qwen3_vl_moe_hd72": (hf_qwen3_moe.Qwen3VLMoeVisionModel, hf_qwen3_moe.Qwen3VLMoeVisionConfig, QWEN3_VISION,
                          patch_qwen3_vl),
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Unit-scale random weights: matrices ~ N(0, 1/fan_in) (q/k/v 3x that variance, so scores spread over
    several units), norm scales ~ 1 + N(0, 0.1^2), other vectors ~ N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                gain = 3.0 if name.endswith("qkv.weight") else 1.0
                p.copy_(noise * (gain / p[0].numel()) ** 0.5)
            elif "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def vision_tower(name: str, seed: int = 0):
    cls, config_cls, kwargs, patch = VISION_TOWERS[name]
    model = cls._from_config(config_cls(**kwargs), attn_implementation="eager")
    return randomize(model, seed).to(DEVICE), patch


def vision_inputs(model, seed: int = 1, grid=GRID):
    cfg = model.config
    grid_thw = torch.tensor(grid, device=DEVICE)
    tokens = int(grid_thw.prod(-1).sum())
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(tokens, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2, generator=gen)
    return pixels.to(DEVICE), grid_thw


def outputs_and_grads(model, pixels, grid_thw, seed: int = 2):
    """The tower's outputs (final hidden states, merged features, deepstack features) and the gradients of
    a random linear function of them with respect to the pixels and every parameter."""
    pixels = pixels.detach().clone().requires_grad_()
    out = model(pixels, grid_thw=grid_thw)
    feats = [out.last_hidden_state, out.pooler_output] + list(getattr(out, "deepstack_features", None) or [])
    gen = torch.Generator().manual_seed(seed)
    loss = sum((f * torch.randn(f.shape, generator=gen).to(f.device)).sum() for f in feats)
    leaves = [pixels] + list(model.parameters())
    return feats, torch.autograd.grad(loss, leaves)


def assert_same(got, want, what):
    errors = [rel_err(g, w) for g, w in zip(got, want)]
    assert len(got) == len(want) and max(errors) < TOL, f"{what}: {errors}"


class OpCalls:
    """Counts the op calls the patched forwards make (and remembers their arguments)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = hf_patch.vision_attention_packed

        def counted(qkv, cu_seqlens, max_seqlen, **kw):
            self.calls.append(dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **kw))
            return real(qkv, cu_seqlens, max_seqlen, **kw)

        monkeypatch.setattr(hf_patch, "vision_attention_packed", counted)


# ---------------------------------------------------------------------------------------------------------
# Parity of the vision towers
# ---------------------------------------------------------------------------------------------------------
# Every face on the dense towers; the MoE tower (the same code in other classes) on the automatic face.
@pytest.mark.parametrize("tower, face", [(tower, face) for tower in VISION_TOWERS if "moe" not in tower
                                         for face in FACES] + [("qwen3_vl_moe_hd72", None)])
def test_vision_tower_matches_unpatched_eager(tower, face):
    hf_model, patch = vision_tower(tower)
    ours = copy.deepcopy(hf_model)
    pixels, grid_thw = vision_inputs(hf_model)
    want_feats, want_grads = outputs_and_grads(hf_model, pixels, grid_thw)
    with patch(ours), mgpt_ops.use_backend(face):
        feats, grads = outputs_and_grads(ours, pixels, grid_thw)
    assert_same(feats, want_feats, "outputs")
    assert_same(grads, want_grads, "gradients (pixels, then every parameter)")


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flash_attention_2"])
@pytest.mark.parametrize("tower", ["qwen2_5_vl_hd80", "qwen3_vl_hd72"])
def test_every_attention_implementation_goes_through_the_op(tower, impl, monkeypatch):
    # flash_attention_2 is only set on the config (flash-attn is not installed here): the patched forward must
    # not consult it, and HF's own flash path would compute max_seqlen with a .item() we replace.
    hf_model, patch = vision_tower(tower)
    ours = copy.deepcopy(hf_model)
    ours.config._attn_implementation = impl
    pixels, grid_thw = vision_inputs(hf_model)
    want_feats, want_grads = outputs_and_grads(hf_model, pixels, grid_thw)
    calls = OpCalls(monkeypatch)
    with patch(ours):
        feats, grads = outputs_and_grads(ours, pixels, grid_thw)
    assert len(calls.calls) == DEPTH
    assert_same(feats, want_feats, "outputs")
    assert_same(grads, want_grads, "gradients")


def test_blocks_get_exact_max_seqlen_and_one_shared_rope_table(monkeypatch):
    hf_model, _ = vision_tower("qwen2_5_vl_hd80")
    pixels, grid_thw = vision_inputs(hf_model)
    rope_calls = []
    hf_model.rotary_pos_emb.register_forward_hook(lambda *args: rope_calls.append(1))
    calls = OpCalls(monkeypatch)
    with patch_qwen2_5_vl(hf_model):
        hf_model(pixels, grid_thw=grid_thw)
    # HF's own cu_seqlens / window boundaries, as the blocks received them
    seqlens = [(c["cu_seqlens"][1:] - c["cu_seqlens"][:-1]).max().item() for c in calls.calls]
    assert [c["max_seqlen"] for c in calls.calls] == seqlens == [16, 24]  # window, full
    assert len(rope_calls) == 1  # cos/sin built once per forward ...
    assert all(c["cos"] is calls.calls[0]["cos"] and c["sin"] is calls.calls[0]["sin"] for c in calls.calls)
    assert calls.calls[0]["cos"].dtype == torch.float32 and calls.calls[0]["cos"].shape == (pixels.shape[0], 80)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4),
       st.sampled_from([28, 56, 112]))
def test_host_window_length_matches_hf_windows(entries, window_size):
    # _longest_window computes on the host what HF's window index holds; max_seqlen must not be smaller
    # (wrong results) and should not be larger (wasted programs).
    grid = [[t, 2 * h, 2 * w] for t, h, w in entries]
    _, cu_windows = get_vision_window_index(torch.tensor(grid), spatial_merge_size=2, window_size=window_size,
                                            patch_size=14)
    assert hf_patch._longest_window(grid, window_size, 14, 2) == int((cu_windows[1:] - cu_windows[:-1]).max())
    assert hf_patch._longest_frame(grid) == max(h * w for _, h, w in grid)


def test_caller_given_max_seqlen_is_kept(monkeypatch):
    hf_model, _ = vision_tower("qwen2_5_vl_hd80")
    pixels, grid_thw = vision_inputs(hf_model)
    calls = OpCalls(monkeypatch)
    with patch_qwen2_5_vl(hf_model):
        hf_model(pixels, grid_thw=grid_thw, max_seqlen=50, max_window_seqlen=20)
    assert [c["max_seqlen"] for c in calls.calls] == [20, 50]


def test_attention_module_called_directly():
    # Without max_seqlen (N is used) and without rotary tables (no rotation = HF with cos 1, sin 0).
    hf_model, _ = vision_tower("qwen2_5_vl_hd80")
    hf_attn = hf_model.blocks[0].attn
    attn = copy.deepcopy(hf_attn)
    patch_qwen2_5_vl(attn)
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(23, 160, generator=gen).to(DEVICE)
    cu_seqlens = torch.tensor([0, 1, 9, 9, 23], dtype=torch.int32, device=DEVICE)
    cos, sin = (torch.randn(23, 80, generator=gen).to(DEVICE) for _ in range(2))
    assert rel_err(attn(hidden, cu_seqlens, position_embeddings=(cos, sin)),
                   hf_attn(hidden, cu_seqlens, position_embeddings=(cos, sin))) < TOL
    no_rotation = (torch.ones(23, 80, device=DEVICE), torch.zeros(23, 80, device=DEVICE))
    assert rel_err(attn(hidden, cu_seqlens), hf_attn(hidden, cu_seqlens, position_embeddings=no_rotation)) < TOL


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tower_as_accurate_as_hf(dtype, face):
    # In 16 bits the op is not bit-comparable with HF (it keeps the fp32 rotation of q and k instead of
    # rounding it to 16 bits before attention), so both 16-bit runs are measured against HF in fp32: ours must
    # be within 1.5x of HF's own 16-bit error (about 2.5e-2 in bf16 and 3e-3 in fp16 here).
    hf_model, patch = vision_tower("qwen2_5_vl_hd80")
    ours = copy.deepcopy(hf_model).to(dtype)
    pixels, grid_thw = vision_inputs(hf_model)
    with torch.no_grad():
        want = hf_model(pixels, grid_thw=grid_thw).pooler_output
        hf_half = copy.deepcopy(hf_model).to(dtype)(pixels.to(dtype), grid_thw=grid_thw).pooler_output
        with patch(ours), mgpt_ops.use_backend(face):
            got = ours(pixels.to(dtype), grid_thw=grid_thw).pooler_output
    assert got.dtype == dtype
    assert rel_err(got, want) < 1.5 * rel_err(hf_half, want)


# ---------------------------------------------------------------------------------------------------------
# Whole models: logits
# ---------------------------------------------------------------------------------------------------------
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0})
SPECIAL = dict(image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_whole_model_logits_match(family):
    if family == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(vision_config=dict(QWEN2_5_VISION, out_hidden_size=64), text_config=TEXT,
                                  **SPECIAL)
        model_cls, patch = Qwen2_5_VLForConditionalGeneration, patch_qwen2_5_vl
    else:
        text = dict(TEXT, rope_parameters=dict(TEXT["rope_parameters"], mrope_interleaved=True))
        config = Qwen3VLConfig(vision_config=dict(QWEN3_VISION, out_hidden_size=64), text_config=text, **SPECIAL)
        model_cls, patch = Qwen3VLForConditionalGeneration, patch_qwen3_vl
    config._attn_implementation = "eager"
    hf_model = randomize(model_cls(config), seed=3).to(DEVICE).eval()
    ours = copy.deepcopy(hf_model)
    grid = [g for g in GRID if g[0] == 1]  # images
    pixels, grid_thw = vision_inputs(hf_model.model.visual, grid=grid)
    ids = [5, 6, 7]
    for t, h, w in grid:  # each image: <start> <image> x (patches / merge^2) <end>, then some text
        ids += [102] + [100] * (t * h * w // 4) + [103, 8, 9]
    input_ids = torch.tensor([ids], device=DEVICE)
    inputs = dict(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grid_thw,
                  mm_token_type_ids=(input_ids == 100).long())
    with torch.no_grad():
        want = hf_model(**inputs).logits
        with patch(ours):
            got = ours(**inputs).logits
    assert want.shape == (1, len(ids), 128)
    assert rel_err(got, want) < TOL


# ---------------------------------------------------------------------------------------------------------
# Patch semantics
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def undo_later():
    """Collects patch handles and undoes them after the test even if it fails (class patches are global)."""
    handles = []
    yield handles.append
    for handle in reversed(handles):
        handle.undo()


def op_calls_of(model, monkeypatch):
    calls = OpCalls(monkeypatch)
    pixels, grid_thw = vision_inputs(model)
    with torch.no_grad():
        out = model(pixels, grid_thw=grid_thw).pooler_output
    monkeypatch.undo()
    return len(calls.calls), out


def test_instance_patch_leaves_other_instances_alone(monkeypatch):
    first, _ = vision_tower("qwen3_vl_hd72")
    second = copy.deepcopy(first)
    handle = patch_qwen3_vl(first)
    assert op_calls_of(first, monkeypatch)[0] == DEPTH
    assert op_calls_of(second, monkeypatch)[0] == 0
    assert op_calls_of(hf_qwen3.Qwen3VLVisionModel(first.config), monkeypatch)[0] == 0
    handle.undo()
    assert op_calls_of(first, monkeypatch)[0] == 0


def test_class_patch_covers_every_instance_and_the_moe_tower(monkeypatch):
    dense, _ = vision_tower("qwen3_vl_hd72")
    moe, _ = vision_tower("qwen3_vl_moe_hd72")
    with patch_qwen3_vl() as handle:
        assert len(handle.patched) == 4  # attention + vision model, dense and MoE
        later = hf_qwen3.Qwen3VLVisionModel(dense.config)  # created after the patch
        assert [op_calls_of(m, monkeypatch)[0] for m in (dense, moe, later)] == [DEPTH] * 3
    assert [op_calls_of(m, monkeypatch)[0] for m in (dense, moe, later)] == [0, 0, 0]
    assert hf_qwen3.Qwen3VLVisionAttention.forward.__module__ == hf_qwen3.__name__


def test_patching_twice_is_harmless(monkeypatch, undo_later):
    model, _ = vision_tower("qwen2_5_vl_hd80")
    reference = op_calls_of(copy.deepcopy(model), monkeypatch)[1]
    for make in (lambda: patch_qwen2_5_vl(model), lambda: patch_qwen2_5_vl()):
        first, second = make(), make()
        undo_later(first)
        assert first.patched and not second.patched
        calls, out = op_calls_of(model, monkeypatch)
        assert calls == DEPTH and rel_err(out, reference) < TOL
        second.undo()  # undoes nothing
        assert op_calls_of(model, monkeypatch)[0] == DEPTH
        first.undo()
        assert op_calls_of(model, monkeypatch)[0] == 0


def test_instance_patch_survives_undoing_a_class_patch(monkeypatch, undo_later):
    model, _ = vision_tower("qwen2_5_vl_hd80")
    class_patch = patch_qwen2_5_vl()
    undo_later(class_patch)
    instance_patch = patch_qwen2_5_vl(model)
    assert instance_patch.patched  # the instance gets its own forward even though the class is patched
    class_patch.undo()
    assert op_calls_of(model, monkeypatch)[0] == DEPTH
    instance_patch.undo()
    assert op_calls_of(model, monkeypatch)[0] == 0


def test_wrong_family_is_rejected():
    model, _ = vision_tower("qwen2_5_vl_hd80")
    with pytest.raises(ValueError, match="patch_qwen3_vl: .*no qwen3_vl vision module"):
        patch_qwen3_vl(model)


# ---------------------------------------------------------------------------------------------------------
# No host sync inside the blocks; torch.compile
# ---------------------------------------------------------------------------------------------------------
class HostSyncTrap:
    """Raises on tensor -> Python conversions (.item, .tolist, bool/int/float) made while a vision block runs,
    except inside the op itself (its faces are tested on their own)."""

    def __init__(self, monkeypatch, blocks):
        self.armed = False
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, self._trap(getattr(torch.Tensor, name), name))
        for block in blocks:
            block.register_forward_pre_hook(lambda *args: setattr(self, "armed", True))
            block.register_forward_hook(lambda *args: setattr(self, "armed", False))
        real = hf_patch.vision_attention_packed

        def op_unarmed(*args, **kwargs):
            self.armed = False
            try:
                return real(*args, **kwargs)
            finally:
                self.armed = True

        monkeypatch.setattr(hf_patch, "vision_attention_packed", op_unarmed)

    def _trap(self, fn, name):
        def trapped(tensor, *args, **kwargs):
            if self.armed:
                raise AssertionError(f"host sync: Tensor.{name} inside a vision block")
            return fn(tensor, *args, **kwargs)
        return trapped


@pytest.mark.parametrize("tower", ["qwen2_5_vl_hd80", "qwen3_vl_hd72"])
def test_no_host_sync_inside_vision_blocks(tower, monkeypatch):
    hf_model, patch = vision_tower(tower)
    ours = copy.deepcopy(hf_model)
    pixels, grid_thw = vision_inputs(hf_model)
    trap = HostSyncTrap(monkeypatch, list(hf_model.blocks) + list(ours.blocks))
    with pytest.raises(AssertionError, match="host sync"):  # the trap works: HF's split does cu_seqlens.tolist()
        hf_model(pixels, grid_thw=grid_thw)
    trap.armed = False  # the raise left the block without running its exit hook
    with patch(ours):
        feats, _ = outputs_and_grads(ours, pixels, grid_thw)
    assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize("face", FACES)
def test_compiled_patched_block_fullgraph(face):
    hf_model, _ = vision_tower("qwen3_vl_hd72")
    pixels, grid_thw = vision_inputs(hf_model)
    tokens = pixels.shape[0]
    cu_seqlens, _ = hf_qwen3.get_vision_attention_seqlens(grid_thw, hf_model.config)
    cos, sin = hf_model.rotary_pos_emb(pixels, hf_qwen3.get_vision_position_ids(grid_thw, 2))
    hidden = torch.randn(tokens, hf_model.config.hidden_size, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    grad_out = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    hf_block = hf_model.blocks[1]
    block = copy.deepcopy(hf_block)
    patch_qwen3_vl(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")

    def run(module):
        x = hidden.clone().requires_grad_()
        y = module(x, cu_seqlens=cu_seqlens, max_seqlen=hf_patch._longest_frame(grid_thw.tolist()),
                   position_embeddings=(cos, sin))
        return [y] + list(torch.autograd.grad(y, [x] + list(module.parameters()), grad_out))

    want = run(hf_block)
    with mgpt_ops.use_backend(face):
        got = run(compiled)
    assert_same(got, want, "block output, d hidden, d parameters")

