"""The fused bucket kernel: one program per (sample, block of BLOCK_D channels) owns all of
the sample's tokens for its channels, so it needs no partials and no atomics.

Pass 1 reads the tile for min/max and the NaN/Inf report; pass 2 re-reads it (the
program's own tile, just read: L2-resident, T x BLOCK_D x 2 bytes = 32 KiB at T = 256
bf16) and counts in registers: 8-bit counters packed four to an int32 word, one word per
four bins, kept per tile slot ([BLOCK_T, BLOCK_D] elementwise: no cross-thread traffic in
the loop), unpacked every 255 tiles; then H_d in fp64, written directly ([B, D], no
counts array in memory). Blocks with a "wide" finite channel (the contract's fp64 formula)
are left to a second launch of the same kernel (WIDE=True), so the common case does not
carry the fp64 path's registers. Used by :mod:`entrodrop_fast.ops.triton.bucket`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrodrop_fast.ops.triton._bins import _bin_index, _bin_params, _entropy_rows
from entrodrop_fast.ops.triton._common import cdiv, f_arg, mask_arg, next_pow2, num_sms
from entrodrop_fast.ops.triton._tiles import load_raw, widen

FUSED_MAX_BINS = 32  # eight packed words of four 8-bit counters


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


@triton.jit
def _bucket_fused_kernel(
    x_ptr,
    f_ptr,
    m_ptr,
    hy_ptr,
    hx_ptr,  # hy (Y), hx (x itself, PAIR): [B, D] fp64
    wide_ptr,  # [B, programs along D] int32, zeroed: blocks left to the WIDE launch
    T,
    D,
    bins,
    sxb,
    sxt,
    sxd,
    sfb,
    sft,
    sfd,
    smb,
    smt,
    HAS_F: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PAIR: tl.constexpr,
    PAPER_EXACT: tl.constexpr,
    NW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_BINS: tl.constexpr,
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
    xr, fr, tmask = load_raw(
        x_ptr,
        f_ptr,
        m_ptr,
        b,
        rows,
        rows < T1,
        offs_d64,
        dmask,
        sxb,
        sxt,
        sxd,
        sfb,
        sft,
        sfd,
        smb,
        smt,
        HAS_F,
        HAS_MASK,
    )
    xr_n, fr_n, tmask_n = load_raw(
        x_ptr,
        f_ptr,
        m_ptr,
        b,
        BLOCK_T + rows,
        BLOCK_T + rows < T1,
        offs_d64,
        dmask,
        sxb,
        sxt,
        sxd,
        sfb,
        sft,
        sfd,
        smb,
        smt,
        HAS_F,
        HAS_MASK,
    )
    for t0 in range(0, T1, BLOCK_T):
        nxt = t0 + 2 * BLOCK_T + rows
        xr_nn, fr_nn, tmask_nn = load_raw(
            x_ptr,
            f_ptr,
            m_ptr,
            b,
            nxt,
            nxt < T1,
            offs_d64,
            dmask,
            sxb,
            sxt,
            sxd,
            sfb,
            sft,
            sfd,
            smb,
            smt,
            HAS_F,
            HAS_MASK,
        )
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
        lox, scx, widex, any_widex = _bin_params(
            tl.min(mnx, axis=0), tl.max(mxx, axis=0), dmask, bins
        )
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
        xr, fr, tmask = load_raw(
            x_ptr,
            f_ptr,
            m_ptr,
            b,
            c0 + rows,
            c0 + rows < c_end,
            offs_d64,
            dmask,
            sxb,
            sxt,
            sxd,
            sfb,
            sft,
            sfd,
            smb,
            smt,
            HAS_F,
            HAS_MASK,
        )
        for t0 in range(c0, c_end, BLOCK_T):
            nxt = t0 + BLOCK_T + rows
            xr_n, fr_n, tmask_n = load_raw(
                x_ptr,
                f_ptr,
                m_ptr,
                b,
                nxt,
                nxt < c_end,
                offs_d64,
                dmask,
                sxb,
                sxt,
                sxd,
                sfb,
                sft,
                sfd,
                smb,
                smt,
                HAS_F,
                HAS_MASK,
            )
            xv, y, valid = widen(
                xr, fr, tmask, dmask, HAS_F
            )  # (from L2, just read: one tile ahead)
            xr, fr, tmask = xr_n, fr_n, tmask_n
            idx = _bin_index(y, lo, sc, wide, any_wide, bins, WIDE)
            a0, a1, a2, a3, a4, a5, a6, a7 = _count(a0, a1, a2, a3, a4, a5, a6, a7, idx, valid, NW)
            if PAIR:
                idx = _bin_index(xv, lox, scx, widex, any_widex, bins, WIDE)
                e0, e1, e2, e3, e4, e5, e6, e7 = _count(
                    e0, e1, e2, e3, e4, e5, e6, e7, idx, valid, NW
                )
        cnt = _unpack_all(cnt, a0, a1, a2, a3, a4, a5, a6, a7, jj, NW)
        if PAIR:
            cntx = _unpack_all(cntx, e0, e1, e2, e3, e4, e5, e6, e7, jj, NW)

    m = dmask[:, None] & (jj < bins)
    h = _entropy_rows(cnt, m, PAPER_EXACT)
    tl.store(hy_ptr + b * D + offs_d64, tl.where(bad, float("nan"), h), mask=done)
    if PAIR:
        hx = _entropy_rows(cntx, m, PAPER_EXACT)
        tl.store(hx_ptr + b * D + offs_d64, tl.where(badx, float("nan"), hx), mask=done)


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
            x,
            fp,
            mp,
            hy,
            hx,
            wide,
            T,
            D,
            bins,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            sfb,
            sft,
            sfd,
            smb,
            smt,
            HAS_F=f is not None,
            HAS_MASK=mask is not None,
            PAIR=pair,
            PAPER_EXACT=bool(paper_exact),
            NW=cdiv(bins, 4),
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            BLOCK_BINS=max(4, next_pow2(bins)),
            WIDE=w,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
    return (hy, hx) if pair else hy
