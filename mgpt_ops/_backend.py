"""Backend selection for every mgpt op.

Each op has up to four faces: ``reference`` (plain PyTorch, the spec, float64-capable), ``triton``,
``cpu`` (C++ kernel in ``mgpt_ops._C``) and ``cuda`` (CUDA kernel in ``mgpt_ops._C``). By default the
op picks the best face available for the device of its inputs; users and benchmarks can pin one:

    with mgpt_ops.use_backend("reference"):
        ...

or for a whole process with the environment variable ``MGPT_BACKEND=triton``. The context manager
wins over the environment variable. An op that has no such face at all (e.g. ``policy_loss`` has no C++
face) keeps its automatic choice, so one pin can cover a pipeline of ops; an op that has the face but
cannot run it on this device raises an error -- never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

BACKENDS = ("reference", "triton", "cpu", "cuda")
ENV_VAR = "MGPT_BACKEND"

_pinned: contextvars.ContextVar[str | None] = contextvars.ContextVar("mgpt_backend", default=None)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Pin the backend of every mgpt op called inside the block (``None`` restores automatic choice)."""
    if name is not None:
        _check_name(name, "use_backend")
    token = _pinned.set(name)
    try:
        yield
    finally:
        _pinned.reset(token)


def pinned_backend() -> str | None:
    """The backend pinned by ``use_backend`` or ``MGPT_BACKEND``, or None for automatic choice."""
    name = _pinned.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, ENV_VAR) if env else None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def kernels_registered(face: str, kernels: tuple[str, ...] = ()) -> bool:
    """True when mgpt_ops._C is loaded and registered the ``kernels`` (``mgpt::`` op names) for the dispatch
    key of ``face`` ("cpu"/"cuda"). Schemas exist before their kernels do, so this asks the dispatcher; an op
    that names no kernels needs only the extension (and, for "cuda", a CUDA build)."""
    from mgpt_ops import _ext

    if not _ext.loaded():
        return False
    if not kernels:
        return face == "cpu" or _ext.built_with_cuda()
    key = _DISPATCH_KEYS[face]
    # An extension built before these kernels existed does not even declare their schemas (asking would raise).
    declared = all(hasattr(torch.ops.mgpt, name.removeprefix("mgpt::")) for name in kernels)
    return declared and all(torch._C._dispatch_has_kernel_for_dispatch_key(name, key) for name in kernels)


def available_backends(device: torch.device, faces: tuple[str, ...], kernels: tuple[str, ...] = ()) -> list[str]:
    """Faces among ``faces`` (those an op implements) that can run on ``device`` in this process;
    ``kernels``: the ``mgpt::`` C++/CUDA ops the op's cpu/cuda faces call."""
    out = []
    for face in faces:
        if face == "reference":
            ok = True
        elif face == "triton":
            ok = device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
        elif face in _DISPATCH_KEYS:
            ok = device.type == face and kernels_registered(face, kernels)
        else:  # pragma: no cover - guarded by BACKENDS
            ok = False
        if ok:
            out.append(face)
    return out


def choose_backend(op: str, device: torch.device, faces: tuple[str, ...], preference: dict[str, tuple[str, ...]],
                   kernels: tuple[str, ...] = ()) -> str:
    """Resolve the face ``op`` runs on ``device``.

    ``faces``: faces the op implements. ``preference``: device type -> faces in order of preference for
    automatic choice (the first available wins; ``reference`` is always available as the last resort).
    ``kernels``: the ``mgpt::`` C++/CUDA ops its cpu/cuda faces call (see ``kernels_registered``).
    """
    pinned = pinned_backend()
    usable = available_backends(device, faces, kernels)
    if pinned is not None and pinned in faces:
        if pinned in _DISPATCH_KEYS and kernels and not kernels_registered(pinned, kernels):
            raise RuntimeError(f"mgpt.{op}: backend {pinned!r} is pinned but mgpt_ops._C has no "
                               f"{_DISPATCH_KEYS[pinned]} kernel for {', '.join(kernels)} in this build")
        if pinned not in usable:
            hint = {
                "triton": "Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import",
                "cpu": "the C++ extension mgpt_ops._C is not built, or the tensors are not on the CPU",
                "cuda": "the extension was built without CUDA kernels, or the tensors are not on a CUDA device",
            }.get(pinned, "")
            raise RuntimeError(f"mgpt.{op}: backend {pinned!r} cannot run on {device} here ({hint})")
        return pinned
    for face in preference.get(device.type, ()) + ("reference",):
        if face in usable:
            return face
    raise RuntimeError(f"mgpt.{op}: no backend can run on {device}")
