"""Run one family's cases: check correctness first, then measure peak memory and time of every contender."""

from __future__ import annotations

import gc
import importlib
import time
import traceback

import torch

from bench import FAMILIES, measure
from bench.common import CaseSetup, CaseSpec, is_face_unavailable, rel_errors

SCHEMA = "mgpt-bench/1"


def _failure(exc: BaseException) -> dict:
    if is_face_unavailable(exc):
        return {"status": "unavailable", "reason": str(exc)}
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return {"status": "error", "reason": f"{type(exc).__name__}: {exc}{where}"}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check(setup: CaseSetup, record: dict) -> None:
    """Run every available contender once (this also warms it up) and compare each of ours with each
    baseline before anything is timed."""
    outputs = {}
    for label, impl in setup.impls.items():
        entry = record["impls"][label] = {"role": impl.role, "face": impl.face}
        if impl.fn is None:
            entry.update(status="unavailable", reason=impl.unavailable)
            continue
        try:
            outputs[label] = impl.fn()
            entry["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one failing contender must not stop the run
            entry.update(_failure(exc))
    for ours in (k for k, i in setup.impls.items() if i.role == "ours" and k in outputs):
        for base in (k for k, i in setup.impls.items() if i.role == "baseline" and k in outputs):
            errors = rel_errors(outputs[ours], outputs[base])
            worst = max(errors.values(), default=float("inf"))
            record["comparisons"].append({"ours": ours, "baseline": base, "rel_errors": errors,
                                          "max_rel_err": worst, "within_tolerance": worst <= setup.tolerance})


def _measure(module_name: str, spec: CaseSpec, setup: CaseSetup, record: dict, device, quick: bool) -> None:
    for label, impl in setup.impls.items():
        entry = record["impls"][label]
        if entry["status"] != "ok":
            continue
        try:
            if device.type == "cuda":
                entry["memory"] = measure.peak_cuda(impl.fn)
            else:
                entry["memory"] = measure.peak_cpu_subprocess(module_name, spec.name, spec.params, label,
                                                              timeout_s=120 if quick else 600)
            entry["peak_mib"] = entry["memory"].get("peak_mib")
            entry["time"] = measure.time_call(impl.fn, device, quick)
            entry["time_ms"] = entry["time"]["median_ms"]
            if setup.flops:
                entry["tflop_per_s"] = setup.flops / (entry["time_ms"] * 1e-3) / 1e12
            if setup.min_bytes:
                entry["gb_per_s"] = setup.min_bytes / (entry["time_ms"] * 1e-3) / 1e9
            for unit, count in (setup.rates or {}).items():
                entry[f"{unit}_per_s"] = count / (entry["time_ms"] * 1e-3)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for a baseline at a large shape
            entry.update(_failure(exc))
        _free(device)


def _ratios(setup: CaseSetup, record: dict) -> None:
    impls = record["impls"]
    for comp in record["comparisons"]:
        ours, base = impls[comp["ours"]], impls[comp["baseline"]]
        t_o, t_b = ours.get("time_ms"), base.get("time_ms")
        m_o, m_b = ours.get("peak_mib"), base.get("peak_mib")
        comp["time_ratio"] = t_o / t_b if t_o and t_b else None
        comp["memory_ratio"] = m_o / m_b if m_o is not None and m_b and m_b > 0 else None
        goal = setup.goal
        if goal is None or goal.baseline != comp["baseline"]:
            comp["goal_met"] = None
            continue
        comp["goal"] = {"max_time_ratio": goal.max_time_ratio, "max_memory_ratio": goal.max_memory_ratio}
        comp["goal_met"] = bool(comp["within_tolerance"] and comp["time_ratio"] is not None
                                and comp["memory_ratio"] is not None and comp["time_ratio"] <= goal.max_time_ratio
                                and comp["memory_ratio"] <= goal.max_memory_ratio)


def run_case(module, module_name: str, spec: CaseSpec, device: torch.device, quick: bool) -> dict:
    record = {"case": spec.name, "shape": spec.shape, "params": spec.params, "impls": {}, "comparisons": []}
    try:
        setup = module.setup(spec.name, spec.params, device)
    except Exception as exc:  # noqa: BLE001
        record.update(_failure(exc))
        return record
    record.update(tolerance=setup.tolerance, flops=setup.flops, min_bytes=setup.min_bytes)
    _check(setup, record)
    _free(device)
    _measure(module_name, spec, setup, record, device, quick)
    _ratios(setup, record)
    statuses = [(i["role"], i["status"]) for i in record["impls"].values()]
    if ("ours", "ok") in statuses and ("baseline", "ok") in statuses:
        record["status"] = "ok"
    elif any(s == "error" for _, s in statuses):
        record["status"] = "error"
    else:
        record["status"] = "unavailable"
    del setup
    _free(device)
    return record


def _progress(record: dict, seconds: float) -> str:
    parts = []
    for label, entry in record["impls"].items():
        if entry["status"] == "ok" and "time_ms" in entry:
            parts.append(f"{label} {entry['time_ms']:.3g} ms {entry.get('peak_mib') or 0:.4g} MiB")
        else:
            parts.append(f"{label} {entry['status']}")
    worst = max((c["max_rel_err"] for c in record["comparisons"]), default=None)
    err = f", max err {worst:.2g}" if worst is not None else ""
    return f"{record.get('status', '?')} in {seconds:.1f} s: " + "; ".join(parts) + err


def run_family(family: str, device: torch.device, quick: bool, env: dict, after_case=None, log=print,
               only: list[str] | None = None) -> dict:
    """Run every case of ``family`` (or those whose "name shape" contains one of ``only``);
    ``after_case(result)`` is called with the result so far after each case (the CLI saves it, so a run
    killed by a time limit still leaves the finished cases behind)."""
    module_name = FAMILIES[family]
    module = importlib.import_module(module_name)
    specs = [s for s in module.cases(device, quick) if not only or any(o in f"{s.name} {s.shape}" for o in only)]
    result = _header(family, device, quick, env, getattr(module, "TIMED_REGION", None))
    for i, spec in enumerate(specs, 1):
        log(f"[{i}/{len(specs)}] {family}/{spec.name} {spec.shape} ...", end=" ", flush=True)
        start = time.perf_counter()
        record = run_case(module, module_name, spec, device, quick)
        log(_progress(record, time.perf_counter() - start), flush=True)
        result["cases"].append(record)
        result["complete"] = i == len(specs)
        if after_case is not None:
            after_case(result)
    return result


def _header(family: str, device: torch.device, quick: bool, env: dict, timed_region: str | None = None) -> dict:
    """A family module may say what one timed call does (``TIMED_REGION``); the default is the kernels' fwd+bwd."""
    cuda = device.type == "cuda"
    return {"schema": SCHEMA, "family": family, "device_type": device.type, "quick": quick, "complete": False,
            "env": env,
            "method": {"time": measure.CUDA_TIME_METHOD if cuda else measure.CPU_TIME_METHOD,
                       "memory": measure.CUDA_MEMORY_METHOD if cuda else measure.CPU_MEMORY_METHOD,
                       "timed_region": timed_region
                       or "forward + backward (random upstream gradients, torch.autograd.grad)",
                       "error": "||ours - baseline|| / ||baseline|| per output (float32 norms), checked "
                                "before timing; max over outputs",
                       "ratios": "ours / baseline (below 1 is better) for time and peak memory"},
            "cases": []}
