"""The train benchmark family (``bench/train_throughput.py``): it runs end to end, its three contenders train on the
same weights and the same samples, and its full GPU shapes are buildable (no timing assertions).

- ``python -m bench --family train --quick`` writes strict JSON with ours, reference and hf measured for the tiny
  dense and MoE models, their losses and gradient norms within tolerance, and the ratios ours/reference and
  ours/hf; the throughput report derives tokens/s from it.
- The HF inputs are the packed batch, one sample per row: checked token by token, and through HF's own label
  shift (pad one -100 on the right, drop the first), which must give back the packed, pre-shifted labels.
- Loss parity on unit-scale weights (0.02-scale weights make every softmax flat and any model's loss ~ log V):
  ours and HF (its parameters alias ours') against a float64 cross-entropy of HF's logits with the PACKED labels,
  plus the router aux term for MoE.
- The step: AdamW with lr = 0 does its arithmetic (moments written) and leaves the weights bit for bit; the
  reported gradient norm is the float64 norm of the gradients; the gradients are freed.
- The CUDA cases (Qwen3-VL-2B-like 12-layer model and its MoE twin) build on the meta device with HF's parameter
  set, ~8k tokens from 4-8 images of 448-672 px, and a persistent training state that leaves room on one H100.
"""

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bench import __main__ as cli
from bench import runner
from bench import train_throughput as tt
from mgpt_train.model import Qwen3VLConfig, Qwen3VLModel, to_hf_state_dict

CONTENDERS = {"ours", "reference", "hf"}


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _quick_params(moe: bool) -> dict:
    return next(s.params for s in tt.cases(torch.device("cpu"), quick=True) if s.params["moe"] == moe)


def test_quick_run_writes_json_with_three_contenders_and_ratios(tmp_path, device, capsys):
    assert cli.main(["--family", "train", "--quick", "--device", device.type, "--out", str(tmp_path)]) == 0
    assert "tiny_moe" in capsys.readouterr().out.strip().splitlines()[-2]  # the table comes last
    result = _strict_json(tmp_path / f"train_{device.type}.json")
    assert result["schema"] == runner.SCHEMA and result["family"] == "train" and result["complete"] is True
    assert [c["case"] for c in result["cases"]] == ["tiny", "tiny_moe"]
    for case in result["cases"]:
        params = case["params"]
        assert case["status"] == "ok" and set(case["impls"]) == CONTENDERS
        assert params["goal"] is False and params["size"] == "tiny"
        assert 0 < params["label_tokens"] < params["tokens"] <= params["hf_padded_tokens"]
        for label, entry in case["impls"].items():
            assert entry["status"] == "ok", (case["case"], label, entry)
            assert entry["time_ms"] > 0 and entry["peak_mib"] >= 0 and entry["tflop_per_s"] > 0
        assert case["impls"]["reference"]["face"] == "reference" and case["impls"]["ours"]["face"] == "auto"
        comparisons = {c["baseline"]: c for c in case["comparisons"]}
        assert set(comparisons) == {"reference", "hf"} and all(c["ours"] == "ours" for c in comparisons.values())
        for comp in comparisons.values():
            assert set(comp["rel_errors"]) == {"loss", "grad_norm"} and comp["within_tolerance"], comp
            assert comp["time_ratio"] > 0 and comp["memory_ratio"] > 0 and comp["goal_met"] is None
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / f"train_{device.type}.png").exists()
    lines = tt.throughput_lines(result)
    assert sum("tok/s" in line for line in lines) == 6  # one line per contender and case
    assert sum(line.lstrip().startswith("ours/") for line in lines) == 4


def test_hf_inputs_are_the_packed_samples_one_per_row():
    gen = torch.Generator().manual_seed(3)
    image, pad = 262, 257
    lengths = [5, 1, 7]
    samples = [torch.randint(0, 256, (n,), generator=gen) for n in lengths]
    samples[0][1:3] = image  # a 1x2x4 image grid -> 2 merged tokens
    samples[2][2:4] = image
    labels = [torch.where(torch.rand(n, generator=gen) < 0.6, torch.randint(0, 256, (n,), generator=gen), -100)
              for n in lengths]
    for lab in labels:
        lab[-1] = -100  # the packing contract: nothing is predicted from a sample's last token
    batch = {"input_ids": torch.cat(samples), "labels": torch.cat(labels),
             "cu_seqlens": torch.tensor([0, 5, 6, 13], dtype=torch.int32),
             "pixel_values": torch.randn(16, 1536, generator=gen),
             "image_grid_thw": torch.tensor([[1, 2, 4], [1, 2, 4]])}
    inputs = tt.hf_inputs(batch, pad_id=pad, image_token_id=image)
    assert inputs["input_ids"].shape == (3, 7)
    # HF's causal-LM loss: labels padded with one -100 on the right, then shifted left by one
    hf_targets = F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    for row, (ids, lab) in enumerate(zip(samples, labels)):
        n = len(ids)
        assert torch.equal(inputs["input_ids"][row, :n], ids) and (inputs["input_ids"][row, n:] == pad).all()
        assert inputs["attention_mask"][row].tolist() == [1] * n + [0] * (7 - n)
        assert inputs["mm_token_type_ids"][row].tolist() == [int(t == image) for t in ids.tolist()] + [0] * (7 - n)
        assert torch.equal(hf_targets[row, :n], lab) and (hf_targets[row, n:] == -100).all()
    assert inputs["pixel_values"] is batch["pixel_values"] and torch.equal(inputs["image_grid_thw"],
                                                                           batch["image_grid_thw"])
    text_only = dict(batch, pixel_values=torch.zeros(0, 1536), image_grid_thw=torch.zeros(0, 3, dtype=torch.int64))
    assert "pixel_values" not in tt.hf_inputs(text_only, pad_id=pad, image_token_id=image)


def unit_scale_(model: torch.nn.Module, seed: int) -> None:
    """Matrices (experts: per [out, in] slice) ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), other vectors
    ~ N(0, 0.1^2), the vision position table ~ N(0, 1); in place (HF's aliasing parameters see the same values)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen).to(p.device)
            if "pos_embed" in name:
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


@pytest.mark.parametrize("moe", [False, True])
def test_ours_and_hf_losses_match_float64_cross_entropy(moe, device):
    params = _quick_params(moe)
    config = tt.model_config(params)
    batch = tt.packed_batch(params)
    ours = Qwen3VLModel(config).to(device)
    hf = tt.hf_model_sharing_weights(ours, config, "sdpa", torch.float32, device)
    unit_scale_(ours, seed=7)
    ours_storage = {p.data_ptr() for p in ours.parameters()}
    assert {p.data_ptr() for p in hf.parameters()} <= ours_storage  # one copy of the weights
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    inputs = {k: v.to(device) for k, v in tt.hf_inputs(batch, tt.ByteTokenizer().pad_id,
                                                        config.image_token_id).items()}
    with torch.no_grad():
        out = hf(**inputs, **({"output_router_logits": True} if moe else {}))
        ours_loss = ours(on_device)["loss"]
    # float64 statement: HF's logit at (row s, position j) predicts the packed label at cu_seqlens[s] + j
    bounds = batch["cu_seqlens"].tolist()
    rows = torch.cat([out.logits[s, :end - start] for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))])
    expected = F.cross_entropy(rows.double(), on_device["labels"], ignore_index=-100)
    if moe:
        expected = expected + config.text.router_aux_loss_coef * out.aux_loss.double()
    # sensitive: the logits are far from flat, and the same labels one position off give another loss
    assert rows.std(dim=-1).mean() > 0.5
    off_by_one = F.cross_entropy(rows[1:].double(), on_device["labels"][:-1], ignore_index=-100)
    assert abs(off_by_one.item() - expected.item()) > 1e-2 * expected.item()
    assert abs(ours_loss.item() - expected.item()) < 1e-5 * expected.item()
    assert abs(out.loss.item() - expected.item()) < 1e-5 * expected.item()


def test_train_step_runs_adamw_without_moving_weights(device):
    params = _quick_params(moe=True)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tt.packed_batch(params).items()}
    ours = Qwen3VLModel(tt.model_config(params)).to(device)
    weights = list(ours.parameters())
    ours(batch)["loss"].backward()
    expected_norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in weights))
    ours.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in weights]
    optimizer = tt.adamw(weights, device)
    out = tt.train_step(lambda: ours(batch)["loss"], weights, optimizer)()
    assert set(out) == {"loss", "grad_norm"} and math.isfinite(out["loss"].item())
    assert abs(out["grad_norm"].item() - expected_norm) < 1e-5 * expected_norm
    assert all(torch.equal(p, b) for p, b in zip(weights, before)) and all(p.grad is None for p in weights)
    states = [optimizer.state[p] for p in weights]
    assert all(int(s["step"]) == 1 for s in states) and any(s["exp_avg_sq"].abs().sum() > 0 for s in states)


def test_missing_transformers_leaves_ours_and_reference(monkeypatch):
    monkeypatch.setattr(tt, "HF_CLASSES", {False: (None, "missing (test)"), True: (None, "missing (test)")})
    params = _quick_params(moe=False)
    setup = tt.setup("tiny", params, torch.device("cpu"))
    assert setup.impls["hf"].fn is None and "missing (test)" in setup.impls["hf"].unavailable
    assert setup.impls["ours"].fn is not None and setup.impls["reference"].fn is not None


def test_gpu_cases_build_on_the_meta_device():
    quick = tt.cases(torch.device("cuda"), quick=True)  # the GPU smoke run: tiny models in bf16, no goal
    assert [(s.name, s.params["dtype"], s.params["goal"]) for s in quick] == [("tiny", "bf16", False),
                                                                             ("tiny_moe", "bf16", False)]
    specs = tt.cases(torch.device("cuda"), quick=False)
    assert [s.name for s in specs] == ["mid", "mid_moe"]
    meta = torch.device("meta")
    for spec in specs:
        params = spec.params
        assert params["dtype"] == "bf16" and params["goal"] is True and params["hf_attn"] in ("sdpa",
                                                                                              "flash_attention_2")
        config = tt.model_config(params)
        assert Qwen3VLConfig.from_hf(config.to_hf()) == config and config.is_moe == params["moe"]
        assert config.text.vocab_size == 151_936 and config.text.hidden_size == 2048
        assert 4 <= params["images"] <= 8 and 7_000 <= params["tokens"] <= 9_000
        assert all(448 <= side <= 672 for size in tt.MID_IMAGES for side in size)
        inputs = tt.hf_inputs(tt.packed_batch(params), tt.ByteTokenizer().pad_id, config.image_token_id)
        assert int(inputs["attention_mask"].sum()) == params["tokens"]
        assert int((inputs["labels"] != -100).sum()) == params["label_tokens"]
        assert inputs["input_ids"].numel() == params["hf_padded_tokens"]
        with meta:
            ours = Qwen3VLModel(config).to(torch.bfloat16)
        hf = tt.hf_model_sharing_weights(ours, config, params["hf_attn"], torch.bfloat16, meta)
        hf_shapes = {name: tuple(p.shape) for name, p in hf.state_dict().items()}
        assert hf_shapes == {name: tuple(t.shape) for name, t in to_hf_state_dict(ours).items()}
        assert sum(p.numel() for p in hf.parameters()) == params["parameters"]
        # bf16 weights (shared) + one gradient set + AdamW's two moments for each of the two optimizers
        state_gib = params["parameters"] * (2 + 2 + 2 * 2 * 2) / 2**30
        assert state_gib < 40, f"{spec.name}: {state_gib:.1f} GiB of training state leaves too little of 80 GiB"


def test_throughput_report_derives_tokens_per_second():
    def entry(role, ms, mib):
        return {"role": role, "status": "ok", "time_ms": ms, "peak_mib": mib}

    case = {"case": "mid", "shape": "s", "params": {"tokens": 8000, "label_tokens": 2000, "hf_padded_tokens": 9000},
            "impls": {"ours": dict(entry("ours", 400.0, 100.0), tflop_per_s=494.5),
                      "hf": entry("baseline", 600.0, 400.0),
                      "reference": {"role": "baseline", "status": "error", "reason": "boom"}},
            "comparisons": [{"ours": "ours", "baseline": "hf", "time_ratio": 400 / 600, "memory_ratio": 0.25,
                             "max_rel_err": 1e-3, "goal_met": False},
                            {"ours": "ours", "baseline": "reference", "time_ratio": None, "memory_ratio": None,
                             "max_rel_err": "inf", "goal_met": None}]}
    result = {"device_type": "cuda", "env": {"device": {"name": "NVIDIA H100 80GB HBM3"}}, "cases": [case]}
    ours, hf, reference, ratio, no_ratio = tt.throughput_lines(result)[2:7]
    assert "20000 tok/s" in ours and "5000 label tok/s" in ours and "100 MiB" in ours
    assert "MFU 50.0%" in ours  # 494.5 of the H100 SXM's 989 dense bf16 TFLOP/s
    assert "13333 tok/s" in hf and "MFU" not in hf and "error: boom" in reference
    assert "1.50x tokens/s" in ratio and "memory 0.25" in ratio and ratio.endswith("MISSED")
    assert "no time ratio" in no_ratio and "err inf" in no_ratio and no_ratio.endswith("goal -")
