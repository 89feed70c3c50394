"""The contract between the runner and a benchmark family, plus helpers every family shares.

A family module provides

    cases(device, quick) -> list[CaseSpec]            the shapes to run (small ones when ``quick``)
    setup(name, params, device) -> CaseSetup          inputs + our implementation(s) + baselines

``setup`` must be deterministic in (name, params): the CPU memory probe rebuilds the case in a fresh
process from these two values alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Substrings of mgpt_ops._backend.choose_backend's errors that mean "this face cannot run here",
# which the harness reports as unavailable rather than as a failure of the op.
_FACE_UNAVAILABLE = ("is not implemented for this op", "cannot run on", "no backend can run")


@dataclass
class CaseSpec:
    name: str      # op / scenario name, e.g. "fused_linear_logprobs"
    params: dict   # JSON-able; everything ``setup`` needs (shapes, dtype, hyper-parameters)
    shape: str     # short human label for the table, e.g. "N=8192 H=2048 V=151936 bf16"


@dataclass
class Impl:
    """One contender. ``fn()`` runs forward + backward on the case's inputs and returns the tensors to
    compare (name -> tensor): forward outputs and input gradients."""

    role: str                         # "ours" or "baseline"
    fn: Callable[[], dict] | None     # None when unavailable
    face: str | None = None           # mgpt backend face pinned for ours ("auto": the ops' own choice)
    unavailable: str | None = None    # why it cannot run here


@dataclass
class Goal:
    """Targets from the project plan: ours/baseline time and memory ratios at most these."""

    baseline: str
    max_time_ratio: float
    max_memory_ratio: float


@dataclass
class CaseSetup:
    impls: dict[str, Impl]
    tolerance: float                  # max relative error accepted between ours and a baseline
    flops: float | None = None        # fewest floating-point operations the computation needs
    min_bytes: float | None = None    # fewest bytes it must move (each input read once, outputs written once)
    goal: Goal | None = None
    rates: dict[str, float] | None = None  # work per call, e.g. {"tokens": 7992}: the runner adds "tokens_per_s"


def load(module: str, attr: str):
    """(object, None) if ``module.attr`` imports, else (None, reason): ops still being written, or an
    optional dependency (Liger-Kernel) missing, make a case unavailable instead of crashing the run."""
    try:
        return getattr(importlib.import_module(module), attr), None
    except Exception as exc:  # noqa: BLE001 - any import-time failure means "not usable here"
        return None, f"{module}.{attr} unavailable ({type(exc).__name__}: {exc})"


def is_face_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _FACE_UNAVAILABLE)


def pinned(face: str, fn: Callable[[], dict]) -> Callable[[], dict]:
    """Run ``fn`` with the mgpt backend pinned to ``face``; ``"auto"`` leaves each op its own choice."""

    def run():
        if face == "auto":
            return fn()
        import mgpt_ops

        with mgpt_ops.use_backend(face):
            return fn()

    return run


def kernel_faces(device: torch.device) -> tuple[str, ...]:
    """The faces of an op worth timing on ``device``: its kernels. On the CPU that is the C++ face; the
    Triton interpreter is a correctness tool, orders of magnitude slower than anything real, and the
    ``reference`` face is the test oracle (full logits, like the naive baseline)."""
    return ("triton", "cuda") if device.type == "cuda" else ("cpu",)


def rel_errors(ours: dict, base: dict) -> dict[str, float]:
    """||ours - base|| / ||base|| per output both produce, computed in float32 on the outputs' device
    (float64 copies of a [V, H] gradient would double the memory for no useful precision: these are
    relative errors of 1e-7 and up). NaN/inf anywhere gives inf."""
    errs = {}
    for key in sorted(ours.keys() & base.keys()):
        a, b = ours[key].detach().float(), base[key].detach().float().to(ours[key].device)
        if a.shape != b.shape:
            errs[key] = float("inf")
            continue
        if not torch.isfinite(a).all():
            errs[key] = float("inf")
            continue
        denom = torch.linalg.vector_norm(b).item()
        errs[key] = torch.linalg.vector_norm(a - b).item() / (denom if denom > 0 else 1.0)
    return errs


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, *, gen: torch.Generator, device, dtype=torch.float32, scale: float = 1.0, grad=False):
    """Random normal tensor (drawn in float32, then cast: bf16 has no generator kernel on every device)."""
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(dtype).requires_grad_(grad)


def randint(high: int, shape, *, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=gen, device=device)


def dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]

