"""quantize_ and the quantized modules (mgpt_ops/quant/modules.py).

Layers are checked against an independent float64 reference: the module's stored tensors dequantized by the
published formulas (x ≈ q * scale per channel / per 128x128 block; int4 codes unpacked bit by bit) times the
activation fake-quantized by the method's formula. Whole tiny transformers models check the wiring (right modules
replaced, filters respected, logits near the float model within per-method tolerances measured on these models).
"""

import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from conftest import DEVICE, rel_err
from mgpt_ops import use_backend
from mgpt_ops.quant import modules
from mgpt_ops.quant.accuracy import tiny_model
from mgpt_ops.quant.block_gemm import grouped_block_scaled_mm
from mgpt_ops.quant.modules import (METHODS, QuantConfig, QuantizedExperts, QuantizedLinear, quantize_)

FP8 = torch.float8_e4m3fn
# Logit relative error of the tiny fp32 models (hidden 128, 2 layers, random weights of std 0.05) against the
# float model, worst of seeds 0-2: fp8 0.106, int8 0.042, int4 0.30 -- the bounds leave a factor ~2.
MODEL_TOL = {"fp8_rowwise": 0.2, "fp8_block128": 0.2, "int8_w8a8": 0.1, "w4a16": 0.5}


# --------------------------------------------------------------------------------------------------------
# independent float64 reference
# --------------------------------------------------------------------------------------------------------
def dequant_weight(method: str, t: dict, n: int, k: int, group: int = 128) -> torch.Tensor:
    if method in ("fp8_rowwise", "int8_w8a8"):
        return t["weight"].double() * t["weight_scale"].double()
    if method == "fp8_block128":
        s = t["weight_scale_inv"].double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        return t["weight"].double() * s
    words = t["qweight"].to(torch.int64)
    codes = torch.stack([(words >> (4 * j)) & 0xF for j in range(8)], dim=-1).reshape(n, k).double()
    zeros = t["zeros"].double().repeat_interleave(group, 1) if "zeros" in t else 8.0
    return (codes - zeros) * t["scales"].double().repeat_interleave(group, 1)


def fake_quant_activation(method: str, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> dequant(quant(x)) in float64 by the method's dynamic activation formula, with the scale
    arithmetic the quantizers document (fp32: scale = amax * fp32(1 / QMAX), q = x / scale), so that the
    reference rounds exactly as the op does."""
    if method == "w4a16":
        return x.double()
    x, (m, k) = x.float(), x.shape
    if method == "fp8_block128":
        groups = math.ceil(x.shape[1] / 128)
        x = nn.functional.pad(x, (0, groups * 128 - x.shape[1])).view(x.shape[0], groups, 128)
    qmax = 127.0 if method == "int8_w8a8" else 448.0
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) * torch.tensor(1 / qmax, dtype=torch.float32)
    y = x / s
    q = torch.round(y).clamp(-qmax, qmax) if method == "int8_w8a8" else y.clamp(-qmax, qmax).to(FP8)
    return (q.double() * s.double()).reshape(m, -1)[:, :k]


def reference_linear(method: str, module: QuantizedLinear, x: torch.Tensor, group: int = 128) -> torch.Tensor:
    w = dequant_weight(method, module.quantized_tensors(), module.out_features, module.in_features, group)
    out = fake_quant_activation(method, x.reshape(-1, x.shape[-1])) @ w.T
    if module.bias is not None:
        out = out + module.bias.double()
    return out.reshape(*x.shape[:-1], -1)


def config_of(method: str, **kw) -> QuantConfig:
    return QuantConfig(method, group_size=64, **kw) if method == "w4a16" else QuantConfig(method, **kw)


# --------------------------------------------------------------------------------------------------------
# QuantizedLinear
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("in_features,out_features,bias", [(192, 200, True), (64, 33, False)])
def test_linear_matches_float64_reference(method, in_features, out_features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias).to(DEVICE)
    q = QuantizedLinear.from_linear(linear, config_of(method))
    x = torch.randn(3, 5, in_features, device=DEVICE)
    with torch.no_grad():
        out = q(x)
        reference = linear(x)
    assert out.shape == (3, 5, out_features) and out.dtype == x.dtype
    # the stored tensors represent the weight (fp8 ~3 mantissa bits, int8, int4 in groups of 64)
    w_hat = dequant_weight(method, q.quantized_tensors(), out_features, in_features, 64)
    assert rel_err(w_hat, linear.weight) < {"int8_w8a8": 0.01, "w4a16": 0.1}.get(method, 0.04)
    # the forward computes dequant(activation) @ dequant(weight).T + bias (fp32 output rounding)
    assert rel_err(out, reference_linear(method, q, x, 64)) < 1e-5
    # and is close to the float layer
    assert rel_err(out, reference) < {"int8_w8a8": 0.02, "w4a16": 0.15}.get(method, 0.08)


@settings(max_examples=12, deadline=None)
@given(method=st.sampled_from(METHODS), group=st.sampled_from([32, 64, 128]), groups=st.integers(1, 3),
       extra_k=st.integers(0, 31), n=st.integers(1, 150), m=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_linear_random_shapes(method, group, groups, extra_k, n, m, seed):
    k = group * groups + (0 if method == "w4a16" else extra_k)  # int4 groups must divide K; others take any K
    torch.manual_seed(seed)
    config = QuantConfig(method, group_size=group) if method == "w4a16" else QuantConfig(method)
    q = QuantizedLinear.from_linear(nn.Linear(k, n).to(DEVICE), config)
    x = torch.randn(m, k, device=DEVICE)
    with torch.no_grad():
        assert rel_err(q(x), reference_linear(method, q, x, group)) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_linear_bf16_and_extra_repr(method):
    torch.manual_seed(1)
    linear = nn.Linear(128, 96, bias=True, dtype=torch.bfloat16, device=DEVICE)
    q = QuantizedLinear.from_linear(linear, QuantConfig(method))
    x = torch.randn(7, 128, dtype=torch.bfloat16, device=DEVICE)
    with torch.no_grad():
        out = q(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference_linear(method, q, x)) < 5e-3  # bf16 output rounding
    text = repr(q)
    assert f"method={method}" in text and "in_features=128, out_features=96, bias=True" in text
    assert ("qweight=int32[96, 16]" if method == "w4a16" else "weight=") in text
    assert not list(q.parameters())  # inference only: buffers


@pytest.mark.parametrize("method", METHODS)
def test_linear_compiles_without_graph_breaks(method):
    torch.manual_seed(2)
    q = QuantizedLinear.from_linear(nn.Linear(128, 64).to(DEVICE), QuantConfig(method))
    x = torch.randn(4, 128, device=DEVICE)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), q(x))


def test_linear_rejects_bad_input():
    q = QuantizedLinear.from_linear(nn.Linear(128, 64).to(DEVICE), QuantConfig("fp8_rowwise"))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 128\]"):
        q(torch.randn(4, 96, device=DEVICE))
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        q(torch.randn(4, 128, device=DEVICE, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------
# QuantizedExperts
# --------------------------------------------------------------------------------------------------------
def experts_config() -> Qwen3MoeConfig:
    config = Qwen3MoeConfig(num_experts=4, hidden_size=192, moe_intermediate_size=64, hidden_act="silu")
    config._experts_implementation = "eager"  # transformers' per-expert loop: the plain formula
    return config


@pytest.mark.parametrize("method", METHODS)
def test_experts_match_float64_reference(method, monkeypatch):
    grouped_calls = []
    def counting(*args, **kwargs):
        grouped_calls.append(args[4].tolist())  # the offsets
        return grouped_block_scaled_mm(*args, **kwargs)

    monkeypatch.setattr(modules, "grouped_block_scaled_mm", counting)
    torch.manual_seed(3)
    experts = Qwen3MoeExperts(experts_config()).to(DEVICE)
    nn.init.normal_(experts.gate_up_proj, std=0.05)
    nn.init.normal_(experts.down_proj, std=0.05)
    q = QuantizedExperts.from_fused(experts, config_of(method))
    tokens, e = 9, 4
    hidden = torch.randn(tokens, 192, device=DEVICE)
    top_k_index = torch.tensor([[0, 2], [2, 0], [1, 2], [0, e], [2, 1], [0, 1], [e, 2], [1, 0], [2, 0]],
                               device=DEVICE)  # expert 3 gets no token; index E = "no expert" (contributes 0)
    top_k_weights = torch.rand(tokens, 2, device=DEVICE)
    with torch.no_grad():
        out = q(hidden, top_k_index, top_k_weights)
        # transformers' experts as a second reference; before 5.19 they reject the "no expert" index E, whose
        # contribution is zero, so they get expert 0 with weight 0 there
        no_expert = top_k_index == e
        hf = experts(hidden, top_k_index.masked_fill(no_expert, 0), top_k_weights.masked_fill(no_expert, 0.0))
    reference = torch.zeros(tokens, 192, dtype=torch.float64, device=DEVICE)
    w = {name: [dequant_weight(method, getattr(q, name).tensors(i), *shape, 64) for i in range(e)]
         for name, shape in QuantizedExperts.shapes(192, 64).items()}
    for t in range(tokens):
        for j in range(2):
            i = int(top_k_index[t, j])
            if i == e:
                continue
            x = fake_quant_activation(method, hidden[t:t + 1])
            h = nn.functional.silu(x @ w["gate_proj"][i].T) * (x @ w["up_proj"][i].T)
            h = fake_quant_activation(method, h.float())  # the module quantizes its fp32 intermediate
            reference[t] += float(top_k_weights[t, j]) * (h @ w["down_proj"][i].T)[0]
    assert rel_err(out, reference) < (1e-5 if method == "w4a16" else 3e-3)
    assert rel_err(out, hf) < {"int8_w8a8": 0.03, "w4a16": 0.2}.get(method, 0.1)  # same routing as transformers
    assert "num_experts=4, hidden_dim=192, intermediate_dim=64" in repr(q)
    # fp8_block128 runs each projection as one grouped GEMM over the tokens sorted by expert (16 routed slots)
    assert grouped_calls == ([[0, 6, 10, 16, 16]] * 3 if method == "fp8_block128" else [])


# --------------------------------------------------------------------------------------------------------
# quantize_ on tiny transformers models
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    return {kind: tiny_model(kind, dtype=torch.float32).to(DEVICE) for kind in ("qwen3", "qwen3_moe")}


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("method", METHODS)
def test_quantize_model_replaces_modules_and_logits_close(models, kind, method):
    model_fp = models[kind]
    model_q = quantize_(copy.deepcopy(model_fp), method)
    linears = {n for n, m in model_fp.named_modules() if isinstance(m, nn.Linear)}
    expected = {n for n in linears if n != "lm_head"}
    if kind == "qwen3_moe":
        expected |= {f"model.layers.{i}.mlp.experts" for i in range(2)}
    modules = dict(model_q.named_modules())
    assert set(model_q.mgpt_quantization.converted) == expected
    assert all(isinstance(modules[n], QuantizedExperts if n.endswith("experts") else QuantizedLinear)
               for n in expected)
    assert type(modules["lm_head"]) is nn.Linear and type(modules["model.embed_tokens"]) is nn.Embedding
    assert model_q.mgpt_quantization.not_converted == ["model.embed_tokens", "lm_head"]
    assert model_q.mgpt_quantization.skipped == {}
    ids = torch.randint(0, 512, (2, 11), device=DEVICE)
    with torch.no_grad():
        err = rel_err(model_q(ids).logits, model_fp(ids).logits)
    assert 0 < err < MODEL_TOL[method]


@pytest.mark.parametrize("kind,method", [("qwen3", m) for m in METHODS] + [("qwen3_moe", "w4a16")])
def test_quantized_model_equals_float_model_with_dequantized_weights(models, kind, method):
    """The wiring, exactly: the float model whose converted layers compute the float64 reference (dequantized
    weight, fake-quantized input) gives the quantized model's logits (the MoE case only for w4a16, which
    quantizes no activation inside the experts, so the float experts with dequantized weights are its reference)."""
    model_q = quantize_(copy.deepcopy(models[kind]), config_of(method))
    model_ref = copy.deepcopy(models[kind])
    for name in model_q.mgpt_quantization.converted:
        q, ref = model_q.get_submodule(name), model_ref.get_submodule(name)
        if isinstance(q, QuantizedExperts):
            w = {p: torch.stack([dequant_weight(method, getattr(q, p).tensors(i), *shape, 64)
                                 for i in range(q.num_experts)]).float()
                 for p, shape in QuantizedExperts.shapes(q.hidden_dim, q.intermediate_dim).items()}
            ref.gate_up_proj.data = torch.cat([w["gate_proj"], w["up_proj"]], dim=1)
            ref.down_proj.data = w["down_proj"]
            continue
        # the layer computes the float64 reference (cast to the model's fp32) instead of its float weight
        ref.register_forward_hook(lambda module, args, out, q=q: reference_linear(method, q, args[0], 64).float())
    ids = torch.randint(0, 512, (2, 11), device=DEVICE)
    # the reference faces: a faster face's fp32 accumulation could flip one fp8 rounding, which then cascades
    with torch.no_grad(), use_backend("reference"):
        assert rel_err(model_q(ids).logits, model_ref(ids).logits) < 1e-5


def test_filter_fn_and_modules_to_not_convert(models):
    model = quantize_(copy.deepcopy(models["qwen3_moe"]),
                      QuantConfig("int8_w8a8", modules_to_not_convert=("self_attn.o_proj", "lm_head")),
                      filter_fn=lambda module, name: not name.startswith("model.layers.1."))
    state = model.mgpt_quantization
    modules = dict(model.named_modules())
    assert type(modules["model.layers.0.self_attn.o_proj"]) is nn.Linear
    assert isinstance(modules["model.layers.0.self_attn.q_proj"], QuantizedLinear)
    assert isinstance(modules["model.layers.0.mlp.experts"], QuantizedExperts)
    assert type(modules["model.layers.1.self_attn.q_proj"]) is nn.Linear
    assert type(modules["model.layers.1.mlp.experts"]) is Qwen3MoeExperts
    assert state.skipped["model.layers.1.mlp.experts"] == "filter_fn returned False"
    assert "model.layers.0.self_attn.o_proj" in state.not_converted and "lm_head" in state.not_converted
    assert "model.embed_tokens" not in state.not_converted  # the given list replaces the default one


def test_incompatible_shapes_are_skipped_or_rejected():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64)).to(DEVICE)  # 96 % 64 != 0
    skipped = quantize_(copy.deepcopy(model), QuantConfig("w4a16", group_size=64))
    assert isinstance(skipped[0], QuantizedLinear) and type(skipped[2]) is nn.Linear
    assert skipped.mgpt_quantization.skipped == {"2": "K=96 is not divisible by group_size=64"}
    with pytest.raises(ValueError, match=r"module '2' cannot be quantized with 'w4a16': K=96 is not divisible"):
        quantize_(copy.deepcopy(model), QuantConfig("w4a16", group_size=64, skip_incompatible=False))
    x = torch.randn(3, 128, device=DEVICE)
    with torch.no_grad():
        assert rel_err(skipped(x), model(x)) < 0.1


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown method 'fp4'"):
        QuantConfig("fp4")
    with pytest.raises(ValueError, match="unknown method"):
        quantize_(nn.Linear(128, 8), "int4")
    with pytest.raises(ValueError, match="group_size' must be one of"):
        QuantConfig("w4a16", group_size=48)
    with pytest.raises(ValueError, match="apply to method 'w4a16' only"):
        QuantConfig("fp8_rowwise", group_size=64)
    with pytest.raises(TypeError, match="'symmetric' must be a bool"):
        QuantConfig("w4a16", symmetric="yes")
    with pytest.raises(TypeError, match="modules_to_not_convert"):
        QuantConfig("fp8_rowwise", modules_to_not_convert="lm_head")
    with pytest.raises(TypeError, match="'config' must be a method name"):
        quantize_(nn.Linear(128, 8), {"method": "fp8_rowwise"})
    with pytest.raises(TypeError, match="'model' is itself a layer"):
        quantize_(nn.Linear(128, 8), "fp8_rowwise")
    model = quantize_(nn.Sequential(nn.Linear(128, 8)), "fp8_rowwise")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, "fp8_rowwise")
