"""Triton backend (docs/CONTRACT.md): GPU kernels for CUDA tensors.

On a machine without a GPU the kernels run only under ``TRITON_INTERPRET=1`` (slow,
for tests); then CPU tensors are accepted too.
"""

from __future__ import annotations

import os

import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    if _interpreting():
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return True, ""


def devices() -> set[str]:
    return {"cuda", "cpu"} if _interpreting() else {"cuda"}


def moments(x, f=None, mask=None) -> dict:
    from entrodrop_fast.ops.triton.moments import moments as _moments

    return _moments(x, f, mask)


def bucket(x, f=None, mask=None, bins: int = 20, paper_exact: bool = False) -> torch.Tensor:
    from entrodrop_fast.ops.triton.bucket import bucket as _bucket

    return _bucket(x, f, mask, bins, paper_exact)


def cosine(x, other, mask=None, fused: bool = True):
    from entrodrop_fast.ops.triton.cosine import cosine as _cosine

    return _cosine(x, other, mask, fused)


def knn_kth_distance(x, k: int) -> torch.Tensor:
    from entrodrop_fast.ops.triton.knn import knn_kth_distance as _knn

    return _knn(x, k)
