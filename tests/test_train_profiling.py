"""Profiling: FLOP formulas against torch's FlopCounterMode, StepMeter math, NVTX ranges, traces, progress, summary."""

import dataclasses
import io
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

from mgpt_train import profiling
from mgpt_train.model.config import Qwen3VLConfig, TextConfig


def _attention(q, k, v, seq_lens, causal):
    """Per-sample attention with explicit matmuls: q [T, nh, d], k/v [T, nkv, d] (GQA by repeating kv heads)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    outs, start = [], 0
    for s in seq_lens:
        qs, ks, vs = (t[start:start + s].transpose(0, 1) for t in (q, k, v))
        scores = qs @ ks.transpose(1, 2) / qs.shape[-1] ** 0.5
        if causal:
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1).reshape(s, -1))
        start += s
    return torch.cat(outs)


def _counted_lm_flops(text, seq_lens, train_weights=True, input_grad=True) -> int:
    """FlopCounterMode over forward + backward of a decoder LM with the text config's shapes (MoE by gathering
    each expert's rows, as a grouped-GEMM implementation does). ``input_grad``: the input embeddings need a
    gradient (the embedding table or the vision features before them train)."""
    H, nh, nkv, hd = text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim

    def w(*shape):
        return (torch.randn(*shape) / shape[-1] ** 0.5).requires_grad_(train_weights)

    x = torch.randn(sum(seq_lens), H, requires_grad=input_grad)
    with FlopCounterMode(display=False) as counter:
        h = x
        for layer in range(text.num_hidden_layers):
            q = h @ w(nh * hd, H).T
            k, v = h @ w(nkv * hd, H).T, h @ w(nkv * hd, H).T
            att = _attention(q.view(-1, nh, hd), k.view(-1, nkv, hd), v.view(-1, nkv, hd), seq_lens, causal=True)
            h = h + att @ w(H, nh * hd).T
            if text.is_moe_layer(layer):
                probs = (h @ w(text.num_experts, H).T).softmax(-1)
                weight, index = probs.topk(text.top_k, dim=-1)
                out = torch.zeros_like(h)
                for e in range(text.num_experts):
                    rows, slot = (index == e).nonzero(as_tuple=True)
                    xe = h[rows]
                    I = text.moe_intermediate_size
                    ye = (F.silu(xe @ w(I, H).T) * (xe @ w(I, H).T)) @ w(H, I).T
                    out = out.index_add(0, rows, ye * weight[rows, slot, None])
                h = h + out
            else:
                I = text.intermediate_size
                h = h + (F.silu(h @ w(I, H).T) * (h @ w(I, H).T)) @ w(H, I).T
        loss = (h @ w(text.vocab_size, H).T).logsumexp(-1).mean()
        if loss.requires_grad:
            loss.backward()
    return counter.get_total_flops()


def _counted_vision_flops(vision, frames, train_tower=True, train_merger=True) -> int:
    """FlopCounterMode over a Qwen3-VL-like tower: patch embedding, blocks (fused qkv, proj, GELU MLP), per-frame
    bidirectional attention, a merger after the last block and one per DeepStack tap."""
    hid, m2 = vision.hidden_size, vision.spatial_merge_size ** 2

    def w(*shape, trained=train_tower):
        return (torch.randn(*shape) / shape[-1] ** 0.5).requires_grad_(trained)

    def merger(h):
        wide = h.reshape(-1, hid * m2)
        fc1 = w(hid * m2, hid * m2, trained=train_merger)
        return F.gelu(wide @ fc1.T) @ w(vision.out_hidden_size, hid * m2, trained=train_merger).T

    pixels = torch.randn(sum(frames), vision.patch_dim)  # pixels need no gradient
    nh = vision.num_heads
    with FlopCounterMode(display=False) as counter:
        h = pixels @ w(hid, vision.patch_dim).T
        outputs = []
        for block in range(vision.depth):
            q, k, v = (h @ w(3 * hid, hid).T).view(-1, 3, nh, hid // nh).unbind(1)
            h = h + _attention(q, k, v, frames, causal=False) @ w(hid, hid).T
            h = h + F.gelu(h @ w(vision.intermediate_size, hid).T) @ w(hid, vision.intermediate_size).T
            if block in vision.deepstack_visual_indexes:
                outputs.append(merger(h))
        outputs.append(merger(h))
        loss = sum(o.square().mean() for o in outputs)
        if loss.requires_grad:
            loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("preset", ["tiny", "tiny_moe"])
def test_flop_formulas_match_flop_counter(preset):
    torch.manual_seed(0)
    config = Qwen3VLConfig.tiny() if preset == "tiny" else Qwen3VLConfig.tiny_moe()
    seq_lens, grids = [7, 12, 3], [(1, 4, 6), (2, 2, 4)]
    flops = profiling.qwen3_vl_flops(config, seq_lens, grids, causal=False)
    assert flops["language"] == _counted_lm_flops(config.text, seq_lens)
    assert flops["vision"] == _counted_vision_flops(config.vision, [24, 8, 8])
    assert flops["total"] == flops["language"] + flops["vision"]
    # The causal count removes exactly half of the 12 L d s^2 attention term.
    causal = profiling.qwen3_vl_flops(config, seq_lens, grids)["language"]
    text = config.text
    half = 6 * text.num_hidden_layers * text.num_attention_heads * text.head_dim * sum(s * s for s in seq_lens)
    assert flops["language"] - causal == half
    assert profiling.qwen3_vl_flops(config, seq_lens)["vision"] == 0.0  # text-only batch


@pytest.mark.parametrize("trainable", [
    {"vision": False},  # the curriculum's later stages
    {"vision": False, "merger": False},
    {"language": False},
    {"language": False, "vision": False},
    {"language": False, "vision": False, "merger": False},  # forward only
])
def test_flops_with_frozen_parts(trainable):
    torch.manual_seed(0)
    config = Qwen3VLConfig.tiny_moe()
    seq_lens, grids = [9, 5], [(1, 2, 4), (1, 4, 4)]
    tower, merger, language = (trainable.get(p, True) for p in ("vision", "merger", "language"))
    flops = profiling.qwen3_vl_flops(config, seq_lens, grids, causal=False, trainable=trainable)
    # The LM's input embeddings need a gradient when the embedding table or the image features feeding them train.
    assert flops["language"] == _counted_lm_flops(config.text, seq_lens, language, language or tower or merger)
    assert flops["vision"] == _counted_vision_flops(config.vision, [8, 16], tower, merger)
    text_only = profiling.qwen3_vl_flops(config, seq_lens, causal=False, trainable=trainable)["language"]
    assert text_only == _counted_lm_flops(config.text, seq_lens, language, language)
    with pytest.raises(ValueError, match="argument 'trainable' has unknown parts \\['eyes'\\]"):
        profiling.qwen3_vl_flops(config, seq_lens, trainable={"eyes": False})


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_language_flops_on_random_shapes(data):
    kv = data.draw(st.sampled_from([1, 2]), "kv heads")
    experts = data.draw(st.sampled_from([0, 4]), "experts")
    text = dataclasses.replace(
        TextConfig(), hidden_size=data.draw(st.sampled_from([8, 12, 16]), "hidden"), vocab_size=11,
        num_hidden_layers=data.draw(st.integers(1, 2), "layers"), head_dim=4, num_key_value_heads=kv,
        num_attention_heads=kv * data.draw(st.integers(1, 3), "group"), intermediate_size=20,
        num_experts=experts, top_k=data.draw(st.integers(1, 3), "top_k") if experts else 0,
        moe_intermediate_size=6, decoder_sparse_step=data.draw(st.integers(1, 2), "sparse step"))
    seq_lens = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3), "seq_lens")
    config = types.SimpleNamespace(text=text, vision=None)
    assert profiling.qwen3_vl_flops(config, seq_lens, causal=False)["language"] == _counted_lm_flops(text, seq_lens)


def test_active_params_of_the_30b_a3b_shape():
    text = Qwen3VLConfig.qwen3_vl_30b_a3b().text
    n = profiling.lm_active_params(
        hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads, head_dim=text.head_dim, vocab_size=text.vocab_size,
        num_experts=text.num_experts, top_k=text.top_k, moe_intermediate_size=text.moe_intermediate_size)
    # Qwen's model card: 3.3 B activated parameters (it counts the input embedding too: 151,936 x 2,048).
    assert 3.2e9 < n + text.vocab_size * text.hidden_size < 3.4e9


def test_peak_flops_table_and_cpu_measurement():
    assert profiling.peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert profiling.peak_flops_for_name("NVIDIA H200") == 989e12
    assert profiling.peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert profiling.peak_flops_for_name("NVIDIA H100 NVL") == 835e12
    assert profiling.peak_flops_for_name("NVIDIA GeForce RTX 4090") is None
    peak = profiling.device_peak_flops("cpu")
    assert peak > 1e6 and profiling.device_peak_flops("cpu") == peak  # measured once, then cached


def test_run_environment_names_the_peak_and_its_source():
    info = profiling.run_environment("cpu")
    assert info["device"] == {"type": "cpu"} and info["software"]["torch"] == torch.__version__
    assert info["peak_flops"] == {"value": profiling.measure_cpu_matmul_flops(),
                                  "source": "measured: best fp32 512^3 matmul rate in this process"}
    assert profiling.run_environment("cpu", peak_flops=5e12)["peak_flops"]["value"] == 5e12


def test_step_meter_math_and_summary(tmp_path):
    ticks = iter([0.0, 2.0, 10.0, 10.5, 20.0, 20.25])  # steps of 2 s, 0.5 s, 0.25 s
    meter = profiling.StepMeter(peak_flops=1e3, flops_per_token=10.0, clock=lambda: next(ticks))
    for step, (tokens, loss) in enumerate([(100, 3.0), (200, 2.0), (300, 1.5)], start=1):
        meter.start()
        record = meter.stop(step, tokens, loss=torch.tensor(loss), flops=None if step < 3 else 1000.0)
    assert [r.seconds for r in meter.records] == [2.0, 0.5, 0.25]
    assert record.tokens_per_s == 1200.0 and record.mfu(1e3) == 4.0 and record.loss == 1.5
    assert meter.records[1].flops == 2000.0  # flops_per_token x tokens
    summary = meter.summary()  # the first (warm-up) step is left out
    assert summary["measured_steps"] == 2 and summary["mean_step_s"] == 0.375
    assert summary["tokens_per_s"] == 500 / 0.75 and summary["mfu"] == pytest.approx(3000 / 0.75 / 1e3)
    assert (summary["first_loss"], summary["final_loss"]) == (3.0, 1.5)
    table = profiling.summary_table(meter)
    assert "MFU" in table and "400.00 %" in table and "tokens / s" in table
    png = profiling.plot(meter, tmp_path / "plots" / "run.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RuntimeError, match="call start\\(\\) first"):
        meter.stop(4, 1)


def test_plot_without_matplotlib_warns(monkeypatch, tmp_path):
    meter = profiling.StepMeter()
    meter.start()
    meter.stop(1, 10, loss=1.0)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert profiling.plot(meter, tmp_path / "run.png") is None
    assert not (tmp_path / "run.png").exists()


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def test_cpu_peak_memory_is_the_process_high_water_mark():
    # getrusage and /proc account pages slightly differently (a fraction of a percent apart).
    assert profiling.peak_memory_bytes("cpu") == pytest.approx(_vm_hwm_bytes(), rel=0.02)


def test_nvtx_range_calls_push_and_pop(monkeypatch):
    calls = []
    spy = types.SimpleNamespace(push_range=lambda name, domain: calls.append(("push", name, domain)),
                                pop_range=lambda domain: calls.append(("pop", domain)))
    monkeypatch.setattr(profiling, "nvtx", spy)
    profiling.enable_nvtx(False)
    with profiling.nvtx_range(profiling.RANGE_DATA):
        pass
    assert calls == [] and profiling.nvtx_range("a") is profiling.nvtx_range("b")  # one shared no-op
    profiling.enable_nvtx(True)
    try:
        with profiling.nvtx_range(profiling.RANGE_BACKWARD):
            with profiling.nvtx_range(profiling.RANGE_COMMUNICATION):
                pass
        with pytest.raises(KeyError), profiling.nvtx_range(profiling.RANGE_OPTIMIZER):
            raise KeyError("the range is closed on errors too")
    finally:
        profiling.enable_nvtx(False)
    assert calls == [("push", "backward", "mgpt"), ("push", "communication", "mgpt"), ("pop", "mgpt"),
                     ("pop", "mgpt"), ("push", "optimizer", "mgpt"), ("pop", "mgpt")]


def test_nvtx_range_with_the_real_package_on_cpu():
    profiling.enable_nvtx(True)
    try:
        with profiling.nvtx_range(profiling.RANGE_LANGUAGE):
            torch.ones(2).sum()
    finally:
        profiling.enable_nvtx(False)


def test_enabling_nvtx_without_the_package_is_an_error(monkeypatch):
    monkeypatch.setattr(profiling, "nvtx", None)
    with pytest.raises(RuntimeError, match="'nvtx' package is not installed"):
        profiling.enable_nvtx(True)


def _profiled_steps(profiler, steps):
    a = torch.randn(32, 32)
    with profiler:
        for _ in range(steps):
            with torch.profiler.record_function("mgpt_test_step"):
                a @ a
            profiler.step()


def test_trace_written_for_the_active_steps_only(tmp_path):
    profiler = profiling.TraceProfiler(tmp_path / "traces", wait=1, warmup=1, active=2, rank=3)
    _profiled_steps(profiler, 6)
    assert profiler.paths == [tmp_path / "traces" / "trace_rank3_step4.json"]
    events = json.loads(profiler.paths[0].read_text())["traceEvents"]
    assert sum(e.get("name") == "mgpt_test_step" for e in events) == 2

    disabled = profiling.TraceProfiler(tmp_path / "off", enabled=False)
    _profiled_steps(disabled, 6)
    assert disabled.paths == [] and not (tmp_path / "off").exists()


def test_progress_bar_only_on_rank_zero(monkeypatch):
    ticks = iter(float(i) for i in range(100))
    out = io.StringIO()
    bar = profiling.ProgressBar(5, rank=0, stream=out, every=2, clock=lambda: next(ticks))
    for step in range(1, 6):
        bar.update(step, loss=1.0 / step)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    assert "loss 0.5" in lines[0] and "100%" in lines[2] and "eta 0:00:00" in lines[2]

    silent = io.StringIO()
    profiling.ProgressBar(5, rank=1, stream=silent).update(5, loss=1.0)
    monkeypatch.setattr(profiling.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(profiling.dist, "get_rank", lambda: 1)  # the rank comes from the process group
    profiling.ProgressBar(5, stream=silent).update(5, loss=1.0)
    assert silent.getvalue() == ""
