"""Quantized checkpoints: ``save_quantized`` / ``load_quantized`` (format: a Hugging Face folder whose
``config.json`` carries ``quantization_config``), specified below; the vLLM plugin (``mgpt_vllm``) reads it.

Tensor names are the hub names: quantized linears store ``<prefix>.weight`` + ``weight_scale`` (mgpt_fp8,
mgpt_int8), ``weight`` + ``weight_scale_inv`` (mgpt_fp8_block) or ``qweight`` + ``scales`` (+ ``zeros``)
(mgpt_w4a16); fused MoE experts are written per expert, ``<experts>.{e}.{gate_proj,up_proj,down_proj}.<suffix>``
(also when the experts stay in high precision: ``<experts>.{e}.gate_proj.weight`` ...); everything else as in
the source model. Tied tensors (``lm_head`` tied to the embeddings) are written once, as ``save_pretrained`` does.

The loader builds the model from ``config.json`` with its parameters on the meta device (no random init, no
memory), turns into quantized modules exactly the layers whose quantized tensors the files hold (so Qwen's
published FP8 checkpoints -- ``"quant_method": "fp8"``, ``"weight_block_size": [128, 128]``, per-expert
``weight_scale_inv`` -- load into ``fp8_block128`` modules whatever their ``modules_to_not_convert`` says), then
assigns the tensors and checks that nothing is missing, unexpected, or of the wrong dtype. Weight scales stored in
bf16 / fp16 (Qwen stores ``weight_scale_inv`` in bf16) are widened to the modules' fp32, which is exact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from mgpt_ops.quant.modules import (BLOCK, CHECKPOINT_METHOD, EXPERT_PROJECTIONS, QuantConfig, QuantizationState,
                                    QuantizedExperts, QuantizedLinear, is_fused_experts, quantize_, tensor_specs)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
METHOD_OF_CHECKPOINT = {v: k for k, v in CHECKPOINT_METHOD.items()} | {"fp8": "fp8_block128"}
# A tensor with one of these suffixes marks its module as quantized in a checkpoint.
QUANT_MARKERS = ("weight_scale", "weight_scale_inv", "qweight")
# Qwen's published FP8 checkpoints store ``weight_scale_inv`` in bf16; the modules hold fp32 scales.
WIDENED_SCALES = (".weight_scale", ".weight_scale_inv")
_EXPERT_KEY = re.compile(r"^(?P<experts>.+)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<suffix>\w+)$")


def _version() -> str:
    import mgpt_ops

    return getattr(mgpt_ops, "__version__", "0")


# ------------------------------------------------------------------------------------------------------------
# quantization_config <-> QuantConfig
# ------------------------------------------------------------------------------------------------------------
def quantization_config_dict(state: QuantizationState) -> dict:
    """The ``quantization_config`` entry of config.json for a model quantized with ``state.config``."""
    config = state.config
    out = {"quant_method": CHECKPOINT_METHOD[config.method], "modules_to_not_convert": list(state.not_converted)}
    if config.method == "fp8_block128":
        out["weight_block_size"] = [BLOCK, BLOCK]
    if config.method == "w4a16":
        out.update(group_size=config.group_size, symmetric=config.symmetric)
    else:
        out["activation_scheme"] = "dynamic"
    out["mgpt_version"] = _version()
    return out


def config_from_checkpoint(qc: dict) -> QuantConfig:
    """``quantization_config`` (ours or Qwen's FP8) -> QuantConfig; unsupported variants are errors."""
    where = "mgpt.load_quantized: quantization_config"
    method = METHOD_OF_CHECKPOINT.get(qc.get("quant_method"))
    if method is None:
        raise ValueError(f"{where} has quant_method {qc.get('quant_method')!r}; supported: "
                         f"{sorted(METHOD_OF_CHECKPOINT)}")
    if method == "fp8_block128" and list(qc.get("weight_block_size") or []) != [BLOCK, BLOCK]:
        raise ValueError(f"{where}: 'weight_block_size' must be [{BLOCK}, {BLOCK}], "
                         f"got {qc.get('weight_block_size')!r}")
    if method != "w4a16" and qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"{where}: only activation_scheme 'dynamic' is supported, got {qc['activation_scheme']!r}")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{where}: only fp8 format 'e4m3' is supported, got {qc['fmt']!r}")
    extra = {"group_size": qc.get("group_size", 128), "symmetric": qc.get("symmetric", False)} \
        if method == "w4a16" else {}
    return QuantConfig(method, modules_to_not_convert=tuple(qc.get("modules_to_not_convert") or ()), **extra)


# ------------------------------------------------------------------------------------------------------------
# save
# ------------------------------------------------------------------------------------------------------------
def _experts_prefixes(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, QuantizedExperts) or is_fused_experts(m)}


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint (hub) names, experts split per expert, tied copies dropped."""
    experts = _experts_prefixes(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, t in model.state_dict().items():
        identity = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if identity in seen:  # tied to a tensor already written (lm_head <- embed_tokens)
            continue
        seen.add(identity)
        owner, _, rest = key.rpartition(".")
        module_name, _, proj = owner.rpartition(".")
        if owner in experts:  # high-precision fused experts: gate_up_proj [E, 2I, H] / down_proj [E, H, I]
            if rest == "gate_up_proj":
                gate, up = t.chunk(2, dim=1)
                out.update({f"{owner}.{e}.gate_proj.weight": gate[e] for e in range(t.shape[0])})
                out.update({f"{owner}.{e}.up_proj.weight": up[e] for e in range(t.shape[0])})
            else:
                out.update({f"{owner}.{e}.{rest}.weight": t[e] for e in range(t.shape[0])})
        elif module_name in experts and proj in EXPERT_PROJECTIONS:
            out.update({f"{module_name}.{e}.{proj}.{rest}": t[e] for e in range(t.shape[0])})
        else:
            out[key] = t
    return {k: _owned_cpu(v) for k, v in out.items()}


def _owned_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with storage of its own: safetensors refuses tensors that share one (per-expert slices do)."""
    t = t.detach().to("cpu")
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t.contiguous()


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))


def _what(config: QuantConfig) -> tuple:
    """What decides the stored tensors (which modules were converted is recorded in the model's state)."""
    return config.method, config.group_size, config.symmetric


def save_quantized(model: nn.Module, path: str | Path, config: str | QuantConfig | None = None, *,
                   max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` as a quantized Hugging Face folder (config.json with ``quantization_config``,
    generation_config.json when the model has one, safetensors shards). A model not yet quantized is quantized
    in place with ``config`` first; for a quantized model ``config`` may be omitted (it must match if given)."""
    state = getattr(model, "mgpt_quantization", None)
    if state is None:
        if config is None:
            raise ValueError("mgpt.save_quantized: the model is not quantized; pass 'config' (or call quantize_ "
                             "first)")
        state = quantize_(model, config).mgpt_quantization
    elif config is not None and _what(QuantConfig.of(config)) != _what(state.config):
        raise ValueError(f"mgpt.save_quantized: the model was quantized with {state.config}, not with {config!r}")
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "save_pretrained"):
        raise TypeError("mgpt.save_quantized: 'model' must be a transformers PreTrainedModel (it needs .config)")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = copy.deepcopy(hf_config)
    hf_config.quantization_config = quantization_config_dict(state)
    hf_config.architectures = [type(model).__name__]  # as save_pretrained does: the loader builds this class
    hf_config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    _write_shards(checkpoint_tensors(model), folder, max_shard_bytes)
    return folder


# ------------------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def parameters_on_meta():
    """Create every nn.Parameter on the meta device (buffers stay real: rotary tables are computed, not
    loaded), so building a large model costs neither time nor memory."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_NAME]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not (folder / file).exists():
            raise FileNotFoundError(f"mgpt.load_quantized: {folder / file} does not exist")
        tensors.update(load_file(str(folder / file)))
    return tensors


def _widen_scales(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bf16 / fp16 weight scales -> fp32 (exact: every 16-bit float is an fp32 value)."""
    return {key: t.float() if key.endswith(WIDENED_SCALES) and t.dtype in (torch.bfloat16, torch.float16) else t
            for key, t in tensors.items()}


def _group_expert_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Split per-expert tensors off: {(experts, proj, suffix): {e: tensor}}, and the remaining tensors."""
    grouped: dict[tuple, dict[int, torch.Tensor]] = defaultdict(dict)
    rest = {}
    for key, t in tensors.items():
        match = _EXPERT_KEY.match(key)
        if match:
            grouped[match["experts"], match["proj"], match["suffix"]][int(match["e"])] = t
        else:
            rest[key] = t
    return grouped, rest


def _stacked(per_expert: dict[int, torch.Tensor], num_experts: int, what: str) -> torch.Tensor:
    missing = sorted(set(range(num_experts)) - set(per_expert))
    if missing:
        raise ValueError(f"mgpt.load_quantized: checkpoint lacks experts {missing} of {what}")
    return torch.stack([per_expert[e] for e in range(num_experts)])


def _build_structure(model: nn.Module, config: QuantConfig, tensors: dict, experts_tensors: dict,
                     act_dtype: torch.dtype) -> list[str]:
    """Replace the modules the checkpoint holds quantized by empty quantized modules; returns their names."""
    converted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(f"{name}.{m}" in tensors for m in QUANT_MARKERS):
            new = QuantizedLinear.empty(config, module.in_features, module.out_features,
                                        bias=module.bias is not None, act_dtype=act_dtype)
        elif is_fused_experts(module) and any((name, "gate_proj", m) in experts_tensors for m in QUANT_MARKERS):
            num_experts, two_i, hidden = module.gate_up_proj.shape
            new = QuantizedExperts.empty(config, num_experts, hidden, two_i // 2, module.act_fn, act_dtype=act_dtype)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        converted.append(name)
    return converted


def _model_state(model: nn.Module, experts_tensors: dict, rest: dict) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the model's state_dict names (per-expert tensors stacked / fused)."""
    state = dict(rest)
    modules = dict(model.named_modules())
    for (prefix, proj, suffix), per_expert in experts_tensors.items():
        module = modules.get(prefix)
        if isinstance(module, QuantizedExperts):
            state[f"{prefix}.{proj}.{suffix}"] = _stacked(per_expert, module.num_experts, f"{prefix}.*.{proj}")
        elif module is not None and is_fused_experts(module) and suffix == "weight":
            state[f"{prefix}.{proj}"] = _stacked(per_expert, module.gate_up_proj.shape[0], f"{prefix}.*.{proj}")
        else:  # not fused experts (e.g. a ModuleList of Linear experts): the names are the model's own
            state.update({f"{prefix}.{e}.{proj}.{suffix}": t for e, t in per_expert.items()})
    for prefix, module in modules.items():
        if is_fused_experts(module) and f"{prefix}.gate_proj" in state:
            state[f"{prefix}.gate_up_proj"] = torch.cat([state.pop(f"{prefix}.gate_proj"),
                                                         state.pop(f"{prefix}.up_proj")], dim=1)
    return state


def _check_dtypes(model: nn.Module, config: QuantConfig) -> None:
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            groups = {"": (module.quantized_tensors(), (module.out_features, module.in_features))}
        elif isinstance(module, QuantizedExperts):
            shapes = QuantizedExperts.shapes(module.hidden_dim, module.intermediate_dim)
            groups = {f".{p}": (getattr(module, p).tensors(), shapes[p]) for p in EXPERT_PROJECTIONS}
        else:
            continue
        for sub, (tensors, (n, k)) in groups.items():
            for key, (_, dtype) in tensor_specs(config, n, k, torch.float32).items():
                got = tensors[key].dtype
                float_ok = key in ("scales", "zeros") and got in (torch.bfloat16, torch.float16, torch.float32)
                if got != dtype and not float_ok:
                    raise ValueError(f"mgpt.load_quantized: tensor '{name}{sub}.{key}' must be {dtype}, got {got}")


def load_quantized(path: str | Path, model_cls: type | None = None, *, device: torch.device | str = "cpu"
                   ) -> nn.Module:
    """Rebuild a quantized model from a folder written by ``save_quantized`` (or a Qwen FP8 checkpoint).

    ``model_cls``: the transformers class to build (default: ``config.architectures[0]``). Returns the model in
    eval mode on ``device`` with ``model.mgpt_quantization`` set."""
    import transformers

    folder = Path(path)
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        raise ValueError(f"mgpt.load_quantized: {folder / 'config.json'} has no 'quantization_config'")
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    config = config_from_checkpoint(qc)
    if model_cls is None:
        architectures = getattr(hf_config, "architectures", None) or []
        model_cls = getattr(transformers, architectures[0], None) if architectures else None
        if model_cls is None:
            raise ValueError(f"mgpt.load_quantized: config.architectures={architectures!r} names no transformers "
                             "class; pass 'model_cls'")
    tensors = _widen_scales(read_tensors(folder))
    experts_tensors, rest = _group_expert_tensors(tensors)
    with parameters_on_meta():
        model = model_cls._from_config(hf_config)
    act_dtype = hf_config.dtype if isinstance(hf_config.dtype, torch.dtype) else torch.bfloat16
    converted = _build_structure(model, config, tensors, experts_tensors, act_dtype)
    missing, unexpected = model.load_state_dict(_model_state(model, experts_tensors, rest), strict=False,
                                                assign=True)
    missing = set(missing)
    if missing:  # tied tensors were written once: tie them again (removes them from ``missing``)
        model.tie_weights(missing_keys=missing)
    if unexpected or missing:
        raise ValueError(f"mgpt.load_quantized: checkpoint does not match {model_cls.__name__}: missing "
                         f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    _check_dtypes(model, config)
    model.mgpt_quantization = QuantizationState(config, converted=converted,
                                                not_converted=list(qc.get("modules_to_not_convert") or ()))
    return model.to(device).eval()
