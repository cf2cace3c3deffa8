"""Device helpers of the bucket kernels: the contract's bin index (docs/CONTRACT.md,
"bucket, exactly") and the entropy of counts."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bin_params(lo, hi, dmask, bins):
    """Per channel: (lo, sc, wide, any wide) from min/max. sc is the fp32 scale, or for a
    "wide" channel (fp32 width or scale not finite: ranges past 3.4e38, or below
    bins * 2^-128; a NaN/Inf min or max) the max, from which :func:`_bin_index` takes the
    same formula in fp64, as the reference (|v| < inf is False for NaN). No fp64 value
    stays live across the binning loops (registers)."""
    width = tl.where(dmask, hi - lo, 1.0)
    const = width == 0.0
    fbins = tl.zeros_like(lo) + bins
    scale = tl.where(const, 0.0, tl.math.div_rn(fbins, tl.where(const, 1.0, width)))
    wide = dmask & ~((tl.abs(width) < float("inf")) & (tl.abs(scale) < float("inf")))
    any_wide = tl.max(wide.to(tl.int32), axis=0)
    sc = tl.where(wide, hi, scale)
    lo = tl.where(dmask, lo, 0.0)
    return lo, sc, wide, any_wide


@triton.jit
def _bin_index(y, lo, sc, wide, any_wide, bins, WIDE: tl.constexpr = True):
    """Bin of every y of a [BLOCK_T, BLOCK_D] tile, int32 in [0, bins) whatever y is.
    WIDE=False leaves out the fp64 path (the caller has no wide channel but NaN/Inf ones,
    whose counts do not matter: their indices are still clamped)."""
    shifted = y - lo[None, :]  # fp32 sub ...
    scaled = shifted * sc[None, :]  # ... then a separate fp32 mul (wide channels: replaced below)
    idx = tl.minimum(scaled.to(tl.int32), bins - 1)  # truncation; y == max -> last bin
    idx = tl.maximum(idx, 0)  # (a NaN converts to 0 on GPUs; clamped either way)
    if WIDE and any_wide > 0:  # rare
        lo64 = lo.to(tl.float64)
        scale64 = (tl.zeros_like(lo64) + bins) / tl.where(
            wide, sc.to(tl.float64) - lo64, 1.0
        )  # fp64 "/" is div.rn.f64
        u = (y.to(tl.float64) - lo64[None, :]) * scale64[None, :]  # fp64 sub, then mul
        iw = tl.where(u >= 0.0, tl.minimum(u, bins - 1.0), 0.0).to(tl.int32)  # NaN -> 0
        idx = tl.where(wide[None, :], iw, idx)
    return idx


@triton.jit
def _entropy_rows(c, m, PAPER_EXACT: tl.constexpr):
    """H in nats, fp64 [rows], of int counts c [rows, BLOCK_BINS] (m: the real bins)."""
    c = c.to(tl.float64)
    n = tl.sum(c, axis=1)  # = N, the valid tokens of the sample
    p = c / tl.where(n > 0, n, 1.0)[:, None]
    if PAPER_EXACT:
        p = tl.maximum(p, 1e-10)
    plogp = tl.where(m & (p > 0), p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)
    return -tl.sum(plogp, axis=1)
