"""Time and peak memory of one call, measured the same way for ours and every baseline.

Time
  CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up first), median of all repetitions. do_bench
        overwrites a 256 MB buffer before every repetition, so no input stays in L2 between calls. The
        repetition window is ~20 calls (5 with --quick), between 100 ms and 3 s.
  CPU:  wall clock (``time.perf_counter``) around each call, median of 3-15 repeats (as many as fit a
        small time budget); ``torch.get_num_threads()`` left as found. The caller warms up: the runner's
        correctness check runs every contender once before anything is timed.

Peak memory (MiB above what was allocated before the call: inputs excluded, outputs and gradients
returned by the call included, both sides alike)
  CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated() - memory_allocated()``
        (bytes handed out by the caching allocator, not cached-but-free blocks).
  CPU:  in a fresh process per (case, implementation) forked from a clean server that imported torch
        but ran nothing: build the inputs, run one warm-up call (one-time initialisation stays out),
        reset the kernel's RSS high-water mark (write "5" to /proc/self/clear_refs), read VmRSS, run the
        call, read VmHWM; peak = VmHWM - VmRSS. glibc is told to serve every block >= 4 KiB with mmap
        (``mallopt(M_MMAP_THRESHOLD)``), so freed tensors really leave the RSS and a reused heap cannot
        hide an allocation. Resolution ~0.5 MiB: the kernel batches RSS counter updates per CPU.
        Without clear_refs it falls back to ``ru_maxrss`` (an upper bound).
        Like any multiprocessing use, a calling script needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable

import torch

CUDA_MEMORY_METHOD = "torch.cuda max_memory_allocated - memory_allocated before the call (after reset_peak_memory_stats)"
CPU_MEMORY_METHOD = ("fresh forked process per measurement: VmHWM - VmRSS around one call after a warm-up call, "
                     "high-water mark reset via /proc/self/clear_refs, glibc mmap threshold 4 KiB; "
                     "resolution ~0.5 MiB (per-CPU batched kernel RSS counters)")
CPU_MEMORY_FALLBACK = "ru_maxrss (process lifetime peak) - VmRSS after inputs: upper bound (clear_refs unavailable)"
CUDA_TIME_METHOD = "triton.testing.do_bench median (CUDA events, L2 flushed before each repetition)"
CPU_TIME_METHOD = "time.perf_counter median over 3-15 repeats, after the correctness-check call as warm-up"

_MIB = 1024.0 * 1024.0


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _summary(times_ms: list[float], method: str) -> dict:
    s = sorted(times_ms)
    return {"median_ms": statistics.median(s), "p20_ms": _percentile(s, 0.2), "p80_ms": _percentile(s, 0.8),
            "min_ms": s[0], "repeats": len(s), "method": method}


def time_call(fn: Callable[[], object], device: torch.device, quick: bool) -> dict:
    """Median time of ``fn()`` in milliseconds (see module docstring for the method)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once_ms = (time.perf_counter() - start) * 1e3
        reps = 5 if quick else 20
        rep_ms = min(max(reps * once_ms, 10.0 if quick else 100.0), 3000.0)
        times = do_bench(fn, warmup=max(2 * once_ms, 5.0 if quick else 25.0), rep=rep_ms, return_mode="all")
        return _summary(list(times), CUDA_TIME_METHOD)
    budget_s, most = (0.3, 3) if quick else (3.0, 15)
    times = []
    while True:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= most or (len(times) >= 3 and sum(times) / 1e3 > budget_s):
            break
    return _summary(times, CPU_TIME_METHOD)


def peak_cuda(fn: Callable[[], object]) -> dict:
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return {"peak_mib": (peak - before) / _MIB, "method": CUDA_MEMORY_METHOD}


# ---------------------------------------------------------------- CPU: one fresh process per measurement

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_rss_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _return_freed_memory_to_os() -> None:
    """Fixed 4 KiB mmap threshold (this also stops glibc from raising it dynamically) and no heap slack,
    so every tensor of a page or more is its own mapping and leaves the RSS when freed. Slower
    allocation does not matter here: the probe is never timed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 4096)
    libc.mallopt(m_trim_threshold, 0)


def _probe_child(conn, family_module: str, name: str, params: dict, label: str) -> None:
    try:
        _return_freed_memory_to_os()
        setup = importlib.import_module(family_module).setup(name, params, torch.device("cpu"))
        fn = setup.impls[label].fn
        del setup
        out = fn()  # warm-up
        del out
        gc.collect()
        exact = _reset_rss_high_water_mark()
        base_kib = _status_kib("VmRSS")
        out = fn()
        peak_kib = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        del out
        conn.send({"peak_mib": (peak_kib - base_kib) / 1024.0, "rss_with_inputs_mib": base_kib / 1024.0,
                   "method": CPU_MEMORY_METHOD if exact else CPU_MEMORY_FALLBACK})
    except BaseException as exc:  # noqa: BLE001 - report anything back to the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


_contexts: dict[str, multiprocessing.context.BaseContext] = {}


def _forkserver(family_module: str):
    """A fork server that has imported torch, mgpt_ops and the family once: each probe is then a cheap
    fork of a process that has run nothing yet."""
    if "ctx" not in _contexts:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "mgpt_ops", "bench.measure", family_module])
        _contexts["ctx"] = ctx
    return _contexts["ctx"]


def peak_cpu_subprocess(family_module: str, name: str, params: dict, label: str, timeout_s: float) -> dict:
    ctx = _forkserver(family_module)
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe_child, args=(sender, family_module, name, params, label), daemon=True)
    proc.start()
    sender.close()
    try:
        if receiver.poll(timeout_s):
            result = receiver.recv()
        else:
            result = {"error": f"memory probe timed out after {timeout_s:.0f} s"}
    except EOFError:
        result = {"error": "memory probe process died without a result (killed, out of memory?)"}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        receiver.close()
    if "error" in result and proc.exitcode not in (0, None):
        result["error"] += f" (exit code {proc.exitcode})"
    return result
