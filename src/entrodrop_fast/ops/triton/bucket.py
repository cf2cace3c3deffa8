"""Per-sample, per-channel histogram ("bucket") entropy of Y = X (+ F), docs/CONTRACT.md.

Three kernels, the data read twice (min/max must be known before any value is binned):
``_minmax_partial_kernel`` writes per-split min/max partials; ``_bucket_hist_kernel``
reduces those partials for its channels, bins every valid value with the contract's exact
fp32 formula (IEEE division for the scale, then a separate sub and mul, truncation; in fp64
for a channel whose fp32 width or scale is not finite) and
adds to per-(sample, channel) int32 counters with relaxed atomics (each program's
channels are its own columns, so lanes of a warp never collide on one counter);
``_bucket_entropy_kernel`` turns the counts into H_d in fp64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrodrop_fast.ops.triton._common import cdiv, f_arg, mask_arg, next_pow2, token_splits


@triton.jit
def _minmax_partial_kernel(
    x_ptr, f_ptr, m_ptr, pmin_ptr, pmax_ptr,  # pmin/pmax: [B, S, D] fp32
    T, D, S, rows_per_split,
    sxb, sxt, sxd, sfb, sft, sfd, smb, smt,
    HAS_F: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    t_begin = pid_s * rows_per_split
    t_end = tl.minimum(t_begin + rows_per_split, T)
    mn = tl.full([BLOCK_T, BLOCK_D], float("inf"), dtype=tl.float32)
    mx = tl.full([BLOCK_T, BLOCK_D], float("-inf"), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tmask = offs_t < t_end
        offs_t64 = offs_t.to(tl.int64)
        if HAS_MASK:
            keep = tl.load(m_ptr + b * smb + offs_t64 * smt, mask=tmask, other=0)
            tmask = tmask & (keep != 0)
        valid = tmask[:, None] & dmask[None, :]
        y = tl.load(x_ptr + b * sxb + offs_t64[:, None] * sxt + offs_d64[None, :] * sxd, mask=valid, other=0.0).to(tl.float32)
        if HAS_F:
            y = y + tl.load(f_ptr + b * sfb + offs_t64[:, None] * sft + offs_d64[None, :] * sfd, mask=valid, other=0.0).to(tl.float32)
        mn = tl.minimum(mn, tl.where(valid, y, float("inf")))
        mx = tl.maximum(mx, tl.where(valid, y, float("-inf")))
    out = (b * S + pid_s) * D + offs_d64
    tl.store(pmin_ptr + out, tl.min(mn, axis=0), mask=dmask)
    tl.store(pmax_ptr + out, tl.max(mx, axis=0), mask=dmask)


@triton.jit
def _bucket_hist_kernel(
    x_ptr, f_ptr, m_ptr, pmin_ptr, pmax_ptr, hist_ptr,  # hist: [B, D, bins] int32, zeroed
    T, D, S, rows_per_split, bins,
    sxb, sxt, sxd, sfb, sft, sfd, smb, smt,
    HAS_F: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_d64 = offs_d.to(tl.int64)

    # min/max of the whole sample, from the partials of every split
    offs_s = tl.arange(0, BLOCK_S)
    pidx = (b * S + offs_s.to(tl.int64))[:, None] * D + offs_d64[None, :]
    pm = (offs_s < S)[:, None] & dmask[None, :]
    lo = tl.min(tl.load(pmin_ptr + pidx, mask=pm, other=float("inf")), axis=0)
    hi = tl.max(tl.load(pmax_ptr + pidx, mask=pm, other=float("-inf")), axis=0)
    width = tl.where(dmask, hi - lo, 1.0)
    const = width == 0.0
    fbins = tl.zeros([BLOCK_D], dtype=tl.float32) + bins
    scale = tl.where(const, 0.0, tl.math.div_rn(fbins, tl.where(const, 1.0, width)))
    # "wide" channels: fp32 width or scale not finite (ranges past 3.4e38, or below
    # bins * 2^-128): the same formula in fp64, as the reference (|v| < inf is False for NaN)
    wide = dmask & ~((tl.abs(width) < float("inf")) & (tl.abs(scale) < float("inf")))
    any_wide = tl.max(wide.to(tl.int32), axis=0)
    scale = tl.where(wide, 0.0, scale)
    lo = tl.where(dmask, lo, 0.0)
    lo64 = lo.to(tl.float64)
    span64 = tl.where(wide, hi.to(tl.float64) - lo64, 1.0)
    scale64 = (tl.zeros([BLOCK_D], dtype=tl.float64) + bins) / span64  # fp64 "/" is div.rn.f64

    t_begin = pid_s * rows_per_split
    t_end = tl.minimum(t_begin + rows_per_split, T)
    hrow = (b * D + offs_d64) * bins  # (BLOCK_D,) start of each channel's counters
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tmask = offs_t < t_end
        offs_t64 = offs_t.to(tl.int64)
        if HAS_MASK:
            keep = tl.load(m_ptr + b * smb + offs_t64 * smt, mask=tmask, other=0)
            tmask = tmask & (keep != 0)
        valid = tmask[:, None] & dmask[None, :]
        y = tl.load(x_ptr + b * sxb + offs_t64[:, None] * sxt + offs_d64[None, :] * sxd, mask=valid, other=0.0).to(tl.float32)
        if HAS_F:
            y = y + tl.load(f_ptr + b * sfb + offs_t64[:, None] * sft + offs_d64[None, :] * sfd, mask=valid, other=0.0).to(tl.float32)
        shifted = y - lo[None, :]  # fp32 sub ...
        scaled = shifted * scale[None, :]  # ... then a separate fp32 mul
        idx = tl.minimum(scaled.to(tl.int32), bins - 1)  # truncation; y == max -> last bin
        idx = tl.maximum(idx, 0)
        if any_wide > 0:  # rare
            u = (y.to(tl.float64) - lo64[None, :]) * scale64[None, :]  # fp64 sub, then mul
            iw = tl.where(u >= 0.0, tl.minimum(u, bins - 1.0), 0.0).to(tl.int32)  # NaN -> 0
            idx = tl.where(wide[None, :], iw, idx)
        tl.atomic_add(hist_ptr + hrow[None, :] + idx, 1, mask=valid, sem="relaxed")


@triton.jit
def _bucket_entropy_kernel(
    hist_ptr, out_ptr,  # hist: [B, D, bins] int32; out: [B, D] fp64
    D, bins,
    PAPER_EXACT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_BINS: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_j = tl.arange(0, BLOCK_BINS)
    jmask = offs_j < bins
    m = dmask[:, None] & jmask[None, :]
    c = tl.load(hist_ptr + (b * D + offs_d.to(tl.int64))[:, None] * bins + offs_j[None, :], mask=m, other=0).to(tl.float64)
    n = tl.sum(c, axis=1)  # (BLOCK_D,) = N, the valid tokens of the sample
    p = c / tl.where(n > 0, n, 1.0)[:, None]
    if PAPER_EXACT:
        p = tl.maximum(p, 1e-10)
    plogp = tl.where(m & (p > 0), p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)
    tl.store(out_ptr + b * D + offs_d, -tl.sum(plogp, axis=1), mask=dmask)


# ---------------------------------------------------------------- launchers


def bucket_counts(x, f=None, mask=None, bins: int = 20, *, block_t: int = 32, block_d: int = 128, splits: int | None = None, num_warps: int = 4, minmax_block_t: int | None = None):
    """Per-(sample, channel) bin counts, int32 [B, D, bins]."""
    B, T, D = x.shape
    dev = x.device
    block_d = min(block_d, next_pow2(D))
    nd = cdiv(D, block_d)
    fp, (sfb, sft, sfd) = f_arg(x, f)
    mp, smb, smt = mask_arg(x, mask)
    strides = (x.stride(0), x.stride(1), x.stride(2), sfb, sft, sfd, smb, smt)
    flags = dict(HAS_F=f is not None, HAS_MASK=mask is not None)

    mbt = minmax_block_t or block_t
    S, rows = token_splits(B, T, nd, mbt, dev, splits)
    pmin = torch.empty((B, S, D), dtype=torch.float32, device=dev)
    pmax = torch.empty((B, S, D), dtype=torch.float32, device=dev)
    _minmax_partial_kernel[(nd, S, B)](
        x, fp, mp, pmin, pmax, T, D, S, rows, *strides, **flags,
        BLOCK_T=mbt, BLOCK_D=block_d, num_warps=num_warps,
    )

    S2, rows2 = token_splits(B, T, nd, block_t, dev, splits)
    hist = torch.zeros((B, D, bins), dtype=torch.int32, device=dev)
    _bucket_hist_kernel[(nd, S2, B)](
        x, fp, mp, pmin, pmax, hist, T, D, S, rows2, bins, *strides, **flags,
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_S=next_pow2(S), num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return hist


def entropy_from_counts(hist: torch.Tensor, paper_exact: bool = False) -> torch.Tensor:
    """H_d in nats, fp64 [B, D], from int32 counts [B, D, bins]."""
    B, D, bins = hist.shape
    out = torch.empty((B, D), dtype=torch.float64, device=hist.device)
    block_bins = next_pow2(bins)
    block_d = max(1, min(next_pow2(D), 4096 // block_bins))
    _bucket_entropy_kernel[(cdiv(D, block_d), B)](
        hist, out, D, bins, PAPER_EXACT=bool(paper_exact), BLOCK_D=block_d, BLOCK_BINS=block_bins, num_warps=4,
    )
    return out


def bucket(x, f=None, mask=None, bins: int = 20, paper_exact: bool = False, **config) -> torch.Tensor:
    """Per-channel histogram entropy H_d, fp64 [B, D], of Y = x (+ f) over valid tokens.

    x, f: [B, T, D] fp32/fp16/bf16, any strides; mask: [B, T] bool or None.
    """
    return entropy_from_counts(bucket_counts(x, f, mask, bins, **config), paper_exact)
