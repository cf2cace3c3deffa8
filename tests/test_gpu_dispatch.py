"""How the API finds the CUDA kernels' declarations (runs on CPU: nothing is launched).

backend="cpp" on CUDA tensors is the cuda backend (ops/backends.py ALIASES), so for CUDA
tensors the API reads cuda_backend's REPORTS_NONFINITE and PAIRS (for the ops native to it in
the table); CPU tensors keep the cpp backend's own."""

import pytest
import torch

from entrodrop_fast.ops import api, cpp_backend, cuda_backend
from entrodrop_fast.ops import backends as B

CUDA, CPU = torch.device("cuda"), torch.device("cpu")

pytestmark = pytest.mark.skipif(
    not cpp_backend.available()[0], reason="the compiled extension is not built"
)


@pytest.fixture(autouse=True)
def cpp_loaded():
    assert B._module("cpp") is cpp_backend


def test_cuda_tensors_read_cuda_backends_declarations():
    assert B._native_module("cpp", "cuda", "bucket") is cuda_backend
    assert B._native_module("cpp", "cpu", "bucket") is cpp_backend
    assert cuda_backend.REPORTS_NONFINITE == {"cuda": frozenset({"moments", "bucket"})}
    assert api._reports_nonfinite("cpp", CUDA, "bucket") and api._reports_nonfinite(
        "cpp", CUDA, "moments"
    )
    assert not api._reports_nonfinite("cpp", CUDA, "cosine")  # runs on Triton or the reference
    assert api._pair_kernel("cpp", CUDA, "bucket") is cuda_backend.bucket_pair
    assert api._pair_kernel("cpp", CUDA, "moments") is cuda_backend.moments_pair
    # the same under the backend's own name
    assert api._reports_nonfinite("cuda", CUDA, "bucket") and not api._reports_nonfinite(
        "cuda", CUDA, "cosine"
    )
    assert api._pair_kernel("cuda", CUDA, "bucket") is cuda_backend.bucket_pair


def test_cpu_tensors_unchanged():
    for op in ("bucket", "moments", "cosine"):
        assert api._reports_nonfinite("cpp", CPU, op)
    assert api._pair_kernel("cpp", CPU, "bucket") is cpp_backend.bucket_pair
    assert api._pair_kernel("cpp", CPU, "moments") is cpp_backend.moments_pair
    assert api._reports_nonfinite("torch", CPU, "bucket") is False


def test_declarations_follow_the_module(monkeypatch):
    monkeypatch.setattr(cuda_backend, "REPORTS_NONFINITE", {})
    monkeypatch.setattr(cuda_backend, "PAIRS", {})
    assert not api._reports_nonfinite("cpp", CUDA, "bucket")
    assert api._pair_kernel("cpp", CUDA, "bucket") is None
    assert api._reports_nonfinite("cpp", CPU, "bucket")  # the CPU declarations are cpp's own
