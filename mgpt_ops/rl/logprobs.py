"""Token log-probabilities and entropy straight from hidden states, without materialising [N, V] logits.

    z_i      = (hidden_i @ weight.T + bias) / T                          (V logits of token i)
    logprob_i = z_i[label_i] - logsumexp(z_i)
    entropy_i = -sum_j p_ij log p_ij = lse_i - sum_j p_ij z_ij,          p_i = softmax(z_i)

Tokens whose label is ``ignore_index`` get logprob 0, entropy 0 and no gradient.

How (faces ``triton``, ``cpu``, ``cuda``): both passes walk blocks of the vocabulary (``chunk_size``
entries each). Forward: the block's fp32 logits [N, cols] (one matmul) go through the row-stats kernel (max,
sum of exps, centred sum per row; ``_row_ops.py``); block statistics merge exactly into lse,
mean_z = sum_j p_j z_j and z_label. Backward: with lse and mean_z saved, each recomputed block becomes final
dlogits [N, cols] through the row-grad kernel, so dW[cols] = dlogits.T @ h and db[cols] are written once,
and only dh += dlogits @ W[cols] accumulates (fp32, N x H). Memory is O(N x chunk_size) plus the gradients,
never O(N x V), and there is no V x H fp32 buffer.

fp32 math for bf16/fp16 inputs:
* CUDA: logits come from ``torch.mm(h, W.T, out_dtype=torch.float32)`` (bf16 tensor cores, fp32 output);
  dlogits are stored in the weight's dtype for the backward matmuls (fp32 accumulation inside them); dW is
  rounded to the weight dtype once per element; dh accumulates in fp32 and is rounded once at the end.
* CPU (and CUDA torch without that overload): h is upcast once ([N, H]) and each weight block as it is used.

Faces: ``reference`` materialises all logits in fp32 (float64 for float64 inputs) with plain torch ops
(log_softmax, gather) and differentiates them in closed form over all rows at once: it is the
specification, and the only face that takes float64. Automatic
choice: CUDA -> triton, then cuda; CPU -> cpu; ``reference`` always last.

Vocabulary parallelism (``process_group``): rank r holds weight rows [vocab_start_r, vocab_start_r + V_r)
(and that slice of the bias); labels are global ids. Each shard's row statistics are combined once, exactly,
with ``combine_row_stats`` (two all-reduces); dh is all-reduced (SUM) in fp32, dW/db stay local.
All ranks must pass the same hidden states and labels. TP calls are eager-only (a graph break under
torch.compile, so ``fullgraph=True`` refuses them). With face ``reference`` they run the block loop with the
plain-PyTorch statement of the row kernels.

Errors: shapes/dtypes/devices are checked in the wrapper; label range (a value check, one host sync) inside
the op. Outputs are fp32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from mgpt_ops import _ext
from mgpt_ops._backend import choose_backend
from mgpt_ops._checks import FLOAT_DTYPES, check_positive, check_same_dtype, check_tensor
from mgpt_ops.rl._row_ops import combine_row_stats, merge_row_stats, row_grad_torch, row_stats_torch

OP = "fused_linear_logprobs"
FACES = ("reference", "triton", "cpu", "cuda")
PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
KERNELS = ("mgpt::logits_row_stats", "mgpt::logits_row_grad")  # what the cpu/cuda faces call
# Size of one fp32 logits block [N, cols] that the default chunk_size aims at.
CHUNK_BYTES = {"cuda": 512 << 20, "cpu": 64 << 20}
# Fewest vocabulary columns per block even for huge N (thinner blocks make matmuls inefficient).
MIN_BLOCK_COLS = 256
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def default_chunk_size(hidden: torch.Tensor, weight: torch.Tensor) -> int:
    """Vocabulary entries per block so that one block's fp32 buffers -- logits [N, cols], and the fp32 copy of
    the weight block [cols, H] where the weight is upcast -- take about CHUNK_BYTES."""
    rows, width = hidden.shape[0], weight.shape[1]
    per_col = 4 * (rows + (0 if LinearChunks.is_native(weight) else width))
    cols = CHUNK_BYTES.get(hidden.device.type, CHUNK_BYTES["cpu"]) // max(per_col, 1)
    return max(1, min(weight.shape[0], max(cols, MIN_BLOCK_COLS)))


# --------------------------------------------------------------------------------------------------------
# Faces and their row kernels
# --------------------------------------------------------------------------------------------------------
class RowKernels(NamedTuple):
    stats: object  # (logits, labels, inv_t, vocab_start, ignore_index) -> stats[C, 4]
    grad: object  # (logits, labels, lse, mean_z, g_lp, g_ent, inv_t, vocab_start, ignore_index, dtype) -> dlogits


def row_kernels(face: str) -> RowKernels:
    """The row-kernel pair a chunked face runs (``reference``: the plain-PyTorch statement of the contract)."""
    if face == "reference":
        return RowKernels(row_stats_torch, row_grad_torch)
    if face == "triton":
        from mgpt_ops.rl import logprobs_triton  # lazy: triton is optional

        return RowKernels(logprobs_triton.row_stats, logprobs_triton.row_grad)
    _ext.require(OP)
    return RowKernels(torch.ops.mgpt.logits_row_stats, torch.ops.mgpt.logits_row_grad)


def choose_face(hidden: torch.Tensor) -> str:
    if hidden.dtype == torch.float64:
        # Automatic choice gives reference; a pinned kernel face is refused with a clear error.
        face = choose_backend(OP, hidden.device, FACES, {}, KERNELS)
        if face != "reference":
            raise TypeError(f"mgpt.{OP}: argument 'hidden' has dtype float64, which only the 'reference' "
                            f"backend supports (pinned backend: {face!r}); use float32, bfloat16 or float16")
        return face
    return choose_backend(OP, hidden.device, FACES, PREFERENCE, KERNELS)


def check_label_range(labels: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """Value check (one host sync): every label is ignore_index or a vocabulary id in [0, vocab)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(f"mgpt.{OP}: argument 'labels' must hold ids in [0, {vocab}) or ignore_index="
                         f"{ignore_index}; got {first}")


# --------------------------------------------------------------------------------------------------------
# The vocabulary-block loops shared by every chunked face
# --------------------------------------------------------------------------------------------------------
def _has_fp32_out_mm(device: torch.device) -> bool:
    # torch >= 2.8 registers aten::mm.dtype (half operands, fp32 output) for CUDA only.
    return device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CUDA")


class LinearChunks:
    """The matmuls of the block loops with the fp32-math policy of the device (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.native = self.is_native(weight)
        self.weight, self.bias = weight, bias

    @staticmethod
    def is_native(weight: torch.Tensor) -> bool:
        """True where half-precision operands feed the matmuls directly (fp32 output), i.e. no upcast."""
        return weight.dtype in _HALF_DTYPES and _has_fp32_out_mm(weight.device)

    def operand(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.native else h.to(self.acc_dtype)

    def block(self, cols: slice) -> torch.Tensor:
        """W[cols] as a matmul operand (upcast per block where needed: never a V x H fp32 copy)."""
        w = self.weight[cols]
        return w if self.native else w.to(self.acc_dtype)

    def logits(self, h: torch.Tensor, w: torch.Tensor, cols: slice) -> torch.Tensor:
        """fp32 logits [N, cols] of operand ``h`` against the block ``w`` = ``block(cols)``."""
        out = torch.mm(h, w.T, out_dtype=torch.float32) if self.native else torch.mm(h, w.T)
        if self.bias is not None:
            out += self.bias[cols].to(out.dtype)
        return out

    @property
    def dlogits_dtype(self) -> torch.dtype:
        return self.weight.dtype if self.native else self.acc_dtype

    def accumulate_grad_hidden(self, acc: torch.Tensor, dlogits: torch.Tensor, w: torch.Tensor) -> None:
        if self.native:
            torch.addmm(acc, dlogits, w, out_dtype=torch.float32, out=acc)
        else:
            acc.addmm_(dlogits, w)


def _blocks(total: int, step: int):
    step = max(1, step)
    return (slice(i, min(total, i + step)) for i in range(0, total, step))


def chunked_forward(hidden, weight, labels, bias, kernels: RowKernels, inv_temperature: float, ignore_index: int,
                    chunk_size: int, vocab_start: int = 0, process_group=None):
    """(logprob, entropy, lse) of every row of ``hidden`` [N, H] against the (shard of the) head ``weight``.

    Walks vocabulary blocks of ``chunk_size`` entries: each block's fp32 logits [N, cols] become row
    statistics, merged across blocks, then across shards (one collective) under ``process_group``."""
    lin = LinearChunks(weight, bias)
    labels = labels.to(torch.int64).contiguous()
    h = lin.operand(hidden)
    stats = None
    for cols in _blocks(weight.shape[0], chunk_size):
        block = kernels.stats(lin.logits(h, lin.block(cols), cols), labels, inv_temperature,
                              vocab_start + cols.start, ignore_index)
        stats = block if stats is None else merge_row_stats(stats, block)
    lse, mean_z, z_label = combine_row_stats(stats, process_group)
    keep = labels != ignore_index
    return (torch.where(keep, z_label - lse, 0.0).to(lin.acc_dtype),
            torch.where(keep, lse - mean_z, 0.0).to(lin.acc_dtype), lse.to(lin.acc_dtype))


def chunked_backward(grad_logprob, grad_entropy, hidden, weight, labels, bias, lse, entropy, kernels: RowKernels,
                     inv_temperature: float, ignore_index: int, chunk_size: int, output_mask: Sequence[bool],
                     vocab_start: int = 0):
    """(d hidden, d weight, d bias) for the masked ones (others None); mean_z is recovered as lse - entropy.

    Walks the same vocabulary blocks as the forward: with the row statistics saved, every block's dlogits
    [N, cols] are final, so its slice of dW and db is written once (one rounding to the weight dtype, no
    V x H fp32 accumulator), and only dh -- [N, H], small -- accumulates, in fp32. Returns dh in fp32 (callers
    cast, after an all-reduce under TP)."""
    lin = LinearChunks(weight, bias)
    acc, device = lin.acc_dtype, hidden.device
    labels = labels.to(torch.int64).contiguous()
    lse = lse.to(acc).contiguous()
    mean_z = (lse - entropy.to(acc)).contiguous()
    grad_logprob = grad_logprob.to(acc).contiguous()  # upstream grads may be expanded (stride 0)
    grad_entropy = grad_entropy.to(acc).contiguous()
    need_h, need_w, need_b = output_mask
    h = lin.operand(hidden)
    dh = torch.zeros(hidden.shape, dtype=acc, device=device) if need_h else None
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=device) if need_w else None
    db = torch.empty(weight.shape[0], dtype=bias.dtype, device=device) if need_b else None
    for cols in _blocks(weight.shape[0], chunk_size):
        w = lin.block(cols)
        dlogits = kernels.grad(lin.logits(h, w, cols), labels, lse, mean_z, grad_logprob, grad_entropy,
                               inv_temperature, vocab_start + cols.start, ignore_index, lin.dlogits_dtype)
        if dh is not None:
            lin.accumulate_grad_hidden(dh, dlogits, w)
        if dw is not None:
            dw[cols] = torch.mm(dlogits.T, h)
        if db is not None:
            db[cols] = dlogits.sum(0, dtype=acc)
    return dh, dw, db


# --------------------------------------------------------------------------------------------------------
# The reference face: full logits
# --------------------------------------------------------------------------------------------------------
def _reference_outputs(hidden, weight, labels, bias, temperature: float, ignore_index: int):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    z = logits / temperature
    logp = torch.log_softmax(z, dim=-1)
    keep = labels != ignore_index
    picked = logp.gather(1, torch.where(keep, labels, 0).long()[:, None]).squeeze(1)
    logprob = torch.where(keep, picked, 0.0)
    entropy = torch.where(keep, -(logp.exp() * logp).sum(-1), 0.0)
    return logprob, entropy, torch.logsumexp(z, dim=-1)


# --------------------------------------------------------------------------------------------------------
# Custom ops: forward, backward, fakes, autograd
# --------------------------------------------------------------------------------------------------------
def _out_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@torch.library.custom_op("mgpt::fused_linear_logprobs", mutates_args=())
def _fused_linear_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              bias: torch.Tensor | None, temperature: float, ignore_index: int,
                              chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    face = choose_face(hidden)
    check_label_range(labels, ignore_index, weight.shape[0])
    if face == "reference":
        return _reference_outputs(hidden, weight, labels, bias, temperature, ignore_index)
    return chunked_forward(hidden, weight, labels, bias, row_kernels(face), 1.0 / temperature, ignore_index,
                           chunk_size or default_chunk_size(hidden, weight))


@_fused_linear_logprobs_op.register_fake
def _(hidden, weight, labels, bias, temperature, ignore_index, chunk_size):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=_out_dtype(hidden)) for _ in range(3))


@torch.library.custom_op("mgpt::fused_linear_logprobs_backward", mutates_args=())
def _fused_linear_logprobs_backward_op(
        grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
        labels: torch.Tensor, bias: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor,
        temperature: float, ignore_index: int, chunk_size: int,
        output_mask: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum(grad_logprobs * logprobs + grad_entropy * entropy) w.r.t. (hidden, weight, bias);
    an entry of ``output_mask`` that is False gives an empty tensor instead."""
    face = choose_face(hidden)
    # The reference face differentiates in closed form over all rows at once (the contract's plain-PyTorch
    # statement): autograd cannot record inside a custom op's implementation, where the dispatcher has
    # already excluded the autograd keys.
    cols = weight.shape[0] if face == "reference" else (chunk_size or default_chunk_size(hidden, weight))
    dh, dw, db = chunked_backward(grad_logprobs, grad_entropy, hidden, weight, labels, bias, lse, entropy,
                                  row_kernels(face), 1.0 / temperature, ignore_index, cols, output_mask)
    grads = (None if dh is None else dh.to(hidden.dtype), dw, db)
    return tuple(g if (want and g is not None) else hidden.new_empty(0) for g, want in zip(grads, output_mask))


@_fused_linear_logprobs_backward_op.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, labels, bias, lse, entropy, temperature, ignore_index,
      chunk_size, output_mask):
    shapes = (hidden, weight, weight if bias is None else bias)
    return tuple(t.new_empty(t.shape if want else (0,)) for t, want in zip(shapes, output_mask))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, temperature, ignore_index, chunk_size = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)  # an internal output of the op (the public API does not return it)
    ctx.save_for_backward(hidden, weight, labels, bias, lse, entropy)
    ctx.scalars = (temperature, ignore_index, chunk_size)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, labels, bias, lse, entropy = ctx.saved_tensors
    # None where an output took no part in the loss (e.g. return_entropy=False).
    grad_logprobs = torch.zeros_like(lse) if grad_logprobs is None else grad_logprobs
    grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]]
    dh, dw, db = torch.ops.mgpt.fused_linear_logprobs_backward(
        grad_logprobs, grad_entropy, hidden, weight, labels, bias, lse, entropy, *ctx.scalars, mask)
    return (dh if mask[0] else None, dw if mask[1] else None, None, db if mask[2] else None, None, None, None)


_fused_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# Vocabulary parallelism (eager autograd.Function over the same block loops)
# --------------------------------------------------------------------------------------------------------
def _shard_layout(hidden, weight, group):
    """One all_gather of (V_r, N, H) -> (vocab_start of this rank, global V). Shards may differ in size;
    blocks are walked locally (the only collectives are one stats combine and one dh all-reduce), so each
    rank may use its own chunk_size."""
    import torch.distributed as dist

    mine = torch.tensor([weight.shape[0], hidden.shape[0], hidden.shape[1]], dtype=torch.int64,
                        device=hidden.device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    shards, rows, widths = torch.stack(table).cpu().T.tolist()
    if len(set(rows)) != 1 or len(set(widths)) != 1:
        raise ValueError(f"mgpt.{OP}: every rank of 'process_group' must pass the same 'hidden' rows and "
                         f"width (tokens are replicated across vocabulary shards); got N={rows}, H={widths}")
    rank = dist.get_rank(group)
    return sum(shards[:rank]), sum(shards)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, temperature, ignore_index, chunk_size, group):
        vocab_start, vocab = _shard_layout(hidden, weight, group)
        chunk = chunk_size or default_chunk_size(hidden, weight)
        check_label_range(labels, ignore_index, vocab)
        face = choose_face(hidden)
        logprob, entropy, lse = chunked_forward(hidden, weight, labels, bias, row_kernels(face), 1.0 / temperature,
                                                ignore_index, chunk, vocab_start, group)
        ctx.save_for_backward(hidden, weight, labels, bias, lse, entropy)
        ctx.scalars = (face, 1.0 / temperature, ignore_index, chunk, vocab_start, group)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        import torch.distributed as dist

        hidden, weight, labels, bias, lse, entropy = ctx.saved_tensors
        face, inv_temperature, ignore_index, chunk, vocab_start, group = ctx.scalars
        grad_logprob = torch.zeros_like(lse) if grad_logprob is None else grad_logprob
        grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]]
        # dh is a partial sum over this rank's vocabulary: all-reduce it in fp32, then cast once.
        dh, dw, db = chunked_backward(grad_logprob, grad_entropy, hidden, weight, labels, bias, lse, entropy,
                                      row_kernels(face), inv_temperature, ignore_index, chunk, mask, vocab_start)
        if dh is not None:
            dist.all_reduce(dh, group=group)
            dh = dh.to(hidden.dtype)
        return dh, dw, None, db, None, None, None, None


@torch.compiler.disable
def _vocab_parallel(hidden, weight, labels, bias, temperature, ignore_index, chunk_size, group):
    return _VocabParallelLogprobs.apply(hidden, weight, labels, bias, temperature, ignore_index, chunk_size, group)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def _validate(hidden, weight, labels, bias, temperature, ignore_index, chunk_size) -> None:
    check_tensor(OP, "hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() < 2:
        raise ValueError(f"mgpt.{OP}: argument 'hidden' must have shape [..., N, H] (at least 2 dimensions), "
                         f"got {list(hidden.shape)}")
    width = hidden.shape[-1]
    check_tensor(OP, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    check_same_dtype(OP, ("hidden", "weight"), (hidden, weight))
    if weight.shape[1] != width or weight.shape[0] < 1:
        raise ValueError(f"mgpt.{OP}: argument 'weight' must have shape [V, {width}] with V >= 1 (H = last "
                         f"dimension of 'hidden'), got {list(weight.shape)}")
    check_tensor(OP, "labels", labels, dtypes=(torch.int64, torch.int32), shape=list(hidden.shape[:-1]),
                 device=hidden.device)
    if bias is not None:
        check_tensor(OP, "bias", bias, dtypes=(weight.dtype,), shape=[weight.shape[0]], device=hidden.device)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"mgpt.{OP}: argument 'temperature' must be a finite float, got {temperature!r}")
    check_positive(OP, "temperature", temperature)
    if not isinstance(ignore_index, int):
        raise TypeError(f"mgpt.{OP}: argument 'ignore_index' must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"mgpt.{OP}: argument 'chunk_size' must be None or an int >= 1, got {chunk_size!r}")


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = True, process_group=None, chunk_size: int | None = None):
    """Log-probability of each label and entropy of each token's distribution, from hidden states.

    Args:
        hidden: [..., H] final hidden states (fp32, bf16, fp16; float64 with the reference backend).
        weight: [V, H] output head in the same dtype (the local vocabulary shard with ``process_group``).
        labels: [...] int64/int32 target ids (global ids under ``process_group``) or ``ignore_index``.
        bias: optional [V] head bias. temperature: logits are divided by it (> 0).
        return_entropy: if False the second output is None (and costs nothing extra in backward).
        process_group: vocabulary-parallel group (see the module docstring); None = unsharded.
        chunk_size: vocabulary entries per block (the fp32 logits block is N x chunk_size); the default
            makes a block's fp32 buffers ~512 MiB on CUDA / ~64 MiB on CPU (at least 256 columns).

    Returns:
        (logprobs [...], entropy [...] or None), fp32 (float64 for float64 inputs), differentiable with
        respect to hidden, weight and bias.

    Under ``torch.autocast`` the op behaves like the ``F.linear`` it replaces: hidden, weight and bias are cast to
    the autocast dtype (gradients flow back to the original dtypes), then the op runs with autocast off (its own
    fp32 accumulation and log-sum-exp).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return fused_linear_logprobs(hidden.to(dtype), weight.to(dtype), labels,
                                         bias=None if bias is None else bias.to(dtype), temperature=temperature,
                                         ignore_index=ignore_index, return_entropy=return_entropy,
                                         process_group=process_group, chunk_size=chunk_size)
    _validate(hidden, weight, labels, bias, temperature, ignore_index, chunk_size)
    lead = hidden.shape[:-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if process_group is not None:
        logprob, entropy = _vocab_parallel(flat_hidden, weight, flat_labels, bias, float(temperature),
                                           ignore_index, chunk_size, process_group)
    else:
        chunk = chunk_size or 0  # 0: the op picks default_chunk_size (a device query, kept out of traced code)
        logprob, entropy, _ = torch.ops.mgpt.fused_linear_logprobs(flat_hidden, weight, flat_labels, bias,
                                                                   float(temperature), ignore_index, chunk)
    return logprob.reshape(lead), (entropy.reshape(lead) if return_entropy else None)
