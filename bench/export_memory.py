"""Peak CPU memory of writing a Hugging Face folder from a training checkpoint: the streamed export
(``mgpt_train.export.export_checkpoint``, one safetensors file of at most ``max_shard_bytes`` in memory at a time)
against the whole-model gather it replaced (DCP-load every tensor into one plain model, then
``huggingface_hub.save_torch_state_dict``), side by side on the same checkpoint.

    python -m bench.export_memory [--layers 12] [--hidden 1024] [--shard-mb 5000 100] [--out bench/out]

Each export runs in a fresh Python process; its peak is the kernel's RSS high-water mark (VmHWM, reset through
/proc/self/clear_refs just before the export, as ``bench/measure.py`` does) minus the RSS at that moment (model
code imported, nothing loaded). The folders are compared tensor by tensor (they must be equal).
Writes ``DIR/export_memory_cpu.json`` (machine, versions, commit, model size, peaks, ratios) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.env import capture
from bench.report import write_json

_CHILD = r'''
import json, sys, time
from pathlib import Path
import torch
from mgpt_train import export
from mgpt_train.config import config_from_dict
from mgpt_train.model import Qwen3VLModel, to_hf_state_dict

spec = json.loads(sys.argv[1])
cfg = config_from_dict(spec["config"])

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

# Reset the RSS high-water mark (imports peak far above the steady RSS), as bench/measure.py does.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, start = status_kib("VmRSS"), time.perf_counter()
if spec["mode"] == "streamed":
    export.export_checkpoint(spec["step"], spec["out"], cfg, max_shard_bytes=spec["shard_bytes"], log=None)
else:  # the whole-model gather: every tensor in one plain model, then one save call
    import torch.distributed.checkpoint as dcp
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    config = export.run_model_config(cfg, export.run_tokenizer(cfg))
    model = Qwen3VLModel(config)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=spec["step"], no_dist=True)
    set_model_state_dict(model, state["model"])
    tensors = {k: v.detach() for k, v in to_hf_state_dict(model).items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    Path(spec["out"]).mkdir(parents=True)
    save_torch_state_dict(tensors, spec["out"], max_shard_size=spec["shard_bytes"], metadata={"format": "pt"})
seconds = time.perf_counter() - start
print(json.dumps({"peak_mib": (status_kib("VmHWM") - before) / 1024, "seconds": seconds}))
'''


def _save_checkpoint(cfg, folder: Path) -> tuple[Path, int]:
    from mgpt_train import checkpoint
    from mgpt_train.export import run_model_config, run_tokenizer
    from mgpt_train.model import Qwen3VLModel

    model = Qwen3VLModel(run_model_config(cfg, run_tokenizer(cfg)))
    checkpoint.save(1, model, None, {"train_config": cfg.to_dict()}, folder)
    return checkpoint.step_dir(folder, 1), sum(p.numel() for p in model.parameters())


def _run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"export child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def main(argv=None) -> int:
    from mgpt_train.config import load_config

    parser = argparse.ArgumentParser(prog="python -m bench.export_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shard-mb", type=float, nargs="+", default=[5000.0, 100.0])
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    heads = args.hidden // 128
    cfg = load_config(None, [
        f'--model.text={{"hidden_size": {args.hidden}, "intermediate_size": {4 * args.hidden}, '
        f'"num_hidden_layers": {args.layers}, "num_attention_heads": {heads}, '
        f'"num_key_value_heads": {max(1, heads // 2)}, "head_dim": 128, "mrope_section": [24, 20, 20]}}',
        f'--model.vision={{"out_hidden_size": {args.hidden}}}'])
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        step, params = _save_checkpoint(cfg, Path(tmp) / "checkpoints")
        for shard_mb in args.shard_mb:
            shard_bytes = int(shard_mb * 1e6)
            runs = {}
            for mode in ("streamed", "gather"):
                out = Path(tmp) / f"{mode}_{shard_mb:g}"
                runs[mode] = _run_child({"mode": mode, "config": cfg.to_dict(), "step": str(step), "out": str(out),
                                         "shard_bytes": shard_bytes})
            ours, base = _tensors(Path(tmp) / f"streamed_{shard_mb:g}"), _tensors(Path(tmp) / f"gather_{shard_mb:g}")
            equal = ours.keys() == base.keys() and all(torch.equal(ours[k], base[k]) for k in ours)
            cases.append({"shard_mb": shard_mb, "files": len(list((Path(tmp) / f"streamed_{shard_mb:g}")
                                                                  .glob("*.safetensors"))),
                          "streamed": runs["streamed"], "gather": runs["gather"], "folders_equal": equal,
                          "peak_ratio": runs["streamed"]["peak_mib"] / runs["gather"]["peak_mib"]})
    result = {"benchmark": "export_memory", **capture(torch.device("cpu")),
              "params": {"parameters": params, "fp32_mib": params * 4 / 2**20, "layers": args.layers,
                         "hidden": args.hidden},
              "method": "fresh process per export: VmHWM (reset by clear_refs) - VmRSS before the export", "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out / "export_memory_cpu.json")
    print(f"model: {params / 1e6:.0f} M parameters, {params * 4 / 2**20:.0f} MiB in fp32")
    print(f"{'file limit MB':>13} {'files':>5} {'streamed MiB':>12} {'gather MiB':>10} {'ratio':>6} {'equal':>5}")
    for case in cases:
        print(f"{case['shard_mb']:>13g} {case['files']:>5} {case['streamed']['peak_mib']:>12.0f} "
              f"{case['gather']['peak_mib']:>10.0f} {case['peak_ratio']:>6.2f} {str(case['folders_equal']):>5}")
    return 0 if all(case["folders_equal"] for case in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
