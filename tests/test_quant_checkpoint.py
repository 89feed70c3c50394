"""save_quantized / load_quantized (mgpt_ops/quant/checkpoint.py) against the agreed checkpoint format:
tensor names, dtypes and shapes written out here from the format table, round trips, Qwen's published FP8
layout written by hand, and one test per bad checkpoint / config."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from conftest import DEVICE, rel_err
from mgpt_ops.quant.accuracy import tiny_model
from mgpt_ops.quant.checkpoint import load_quantized, save_quantized
from mgpt_ops.quant.modules import METHODS, QuantConfig, QuantizedExperts, QuantizedLinear, quantize_

FP8, BF16, F32 = torch.float8_e4m3fn, torch.bfloat16, torch.float32
CHECKPOINT_METHOD = {"fp8_rowwise": "mgpt_fp8", "fp8_block128": "mgpt_fp8_block", "int8_w8a8": "mgpt_int8",
                     "w4a16": "mgpt_w4a16"}


def expected_tensors(method: str, n: int, k: int, act_dtype, group: int = 128, symmetric: bool = False) -> dict:
    """The format table: suffix -> (dtype, shape) of one quantized [N, K] linear."""
    if method == "fp8_rowwise":
        return {"weight": (FP8, [n, k]), "weight_scale": (F32, [n, 1])}
    if method == "int8_w8a8":
        return {"weight": (torch.int8, [n, k]), "weight_scale": (F32, [n, 1])}
    if method == "fp8_block128":
        return {"weight": (FP8, [n, k]), "weight_scale_inv": (F32, [math.ceil(n / 128), math.ceil(k / 128)])}
    out = {"qweight": (torch.int32, [n, k // 8]), "scales": (act_dtype, [n, k // group])}
    if not symmetric:
        out["zeros"] = (act_dtype, [n, k // group])
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def moe_bf16():
    return tiny_model("qwen3_moe", dtype=BF16)


# --------------------------------------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [QuantConfig(m) for m in METHODS] + [QuantConfig("w4a16", 64, symmetric=True)],
                         ids=[*METHODS, "w4a16_g64_sym"])
def test_saved_tensors_match_the_format(moe_bf16, tmp_path, config):
    model = quantize_(copy.deepcopy(moe_bf16), config)
    save_quantized(model, tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    expected = {}
    for name, module in moe_bf16.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            for suffix, spec in expected_tensors(config.method, module.out_features, module.in_features, BF16,
                                                 config.group_size, config.symmetric).items():
                expected[f"{name}.{suffix}"] = spec
        elif type(module).__name__ == "Qwen3MoeExperts":
            hidden, inter = module.hidden_dim, module.intermediate_dim
            for e in range(module.num_experts):
                for proj, (n, k) in {"gate_proj": (inter, hidden), "up_proj": (inter, hidden),
                                     "down_proj": (hidden, inter)}.items():
                    for suffix, spec in expected_tensors(config.method, n, k, BF16, config.group_size,
                                                         config.symmetric).items():
                        expected[f"{name}.{e}.{proj}.{suffix}"] = spec
    quantized_owners = {n.rpartition(".")[0] for n in expected}  # the quantized linears
    float_names = [n for n in moe_bf16.state_dict()
                   if n.rpartition(".")[0] not in quantized_owners and ".experts." not in n]
    assert "model.layers.0.mlp.gate.weight" in float_names and "lm_head.weight" in float_names
    for name in float_names:  # everything not quantized is stored as in the source model
        expected[name] = (BF16, list(moe_bf16.state_dict()[name].shape))
        assert torch.equal(saved[name], moe_bf16.state_dict()[name])
    assert {k: (v.dtype, list(v.shape)) for k, v in saved.items()} == expected
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    want = {"quant_method": CHECKPOINT_METHOD[config.method],
            "modules_to_not_convert": ["model.embed_tokens", "lm_head"], "mgpt_version": qc["mgpt_version"]}
    if config.method == "fp8_block128":
        want["weight_block_size"] = [128, 128]
    if config.method == "w4a16":
        want.update(group_size=config.group_size, symmetric=config.symmetric)
    else:
        want["activation_scheme"] = "dynamic"
    assert qc == want and isinstance(qc["mgpt_version"], str)


# --------------------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen3_tied", "qwen3_moe"])
@pytest.mark.parametrize("method", METHODS)
def test_round_trip_gives_identical_outputs(tmp_path, kind, method):
    source = tiny_model("qwen3", dtype=BF16, tie_word_embeddings=True) if kind == "qwen3_tied" else \
        tiny_model("qwen3_moe", dtype=BF16)
    model = quantize_(source, method).to(DEVICE)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, device=DEVICE)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.mgpt_quantization.config.method == method
    assert sorted(loaded.mgpt_quantization.converted) == sorted(model.mgpt_quantization.converted)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name, t in state.items():
        assert t.dtype == loaded_state[name].dtype and torch.equal(t.view(torch.uint8) if t.dtype == FP8 else t,
                                                                   loaded_state[name].view(torch.uint8)
                                                                   if t.dtype == FP8 else loaded_state[name])
    if kind == "qwen3_tied":
        assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 512, (2, 9), device=DEVICE)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_round_trip_with_high_precision_experts(moe_bf16, tmp_path):
    model = quantize_(copy.deepcopy(moe_bf16), "fp8_rowwise", filter_fn=lambda module, name: "experts" not in name)
    save_quantized(model, tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    gate_up = moe_bf16.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(saved["model.layers.1.mlp.experts.2.up_proj.weight"], gate_up[2, 128:])  # per expert, bf16
    assert "model.layers.1.mlp.experts" in json.loads((tmp_path / "config.json").read_text())[
        "quantization_config"]["modules_to_not_convert"]
    loaded = load_quantized(tmp_path)
    assert torch.equal(loaded.model.layers[1].mlp.experts.gate_up_proj, gate_up)
    ids = torch.randint(0, 512, (1, 7))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_sharded_round_trip(moe_bf16, tmp_path):
    model = quantize_(copy.deepcopy(moe_bf16), "fp8_block128")
    save_quantized(model, tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for f in files for t in load_file(str(tmp_path / f)).values())
    ids = torch.randint(0, 512, (1, 7))
    assert torch.equal(logits(load_quantized(tmp_path), ids), logits(model, ids))


def test_save_quantizes_a_float_model_in_place(moe_bf16, tmp_path):
    model = copy.deepcopy(moe_bf16)
    save_quantized(model, tmp_path, "int8_w8a8")
    assert isinstance(model.model.layers[0].mlp.experts, QuantizedExperts)
    ids = torch.randint(0, 512, (1, 5))
    assert torch.equal(logits(load_quantized(tmp_path), ids), logits(model, ids))


def tiny_vl_moe(hidden: int, head_dim: int, expert_width: int, vision_mlp: int):
    """A random bf16 Qwen3-VL-MoE (2 vision blocks of width 144, 2 decoder layers, 4 experts, top-2)."""
    vision = dict(depth=2, hidden_size=144, num_heads=2, intermediate_size=vision_mlp, out_hidden_size=hidden,
                  patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # sums to head_dim / 2
    text = dict(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=expert_width,
                num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=head_dim,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0,
                                 "mrope_interleaved": True})
    config = Qwen3VLMoeConfig(vision_config=vision, text_config=text, image_token_id=100, video_token_id=101,
                              vision_start_token_id=102, vision_end_token_id=103)
    torch.manual_seed(0)
    return Qwen3VLMoeForConditionalGeneration._from_config(config, dtype=BF16).eval()


def test_qwen3_vl_moe_round_trip(tmp_path):
    source = tiny_vl_moe(hidden=64, head_dim=32, expert_width=64, vision_mlp=64)
    model = quantize_(copy.deepcopy(source), "fp8_block128")
    state = model.mgpt_quantization
    assert state.not_converted == ["model.visual", "model.language_model.embed_tokens", "lm_head"]
    assert "model.language_model.layers.1.mlp.experts" in state.converted
    assert not any(name.startswith("model.visual") for name in state.converted)
    save_quantized(model, tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    prefix = "model.language_model.layers.0.mlp.experts"
    down = saved[f"{prefix}.3.down_proj.weight"]
    assert down.shape == (64, 64) and down.dtype == FP8
    assert saved["model.visual.blocks.0.attn.qkv.weight"].dtype == BF16
    ids = torch.randint(0, 100, (1, 6))
    loaded = load_quantized(tmp_path)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert rel_err(logits(loaded, ids), logits(source, ids)) < 0.2


# --------------------------------------------------------------------------------------------------------
# Qwen's published FP8 layout, written by hand
# --------------------------------------------------------------------------------------------------------
def block_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent 128x128 block FP8 quantizer as Qwen publishes it: scale = block amax / 448 stored in bf16
    (Qwen's FP8 checkpoints hold ``weight_scale_inv`` in bf16), q = w / that bf16 scale (float64 division)."""
    n, k = w.shape
    scale = torch.empty(math.ceil(n / 128), math.ceil(k / 128), dtype=BF16)
    q = torch.empty(n, k, dtype=FP8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double()
            scale[i, j] = block.abs().max() / 448
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / scale[i, j].double()).clamp(-448, 448).to(FP8)
    return q, scale


def block_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 weight of a 128x128-block FP8 tensor (the published formula: q * weight_scale_inv per block)."""
    n, k = q.shape
    full = scale.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return q.double() * full


def write_sharded(tensors: dict[str, torch.Tensor], folder) -> None:
    """Two safetensors shards and their index, as the hub's large checkpoints are laid out."""
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))


def per_expert_fp8(name: str, t: torch.Tensor, tensors: dict) -> None:
    """transformers' fused experts tensor -> Qwen's per-expert FP8 tensors (``<experts>.{e}.<proj>.weight``)."""
    owner = name.rpartition(".")[0]
    parts = {"gate_proj": t.chunk(2, 1)[0], "up_proj": t.chunk(2, 1)[1]} if name.endswith("gate_up_proj") else \
        {"down_proj": t}
    for proj, w in parts.items():
        for e in range(w.shape[0]):
            key = f"{owner}.{e}.{proj}"
            tensors[f"{key}.weight"], tensors[f"{key}.weight_scale_inv"] = block_quantize(w[e])


def test_loads_qwen_fp8_checkpoint(tmp_path):
    source = tiny_model("qwen3_moe", dtype=BF16, hidden_size=192, moe_intermediate_size=64)  # partial blocks
    tensors = {}
    for name, t in source.state_dict().items():
        owner = name.rpartition(".")[0]
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            per_expert_fp8(name, t, tensors)
        elif isinstance(source.get_submodule(owner), nn.Linear) and owner != "lm_head":
            tensors[name], tensors[f"{owner}.weight_scale_inv"] = block_quantize(t)
        else:
            tensors[name] = t
    write_sharded(tensors, tmp_path)
    config = copy.deepcopy(source.config)
    config.architectures = ["Qwen3MoeForCausalLM"]
    config.quantization_config = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    config.save_pretrained(tmp_path)

    loaded = load_quantized(tmp_path)
    assert loaded.mgpt_quantization.config.method == "fp8_block128"
    q_proj = loaded.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, QuantizedLinear) and q_proj.weight_scale_inv.shape == (1, 2)
    assert torch.equal(q_proj.weight.view(torch.uint8),
                       tensors["model.layers.1.self_attn.q_proj.weight"].view(torch.uint8))
    experts = loaded.model.layers[0].mlp.experts
    assert isinstance(experts, QuantizedExperts)
    assert experts.up_proj.weight_scale_inv.dtype == F32  # widened from the checkpoint's bf16, exactly
    assert torch.equal(experts.up_proj.weight_scale_inv[2],
                       tensors["model.layers.0.mlp.experts.2.up_proj.weight_scale_inv"].float())
    assert loaded.model.layers[0].mlp.gate.weight.dtype == BF16  # the router stays as the checkpoint has it
    ids = torch.randint(0, 512, (2, 7))
    assert rel_err(logits(loaded, ids), logits(source, ids)) < 0.2


VL_NOT_CONVERTED = ["lm_head", "model.language_model.embed_tokens", "model.visual.merger",
                    "model.visual.deepstack_merger_list", "model.visual.patch_embed", "mlp.gate"]


def test_loads_qwen3_vl_moe_fp8_checkpoint_as_published(tmp_path):
    """Qwen3-VL-MoE in the layout of Qwen's FP8 releases: nested text/vision config with the quantization_config at
    the top, ``model.language_model.*`` / ``model.visual.*`` names, per-expert FP8 experts, bf16 block scales,
    vision-block linears in FP8 too (with bias, widths that are not multiples of 128), mergers kept in bf16."""
    source = tiny_vl_moe(hidden=192, head_dim=64, expert_width=80, vision_mlp=200)
    config = source.config
    dequantized = copy.deepcopy(source)  # the published formula applied to the checkpoint's tensors
    tensors = {}
    for name, t in source.state_dict().items():
        owner = name.rpartition(".")[0]
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            per_expert_fp8(name, t, tensors)
            parts = []
            for e in range(t.shape[0]):
                projs = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
                parts.append(torch.cat([block_dequantize(tensors[f"{owner}.{e}.{p}.weight"],
                                                         tensors[f"{owner}.{e}.{p}.weight_scale_inv"]) for p in projs]))
            dequantized.get_parameter(name).data.copy_(torch.stack(parts))
        elif name.endswith(".weight") and isinstance(source.get_submodule(owner), nn.Linear) and \
                not any(part in owner for part in VL_NOT_CONVERTED):
            tensors[name], tensors[f"{owner}.weight_scale_inv"] = block_quantize(t)
            dequantized.get_parameter(name).data.copy_(block_dequantize(tensors[name],
                                                                        tensors[f"{owner}.weight_scale_inv"]))
        else:
            tensors[name] = t
    assert tensors["model.visual.blocks.1.mlp.linear_fc1.weight_scale_inv"].shape == (2, 2)  # 200 x 144: partial
    assert tensors["model.visual.blocks.1.attn.qkv.weight_scale_inv"].dtype == BF16
    write_sharded(tensors, tmp_path)
    folder_config = copy.deepcopy(config)
    folder_config.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    folder_config.quantization_config = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [128, 128], "modules_to_not_convert": VL_NOT_CONVERTED}
    folder_config.save_pretrained(tmp_path)

    loaded = load_quantized(tmp_path)
    converted = set(loaded.mgpt_quantization.converted)
    assert {"model.visual.blocks.0.attn.qkv", "model.visual.blocks.1.mlp.linear_fc2",
            "model.language_model.layers.1.self_attn.o_proj", "model.language_model.layers.0.mlp.experts"} <= converted
    assert not any(part in name for name in converted for part in VL_NOT_CONVERTED)
    fc1 = loaded.model.visual.blocks[1].mlp.linear_fc1
    assert isinstance(fc1, QuantizedLinear) and fc1.bias is not None and fc1.weight_scale_inv.dtype == F32
    assert torch.equal(fc1.weight_scale_inv, tensors["model.visual.blocks.1.mlp.linear_fc1.weight_scale_inv"].float())
    assert type(loaded.model.visual.merger.linear_fc1) is nn.Linear
    assert loaded.model.visual.merger.linear_fc1.weight.dtype == BF16

    grid = torch.tensor([[1, 4, 6]])  # one image of 4 x 6 patches: 6 tokens after the 2 x 2 merge
    pixels = torch.randn(24, 3 * 2 * 16 * 16, dtype=BF16)
    ids = torch.tensor([[5, 6, 102] + [100] * 6 + [103, 8, 9, 10]])
    inputs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids == 100).long())
    with torch.no_grad():
        got, want, bf16 = (m(**inputs).logits.float() for m in (loaded, dequantized, source))
    # loaded vs the dequantized weights: only the dynamic 1x128 FP8 activation quantization differs
    assert rel_err(got, want) < 0.08  # measured 0.036
    assert rel_err(got, bf16) < 0.15  # measured 0.059


# --------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------
def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def saved_fp8(moe_bf16, tmp_path):
    save_quantized(quantize_(copy.deepcopy(moe_bf16), "fp8_block128"), tmp_path)
    return tmp_path


@pytest.mark.parametrize("changes,message", [
    ({"quant_method": "gptq"}, "quant_method 'gptq'; supported"),
    ({"weight_block_size": [64, 64]}, r"'weight_block_size' must be \[128, 128\]"),
    ({"activation_scheme": "static"}, "only activation_scheme 'dynamic'"),
    ({"quant_method": "mgpt_w4a16", "group_size": 48}, "group_size' must be one of"),
])
def test_bad_quantization_config(saved_fp8, changes, message):
    _edit_config(saved_fp8, **changes)
    with pytest.raises(ValueError, match=message):
        load_quantized(saved_fp8)


def test_bad_tensors(saved_fp8):
    path = str(saved_fp8 / "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.experts.3.gate_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"lacks experts \[3\] of model.layers.1.mlp.experts.\*.gate_proj"):
        load_quantized(saved_fp8)
    tensors["model.layers.1.mlp.experts.3.gate_proj.weight"] = \
        tensors["model.layers.1.mlp.experts.2.gate_proj.weight"].clone()
    tensors["model.layers.0.self_attn.k_proj.weight_scale_inv"] = \
        tensors["model.layers.0.self_attn.k_proj.weight_scale_inv"].to(torch.float64)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.k_proj.weight_scale_inv' must be torch.float32, "
                                         "got torch.float64"):
        load_quantized(saved_fp8)
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        load_quantized(saved_fp8)


def test_save_and_load_errors(moe_bf16, tmp_path):
    with pytest.raises(ValueError, match="not quantized; pass 'config'"):
        save_quantized(copy.deepcopy(moe_bf16), tmp_path)
    model = quantize_(copy.deepcopy(moe_bf16), "int8_w8a8")
    with pytest.raises(ValueError, match="quantized with"):
        save_quantized(model, tmp_path, "fp8_rowwise")
    save_quantized(model, tmp_path / "same", QuantConfig("int8_w8a8", modules_to_not_convert=("lm_head",)))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save_quantized(quantize_(nn.Sequential(nn.Linear(128, 8)), "int8_w8a8"), tmp_path)
    moe_bf16.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no 'quantization_config'"):
        load_quantized(tmp_path)
