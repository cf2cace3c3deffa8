"""How the API finds the CUDA kernels' declarations (runs on CPU: nothing is launched).

The cpp backend hands CUDA tensors to cuda_backend, so for CUDA tensors the API reads
cuda_backend's REPORTS_NONFINITE and PAIRS (api._kernel_module); CPU tensors keep the cpp
backend's own."""

import pytest
import torch

from entrodrop_fast.ops import api, cpp_backend, cuda_backend

CUDA, CPU = torch.device("cuda"), torch.device("cpu")

pytestmark = pytest.mark.skipif(not cpp_backend.available()[0], reason="the compiled extension is not built")


@pytest.fixture(autouse=True)
def cpp_loaded():
    assert api._module("cpp") is cpp_backend


def test_cuda_tensors_read_cuda_backends_declarations():
    assert api._kernel_module("cpp", CUDA) is cuda_backend
    assert api._kernel_module("cpp", CPU) is cpp_backend
    assert cuda_backend.REPORTS_NONFINITE == {"cuda": frozenset({"moments", "bucket"})}
    assert api._reports_nonfinite("cpp", CUDA, "bucket") and api._reports_nonfinite("cpp", CUDA, "moments")
    assert not api._reports_nonfinite("cpp", CUDA, "cosine")  # runs on Triton or the reference
    assert api._pair_kernel("cpp", CUDA, "bucket") is cuda_backend.bucket_pair
    assert api._pair_kernel("cpp", CUDA, "moments") is cuda_backend.moments_pair


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
