"""Loads the compiled extension ``mgpt_ops._C`` (C++ CPU kernels, and CUDA kernels when built with them).

The package stays importable without it (pure-Python reference and Triton faces still work); the
``cpu``/``cuda`` backends then report that the extension is missing.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

_error: str | None = None
_C = None
try:
    _C = importlib.import_module("mgpt_ops._C")  # registers the ops with the dispatcher
except ModuleNotFoundError as exc:  # not built (e.g. a source checkout on PYTHONPATH): stay quiet
    _error = str(exc)
except ImportError as exc:  # pragma: no cover - built but unloadable (ABI mismatch, missing libs): say so
    _error = str(exc)
    warnings.warn(f"mgpt_ops._C failed to load ({_error}); C++/CUDA backends are unavailable", stacklevel=2)


def loaded() -> bool:
    return _C is not None


def load_error() -> str | None:
    return _error


@functools.cache
def built_with_cuda() -> bool:
    """True if the extension registered CUDA kernels (checked through the dispatcher, not a flag)."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("mgpt::logits_row_stats", "CUDA")


def require(op: str) -> None:
    if _C is None:
        raise RuntimeError(f"mgpt.{op}: the compiled extension mgpt_ops._C failed to import: {_error}")

