"""Vocabulary-parallel fused_linear_logprobs on 2 gloo ranks (CPU) with uneven shards.

Each rank holds weight/bias rows [vocab_start, vocab_start + V_r); labels are global ids. Compared with the
unsharded op in the same process (same face; tolerance 1e-5, fp32 rounding of the shard combination) and
with a float64 reference from the formulas (1e-5): logprobs, entropy, d hidden, and the concatenation of
every rank's d weight / d bias shard. Always CPU tensors (one GPU cannot host two NCCL ranks), so the triton
face runs in the interpreter; the cpu face is included once its C++ kernels are registered.
"""

import functools

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_on_gloo_ranks
from mgpt_ops._backend import available_backends

WORLD = 2
SHARDS = (37, 24)  # uneven on purpose
ROWS, WIDTH = 29, 16


def tp_faces() -> list[str]:
    faces = available_backends(torch.device("cpu"), ("reference", "triton", "cpu"))
    has_cpu_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("mgpt::logits_row_stats", "CPU")
    return [f for f in faces if f != "cpu" or has_cpu_kernels]


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float("inf") if torch.isnan(out).any() else ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _reference64(h, w, b, labels, temperature, ignore_index):
    logp = torch.log_softmax((h @ w.T + b) / temperature, dim=-1)
    keep = labels != ignore_index
    picked = logp.gather(1, torch.where(keep, labels, 0)[:, None]).squeeze(1)
    return torch.where(keep, picked, 0.0), torch.where(keep, -(logp.exp() * logp).sum(-1), 0.0)


def _case(rank: int, face: str) -> dict:
    import mgpt_ops
    from mgpt_ops.rl.logprobs import fused_linear_logprobs

    gen = torch.Generator().manual_seed(1234)  # identical inputs on every rank
    vocab, temperature = sum(SHARDS), 0.8
    h = torch.randn(ROWS, WIDTH, generator=gen)
    w = torch.randn(vocab, WIDTH, generator=gen) * 0.6
    b = torch.randn(vocab, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (ROWS,), generator=gen)
    labels[[0, 1, 2]] = torch.tensor([0, vocab - 1, SHARDS[0]])  # both shard edges
    labels[[5, 11]] = -100
    g_lp, g_ent = torch.randn(ROWS, generator=gen), torch.randn(ROWS, generator=gen)
    start = sum(SHARDS[:rank])
    local = slice(start, start + SHARDS[rank])

    def run(weight, bias, **kwargs):
        leaves = [t.clone().requires_grad_() for t in (h, weight, bias)]
        with mgpt_ops.use_backend(face):
            lp, ent = fused_linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], temperature=temperature,
                                            **kwargs)
            grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), leaves)
        return [lp, ent, *grads]

    # Different block sizes per rank are fine: blocks are walked locally, collectives run once per pass.
    sharded = run(w[local], b[local], process_group=dist.group.WORLD, chunk_size=5 + 3 * rank)
    unsharded = run(w, b, chunk_size=7)
    shards_w, shards_b = [None] * WORLD, [None] * WORLD
    dist.all_gather_object(shards_w, sharded[3])
    dist.all_gather_object(shards_b, sharded[4])
    sharded[3], sharded[4] = torch.cat(shards_w), torch.cat(shards_b)

    leaves64 = [t.double().requires_grad_() for t in (h, w, b)]
    lp64, ent64 = _reference64(*leaves64, labels, temperature, -100)
    ref = [lp64, ent64, *torch.autograd.grad((lp64 * g_lp.double()).sum() + (ent64 * g_ent.double()).sum(),
                                             leaves64)]
    names = ("logprobs", "entropy", "dhidden", "dweight", "dbias")
    return {
        "vs_unsharded": {n: _rel(s, u) for n, s, u in zip(names, sharded, unsharded)},
        "vs_float64": {n: _rel(s, r) for n, s, r in zip(names, sharded, ref)},
        "dtypes_ok": all(g.dtype == torch.float32 for g in sharded),
    }


def _error_message(rows: int, label: int) -> str:
    from mgpt_ops.rl.logprobs import fused_linear_logprobs

    try:
        fused_linear_logprobs(torch.randn(rows, 8), torch.randn(10 + rows, 8), torch.full((rows,), label),
                              process_group=dist.group.WORLD)
    except ValueError as exc:
        return str(exc)
    return "no error"


def _rank_body(faces: list[str], rank: int) -> dict:
    return {"faces": {face: _case(rank, face) for face in faces},
            # Ranks passing different token counts get a clear error on every rank, not a hang.
            "mismatch": _error_message(rows=4 + rank, label=0),
            # Labels are checked against the global vocabulary (11 + 11 = 22 ids here).
            "label_range": _error_message(rows=1, label=22),
            "label_ok": _error_message(rows=1, label=21)}


@pytest.mark.distributed
def test_vocab_parallel_matches_unsharded_and_reference(tmp_path):
    # One spawn for all faces (ranks take seconds to start).
    faces = tp_faces()
    for rank, result in enumerate(run_on_gloo_ranks(functools.partial(_rank_body, faces), WORLD, tmp_path)):
        assert "same 'hidden' rows" in result["mismatch"] and "N=[4, 5]" in result["mismatch"], result["mismatch"]
        assert "'labels'" in result["label_range"] and "[0, 22)" in result["label_range"], result["label_range"]
        assert result["label_ok"] == "no error", result["label_ok"]
        assert set(result["faces"]) == set(faces)
        for face, errors in result["faces"].items():
            assert errors["dtypes_ok"], (rank, face)
            for kind in ("vs_unsharded", "vs_float64"):
                assert max(errors[kind].values()) < 1e-5, (rank, face, kind, errors[kind])
