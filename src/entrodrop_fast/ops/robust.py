"""Bucket entropy variants robust to massive activations (opt-in; issue 14).

The paper's bucket estimator bins each channel over the sample's [min, max]. In the late
layers of LLMs a few tokens (the first token of the window, some delimiters) carry
"massive activations": values hundreds of times larger than the rest, which then set
[min, max] of many channels, so nearly every other token falls into one bin and the
entropy says little about the content (see :mod:`entrodrop_fast.profile.massive`). The variants
below change only what the histogram sees; the binning itself is the existing fused
kernel (bit-identical counts across backends, docs/CONTRACT.md), called on a preprocessed
Y = x + f (fp32) or with a mask:

- ``bucket_q`` (:func:`bucket_q_entropy`): per sample and channel the range is
  [order statistic at q, order statistic at 1 - q] of the valid tokens (exact, no
  interpolation: the ``floor(q (N - 1))``-th and ``ceil((1 - q)(N - 1))``-th smallest, 0-based),
  and values outside are clamped into the end bins. q = 0 is the paper's bucket.
- ``bucket_nosink`` (:func:`bucket_nosink_entropy`): the first ``sink`` positions of every
  sample (the attention-sink token, where massive activations sit) are left out through
  the kernels' mask support, for X and Y alike.
- ``bucket_tokennorm`` (:func:`bucket_tokennorm_entropy`): every token is divided by its
  RMS over channels (``sqrt(mean_d y^2)``, floored at 1e-30) before binning, so a
  massive token's scale no longer sets the range.

Inputs, outputs, options and errors are those of
:func:`entrodrop_fast.ops.api.bucket_entropy` (``[N, D]`` -> 0-d, ``[B, T, D]`` -> ``[B]``
float64 nats; fp32/fp16/bf16; strided views; ``mask`` ``[N]`` / ``[B, T]`` bool; NaN/Inf
raise, or are omitted with ``nan_policy="omit"``). The readable torch references are
:func:`reference_bucket_q`, :func:`reference_bucket_nosink`, :func:`reference_bucket_tokennorm`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch

from entrodrop_fast.ops import api, reference

ROBUST_METHODS = ("bucket_q", "bucket_nosink", "bucket_tokennorm")
DEFAULT_Q = 0.01
DEFAULT_SINK = 1
RMS_FLOOR = 1e-30


def _y(p: api._Prepared) -> torch.Tensor:
    """Y = x + f in fp32, (B, T, D), as the kernels add it."""
    y = p.x.float()
    return y if p.f is None else y + p.f.float()


def _bucket(
    p: api._Prepared,
    y: torch.Tensor,
    f: torch.Tensor | None,
    mask: torch.Tensor | None,
    bins: int,
    paper_exact: bool,
) -> api.Result:
    """The paper's bucket entropy of y (+ f) (B, T, D), already checked, on ``p``'s backend,
    returned as the estimator that prepared ``p`` returns its result."""
    h = api.bucket_entropy(
        y, f, bins=bins, paper_exact=paper_exact, mask=mask, backend=p.backend, validate=False
    )
    return api._finish(p, cast(torch.Tensor, h))  # a torch tensor in, a torch tensor out


def _check_q(q: float) -> float:
    q = api._real(q, "q", lo=0.0)
    if not q < 0.5:
        raise ValueError(
            f"q must lie in [0, 0.5) (the range is [quantile q, quantile 1 - q]), got {q}"
        )
    return q


def _ranks(n: int, q: float) -> tuple[int, int]:
    """0-based ranks of the range's ends among n sorted values."""
    return math.floor(q * (n - 1)), math.ceil((1 - q) * (n - 1))


def bucket_q_entropy(
    x: api.Array,
    f: api.Array | None = None,
    *,
    bins: int = 20,
    q: float = DEFAULT_Q,
    paper_exact: bool = False,
    mask: api.Array | None = None,
    backend: str = "auto",
    nan_policy: str = "raise",
    validate: bool = True,
) -> api.Result:
    """Bucket entropy over a per-channel quantile range [Q_q, Q_{1-q}], values beyond clamped.

    ``q`` in [0, 0.5): the fraction of tokens allowed past each end (default 0.01; with 256
    tokens the 2 most extreme on each side). Shapes, dtypes, options, errors: as
    :func:`~entrodrop_fast.ops.api.bucket_entropy`; returns float64 nats.
    """
    q = _check_q(q)
    bins = api._integer(bins, "bins", 1, api.MAX_BINS)
    p = api.prepare(x, f, mask, nan_policy=nan_policy, backend=backend, validate=validate)
    y = _y(p)  # (B, T, D) fp32
    B, T, D = y.shape
    lo = torch.empty(B, 1, D, dtype=torch.float32, device=y.device)
    hi = torch.empty_like(lo)
    if p.mask is None:
        i, j = _ranks(T, q)
        lo[:, 0] = y.kthvalue(i + 1, dim=1).values  # (B, D)
        hi[:, 0] = y.kthvalue(j + 1, dim=1).values
    else:
        for b in range(B):
            r = y[b][p.mask[b]]  # (N, D)
            n = r.shape[0]
            if n == 0:
                # no valid token: the kernel call below raises or returns what it does for that
                lo[b, 0], hi[b, 0] = 0.0, 0.0
                continue
            i, j = _ranks(n, q)
            lo[b, 0] = r.kthvalue(i + 1, dim=0).values
            hi[b, 0] = r.kthvalue(j + 1, dim=0).values
    yc = torch.minimum(torch.maximum(y, lo), hi)  # (B, T, D): the range's ends are data values
    return _bucket(p, yc, None, p.mask, bins, paper_exact)


def sink_mask(
    shape_bt: tuple[int, int], sink: int, mask: torch.Tensor | None, device: torch.device | str
) -> torch.Tensor:
    """(B, T) bool: ``mask`` (all True when None) with the first ``sink`` positions False."""
    B, T = shape_bt
    m = torch.ones(B, T, dtype=torch.bool, device=device) if mask is None else mask.clone()
    m[:, :sink] = False
    return m


def bucket_nosink_entropy(
    x: api.Array,
    f: api.Array | None = None,
    *,
    bins: int = 20,
    sink: int = DEFAULT_SINK,
    paper_exact: bool = False,
    mask: api.Array | None = None,
    backend: str = "auto",
    nan_policy: str = "raise",
    validate: bool = True,
) -> api.Result:
    """Bucket entropy without the first ``sink`` token positions of each sample (default 1:
    the attention sink). Needs at least 2 valid tokens after them. Shapes, dtypes, options,
    errors: as :func:`~entrodrop_fast.ops.api.bucket_entropy`; returns float64 nats."""
    sink = api._integer(sink, "sink", 0)
    p = api.prepare(x, f, mask, nan_policy=nan_policy, backend=backend, validate=validate)
    B, T, _ = p.x.shape
    if sink >= T - 1:
        raise ValueError(f"sink={sink} leaves fewer than 2 of the {T} tokens per sample")
    m = sink_mask((B, T), sink, p.mask, p.x.device)
    if validate:
        api._check_min_tokens(p.x, m, 2)
    return _bucket(p, p.x, p.f, m, bins, paper_exact)


def token_rms_normalise(y: torch.Tensor) -> torch.Tensor:
    """y / max(sqrt(mean over channels of y^2), 1e-30), per token, fp32 (y: (..., D) fp32)."""
    rms = (
        y.double().square().mean(-1, keepdim=True).sqrt().clamp_min(RMS_FLOOR)
    )  # fp64: no overflow of y^2
    return (y.double() / rms).float()


def bucket_tokennorm_entropy(
    x: api.Array,
    f: api.Array | None = None,
    *,
    bins: int = 20,
    paper_exact: bool = False,
    mask: api.Array | None = None,
    backend: str = "auto",
    nan_policy: str = "raise",
    validate: bool = True,
) -> api.Result:
    """Bucket entropy of the tokens divided by their RMS over channels (per-token scale
    removed before binning). Shapes, dtypes, options, errors: as
    :func:`~entrodrop_fast.ops.api.bucket_entropy`; returns float64 nats."""
    bins = api._integer(bins, "bins", 1, api.MAX_BINS)
    p = api.prepare(x, f, mask, nan_policy=nan_policy, backend=backend, validate=validate)
    yn = token_rms_normalise(_y(p))  # (B, T, D) fp32
    return _bucket(p, yn, None, p.mask, bins, paper_exact)


ROBUST_ESTIMATORS: dict[str, Callable[..., api.Result]] = {
    "bucket_q": bucket_q_entropy,
    "bucket_nosink": bucket_nosink_entropy,
    "bucket_tokennorm": bucket_tokennorm_entropy,
}


# ---------------------------------------------------------------- readable references


def _reference_rows(
    x: torch.Tensor, f: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[bool, list[torch.Tensor]]:
    """[(N_b, D) fp32 valid rows of Y per sample], from [N, D] / [B, T, D] inputs."""
    x = torch.as_tensor(x)
    single = x.dim() == 2
    y = x.float() if f is None else x.float() + torch.as_tensor(f).float()
    if single:
        y = y.unsqueeze(0)
        mask = None if mask is None else torch.as_tensor(mask).unsqueeze(0)
    return single, [y[b] if mask is None else y[b][mask[b]] for b in range(y.shape[0])]


def _reference_h(r: torch.Tensor, bins: int, paper_exact: bool) -> float:
    """The paper's bucket entropy of rows r (N, D), from the contract's bin index."""
    idx = reference.bucket_bin_index(r, bins)  # (N, D)
    counts = torch.zeros(r.shape[1], bins, dtype=torch.int64)
    counts.scatter_add_(1, idx.t().contiguous(), torch.ones_like(idx.t().contiguous()))
    return float(reference._entropy_from_counts(counts, r.shape[0], paper_exact).sum())


def _out(single: bool, hs: list[float]) -> torch.Tensor:
    h = torch.tensor(hs, dtype=torch.float64)
    return h[0] if single else h


def reference_bucket_q(
    x, f=None, *, bins: int = 20, q: float = DEFAULT_Q, paper_exact: bool = False, mask=None
):
    """Readable bucket_q: sort each channel, take the order statistics, clamp, bin."""
    single, rows = _reference_rows(x, f, mask)
    hs = []
    for r in rows:
        n = r.shape[0]
        s = r.sort(dim=0).values  # (N, D)
        i, j = _ranks(n, q)
        hs.append(_reference_h(r.clamp(min=s[i], max=s[j]), bins, paper_exact))
    return _out(single, hs)


def reference_bucket_nosink(
    x, f=None, *, bins: int = 20, sink: int = DEFAULT_SINK, paper_exact: bool = False, mask=None
):
    """Readable bucket_nosink: the rows of positions >= sink (and valid), binned."""
    x = torch.as_tensor(x)
    T = x.shape[-2]
    keep = torch.arange(T) >= sink
    if mask is not None:
        keep = torch.as_tensor(mask) & keep
    elif x.dim() == 3:
        keep = keep.expand(x.shape[0], T)
    single, rows = _reference_rows(x, f, keep)
    return _out(single, [_reference_h(r, bins, paper_exact) for r in rows])


def reference_bucket_tokennorm(x, f=None, *, bins: int = 20, paper_exact: bool = False, mask=None):
    """Readable bucket_tokennorm: each row divided by its RMS, binned."""
    single, rows = _reference_rows(x, f, mask)
    hs = []
    for r in rows:
        rms = torch.sqrt((r.double() ** 2).mean(1, keepdim=True)).clamp_min(RMS_FLOOR)
        hs.append(_reference_h((r.double() / rms).float(), bins, paper_exact))
    return _out(single, hs)
