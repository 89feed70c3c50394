"""The benchmark harness runs end to end and measures what it claims (no timing assertions).

- ``python -m bench --quick`` on the test device writes strict JSON with the documented fields, a PNG, and
  prints the table last; an op that is missing is reported as unavailable, never a crash.
- Peak memory is measured, not estimated: known allocations come out at their size (tolerance 1 MiB: page
  and allocator rounding; without the harness's malloc setting the CPU probe was seen 4-16 MiB off), and
  memory freed inside the call does not count twice.
- The naive baselines compute the published formulas (checked against float64 in this file; fp32 inputs, so
  ~1e-6 relative error is expected: tolerance 1e-5).
"""

import importlib.util
import json
import sys
import textwrap

import torch

from bench import __main__ as cli
from bench import measure, rl_losses, runner

MIB = 1 << 20


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_quick_run_writes_json_png_and_table(tmp_path, device, capsys):
    # one family here: every other family's quick run is tested in its own file (tests/test_bench_<family>.py)
    assert cli.main(["--family", "rl", "--quick", "--device", device.type, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("case "))
    assert all(not line.startswith(("[", "wrote")) for line in out[header:]), "the table must come last"

    result = _strict_json(tmp_path / f"rl_{device.type}.json")
    assert result["schema"] == runner.SCHEMA and result["family"] == "rl"
    assert result["quick"] is True and result["complete"] is True
    env = result["env"]
    for key in ("hostname", "cpu_model", "cpu_count"):
        assert env["machine"][key]
    assert env["software"]["torch"] == torch.__version__ and env["software"]["python"]
    assert {"commit", "dirty"} <= env["git"].keys() and env["date_utc"]
    if device.type == "cuda":
        assert env["device"]["name"] and env["device"]["sm_count"] > 0
    assert {"time", "memory", "error", "timed_region"} <= result["method"].keys()

    names = {c["case"] for c in result["cases"]}
    assert names == {"fused_linear_logprobs", "policy_loss", "linear_policy_loss"}
    for case in result["cases"]:
        assert case["status"] in ("ok", "unavailable", "error")
        naive = case["impls"]["naive"]
        assert naive["status"] == "ok", naive  # our own baseline must always run
        for label, impl in case["impls"].items():
            assert impl["status"] in ("ok", "unavailable", "error")
            if impl["status"] == "ok":
                assert impl["time_ms"] > 0 and impl["time"]["repeats"] >= 1
                assert impl["peak_mib"] >= 0 and impl["memory"]["method"]
            else:
                assert impl["reason"], label
        for comp in case["comparisons"]:
            assert case["impls"][comp["ours"]]["role"] == "ours"
            assert case["impls"][comp["baseline"]]["role"] == "baseline"
            assert set(comp["rel_errors"]) and isinstance(comp["within_tolerance"], bool)
    linear = next(c for c in result["cases"] if c["case"] == "linear_policy_loss")
    if importlib.util.find_spec("liger_kernel") is None:
        assert linear["impls"]["liger"]["status"] == "unavailable"
        assert "liger_kernel" in linear["impls"]["liger"]["reason"]

    if importlib.util.find_spec("matplotlib") is None:  # optional on the GPU machine: the JSON says so
        assert result["plot"].startswith("matplotlib unavailable")
        return
    assert result["plot"] == f"rl_{device.type}.png"
    png = (tmp_path / result["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_missing_op_is_reported_unavailable(device, monkeypatch):
    monkeypatch.setattr(rl_losses, "load", lambda module, attr: (None, f"{module}.{attr} unavailable (test)"))
    spec = next(s for s in rl_losses.cases(device, quick=True) if s.name == "policy_loss")
    record = runner.run_case(rl_losses, "bench.rl_losses", spec, device, quick=True)
    assert record["status"] == "unavailable"
    ours = [i for i in record["impls"].values() if i["role"] == "ours"]
    assert ours and all(i["status"] == "unavailable" and "(test)" in i["reason"] for i in ours)
    assert record["impls"]["naive"]["status"] == "ok" and record["comparisons"] == []


_ALLOCATING_FAMILY = '''
import torch
from bench.common import CaseSetup, Impl

def setup(name, params, device):
    mib = 1 << 20
    def sequential():
        # 24 MiB freed before 2 x 20 MiB are taken: the peak is 40, not 64. On the CPU this also catches
        # a heap that keeps the warm-up call's blocks resident (glibc raises its mmap threshold to 24 MiB
        # after the first free, so the 20 MiB blocks would come from, and stay in, the heap): the
        # measured call would then reuse them and report only 24.
        a = torch.ones(24 * mib, dtype=torch.uint8, device=device)
        del a
        b = torch.ones(20 * mib, dtype=torch.uint8, device=device)
        return {"b": b, "c": torch.ones(20 * mib, dtype=torch.uint8, device=device)}
    def together():
        a = torch.ones(32 * mib, dtype=torch.uint8, device=device)
        b = torch.ones(48 * mib, dtype=torch.uint8, device=device)
        return {"a": a, "b": b}
    return CaseSetup({"sequential": Impl("ours", sequential), "together": Impl("baseline", together)}, 0.0)
'''


def test_peak_memory_is_measured(tmp_path, device, monkeypatch):
    (tmp_path / "alloc_family.py").write_text(textwrap.dedent(_ALLOCATING_FAMILY))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("alloc_family", None)
    import alloc_family

    for label, expected in (("sequential", 40), ("together", 80)):
        if device.type == "cuda":
            fn = alloc_family.setup("alloc", {}, device).impls[label].fn
            got = measure.peak_cuda(fn)
        else:
            got = measure.peak_cpu_subprocess("alloc_family", "alloc", {}, label, timeout_s=120)
        assert "error" not in got, got
        assert abs(got["peak_mib"] - expected) <= 1, (label, got)


def test_naive_logprobs_match_float64_formula(device):
    gen = torch.Generator(device=device).manual_seed(3)
    n, h, v, temp = 37, 24, 1001, 0.7
    hidden = torch.randn(n, h, generator=gen, device=device)
    weight = torch.randn(v, h, generator=gen, device=device) * 0.5
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    lp, ent = rl_losses.naive_logprobs(hidden, weight, labels, temp)
    z = (hidden.double() @ weight.double().T) / temp
    lse = torch.logsumexp(z, dim=-1)
    ref_lp = z[torch.arange(n, device=device), labels] - lse
    ref_ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    assert (lp.double() - ref_lp).norm() / ref_lp.norm() < 1e-5
    assert (ent.double() - ref_ent).norm() / ref_ent.norm() < 1e-5


def test_naive_policy_loss_matches_piecewise_float64_formula(device):
    """max(-A r, -A clip(r)) written piecewise: A >= 0 -> -A min(r, 1+eps_hi); A < 0 -> -A max(r, 1-eps_lo)."""
    gen = torch.Generator(device=device).manual_seed(4)
    b, t = 5, 33
    lp = -3 * torch.rand(b, t, generator=gen, device=device)
    old = lp + 0.3 * torch.randn(b, t, generator=gen, device=device)  # wide enough that both clips bite
    adv = torch.randn(b, 1, generator=gen, device=device).expand(b, t)
    mask = (torch.rand(b, t, generator=gen, device=device) < 0.8).float()

    lp32 = lp.clone().requires_grad_(True)
    loss = rl_losses.naive_policy_loss(lp32, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, lp32)

    lp64 = lp.double().requires_grad_(True)
    r = torch.exp(lp64 - old.double())
    a = adv.double()
    per_token = torch.where(a >= 0, -a * torch.clamp(r, max=1 + rl_losses.CLIP_HIGH),
                            -a * torch.clamp(r, min=1 - rl_losses.CLIP_LOW))
    ref = (per_token * mask).sum() / mask.sum()
    (ref_grad,) = torch.autograd.grad(ref, lp64)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert (grad.double() - ref_grad).norm() / ref_grad.norm() < 1e-5
    clipped = ((r > 1 + rl_losses.CLIP_HIGH) & (a > 0)) | ((r < 1 - rl_losses.CLIP_LOW) & (a < 0))
    assert clipped.any() and (~clipped).any()  # both branches were exercised


def test_setup_is_deterministic():
    """The CPU memory probe rebuilds a case from (name, params) in another process: same inputs each time
    (checked on the CPU, where the naive computation itself is bitwise reproducible)."""
    cpu = torch.device("cpu")
    for spec in rl_losses.cases(cpu, quick=True):
        first = rl_losses.setup(spec.name, spec.params, cpu).impls["naive"].fn()
        again = rl_losses.setup(spec.name, spec.params, cpu).impls["naive"].fn()
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first), spec.name
