"""Paired statistics for comparing two pruned models on the same evaluation items.

- :func:`mcnemar_exact`: exact (binomial) McNemar test on per-item correctness (0/1) of
  two models on the same items: only the discordant items count.
- :func:`paired_mean_diff`: mean of per-unit differences (e.g. per-window NLL of model A
  minus model B on the same windows) with a 95% normal interval.
- :func:`binom_two_sided`: the two-sided exact binomial p-value with p = 1/2 used by both.

Pure Python (math only), so the closed forms are visible and testable against scipy.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def binom_two_sided(k: int, n: int) -> float:
    """Two-sided exact p-value of ``k`` successes in ``n`` fair-coin trials:
    ``min(1, 2 * P(X <= min(k, n - k)))`` (the symmetric binomial, so doubling the smaller
    tail is exact). ``n == 0`` -> 1.0. Raises ValueError unless 0 <= k <= n."""
    if not (isinstance(k, int) and isinstance(n, int)) or n < 0 or not 0 <= k <= n:
        raise ValueError(f"need integers 0 <= k <= n, got k={k!r}, n={n!r}")
    if n == 0:
        return 1.0
    m = min(k, n - k)
    # log-space sum: n up to a few thousand items without overflow
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(m + 1)
    ]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def mcnemar_exact(a: list[int], b: list[int]) -> dict:
    """Exact McNemar test of two models' per-item correctness on the same items.

    ``a``, ``b``: equal-length sequences of 0/1 (or bools), item i of both is the same item.
    Returns ``{"n": items, "a_only": a right & b wrong, "b_only": b right & a wrong,
    "diff": accuracy(a) - accuracy(b), "p": two-sided exact p-value}``.
    Raises ValueError on unequal lengths, empty input, or values other than 0/1.
    """
    if len(a) != len(b):
        raise ValueError(
            f"paired items: a has {len(a)} items, b has {len(b)}; they must be the same items"
        )
    if not a:
        raise ValueError("paired items: no items")
    for v in (*a, *b):
        if v not in (0, 1):  # True/False compare equal to 1/0
            raise ValueError(f"per-item correctness must be 0 or 1, got {v!r}")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    return {
        "n": len(a),
        "a_only": a_only,
        "b_only": b_only,
        "diff": (sum(map(int, a)) - sum(map(int, b))) / len(a),
        "p": binom_two_sided(a_only, a_only + b_only),
    }


def paired_mean_diff(a: list[float], b: list[float]) -> dict:
    """Mean of ``a[i] - b[i]`` with a 95% normal interval (mean ± 1.96 standard errors).

    Returns ``{"n", "mean", "ci95": [lo, hi]}``; with one pair there is no spread to
    estimate and ``ci95`` is None. Raises ValueError on unequal lengths or empty input.
    """
    if len(a) != len(b):
        raise ValueError(
            f"paired values: a has {len(a)}, b has {len(b)}; they must be the same units"
        )
    if not a:
        raise ValueError("paired values: none")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    m = sum(d) / n
    if n < 2:
        return {"n": n, "mean": m, "ci95": None}
    se = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1) / n)
    return {"n": n, "mean": m, "ci95": [m - Z95 * se, m + Z95 * se]}
