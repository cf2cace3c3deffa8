"""The ``triton`` backend (docs/CONTRACT.md): Triton kernels (ops/triton/) for CUDA tensors.

On a machine without a GPU the kernels run only under ``TRITON_INTERPRET=1`` (slow,
for tests); then CPU tensors are accepted too. moments, bucket, cosine and bucket_cosine
(bucket with the cosine's per-token sums from the same first pass) are its own;
ops/backends.py TABLE sends its knn to the tiled GEMM search of ops/knn_tiled.py (tensor
cores through cuBLAS: the Triton kernel of ops/triton/knn.py measured 28x slower than
cdist + topk on an H200).
"""

from __future__ import annotations

import os

import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Kernels that report NaN/Inf in Y = x (+ f) among the valid tokens through their outputs
# (docs/CONTRACT.md, "Non-finite values"), per device type: the API then skips its separate
# validation pass and checks the outputs instead. Under the interpreter the same kernels run
# on CPU tensors.
_OPS = frozenset({"moments", "bucket", "cosine", "bucket_cosine"})
REPORTS_NONFINITE = {"cuda": _OPS} | ({"cpu": _OPS} if _interpreting() else {})
# Ops with a pair kernel (<op>_pair: the op of Y = x + f and of x from one read of x and f,
# for delta_entropy), per device type.
_PAIR_OPS = frozenset({"moments", "bucket"})
PAIRS = {"cuda": _PAIR_OPS} | ({"cpu": _PAIR_OPS} if _interpreting() else {})


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


def moments_pair(x, f, mask=None) -> tuple[dict, dict]:
    """(moments of Y = x + f, moments of x) from one read of x and f."""
    from entrodrop_fast.ops.triton.moments import moments_pair as _pair

    return _pair(x, f, mask)


def bucket(x, f=None, mask=None, bins: int = 20, paper_exact: bool = False) -> torch.Tensor:
    from entrodrop_fast.ops.triton.bucket import bucket as _bucket

    return _bucket(x, f, mask, bins, paper_exact)


def bucket_pair(
    x, f, mask=None, bins: int = 20, paper_exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_d of Y = x + f, H_d of x), fp64 [B, D] each, from one read of x and f per pass."""
    from entrodrop_fast.ops.triton.bucket import bucket_pair as _pair

    return _pair(x, f, mask, bins, paper_exact)


def bucket_cosine(
    x, f, c, mask=None, bins: int = 20, paper_exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H_d of Y, sum of cos(partner, Y), count): Y = x + f with partner x, or Y = x with
    partner c; the cosine's sums from the bucket kernel's own read where it can."""
    from entrodrop_fast.ops.triton.bucket import bucket_cosine as _bc

    return _bc(x, f, c, mask, bins, paper_exact)


def cosine(x, other, mask=None, fused: bool = True):
    from entrodrop_fast.ops.triton.cosine import cosine as _cosine

    return _cosine(x, other, mask, fused)
