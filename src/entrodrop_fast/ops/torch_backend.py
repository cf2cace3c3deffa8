"""The ``torch`` backend: the readable reference (ops/reference.py) on any device torch runs on.

fp32 inputs, fp64 accumulation; slow, and the yardstick every other backend is tested
against. No pair kernels, and no kernel reports non-finite input itself (the API checks it).
"""

from __future__ import annotations

from entrodrop_fast.ops.reference import bucket, cosine, covariance, knn_kth_distance, moments
from entrodrop_fast.ops.reference import renyi_entropy_1 as renyi

__all__ = [
    "PAIRS",
    "REPORTS_NONFINITE",
    "available",
    "bucket",
    "cosine",
    "covariance",
    "devices",
    "knn_kth_distance",
    "moments",
    "renyi",
]

REPORTS_NONFINITE: dict[str, frozenset[str]] = {}
PAIRS: dict[str, frozenset[str]] = {}


def available() -> tuple[bool, str]:
    return True, ""


def devices() -> set[str]:
    return {"cpu", "cuda"}
