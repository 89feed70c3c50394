"""Where and with what a benchmark ran: machine, accelerator, software versions, git state, date."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    # Distribution metadata, not an import: importing triton or transformers just to ask is slow or
    # (for triton on a CPU box) has side effects.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {"hostname": socket.gethostname(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_usable": usable, "torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform()}


def accelerator(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": "cpu"}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    info = {"type": "cuda", "name": props.name, "sm_count": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 2),
            "cuda_runtime": torch.version.cuda}
    smi = _run(["nvidia-smi", f"--id={index}", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                "power.limit", "--format=csv,noheader"])
    if smi:
        keys = ("smi_name", "driver_version", "smi_memory_total", "max_sm_clock", "power_limit")
        info.update(dict(zip(keys, (v.strip() for v in smi.split(",")))))
    return info


def software() -> dict:
    mgpt = {"version": _version("mgpt")}
    try:
        from mgpt_ops import _ext

        mgpt.update(extension_loaded=_ext.loaded(), extension_cuda=_ext.built_with_cuda(),
                    extension_error=_ext.load_error())
    except Exception as exc:  # noqa: BLE001 - report, do not fail the benchmark
        mgpt["import_error"] = f"{type(exc).__name__}: {exc}"
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "transformers": _version("transformers"), "liger_kernel": _version("liger-kernel"),
            "numpy": _version("numpy"), "mgpt": mgpt,
            "env": {k: os.environ.get(k) for k in ("MGPT_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}}


def git_state() -> dict:
    commit = _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if commit is None:
        # A copy without .git (the GPU machine gets the working tree only): the caller may pass it in.
        passed = os.environ.get("MGPT_COMMIT")
        if passed:
            return {"commit": passed, "dirty": None, "note": "from MGPT_COMMIT (no .git in this copy)"}
        return {"commit": None, "dirty": None, "note": "not a git checkout (installed wheel?)"}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def capture(device: torch.device) -> dict:
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "device": accelerator(device), "software": software(), "git": git_state()}
