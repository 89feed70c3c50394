"""Profiling and run metrics: NVTX ranges, torch.profiler traces, FLOPs / MFU, step timing, progress, summary.

- ``nvtx_range(name)``: an NVTX push/pop (the ``nvtx`` package, domain "mgpt") when enabled with
  ``enable_nvtx()``; otherwise a shared null context, so a disabled range costs one function call. The
  ``nvtx`` package works on any machine (without Nsight it records nothing), unlike ``torch.cuda.nvtx``, which
  needs a CUDA build of torch. Standard names: ``RANGE_DATA``, ``RANGE_VISION``, ``RANGE_LANGUAGE``,
  ``RANGE_BACKWARD``, ``RANGE_OPTIMIZER``, ``RANGE_COMMUNICATION`` (and ``RANGE_STEP`` around a whole step).
- ``TraceProfiler``: torch.profiler over steps [wait + warmup, wait + warmup + active) of a run, written as a
  chrome trace ``trace_rank<r>_step<N>.json`` (open in chrome://tracing or Perfetto).
- ``transformer_flops`` / ``vision_flops`` / ``qwen3_vl_flops``: training FLOPs of a step, ``device_peak_flops``
  the per-device peak they are divided by, ``StepMeter`` the per-step record (time, tokens/s, MFU, memory).
- ``ProgressBar`` (rank 0 only, no dependency), ``summary_table(meter)``, ``plot(meter, path)``,
  ``run_environment(device)`` (machine and versions, for the run's result files).
"""

from __future__ import annotations

import contextlib
import functools
import math
import resource
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist

try:
    import nvtx
except ImportError:  # only needed when NVTX ranges are enabled
    nvtx = None

# ------------------------------------------------------------------------------------------------------------
# NVTX ranges
# ------------------------------------------------------------------------------------------------------------
RANGE_STEP = "step"
RANGE_DATA = "data"
RANGE_VISION = "vision_forward"
RANGE_LANGUAGE = "language_forward"
RANGE_BACKWARD = "backward"
RANGE_OPTIMIZER = "optimizer"
RANGE_COMMUNICATION = "communication"
NVTX_DOMAIN = "mgpt"

_nvtx_enabled = False
_NULL_RANGE = contextlib.nullcontext()


def enable_nvtx(enabled: bool = True) -> None:
    global _nvtx_enabled
    if enabled and nvtx is None:
        raise RuntimeError("profiling.enable_nvtx: the 'nvtx' package is not installed (pip install nvtx)")
    _nvtx_enabled = enabled


class _NvtxRange:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        nvtx.push_range(self.name, domain=NVTX_DOMAIN)
        return self

    def __exit__(self, *exc):
        nvtx.pop_range(domain=NVTX_DOMAIN)
        return False


def nvtx_range(name: str):
    """``with nvtx_range(RANGE_BACKWARD): loss.backward()`` - a named range on the Nsight Systems timeline."""
    return _NvtxRange(name) if _nvtx_enabled else _NULL_RANGE


# ------------------------------------------------------------------------------------------------------------
# torch.profiler trace
# ------------------------------------------------------------------------------------------------------------
class TraceProfiler:
    """Call ``step()`` after every training step; with ``enabled=False`` every call is a no-op.

    The schedule skips ``wait`` steps, records ``warmup`` steps without keeping them, keeps ``active`` steps and
    exports them once: ``trace_dir/trace_rank<rank>_step<N>.json`` (``paths`` lists what was written).
    """

    def __init__(self, trace_dir: str | Path, *, wait: int = 1, warmup: int = 1, active: int = 2,
                 rank: int | None = None, enabled: bool = True):
        self.trace_dir, self.rank, self.paths = Path(trace_dir), _rank(rank), []
        self._profile = None
        if enabled:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(
                activities=activities, on_trace_ready=self._export,
                schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1))

    def _export(self, profile) -> None:
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        path = self.trace_dir / f"trace_rank{self.rank}_step{profile.step_num}.json"
        profile.export_chrome_trace(str(path))
        self.paths.append(path)

    def __enter__(self):
        if self._profile is not None:
            self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        if self._profile is not None:
            self._profile.__exit__(*exc)
        return False

    def step(self) -> None:
        if self._profile is not None:
            self._profile.step()


# ------------------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------------------
def lm_active_params(*, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                     vocab_size: int, intermediate_size: int = 0, num_experts: int = 0, top_k: int = 0,
                     moe_intermediate_size: int = 0, num_moe_layers: int | None = None) -> int:
    """Weights of a decoder-only LM that one token multiplies with: q/k/v/o projections, a SwiGLU MLP
    (gate, up, down) per dense layer, router + ``top_k`` SwiGLU experts per MoE layer, and the LM head. The input
    embedding (a lookup) and the norms (elementwise) are not matmuls and not counted. ``num_moe_layers``:
    how many layers are MoE (default: all of them when ``num_experts > 0``)."""
    attention = hidden_size * head_dim * (2 * num_heads + 2 * num_kv_heads)
    moe_layers = (num_layers if num_experts else 0) if num_moe_layers is None else num_moe_layers
    dense_mlp = 3 * hidden_size * intermediate_size
    moe_mlp = hidden_size * num_experts + top_k * 3 * hidden_size * moe_intermediate_size
    return (num_layers * attention + (num_layers - moe_layers) * dense_mlp + moe_layers * moe_mlp
            + vocab_size * hidden_size)


def transformer_flops(n_active_params: int, seq_lens: Sequence[int], *, num_layers: int, attn_dim: int,
                      causal: bool = True, weight_grads: bool = True, input_grads: bool = True) -> float:
    """Training FLOPs (forward + backward) of one micro-batch of packed sequences of lengths ``seq_lens``.

    The standard derivation (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1; Chowdhery
    et al. 2022, "PaLM", appendix B): a matmul with an ``[m, n]`` weight costs ``2 m n`` FLOPs per token
    forward, and backward twice that (input gradient + weight gradient), hence ``6 N`` per token for
    ``N = n_active_params`` (see ``lm_active_params``). Attention adds, per layer and sequence of length s,
    ``2 s^2 d`` for Q K^T and ``2 s^2 d`` for P V forward (``d = attn_dim`` = heads x head_dim of the queries),
    times 3 for training: ``12 L d s^2``; PaLM's per-token form ``12 L H Q T`` is the same with s = T. Attention
    stays inside a sample of the packed batch, so the term sums ``s^2`` over the samples. ``causal=True`` counts
    half the score matrix (the work a causal kernel does; PaLM's MFU convention counts all of it:
    ``causal=False``).

    Frozen parts do less backward work: ``weight_grads=False`` (the LM's weights, embedding table included, are
    frozen) drops the weight gradients ``2 N``; if nothing before the LM trains either (``input_grads=False``:
    no trained vision features enter its input embeddings), the input gradients ``2 N`` and the attention
    backward ``8 L d s^2`` go too, leaving the forward.
    """
    tokens = sum(seq_lens)
    backward = weight_grads or input_grads  # a trained layer needs the input gradients of every layer above it
    matmul = (2 + 2 * weight_grads + 2 * backward) * n_active_params * tokens
    attention = (4 + 8 * backward) * num_layers * attn_dim * sum(s * s for s in seq_lens)
    return float(matmul + attention * (0.5 if causal else 1.0))


def vision_flops(patches_per_image: Sequence[int], *, depth: int, hidden_size: int, intermediate_size: int,
                 patch_dim: int, out_hidden_size: int, merge_size: int = 2, num_mergers: int = 1,
                 train_tower: bool = True, train_merger: bool = True) -> float:
    """Training FLOPs of a ViT tower like Qwen3-VL's for images of ``patches_per_image`` patches (t*h*w each).

    Per patch, with the accounting of ``transformer_flops`` (2 FLOPs per weight forward, 2 more for the weight
    gradient, 2 more for the input gradient): the patch embedding (``patch_dim x hidden``; pixels never need a
    gradient), per block q/k/v/proj (``4 hidden^2``) and a two-matmul GELU MLP (``2 hidden x intermediate``);
    bidirectional attention within each image ``(4 + 8) depth hidden s^2`` (no causal half); and ``num_mergers``
    patch mergers (the final one plus one per DeepStack tap), two matmuls ``(hidden m^2)^2 + hidden m^2 x
    out_hidden`` each, on the ``s / m^2`` merged tokens. ``train_tower=False`` (a frozen vision tower, as in the
    curriculum's later stages) leaves the tower forward only; a merger's first matmul then needs no input
    gradient, and with ``train_merger=False`` too, the mergers run forward only.
    """
    patches = sum(patches_per_image)
    block = 4 * hidden_size ** 2 + 2 * hidden_size * intermediate_size
    merged_width = hidden_size * merge_size ** 2
    fc1, fc2 = merged_width ** 2, merged_width * out_hidden_size
    tower = ((2 + 2 * train_tower) * patch_dim * hidden_size * patches + (2 + 4 * train_tower) * depth * block * patches
             + (4 + 8 * train_tower) * depth * hidden_size * sum(s * s for s in patches_per_image))
    # fc2's input gradient is needed when anything before it trains: fc1 (the merger) or the tower.
    per_merged_token = ((2 + 2 * train_merger + 2 * train_tower) * fc1
                        + (2 + 2 * train_merger + 2 * (train_tower or train_merger)) * fc2)
    mergers = num_mergers * per_merged_token * patches / merge_size ** 2
    return float(tower + mergers)


def qwen3_vl_flops(config, seq_lens: Sequence[int], image_grid_thw: Sequence[Sequence[int]] = (),
                   causal: bool = True, trainable: Mapping[str, bool] | None = None) -> dict[str, float]:
    """``{"language", "vision", "total"}`` training FLOPs of a micro-batch for a ``Qwen3VLConfig``: text
    samples of ``seq_lens`` tokens, images of grids ``(t, h, w)`` (vision attention runs per frame of h*w).
    ``trainable``: a curriculum stage's map of "vision", "merger", "language" to bools (missing parts train)."""
    trainable = dict(trainable or {})
    unknown = sorted(set(trainable) - {"vision", "merger", "language"})
    if unknown:
        raise ValueError(f"profiling.qwen3_vl_flops: argument 'trainable' has unknown parts {unknown}; "
                         f"expected vision, merger, language")
    train_tower, train_merger, train_language = (trainable.get(p, True) for p in ("vision", "merger", "language"))
    text, vision = config.text, config.vision
    frames = [int(h) * int(w) for t, h, w in image_grid_thw for _ in range(int(t))]
    n_active = lm_active_params(
        hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads, head_dim=text.head_dim, vocab_size=text.vocab_size,
        intermediate_size=text.intermediate_size, num_experts=text.num_experts, top_k=text.top_k,
        moe_intermediate_size=text.moe_intermediate_size,
        num_moe_layers=sum(text.is_moe_layer(i) for i in range(text.num_hidden_layers)))
    image_features_train = bool(frames) and (train_tower or train_merger)
    language = transformer_flops(n_active, seq_lens, num_layers=text.num_hidden_layers,
                                 attn_dim=text.num_attention_heads * text.head_dim, causal=causal,
                                 weight_grads=train_language, input_grads=image_features_train)
    tower = vision_flops(frames, depth=vision.depth, hidden_size=vision.hidden_size,
                         intermediate_size=vision.intermediate_size, patch_dim=vision.patch_dim,
                         out_hidden_size=vision.out_hidden_size, merge_size=vision.spatial_merge_size,
                         num_mergers=1 + len(vision.deepstack_visual_indexes), train_tower=train_tower,
                         train_merger=train_merger) if frames else 0.0
    return {"language": language, "vision": tower, "total": language + tower}


# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, per device. H200 has the H100 SXM's
# compute (only its memory differs).
PEAK_BF16_FLOPS = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


def peak_flops_for_name(device_name: str) -> float | None:
    """The table entry for a ``torch.cuda.get_device_name()`` string, or None when the device is unknown."""
    name = device_name.upper()
    if "H200" in name:
        return PEAK_BF16_FLOPS["H200"]
    if "H100" in name:
        variant = "H100 PCIe" if "PCIE" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
        return PEAK_BF16_FLOPS[variant]
    if "A100" in name:
        return PEAK_BF16_FLOPS["A100"]
    return None


@functools.cache
def measure_cpu_matmul_flops(size: int = 512, repeats: int = 5) -> float:
    """The CPU's fp32 matmul rate (best of ``repeats`` ``size^3`` products, FLOPs/s), measured once per process.

    There is no data-sheet peak for an arbitrary (shared, throttled) CPU, so CPU MFU is relative to what torch's
    matmul reaches here - a practical ceiling, not the theoretical one."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool start, allocation
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def device_peak_flops(device: torch.device | str) -> float:
    """Peak FLOPs/s of one device for MFU: the bf16 table on CUDA, a measured matmul rate on CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return measure_cpu_matmul_flops()
    name = torch.cuda.get_device_name(device)
    peak = peak_flops_for_name(name)
    if peak is None:
        raise ValueError(f"profiling.device_peak_flops: no peak for {name!r}; set profiling.peak_flops")
    return peak


def run_environment(device: torch.device | str, peak_flops: float | None = None) -> dict:
    """What a run's numbers were measured on: ``bench.env.capture`` (machine, accelerator, versions, git state,
    date) plus the peak FLOPs/s MFU is relative to and where that peak came from. Write it next to the metrics."""
    from bench.env import capture

    device = torch.device(device)
    if peak_flops is not None:
        source = "given (profiling.peak_flops)"
    elif device.type == "cpu":
        source = "measured: best fp32 512^3 matmul rate in this process"
    else:
        source = "table: dense bf16 data-sheet peak"
    info = capture(device)
    info["peak_flops"] = {"value": peak_flops if peak_flops is not None else device_peak_flops(device),
                          "source": source}
    return info


def peak_memory_bytes(device: torch.device | str) -> int:
    """CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). CPU: the process's peak resident set size
    (``getrusage`` ru_maxrss; KiB on Linux, bytes on macOS), which also counts the Python heap and libraries."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ------------------------------------------------------------------------------------------------------------
# Step metrics
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRecord:
    step: int
    seconds: float
    tokens: int
    loss: float | None
    flops: float | None
    peak_memory: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def mfu(self, peak_flops: float | None) -> float | None:
        """Model FLOPs utilisation of one device: achieved FLOPs/s over its peak."""
        if self.flops is None or not peak_flops:
            return None
        return self.flops / self.seconds / peak_flops


class StepMeter:
    """``start()`` before a step, ``stop(step, tokens, loss, flops)`` after it; tokens and FLOPs of THIS rank.

    ``flops`` defaults to ``flops_per_token * tokens`` when only a per-token rate is known; pass the exact
    number from ``qwen3_vl_flops`` when the sequence lengths are. On CUDA, start/stop synchronise the device so
    the wall time covers the queued kernels. ``summary()`` leaves out the first ``skip_first`` steps (compile,
    allocator warm-up) when there are more.
    """

    def __init__(self, *, peak_flops: float | None = None, flops_per_token: float | None = None,
                 device: torch.device | str = "cpu", skip_first: int = 1,
                 clock: Callable[[], float] = time.perf_counter):
        self.peak_flops, self.flops_per_token = peak_flops, flops_per_token
        self.device, self.skip_first, self.clock = torch.device(device), skip_first, clock
        self.records: list[StepRecord] = []
        self._started: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._started = self.clock()

    def stop(self, step: int, tokens: int, loss: float | None = None, flops: float | None = None) -> StepRecord:
        if self._started is None:
            raise RuntimeError("StepMeter.stop: call start() first")
        self._sync()
        seconds = self.clock() - self._started
        self._started = None
        if flops is None and self.flops_per_token is not None:
            flops = self.flops_per_token * tokens
        record = StepRecord(step, seconds, int(tokens), None if loss is None else float(loss), flops,
                            peak_memory_bytes(self.device))
        self.records.append(record)
        return record

    def summary(self) -> dict:
        if not self.records:
            return {"steps": 0}
        measured = self.records[self.skip_first:] if len(self.records) > self.skip_first else self.records
        seconds = sum(r.seconds for r in measured)
        flops = [r.flops for r in measured]
        losses = [r.loss for r in self.records if r.loss is not None]
        mfu = sum(flops) / seconds / self.peak_flops if self.peak_flops and None not in flops else None
        return {"steps": len(self.records), "measured_steps": len(measured), "mean_step_s": seconds / len(measured),
                "tokens_per_s": sum(r.tokens for r in measured) / seconds, "mfu": mfu,
                "peak_memory_gib": max(r.peak_memory for r in self.records) / 2 ** 30,
                "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None}


def summary_table(meter: StepMeter) -> str:
    """A plain-text two-column table of ``meter.summary()`` for the end of a run."""
    summary = meter.summary()
    labels = {"steps": "steps", "measured_steps": "steps measured", "mean_step_s": "mean step time (s)",
              "tokens_per_s": "tokens / s (this rank)", "mfu": "MFU", "peak_memory_gib": "peak memory (GiB)",
              "first_loss": "first loss", "final_loss": "final loss"}
    rows = []
    for key, label in labels.items():
        value = summary.get(key)
        if value is None:
            text = "n/a"
        elif key == "mfu":
            text = f"{100 * value:.2f} %"
        elif isinstance(value, float):
            text = f"{value:.4g}"
        else:
            text = str(value)
        rows.append((label, text))
    width = max(len(label) for label, _ in rows)
    rule = "-" * (width + 3 + max(len(text) for _, text in rows))
    return "\n".join([rule, *(f"{label:<{width}} | {text}" for label, text in rows), rule])


def plot(meter: StepMeter, path: str | Path) -> Path | None:
    """Loss and tokens/s against the step, one PNG; None (with a warning) when matplotlib is not installed.
    Draws on a bare ``Figure`` (Agg canvas), so pyplot's global backend and figure list are left alone."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("profiling.plot: matplotlib is not installed; no plot written", stacklevel=2)
        return None
    steps = [r.step for r in meter.records]
    figure = Figure(figsize=(10, 3.5))
    loss_axis, speed_axis = figure.subplots(1, 2)
    loss_axis.plot([r.step for r in meter.records if r.loss is not None],
                   [r.loss for r in meter.records if r.loss is not None], marker=".")
    loss_axis.set(xlabel="step", ylabel="loss", title="training loss")
    speed_axis.plot(steps, [r.tokens_per_s for r in meter.records], marker=".")
    speed_axis.set(xlabel="step", ylabel="tokens / s", title="throughput (this rank)")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


# ------------------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------------------
def _rank(rank: int | None) -> int:
    if rank is not None:
        return rank
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class ProgressBar:
    """``step 12/100 [###.......]  12% | 0.52 s/it | eta 0:00:45 | loss 1.234`` on rank 0, silent elsewhere.

    On a terminal the line is redrawn in place; otherwise (a log file) one line is written every ``every``
    steps and at the last step."""

    def __init__(self, total: int, *, rank: int | None = None, stream: TextIO | None = None, width: int = 24,
                 every: int = 1, clock: Callable[[], float] = time.perf_counter):
        self.total, self.width, self.every, self.clock = total, width, every, clock
        self.active = _rank(rank) == 0
        self.stream = stream if stream is not None else sys.stderr
        self._tty = self.active and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._begin, self._first_step = clock(), None

    def update(self, step: int, **metrics: float) -> None:
        if not self.active or (step % self.every and step != self.total):
            return
        if self._first_step is None:  # a resumed run starts late: the rate counts the steps done here
            self._first_step = step - 1
        done = step - self._first_step
        per_step = (self.clock() - self._begin) / max(done, 1)
        filled = round(self.width * step / self.total)
        eta = int(per_step * (self.total - step))
        parts = [f"step {step}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] "
                 f"{100 * step / self.total:3.0f}%", f"{per_step:.3g} s/it",
                 f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"]
        parts += [f"{name} {value:.4g}" for name, value in metrics.items()]
        self.stream.write(("\r" if self._tty else "") + " | ".join(parts) + ("" if self._tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
