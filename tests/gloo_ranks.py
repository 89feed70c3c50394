"""Multi-rank tests on the CPU: spawn ``world`` gloo ranks, run ``body(rank)`` in each, and hand the JSON-able
dicts they return back to the test. An exception in a rank becomes that rank's ``{"error": traceback}``, which
``run_on_gloo_ranks`` turns into a test failure with the traceback."""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, out_dir: str, body, timeout_s: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = body(rank)
    except Exception:  # reported to the parent, which fails the test with it
        result = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    os._exit(0)  # skip destroy_process_group: it aborts now and then at exit


def run_on_gloo_ranks(body, world: int, tmp_path, timeout_s: int = 120) -> list[dict]:
    """``body``: a module-level function (spawn pickles it) of the rank, returning a JSON-able dict."""
    mp.spawn(_rank_entry, args=(world, free_port(), str(tmp_path), body, timeout_s), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]
    for result in results:
        assert "error" not in result, result.get("error")
    return results


def error_message(fn) -> str:
    """The ValueError ``fn()`` raises, as text ("no error" when it returns): what a rank reports for a call that
    must fail on every rank alike (a JSON-able result, unlike the exception)."""
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"
