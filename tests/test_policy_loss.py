"""mgpt.policy_loss against a float64 transcription, written here, of TRL ``GRPOTrainer._compute_loss`` (loss
types, delta, epsilon low/high, GSPO sequence level, sapo, cispo, importance-sampling weights, num_items,
max_completion_length) and verl ``core_algos`` (log-ratio clamp [-20, 20], dual clip ``clip_ratio_c``,
``kl_penalty`` k1/k2/k3, ``agg_loss`` modes), differentiated with torch autograd.

Tolerances: fp32 inputs 2e-5 relative (fp32 math over a few hundred tokens); float64 inputs 1e-7 (verl's
seq-mean-token-mean divides by n + 1e-8 where the op clamps n >= 1: ~1e-8 apart); bf16 inputs 1e-2. The loss is
compared relative to the same reduction of |per-token loss| (a sum that cancels to ~0 is only as accurate as
its summands); gradients by norm-wise relative error; metrics to tol * max(1, |value|).
"""

import itertools
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE, faces_here, rel_err
from hopper_compile import compile_in_subprocess
import mgpt_ops
from mgpt_ops.rl.policy_loss import policy_loss

FACES = faces_here(("reference", "triton"))
LOSS_TYPES = ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"]
AGG_MODES = [None, "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
CLIPPED = ["grpo", "dapo", "dr_grpo", "bnpo"]
B, T = 4, 29  # one shared small shape; row 2 is fully masked


# ------------------------------------------------------------------------------------------------------------
# the independent reference
# ------------------------------------------------------------------------------------------------------------


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    if kl_penalty == "k1":
        return logprob - ref_logprob
    if kl_penalty == "k2":
        return 0.5 * (logprob - ref_logprob).square()
    kl = ref_logprob - logprob
    kl = torch.clamp(kl, min=-20, max=20)
    ratio = torch.exp(kl)
    kld = ratio - kl - 1
    return torch.clamp(kld, min=-10, max=10)


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = loss_mask.sum().clamp(min=1)  # verl: loss_mask.sum() (NaN for an all-masked batch)
        return (loss_mat * loss_mask).sum() / batch_num_tokens
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).double()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum().clamp(min=1)  # verl: seq_mask.sum()
        loss = (seq_losses * seq_mask).sum() / global_batch_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1])
        return loss
    assert loss_agg_mode == "seq-mean-token-mean"
    seq_mask = torch.sum(loss_mask, dim=-1)
    seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
    seq_mask = (seq_mask > 0).double()
    if global_batch_size is None:
        global_batch_size = seq_mask.sum().clamp(min=1)
    return (seq_losses * seq_mask).sum() / global_batch_size


def reference(lp, old, adv, mask, *, loss_type="dapo", eps_low=0.2, eps_high=0.28, dual_clip=None, delta=None,
              ref_logprobs=None, beta=0.0, kl_type="k3", agg_mode=None, max_completion_length=None,
              num_items=None, is_weights=None, importance_level="token", sapo_temperature_pos=1.0,
              sapo_temperature_neg=1.05):
    """Returns (loss, metrics dict, d loss / d lp, scale of the loss summands), all float64 on the CPU."""
    per_token_logps = lp.detach().double().cpu().requires_grad_(True)
    old_per_token_logps = old.double().cpu()
    completion_mask = mask.double().cpu()
    advantages = adv.double().cpu()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    bsz, horizon = per_token_logps.shape

    log_ratio = per_token_logps - old_per_token_logps
    if importance_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    log_importance_weights = torch.clamp(log_importance_weights, min=-20.0, max=20.0)  # verl
    coef_1 = torch.exp(log_importance_weights)
    ratio = coef_1

    per_token_kl = None
    if ref_logprobs is not None:
        per_token_kl = verl_kl_penalty(per_token_logps, ref_logprobs.double().cpu(), kl_type)

    zero = torch.zeros_like(coef_1 * advantages, dtype=torch.bool)
    is_low_clipped = is_high_clipped = is_dual_clipped = zero
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=eps_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
        is_high_clipped = (coef_1 > eps_high) & (advantages > 0)
    elif loss_type == "sapo":
        temperature = torch.where(advantages > 0, torch.tensor(sapo_temperature_pos, dtype=torch.float64),
                                  torch.tensor(sapo_temperature_neg, dtype=torch.float64))
        sapo_token_loss = torch.sigmoid(temperature * (coef_1 - 1)) * 4 / temperature
        per_token_loss = -sapo_token_loss * advantages
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
        if dual_clip is not None:  # verl compute_policy_loss_vanilla
            pg_losses3 = -advantages * dual_clip
            is_dual_clipped = (per_token_loss > pg_losses3) & (advantages < 0)
            per_token_loss = torch.where(advantages < 0, torch.min(pg_losses3, per_token_loss), per_token_loss)
        is_low_clipped = (coef_1 < 1 - eps_low) & (advantages < 0)
        is_high_clipped = (coef_1 > 1 + eps_high) & (advantages > 0)

    if is_weights is not None:
        w = is_weights.double().cpu()
        per_token_loss = per_token_loss * (w.unsqueeze(1) if w.dim() == 1 else w)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl

    mask_ = completion_mask

    def reduce(per_token_loss):
        per_token_loss = per_token_loss.expand(bsz, horizon)
        if agg_mode is not None:
            return verl_agg_loss(per_token_loss, mask_, agg_mode, batch_num_tokens=num_items,
                                 global_batch_size=num_items, loss_scale_factor=max_completion_length)
        if loss_type in ("grpo", "sapo"):
            return ((per_token_loss * mask_).sum(-1) / mask_.sum(-1).clamp(min=1.0)).mean()
        if loss_type == "bnpo":
            return (per_token_loss * mask_).sum() / mask_.sum().clamp(min=1.0)
        if loss_type == "dr_grpo":
            return (per_token_loss * mask_).sum() / (bsz * (max_completion_length or horizon))
        normalizer = num_items if num_items is not None else mask_.sum().clamp(min=1.0)
        return (per_token_loss * mask_).sum() / normalizer

    loss = reduce(per_token_loss)
    loss.backward()
    # The scale of the summands: fp32 sums are accurate relative to it, not to a loss that cancels to ~0.
    scale = reduce(per_token_loss.detach().abs())

    tokens = mask_.sum().clamp(min=1.0)

    def masked_mean(x):
        return (x.double().expand(bsz, horizon) * mask_).sum() / tokens

    metrics = {
        "clip_frac_low": masked_mean(is_low_clipped), "clip_frac_high": masked_mean(is_high_clipped),
        "dual_clip_frac": masked_mean(is_dual_clipped), "ratio_mean": masked_mean(ratio.detach()),
        "approx_kl": masked_mean(-torch.clamp(log_ratio, min=-20.0, max=20.0).detach()),
        "kl_mean": masked_mean(per_token_kl.detach()) if per_token_kl is not None else torch.zeros(()),
    }
    return loss.detach(), metrics, per_token_logps.grad, scale


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


def make_inputs(b=B, t=T, *, seed=0, adv_2d=False, dtype=torch.float32, mask_kind="bool", density=0.7,
                masked_rows=(2,)):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3 - 0.05
    old = lp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)  # ratios straddle 1 +- eps
    old[:, 3::5] = lp[:, 3::5]  # exact ratio 1: the tie between clipped and unclipped branches
    ref = lp + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn((b, t) if adv_2d else (b,), generator=g, dtype=torch.float64)
    adv[..., 3::4] = 0.0  # zero advantages (constant-reward groups) sit on every strict/non-strict boundary
    mask = torch.rand(b, t, generator=g) < density
    mask[:, 0] = True
    for r in masked_rows:
        if r < b:
            mask[r] = False
    isw = torch.rand(b, t, generator=g, dtype=torch.float64) * 1.5 + 0.25
    if mask_kind == "float":
        mask = mask.double()
    elif mask_kind == "long":
        mask = mask.long()
    out = dict(lp=lp, old=old, ref=ref, adv=adv, mask=mask, isw=isw)
    return {k: v.to(DEVICE, dtype if v.is_floating_point() and k != "mask" else v.dtype) for k, v in out.items()}


def run(face, x, **kw):
    """Runs the op (loss, metrics, gradient of the loss w.r.t. logprobs) with ``face`` pinned."""
    lp = x["lp"].clone().requires_grad_(True)
    with mgpt_ops.use_backend(face):
        loss, metrics = policy_loss(lp, x["old"], x["adv"], x["mask"], **kw)
    loss.backward()
    return loss, metrics, lp.grad


def check(face, x, tol=2e-5, **kw):
    loss, metrics, grad = run(face, x, **kw)
    ref_kw = {k: v.double().cpu() if k == "num_items" and isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    r_loss, r_metrics, r_grad, scale = reference(x["lp"], x["old"], x["adv"], x["mask"], **ref_kw)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss.dtype == (torch.float64 if x["lp"].dtype == torch.float64 else torch.float32)
    assert grad.dtype == x["lp"].dtype and torch.isfinite(grad).all()
    assert abs(loss.item() - r_loss.item()) <= tol * max(abs(r_loss.item()), scale.item()), (loss, r_loss)
    assert rel_err(grad, r_grad) < tol
    assert set(metrics) == set(r_metrics)
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad
        assert abs(value.item() - r_metrics[name].item()) < tol * max(1.0, abs(r_metrics[name].item())), name
    return loss, metrics, grad


# ------------------------------------------------------------------------------------------------------------
# the full matrix: loss_type x agg_mode x KL (k1/k2/k3 with beta > 0, and beta = 0)
# ------------------------------------------------------------------------------------------------------------

KL_CASES = [("k1", 0.04), ("k2", 0.04), ("k3", 0.04), ("k3", 0.0)]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("kl_type, beta", KL_CASES)
@pytest.mark.parametrize("agg_mode", AGG_MODES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matrix(face, loss_type, agg_mode, kl_type, beta):
    x = make_inputs(seed=zlib.crc32(f"{loss_type}{agg_mode}{kl_type}".encode()) % 1000, adv_2d=True)
    eps_high = 1.0 if loss_type == "cispo" else 0.28  # cispo: eps_high is TRL's absolute cap on the ratio
    _, metrics, _ = check(face, x, loss_type=loss_type, agg_mode=agg_mode, kl_type=kl_type, beta=beta,
                          ref_logprobs=x["ref"], eps_high=eps_high)
    if loss_type != "sapo":  # the data must actually exercise the clipping
        assert metrics["clip_frac_high"] > 0


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_importance_levels_with_weights(face, level, loss_type):
    x = make_inputs(seed=7, adv_2d=level == "token")
    eps_high = 1.0 if loss_type == "cispo" else 0.28
    check(face, x, loss_type=loss_type, importance_level=level, is_weights=x["isw"], eps_high=eps_high,
          ref_logprobs=x["ref"], beta=0.02)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dual_clip, delta", [(3.0, None), (None, 1.3), (1.5, 1.4)])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_dual_clip_and_delta(face, loss_type, dual_clip, delta, level):
    x = make_inputs(seed=11)
    # large ratios so both caps bite (own generator: the global one's state depends on the tests run before)
    noise = torch.randn(x["lp"].shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    x["old"] = x["lp"] + 1.2 * noise.to(x["lp"])
    _, metrics, _ = check(face, x, loss_type=loss_type, dual_clip=dual_clip, delta=delta, importance_level=level,
                          eps_low=0.1)
    if dual_clip is not None and delta is None and level == "token":  # delta < dual_clip would hide it
        assert metrics["dual_clip_frac"] > 0


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("loss_type, agg_mode", [("dapo", None), ("cispo", None), ("grpo", "token-mean"),
                                                  ("grpo", "seq-mean-token-sum"), ("sapo", "seq-mean-token-mean"),
                                                  ("bnpo", "seq-mean-token-sum-norm")])
def test_num_items(face, loss_type, agg_mode):
    x = make_inputs(seed=3)
    check(face, x, loss_type=loss_type, agg_mode=agg_mode, num_items=37)
    check(face, x, loss_type=loss_type, agg_mode=agg_mode, num_items=torch.tensor(11, device=DEVICE))


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("loss_type, agg_mode", [("dr_grpo", None), ("grpo", "seq-mean-token-sum-norm")])
def test_max_completion_length(face, loss_type, agg_mode):
    x = make_inputs(seed=5)
    check(face, x, loss_type=loss_type, agg_mode=agg_mode, max_completion_length=64)


@pytest.mark.parametrize("face", FACES)
def test_sapo_temperatures(face):
    check(face, make_inputs(seed=9), loss_type="sapo", sapo_temperature_pos=2.5, sapo_temperature_neg=0.7,
          importance_level="sequence")


# ------------------------------------------------------------------------------------------------------------
# awkward inputs
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_row_masked(face, loss_type):
    x = make_inputs(masked_rows=range(B))
    loss, metrics, grad = check(face, x, loss_type=loss_type, ref_logprobs=x["ref"], beta=0.1,
                                importance_level="sequence" if loss_type in ("grpo", "sapo") else "token")
    assert loss.item() == 0 and not grad.any()
    assert all(v.item() == 0 for v in metrics.values())


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo"])
def test_one_token(face, loss_type, level):
    x = make_inputs(1, 1, seed=2, masked_rows=())
    check(face, x, loss_type=loss_type, importance_level=level, ref_logprobs=x["ref"], beta=0.1)


@pytest.mark.parametrize("face", FACES)
def test_long_rows_span_several_blocks(face):
    x = make_inputs(3, 1500, seed=4)
    check(face, x, loss_type="grpo", importance_level="sequence", ref_logprobs=x["ref"], beta=0.05,
          is_weights=x["isw"][:, 0])
    check(face, x, loss_type="dapo", dual_clip=2.0)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("mask_kind", ["bool", "long", "float"])
def test_mask_dtypes(face, mask_kind):
    x = make_inputs(seed=6, mask_kind=mask_kind)
    if mask_kind == "float":  # float masks are token weights
        x["mask"] = x["mask"] * (0.5 + torch.rand_like(x["mask"]))
    check(face, x, loss_type="grpo", importance_level="sequence", agg_mode="token-mean")


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_advantages_per_row_equal_broadcast(face, level):
    x = make_inputs(seed=8)
    a = run(face, x, loss_type="grpo", importance_level=level)
    x2 = dict(x, adv=x["adv"][:, None].expand(B, T).contiguous())
    b = run(face, x2, loss_type="grpo", importance_level=level)
    assert rel_err(a[0], b[0]) < 1e-6 and rel_err(a[2], b[2]) < 1e-6


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_padding_values_are_never_read(face, level):
    x = make_inputs(seed=10)
    pad = ~x["mask"]
    dirty = dict(x)
    for k in ("lp", "old", "ref", "isw"):
        dirty[k] = x[k].masked_fill(pad, float("nan"))
    dirty["adv"] = x["adv"][:, None].expand(B, T).masked_fill(pad, float("inf"))
    clean = dict(x, adv=x["adv"][:, None].expand(B, T).contiguous())
    kw = dict(loss_type="sapo", importance_level=level, beta=0.1, kl_type="k3")
    a = run(face, clean, ref_logprobs=clean["ref"], is_weights=clean["isw"], **kw)
    b = run(face, dirty, ref_logprobs=dirty["ref"], is_weights=dirty["isw"], **kw)
    assert torch.isfinite(b[0]) and torch.isfinite(b[2]).all()
    assert rel_err(b[0], a[0]) < 1e-6 and rel_err(b[2], a[2]) < 1e-6
    assert all(torch.isfinite(v) for v in b[1].values())


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_extreme_log_ratios_are_clamped(face, dual_clip, level):
    """|log ratio| = 30 > 20 hits verl's clamp (no gradient past it); ref - lp in {3, -12} pushes k3 past its
    clamp at 10, -25 past the inner clamp at 20."""
    x = make_inputs(seed=12, adv_2d=True)
    x["old"] = x["lp"] + 30 * torch.sign(torch.randn_like(x["lp"]))
    shifts = torch.tensor([3.0, -12.0, -25.0, 0.1], device=DEVICE, dtype=x["lp"].dtype)
    x["ref"] = x["lp"] + shifts.repeat(T)[:T]
    loss, _, grad = check(face, x, loss_type="dapo", dual_clip=dual_clip, ref_logprobs=x["ref"], beta=0.1,
                          importance_level=level)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_float64_reference_face_is_exact():
    x = make_inputs(seed=13, dtype=torch.float64)
    for loss_type, agg_mode in itertools.product(LOSS_TYPES, AGG_MODES):
        check("reference", x, tol=1e-7, loss_type=loss_type, agg_mode=agg_mode, importance_level="sequence",
              ref_logprobs=x["ref"], beta=0.1, is_weights=x["isw"], eps_high=1.1 if loss_type == "cispo" else 0.28)


@pytest.mark.parametrize("face", FACES)
def test_bf16_inputs(face):
    x = make_inputs(seed=14, dtype=torch.bfloat16)
    loss, _, grad = run(face, x, loss_type="grpo", ref_logprobs=x["ref"], beta=0.04)
    r_loss, _, r_grad, scale = reference(x["lp"], x["old"], x["adv"], x["mask"], loss_type="grpo",
                                         ref_logprobs=x["ref"], beta=0.04)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert abs(loss.item() - r_loss.item()) < 1e-2 * scale.item() and rel_err(grad, r_grad) < 1e-2


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 6), t=st.integers(1, 300), seed=st.integers(0, 2**16),
       loss_type=st.sampled_from(LOSS_TYPES), agg_mode=st.sampled_from(AGG_MODES),
       level=st.sampled_from(["token", "sequence"]), adv_2d=st.booleans(), kl=st.sampled_from(KL_CASES),
       clip=st.sampled_from([(None, None), (3.0, None), (None, 1.5)]), weights=st.booleans(),
       density=st.floats(0.0, 1.0))
def test_random_shapes(b, t, seed, loss_type, agg_mode, level, adv_2d, kl, clip, weights, density):
    x = make_inputs(b, t, seed=seed, adv_2d=adv_2d, density=density, masked_rows=(seed % 4,))
    dual_clip, delta = clip if loss_type in CLIPPED else (None, None)
    for face in FACES:
        check(face, x, loss_type=loss_type, agg_mode=agg_mode, importance_level=level, kl_type=kl[0], beta=kl[1],
              ref_logprobs=x["ref"], dual_clip=dual_clip, delta=delta,
              is_weights=x["isw"] if weights else None, eps_high=1.0 if loss_type == "cispo" else 0.28)


# ------------------------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile, bad input
# ------------------------------------------------------------------------------------------------------------


def op_args(x, **over):
    from mgpt_ops.rl.policy_loss import _row_coefficients

    coef = _row_coefficients(x["mask"].float(), "grpo", None, None, None)
    args = dict(logprobs=x["lp"].clone().requires_grad_(True), old_logprobs=x["old"], advantages=x["adv"],
                mask=x["mask"], row_coef=coef, ref_logprobs=x["ref"], is_weights=x["isw"], loss_type="grpo",
                importance_level="token", kl_type="k3", eps_low=0.2, eps_high=0.28, dual_clip=3.0, delta=None,
                beta=0.04, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    args.update(over)
    return tuple(args.values())


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_opcheck(face, level):
    x = make_inputs(seed=15)
    with mgpt_ops.use_backend(face):
        torch.library.opcheck(torch.ops.mgpt.policy_loss.default, op_args(x, importance_level=level))
        torch.library.opcheck(torch.ops.mgpt.policy_loss.default,
                              op_args(x, ref_logprobs=None, is_weights=None, beta=0.0, loss_type="sapo",
                                      dual_clip=None))


@pytest.mark.parametrize("face", FACES)
def test_torch_compile_fullgraph_with_backward(face):
    x = make_inputs(seed=16)

    def step(lp, old, adv, mask, ref, n):
        loss, metrics = policy_loss(lp, old, adv, mask, loss_type="dapo", num_items=n, ref_logprobs=ref, beta=0.04,
                                    importance_level="sequence")
        return loss * 2, metrics["clip_frac_high"]

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        lp = x["lp"].clone().requires_grad_(True)
        with mgpt_ops.use_backend(face):
            loss, clip = fn(lp, x["old"], x["adv"], x["mask"], x["ref"], torch.tensor(50.0, device=DEVICE))
        loss.backward()
        results.append((loss.detach(), clip, lp.grad))
    (a, ca, ga), (b, cb, gb) = results
    assert rel_err(b, a) < 1e-6 and rel_err(gb, ga) < 1e-6 and rel_err(cb, ca) < 1e-6


BAD_INPUTS = [
    (dict(loss_type="ppo"), "'loss_type' must be one of"),
    (dict(agg_mode="token-sum"), "'agg_mode' must be one of"),
    (dict(kl_type="low_var_kl"), "'kl_type' must be one of"),
    (dict(importance_level="seq"), "'importance_level' must be one of"),
    (dict(eps_low=-0.1), "'eps_low' must be a finite number >= 0"),
    (dict(eps_high=float("nan")), "'eps_high' must be a finite number"),
    (dict(loss_type="cispo", eps_high=0.0), "'eps_high' must be a finite number > 0"),
    (dict(dual_clip=1.0), "'dual_clip' must be a finite number > 1"),
    (dict(delta=0.5), "'delta' must be a finite number > 1"),
    (dict(loss_type="sapo", dual_clip=3.0), "apply to the clipped losses"),
    (dict(loss_type="cispo", delta=2.0), "apply to the clipped losses"),
    (dict(beta=0.1), "needs 'ref_logprobs'"),
    (dict(beta=float("inf"), ref_logprobs="ref"), "'beta' must be a finite number"),
    (dict(sapo_temperature_neg=0.0), "'sapo_temperature_neg' must be a finite number > 0"),
    (dict(max_completion_length=0), "'max_completion_length' must be an int >= 1"),
    (dict(max_completion_length=12.5), "'max_completion_length' must be an int >= 1"),
    (dict(num_items=0), "'num_items' must be a finite number > 0"),
    (dict(num_items="tokens"), "'num_items' must be a finite number > 0"),
    (dict(lp=torch.zeros(B, T, dtype=torch.int64)), "'logprobs' must have dtype"),
    (dict(lp=torch.zeros(B * T)), "'logprobs' must have 2 dimension"),
    (dict(lp=torch.zeros(0, T), old=torch.zeros(0, T), mask=torch.zeros(0, T, dtype=torch.bool),
          adv=torch.zeros(0)), "must be non-empty"),
    (dict(old=torch.zeros(B, T + 1)), "'old_logprobs' must have shape"),
    (dict(mask=torch.zeros(B, T, dtype=torch.complex64)), "'mask' must have dtype"),
    (dict(mask=torch.zeros(B, 1, dtype=torch.bool)), "'mask' must have shape"),
    (dict(adv=torch.zeros(B + 1)), "'advantages' must have shape"),
    (dict(adv=torch.zeros(B, T, 1)), "'advantages' must have shape"),
    (dict(is_weights=torch.zeros(T)), "'is_weights' must have shape"),
    (dict(ref_logprobs=torch.zeros(B, 2)), "'ref_logprobs' must have shape"),
    (dict(num_items=torch.tensor([3.0, 4.0])), "'num_items' must have 0 dimension"),
]


@pytest.mark.parametrize("kwargs, match", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input(kwargs, match):
    x = make_inputs(seed=17)
    kwargs = dict(kwargs)
    tensors = {k: kwargs.pop(k).to(DEVICE) if k in kwargs else x[k] for k in ("lp", "old", "adv", "mask")}
    if isinstance(kwargs.get("ref_logprobs"), str):
        kwargs["ref_logprobs"] = x["ref"]
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        policy_loss(tensors["lp"], tensors["old"], tensors["adv"], tensors["mask"], **kwargs)


# ------------------------------------------------------------------------------------------------------------
# the compiled (non-interpreted) kernel: compiled for Hopper as launched (tests/hopper_compile.py)
# ------------------------------------------------------------------------------------------------------------
_LAUNCHES = """
from mgpt_ops.rl.policy_loss import LossConfig
from mgpt_ops.rl import policy_loss_triton as kt
with compile_launches_for_hopper() as kernels:
    for loss, kl, seq in (("grpo", "k3", False), ("cispo", "k1", True), ("sapo", "k2", False)):
        for b, t, dtype in ((512, 8192, torch.bfloat16), (3, 77, torch.float32)):
            kernels.label = f"{loss} {b}x{t}"
            cfg = LossConfig(loss, seq, kl, 0.2, 0.28, 3.0 if loss == "grpo" else None, None, 0.01, 1.0, 1.05, True)
            lp = torch.randn(b, t).to(dtype)
            kt.policy_loss_triton(lp, lp, torch.randn(b), torch.ones(b, t, dtype=torch.bool), torch.rand(b), lp,
                                  torch.rand(b, t) if seq else None, cfg)
"""


def test_triton_kernel_compiles_for_hopper_as_launched():
    """The interpreter accepts code the compiler rejects: compile the kernel as ``policy_loss`` launches it for
    sm_90 (no GPU needed), for each loss family and KL estimator, large and awkward shapes: no register spills."""
    kernels = compile_in_subprocess(_LAUNCHES)
    assert len(kernels) == 6 and {k.name for k in kernels} == {"_policy_loss_kernel"}
    assert all(k.stack_bytes == 0 for k in kernels), kernels
