"""Backend selection: automatic by device, pinned by use_backend or MGPT_BACKEND, clear errors otherwise."""

import pytest
import torch

import mgpt_ops
from mgpt_ops._backend import choose_backend, pinned_backend

FACES = ("reference", "triton", "cpu")


def test_use_backend_pins_and_restores(monkeypatch):
    monkeypatch.delenv("MGPT_BACKEND", raising=False)
    assert pinned_backend() is None
    with mgpt_ops.use_backend("reference"):
        assert pinned_backend() == "reference"
        assert choose_backend("op", torch.device("cpu"), FACES, {"cpu": ("cpu",)}) == "reference"
    assert pinned_backend() is None


def test_env_var_pins_and_context_wins(monkeypatch):
    monkeypatch.setenv("MGPT_BACKEND", "reference")
    assert choose_backend("op", torch.device("cpu"), FACES, {"cpu": ("cpu",)}) == "reference"
    with mgpt_ops.use_backend("cpu"):
        assert choose_backend("op", torch.device("cpu"), FACES, {}) == "cpu"


def test_unknown_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with mgpt_ops.use_backend("fast"):
            pass
    monkeypatch.setenv("MGPT_BACKEND", "gpu")
    with pytest.raises(ValueError, match="MGPT_BACKEND"):
        pinned_backend()


def test_pinned_face_the_op_lacks_or_cannot_run(monkeypatch):
    monkeypatch.delenv("MGPT_BACKEND", raising=False)
    with mgpt_ops.use_backend("cuda"):  # an op without that face keeps its automatic choice
        assert choose_backend("op", torch.device("cpu"), FACES, {"cpu": ("cpu",)}) == "cpu"
    with mgpt_ops.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cannot run on cpu"):
            choose_backend("op", torch.device("cpu"), FACES + ("cuda",), {})


def test_automatic_choice_follows_preference(monkeypatch):
    monkeypatch.delenv("MGPT_BACKEND", raising=False)
    assert choose_backend("op", torch.device("cpu"), FACES, {"cpu": ("cpu",)}) == "cpu"
    assert choose_backend("op", torch.device("cpu"), FACES, {}) == "reference"
