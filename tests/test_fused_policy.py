"""fused_linear_policy_loss == float64 (logits -> log_softmax -> gather -> clipped surrogate), values and grads."""

import pytest
import torch

import mgpt_ops
from conftest import faces_here, rel_err


def reference_dapo(hidden, weight, labels, old, adv, mask, eps_low, eps_high, temperature):
    """DAPO (TRL loss_type="dapo", token sum / number of valid tokens) written from the published formula."""
    logits = hidden.double() @ weight.double().T / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    ratio = torch.exp(lp - old.double())
    a = adv.double()[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    m = mask.double()
    return (per_token * m).sum() / m.sum()


@pytest.mark.parametrize("face", faces_here(("reference", "triton", "cpu", "cuda")))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_float64_composition(device, face, dtype, tol):
    torch.manual_seed(0)
    B, T, H, V = 3, 5, 32, 301
    hidden = torch.randn(B, T, H, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=device)
    mask = torch.rand(B, T, device=device) > 0.3
    mask[:, 0] = True
    with torch.no_grad():
        old = torch.log_softmax((hidden.double() @ weight.double().T), -1).gather(-1, labels[..., None]).squeeze(-1)
        old = (old + 0.3 * torch.randn_like(old)).float()  # ratios on both sides of the clip range
    adv = torch.randn(B, device=device)
    with mgpt_ops.use_backend(face):
        loss, metrics = mgpt_ops.fused_linear_policy_loss(hidden, weight, labels, old, adv, mask,
                                                          loss_type="dapo", temperature=0.9)
    ref = reference_dapo(hidden, weight, labels, old, adv, mask, 0.2, 0.28, 0.9)
    assert rel_err(loss.detach(), ref.detach()) < tol
    assert 0.0 < metrics["entropy_mean"].item() <= torch.log(torch.tensor(float(V))).item() + 1e-4
    (gh, gw) = torch.autograd.grad(loss, (hidden, weight))
    (rh, rw) = torch.autograd.grad(ref, (hidden, weight))
    assert rel_err(gh, rh) < 5 * tol
    assert rel_err(gw, rw) < 5 * tol


def test_rejects_mismatched_hidden(device):
    hidden = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="'hidden' must have shape"):
        mgpt_ops.fused_linear_policy_loss(hidden, torch.randn(11, 8, device=device),
                                          torch.zeros(2, 3, dtype=torch.long, device=device),
                                          torch.randn(2, 3, device=device), torch.randn(2, device=device),
                                          torch.ones(2, 3, dtype=torch.bool, device=device))
