"""mgpt::fused_linear_logprobs against an independent float64 reference written here from the formulas

    z = (h @ W.T + b) / T,  logprob = log_softmax(z)[label],  entropy = -sum_j p_j log p_j,

with gradients from float64 autograd. Tolerances (relative L2 error, ``conftest.rel_err``): 1e-5 for fp32
inputs (fp32 math end to end); 1e-2 for bf16/fp16 inputs (the reference sees the same rounded inputs; our
error comes from fp32 logits and, on CUDA, dlogits stored in bf16, and from rounding the gradients to bf16).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import mgpt_ops
from conftest import DEVICE, faces_here, rel_err
from hopper_compile import compile_in_subprocess
from mgpt_ops.rl._row_ops import row_grad_torch, row_stats_torch
from mgpt_ops.rl.logprobs import fused_linear_logprobs, row_kernels

FACES = faces_here(("reference", "triton", "cpu", "cuda"))
CHUNKED_FACES = [f for f in FACES if f != "reference"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def reference(h, w, labels, b, temperature, ignore_index):
    """float64 logprobs and entropy, straight from the definitions."""
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    logp = torch.log_softmax(z / temperature, dim=-1)
    keep = labels != ignore_index
    picked = logp.gather(-1, torch.where(keep, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.where(keep, picked, 0.0), torch.where(keep, entropy, 0.0)


def make_inputs(shape, hidden_size, vocab, dtype, device, *, bias=True, ignore_index=-100, ignored=0.2, seed=0):
    """Random inputs whose logits spread over several units (the softmax is neither flat nor one-hot)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden_size, generator=gen)
    w = torch.randn(vocab, hidden_size, generator=gen) * (2.0 / math.sqrt(hidden_size))
    b = torch.randn(vocab, generator=gen) * 0.5 if bias else None
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignored] = ignore_index
    g_lp, g_ent = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return move(h), move(w), labels.to(device), move(b), g_lp.to(device), g_ent.to(device)


def run_and_compare(face, h, w, labels, b, g_lp, g_ent, *, temperature=1.0, ignore_index=-100, chunk_size=None,
                    tol=None):
    tol = tol if tol is not None else TOL[h.dtype]
    leaves = [t.detach().clone().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    with mgpt_ops.use_backend(face):
        lp, ent = fused_linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if b is not None else None,
                                        temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size)
        assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == labels.shape
        grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), leaves)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_lp, ref_ent = reference(ref_leaves[0], ref_leaves[1], labels, ref_leaves[2] if b is not None else None,
                                temperature, ignore_index)
    ref_grads = torch.autograd.grad((ref_lp * g_lp.double()).sum() + (ref_ent * g_ent.double()).sum(), ref_leaves)

    errors = {"logprobs": rel_err(lp, ref_lp), "entropy": rel_err(ent, ref_ent)}
    errors.update({name: rel_err(g, r) for name, g, r in zip(("dhidden", "dweight", "dbias"), grads, ref_grads)})
    assert all(g.dtype == t.dtype for g, t in zip(grads, leaves))
    assert max(errors.values()) < tol, errors
    return lp, ent, grads


# ---------------------------------------------------------------------------------------------------------
# Numerics against the reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_with_uneven_chunks(face, dtype, device):
    # V = 333 in vocabulary blocks of 100: three full blocks and a tail of 33; temperature != 1; bias; 20% ignored.
    inputs = make_inputs((37,), 24, 333, dtype, device)
    run_and_compare(face, *inputs, temperature=0.8, chunk_size=100)


@pytest.mark.parametrize("face", FACES)
def test_leading_batch_dims_and_default_chunk(face, device):
    inputs = make_inputs((3, 7), 16, 50, torch.float32, device, seed=1)
    lp, ent, _ = run_and_compare(face, *inputs, temperature=1.3)
    assert lp.shape == ent.shape == (3, 7)


@pytest.mark.parametrize("face", FACES)
def test_qwen_vocabulary_size(face, device):
    # V = 151,936 (Qwen3): many vocabulary blocks per row, and the label anywhere in the row. Tolerance 1e-4:
    # dh = dlogits @ W is an fp32 sum of 151,936 terms that nearly cancel (sum_j dlogits_j = 0), so even plain
    # fp32 autograd (the reference face) lands ~5e-5 from float64 here.
    h, w, labels, b, g_lp, g_ent = make_inputs((5,), 8, 151_936, torch.float32, device, ignored=0.0, seed=2)
    labels[0], labels[1] = 0, 151_935
    run_and_compare(face, h, w, labels, b, g_lp, g_ent, temperature=0.9, chunk_size=40_000, tol=1e-4)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("ignore_index,temperature", [(7, 2.5), (-1, 0.6)])
def test_custom_ignore_index_int32_labels(face, ignore_index, temperature, device):
    # ignore_index 7 is a real vocabulary id: tokens labelled 7 must be ignored, not scored.
    h, w, labels, b, g_lp, g_ent = make_inputs((19,), 12, 40, torch.float32, device, ignore_index=ignore_index,
                                               seed=3)
    labels[:3] = ignore_index
    labels = labels.to(torch.int32)
    lp, ent, _ = run_and_compare(face, h, w, labels, b, g_lp, g_ent, temperature=temperature,
                                 ignore_index=ignore_index, chunk_size=16)
    ignored = labels == ignore_index
    assert ignored.sum() >= 3 and (lp[ignored] == 0).all() and (ent[ignored] == 0).all()


@pytest.mark.parametrize("face", FACES)
def test_all_rows_ignored_give_zeros(face, device):
    h, w, labels, b, g_lp, g_ent = make_inputs((9,), 8, 30, torch.float32, device, ignored=1.0, seed=4)
    lp, ent, grads = run_and_compare(face, h, w, labels, b, g_lp, g_ent, chunk_size=12)
    assert (lp == 0).all() and (ent == 0).all()
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("bias", [True, False])
def test_single_row(face, bias, device):
    inputs = make_inputs((1,), 5, 17, torch.float32, device, bias=bias, ignored=0.0, seed=5)
    run_and_compare(face, *inputs, temperature=0.7)


@pytest.mark.parametrize("face", FACES)
def test_autocast_behaves_like_the_linear_it_replaces(face, device):
    """Under torch.autocast fp32 inputs are cast to the autocast dtype (as F.linear's would be): the result equals
    the op on explicitly cast inputs, and the gradients reach the fp32 leaves in fp32."""
    h, w, labels, b, g_lp, _ = make_inputs((13,), 16, 40, torch.float32, device, bias=True, seed=21)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    with mgpt_ops.use_backend(face), torch.autocast(device.type, dtype=torch.bfloat16):
        lp, _ = fused_linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2])
    lp.backward(g_lp)
    cast = [t.detach().bfloat16().requires_grad_() for t in (h, w, b)]
    with mgpt_ops.use_backend(face):
        want, _ = fused_linear_logprobs(cast[0], cast[1], labels, bias=cast[2])
    want.backward(g_lp)
    assert torch.equal(lp, want)
    for leaf, ref in zip(leaves, cast):
        assert leaf.grad.dtype == torch.float32 and torch.equal(leaf.grad, ref.grad.float())


@pytest.mark.parametrize("face", FACES)
def test_without_entropy_and_frozen_weight(face, device):
    h, w, labels, b, g_lp, _ = make_inputs((11,), 8, 29, torch.float32, device, bias=False, seed=6)
    h = h.clone().requires_grad_()
    with mgpt_ops.use_backend(face):
        lp, ent = fused_linear_logprobs(h, w, labels, return_entropy=False, chunk_size=10)
        assert ent is None
        (dh,) = torch.autograd.grad((lp * g_lp).sum(), (h,))
    hd = h.detach().double().requires_grad_()
    ref_lp, _ = reference(hd, w, labels, None, 1.0, -100)
    (ref_dh,) = torch.autograd.grad((ref_lp * g_lp.double()).sum(), (hd,))
    assert rel_err(lp, ref_lp) < 1e-5 and rel_err(dh, ref_dh) < 1e-5


def test_float64_runs_on_reference_only(device):
    inputs = make_inputs((6,), 8, 20, torch.float64, device, seed=7)
    h, w, labels = inputs[:3]
    lp, ent = fused_linear_logprobs(h, w, labels)  # automatic choice: the reference face
    ref_lp, ref_ent = reference(h, w, labels, None, 1.0, -100)
    assert lp.dtype == torch.float64 and rel_err(lp, ref_lp) < 1e-12 and rel_err(ent, ref_ent) < 1e-12
    for face in CHUNKED_FACES:
        with mgpt_ops.use_backend(face), pytest.raises(TypeError, match="'hidden'.*float64"):
            fused_linear_logprobs(h, w, labels)


@pytest.mark.parametrize("face", FACES)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 40), hidden_size=st.integers(1, 24), vocab=st.integers(1, 300),
       blocks=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_random_shapes(face, n, hidden_size, vocab, blocks, seed):
    inputs = make_inputs((n,), hidden_size, vocab, torch.float32, torch.device(DEVICE), seed=seed)
    run_and_compare(face, *inputs, temperature=1.1, chunk_size=-(-vocab // blocks))


# ---------------------------------------------------------------------------------------------------------
# The row kernels themselves against the plain-PyTorch statement of their contract
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("face", CHUNKED_FACES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,vocab_start", [(6, 300, 0), (4, 5000, 1000), (3, 4097, 0)])
def test_row_kernels_follow_contract(face, out_dtype, rows, cols, vocab_start, device):
    gen = torch.Generator().manual_seed(cols)
    logits = (torch.randn(rows, cols, generator=gen) * 4).to(device)
    # Labels inside this shard, outside it (another rank's ids) and ignored.
    labels = torch.tensor([vocab_start + 3, vocab_start + cols - 1, vocab_start + cols + 5, -100, 2, 17])[:rows]
    labels = labels.to(device)
    inv_t = 1 / 0.7
    kernels = row_kernels(face)
    stats = kernels.stats(logits, labels, inv_t, vocab_start, -100)
    ref = row_stats_torch(logits.double(), labels, inv_t, vocab_start, -100)
    assert stats.dtype == torch.float32 and stats.shape == (rows, 4)
    for k in range(4):
        assert rel_err(stats[:, k], ref[:, k]) < 1e-5, k
    lse, mean_z = ref[:, 0] + ref[:, 1].log(), ref[:, 0] + ref[:, 2] / ref[:, 1]
    g_lp, g_ent = torch.randn(rows, generator=gen).to(device), torch.randn(rows, generator=gen).to(device)
    grad = kernels.grad(logits, labels, lse.float(), mean_z.float(), g_lp, g_ent, inv_t, vocab_start, -100, out_dtype)
    ref_grad = row_grad_torch(logits.double(), labels, lse, mean_z, g_lp.double(), g_ent.double(), inv_t,
                              vocab_start, -100, torch.float64)
    assert grad.dtype == out_dtype and grad.shape == logits.shape
    assert rel_err(grad, ref_grad) < (1e-5 if out_dtype == torch.float32 else 1e-2)
    assert (grad[labels == -100] == 0).all()


_LAUNCHES = """
from mgpt_ops.rl import logprobs_triton as kt
PATTERNS = {"16-byte loads": r"ld\\.global[^\\n]*\\.v4"}
with compile_launches_for_hopper() as kernels:
    rows, vocab = 64, 151936  # Qwen's vocabulary
    logits, labels = torch.randn(rows, vocab), torch.randint(0, vocab, (rows,))
    stats = kt.row_stats(logits, labels, 1.0, 0, -100)
    row = torch.rand(rows)
    kt.row_grad(logits, labels, row, row, row, row, 1.0, 0, -100, torch.bfloat16)
"""


def test_triton_kernels_compile_for_hopper_as_launched():
    """The interpreter accepts code that the compiler rejects (e.g. a non-constexpr global): compile both kernels
    as they are launched for sm_90 (no GPU needed) and check that the fp32 logits are read with 16-byte loads."""
    kernels = compile_in_subprocess(_LAUNCHES)
    assert [k.name for k in kernels] == ["_row_stats_kernel", "_row_grad_kernel"]
    assert all(k.count("16-byte loads") > 0 and k.stack_bytes == 0 for k in kernels), kernels


# ---------------------------------------------------------------------------------------------------------
# Memory: no [N, V] tensor, ever
# ---------------------------------------------------------------------------------------------------------
class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any aten op produces, including the ops inside mgpt
    custom ops (a dispatch mode otherwise sees a custom op as one opaque call, so those are re-dispatched with
    the mode pushed). Bytes, not elements: the Triton interpreter copies arguments as byte-typed storages."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.key = torch._C._dispatch_key_for_device(device.type)
        self.largest = 0
        self.mgpt_ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mgpt":
            self.mgpt_ops.add(func.name())
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(self.key), *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        sizes = [t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest] + sizes)
        return out


@pytest.mark.parametrize("face", CHUNKED_FACES)
def test_never_materialises_full_logits(face, device):
    n, vocab, chunk = 64, 300, 64  # H (16) < N so the weight-sized buffers stay below N * V too
    h, w, labels, b, g_lp, g_ent = make_inputs((n,), 16, vocab, torch.float32, device, seed=8)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    recorder = LargestTensor(device)
    with mgpt_ops.use_backend(face), recorder:
        lp, ent = fused_linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], chunk_size=chunk)
        torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), leaves)
    assert {"mgpt::fused_linear_logprobs", "mgpt::fused_linear_logprobs_backward"} <= recorder.mgpt_ops
    fp32 = 4  # bytes; the largest buffers allowed: one fp32 logits block [N, chunk], or the weight-sized dW
    assert recorder.largest <= fp32 * max(n * chunk, vocab * 16) < fp32 * n * vocab

    # The recorder does see a full [N, V] buffer when one exists: the reference face materialises it.
    sensitive = LargestTensor(device)
    with mgpt_ops.use_backend("reference"), sensitive:
        fused_linear_logprobs(h, w, labels, bias=b)
    assert sensitive.largest >= fp32 * n * vocab


# ---------------------------------------------------------------------------------------------------------
# Op registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("face", FACES)
def test_opcheck_both_ops(face, device):
    h, w, labels, b, g_lp, g_ent = make_inputs((10,), 8, 33, torch.float32, device, seed=9)
    h, w, b = (t.requires_grad_() for t in (h, w, b))
    with mgpt_ops.use_backend(face):
        torch.library.opcheck(torch.ops.mgpt.fused_linear_logprobs.default, (h, w, labels, b, 0.9, -100, 4))
        lp, ent, lse = torch.ops.mgpt.fused_linear_logprobs(h.detach(), w.detach(), labels, b.detach(), 0.9,
                                                            -100, 4)
        for mask in ([True, True, True], [True, False, False]):
            torch.library.opcheck(torch.ops.mgpt.fused_linear_logprobs_backward.default,
                                  (g_lp, g_ent, h.detach(), w.detach(), labels, b.detach(), lse, ent, 0.9, -100, 4,
                                   mask))


@pytest.mark.parametrize("face", FACES)
def test_compile_fullgraph_with_backward(face, device):
    h, w, labels, b, g_lp, g_ent = make_inputs((2, 6), 8, 40, torch.float32, device, seed=10)

    def loss_fn(h, w, b):
        lp, ent = fused_linear_logprobs(h, w, labels, bias=b, temperature=0.9, chunk_size=16)
        return (lp * g_lp).sum() + (ent * g_ent).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    grads = []
    for fn in (loss_fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        with mgpt_ops.use_backend(face):
            loss = fn(*leaves)
            grads.append([loss] + list(torch.autograd.grad(loss, leaves)))
    assert all(rel_err(c, e) < 1e-6 for e, c in zip(*grads))


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
BAD_INPUTS = {
    # case: (change to valid arguments, expected error, pattern its message must match)
    "hidden/weight dtypes differ": (lambda a: dict(hidden=a["hidden"].bfloat16()), TypeError, "hidden, weight"),
    "integer hidden": (lambda a: dict(hidden=a["hidden"].int()), TypeError, "'hidden'"),
    "float labels": (lambda a: dict(labels=a["labels"].float()), TypeError, "'labels'"),
    "H mismatch": (lambda a: dict(weight=a["weight"][:, :7]), ValueError, "'weight'"),
    "1-D hidden": (lambda a: dict(hidden=a["hidden"][0], labels=a["labels"][0]), ValueError, "'hidden'"),
    "labels shape": (lambda a: dict(labels=a["labels"][:5]), ValueError, "'labels'"),
    "label >= V": (lambda a: dict(labels=torch.full_like(a["labels"], 20)), ValueError, "'labels'.*\\[0, 20\\)"),
    "negative label": (lambda a: dict(labels=torch.full_like(a["labels"], -3)), ValueError, "'labels'"),
    "bias shape": (lambda a: dict(bias=a["bias"][:19]), ValueError, "'bias'"),
    "bias dtype": (lambda a: dict(bias=a["bias"].double()), TypeError, "'bias'"),
    "temperature 0": (lambda a: dict(temperature=0.0), ValueError, "'temperature'"),
    "temperature < 0": (lambda a: dict(temperature=-1.0), ValueError, "'temperature'"),
    "temperature nan": (lambda a: dict(temperature=float("nan")), ValueError, "'temperature'"),
    "chunk_size 0": (lambda a: dict(chunk_size=0), ValueError, "'chunk_size'"),
    "weight on meta": (lambda a: dict(weight=a["weight"].to("meta")), ValueError, "'weight'.*meta"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_argument(case, device):
    h, w, labels, b, _, _ = make_inputs((6,), 8, 20, torch.float32, device, seed=11)
    valid = dict(hidden=h, weight=w, labels=labels, bias=b)
    change, error, pattern = BAD_INPUTS[case]
    args = {**valid, **change(valid)}
    with pytest.raises(error, match=pattern):
        fused_linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
