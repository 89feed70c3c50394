"""Shared test setup.

Tests run on the CPU by default, with every Triton kernel executed by the Triton interpreter
(TRITON_INTERPRET=1 must be set before any @triton.jit decorator runs, hence here, first). On a GPU machine
`MGPT_TEST_DEVICE=cuda pytest ...` runs the same tests on CUDA tensors with compiled kernels.
"""

import os

DEVICE = os.environ.get("MGPT_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mgpt_ops._backend import available_backends  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


def test_device() -> torch.device:
    return torch.device(DEVICE)


def faces_here(faces: tuple[str, ...]) -> list[str]:
    """The faces of an op that can run on the test device in this process (for parametrize)."""
    return available_backends(torch.device(DEVICE), faces)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere counts as failure)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if torch.isnan(out).any():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)
