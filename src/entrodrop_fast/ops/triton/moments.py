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

from entrodrop_fast.ops.triton._common import cdiv, f_arg, mask_arg, next_pow2, token_splits
from entrodrop_fast.ops.triton._tiles import load_raw, widen


@triton.jit
def _welford(shift, mean, m2, v, valid, first, rn):
    """One value per tile slot into the slot's running (mean, M2) of v - shift, where shift
    is the slot's first valid value (``first``: this tile's value is it): the deviations
    then stay small and fp32 keeps 1e-5 even for a channel of mean 10 and spread 1e-3.
    rn: 1 / the slot row's count."""
    shift = tl.where(first, v, shift)
    z = v - shift
    delta = z - mean
    mean = tl.where(valid, mean + delta * rn[:, None], mean)
    m2 = tl.where(valid, m2 + delta * (z - mean), m2)
    return shift, mean, m2


@triton.jit
def _store_partial(
    n_row, shift, mean, m2, mn, mx, z, out, dmask, pn_ptr, pmean_ptr, pm2_ptr, pmin_ptr, pmax_ptr
):
    """Merge the slots (Chan, fp64) and store this split's state; NaN where reported."""
    n_row = n_row.to(tl.float64)
    n = tl.sum(n_row, axis=0)
    mean64 = shift.to(tl.float64) + mean.to(tl.float64)
    mu = tl.sum(n_row[:, None] * mean64, axis=0) / tl.maximum(n, 1.0)  # 0 for an empty split
    dev = mean64 - mu[None, :]
    m2c = tl.sum(m2.to(tl.float64) + n_row[:, None] * dev * dev, axis=0)
    bad = tl.sum(z, axis=0) != 0.0  # (BLOCK_D,): a valid value was NaN/Inf
    tl.store(pmean_ptr + out, tl.where(bad, float("nan"), mu), mask=dmask)
    tl.store(pm2_ptr + out, tl.where(bad, float("nan"), m2c), mask=dmask)
    tl.store(pmin_ptr + out, tl.where(bad, float("nan"), tl.min(mn, axis=0)), mask=dmask)
    tl.store(pmax_ptr + out, tl.where(bad, float("nan"), tl.max(mx, axis=0)), mask=dmask)
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
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    t_begin = pid_s * rows_per_split
    t_end = tl.minimum(t_begin + rows_per_split, T)

    # Welford per tile slot (row r of the tile sees tokens r, r + BLOCK_T, ...): every update
    # elementwise in registers, no cross-thread reduction in the loop; the slots are merged
    # once at the end (Chan, fp64). No cancellation even for channels 1e4x larger than the rest.
    n_row = tl.zeros([BLOCK_T], dtype=tl.float32)
    shift = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    shiftx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    mean = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    mn = tl.full([BLOCK_T, BLOCK_D], float("inf"), dtype=tl.float32)
    mx = tl.full([BLOCK_T, BLOCK_D], float("-inf"), dtype=tl.float32)
    z = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # sum of y * 0: 0, or NaN (the report)
    meanx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    m2x = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    mnx = tl.full([BLOCK_T, BLOCK_D], float("inf"), dtype=tl.float32)
    mxx = tl.full([BLOCK_T, BLOCK_D], float("-inf"), dtype=tl.float32)
    zx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    rows = tl.arange(0, BLOCK_T)
    # two tiles ahead in flight (see _tiles.py)
    xr, fr, tmask = load_raw(
        x_ptr,
        f_ptr,
        m_ptr,
        b,
        t_begin + rows,
        t_begin + rows < t_end,
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
    nxt = t_begin + BLOCK_T + rows
    xr_n, fr_n, tmask_n = load_raw(
        x_ptr,
        f_ptr,
        m_ptr,
        b,
        nxt,
        nxt < t_end,
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
    for t0 in range(t_begin, t_end, BLOCK_T):
        nxt = t0 + 2 * BLOCK_T + rows
        xr_nn, fr_nn, tmask_nn = load_raw(
            x_ptr,
            f_ptr,
            m_ptr,
            b,
            nxt,
            nxt < t_end,
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
        first = valid & (n_row == 0.0)[:, None]
        n_row += tmask.to(tl.float32)
        rn = 1.0 / tl.maximum(n_row, 1.0)
        shift, mean, m2 = _welford(shift, mean, m2, y, valid, first, rn)
        mn = tl.minimum(mn, tl.where(valid, y, float("inf")))
        mx = tl.maximum(mx, tl.where(valid, y, float("-inf")))
        z += y * 0.0
        if PAIR:
            shiftx, meanx, m2x = _welford(shiftx, meanx, m2x, xv, valid, first, rn)
            mnx = tl.minimum(mnx, tl.where(valid, xv, float("inf")))
            mxx = tl.maximum(mxx, tl.where(valid, xv, float("-inf")))
            zx += xv * 0.0
        xr, fr, tmask = xr_n, fr_n, tmask_n
        xr_n, fr_n, tmask_n = xr_nn, fr_nn, tmask_nn

    out = (b * S + pid_s) * D + offs_d64
    n = _store_partial(
        n_row,
        shift,
        mean,
        m2,
        mn,
        mx,
        z,
        out,
        dmask,
        pn_ptr,
        pmean_ptr,
        pm2_ptr,
        pmin_ptr,
        pmax_ptr,
    )
    if PAIR:
        _store_partial(
            n_row,
            shiftx,
            meanx,
            m2x,
            mnx,
            mxx,
            zx,
            out + B * S * D,
            dmask,
            pn_ptr,
            pmean_ptr,
            pm2_ptr,
            pmin_ptr,
            pmax_ptr,
        )
    # every channel block stores the same count (a benign duplicate write)
    tl.store(pn_ptr + b * S + pid_s, n.to(tl.float32))


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
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
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
    if pid_d == 0:
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
    block_d = min(block_d, next_pow2(D))
    nd = cdiv(D, block_d)
    S, rows = token_splits(B, T, nd, block_t, x.device, splits)
    dev = x.device
    sets = 2 if pair else 1
    pn = torch.empty((B, S), dtype=torch.float32, device=dev)
    pmean, pm2 = (torch.empty((sets, B, S, D), dtype=torch.float64, device=dev) for _ in range(2))
    pmin, pmax = (torch.empty((sets, B, S, D), dtype=torch.float32, device=dev) for _ in range(2))
    fp, (sfb, sft, sfd) = f_arg(x, f)
    mp, smb, smt = mask_arg(x, mask)
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
