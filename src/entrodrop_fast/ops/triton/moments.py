"""Per-sample, per-channel moments (count, mean, M2, min, max) of Y = X (+ F).

Two kernels: ``_moments_partial_kernel`` reads a [rows_per_split, BLOCK_D] slab of one
sample per program, tile by tile, and keeps a Welford state per tile slot (elementwise in
registers: no cross-thread reduction inside the loop; around the slot's first value, so
the deviations stay small in fp32); the slots are merged once, in fp64
(Chan). ``_moments_merge_kernel`` merges the per-split partials in fp64 and writes the
final results. NaN/Inf in Y among the valid tokens is reported in the same pass (a running
``y * 0`` sum, NaN exactly then): mean = m2 = min = max = NaN for that (sample, channel).
``PAIR=True`` gives the moments of X itself too, from the same read of X and F.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrodrop_fast.ops.triton import _tiles as tiles
from entrodrop_fast.ops.triton._common import blocks, cdiv, next_pow2, stream_args, token_splits


@triton.jit
def _welford(state, v, valid, first, rn):
    """One value per tile slot into the slot's state (shift, mean, M2), fp32 [BLOCK_T,
    BLOCK_D]: the running mean and M2 of v - shift, where shift is the slot's first valid
    value (``first``: this tile's value is it): the deviations then stay small and fp32
    keeps 1e-5 even for a channel of mean 10 and spread 1e-3. rn: 1 / the slot row's count."""
    shift, mean, m2 = state
    shift = tl.where(first, v, shift)
    z = v - shift
    delta = z - mean
    mean = tl.where(valid, mean + delta * rn[:, None], mean)
    m2 = tl.where(valid, m2 + delta * (z - mean), m2)
    return shift, mean, m2


@triton.jit
def _store_partial(n_row, state, rng, out, dmask, pmean_ptr, pm2_ptr, pmin_ptr, pmax_ptr):
    """Merge the slots of the Welford state and the range state (Chan, fp64) and store this
    split's partials at ``out``; NaN where reported. Returns the split's count."""
    shift, mean, m2 = state
    n_row = n_row.to(tl.float64)
    n = tl.sum(n_row, axis=0)
    mean64 = shift.to(tl.float64) + mean.to(tl.float64)
    mu = tl.sum(n_row[:, None] * mean64, axis=0) / tl.maximum(n, 1.0)  # 0 for an empty split
    dev = mean64 - mu[None, :]
    m2c = tl.sum(m2.to(tl.float64) + n_row[:, None] * dev * dev, axis=0)
    bad = tiles.range_bad(rng)  # (BLOCK_D,): a valid value was NaN/Inf
    tl.store(pmean_ptr + out, tl.where(bad, float("nan"), mu), mask=dmask)
    tl.store(pm2_ptr + out, tl.where(bad, float("nan"), m2c), mask=dmask)
    tiles.store_range(pmin_ptr, pmax_ptr, out, rng, bad, dmask)
    return n


@triton.jit
def _moments_partial_kernel(
    x_ptr,
    f_ptr,
    m_ptr,
    pn_ptr,
    pmean_ptr,
    pm2_ptr,
    pmin_ptr,
    pmax_ptr,  # pn: [B, S] fp32; pmean/pm2 [1 + PAIR, B, S, D] fp64; pmin/pmax fp32
    B,
    T,
    D,
    S,
    rows_per_split,
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
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, dmask, offs_d64, split = tiles.split_block(D, BLOCK_D)
    t_begin, t_end = tiles.token_range(split, rows_per_split, T)
    src = (x_ptr, f_ptr, m_ptr, b, sxb, sxt, sxd, sfb, sft, sfd, smb, smt)

    # Welford per tile slot (row r of the tile sees tokens r, r + BLOCK_T, ...): every update
    # elementwise in registers, no cross-thread reduction in the loop; the slots are merged
    # once at the end (Chan, fp64). No cancellation even for channels 1e4x larger than the rest.
    n_row = tl.zeros([BLOCK_T], dtype=tl.float32)
    zero = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    wy = (zero, zero, zero)  # (shift, mean, M2) of Y
    wx = wy  # of x (PAIR)
    ry = tiles.range_init(BLOCK_T, BLOCK_D)  # (min, max, sum of y * 0: 0, or NaN: the report)
    rx = tiles.range_init(BLOCK_T, BLOCK_D)
    # two tiles ahead in flight (see _tiles.py)
    raw = tiles.load_tile(src, t_begin, t_end, offs_d64, dmask, HAS_F, HAS_MASK, BLOCK_T)
    raw_n = tiles.load_tile(
        src, t_begin + BLOCK_T, t_end, offs_d64, dmask, HAS_F, HAS_MASK, BLOCK_T
    )
    for t0 in range(t_begin, t_end, BLOCK_T):
        raw_nn = tiles.load_tile(
            src, t0 + 2 * BLOCK_T, t_end, offs_d64, dmask, HAS_F, HAS_MASK, BLOCK_T
        )
        xv, y, valid = tiles.widen(raw, dmask, HAS_F)
        tmask = raw[2]
        first = valid & (n_row == 0.0)[:, None]
        n_row += tmask.to(tl.float32)
        rn = 1.0 / tl.maximum(n_row, 1.0)
        wy = _welford(wy, y, valid, first, rn)
        ry = tiles.range_add(ry, y, valid)
        if PAIR:
            wx = _welford(wx, xv, valid, first, rn)
            rx = tiles.range_add(rx, xv, valid)
        raw, raw_n = raw_n, raw_nn

    out = (b * S + split) * D + offs_d64
    n = _store_partial(n_row, wy, ry, out, dmask, pmean_ptr, pm2_ptr, pmin_ptr, pmax_ptr)
    if PAIR:
        out += B * S * D
        _store_partial(n_row, wx, rx, out, dmask, pmean_ptr, pm2_ptr, pmin_ptr, pmax_ptr)
    # every channel block stores the same count (a benign duplicate write)
    tl.store(pn_ptr + b * S + split, n.to(tl.float32))


@triton.jit
def _moments_merge_kernel(
    pn_ptr,
    pmean_ptr,
    pm2_ptr,
    pmin_ptr,
    pmax_ptr,
    count_ptr,
    mean_ptr,
    m2_ptr,
    min_ptr,
    max_ptr,  # count: [B] fp64; mean/m2 [B, D] fp64; min/max [B, D] fp32
    D,
    S,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, offs_d, dmask, _ = tiles.channel_block(D, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < S
    ns = tl.load(pn_ptr + b * S + offs_s, mask=smask, other=0.0).to(tl.float64)  # (BLOCK_S,)
    idx = (b * S + offs_s.to(tl.int64))[:, None] * D + offs_d[None, :]
    m = smask[:, None] & dmask[None, :]
    means = tl.load(pmean_ptr + idx, mask=m, other=0.0).to(tl.float64)
    m2s = tl.load(pm2_ptr + idx, mask=m, other=0.0).to(tl.float64)
    n = tl.sum(ns, axis=0)
    mean = tl.sum(ns[:, None] * means, axis=0) / n
    dev = tl.where(m, means - mean[None, :], 0.0)
    m2 = tl.sum(m2s + ns[:, None] * dev * dev, axis=0)  # Chan: sum M2_i + n_i (mean_i - mean)^2
    pmin = tl.load(pmin_ptr + idx, mask=m, other=float("inf"))
    bad = (
        tl.max((pmin != pmin).to(tl.int32), axis=0) > 0
    )  # a split reported NaN/Inf (mean, m2: NaN already)
    mn = tl.where(bad, float("nan"), tl.min(pmin, axis=0))
    mx = tl.where(
        bad, float("nan"), tl.max(tl.load(pmax_ptr + idx, mask=m, other=float("-inf")), axis=0)
    )
    out = b * D + offs_d
    tl.store(mean_ptr + out, mean, mask=dmask)
    tl.store(m2_ptr + out, m2, mask=dmask)
    tl.store(min_ptr + out, mn, mask=dmask)
    tl.store(max_ptr + out, mx, mask=dmask)
    if tl.program_id(0) == 0:
        tl.store(count_ptr + b, n)


# ---------------------------------------------------------------- launchers


def moments_partials(
    x,
    f=None,
    mask=None,
    pair: bool = False,
    *,
    block_t: int = 32,
    block_d: int = 64,
    splits: int | None = None,
    num_warps: int = 8,
):
    """Per-split partial states: (pn [B, S], mean, m2 (fp64), min, max [1 + pair, B, S, D])."""
    B, T, D = x.shape
    block_d, nd = blocks(D, block_d)
    S, rows = token_splits(B, T, nd, block_t, x.device, splits)
    dev = x.device
    sets = 2 if pair else 1
    pn = torch.empty((B, S), dtype=torch.float32, device=dev)
    pmean, pm2 = (torch.empty((sets, B, S, D), dtype=torch.float64, device=dev) for _ in range(2))
    pmin, pmax = (torch.empty((sets, B, S, D), dtype=torch.float32, device=dev) for _ in range(2))
    fp, mp, strides, flags = stream_args(x, f, mask)
    _moments_partial_kernel[(nd, S, B)](
        x,
        fp,
        mp,
        pn,
        pmean,
        pm2,
        pmin,
        pmax,
        B,
        T,
        D,
        S,
        rows,
        *strides,
        **flags,
        PAIR=pair,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return pn, pmean, pm2, pmin, pmax


def _merge(pn, pmean, pm2, pmin, pmax) -> dict:
    B, S, D = pmean.shape
    dev = pmean.device
    count = torch.empty((B,), dtype=torch.float64, device=dev)
    mean = torch.empty((B, D), dtype=torch.float64, device=dev)
    m2 = torch.empty((B, D), dtype=torch.float64, device=dev)
    mn = torch.empty((B, D), dtype=torch.float32, device=dev)
    mx = torch.empty((B, D), dtype=torch.float32, device=dev)
    block_s = next_pow2(S)
    block_d = max(16, min(next_pow2(D), max(16, 2048 // block_s)))
    _moments_merge_kernel[(cdiv(D, block_d), B)](
        pn,
        pmean,
        pm2,
        pmin,
        pmax,
        count,
        mean,
        m2,
        mn,
        mx,
        D,
        S,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return {"count": count, "mean": mean, "m2": m2, "min": mn, "max": mx}


def moments(x, f=None, mask=None, **config) -> dict:
    """count [B] fp64, mean/m2 [B, D] fp64, min/max [B, D] fp32 of Y = x (+ f) over valid tokens.

    x, f: [B, T, D] fp32/fp16/bf16, any strides; mask: [B, T] bool or None. mean, m2, min
    and max are NaN for a (sample, channel) whose Y holds NaN/Inf among the valid tokens.
    ``config`` (block_t, block_d, splits, num_warps) tunes the partial kernel.
    """
    pn, *parts = moments_partials(x, f, mask, **config)
    return _merge(pn, *(p[0] for p in parts))


def moments_pair(x, f, mask=None, **config) -> tuple[dict, dict]:
    """(moments of Y = x + f, moments of x) from one read of x and f; each bit for bit what
    :func:`moments` gives."""
    pn, *parts = moments_partials(x, f, mask, pair=True, **config)
    return _merge(pn, *(p[0] for p in parts)), _merge(pn, *(p[1] for p in parts))
