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

COS (bucket_cosine): pass 1 also sums, per token over the program's channels, partner * Y,
partner^2, Y^2 and partner * 0 + Y * 0 (0, or NaN where a value is not finite), partner
being x itself (COS=1, Y = x + f) or another tensor c (COS=2, Y = x), into partials
[B, programs along D, T, 4] fp32: the cosine's per-token sums without a read of its own;
:func:`cosine_from_partials` folds them (fp64) into the per-sample sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrodrop_fast.ops.triton import _tiles as tiles
from entrodrop_fast.ops.triton._bins import _bin_index, _bin_params, _entropy_rows
from entrodrop_fast.ops.triton._common import blocks, cdiv, next_pow2, num_sms, stream_args

FUSED_MAX_BINS = 32  # eight packed words of four 8-bit counters


@triton.jit
def _count(words, idx, valid, NW: tl.constexpr):
    """Add one valid value per tile slot to the packed counters ``words``, a tuple of NW
    int32 [BLOCK_T, BLOCK_D]: bin j is the 8-bit field j % 4 of word j // 4."""
    wid = idx >> 2
    one = tl.where(valid, 1 << ((idx & 3) * 8), 0)
    for w in tl.static_range(NW):  # word w replaced (a tuple is rebuilt, never assigned into)
        words = words[:w] + (words[w] + tl.where(wid == w, one, 0),) + words[w + 1 :]
    return words


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
def _unpack_all(cnt, words, jj, NW: tl.constexpr):
    """cnt += the counts of all NW packed words (see :func:`_count`)."""
    for w in tl.static_range(NW):
        cnt = _unpack(cnt, words[w], w, jj)
    return cnt


@triton.jit
def _bucket_fused_kernel(
    x_ptr,
    f_ptr,
    m_ptr,
    hy_ptr,
    hx_ptr,  # hy (Y), hx (x itself, PAIR): [B, D] fp64
    wide_ptr,  # [B, programs along D] int32, zeroed: blocks left to the WIDE launch
    c_ptr,  # COS=2: the cosine's partner [B, T, D] (else x, never read)
    part_ptr,  # COS: [B, programs along D, T, 4] fp32 per-token partial sums (else unused)
    scb,
    sct,
    scd,
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
    COS: tl.constexpr = 0,
):
    b, offs_d, dmask, offs_d64 = tiles.channel_block(D, BLOCK_D)
    src = (x_ptr, f_ptr, m_ptr, b, sxb, sxt, sxd, sfb, sft, sfd, smb, smt)
    # Two launches of this kernel: WIDE=False does every block without a "wide" finite
    # channel and flags the others; WIDE=True (its fp64 path costs ~60 registers, which would
    # halve the occupancy of the common case) redoes only the flagged blocks.
    flag = wide_ptr + b * tl.num_programs(0) + tl.program_id(0)
    T1 = T
    if WIDE:
        T1 = tl.where(tl.load(flag) != 0, T, 0)

    # pass 1: min, max and the non-finite report
    ry = tiles.range_init(BLOCK_T, BLOCK_D)  # of Y
    rx = tiles.range_init(BLOCK_T, BLOCK_D)  # of x (PAIR)
    # (from HBM: two tiles ahead in flight, see _tiles.py)
    raw = tiles.load_tile(src, 0, T1, offs_d64, dmask, HAS_F, HAS_MASK, BLOCK_T)
    raw_n = tiles.load_tile(src, BLOCK_T, T1, offs_d64, dmask, HAS_F, HAS_MASK, BLOCK_T)
    for t0 in range(0, T1, BLOCK_T):
        raw_nn = tiles.load_tile(
            src, t0 + 2 * BLOCK_T, T1, offs_d64, dmask, HAS_F, HAS_MASK, BLOCK_T
        )
        xv, y, valid = tiles.widen(raw, dmask, HAS_F)
        raw, raw_n = raw_n, raw_nn
        ry = tiles.range_add(ry, y, valid)
        if PAIR:
            rx = tiles.range_add(rx, xv, valid)
        if COS != 0:
            if not WIDE:  # the first launch runs pass 1 on every block: the partials once
                offs_t = t0 + tl.arange(0, BLOCK_T)
                pv = xv
                if COS == 2:
                    pv = tl.load(
                        c_ptr
                        + b * scb
                        + offs_t.to(tl.int64)[:, None] * sct
                        + offs_d64[None, :] * scd,
                        mask=valid,
                        other=0.0,
                    ).to(tl.float32)
                y0 = tl.where(valid, y, 0.0)
                out = part_ptr + ((b * tl.num_programs(0) + tl.program_id(0)) * T + offs_t) * 4
                tm = offs_t < T
                tl.store(out, tl.sum(pv * y0, axis=1), mask=tm)
                tl.store(out + 1, tl.sum(pv * pv, axis=1), mask=tm)
                tl.store(out + 2, tl.sum(y0 * y0, axis=1), mask=tm)
                tl.store(out + 3, tl.sum(pv * 0.0 + y0 * 0.0, axis=1), mask=tm)
    lo, hi, bad = tiles.range_final(ry)  # bad (BLOCK_D,): NaN != 0
    lo, sc, wide, any_wide = _bin_params(lo, hi, dmask, bins)
    badx = bad
    lox, scx, widex, any_widex = lo, sc, wide, any_wide
    if PAIR:
        lox, hix, badx = tiles.range_final(rx)
        lox, scx, widex, any_widex = _bin_params(lox, hix, dmask, bins)
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
        words = (tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32),) * NW  # of Y
        words_x = words  # of x (PAIR)
        c_end = tl.minimum(c0 + BLOCK_T * 255, T2)
        raw = tiles.load_tile(src, c0, c_end, offs_d64, dmask, HAS_F, HAS_MASK, BLOCK_T)
        for t0 in range(c0, c_end, BLOCK_T):
            raw_n = tiles.load_tile(
                src, t0 + BLOCK_T, c_end, offs_d64, dmask, HAS_F, HAS_MASK, BLOCK_T
            )
            xv, y, valid = tiles.widen(raw, dmask, HAS_F)  # (from L2, just read: one tile ahead)
            raw = raw_n
            idx = _bin_index(y, lo, sc, wide, any_wide, bins, WIDE)
            words = _count(words, idx, valid, NW)
            if PAIR:
                idx = _bin_index(xv, lox, scx, widex, any_widex, bins, WIDE)
                words_x = _count(words_x, idx, valid, NW)
        cnt = _unpack_all(cnt, words, jj, NW)
        if PAIR:
            cntx = _unpack_all(cntx, words_x, jj, NW)

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


def _fused(x, f, mask, bins, paper_exact, pair, *, block_t, block_d, num_warps, cos=0, c=None):
    """H_d [B, D] (pair: a tuple of two); with ``cos`` (1: partner x, 2: partner c) also the
    cosine's per-token partial sums [B, programs along D, T, 4] (returned second)."""
    B, T, D = x.shape
    assert bins <= FUSED_MAX_BINS and block_t <= 256
    block_d, nd = blocks(D, block_d)
    fp, mp, strides, flags = stream_args(x, f, mask)
    hy = torch.empty((B, D), dtype=torch.float64, device=x.device)
    hx = torch.empty((B, D), dtype=torch.float64, device=x.device) if pair else hy
    wide = torch.zeros((B, nd), dtype=torch.int32, device=x.device)
    part = torch.empty((B, nd, T, 4) if cos else (1,), dtype=torch.float32, device=x.device)
    cp, cs = (c, tuple(c.stride())) if cos == 2 else (x, (0, 0, 0))
    for w in (False, True):  # the second launch redoes the blocks the first flagged (rare)
        _bucket_fused_kernel[(nd, B)](
            x,
            fp,
            mp,
            hy,
            hx,
            wide,
            cp,
            part,
            *cs,
            T,
            D,
            bins,
            *strides,
            **flags,
            PAIR=pair,
            PAPER_EXACT=bool(paper_exact),
            NW=cdiv(bins, 4),
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            BLOCK_BINS=max(4, next_pow2(bins)),
            WIDE=w,
            COS=cos,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
    h = (hy, hx) if pair else hy
    return (h, part) if cos else h


def cosine_from_partials(part: torch.Tensor, mask: torch.Tensor | None):
    """(sum over valid tokens of cos, count), fp64 [B] each, from the partials of a COS
    launch ([B, programs, T, 4]): cos = dot / max(|p| |Y|, 1e-12), NaN where a value of the
    token was not finite (the cosine kernel's rule)."""
    s = part.sum(1, dtype=torch.float64)  # [B, T, 4]
    cos = s[..., 0] / (s[..., 1].sqrt() * s[..., 2].sqrt()).clamp_min(1e-12)
    cos = torch.where(s[..., 3] != 0, float("nan"), cos)
    if mask is None:
        return cos.sum(1), torch.full_like(cos[:, 0], cos.shape[1])
    return torch.where(mask, cos, 0.0).sum(1), mask.sum(1).to(torch.float64)
