"""Readable torch reference for every estimator (the ground truth and the fallback).

Everything here follows the definitions in the README ("Estimators, exactly": the paper's,
arXiv 2504.03794, and its code's) and docs/CONTRACT.md literally, in fp32 for
the inputs (as the kernels see them) and fp64 for every accumulation. Shapes:
``x``/``f``: ``[B, T, D]``; ``mask``: ``[B, T]`` bool or None. The kernel-level functions
(``moments``, ``bucket``, ``cosine``, ``knn_kth_distance``) have the same signatures as
the compiled backends, so tests compare them one to one.
"""

from __future__ import annotations

import math

import torch

PAPER_EPS = 1e-10  # the paper's clamp on probabilities and on kNN radii
COS_EPS = 1e-12


def _y(x: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
    """Y = x + f, added in fp32 as the kernels do."""
    y = x.float()
    return y if f is None else y + f.float()


def _rows(y: torch.Tensor, mask: torch.Tensor | None, b: int) -> torch.Tensor:
    """The valid tokens of sample b: (N, D)."""
    return y[b] if mask is None else y[b][mask[b]]


# ---------------------------------------------------------------- kernel-level API


def moments(
    x: torch.Tensor, f: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per sample, per channel: count [B], mean/m2 [B, D] (fp64), min/max [B, D] (fp32)."""
    y = _y(x, f)  # (B, T, D) fp32
    B, _, D = y.shape
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("count", "mean", "m2", "min", "max")}
    for b in range(B):
        r = _rows(y, mask, b)  # (N, D)
        r64 = r.double()
        mean = r64.mean(0)
        out["count"].append(torch.tensor(float(r.shape[0]), dtype=torch.float64, device=y.device))
        out["mean"].append(mean)
        out["m2"].append(((r64 - mean) ** 2).sum(0))
        out["min"].append(r.amin(0))
        out["max"].append(r.amax(0))
    return {k: torch.stack(v) for k, v in out.items()}


def bucket_bin_index(r: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin index of each value of r (N, D) fp32, per channel, exactly as docs/CONTRACT.md.

    fp32: width = max - min, scale = bins / width, index = trunc((y - min) * scale). Where
    width or scale is not finite in fp32 (a range past 3.4e38, or below bins * 2^-128,
    subnormal ranges included) the channel uses the same formula in fp64 from the fp32
    min, max and y, where neither can overflow.
    """
    mn = r.amin(0)
    mx = r.amax(0)
    width = mx - mn  # fp32
    const = width == 0
    scale = torch.where(
        const,
        torch.zeros_like(width),
        torch.tensor(float(bins), dtype=torch.float32)
        / torch.where(const, torch.ones_like(width), width),
    )
    wide = ~torch.isfinite(width) | ~torch.isfinite(scale)
    u = (r - mn) * torch.where(wide, torch.zeros_like(scale), scale)  # fp32 sub, fp32 mul
    if bool(wide.any()):
        w = wide.nonzero().flatten()
        lo = mn[w].double()
        s64 = float(bins) / (mx[w].double() - lo)
        u = u.double()
        u[:, w] = (r[:, w].double() - lo) * s64  # fp64 sub, fp64 mul
    # truncation; NaN (only without validation) to bin 0, y == max and beyond to the last bin
    u = torch.where(u >= 0, u, torch.zeros_like(u)).clamp_max(bins - 1)
    return u.to(torch.int64)


def _entropy_from_counts(counts: torch.Tensor, n: float, paper_exact: bool) -> torch.Tensor:
    """H over the last axis of integer counts, fp64, 0 ln 0 = 0 (or the paper's clamp)."""
    p = counts.double() / n
    if paper_exact:
        p = p.clamp_min(PAPER_EPS)
        return -(p * p.log()).sum(-1)
    logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
    return -(p * logp).sum(-1)


def bucket(x, f=None, mask=None, bins: int = 20, paper_exact: bool = False) -> torch.Tensor:
    """Per-channel histogram entropy H_d, fp64 [B, D] (sum over d gives the bucket entropy)."""
    y = _y(x, f)
    B, _, D = y.shape
    step = max(1, (1 << 22) // bins)  # channels per chunk: counts stay within 32 MiB
    out = []
    for b in range(B):
        r = _rows(y, mask, b)  # (N, D)
        idx = bucket_bin_index(r, bins)  # (N, D)
        h = []
        for d0 in range(0, D, step):
            part = idx[:, d0 : d0 + step].t()  # (channels, N)
            counts = torch.zeros(part.shape[0], bins, dtype=torch.int64, device=y.device)
            counts.scatter_add_(1, part, torch.ones_like(part))  # (channels, bins)
            h.append(_entropy_from_counts(counts, r.shape[0], paper_exact))
        out.append(torch.cat(h))
    return torch.stack(out)


def bucket_onehot_reference(x: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """A faithful re-implementation of the paper's own one-hot histogram formulation.

    Kept for comparison (and as the benchmark baseline): it materialises an
    ``(N, D, bins)`` one-hot tensor, sums it over tokens and clamps probabilities at 1e-10,
    so it equals ``bucket(..., paper_exact=True)``. ``x``: ``[N, D]``; returns a 0-d fp64.
    """
    y = x.float()
    n = y.shape[0]
    idx = bucket_bin_index(y, bins)  # (N, D)
    onehot = torch.nn.functional.one_hot(idx, bins).float()  # (N, D, bins)
    p = (onehot.sum(0) / n).clamp(min=PAPER_EPS)  # (D, bins)
    return -(p * torch.log(p)).sum().double()


def cosine(
    x: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None = None, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over valid tokens of cos(x_t, Y_t), count), fp64 [B] each. Y = x + other if fused."""
    xf = x.double()
    y = (x.float() + other.float()).double() if fused else other.double()
    dot = (xf * y).sum(-1)  # (B, T)
    norm = (xf.norm(dim=-1) * y.norm(dim=-1)).clamp_min(COS_EPS)
    cos = dot / norm
    if mask is None:
        return cos.sum(-1), torch.full(
            cos.shape[:1], float(cos.shape[1]), dtype=torch.float64, device=x.device
        )
    m = mask.to(torch.float64)
    # where, not a product: a masked-out token may hold NaN (nan_policy="omit" masks them)
    return torch.where(mask, cos, torch.zeros_like(cos)).sum(-1), m.sum(-1)


def knn_kth_distance(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x (N, D) to its k-th nearest other row, fp64 [N].

    Materialises the N x N matrix: the readable ground truth, for small N only. Distances
    come from exact fp64 differences while that is cheap (N^2 D <= 2^26); beyond, from the
    fp64 Gram product of the rows centred on their mean (a large component shared by all
    rows, as LLM activations have, then does not cancel).
    """
    r = x.double()
    N, D = r.shape
    if N * N * D <= 1 << 26:
        d = torch.cdist(r, r, compute_mode="donot_use_mm_for_euclid_dist")  # (N, N)
    else:
        r = r - r.mean(0)
        d = torch.cdist(r, r, compute_mode="use_mm_for_euclid_dist")
    d.fill_diagonal_(float("inf"))
    return d.kthvalue(k, dim=1).values


# ---------------------------------------------------------------- estimators on one sample
# Each takes r: (N, D) valid rows of one sample (fp32), returns a 0-d fp64 tensor.


def bucket_entropy_1(r: torch.Tensor, bins: int = 20, paper_exact: bool = False) -> torch.Tensor:
    return bucket(r[None], None, None, bins, paper_exact)[0].sum()


def gaussian_diag_entropy_1(r: torch.Tensor, var_floor: float = 1e-12) -> torch.Tensor:
    """sum_d 1/2 ln(2 pi e sigma_d^2), population variance, sigma^2 floored at var_floor."""
    var = r.double().var(0, unbiased=False).clamp_min(var_floor)
    return 0.5 * torch.log(2 * math.pi * math.e * var).sum()


def covariance(r: torch.Tensor) -> torch.Tensor:
    """Population covariance (D, D), fp64, centred before the product (no cancellation)."""
    c = r.double() - r.double().mean(0)
    return c.T @ c / r.shape[0]


def gaussian_full_entropy_1(r: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """1/2 logdet(2 pi e Sigma); Sigma + ridge*I. Returns -inf for a singular Sigma (no ridge)."""
    D = r.shape[1]
    cov = covariance(r)
    if ridge:
        cov = cov + ridge * torch.eye(D, dtype=cov.dtype, device=cov.device)
    sign, logabsdet = torch.linalg.slogdet(cov)
    if sign <= 0:
        return torch.tensor(float("-inf"), dtype=torch.float64, device=r.device)
    return 0.5 * (D * math.log(2 * math.pi * math.e) + logabsdet)


def knn_entropy_from_radii(
    radii: torch.Tensor, n: int, d: int, k: int, form: str = "paper"
) -> torch.Tensor:
    """Kozachenko-Leonenko from the k-th neighbour radii (fp64 [N])."""
    log_ball = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)
    if form == "paper":
        tail = math.log(n) - math.log(k)
    elif form == "digamma":
        tail = float(
            torch.special.digamma(torch.tensor(float(n), dtype=torch.float64))
            - torch.special.digamma(torch.tensor(float(k), dtype=torch.float64))
        )
    else:
        raise ValueError(f"knn form must be 'paper' or 'digamma', got {form!r}")
    return d * torch.log(radii + PAPER_EPS).mean() + log_ball + tail


def knn_entropy_from_logsum(
    logsum: torch.Tensor, n: torch.Tensor, d: int, k: int, form: str = "paper"
) -> torch.Tensor:
    """knn_entropy_from_radii for a batch, from each sample's sum of ln(r + 1e-10) and number
    of radii n (fp64 [B] each, on the CPU): fp64 [B].

    A few numbers, computed in Python floats: an elementwise torch op (torch.log) may enter
    torch's OpenMP team, which stalls for a whole time slice when another process holds a core.
    """
    log_ball = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)
    sums, counts = logsum.tolist(), n.tolist()
    if form == "paper":
        tails = [math.log(m) - math.log(k) for m in counts]
    elif form == "digamma":
        psi = torch.special.digamma(torch.tensor([*counts, float(k)], dtype=torch.float64)).tolist()
        tails = [g - psi[-1] for g in psi[:-1]]
    else:
        raise ValueError(f"knn form must be 'paper' or 'digamma', got {form!r}")
    return torch.tensor(
        [d * (s / m) + log_ball + t for s, m, t in zip(sums, counts, tails, strict=True)],
        dtype=torch.float64,
    )


def knn_entropy_1(r: torch.Tensor, k: int = 25, form: str = "paper") -> torch.Tensor:
    return knn_entropy_from_radii(knn_kth_distance(r, k), r.shape[0], r.shape[1], k, form)


def renyi_entropy_1(r: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """Matrix-free Renyi entropy of the paper: z-score channels, Gaussian kernel, median bandwidth.

    Pairs are the N^2 ordered pairs including i == j (as the paper's code, which takes the
    median and mean over the full distance matrix).
    """
    z = r.double()
    std = z.std(0, unbiased=False)
    z = (z - z.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    d = torch.cdist(z, z)  # (N, N)
    sigma = d.flatten().median()
    if sigma <= 0:
        sigma = torch.ones((), dtype=torch.float64, device=r.device)
    k = torch.exp(-(d**2) / (2 * sigma**2)).clamp_min(PAPER_EPS)
    return torch.log((k ** (alpha - 1)).mean()) / (1 - alpha)
