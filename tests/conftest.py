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

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def llm_like(*shape, seed=0, dtype=torch.float32, outliers=True):
    """Random hidden states with a few channels ~1e4x larger, as in real LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if outliers and shape[-1] >= 4:
        x[..., 1] = x[..., 1] * 50 + 3000.0
        x[..., shape[-1] // 2] *= 400.0
    return x.to(dtype)


def assert_close(ref, tri, rtol, atol=0.0, name=""):
    """Compare a fast result (tri) with the reference (ref), reporting the worst error."""
    ref = torch.as_tensor(ref, dtype=torch.float64).cpu()
    tri = torch.as_tensor(tri, dtype=torch.float64).cpu()
    assert ref.shape == tri.shape, f"{name}: shape {tuple(tri.shape)} != reference {tuple(ref.shape)}"
    err = (ref - tri).abs()
    tol = atol + rtol * ref.abs()
    worst = (err - tol).argmax() if err.numel() else None
    ok = bool((err <= tol).all()) and bool(torch.isfinite(tri).all() == torch.isfinite(ref).all())
    assert ok, f"{name}: max abs err {err.max():.3e}, at {worst}: ref {ref.flatten()[worst]:.8g} vs {tri.flatten()[worst]:.8g} (rtol {rtol}, atol {atol})"


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
