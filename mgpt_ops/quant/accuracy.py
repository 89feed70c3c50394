"""How much a quantized model deviates from its high-precision original.

``accuracy_report(model_fp, model_q, input_ids)`` measures

* per layer: the relative error ``||y_q - y_fp|| / ||y_fp||`` of every quantized module's output against the SAME
  module of ``model_fp`` run on the SAME inputs (the inputs the quantized model actually feeds it, captured by
  forward hooks), i.e. the error the layer itself adds, not the error it inherits;
* end to end: ``model_fp`` greedily continues ``input_ids`` by ``new_tokens`` tokens; both models then score
  that sequence: the relative error of all logits, and the greedy-token agreement -- at how many of the
  generated positions the quantized model's argmax equals the token the reference chose (teacher-forced, so one
  early disagreement does not decide every later position).

CLI: ``python -m mgpt_ops.quant.accuracy [--method fp8_rowwise ...] [--model qwen3 qwen3_moe] [--per-layer]``
builds tiny random Qwen3 / Qwen3-MoE models with transformers (fixed seed, no downloads) in bf16, quantizes a copy
with each method and prints one summary table (and, with ``--per-layer``, every report).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch
from torch import nn

from mgpt_ops.quant.modules import METHODS, QuantizedExperts, QuantizedLinear, quantize_


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


@dataclass
class AccuracyReport:
    layers: dict[str, tuple[str, float]]  # module name -> (kind, output relative error)
    logit_rel_err: float
    tokens_agreed: int
    tokens_compared: int

    @property
    def token_agreement(self) -> float:
        return self.tokens_agreed / max(self.tokens_compared, 1)

    def table(self) -> str:
        width = max([len("layer")] + [len(name) for name in self.layers])
        lines = [f"{'layer':<{width}}  {'kind':<16}  output rel err", "-" * (width + 34)]
        lines += [f"{name:<{width}}  {kind:<16}  {err:.3e}" for name, (kind, err) in self.layers.items()]
        lines.append(f"end to end: logits rel err {self.logit_rel_err:.3e}, greedy-token agreement "
                     f"{self.tokens_agreed}/{self.tokens_compared} ({100 * self.token_agreement:.1f}%)")
        return "\n".join(lines)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def greedy_continuation(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """input_ids [B, P] -> [B, P + new_tokens] by argmax decoding (full recompute per step: small models)."""
    ids = input_ids
    for _ in range(new_tokens):
        ids = torch.cat([ids, _logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def accuracy_report(model_fp: nn.Module, model_q: nn.Module, input_ids: torch.Tensor, *, new_tokens: int = 16,
                    verbose: bool = True) -> AccuracyReport:
    """Per-layer and end-to-end error of ``model_q`` against ``model_fp`` (module docstring); prints the table
    when ``verbose``. Both models must take ``input_ids`` and return ``.logits``; quantized modules of
    ``model_q`` are matched to ``model_fp``'s modules by qualified name."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"mgpt.accuracy_report: 'input_ids' must be [batch, tokens >= 1], got {list(input_ids.shape)}")
    if new_tokens < 1:
        raise ValueError(f"mgpt.accuracy_report: 'new_tokens' must be >= 1, got {new_tokens}")
    fp_modules = dict(model_fp.named_modules())
    layers: dict[str, tuple[str, float]] = {}
    handles = []

    def compare(name: str):
        def hook(module, args, kwargs, output):
            reference = fp_modules[name](*args, **kwargs)
            layers[name] = (type(module).__name__, relative_error(output, reference))
        return hook

    for name, module in model_q.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedExperts)):
            if name not in fp_modules:
                raise ValueError(f"mgpt.accuracy_report: quantized module '{name}' has no counterpart in model_fp")
            handles.append(module.register_forward_hook(compare(name), with_kwargs=True))
    if not handles:
        raise ValueError("mgpt.accuracy_report: 'model_q' has no quantized modules (call quantize_ first)")
    sequence = greedy_continuation(model_fp, input_ids, new_tokens)
    reference = _logits(model_fp, sequence)
    try:
        quantized = _logits(model_q, sequence)
    finally:
        for handle in handles:
            handle.remove()
    prompt = input_ids.shape[1]
    # Position t predicts token t + 1: the generated tokens are predicted at positions prompt-1 .. end-2.
    predicted = quantized[:, prompt - 1:-1].argmax(-1)
    agreed = int((predicted == sequence[:, prompt:]).sum())
    report = AccuracyReport(layers, relative_error(quantized.float(), reference.float()), agreed, predicted.numel())
    if verbose:
        print(report.table())
    return report


# ------------------------------------------------------------------------------------------------------------
# CLI: tiny random models
# ------------------------------------------------------------------------------------------------------------
def tiny_model(kind: str, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides) -> nn.Module:
    """A 2-layer Qwen3 ("qwen3") or Qwen3-MoE ("qwen3_moe", 4 experts, top-2) with hidden size 128, random
    weights from ``seed`` (initializer_range 0.05 so the logits are not flat); ``overrides``: config fields."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=256, initializer_range=0.05, tie_word_embeddings=False)
    common.update(overrides)
    torch.manual_seed(seed)
    if kind == "qwen3":
        return Qwen3ForCausalLM._from_config(Qwen3Config(**common), dtype=dtype).eval()
    if kind == "qwen3_moe":
        config = Qwen3MoeConfig(**{"moe_intermediate_size": 128, "num_experts": 4, "num_experts_per_tok": 2} | common)
        return Qwen3MoeForCausalLM._from_config(config, dtype=dtype).eval()
    raise ValueError(f"unknown tiny model {kind!r}; expected 'qwen3' or 'qwen3_moe'")


def main(argv: list[str] | None = None) -> list[tuple[str, str, AccuracyReport]]:
    parser = argparse.ArgumentParser(prog="python -m mgpt_ops.quant.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--model", nargs="+", choices=("qwen3", "qwen3_moe"), default=["qwen3", "qwen3_moe"])
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens generated by the bf16 model")
    parser.add_argument("--per-layer", action="store_true", help="print every per-layer table too")
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(1)
    results = []
    for kind in args.model:
        model_fp = tiny_model(kind)
        input_ids = torch.randint(0, model_fp.config.vocab_size, (2, 8), generator=generator)
        for method in args.method:
            model_q = quantize_(copy.deepcopy(model_fp), method)
            if args.per_layer:
                print(f"\n== {kind} / {method}")
            results.append((kind, method, accuracy_report(model_fp, model_q, input_ids, new_tokens=args.tokens,
                                                          verbose=args.per_layer)))
    header = f"{'model':<10}  {'method':<13}  {'layers':>6}  {'worst layer':>11}  {'mean layer':>10}  " \
             f"{'logits rel err':>14}  greedy agreement"
    print("\n" + header + "\n" + "-" * len(header))
    for kind, method, report in results:
        errors = [err for _, err in report.layers.values()]
        print(f"{kind:<10}  {method:<13}  {len(errors):>6}  {max(errors):>11.3e}  {sum(errors) / len(errors):>10.3e}  "
              f"{report.logit_rel_err:>14.3e}  {report.tokens_agreed}/{report.tokens_compared} "
              f"({100 * report.token_agreement:.1f}%)")
    print("(bf16 reference; per-layer error = output of each quantized module vs the bf16 module on the same input)")
    return results


if __name__ == "__main__":
    main()
