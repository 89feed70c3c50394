"""RL loss family: token log-probabilities from hidden states, the clipped policy loss, and both fused.

Cases (forward + backward timed; random upstream gradients for the non-scalar outputs):

``fused_linear_logprobs``  z = (h W^T) / T,  logprob_i = z_{i,y_i} - logsumexp_j z_ij,
                           entropy_i = logsumexp_j z_ij - sum_j softmax(z_i)_j z_ij.
    naive: what TRL/verl do -- materialise ``h @ W.T`` in the input dtype, ``.float() / T``,
    ``log_softmax``, gather; entropy from the same log-softmax; autograd backward.
``policy_loss``            DAPO token-mean clipped surrogate, r = exp(logp - old_logp):
                           loss = sum_t m_t max(-A_t r_t, -A_t clip(r_t, 1-eps_lo, 1+eps_hi)) / sum_t m_t.
    naive: the same formula as unfused PyTorch ops with autograd.
``linear_policy_loss``     hidden states -> logprobs -> policy loss in one: our ``fused_linear_policy_loss``
                           vs naive logits -> log_softmax -> policy loss, and
                           vs Liger-Kernel's ``LigerFusedLinearGRPOLoss`` when ``liger_kernel`` imports
                           (Liger computes a loss, not per-token log-probabilities, so this is the case
                           where it is an apples-to-apples baseline; GRPO advantages are per sequence).
"""

from __future__ import annotations

import torch

from bench.common import CaseSetup, CaseSpec, Goal, Impl, dtype_of, generator, kernel_faces, load, pinned, randint, randn

VOCAB = 151_936                  # Qwen3 / Qwen3-VL vocabulary
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # DAPO "clip-higher" defaults (Yu et al., 2025)
# Goals from the plan, for fused_linear_logprobs at the headline GPU shapes.
LOGPROBS_GOAL = Goal(baseline="naive", max_time_ratio=0.9, max_memory_ratio=1 / 6)
# Relative-error tolerances between ours and a baseline. fp32: both sides are fp32 throughout but sum
# 151,936 terms in different orders. bf16: the naive side rounds the logits (and their gradient) to
# bf16 before the fp32 softmax, ours need not: differences of a few 1e-3, up to ~1e-2 on gradients.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}


def cases(device: torch.device, quick: bool) -> list[CaseSpec]:
    faces = list(kernel_faces(device))
    # policy_loss has faces reference and triton only: on CUDA time the Triton kernel, on the CPU whatever
    # the op picks by itself (a pinned face it lacks would silently mean its automatic choice).
    policy_faces = ["triton"] if device.type == "cuda" else ["auto"]
    # fused_linear_policy_loss runs fused_linear_logprobs then policy_loss: one pinned face cannot suit
    # both (policy_loss has neither a C++ nor a CUDA face), so each op makes its own automatic choice.
    linear_faces = ["auto"]
    if device.type == "cuda":
        if quick:
            lp_shapes, pl_shapes, lpl_shapes = [(512, 512, 32_768, "bf16")], [(8, 512)], [(2, 256, 512, 32_768)]
        else:
            lp_shapes = [(8192, 2048, VOCAB, "bf16"), (8192, 4096, VOCAB, "bf16")]
            pl_shapes = [(64, 2048), (256, 4096), (512, 8192)]
            lpl_shapes = [(4, 2048, 2048, VOCAB), (4, 2048, 4096, VOCAB)]
        lpl_dtype, headline = "bf16", not quick
    else:
        if quick:
            lp_shapes, pl_shapes, lpl_shapes = [(64, 128, 8192, "fp32")], [(4, 128)], [(2, 32, 128, 8192)]
        else:
            # ~3 minutes on 2 shared cores: one naive fwd+bwd here is 1-2 s (the logits are 78-155 M floats).
            lp_shapes = [(256, 512, VOCAB, "fp32"), (512, 512, VOCAB, "bf16")]
            pl_shapes = [(16, 1024), (64, 2048)]
            lpl_shapes = [(1, 256, 1024, VOCAB)]
        lpl_dtype, headline = ("fp32" if quick else "bf16"), False
    specs = [CaseSpec("fused_linear_logprobs",
                      dict(N=n, H=h, V=v, dtype=dt, temperature=1.0, faces=faces, goal=headline),
                      f"N={n} H={h} V={v} {dt}") for n, h, v, dt in lp_shapes]
    specs += [CaseSpec("policy_loss", dict(B=b, T=t, dtype="fp32", faces=policy_faces), f"B={b} T={t} fp32")
              for b, t in pl_shapes]
    specs += [CaseSpec("linear_policy_loss", dict(B=b, T=t, H=h, V=v, dtype=lpl_dtype, faces=linear_faces),
                       f"B={b} T={t} H={h} V={v} {lpl_dtype}") for b, t, h, v in lpl_shapes]
    return specs


def setup(name: str, params: dict, device: torch.device) -> CaseSetup:
    return {"fused_linear_logprobs": _logprobs_case, "policy_loss": _policy_case,
            "linear_policy_loss": _linear_policy_case}[name](params, device)


# ------------------------------------------------------------------------------------------ baselines

def naive_logprobs(hidden, weight, labels, temperature: float):
    """Materialised logits, as TRL/verl compute them."""
    logits = (hidden @ weight.T).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def naive_policy_loss(logprobs, old_logprobs, advantages, mask):
    """DAPO token-mean clipped surrogate (formula in the module docstring), unfused."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - CLIP_LOW, 1.0 + CLIP_HIGH)
    return (torch.maximum(unclipped, clipped) * mask).sum() / mask.sum().clamp(min=1.0)


def _ours_per_face(faces, fn, why_unavailable: str | None) -> dict[str, Impl]:
    """One contender per backend face, each running ``fn`` with that face pinned."""
    return {f"ours:{face}": Impl("ours", pinned(face, fn) if fn else None, face, None if fn else why_unavailable)
            for face in faces}


def _grads(outputs, inputs, upstream):
    return torch.autograd.grad(outputs, inputs, [g.to(o.dtype) for o, g in zip(outputs, upstream)])


# ------------------------------------------------------------------------------------------ cases

def _logprobs_case(p: dict, device) -> CaseSetup:
    n, h, v, temp = p["N"], p["H"], p["V"], p["temperature"]
    gen, dtype = generator(device, 0), dtype_of(p["dtype"])
    hidden = randn((n, h), gen=gen, device=device, dtype=dtype, grad=True)
    # Scale so logits have a spread like a trained LM head's (std ~2), not a flat softmax.
    weight = randn((v, h), gen=gen, device=device, dtype=dtype, scale=2.0 / h**0.5, grad=True)
    labels = randint(v, (n,), gen=gen, device=device)
    upstream = (randn((n,), gen=gen, device=device), randn((n,), gen=gen, device=device))

    def naive():
        lp, ent = naive_logprobs(hidden, weight, labels, temp)
        gh, gw = _grads((lp, ent), (hidden, weight), upstream)
        return {"logprobs": lp.detach(), "entropy": ent.detach(), "grad_hidden": gh, "grad_weight": gw}

    op, why = load("mgpt_ops.rl.logprobs", "fused_linear_logprobs")

    def ours():
        lp, ent = op(hidden, weight, labels, temperature=temp, return_entropy=True)
        gh, gw = _grads((lp, ent), (hidden, weight), upstream)
        return {"logprobs": lp.detach(), "entropy": ent.detach(), "grad_hidden": gh, "grad_weight": gw}

    impls = _ours_per_face(p["faces"], ours if op else None, why)
    impls["naive"] = Impl("baseline", naive)
    elem = dtype.itemsize
    return CaseSetup(impls, TOLERANCE[p["dtype"]], flops=6.0 * n * h * v, min_bytes=2.0 * (n * h + v * h) * elem,
                     goal=LOGPROBS_GOAL if p.get("goal") else None)


def _policy_inputs(b: int, t: int, device, gen):
    """Log-probabilities in [-5, 0), old ones within ~10% ratio (so some tokens clip), one advantage per
    sequence (GRPO), and right-padded masks with response lengths between T/4 and T."""
    logprobs = (-5.0 * torch.rand((b, t), generator=gen, device=device)).requires_grad_(True)
    old = (logprobs + 0.1 * torch.randn((b, t), generator=gen, device=device)).detach()
    adv_seq = torch.randn((b,), generator=gen, device=device)
    lengths = torch.randint(max(1, t // 4), t + 1, (b,), generator=gen, device=device)
    mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).float()
    return logprobs, old, adv_seq, mask


def _policy_case(p: dict, device) -> CaseSetup:
    b, t = p["B"], p["T"]
    logprobs, old, adv_seq, mask = _policy_inputs(b, t, device, generator(device, 1))
    adv = adv_seq[:, None].expand(b, t).contiguous()

    def naive():
        loss = naive_policy_loss(logprobs, old, adv, mask)
        (g,) = torch.autograd.grad(loss, (logprobs,))
        return {"loss": loss.detach(), "grad_logprobs": g}

    op, why = load("mgpt_ops.rl.policy_loss", "policy_loss")

    def ours():
        loss, _metrics = op(logprobs, old, adv, mask, loss_type="dapo", eps_low=CLIP_LOW, eps_high=CLIP_HIGH)
        (g,) = torch.autograd.grad(loss, (logprobs,))
        return {"loss": loss.detach(), "grad_logprobs": g}

    impls = _ours_per_face(p["faces"], ours if op else None, why)
    impls["naive"] = Impl("baseline", naive)
    return CaseSetup(impls, TOLERANCE["fp32"], min_bytes=5.0 * b * t * 4)


def _linear_policy_case(p: dict, device) -> CaseSetup:
    b, t, h, v = p["B"], p["T"], p["H"], p["V"]
    gen, dtype = generator(device, 2), dtype_of(p["dtype"])
    hidden = randn((b, t, h), gen=gen, device=device, dtype=dtype, grad=True)
    weight = randn((v, h), gen=gen, device=device, dtype=dtype, scale=2.0 / h**0.5, grad=True)
    labels = randint(v, (b, t), gen=gen, device=device)
    _, old, adv_seq, mask = _policy_inputs(b, t, device, gen)
    adv = adv_seq[:, None].expand(b, t).contiguous()

    def finish(loss):
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        return {"loss": loss.detach(), "grad_hidden": gh, "grad_weight": gw}

    def naive():
        lp, _ = naive_logprobs(hidden.view(b * t, h), weight, labels.view(-1), 1.0)
        return finish(naive_policy_loss(lp.view(b, t), old, adv, mask))

    fused, why = load("mgpt_ops.rl.fused_policy", "fused_linear_policy_loss")

    def ours():
        loss, _metrics = fused(hidden, weight, labels, old, adv, mask, loss_type="dapo", eps_low=CLIP_LOW,
                               eps_high=CLIP_HIGH)
        return finish(loss)

    impls = _ours_per_face(p["faces"], ours if fused else None, why)
    impls["naive"] = Impl("baseline", naive)
    impls["liger"] = _liger_impl(hidden, weight, labels, mask, adv_seq, old, finish)
    elem = dtype.itemsize
    return CaseSetup(impls, TOLERANCE[p["dtype"]], flops=6.0 * b * t * h * v,
                     min_bytes=2.0 * (b * t * h + v * h) * elem)


def _liger_impl(hidden, weight, labels, mask, adv_seq, old, finish) -> Impl:
    """Liger-Kernel's chunked fused-linear GRPO loss with the same objective: no KL term (beta=0, no
    reference model), DAPO normalisation, the same clip range. Its API (liger_kernel.chunked_loss):
    LigerFusedLinearGRPOLoss(...)(_input[B,T,H], lin_weight[V,H], selected_token_ids[B,T],
    attention_mask[B,T], advantages[B], old_per_token_logps=[B,T]) -> (loss, metrics)."""
    cls, why = load("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
    if cls is None:
        return Impl("baseline", None, unavailable=why)
    loss_fn = cls(beta=0.0, use_ref_model=False, loss_type="dapo", epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH,
                  temperature=1.0)

    def liger():
        loss, _metrics = loss_fn(hidden, weight, labels, mask, adv_seq, old_per_token_logps=old)
        return finish(loss)

    return Impl("baseline", liger)
