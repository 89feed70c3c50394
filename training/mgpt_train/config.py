"""The training configuration: nested dataclasses, read from a TOML or JSON file, overridden from the command line.

    cfg = load_config("training/configs/tiny_cpu.toml", ["--optimizer.lr=3e-4", "--curriculum.stages.0.steps=8"])
    cfg = config_from_argv(sys.argv[1:])          # --config PATH plus --key.sub=value overrides

Every key is a dotted path through the dataclasses below (list items by index: ``curriculum.stages.1.steps``;
dict entries by key: ``curriculum.stages.1.mixture.vertical``, ``model.text.hidden_size``). Command-line values are
strings converted to the field's type (``int``, ``float``, ``bool`` as true/false/1/0/yes/no, ``none``/``null``
for optional fields, JSON for lists and dicts: ``--optimizer.betas=[0.9,0.95]``). An unknown key is an error
naming the closest known keys. Without a file the defaults below are the tiny CPU run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: JSON config files only
    tomllib = None


class ConfigError(ValueError):
    """A bad configuration key or value (the message names the key)."""


MODEL_PRESETS = ("tiny", "tiny_moe", "qwen3_vl_30b_a3b")  # Qwen3VLConfig constructors
INIT_MODES = ("auto", "full", "sharded")  # how the initial weights are made (mgpt_train.initialization)


@dataclass
class ModelConfig:
    preset: str = "tiny"  # one of MODEL_PRESETS
    hf_config: str | None = None  # a Hugging Face model folder / config.json to mirror instead of the preset
    # a Hugging Face model folder (config.json + *.safetensors, optionally tokenizer and preprocessor_config.json)
    # whose shape, weights and tokenizer replace the preset's shape, the seeded weights and the byte tokenizer
    hf_checkpoint: str | None = None
    init: str = "auto"  # one of INIT_MODES: "full", "sharded" or "auto" (mgpt_train.initialization)
    text: dict[str, Any] = field(default_factory=dict)  # TextConfig fields to change, e.g. {"num_hidden_layers": 2}
    vision: dict[str, Any] = field(default_factory=dict)  # VisionConfig fields to change
    dtype: str = "float32"  # parameter / compute dtype: float32 or bfloat16
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer

    def __post_init__(self):
        _check(self.dtype in ("float32", "bfloat16"), "model.dtype", "'float32' or 'bfloat16'", self.dtype)
        _check(self.init in INIT_MODES, "model.init", f"one of {list(INIT_MODES)}", self.init)
        if self.hf_checkpoint is not None and self.hf_config is not None:
            raise ConfigError("config keys 'model.hf_checkpoint' and 'model.hf_config': set one of them (the "
                              "checkpoint brings its own config)")
        # Unknown presets, override keys or an inconsistent shape fail at load time; the overrides keep their
        # typed values (command-line strings become ints, lists become tuples).
        built = self.build()
        self.text = {name: getattr(built.text, name) for name in self.text}
        self.vision = {name: getattr(built.vision, name) for name in self.vision}

    def build(self):
        """The ``mgpt_train.model.Qwen3VLConfig`` this section describes (preset, HF config or HF checkpoint's
        config, then the ``text`` / ``vision`` overrides)."""
        from mgpt_train.model.config import Qwen3VLConfig, TextConfig, VisionConfig

        source = "hf_checkpoint" if self.hf_checkpoint is not None else "hf_config"
        folder = self.hf_checkpoint if self.hf_checkpoint is not None else self.hf_config
        if self.hf_checkpoint is not None:
            safetensors_files(self.hf_checkpoint)  # a clear error now, not after the model is built
        if folder is not None:
            from transformers import AutoConfig

            try:
                hf_config = AutoConfig.from_pretrained(folder)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"config key 'model.{source}': cannot read {folder!r} ({exc})") from None
            try:
                base = Qwen3VLConfig.from_hf(hf_config)
            except (AttributeError, ValueError) as exc:
                raise ConfigError(f"config key 'model.{source}': {folder!r} is not a Qwen3-VL(-MoE) model "
                                  f"({exc})") from None
        else:
            if self.preset not in MODEL_PRESETS:
                raise ConfigError(f"config key 'model.preset': unknown preset {self.preset!r}; known: "
                                  f"{list(MODEL_PRESETS)}")
            base = getattr(Qwen3VLConfig, self.preset)()
        text = _from_dict(TextConfig, {**dataclasses.asdict(base.text), **self.text}, "model.text")
        vision = _from_dict(VisionConfig, {**dataclasses.asdict(base.vision), **self.vision}, "model.vision")
        try:
            return dataclasses.replace(base, text=text, vision=vision)
        except ValueError as exc:
            raise ConfigError(f"config key 'model': {exc}") from None


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of a Hugging Face model folder (``model.safetensors`` or the shards its
    ``model.safetensors.index.json`` names); ConfigError naming ``model.hf_checkpoint`` when there are none."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"config key 'model.hf_checkpoint': {str(folder)!r} is not a Hugging Face model folder "
                          f"(no config.json there)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise ConfigError(f"config key 'model.hf_checkpoint': {index} names missing files {missing[:3]}")
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"config key 'model.hf_checkpoint': {str(folder)!r} holds no *.safetensors weights "
                          f"(save the model with save_pretrained(..., safe_serialization=True))")
    return files


@dataclass
class ParallelConfig:
    """Degrees of :class:`mgpt_train.parallel_dims.ParallelDims` (dp_shard=-1: the ranks left over)."""

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_microbatches: int = 1  # micro-batches in flight per pipeline step (>= pp keeps every stage busy)

    def __post_init__(self):
        for name in ("dp_replicate", "cp", "tp", "pp", "ep", "pp_microbatches"):
            _check(getattr(self, name) >= 1, f"parallel.{name}", "an int >= 1", getattr(self, name))
        _check(self.dp_shard >= 1 or self.dp_shard == -1, "parallel.dp_shard", "an int >= 1 or -1", self.dp_shard)

    def dims(self, world_size: int):
        """The validated :class:`ParallelDims` for ``world_size`` ranks."""
        from mgpt_train.parallel_dims import ParallelDims

        return ParallelDims(world_size=world_size, dp_replicate=self.dp_replicate, dp_shard=self.dp_shard,
                            cp=self.cp, tp=self.tp, pp=self.pp, ep=self.ep)


@dataclass
class SyntheticConfig:
    num_samples: int = 256  # training samples drawn from mgpt_train.data.synthetic
    heldout_samples: int = 64  # evaluation samples (a split disjoint from training)

    def __post_init__(self):
        for name in ("num_samples", "heldout_samples"):
            _check(getattr(self, name) >= 1, f"data.synthetic.{name}", "an int >= 1", getattr(self, name))


@dataclass
class DataConfig:
    max_tokens: int = 1024  # packed tokens per micro-batch on one data-parallel rank
    # micro-batches per data-parallel rank and optimizer step (gradient accumulation): a step learns from
    # max_tokens x grad_accum x data-parallel ranks tokens at most
    grad_accum: int = 1
    prefetch: int = 2  # micro-batches prepared ahead in a background thread (0: inline, in the training loop)
    seed: int = 0
    jsonl: str | None = None  # a JSONL dataset; None = the synthetic data
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    min_pixels: int = 32 * 32  # image resize budget (Qwen3-VL's smart_resize)
    max_pixels: int = 128 * 128

    def __post_init__(self):
        for name in ("max_tokens", "grad_accum", "min_pixels", "max_pixels"):
            _check(getattr(self, name) >= 1, f"data.{name}", "an int >= 1", getattr(self, name))
        _check(self.prefetch >= 0, "data.prefetch", "an int >= 0", self.prefetch)
        _check(self.min_pixels <= self.max_pixels, "data.min_pixels", f"<= data.max_pixels ({self.max_pixels})",
               self.min_pixels)


@dataclass
class StageConfig:
    """One stage of the curriculum (``mgpt_train.data.curriculum.CurriculumStage``, see there): samples drawn by
    tag-prefix ``mixture`` weights, for ``steps`` micro-batches or ``epochs`` passes over its pools, with its own
    token budget (None = ``data.max_tokens``), a warm-up + cosine learning rate peaking at ``optimizer.lr *
    lr_scale`` and ending at ``min_lr_ratio`` of that, and ``trainable`` parts (vision, merger, language)."""

    name: str
    mixture: dict[str, float]
    steps: int | None = None
    epochs: float | None = None
    max_tokens: int | None = None
    max_sample_tokens: int | None = None
    lr_scale: float = 1.0
    warmup_ratio: float = 0.03
    trainable: dict[str, bool] = field(default_factory=dict)


def _default_stages() -> list[StageConfig]:
    # The three stages of mgpt_train.data.curriculum.default_curriculum, shortened for the tiny CPU run.
    return [StageConfig("domain_injection", {"vertical": 0.8, "general": 0.2}, steps=4),
            StageConfig("general_recovery", {"general": 0.7, "vertical": 0.3}, steps=4, lr_scale=0.5,
                        trainable={"vision": False}),
            StageConfig("consolidation", {"vertical": 0.5, "general": 0.5}, steps=4, lr_scale=0.25,
                        trainable={"vision": False})]


@dataclass
class CurriculumConfig:
    stages: list[StageConfig] = field(default_factory=_default_stages)

    def __post_init__(self):
        _check(len(self.stages) >= 1, "curriculum.stages", "at least one stage", self.stages)
        names = [stage.name for stage in self.stages]
        _check(len(set(names)) == len(names), "curriculum.stages", "unique stage names", names)


@dataclass
class OptimizerConfig:
    """AdamW. ``lr`` is the run's peak learning rate; each stage scales it and schedules it (see StageConfig)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    min_lr_ratio: float = 0.1  # a stage's cosine ends at this fraction of its peak

    def __post_init__(self):
        _check(self.lr > 0, "optimizer.lr", "a float > 0", self.lr)
        _check(all(0 <= b < 1 for b in self.betas), "optimizer.betas", "two floats in [0, 1)", self.betas)
        _check(self.eps > 0, "optimizer.eps", "a float > 0", self.eps)
        _check(self.weight_decay >= 0, "optimizer.weight_decay", "a float >= 0", self.weight_decay)
        _check(self.grad_clip is None or self.grad_clip > 0, "optimizer.grad_clip", "None or a float > 0",
               self.grad_clip)
        _check(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "a float in [0, 1]", self.min_lr_ratio)


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None = <output_dir>/checkpoints
    every: int = 0  # save every N optimizer steps (0 = only at the end of the run)
    keep: int | None = 2  # most recent checkpoints kept (None = all)
    resume: str = "latest"  # "latest" (if any), "never", or a step number
    export_hf: bool = False  # write a Hugging Face model folder <output_dir>/hf at the end of the run
    export_dtype: str = "float32"  # its weights: "float32" (the trained values) or "bfloat16" (half the size)

    def __post_init__(self):
        _check(self.every >= 0, "checkpoint.every", "an int >= 0", self.every)
        _check(self.export_dtype in ("float32", "bfloat16"), "checkpoint.export_dtype", "'float32' or 'bfloat16'",
               self.export_dtype)
        _check(self.keep is None or self.keep >= 1, "checkpoint.keep", "None or an int >= 1", self.keep)
        _check(self.resume in ("latest", "never") or self.resume.isdigit(), "checkpoint.resume",
               "'latest', 'never' or a step number", self.resume)

    @property
    def resume_step(self) -> int | str | None:
        """What ``checkpoint.load`` should read: "latest", a step, or None (start fresh)."""
        return None if self.resume == "never" else "latest" if self.resume == "latest" else int(self.resume)


@dataclass
class ProfilingConfig:
    nvtx: bool = False  # NVTX ranges around data / vision / language / backward / optimizer / communication
    trace: bool = False  # a torch.profiler chrome trace of steps [wait + warmup, wait + warmup + active)
    trace_dir: str | None = None  # None = <output_dir>/traces
    trace_wait: int = 1
    trace_warmup: int = 1
    trace_active: int = 2
    log_every: int = 1  # progress line / metrics every N steps
    peak_flops: float | None = None  # per-device peak for MFU; None = the table in mgpt_train.profiling

    def __post_init__(self):
        for name in ("trace_wait", "trace_warmup"):
            _check(getattr(self, name) >= 0, f"profiling.{name}", "an int >= 0", getattr(self, name))
        for name in ("trace_active", "log_every"):
            _check(getattr(self, name) >= 1, f"profiling.{name}", "an int >= 1", getattr(self, name))
        _check(self.peak_flops is None or self.peak_flops > 0, "profiling.peak_flops", "None or a float > 0",
               self.peak_flops)


@dataclass
class EvaluationConfig:
    # held-out exact match per tag before training and after every stage (the sharded model's forward: no
    # gathered copy); false skips it
    enabled: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output_dir: str = "runs/tiny_cpu"  # metrics, traces, plots, the resolved config (and checkpoints by default)

    def __post_init__(self):
        self.curriculum_stages()  # stage errors (mixture, length, trainable parts) surface at load time

    def curriculum_stages(self) -> list:
        """The ``mgpt_train.data.curriculum.CurriculumStage`` list of this run (learning rates resolved)."""
        from mgpt_train.data.curriculum import CurriculumStage

        stages = []
        for index, stage in enumerate(self.curriculum.stages):
            peak = self.optimizer.lr * stage.lr_scale
            try:
                stages.append(CurriculumStage(
                    stage.name, stage.mixture, steps=stage.steps, epochs=stage.epochs,
                    max_tokens=self.data.max_tokens if stage.max_tokens is None else stage.max_tokens,
                    max_sample_tokens=stage.max_sample_tokens, peak_lr=peak, min_lr=peak * self.optimizer.min_lr_ratio,
                    warmup_ratio=stage.warmup_ratio, trainable=stage.trainable))
            except ValueError as exc:
                raise ConfigError(f"config key 'curriculum.stages.{index}': {exc}") from None
        return stages

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.output_dir) / "checkpoints")

    @property
    def trace_dir(self) -> Path:
        return Path(self.profiling.trace_dir or Path(self.output_dir) / "traces")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved configuration as JSON (loadable again with ``load_config``)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _check(ok: bool, key: str, expected: str, value) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


# ------------------------------------------------------------------------------------------------------------
# Typed conversion
# ------------------------------------------------------------------------------------------------------------
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """``value`` (a native TOML/JSON value, or a command-line string) converted to the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': {value!r} matches none of "
                          f"{_type_name(tp)}")
    if dataclasses.is_dataclass(tp) and isinstance(value, str):
        value = _json(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a table of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key)
    if origin in (list, tuple, dict) and isinstance(value, str):
        value = _json(value, tp, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list ({_type_name(tp)}), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_coerce(v, item, f"{key}.{i}") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a table ({_type_name(tp)}), got {value!r}")
        item = args[1] if args else Any
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"config key '{key}': unsupported annotation {tp!r}")
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _json(text: str, tp, key: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config key '{key}': expected JSON for {_type_name(tp)}, got {text!r} ({exc})") from None


def _plain(value):
    """Dataclass instances back to the plain dicts / lists that ``_from_dict`` reads."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _known_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key below ``cls`` (nested dataclasses expanded, lists and dicts as their own key)."""
    keys = []
    for name, tp in _field_types(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys += _known_keys(tp, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            keys += _known_keys(typing.get_args(tp)[0], key + ".<i>.")
    return keys


def _unknown_key(key: str, cls, prefix: str) -> ConfigError:
    known = _known_keys(cls, prefix)
    close = difflib.get_close_matches(key, known, n=4, cutoff=0.5) or sorted(known)[:12]
    return ConfigError(f"unknown config key '{key}'; did you mean: {', '.join(close)}")


def _from_dict(cls, data: dict, prefix: str):
    types_ = _field_types(cls)
    dotted = f"{prefix}." if prefix else ""
    for name in data:
        if name not in types_:
            raise _unknown_key(f"{dotted}{name}", cls, dotted)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"config key '{prefix}': missing required field(s) {missing}")
    return cls(**{name: _coerce(value, types_[name], f"{dotted}{name}") for name, value in data.items()})


# ------------------------------------------------------------------------------------------------------------
# Files and overrides
# ------------------------------------------------------------------------------------------------------------
def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        if tomllib is None:
            raise ConfigError(f"config file {path}: TOML needs Python >= 3.11 (tomllib); use a .json file")
        with path.open("rb") as f:
            return tomllib.load(f)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    raise ConfigError(f"config file {path}: expected a .toml or .json file")


def _parse_override(text: str) -> tuple[str, str]:
    body = text[2:] if text.startswith("--") else text
    key, sep, value = body.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected --key.sub=value")
    return key, value


def _apply_override(data: dict, key: str, value: str) -> None:
    """Set ``key`` in the plain-dict form of the config, checking each step against the dataclasses."""
    parts = key.split(".")
    node, tp = data, TrainConfig
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if part not in _field_types(tp):
                raise _unknown_key(key, TrainConfig, "")
            child_tp = _field_types(tp)[part]
        elif typing.get_origin(tp) is list:
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"config key '{key}': '{part}' is not an index of {here.rsplit('.', 1)[0]} "
                                  f"(length {len(node)})")
            part, child_tp = int(part), typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            child_tp = typing.get_args(tp)[1]
        else:
            raise ConfigError(f"config key '{key}': {'.'.join(parts[:depth])} is a value, not a table")
        if last:
            node[part] = _plain(_coerce(value, child_tp, key))
        else:
            node, tp = node[part], child_tp


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The defaults, updated by the file at ``path`` (TOML or JSON; tables may be partial), then by
    ``overrides`` (``"--section.key=value"``, applied in order). Raises ConfigError naming the bad key."""
    data = TrainConfig().to_dict()
    if path is not None:
        _merge(data, _read_file(Path(path)), TrainConfig, "")
    for text in overrides:
        _apply_override(data, *_parse_override(text))
    return _from_dict(TrainConfig, data, "")


def config_from_dict(data: dict) -> TrainConfig:
    """A TrainConfig from the plain dict of ``TrainConfig.to_dict`` (e.g. one stored in a checkpoint); missing
    keys keep their defaults."""
    merged = TrainConfig().to_dict()
    _merge(merged, data, TrainConfig, "")
    return _from_dict(TrainConfig, merged, "")


def _merge(base: dict, update: dict, cls, prefix: str) -> None:
    """Recursive update of ``base`` by the file's tables; lists and dicts are replaced as a whole."""
    types_ = _field_types(cls)
    for name, value in update.items():
        if name not in types_:
            raise _unknown_key(f"{prefix}{name}", TrainConfig, "")
        if dataclasses.is_dataclass(types_[name]) and isinstance(value, dict):
            _merge(base[name], value, types_[name], f"{prefix}{name}.")
        else:
            base[name] = value


def config_from_argv(argv: list[str]) -> TrainConfig:
    """``--config PATH`` (or ``--config=PATH``) and ``--key.sub=value`` overrides, e.g. from ``sys.argv[1:]``."""
    path, overrides, i = None, [], 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 == len(argv):
                raise ConfigError("--config needs a path")
            path, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--config="):
            path = argv[i].partition("=")[2]
        else:
            overrides.append(argv[i])
        i += 1
    return load_config(path, overrides)
