"""Clipped / soft-gated policy-gradient losses of the GRPO family (TRL ``GRPOTrainer._compute_loss`` and verl
``core_algos``) as ONE fused op: ``mgpt::policy_loss`` computes the loss, its metrics and the per-token
gradient d loss / d logprobs in one pass and saves the gradient, so backward is a single multiply.

Notation (per row i = sequence, column t = token; m = mask, A = advantage, w = ``is_weights``):

    log-importance   x_it = lp_it - old_it                               (importance_level="token")
                     x_i  = sum_t m_it (lp_it - old_it) / max(n_i, 1)    (importance_level="sequence", GSPO)
                     clamped to [-20, 20] before exp (verl's stability clamp; TRL does not clamp; the clamp
                     also stops the gradient outside that range), r = exp(x)
    per-token policy-gradient loss L_it (loss_type):
      grpo/dapo/bnpo/dr_grpo  L = max(-A r_d, -A clip(r, 1 - eps_low, 1 + eps_high))
                              r_d = min(r, delta) when ``delta`` is set (TRL two-sided clipping), else r;
                              with ``dual_clip`` = c (verl clip_ratio_c) and A < 0: L = min(L, -A c)
      cispo                   L = -sg(min(r, eps_high)) A lp      (TRL: eps_high is the absolute cap,
                              TRL recommends eps_high = 5.0 for cispo; verl instead clips r to
                              [1 - eps_low, 1 + eps_high] -- we follow TRL)
      sapo                    L = -A sigmoid(tau (r - 1)) 4 / tau, tau = sapo_temperature_pos if A > 0 else
                              sapo_temperature_neg (TRL/verl agree)
    per-token total   l_it = w_it L_it + beta kl_it      (TRL order: IS weights scale the policy term only)
    KL (verl ``kl_penalty``, d = lp - ref): k1 = d; k2 = d^2 / 2;
                     k3 = clamp(exp(u) - u - 1, -10, 10) with u = clamp(-d, -20, 20)  ("low_var_kl")
    loss = sum_i c_i sum_t m_it l_it                      with the reduction's row coefficient c_i:

      reduction (default of loss_type, or agg_mode)      c_i
      grpo, sapo  (TRL: per-row mean, mean over ALL B rows)  1 / (max(n_i, 1) B)
      bnpo        (TRL: local token mean)                    1 / max(N, 1)
      dapo, cispo (TRL: token sum / num_items_in_batch)      1 / num_items      (default max(N, 1))
      dr_grpo     (TRL)                                      1 / (B H)          H = max_completion_length or T
      "token-mean"               (verl)                      1 / num_items      (default max(N, 1))
      "seq-mean-token-sum"       (verl)                      1 / S
      "seq-mean-token-mean"      (verl)                      1 / (max(n_i, 1) S)
      "seq-mean-token-sum-norm"  (verl)                      1 / (S H)
      n_i = sum_t m_it, N = sum_i n_i; S = num_items (verl's global_batch_size) or the number of rows with
      n_i > 0 -- verl excludes fully masked rows from its sequence means, TRL's grpo/dr_grpo divide by B.

    For GSPO (sequence level) we follow TRL: the gradient reaches every token through the mean log-ratio,
    d loss / d lp_iu = c_i s_i (d/ds sum_t m_it w_it L_it) m_iu / max(n_i, 1). verl's ``gspo`` (token-wise
    s_i,t = sg(s_i) pi / sg(pi)) gives the same gradient unless ``is_weights`` vary within a row.

Metrics (masked token means, weights m, denominator max(N, 1); always the same keys):
    clip_frac_low   (r_d < 1 - eps_low) & (A < 0)       TRL clip_ratio/low_mean (0 for cispo and sapo)
    clip_frac_high  (r_d > 1 + eps_high) & (A > 0)      TRL clip_ratio/high_mean; cispo: (r > eps_high) & (A > 0)
    dual_clip_frac  (A < 0) & (-A c < L before dual clip)  verl pg_clipfrac_lower (0 without dual_clip)
    ratio_mean      r                                     (TRL averages sequence ratios over rows instead)
    approx_kl       -clamp(lp - old, -20, 20) per token   verl ppo_kl (compute_policy_loss_vanilla)
    kl_mean         kl_it when ``ref_logprobs`` is given (even with beta = 0, for monitoring), else 0

Masked positions are never read into any result (NaN/inf padding is harmless). Differentiable w.r.t.
``logprobs`` only: old/ref log-probs, advantages, mask and weights are data.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from mgpt_ops._backend import choose_backend
from mgpt_ops._checks import FLOAT_DTYPES, check_tensor

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo")
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")
METRIC_NAMES = ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean", "approx_kl", "kl_mean")
# Both faces return these sums; the op turns them into the loss and the masked-mean metrics.
NUM_SUMS = 2 + len(METRIC_NAMES)  # loss, six metric numerators, mask sum
LOG_RATIO_CLAMP = 20.0  # verl: clamp(log ratio, -20, 20) before exp
K3_CLAMP = 10.0  # verl low_var_kl: clamp(k3, -10, 10)
_CLIPPED_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
_MASK_DTYPES = FLOAT_DTYPES + (torch.bool, torch.uint8, torch.int32, torch.int64)
_OP = "policy_loss"
_FACES = ("reference", "triton")


class LossConfig(NamedTuple):
    """Scalar settings shared by both faces (already validated)."""

    loss_type: str
    sequence_level: bool
    kl_type: str
    eps_low: float
    eps_high: float
    dual_clip: Optional[float]
    delta: Optional[float]
    beta: float
    tau_pos: float
    tau_neg: float
    has_ref: bool


# ----------------------------------------------------------------------------------------------------------
# reference face: the spec, in plain PyTorch (float64 when logprobs are float64)
# ----------------------------------------------------------------------------------------------------------


def _pg_terms(r, A, lp, cfg: LossConfig):
    """Per-token policy loss L, its derivative (w.r.t. r; for cispo w.r.t. lp) and the clip indicators."""
    zero = torch.zeros_like(r, dtype=torch.bool)
    if cfg.loss_type == "cispo":
        capped = torch.clamp(r, max=cfg.eps_high)
        return -capped * A * lp, -capped * A, zero, (r > cfg.eps_high) & (A > 0), zero
    if cfg.loss_type == "sapo":
        tau = torch.where(A > 0, A.new_tensor(cfg.tau_pos), A.new_tensor(cfg.tau_neg))
        gate = torch.sigmoid(tau * (r - 1))
        return -A * gate * 4 / tau, -A * 4 * gate * (1 - gate), zero, zero, zero
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    if cfg.delta is not None:
        r_d, d_rd = torch.clamp(r, max=cfg.delta), (r <= cfg.delta).to(r.dtype)
    else:
        r_d, d_rd = r, torch.ones_like(r)
    d_rc = ((r >= lo) & (r <= hi)).to(r.dtype)
    a, b = -A * r_d, -A * torch.clamp(r, lo, hi)
    loss = torch.maximum(a, b)
    # torch.maximum/minimum split the gradient evenly on ties; mirror that so autograd references agree.
    grad = torch.where(a > b, -A * d_rd, torch.where(a < b, -A * d_rc, -A * (d_rd + d_rc) / 2))
    dual = zero
    if cfg.dual_clip is not None:
        cap = -A * cfg.dual_clip
        neg = A < 0
        dual = neg & (loss > cap)
        grad = torch.where(neg, torch.where(loss < cap, grad, torch.where(loss > cap, 0.0, grad / 2)), grad)
        loss = torch.where(neg, torch.minimum(loss, cap), loss)
    return loss, grad, (r_d < lo) & (A < 0), (r_d > hi) & (A > 0), dual


def _kl_terms(lp, ref, kl_type: str):
    """verl kl_penalty(lp, ref) and its derivative w.r.t. lp."""
    d = lp - ref
    if kl_type == "k1":
        return d, torch.ones_like(d)
    if kl_type == "k2":
        return 0.5 * d * d, d
    u = -d
    uc = torch.clamp(u, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    e = torch.exp(uc)
    kld = e - uc - 1
    passes = (u.abs() <= LOG_RATIO_CLAMP) & (kld.abs() <= K3_CLAMP)
    return torch.clamp(kld, -K3_CLAMP, K3_CLAMP), -(e - 1) * passes


def _as_2d(t, B: int, T: int, dtype):
    t = t.to(dtype)
    return (t[:, None] if t.dim() == 1 else t).expand(B, T)


def policy_loss_reference(lp, old, adv, mask, row_coef, ref, is_weights, cfg: LossConfig):
    """Returns (sums[NUM_SUMS], grad[B, T] in lp.dtype): see the module docstring for every formula."""
    B, T = lp.shape
    cd = torch.float64 if lp.dtype == torch.float64 else torch.float32
    lp_c, old_c = lp.to(cd), old.to(cd)
    A = _as_2d(adv, B, T, cd)
    m = mask.to(cd)
    live = m != 0
    c = row_coef.to(cd)[:, None]
    log_ratio = torch.where(live, lp_c - old_c, 0.0)
    if cfg.sequence_level:
        n_c = m.sum(1).clamp(min=1)
        x = (m * log_ratio).sum(1) / n_c
    else:
        x = log_ratio
    passes = (x.abs() <= LOG_RATIO_CLAMP).to(cd)
    r = torch.exp(torch.clamp(x, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if cfg.sequence_level:
        r, passes = r[:, None].expand(B, T), passes[:, None].expand(B, T)

    pg, d_pg, low, high, dual = _pg_terms(r, A, lp_c, cfg)
    if is_weights is not None:
        w = _as_2d(is_weights, B, T, cd)
        pg, d_pg = pg * w, d_pg * w
    if cfg.loss_type == "cispo":  # the capped ratio is a constant: the gradient flows through lp itself
        d_tok = d_pg
    elif cfg.sequence_level:  # every token reaches the row's ratio through the mean log-ratio
        d_row = torch.where(live, m * d_pg, 0.0).sum(1, keepdim=True)
        d_tok = (d_row * r * passes / m.sum(1, keepdim=True).clamp(min=1)).expand(B, T)
    else:
        d_tok = d_pg * r * passes
    total = pg
    kl = torch.zeros_like(pg)
    if cfg.has_ref:
        kl, d_kl = _kl_terms(lp_c, ref.to(cd), cfg.kl_type)
        if cfg.beta != 0:
            total = total + cfg.beta * kl
            d_tok = d_tok + cfg.beta * d_kl

    def masked_sum(v):
        return torch.where(live, m * v, 0.0).sum()

    sums = torch.stack([
        masked_sum(c * total), masked_sum(low.to(cd)), masked_sum(high.to(cd)), masked_sum(dual.to(cd)),
        masked_sum(r), masked_sum(-torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), masked_sum(kl),
        m.sum(),
    ])
    grad = torch.where(live, c * m * d_tok, 0.0).to(lp.dtype)
    return sums, grad


# ----------------------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("mgpt::policy_loss", mutates_args=())
def _policy_loss_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, row_coef: torch.Tensor, ref_logprobs: Optional[torch.Tensor],
                    is_weights: Optional[torch.Tensor], loss_type: str, importance_level: str, kl_type: str,
                    eps_low: float, eps_high: float, dual_clip: Optional[float], delta: Optional[float],
                    beta: float, sapo_temperature_pos: float, sapo_temperature_neg: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d, metrics[6], grad[B, T]); ``row_coef`` [B] carries the reduction (see module docstring)."""
    cfg = LossConfig(loss_type, importance_level == "sequence", kl_type, eps_low, eps_high, dual_clip, delta,
                     beta, sapo_temperature_pos, sapo_temperature_neg, ref_logprobs is not None)
    face = choose_backend(_OP, logprobs.device, _FACES, {"cuda": ("triton",)})
    if face == "triton":
        from mgpt_ops.rl.policy_loss_triton import policy_loss_triton

        sums, grad = policy_loss_triton(logprobs, old_logprobs, advantages, mask, row_coef, ref_logprobs,
                                        is_weights, cfg)
    else:
        sums, grad = policy_loss_reference(logprobs, old_logprobs, advantages, mask, row_coef, ref_logprobs,
                                           is_weights, cfg)
    out_dtype = _loss_dtype(logprobs)
    sums = sums.to(out_dtype)
    metrics = sums[1:-1] / sums[-1].clamp(min=1)
    return sums[0].clone(), metrics, grad


def _loss_dtype(logprobs: torch.Tensor) -> torch.dtype:
    return torch.float64 if logprobs.dtype == torch.float64 else torch.float32


@_policy_loss_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, row_coef, ref_logprobs, is_weights, loss_type, importance_level,
      kl_type, eps_low, eps_high, dual_clip, delta, beta, sapo_temperature_pos, sapo_temperature_neg):
    dtype = _loss_dtype(logprobs)
    return (logprobs.new_empty((), dtype=dtype), logprobs.new_empty((len(METRIC_NAMES),), dtype=dtype),
            torch.empty_like(logprobs, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _backward(ctx, grad_loss, grad_metrics, grad_grad):
    (saved_grad,) = ctx.saved_tensors
    return (saved_grad * grad_loss,) + (None,) * 16


_policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# public wrapper: validation (traceable) and the reduction's row coefficients
# ----------------------------------------------------------------------------------------------------------


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"mgpt.{_OP}: argument '{name}' must be one of {allowed}, got {value!r}")


def _number(name: str, value, *, minimum: Optional[float] = None, strict: bool = False, optional: bool = False
            ) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum}"
        raise ValueError(f"mgpt.{_OP}: argument '{name}' must be a finite number{bound}, got {value!r}")


def _row_coefficients(mask_f: torch.Tensor, loss_type: str, agg_mode, num_items, max_completion_length):
    """c_i of the reduction ``loss = sum_i c_i sum_t m_it l_it`` (table in the module docstring)."""
    B, T = mask_f.shape
    n = mask_f.sum(1)
    horizon = float(max_completion_length if max_completion_length is not None else T)
    tokens = mask_f.sum().clamp(min=1)
    if num_items is not None:
        given = num_items.to(mask_f) if isinstance(num_items, torch.Tensor) else mask_f.new_tensor(float(num_items))
    if agg_mode is None:
        if loss_type in ("grpo", "sapo"):
            return 1.0 / (n.clamp(min=1) * B)
        if loss_type == "bnpo":
            return (1.0 / tokens).expand(B)
        if loss_type == "dr_grpo":
            return mask_f.new_full((B,), 1.0 / (B * horizon))
        return (1.0 / (given if num_items is not None else tokens)).expand(B)  # dapo, cispo
    if agg_mode == "token-mean":
        return (1.0 / (given if num_items is not None else tokens)).expand(B)
    seqs = given if num_items is not None else (n > 0).sum().to(mask_f).clamp(min=1)
    if agg_mode == "seq-mean-token-sum":
        return (1.0 / seqs).expand(B)
    if agg_mode == "seq-mean-token-mean":
        return 1.0 / (n.clamp(min=1) * seqs)
    return (1.0 / (seqs * horizon)).expand(B)  # seq-mean-token-sum-norm


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, loss_type: str = "dapo", eps_low: float = 0.2, eps_high: float = 0.28,
                dual_clip: Optional[float] = None, delta: Optional[float] = None,
                ref_logprobs: Optional[torch.Tensor] = None, beta: float = 0.0, kl_type: str = "k3",
                agg_mode: Optional[str] = None, max_completion_length: Optional[int] = None,
                num_items=None, is_weights: Optional[torch.Tensor] = None, importance_level: str = "token",
                sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family policy loss; returns ``(loss, metrics)`` (formulas, reductions, metrics: module docstring).

    Shapes: ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``mask`` are [B, T]; ``advantages`` and
    ``is_weights`` are [B] or [B, T]; ``mask`` is bool, integer (0/1) or float (token weights).
    ``loss`` is 0-d float32 (float64 when ``logprobs`` are float64); ``metrics`` maps ``METRIC_NAMES`` to 0-d
    tensors of the same dtype.

    ``loss_type`` picks the per-token loss and TRL's default reduction; ``agg_mode`` (verl's names) overrides
    the reduction. ``num_items`` (number or 0-d tensor, > 0) is the global normaliser: the token count for
    dapo / cispo / "token-mean" (TRL ``num_items_in_batch / num_processes``, verl ``batch_num_tokens``), the
    sequence count for the "seq-mean-*" modes (verl ``global_batch_size``); TRL's grpo, sapo, bnpo and dr_grpo
    reductions ignore it, as TRL does. ``max_completion_length`` (default T) is the horizon of dr_grpo and
    "seq-mean-token-sum-norm" (verl ``loss_scale_factor``) and is ignored elsewhere. ``beta != 0`` adds
    ``beta * kl`` per token and requires ``ref_logprobs``. ``dual_clip`` (> 1) and ``delta`` (> 1) apply to
    the clipped losses (grpo, dapo, bnpo, dr_grpo) only. ``sapo_temperature_*`` (> 0) are used by sapo only.
    """
    _choice("loss_type", loss_type, LOSS_TYPES)
    _choice("importance_level", importance_level, IMPORTANCE_LEVELS)
    _choice("kl_type", kl_type, KL_TYPES)
    if agg_mode is not None:
        _choice("agg_mode", agg_mode, AGG_MODES)
    _number("eps_low", eps_low, minimum=0.0, strict=False)
    _number("eps_high", eps_high, minimum=0.0, strict=loss_type == "cispo")
    _number("dual_clip", dual_clip, minimum=1.0, strict=True, optional=True)
    _number("delta", delta, minimum=1.0, strict=True, optional=True)
    _number("beta", beta)
    _number("sapo_temperature_pos", sapo_temperature_pos, minimum=0.0, strict=True)
    _number("sapo_temperature_neg", sapo_temperature_neg, minimum=0.0, strict=True)
    if loss_type not in _CLIPPED_TYPES and (dual_clip is not None or delta is not None):
        raise ValueError(f"mgpt.{_OP}: 'dual_clip' and 'delta' apply to the clipped losses {_CLIPPED_TYPES}, "
                         f"not to loss_type={loss_type!r}")
    if max_completion_length is not None and (
            not isinstance(max_completion_length, int) or isinstance(max_completion_length, bool)
            or max_completion_length < 1):
        raise ValueError(f"mgpt.{_OP}: argument 'max_completion_length' must be an int >= 1 or None, "
                         f"got {max_completion_length!r}")
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        _number("num_items", num_items, minimum=0.0, strict=True)
    if beta != 0 and ref_logprobs is None:
        raise ValueError(f"mgpt.{_OP}: beta={beta} adds a KL penalty, which needs 'ref_logprobs' (got None)")

    check_tensor(_OP, "logprobs", logprobs, ndim=2, dtypes=FLOAT_DTYPES)
    B, T = logprobs.shape
    if B == 0 or T == 0:
        raise ValueError(f"mgpt.{_OP}: argument 'logprobs' must be non-empty [B, T], got {list(logprobs.shape)}")
    dev = logprobs.device
    check_tensor(_OP, "old_logprobs", old_logprobs, shape=(B, T), dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(_OP, "mask", mask, shape=(B, T), dtypes=_MASK_DTYPES, device=dev)
    for name, t in (("advantages", advantages), ("is_weights", is_weights)):
        if t is not None:
            check_tensor(_OP, name, t, dtypes=FLOAT_DTYPES, device=dev)
            if tuple(t.shape) not in ((B,), (B, T)):
                raise ValueError(f"mgpt.{_OP}: argument '{name}' must have shape [{B}] or [{B}, {T}], "
                                 f"got {list(t.shape)}")
    if ref_logprobs is not None:
        check_tensor(_OP, "ref_logprobs", ref_logprobs, shape=(B, T), dtypes=FLOAT_DTYPES, device=dev)
    if isinstance(num_items, torch.Tensor):
        check_tensor(_OP, "num_items", num_items, ndim=0, device=dev)

    mask_f = mask.to(_loss_dtype(logprobs))
    row_coef = _row_coefficients(mask_f, loss_type, agg_mode, num_items, max_completion_length).contiguous()
    loss, metrics, _ = _policy_loss_op(
        logprobs, old_logprobs.detach(), advantages.detach(), mask.detach(), row_coef.detach(),
        None if ref_logprobs is None else ref_logprobs.detach(),
        None if is_weights is None else is_weights.detach(),
        loss_type, importance_level, kl_type, float(eps_low), float(eps_high),
        None if dual_clip is None else float(dual_clip), None if delta is None else float(delta), float(beta),
        float(sapo_temperature_pos), float(sapo_temperature_neg))
    return loss, dict(zip(METRIC_NAMES, metrics.detach().unbind(0)))
