"""Per-sample, per-channel histogram ("bucket") entropy of Y = X (+ F), docs/CONTRACT.md.

Two paths, the same bins (the contract's exact fp32 formula: IEEE division for the scale,
then a separate sub and mul, truncation; in fp64 for a channel whose fp32 width or scale
is not finite), the same counts bit for bit:

* ``_bucket_fused_kernel`` (batched samples, bins <= 32): one program per (sample, block of
  BLOCK_D channels) owns all of the sample's tokens for its channels, so it needs no
  partials and no atomics. Pass 1 reads the tile for min/max; pass 2 re-reads it (the
  program's own tile, just read: L2-resident, T x BLOCK_D x 2 bytes = 32 KiB at T = 256
  bf16) and counts in registers: 8-bit counters packed four to an int32 word, one word per
  four bins, kept per tile slot ([BLOCK_T, BLOCK_D] elementwise: no cross-thread traffic in
  the loop), unpacked every 255 tiles; then H_d in fp64, written directly ([B, D], no
  counts array in memory).
* the split path (few samples of many tokens, or more bins): ``_minmax_partial_kernel``
  writes per-split min/max partials; ``_bucket_hist_kernel`` bins each split and adds to
  int32 counters [B, D, bins] with relaxed atomics; ``_bucket_entropy_kernel`` turns the
  counts into H_d.

Both report NaN/Inf in Y among the valid tokens in the pass that reads them (a running
``y * 0`` sum per slot, NaN exactly when a valid y is not finite): H_d = NaN for such a
(sample, channel). ``PAIR=True`` also gives the statistics of X itself from the same read
of X and F (for ``delta_entropy``): each output bit for bit what the single op gives.
A NaN or Inf never moves a bin index out of [0, bins): indices are clamped (a NaN lands in
bin 0, +-Inf at an end).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrodrop_fast.ops.triton._common import (
    cdiv,
    f_arg,
    mask_arg,
    next_pow2,
    num_sms,
    token_splits,
)
from entrodrop_fast.ops.triton._tiles import load_raw, widen

FUSED_MAX_BINS = 32  # eight packed words of four 8-bit counters


# ---------------------------------------------------------------- shared device helpers


@triton.jit
def _load_tile(x_ptr, f_ptr, m_ptr, b, offs_t, tmask, offs_d64, dmask, sxb, sxt, sxd, sfb, sft, sfd, smb, smt,
               HAS_F: tl.constexpr, HAS_MASK: tl.constexpr):
    """(x, y, valid) for one tile: x in fp32, y = x + f added in fp32 (= x without f),
    0 where not valid (masked-out tokens are not read)."""
    offs_t64 = offs_t.to(tl.int64)
    if HAS_MASK:
        keep = tl.load(m_ptr + b * smb + offs_t64 * smt, mask=tmask, other=0)
        tmask = tmask & (keep != 0)
    valid = tmask[:, None] & dmask[None, :]
    xv = tl.load(x_ptr + b * sxb + offs_t64[:, None] * sxt + offs_d64[None, :] * sxd, mask=valid, other=0.0).to(tl.float32)
    y = xv
    if HAS_F:
        y = xv + tl.load(f_ptr + b * sfb + offs_t64[:, None] * sft + offs_d64[None, :] * sfd, mask=valid, other=0.0).to(tl.float32)
    return xv, y, valid


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
        scale64 = (tl.zeros_like(lo64) + bins) / tl.where(wide, sc.to(tl.float64) - lo64, 1.0)  # fp64 "/" is div.rn.f64
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


@triton.jit
def _count(a0, a1, a2, a3, a4, a5, a6, a7, idx, valid, NW: tl.constexpr):
    """Add one valid value per tile slot to the packed counters: bin j is the 8-bit field
    j % 4 of word j // 4 (words past NW are constant zeros, removed by the compiler)."""
    wid = idx >> 2
    one = tl.where(valid, 1 << ((idx & 3) * 8), 0)
    a0 += tl.where(wid == 0, one, 0)
    if NW > 1:
        a1 += tl.where(wid == 1, one, 0)
    if NW > 2:
        a2 += tl.where(wid == 2, one, 0)
    if NW > 3:
        a3 += tl.where(wid == 3, one, 0)
    if NW > 4:
        a4 += tl.where(wid == 4, one, 0)
    if NW > 5:
        a5 += tl.where(wid == 5, one, 0)
    if NW > 6:
        a6 += tl.where(wid == 6, one, 0)
    if NW > 7:
        a7 += tl.where(wid == 7, one, 0)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _unpack(cnt, a, W: tl.constexpr, jj):
    """cnt [BLOCK_D, BLOCK_BINS] += the four bins of packed word W summed over the slots.
    Fields 0/2 and 1/3 are summed as 16-bit fields (<= 255 x BLOCK_T <= 65535)."""
    even = tl.sum(a & 0x00FF00FF, axis=0)
    odd = tl.sum((a >> 8) & 0x00FF00FF, axis=0)
    cnt += tl.where(jj == 4 * W, (even & 0xFFFF)[:, None], 0)
    cnt += tl.where(jj == 4 * W + 1, (odd & 0xFFFF)[:, None], 0)
    cnt += tl.where(jj == 4 * W + 2, ((even >> 16) & 0xFFFF)[:, None], 0)
    cnt += tl.where(jj == 4 * W + 3, ((odd >> 16) & 0xFFFF)[:, None], 0)
    return cnt


@triton.jit
def _unpack_all(cnt, a0, a1, a2, a3, a4, a5, a6, a7, jj, NW: tl.constexpr):
    cnt = _unpack(cnt, a0, 0, jj)
    if NW > 1:
        cnt = _unpack(cnt, a1, 1, jj)
    if NW > 2:
        cnt = _unpack(cnt, a2, 2, jj)
    if NW > 3:
        cnt = _unpack(cnt, a3, 3, jj)
    if NW > 4:
        cnt = _unpack(cnt, a4, 4, jj)
    if NW > 5:
        cnt = _unpack(cnt, a5, 5, jj)
    if NW > 6:
        cnt = _unpack(cnt, a6, 6, jj)
    if NW > 7:
        cnt = _unpack(cnt, a7, 7, jj)
    return cnt


# ---------------------------------------------------------------- fused path


@triton.jit
def _bucket_fused_kernel(
    x_ptr, f_ptr, m_ptr, hy_ptr, hx_ptr,  # hy (Y), hx (x itself, PAIR): [B, D] fp64
    wide_ptr,  # [B, programs along D] int32, zeroed: blocks left to the WIDE launch
    T, D, bins,
    sxb, sxt, sxd, sfb, sft, sfd, smb, smt,
    HAS_F: tl.constexpr, HAS_MASK: tl.constexpr, PAIR: tl.constexpr, PAPER_EXACT: tl.constexpr,
    NW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_BINS: tl.constexpr,
    WIDE: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    rows = tl.arange(0, BLOCK_T)
    # Two launches of this kernel: WIDE=False does every block without a "wide" finite
    # channel and flags the others; WIDE=True (its fp64 path costs ~60 registers, which would
    # halve the occupancy of the common case) redoes only the flagged blocks.
    flag = wide_ptr + b * tl.num_programs(0) + pid_d
    T1 = T
    if WIDE:
        T1 = tl.where(tl.load(flag) != 0, T, 0)

    # pass 1: min, max and the non-finite report (z = sum of y * 0: 0, or NaN)
    mn = tl.full([BLOCK_T, BLOCK_D], float("inf"), dtype=tl.float32)
    mx = tl.full([BLOCK_T, BLOCK_D], float("-inf"), dtype=tl.float32)
    z = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    mnx = tl.full([BLOCK_T, BLOCK_D], float("inf"), dtype=tl.float32)
    mxx = tl.full([BLOCK_T, BLOCK_D], float("-inf"), dtype=tl.float32)
    zx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    # (from HBM: two tiles ahead in flight, see _tiles.py)
    xr, fr, tmask = load_raw(x_ptr, f_ptr, m_ptr, b, rows, rows < T1, offs_d64, dmask,
                             sxb, sxt, sxd, sfb, sft, sfd, smb, smt, HAS_F, HAS_MASK)
    xr_n, fr_n, tmask_n = load_raw(x_ptr, f_ptr, m_ptr, b, BLOCK_T + rows, BLOCK_T + rows < T1, offs_d64, dmask,
                                   sxb, sxt, sxd, sfb, sft, sfd, smb, smt, HAS_F, HAS_MASK)
    for t0 in range(0, T1, BLOCK_T):
        nxt = t0 + 2 * BLOCK_T + rows
        xr_nn, fr_nn, tmask_nn = load_raw(x_ptr, f_ptr, m_ptr, b, nxt, nxt < T1, offs_d64, dmask,
                                          sxb, sxt, sxd, sfb, sft, sfd, smb, smt, HAS_F, HAS_MASK)
        xv, y, valid = widen(xr, fr, tmask, dmask, HAS_F)
        xr, fr, tmask = xr_n, fr_n, tmask_n
        xr_n, fr_n, tmask_n = xr_nn, fr_nn, tmask_nn
        mn = tl.minimum(mn, tl.where(valid, y, float("inf")))
        mx = tl.maximum(mx, tl.where(valid, y, float("-inf")))
        z += y * 0.0
        if PAIR:
            mnx = tl.minimum(mnx, tl.where(valid, xv, float("inf")))
            mxx = tl.maximum(mxx, tl.where(valid, xv, float("-inf")))
            zx += xv * 0.0
    bad = tl.sum(z, axis=0) != 0.0  # (BLOCK_D,): NaN != 0
    lo, sc, wide, any_wide = _bin_params(tl.min(mn, axis=0), tl.max(mx, axis=0), dmask, bins)
    badx = bad
    lox, scx, widex, any_widex = lo, sc, wide, any_wide
    if PAIR:
        badx = tl.sum(zx, axis=0) != 0.0
        lox, scx, widex, any_widex = _bin_params(tl.min(mnx, axis=0), tl.max(mxx, axis=0), dmask, bins)
    # wide channels that are finite (NaN/Inf ones are reported, their counts do not matter)
    real_wide = tl.max(((wide & ~bad) | (widex & ~badx)).to(tl.int32), axis=0) > 0
    T2 = T1
    if not WIDE:
        T2 = tl.where(real_wide, 0, T)
        tl.store(flag, real_wide.to(tl.int32))
    done = dmask & ((tl.zeros_like(offs_d) + T2) > 0)  # this launch writes the block's outputs

    # pass 2: counts, in registers
    jj = tl.arange(0, BLOCK_BINS)[None, :]
    cnt = tl.zeros([BLOCK_D, BLOCK_BINS], dtype=tl.int32)
    cntx = tl.zeros([BLOCK_D, BLOCK_BINS], dtype=tl.int32)
    for c0 in range(0, T2, BLOCK_T * 255):
        a0 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
        a1 = tl.zeros_like(a0)
        a2 = tl.zeros_like(a0)
        a3 = tl.zeros_like(a0)
        a4 = tl.zeros_like(a0)
        a5 = tl.zeros_like(a0)
        a6 = tl.zeros_like(a0)
        a7 = tl.zeros_like(a0)
        e0 = tl.zeros_like(a0)
        e1 = tl.zeros_like(a0)
        e2 = tl.zeros_like(a0)
        e3 = tl.zeros_like(a0)
        e4 = tl.zeros_like(a0)
        e5 = tl.zeros_like(a0)
        e6 = tl.zeros_like(a0)
        e7 = tl.zeros_like(a0)
        c_end = tl.minimum(c0 + BLOCK_T * 255, T2)
        xr, fr, tmask = load_raw(x_ptr, f_ptr, m_ptr, b, c0 + rows, c0 + rows < c_end, offs_d64, dmask,
                                 sxb, sxt, sxd, sfb, sft, sfd, smb, smt, HAS_F, HAS_MASK)
        for t0 in range(c0, c_end, BLOCK_T):
            nxt = t0 + BLOCK_T + rows
            xr_n, fr_n, tmask_n = load_raw(x_ptr, f_ptr, m_ptr, b, nxt, nxt < c_end, offs_d64, dmask,
                                           sxb, sxt, sxd, sfb, sft, sfd, smb, smt, HAS_F, HAS_MASK)
            xv, y, valid = widen(xr, fr, tmask, dmask, HAS_F)  # (from L2, just read: one tile ahead)
            xr, fr, tmask = xr_n, fr_n, tmask_n
            idx = _bin_index(y, lo, sc, wide, any_wide, bins, WIDE)
            a0, a1, a2, a3, a4, a5, a6, a7 = _count(a0, a1, a2, a3, a4, a5, a6, a7, idx, valid, NW)
            if PAIR:
                idx = _bin_index(xv, lox, scx, widex, any_widex, bins, WIDE)
                e0, e1, e2, e3, e4, e5, e6, e7 = _count(e0, e1, e2, e3, e4, e5, e6, e7, idx, valid, NW)
        cnt = _unpack_all(cnt, a0, a1, a2, a3, a4, a5, a6, a7, jj, NW)
        if PAIR:
            cntx = _unpack_all(cntx, e0, e1, e2, e3, e4, e5, e6, e7, jj, NW)

    m = dmask[:, None] & (jj < bins)
    h = _entropy_rows(cnt, m, PAPER_EXACT)
    tl.store(hy_ptr + b * D + offs_d64, tl.where(bad, float("nan"), h), mask=done)
    if PAIR:
        hx = _entropy_rows(cntx, m, PAPER_EXACT)
        tl.store(hx_ptr + b * D + offs_d64, tl.where(badx, float("nan"), hx), mask=done)


# ---------------------------------------------------------------- split path


@triton.jit
def _minmax_partial_kernel(
    x_ptr, f_ptr, m_ptr, pmin_ptr, pmax_ptr,  # pmin/pmax: [1 + PAIR, B, S, D] fp32, NaN where non-finite
    B, T, D, S, rows_per_split,
    sxb, sxt, sxd, sfb, sft, sfd, smb, smt,
    HAS_F: tl.constexpr, HAS_MASK: tl.constexpr, PAIR: tl.constexpr,
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
    z = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    mnx = tl.full([BLOCK_T, BLOCK_D], float("inf"), dtype=tl.float32)
    mxx = tl.full([BLOCK_T, BLOCK_D], float("-inf"), dtype=tl.float32)
    zx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        xv, y, valid = _load_tile(x_ptr, f_ptr, m_ptr, b, offs_t, offs_t < t_end, offs_d64, dmask,
                                  sxb, sxt, sxd, sfb, sft, sfd, smb, smt, HAS_F, HAS_MASK)
        mn = tl.minimum(mn, tl.where(valid, y, float("inf")))
        mx = tl.maximum(mx, tl.where(valid, y, float("-inf")))
        z += y * 0.0
        if PAIR:
            mnx = tl.minimum(mnx, tl.where(valid, xv, float("inf")))
            mxx = tl.maximum(mxx, tl.where(valid, xv, float("-inf")))
            zx += xv * 0.0
    out = (b * S + pid_s) * D + offs_d64
    bad = tl.sum(z, axis=0) != 0.0
    tl.store(pmin_ptr + out, tl.where(bad, float("nan"), tl.min(mn, axis=0)), mask=dmask)
    tl.store(pmax_ptr + out, tl.where(bad, float("nan"), tl.max(mx, axis=0)), mask=dmask)
    if PAIR:
        out += B * S * D
        bad = tl.sum(zx, axis=0) != 0.0
        tl.store(pmin_ptr + out, tl.where(bad, float("nan"), tl.min(mnx, axis=0)), mask=dmask)
        tl.store(pmax_ptr + out, tl.where(bad, float("nan"), tl.max(mxx, axis=0)), mask=dmask)


@triton.jit
def _sample_range(pmin_ptr, pmax_ptr, b, S, D, offs_d64, dmask, BLOCK_S: tl.constexpr):
    """(min, max) of the whole sample from the partials of every split (NaN partials, of
    a channel holding NaN/Inf, are skipped here: the entropy kernel reports them)."""
    offs_s = tl.arange(0, BLOCK_S)
    pidx = (b * S + offs_s.to(tl.int64))[:, None] * D + offs_d64[None, :]
    pm = (offs_s < S)[:, None] & dmask[None, :]
    lo = tl.min(tl.load(pmin_ptr + pidx, mask=pm, other=float("inf")), axis=0)
    hi = tl.max(tl.load(pmax_ptr + pidx, mask=pm, other=float("-inf")), axis=0)
    return lo, hi


@triton.jit
def _bucket_hist_kernel(
    x_ptr, f_ptr, m_ptr, pmin_ptr, pmax_ptr, hist_ptr,  # hist: [1 + PAIR, B, D, bins] int32, zeroed
    B, T, D, S, rows_per_split, bins,
    sxb, sxt, sxd, sfb, sft, sfd, smb, smt,
    HAS_F: tl.constexpr, HAS_MASK: tl.constexpr, PAIR: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_d64 = offs_d.to(tl.int64)

    lo, hi = _sample_range(pmin_ptr, pmax_ptr, b, S, D, offs_d64, dmask, BLOCK_S)
    lo, sc, wide, any_wide = _bin_params(lo, hi, dmask, bins)
    lox, scx, widex, any_widex = lo, sc, wide, any_wide
    if PAIR:
        lox, hix = _sample_range(pmin_ptr + B * S * D, pmax_ptr + B * S * D, b, S, D, offs_d64, dmask, BLOCK_S)
        lox, scx, widex, any_widex = _bin_params(lox, hix, dmask, bins)

    t_begin = pid_s * rows_per_split
    t_end = tl.minimum(t_begin + rows_per_split, T)
    hrow = (b * D + offs_d64) * bins  # (BLOCK_D,) start of each channel's counters
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        xv, y, valid = _load_tile(x_ptr, f_ptr, m_ptr, b, offs_t, offs_t < t_end, offs_d64, dmask,
                                  sxb, sxt, sxd, sfb, sft, sfd, smb, smt, HAS_F, HAS_MASK)
        idx = _bin_index(y, lo, sc, wide, any_wide, bins)
        tl.atomic_add(hist_ptr + hrow[None, :] + idx, 1, mask=valid, sem="relaxed")
        if PAIR:
            idx = _bin_index(xv, lox, scx, widex, any_widex, bins)
            tl.atomic_add(hist_ptr + B * D * bins + hrow[None, :] + idx, 1, mask=valid, sem="relaxed")


@triton.jit
def _bucket_entropy_kernel(
    hist_ptr, pmin_ptr, out_ptr,  # hist: [B, D, bins] int32; pmin: [B, S, D] fp32 (NaN: report); out: [B, D] fp64
    D, S, bins,
    PAPER_EXACT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    offs_j = tl.arange(0, BLOCK_BINS)
    m = dmask[:, None] & (offs_j < bins)[None, :]
    c = tl.load(hist_ptr + (b * D + offs_d64)[:, None] * bins + offs_j[None, :], mask=m, other=0)
    h = _entropy_rows(c, m, PAPER_EXACT)
    offs_s = tl.arange(0, BLOCK_S)
    pm = (offs_s < S)[None, :] & dmask[:, None]
    pmin = tl.load(pmin_ptr + (b * S + offs_s.to(tl.int64))[None, :] * D + offs_d64[:, None], mask=pm, other=0.0)
    bad = tl.max((pmin != pmin).to(tl.int32), axis=1) > 0
    tl.store(out_ptr + b * D + offs_d64, tl.where(bad, float("nan"), h), mask=dmask)


# ---------------------------------------------------------------- launchers


def _use_fused(B: int, T: int, D: int, bins: int, block_d: int, device: torch.device) -> bool:
    """The fused kernel when it has bins it can pack and either programs enough to fill the
    GPU (one per sample and channel block) or short samples (a program's two passes over
    <= 1024 tokens are short even when few programs run: [1, 256, 4096], [8, 256, 576]);
    else the split path (one long sample, many bins)."""
    return bins <= FUSED_MAX_BINS and (B * cdiv(D, block_d) >= num_sms(device) or T <= 1024)


def _fused(x, f, mask, bins, paper_exact, pair, *, block_t, block_d, num_warps):
    B, T, D = x.shape
    assert bins <= FUSED_MAX_BINS and block_t <= 256
    block_d = min(block_d, next_pow2(D))
    fp, (sfb, sft, sfd) = f_arg(x, f)
    mp, smb, smt = mask_arg(x, mask)
    hy = torch.empty((B, D), dtype=torch.float64, device=x.device)
    hx = torch.empty((B, D), dtype=torch.float64, device=x.device) if pair else hy
    nd = cdiv(D, block_d)
    wide = torch.zeros((B, nd), dtype=torch.int32, device=x.device)
    for w in (False, True):  # the second launch redoes the blocks the first flagged (rare)
        _bucket_fused_kernel[(nd, B)](
            x, fp, mp, hy, hx, wide, T, D, bins,
            x.stride(0), x.stride(1), x.stride(2), sfb, sft, sfd, smb, smt,
            HAS_F=f is not None, HAS_MASK=mask is not None, PAIR=pair, PAPER_EXACT=bool(paper_exact),
            NW=cdiv(bins, 4), BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_BINS=max(4, next_pow2(bins)), WIDE=w,
            num_warps=num_warps, enable_fp_fusion=False,
        )
    return (hy, hx) if pair else hy


def _split_counts(x, f=None, mask=None, bins: int = 20, pair: bool = False, *, block_t: int = 32, block_d: int = 128,
                  splits: int | None = None, num_warps: int = 4, minmax_block_t: int | None = None):
    """(int32 counts [1 + pair, B, D, bins], min partials [1 + pair, B, S, D], NaN where a
    split of a channel holds a non-finite value)."""
    B, T, D = x.shape
    dev = x.device
    block_d = min(block_d, next_pow2(D))
    nd = cdiv(D, block_d)
    fp, (sfb, sft, sfd) = f_arg(x, f)
    mp, smb, smt = mask_arg(x, mask)
    strides = (x.stride(0), x.stride(1), x.stride(2), sfb, sft, sfd, smb, smt)
    flags = dict(HAS_F=f is not None, HAS_MASK=mask is not None, PAIR=pair)
    sets = 2 if pair else 1

    mbt = minmax_block_t or block_t
    S, rows = token_splits(B, T, nd, mbt, dev, splits)
    pmin = torch.empty((sets, B, S, D), dtype=torch.float32, device=dev)
    pmax = torch.empty((sets, B, S, D), dtype=torch.float32, device=dev)
    _minmax_partial_kernel[(nd, S, B)](
        x, fp, mp, pmin, pmax, B, T, D, S, rows, *strides, **flags,
        BLOCK_T=mbt, BLOCK_D=block_d, num_warps=num_warps,
    )

    S2, rows2 = token_splits(B, T, nd, block_t, dev, splits)
    hist = torch.zeros((sets, B, D, bins), dtype=torch.int32, device=dev)
    _bucket_hist_kernel[(nd, S2, B)](
        x, fp, mp, pmin, pmax, hist, B, T, D, S, rows2, bins, *strides, **flags,
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_S=next_pow2(S), num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return hist, pmin


def bucket_counts(x, f=None, mask=None, bins: int = 20, **config) -> torch.Tensor:
    """Per-(sample, channel) bin counts of the split path, int32 [B, D, bins] (for tests)."""
    return _split_counts(x, f, mask, bins, **config)[0][0]


def entropy_from_counts(hist: torch.Tensor, paper_exact: bool = False, pmin: torch.Tensor | None = None) -> torch.Tensor:
    """H_d in nats, fp64 [B, D], from int32 counts [B, D, bins]; NaN where the min partials
    pmin [B, S, D] hold a NaN (a channel with a non-finite value)."""
    B, D, bins = hist.shape
    if pmin is None:
        pmin = torch.zeros((B, 1, D), dtype=torch.float32, device=hist.device)
    S = pmin.shape[1]
    out = torch.empty((B, D), dtype=torch.float64, device=hist.device)
    block_bins = next_pow2(bins)
    block_d = max(1, min(next_pow2(D), 4096 // block_bins))
    _bucket_entropy_kernel[(cdiv(D, block_d), B)](
        hist, pmin, out, D, S, bins, PAPER_EXACT=bool(paper_exact), BLOCK_D=block_d, BLOCK_BINS=block_bins,
        BLOCK_S=next_pow2(S), num_warps=4,
    )
    return out


def _bucket(x, f, mask, bins, paper_exact, pair, *, fused: bool | None = None, block_t: int | None = None,
            block_d: int | None = None, num_warps: int | None = None, **split_config):
    B, T, D = x.shape
    if fused is None:
        fused = _use_fused(B, T, D, bins, block_d or 64, x.device)
    if fused:
        # 256 threads, [32, 64] tiles: 8 channels x 1 token per thread, 16-byte bf16 loads,
        # 5 x 8 packed counters for 20 bins; 128 registers on sm_90 (ptxas), 2 programs per SM.
        # The pair counts X and Y: [16, 64] tiles keep it at 183 registers without spills.
        bt = block_t or (16 if pair else 32)
        return _fused(x, f, mask, bins, paper_exact, pair, block_t=bt, block_d=block_d or 64, num_warps=num_warps or 8)
    cfg = {k: v for k, v in dict(block_t=block_t, block_d=block_d, num_warps=num_warps).items() if v is not None}
    hist, pmin = _split_counts(x, f, mask, bins, pair, **cfg, **split_config)
    hs = tuple(entropy_from_counts(hist[i], paper_exact, pmin[i]) for i in range(hist.shape[0]))
    return hs if pair else hs[0]


def bucket(x, f=None, mask=None, bins: int = 20, paper_exact: bool = False, **config) -> torch.Tensor:
    """Per-channel histogram entropy H_d, fp64 [B, D], of Y = x (+ f) over valid tokens.

    x, f: [B, T, D] fp32/fp16/bf16, any strides; mask: [B, T] bool or None. H_d = NaN for
    a (sample, channel) whose Y holds NaN/Inf among the valid tokens. ``config``: fused
    (None: chosen by shape), block_t, block_d, num_warps, splits (split path).
    """
    return _bucket(x, f, mask, bins, paper_exact, False, **config)


def bucket_pair(x, f, mask=None, bins: int = 20, paper_exact: bool = False, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_d of Y = x + f, H_d of x), fp64 [B, D] each, from one read of x and f per pass;
    each bit for bit what :func:`bucket` gives."""
    return _bucket(x, f, mask, bins, paper_exact, True, **config)
