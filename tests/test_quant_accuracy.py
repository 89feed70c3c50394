"""accuracy_report and its CLI (mgpt_ops/quant/accuracy.py): every number is recomputed here independently
(transformers' own greedy generate, our own hooks and norms)."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from mgpt_ops.quant.accuracy import accuracy_report, main, tiny_model
from mgpt_ops.quant.modules import QuantizedExperts, QuantizedLinear, quantize_


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def qwen3():
    model_fp = tiny_model("qwen3", dtype=torch.float32)
    return model_fp, quantize_(copy.deepcopy(model_fp), "fp8_rowwise")


def test_report_numbers_are_recomputable(qwen3):
    model_fp, model_q = qwen3
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(0))
    report = accuracy_report(model_fp, model_q, ids, new_tokens=6, verbose=False)
    with torch.no_grad():
        sequence = model_fp.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)
        reference, quantized = model_fp(sequence).logits, None
        seen = {}
        name = "model.layers.1.mlp.down_proj"
        handle = model_q.get_submodule(name).register_forward_hook(
            lambda module, args, out: seen.update(x=args[0], y=out))
        quantized = model_q(sequence).logits
        handle.remove()
        layer_err = rel(seen["y"], model_fp.get_submodule(name)(seen["x"]))
    converted = model_q.mgpt_quantization.converted
    assert list(report.layers) == converted and all(k == "QuantizedLinear" for k, _ in report.layers.values())
    assert report.layers[name][1] == pytest.approx(layer_err, rel=1e-9)
    assert 0 < layer_err < 0.1
    assert report.logit_rel_err == pytest.approx(rel(quantized, reference), rel=1e-9)
    agreed = int((quantized[:, 4:-1].argmax(-1) == sequence[:, 5:]).sum())
    assert (report.tokens_agreed, report.tokens_compared) == (agreed, 12)
    assert report.token_agreement == agreed / 12


def test_identical_models_report_no_error(qwen3, capsys):
    _, model_q = qwen3
    ids = torch.randint(0, 512, (1, 4))
    report = accuracy_report(copy.deepcopy(model_q), model_q, ids, new_tokens=3)
    assert all(err == 0 for _, err in report.layers.values())
    assert report.logit_rel_err == 0 and report.tokens_agreed == report.tokens_compared == 3
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in printed and "greedy-token agreement 3/3 (100.0%)" in printed


def test_moe_report_covers_experts():
    model_fp = tiny_model("qwen3_moe")
    model_q = quantize_(copy.deepcopy(model_fp), "w4a16")
    report = accuracy_report(model_fp, model_q, torch.randint(0, 512, (2, 6)), new_tokens=2, verbose=False)
    experts = {n: e for n, (kind, e) in report.layers.items() if kind == "QuantizedExperts"}
    assert sorted(experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(0 < e < 0.3 for e in experts.values())
    assert isinstance(model_q.get_submodule("model.layers.0.mlp.experts"), QuantizedExperts)


def test_cli(capsys):
    results = main(["--method", "int8_w8a8", "fp8_block128", "--model", "qwen3", "--tokens", "2", "--per-layer"])
    out = capsys.readouterr().out
    assert [(kind, method) for kind, method, _ in results] == [("qwen3", "int8_w8a8"), ("qwen3", "fp8_block128")]
    assert "== qwen3 / int8_w8a8" in out and "greedy agreement" in out
    assert any(line.split()[:3] == ["qwen3", "fp8_block128", "14"] for line in out.splitlines())


def test_cli_as_module():
    done = subprocess.run([sys.executable, "-m", "mgpt_ops.quant.accuracy", "--method", "w4a16", "--model",
                           "qwen3_moe", "--tokens", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert any(line.split()[:3] == ["qwen3_moe", "w4a16", "10"] for line in done.stdout.splitlines())


def test_errors(qwen3):
    model_fp, model_q = qwen3
    ids = torch.randint(0, 512, (1, 4))
    with pytest.raises(ValueError, match=r"'input_ids' must be \[batch, tokens >= 1\]"):
        accuracy_report(model_fp, model_q, ids[0])
    with pytest.raises(ValueError, match="'new_tokens' must be >= 1"):
        accuracy_report(model_fp, model_q, ids, new_tokens=0)
    with pytest.raises(ValueError, match="no quantized modules"):
        accuracy_report(model_fp, model_fp, ids)
    other = copy.deepcopy(model_q)
    other.extra = nn.Sequential(QuantizedLinear.from_linear(nn.Linear(128, 8), model_q.mgpt_quantization.config))
    with pytest.raises(ValueError, match="'extra.0' has no counterpart"):
        accuracy_report(model_fp, other, ids)
