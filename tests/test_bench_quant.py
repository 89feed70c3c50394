"""The quant benchmark family runs end to end and builds the inputs it claims (no timing assertions).

- ``python -m bench --family quant --quick`` writes strict JSON with every contender measured or unavailable with
  a reason (never a crash), and every comparison of ours with a baseline within tolerance.
- Every contender of every quick case -- ours pinned to each face that runs here (reference, the Triton
  interpreter, the C++ kernels where registered), and the baselines -- computes the quantized product: checked
  against float64 formulas written here (block scales, int4 codes unpacked nibble by nibble, per-expert rows).
- The GPU case list has the Qwen3-VL shapes and token counts; the random router gives each token TOP_K distinct
  experts.
"""

import json

import pytest
import torch

from bench import __main__ as cli
from bench import quant_gemm as qg
from bench import runner

QUICK_CASES = {"scaled_mm", "block_scaled_mm", "w4a16_mm", "grouped_block_scaled_mm"}
BASELINES = {"scaled_mm": {"bf16_mm", "torch_scaled_mm"}, "block_scaled_mm": {"bf16_mm", "torchao_blockwise"},
             "w4a16_mm": {"bf16_mm"}, "grouped_block_scaled_mm": {"bf16_loop"}}


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_quick_run_writes_json_with_every_contender_accounted_for(tmp_path, device, capsys):
    assert cli.main(["--family", "quant", "--quick", "--device", device.type, "--out", str(tmp_path)]) == 0
    assert "grouped_block_scaled_mm" in capsys.readouterr().out
    result = _strict_json(tmp_path / f"quant_{device.type}.json")
    assert result["schema"] == runner.SCHEMA and result["family"] == "quant" and result["complete"] is True
    assert {c["case"] for c in result["cases"]} == QUICK_CASES
    for case in result["cases"]:
        impls = case["impls"]
        assert set(impls) == {f"ours:{f}" for f in case["params"]["faces"]} | BASELINES[case["case"]]
        for label, entry in impls.items():
            assert entry["status"] in ("ok", "unavailable"), (case["case"], label, entry)
            if entry["status"] == "ok":
                assert entry["time_ms"] > 0 and entry["tflop_per_s"] > 0 and entry["gb_per_s"] > 0
            else:
                assert entry["reason"], label
        assert impls["bf16_mm" if "bf16_mm" in impls else "bf16_loop"]["status"] == "ok"
        if device.type == "cpu":
            assert all(impls[b]["status"] == "unavailable" for b in ("torch_scaled_mm", "torchao_blockwise")
                       if b in impls)
        for comp in case["comparisons"]:
            assert comp["within_tolerance"], comp


# ------------------------------------------------------------------------------------------ float64 formulas

def block_formula(a, b, sa, sb):
    """out[m, n] = sum_k a[m, k] sa[m, k // 128] b[n, k] sb[n // 128, k // 128] in float64."""
    m, k = a.shape
    n = b.shape[0]
    a64 = a.double().cpu() * sa.double().cpu()[:, torch.arange(k) // 128]
    b64 = b.double().cpu() * sb.double().cpu()[torch.arange(n) // 128][:, torch.arange(k) // 128]
    return a64 @ b64.T


def int4_formula(x, qweight, scales, zeros, group):
    """w[n, k] = (nibble k % 8 of word qweight[n, k // 8] - zeros[n, k // g]) * scales[n, k // g]."""
    words = qweight.cpu().to(torch.int64) % 2**32
    n, k8 = words.shape
    codes = torch.stack([(words // 16**j) % 16 for j in range(8)], dim=-1).reshape(n, k8 * 8).double()
    cols = torch.arange(k8 * 8) // group
    w = (codes - zeros.cpu().double()[:, cols]) * scales.cpu().double()[:, cols]
    return x.cpu().double() @ w.T


def _faces_here(module, op, device):
    return [f for f in ("reference", "triton", "cpu") if f in qg._usable_faces(module, op, device)]


CASE_MODULES = {"scaled_mm": "mgpt_ops.quant.scaled_gemm", "block_scaled_mm": "mgpt_ops.quant.block_gemm",
                "w4a16_mm": "mgpt_ops.quant.w4a16", "grouped_block_scaled_mm": "mgpt_ops.quant.block_gemm"}


@pytest.mark.parametrize("name", sorted(QUICK_CASES))
def test_every_contender_computes_the_quantized_product(name, device, monkeypatch):
    """Rebuild the case's inputs with the same seeds as ``setup`` (captured through the op call) and check each
    contender's output against the float64 formula of the quantized operands."""
    spec = next(s for s in qg.cases(device, quick=True) if s.name == name)
    faces = _faces_here(CASE_MODULES[name], name, device)
    assert faces, "at least the reference face runs everywhere"
    captured = {}

    def capture(op):
        def spy(*args, **kwargs):
            captured["args"] = args
            return op(*args, **kwargs)
        return spy

    real_load = qg.load
    monkeypatch.setattr(qg, "load", lambda module, attr: (capture(real_load(module, attr)[0]), None)
                        if attr == name else real_load(module, attr))
    setup = qg.setup(name, dict(spec.params, faces=faces), device)
    outputs = {label: impl.fn()["out"] for label, impl in setup.impls.items() if impl.fn is not None}
    args = captured["args"]
    if name == "scaled_mm":
        a, b, sa, sb = args
        want = (a.double().cpu() * sa.double().cpu()) @ (b.double().cpu() * sb.double().cpu()).T
    elif name == "block_scaled_mm":
        want = block_formula(*args)
    elif name == "w4a16_mm":
        x, qweight, scales, zeros = args
        want = int4_formula(x, qweight, scales, zeros, 128)
    else:
        a, b, sa, sb, offsets = args
        bounds = offsets.tolist()
        want = torch.cat([block_formula(a[lo:hi], b[e], sa[lo:hi], sb[e])
                          for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))])
    assert {f"ours:{f}" for f in faces} <= outputs.keys() and len(outputs) > len(faces)
    for label, out in outputs.items():
        err = (out.double().cpu() - want).norm() / want.norm()
        assert out.dtype == torch.bfloat16 and err < qg.TOLERANCE, (label, float(err))


def test_missing_op_is_reported_unavailable(device, monkeypatch):
    real_load = qg.load
    monkeypatch.setattr(qg, "load", lambda module, attr: (None, "missing (test)") if module.startswith("mgpt_ops")
                        else real_load(module, attr))
    for spec in qg.cases(device, quick=True):
        setup = qg.setup(spec.name, spec.params, device)
        ours = [i for i in setup.impls.values() if i.role == "ours"]
        assert ours and all(i.fn is None and i.unavailable == "missing (test)" for i in ours)
        assert any(i.fn is not None for i in setup.impls.values() if i.role == "baseline")


def test_gpu_case_list():
    specs = qg.cases(torch.device("cuda"), quick=False)
    dense = {(s.name, s.params["N"], s.params["K"], s.params["M"]) for s in specs if "M" in s.params}
    for op in ("scaled_mm", "block_scaled_mm"):
        for n, k in ((12288, 4096), (4096, 12288), (1536, 2048), (2048, 768)):
            assert {(op, n, k, m) for m in (1, 16, 4096, 8192)} <= dense
    assert {("w4a16_mm", 12288, 4096, m) for m in (1, 16)} <= dense
    moe = [s.params for s in specs if s.name == "grouped_block_scaled_mm"]
    assert {(p["E"], p["N"], p["K"], p["tokens"]) for p in moe} == {
        (128, n, k, t) for n, k in ((1536, 2048), (2048, 768)) for t in (1, 16, 4096, 8192)}
    assert all(s.params["faces"] == ["triton", "cuda"] for s in specs)


@pytest.mark.parametrize("tokens,experts", [(1, 128), (37, 128), (5, 4)])
def test_router_gives_each_token_distinct_experts(tokens, experts):
    offsets = qg.route(tokens, experts, torch.device("cpu"))
    counts = offsets[1:] - offsets[:-1]
    assert offsets.dtype == torch.int32 and offsets[0] == 0 and (counts >= 0).all()
    assert offsets[-1] == tokens * min(qg.TOP_K, experts) and counts.max() <= tokens
    assert torch.equal(offsets, qg.route(tokens, experts, torch.device("cpu")))  # deterministic


def test_quick_faces_are_the_kernel_faces(device):
    kernel = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    assert all(s.params["faces"] == kernel for s in qg.cases(device, quick=True))


def test_unverified_faces_are_tried_in_a_child_process_first():
    """bench.face_probe runs a face in a spawned process on a small case of the family's own setup before the
    benchmark process may time it (a CUDA fault there would wreck every later case). Exercised on the CPU with the
    C++ face: a correct face passes, an impossible tolerance and a face the child cannot run are reasons, and
    without a GPU the CUDA probe is a no-op."""
    from bench import face_probe

    if "cpu" not in qg._usable_faces("mgpt_ops.quant.scaled_gemm", "scaled_mm", torch.device("cpu")):
        pytest.skip("the C++ extension is not built here")  # CI builds it: this runs there
    probe = lambda face, tolerance: face_probe.unverified_face_problem(  # noqa: E731
        "bench.quant_gemm", "scaled_mm", face, "bf16_mm", tolerance, device="cpu")
    assert probe("cpu", qg.TOLERANCE) is None
    assert "above the tolerance 0" in probe("cpu", 0.0)
    assert "unavailable in the probe process" in probe("cuda", qg.TOLERANCE)
    if not torch.cuda.is_available():
        assert face_probe.unverified_face_problem("bench.quant_gemm", "scaled_mm", "cuda", "bf16_mm", 1.0) is None
