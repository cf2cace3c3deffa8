"""Per-sample, per-channel moments (count, mean, M2, min, max) of Y = X (+ F).

Two kernels: ``_moments_partial_kernel`` reads a [rows_per_split, BLOCK_D] slab of one
sample per program, tile by tile; each tile's mean and M2 are taken around the tile's own
mean (two passes over registers, no cancellation even for channels 1e4x larger than the
rest, after subtracting a per-channel shift) and merged into the running state with
Chan's formulas. ``_moments_merge_kernel``
merges the per-split partials in fp64 and writes the final fp64 results.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrodrop_fast.ops.triton._common import cdiv, f_arg, mask_arg, next_pow2, token_splits


@triton.jit
def _moments_partial_kernel(
    x_ptr, f_ptr, m_ptr,
    pn_ptr, pmean_ptr, pm2_ptr, pmin_ptr, pmax_ptr,  # pn: [B, S]; pmean [B, S, D] fp64; the others fp32
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

    # Statistics of z = y - shift, shift = the mean of the first tile holding a valid row:
    # z is small even for channels whose mean dwarfs their spread, so fp32 keeps 1e-5.
    n = tl.sum(tl.zeros([BLOCK_T], dtype=tl.float32), axis=0)  # scalar count
    shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    mean = tl.zeros([BLOCK_D], dtype=tl.float32)  # running mean of z
    m2 = tl.zeros([BLOCK_D], dtype=tl.float32)
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
        nb = tl.sum(tmask.to(tl.float32), axis=0)  # valid rows in this tile (scalar)
        if n == 0.0:
            shift = tl.sum(y, axis=0) / tl.maximum(nb, 1.0)
        z = tl.where(valid, y - shift[None, :], 0.0)
        mb = tl.sum(z, axis=0) / tl.maximum(nb, 1.0)  # (BLOCK_D,) tile mean of z
        dev = tl.where(valid, z - mb[None, :], 0.0)
        m2b = tl.sum(dev * dev, axis=0)
        ntot = n + nb
        w = nb / tl.maximum(ntot, 1.0)
        delta = mb - mean
        mean = mean + delta * w
        m2 = m2 + m2b + delta * delta * (n * w)
        n = ntot
        mn = tl.minimum(mn, tl.where(valid, y, float("inf")))
        mx = tl.maximum(mx, tl.where(valid, y, float("-inf")))

    out = (b * S + pid_s) * D + offs_d64
    tl.store(pmean_ptr + out, shift.to(tl.float64) + mean.to(tl.float64), mask=dmask)
    tl.store(pm2_ptr + out, m2, mask=dmask)
    tl.store(pmin_ptr + out, tl.min(mn, axis=0), mask=dmask)
    tl.store(pmax_ptr + out, tl.max(mx, axis=0), mask=dmask)
    # every channel block stores the same count (a benign duplicate write)
    tl.store(pn_ptr + b * S + pid_s, n)


@triton.jit
def _moments_merge_kernel(
    pn_ptr, pmean_ptr, pm2_ptr, pmin_ptr, pmax_ptr,
    count_ptr, mean_ptr, m2_ptr, min_ptr, max_ptr,  # count: [B] fp64; mean/m2 [B, D] fp64; min/max [B, D] fp32
    D, S,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
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
    mn = tl.min(tl.load(pmin_ptr + idx, mask=m, other=float("inf")), axis=0)
    mx = tl.max(tl.load(pmax_ptr + idx, mask=m, other=float("-inf")), axis=0)
    out = b * D + offs_d
    tl.store(mean_ptr + out, mean, mask=dmask)
    tl.store(m2_ptr + out, m2, mask=dmask)
    tl.store(min_ptr + out, mn, mask=dmask)
    tl.store(max_ptr + out, mx, mask=dmask)
    if pid_d == 0:
        tl.store(count_ptr + b, n)


# ---------------------------------------------------------------- launchers


def moments_partials(x, f=None, mask=None, *, block_t: int = 32, block_d: int = 128, splits: int | None = None, num_warps: int = 4):
    """Per-split partial states: (pn [B, S], mean (fp64), m2, min, max [B, S, D])."""
    B, T, D = x.shape
    block_d = min(block_d, next_pow2(D))
    nd = cdiv(D, block_d)
    S, rows = token_splits(B, T, nd, block_t, x.device, splits)
    dev = x.device
    pn = torch.empty((B, S), dtype=torch.float32, device=dev)
    pmean = torch.empty((B, S, D), dtype=torch.float64, device=dev)
    pm2, pmin, pmax = (torch.empty((B, S, D), dtype=torch.float32, device=dev) for _ in range(3))
    fp, (sfb, sft, sfd) = f_arg(x, f)
    mp, smb, smt = mask_arg(x, mask)
    _moments_partial_kernel[(nd, S, B)](
        x, fp, mp, pn, pmean, pm2, pmin, pmax,
        T, D, S, rows,
        x.stride(0), x.stride(1), x.stride(2), sfb, sft, sfd, smb, smt,
        HAS_F=f is not None, HAS_MASK=mask is not None,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )
    return pn, pmean, pm2, pmin, pmax


def moments(x, f=None, mask=None, **config) -> dict:
    """count [B] fp64, mean/m2 [B, D] fp64, min/max [B, D] fp32 of Y = x (+ f) over valid tokens.

    x, f: [B, T, D] fp32/fp16/bf16, any strides; mask: [B, T] bool or None.
    ``config`` (block_t, block_d, splits, num_warps) tunes the partial kernel.
    """
    B, _, D = x.shape
    pn, pmean, pm2, pmin, pmax = moments_partials(x, f, mask, **config)
    S = pn.shape[1]
    dev = x.device
    count = torch.empty((B,), dtype=torch.float64, device=dev)
    mean = torch.empty((B, D), dtype=torch.float64, device=dev)
    m2 = torch.empty((B, D), dtype=torch.float64, device=dev)
    mn = torch.empty((B, D), dtype=torch.float32, device=dev)
    mx = torch.empty((B, D), dtype=torch.float32, device=dev)
    block_s = next_pow2(S)
    block_d = max(16, min(next_pow2(D), max(16, 2048 // block_s)))
    _moments_merge_kernel[(cdiv(D, block_d), B)](
        pn, pmean, pm2, pmin, pmax, count, mean, m2, mn, mx, D, S,
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
    )
    return {"count": count, "mean": mean, "m2": m2, "min": mn, "max": mx}
