"""Try a kernel face that has never run on a GPU in a child process before the benchmark times it.

The CUTLASS faces of ``scaled_mm`` and ``block_scaled_mm`` are compiled in CI but unverified on a GPU. A fault in
one (an illegal address, a bad TMA descriptor) leaves the CUDA context of the process that ran it unusable, so
in the benchmark process it would wreck every case after it -- the Triton kernels' and the baselines' too. So
the first time a family meets such a face, a spawned child builds one small case of that op with the family's
own ``setup``, runs the face and the bf16 baseline and compares them; only a face that comes back correct is
timed in the main process. The answer is cached per (family, op, face) for the run.
"""

from __future__ import annotations

import importlib
import multiprocessing

import torch

# (N, K) of the probe: N ends in a partial 128-block, K in a partial 128-wide K block; K % 16 == 0 for TMA.
PROBE_SHAPE = {"M": 300, "N": 264, "K": 1040}
TIMEOUT_S = 180.0

_verdicts: dict[tuple, str | None] = {}
_in_child = False  # set in the probe process: its own setup must not probe again


def _child(conn, family_module: str, op_name: str, face: str, baseline: str, tolerance: float,
           device: str) -> None:
    global _in_child
    _in_child = True
    try:
        from bench.common import rel_errors

        family = importlib.import_module(family_module)
        params = dict(PROBE_SHAPE, layer="probe", faces=[face])
        setup = family.setup(op_name, params, torch.device(device))
        ours = setup.impls[f"ours:{face}"]
        if ours.fn is None:
            conn.send(f"unavailable in the probe process: {ours.unavailable}")
            return
        got, want = ours.fn(), setup.impls[baseline].fn()
        if device == "cuda":
            torch.cuda.synchronize()  # a kernel fault surfaces here, in the child
        worst = max(rel_errors(got, want).values(), default=float("inf"))
        conn.send(None if worst <= tolerance else
                  f"probe M={PROBE_SHAPE['M']} N={PROBE_SHAPE['N']} K={PROBE_SHAPE['K']}: relative error {worst:.3g} "
                  f"vs {baseline} above the tolerance {tolerance:g}")
    except BaseException as exc:  # noqa: BLE001 - report anything back to the parent
        conn.send(f"probe failed: {type(exc).__name__}: {exc}")
    finally:
        conn.close()


def unverified_face_problem(family_module: str, op_name: str, face: str, baseline: str, tolerance: float,
                            device: str = "cuda") -> str | None:
    """None when ``face`` of ``op_name`` ran correctly on ``device`` in a child process (then the caller may time
    it here), else why it must not run in this process. Inside a probe, or without the device, nothing to do."""
    if _in_child or (device == "cuda" and not torch.cuda.is_available()):
        return None
    key = (family_module, op_name, face, device, tolerance)
    if key not in _verdicts:
        ctx = multiprocessing.get_context("spawn")  # a fork would inherit this process's CUDA state
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(sender, family_module, op_name, face, baseline, tolerance, device),
                           daemon=True)
        proc.start()
        sender.close()
        try:
            verdict = receiver.recv() if receiver.poll(TIMEOUT_S) else f"probe timed out after {TIMEOUT_S:.0f} s"
        except EOFError:
            verdict = f"probe process died (exit code {proc.exitcode}) without an answer"
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()
            receiver.close()
        _verdicts[key] = verdict
        print(f"[bench] probe of {op_name}'s {face} face in a child process: {verdict or 'ok'}", flush=True)
    return _verdicts[key]
