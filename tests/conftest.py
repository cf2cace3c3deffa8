"""Fixtures, hooks and environment setup only; what test files share is in helpers.py."""

import os

import pytest
import torch

# Without a GPU, Triton kernels can only run in its interpreter. It is read when the kernels
# are defined, so it must be set before anything (the backend registry included) imports
# triton: here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic, quick: tests use 1-2 threads on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def nan_empty(monkeypatch):
    """Make torch.empty return NaN-filled tensors, so an output a kernel leaves unwritten fails."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return empty
