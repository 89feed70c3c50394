"""The vision benchmark family runs end to end and builds the inputs it claims (no timing assertions).

- ``python -m bench --family vision --quick`` on the test device writes strict JSON with every contender
  either measured or unavailable with a reason (the op may still be missing: never a crash, never an error).
- Token layout: the benchmark shapes have the token counts of the real towers (patch grids, 64-token
  windows), windows are 8x8-patch tiles of one image covering it exactly once (and match HF's
  ``get_vision_window_index`` where this transformers has it), positions follow the 2x2 merge order.
- RoPE tables equal the HF vision formula (written out here in float64; fp32 angles up to ~100 rad: 1e-5
  absolute), and rotated dot products depend only on the relative 2D offset.
- The HF per-image SDPA baseline computes softmax attention after RoPE (forward and gradients against a
  float64 statement in this file; fp32 inputs: tolerance 1e-5).
"""

import importlib.util
import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import __main__ as cli
from bench import runner
from bench import vision_attention as va

QUICK_CASES = {"qwen3_vl_images", "qwen2_5_vl_windows", "qwen2_5_vl_windows:fwd"}


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_quick_run_writes_json_with_every_contender_accounted_for(tmp_path, device, capsys):
    assert cli.main(["--family", "vision", "--quick", "--device", device.type, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "qwen2_5_vl_windows" in out.strip().splitlines()[-2]  # the table comes last

    result = _strict_json(tmp_path / f"vision_{device.type}.json")
    assert result["schema"] == runner.SCHEMA and result["family"] == "vision"
    assert result["quick"] is True and result["complete"] is True
    assert {c["case"] for c in result["cases"]} == QUICK_CASES
    for case in result["cases"]:
        impls = case["impls"]
        assert set(impls) == {f"ours:{f}" for f in case["params"]["faces"]} | {"hf_sdpa", "varlen_attn", "flash_attn"}
        assert impls["hf_sdpa"]["status"] == "ok", impls["hf_sdpa"]  # our own baseline must always run
        for label, entry in impls.items():
            assert entry["status"] in ("ok", "unavailable"), (case["case"], label, entry)
            if entry["status"] == "ok":
                assert entry["time_ms"] > 0 and entry["peak_mib"] >= 0 and entry["tflop_per_s"] > 0
            else:
                assert entry["reason"], label
        if device.type == "cpu":
            for label in ("varlen_attn", "flash_attn"):
                assert impls[label]["status"] == "unavailable"
            assert case["params"]["matmul_peak_tflops"] is None
        else:
            assert case["params"]["matmul_peak_tflops"] > 0
        forward_only = case["case"].endswith(":fwd")
        expected_outputs = {"out"} if forward_only else {"out", "grad_q", "grad_k", "grad_v"}
        for comp in case["comparisons"]:
            assert set(comp["rel_errors"]) == expected_outputs
            assert comp["within_tolerance"], comp
        assert case["flops"] > 0 and case["min_bytes"] > 0
        assert case["params"]["goal"] is False  # quick shapes carry no goal
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "vision_cpu.png" if device.type == "cpu" else tmp_path / "vision_cuda.png").exists()
    report = va.goal_lines(result)
    assert len(report) == 1 + len(QUICK_CASES)


def test_missing_op_is_reported_unavailable(device, monkeypatch):
    real_load = va.load
    monkeypatch.setattr(va, "load", lambda module, attr: (None, "missing (test)") if module.startswith("mgpt_ops")
                        else real_load(module, attr))
    spec = next(s for s in va.cases(device, quick=True) if s.name == "qwen3_vl_images")
    setup = va.setup(spec.name, spec.params, device)
    ours = [i for i in setup.impls.values() if i.role == "ours"]
    assert ours and all(i.fn is None and i.unavailable == "missing (test)" for i in ours)
    assert setup.impls["hf_sdpa"].fn is not None


def test_face_the_op_lacks_is_not_timed_under_its_label(monkeypatch):
    """Pinning a face an op does not have gives its automatic choice: that must not be timed as the face."""
    fake_op = object()
    declared = {"vision_attention": (fake_op, None), "FACES": (("reference", "triton", "cuda"), None),
                "usable_faces": (lambda device: ["reference", "triton"], None)}
    monkeypatch.setattr(va, "load", lambda module, attr: declared.get(attr, (None, "absent")))
    cpu = torch.device("cpu")
    params = dict(size=va._TINY["qwen3_vl_images"], dtype="fp32", backward=True, faces=["cpu", "cuda", "triton"],
                  goal=True, matmul_peak_tflops=None)
    setup = va.setup("qwen3_vl_images", params, cpu)
    assert setup.impls["ours:cpu"].fn is None and "no 'cpu' face" in setup.impls["ours:cpu"].unavailable
    assert setup.impls["ours:cuda"].fn is None and "cannot run" in setup.impls["ours:cuda"].unavailable
    assert setup.impls["ours:triton"].fn is not None
    # the goal names the best baseline present: only HF's path runs here
    assert setup.goal.baseline == "hf_sdpa" and setup.goal.max_time_ratio == pytest.approx(1 / 1.3)


def test_benchmark_shapes_have_the_towers_token_counts():
    def lengths(name):
        layout = va.token_layout(va.SCENARIOS[name])
        cu = layout["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0
        per_seq = (cu[1:] - cu[:-1]).tolist()
        assert layout["max_seqlen"] == max(per_seq) and layout["positions"].shape == (cu[-1].item(), 2)
        return per_seq

    assert lengths("qwen3_vl_images") == [(1024 // 16) ** 2] * 8  # 4096 patches per 1024^2 image
    # (H/16)(W/16) after snapping each side to 32 px: 720 -> 704, 1008 -> 1024 (round half to even)
    assert lengths("qwen3_vl_mixed") == [14 * 14, 30 * 40, 48 * 64, 44 * 80, 64 * 64, 64 * 112]
    assert lengths("qwen2_5_vl_full") == [(1344 // 14) ** 2] * 4  # 9216
    assert lengths("qwen2_5_vl_windows") == [64] * (4 * (96 // 8) ** 2)  # 8x8-patch windows, 576 of them
    specs = {s.name: s for s in va.cases(torch.device("cpu"), quick=False)}
    assert "S=32" in specs["qwen2_5_vl_windows"].shape and "D=80" in specs["qwen2_5_vl_full"].shape


def test_gpu_case_list(monkeypatch):
    """Built without a GPU (the peak measurement stubbed): fwd+bwd and forward-only per shape, bf16, goals on
    all but the forward of the memory-bound windows."""
    monkeypatch.setattr(va, "matmul_peak_tflops", lambda device: 790.0)
    specs = va.cases(torch.device("cuda"), quick=False)
    assert [s.name for s in specs] == [n + suffix for n in va.SCENARIOS for suffix in ("", ":fwd")]
    for spec in specs:
        assert spec.params["dtype"] == "bf16" and spec.params["faces"] == ["triton", "cuda"]
        assert spec.params["backward"] == (not spec.name.endswith(":fwd"))
        assert spec.params["goal"] == (spec.name != "qwen2_5_vl_windows:fwd")
        assert spec.params["matmul_peak_tflops"] == 790.0


def test_merge_order_positions():
    rows, cols = 6, 8
    pos = va.merge_order_positions(rows, cols).tolist()
    expected = []
    for t in range(rows * cols):
        block, inner = divmod(t, 4)
        block_row, block_col = divmod(block, cols // 2)
        expected.append([2 * block_row + inner // 2, 2 * block_col + inner % 2])
    assert pos == expected


@pytest.mark.parametrize("grid", [(16, 12), (10, 22), (8, 8), (2, 2), (96, 96)])
def test_windows_tile_each_image_once(grid):
    """Every window is the full 8x8-patch tile (cut by the border) of one image, tiles in row-major order,
    each merge block's four tokens consecutive."""
    rows, cols = grid
    scenario = dict(patch=14, window_px=112, sequences="windows", images=[(rows * 14, cols * 14), (4 * 14, 6 * 14)])
    layout = va.token_layout(scenario)
    cu, pos = layout["cu_seqlens"].tolist(), layout["positions"]
    previous = (-1, None)
    for s in range(len(cu) - 1):
        window = pos[cu[s]:cu[s + 1]]
        image = 0 if cu[s] < rows * cols else 1
        img_rows, img_cols = (rows, cols) if image == 0 else (4, 6)
        tiles = {(r // 8, c // 8) for r, c in window.tolist()}
        assert len(tiles) == 1, (s, tiles)
        tile = tiles.pop()
        assert (image, tile) > previous, "windows must be in row-major order per image"
        previous = (image, tile)
        expected = {(r, c) for r in range(8 * tile[0], min(8 * tile[0] + 8, img_rows))
                    for c in range(8 * tile[1], min(8 * tile[1] + 8, img_cols))}
        assert sorted(map(tuple, window.tolist())) == sorted(expected) and len(window) <= 64
        blocks = (window // 2).reshape(-1, 4, 2)
        assert (blocks == blocks[:, :1]).all()  # a merge block's four tokens stay together
        block_order = [tuple(b) for b in blocks[:, 0].tolist()]
        assert block_order == sorted(block_order)  # blocks row-major inside the window
    assert cu[-1] == rows * cols + 24


def test_window_partition_matches_hf():
    vision_utils = pytest.importorskip("transformers.vision_utils",
                                       reason="this transformers has no shared get_vision_window_index")
    if not hasattr(vision_utils, "get_vision_window_index"):
        pytest.skip("this transformers has no shared get_vision_window_index")
    for rows, cols in ((16, 12), (10, 22), (96, 96), (8, 16)):
        order, lengths = va.window_partition(rows, cols, window_blocks=4)
        index, cu = vision_utils.get_vision_window_index(torch.tensor([[1, rows, cols]]), spatial_merge_size=2,
                                                         window_size=112, patch_size=14)
        assert order.tolist() == index.tolist()
        assert [0] + torch.tensor(lengths).cumsum(0).tolist() == cu.tolist()


def _hf_angle_table(positions, head_dim, theta=10_000.0):
    """Column i of the HF vision RoPE angle for (row, col): i mod D/2 < D/4 -> row * theta^(-4 (i mod D/2) / D),
    else col * theta^(-4 (i mod D/2 - D/4) / D)."""
    quarter = head_dim // 4
    table = torch.empty(len(positions), head_dim, dtype=torch.float64)
    for i in range(head_dim):
        j = i % (head_dim // 2)
        coord, k = (0, j) if j < quarter else (1, j - quarter)
        table[:, i] = positions[:, coord].double() * theta ** (-4.0 * k / head_dim)
    return table


@pytest.mark.parametrize("head_dim", [72, 80, 64])
def test_rotary_tables_follow_the_hf_formula(head_dim):
    positions = va.token_layout(dict(patch=16, images=[(1792, 1024), (224, 224)]))["positions"]
    cos, sin = va.rotary_tables(positions, head_dim)
    assert cos.dtype == torch.float32 and cos.shape == (len(positions), head_dim)
    angles = _hf_angle_table(positions, head_dim)
    assert (cos.double() - angles.cos()).abs().max() < 1e-5
    assert (sin.double() - angles.sin()).abs().max() < 1e-5


def test_rotated_scores_depend_only_on_relative_position():
    head_dim, gen = 72, torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 1, head_dim, generator=gen, dtype=torch.float64).unbind(0)
    pairs = torch.tensor([[3, 7], [10, 2], [13, 17], [20, 12]])  # (q pos, k pos) and the same shifted by (10, 10)
    cos, sin = (t.double() for t in va.rotary_tables(pairs, head_dim))
    rot = lambda x, i: x * cos[i] + va.rotate_half(x) * sin[i]  # noqa: E731
    assert torch.allclose((rot(q, 0) * rot(k, 1)).sum(), (rot(q, 2) * rot(k, 3)).sum(), atol=1e-10)
    assert not torch.allclose((rot(q, 0) * rot(k, 1)).sum(), (rot(q, 0) * rot(k, 3)).sum(), atol=1e-3)


def test_hf_sdpa_baseline_matches_float64_attention(device):
    gen = torch.Generator(device=device).manual_seed(11)
    cu = torch.tensor([0, 1, 64, 65, 130], dtype=torch.int32, device=device)  # lengths 1, 63, 1, 65
    n, heads, head_dim = 130, 3, 72
    positions = torch.randint(0, 40, (n, 2), generator=gen, device=device)
    cos, sin = va.rotary_tables(positions.cpu(), head_dim)
    cos, sin = cos.to(device), sin.to(device)
    q, k, v = (torch.randn(n, heads, head_dim, generator=gen, device=device, requires_grad=True) for _ in range(3))
    dout = torch.randn(n, heads, head_dim, generator=gen, device=device)
    # the math backend: this checks the baseline's formula, not a fused kernel's fp32 rounding (TF32 paths)
    with sdpa_kernel(SDPBackend.MATH):
        out = va.hf_sdpa_attention(q, k, v, cu, cos, sin)
        grads = torch.autograd.grad(out, (q, k, v), dout)

    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    c, s = cos.double()[:, None], sin.double()[:, None]
    half = head_dim // 2
    rotate = lambda x: x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s  # noqa: E731
    qr, kr = rotate(q64), rotate(k64)
    bounds = cu.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        probs = torch.softmax(torch.einsum("ihd,jhd->hij", qr[a:b], kr[a:b]) / math.sqrt(head_dim), dim=-1)
        outs.append(torch.einsum("hij,jhd->ihd", probs, v64[a:b]))
    ref = torch.cat(outs)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert (out.double() - ref).norm() / ref.norm() < 1e-5
    for got, want in zip(grads, ref_grads):
        assert (got.double() - want).norm() / want.norm() < 1e-5


def test_flops_count_every_sequence():
    cu = torch.tensor([0, 3, 7, 7], dtype=torch.int32)  # lengths 3, 4 and an empty one
    assert va.attention_flops(cu, heads=2, head_dim=8) == 4 * (9 + 16) * 2 * 8
    cpu = torch.device("cpu")
    spec = next(s for s in va.cases(cpu, quick=True) if s.name == "qwen3_vl_images")
    setup = va.setup(spec.name, spec.params, cpu)
    layout = va.token_layout(va._scenario(spec.name, spec.params))
    assert setup.flops == pytest.approx(3.5 * va.attention_flops(layout["cu_seqlens"], 2, 72))


def test_goal_report_uses_the_fastest_baseline():
    def impl(role, ms, tflops=None):
        return {"role": role, "status": "ok", "time_ms": ms, "tflop_per_s": tflops}

    both = {"ours:triton": impl("ours", 7.0), "ours:cuda": impl("ours", 9.0), "hf_sdpa": impl("baseline", 30.0),
            "varlen_attn": impl("baseline", 10.0)}
    forward = {"ours:triton": impl("ours", 1.0, 440.0), "hf_sdpa": impl("baseline", 2.0, 220.0)}
    result = {"cases": [{"case": "a", "params": {"goal": True}, "impls": both},
                        {"case": "a:fwd", "params": {"goal": True, "matmul_peak_tflops": 800.0}, "impls": forward}]}
    lines = va.goal_lines(result)
    assert "varlen_attn" in lines[1] and "0.70x" in lines[1] and lines[1].endswith("met")
    assert "55%" in lines[2] and lines[2].endswith("MISSED")
