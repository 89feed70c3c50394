"""Input validation shared by every op: run in Python before any kernel launches, so bad input gives an
error that names the argument and what was expected instead of a wrong answer or a crash."""

from __future__ import annotations

from collections.abc import Sequence

import weakref

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Validate one tensor argument. ``shape`` entries that are None are free."""
    where = f"mgpt.{op}: argument '{name}'"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{where} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{where} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{where} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{where} must be on {device} (like the other inputs), got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{where} must be contiguous; call .contiguous() first")
    return t


def check_same_dtype(op: str, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        got = ", ".join(f"{n}={str(t.dtype).replace('torch.', '')}" for n, t in zip(names, tensors))
        raise TypeError(f"mgpt.{op}: arguments {', '.join(names)} must share one dtype, got {got}")


def check_positive(op: str, name: str, value: float) -> None:
    if not (value > 0):
        raise ValueError(f"mgpt.{op}: argument '{name}' must be > 0, got {value}")


# Cumulative offsets ([S + 1]: cu_seqlens, MoE expert offsets) are read from the device once per tensor object and
# version (a host sync), then remembered: the same tensor passed to every layer of a model costs one read.
_offsets_seen: dict[int, tuple] = {}  # id(offsets) -> (weakref, version, last offset, longest segment)


def offsets_summary(op: str, name: str, offsets: torch.Tensor) -> tuple[int, int]:
    """(last value, longest segment) of cumulative offsets after checking they start at 0 and never decrease."""
    key = id(offsets)
    seen = _offsets_seen.get(key)
    # Inference tensors keep no version counter (and can change in place inside inference mode): never cached.
    version = None if offsets.is_inference() else offsets._version
    if version is not None and seen is not None and seen[0]() is offsets and seen[1] == version:
        return seen[2], seen[3]
    host = offsets.to("cpu", torch.int64)
    where = f"mgpt.{op}: argument '{name}'"
    if host[0] != 0:
        raise ValueError(f"{where} must start at 0, got {int(host[0])}")
    lengths = host[1:] - host[:-1]
    if (lengths < 0).any():
        i = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(f"{where} must be non-decreasing, got {name}[{i}]={int(host[i])} > "
                         f"{name}[{i + 1}]={int(host[i + 1])}")
    last, longest = int(host[-1]), int(lengths.max()) if lengths.numel() else 0
    if version is not None:
        _offsets_seen[key] = (weakref.ref(offsets, lambda _: _offsets_seen.pop(key, None)), version, last, longest)
    return last, longest
