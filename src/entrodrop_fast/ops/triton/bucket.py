"""Per-sample, per-channel histogram ("bucket") entropy of Y = X (+ F), docs/CONTRACT.md.

Two paths, the same bins (the contract's exact fp32 formula: IEEE division for the scale,
then a separate sub and mul, truncation; in fp64 for a channel whose fp32 width or scale
is not finite), the same counts bit for bit:

* the fused path (batched samples, bins <= 32; :mod:`.bucket_fused`): one program per
  (sample, channel block) owns all of the sample's tokens for its channels, counts in
  registers (no atomics) and writes H_d directly.
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

from entrodrop_fast.ops.triton import _tiles as tiles
from entrodrop_fast.ops.triton._bins import _bin_index, _bin_params, _entropy_rows
from entrodrop_fast.ops.triton._common import blocks, cdiv, next_pow2, stream_args, token_splits
from entrodrop_fast.ops.triton.bucket_fused import _fused, _use_fused, cosine_from_partials

# ---------------------------------------------------------------- split path


@triton.jit
def _minmax_partial_kernel(
    x_ptr,
    f_ptr,
    m_ptr,
    pmin_ptr,
    pmax_ptr,  # pmin/pmax: [1 + PAIR, B, S, D] fp32, NaN where non-finite
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
    ry = tiles.range_init(BLOCK_T, BLOCK_D)  # of Y
    rx = tiles.range_init(BLOCK_T, BLOCK_D)  # of x (PAIR)
    for t0 in range(t_begin, t_end, BLOCK_T):
        raw = tiles.load_tile(src, t0, t_end, offs_d64, dmask, HAS_F, HAS_MASK, BLOCK_T)
        xv, y, valid = tiles.widen(raw, dmask, HAS_F)
        ry = tiles.range_add(ry, y, valid)
        if PAIR:
            rx = tiles.range_add(rx, xv, valid)
    out = (b * S + split) * D + offs_d64
    tiles.store_range(pmin_ptr, pmax_ptr, out, ry, tiles.range_bad(ry), dmask)
    if PAIR:
        out += B * S * D
        tiles.store_range(pmin_ptr, pmax_ptr, out, rx, tiles.range_bad(rx), dmask)


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
    x_ptr,
    f_ptr,
    m_ptr,
    pmin_ptr,
    pmax_ptr,
    hist_ptr,  # hist: [1 + PAIR, B, D, bins] int32, zeroed
    B,
    T,
    D,
    S,
    rows_per_split,
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
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b, dmask, offs_d64, split = tiles.split_block(D, BLOCK_D)
    lo, hi = _sample_range(pmin_ptr, pmax_ptr, b, S, D, offs_d64, dmask, BLOCK_S)
    lo, sc, wide, any_wide = _bin_params(lo, hi, dmask, bins)
    lox, scx, widex, any_widex = lo, sc, wide, any_wide
    if PAIR:
        lox, hix = _sample_range(
            pmin_ptr + B * S * D, pmax_ptr + B * S * D, b, S, D, offs_d64, dmask, BLOCK_S
        )
        lox, scx, widex, any_widex = _bin_params(lox, hix, dmask, bins)

    t_begin, t_end = tiles.token_range(split, rows_per_split, T)
    src = (x_ptr, f_ptr, m_ptr, b, sxb, sxt, sxd, sfb, sft, sfd, smb, smt)
    hrow = (b * D + offs_d64) * bins  # (BLOCK_D,) start of each channel's counters
    for t0 in range(t_begin, t_end, BLOCK_T):
        raw = tiles.load_tile(src, t0, t_end, offs_d64, dmask, HAS_F, HAS_MASK, BLOCK_T)
        xv, y, valid = tiles.widen(raw, dmask, HAS_F)
        idx = _bin_index(y, lo, sc, wide, any_wide, bins)
        tl.atomic_add(hist_ptr + hrow[None, :] + idx, 1, mask=valid, sem="relaxed")
        if PAIR:
            idx = _bin_index(xv, lox, scx, widex, any_widex, bins)
            tl.atomic_add(
                hist_ptr + B * D * bins + hrow[None, :] + idx, 1, mask=valid, sem="relaxed"
            )


@triton.jit
def _bucket_entropy_kernel(
    hist_ptr,
    pmin_ptr,
    out_ptr,  # hist: [B, D, bins] int32; pmin: [B, S, D] fp32 (NaN: report); out: [B, D] fp64
    D,
    S,
    bins,
    PAPER_EXACT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_BINS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b, _, dmask, offs_d64 = tiles.channel_block(D, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_BINS)
    m = dmask[:, None] & (offs_j < bins)[None, :]
    c = tl.load(hist_ptr + (b * D + offs_d64)[:, None] * bins + offs_j[None, :], mask=m, other=0)
    h = _entropy_rows(c, m, PAPER_EXACT)
    offs_s = tl.arange(0, BLOCK_S)
    pm = (offs_s < S)[None, :] & dmask[:, None]
    pmin = tl.load(
        pmin_ptr + (b * S + offs_s.to(tl.int64))[None, :] * D + offs_d64[:, None],
        mask=pm,
        other=0.0,
    )
    bad = tl.max((pmin != pmin).to(tl.int32), axis=1) > 0
    tl.store(out_ptr + b * D + offs_d64, tl.where(bad, float("nan"), h), mask=dmask)


# ---------------------------------------------------------------- launchers


def _split_counts(
    x,
    f=None,
    mask=None,
    bins: int = 20,
    pair: bool = False,
    *,
    block_t: int = 32,
    block_d: int = 128,
    splits: int | None = None,
    num_warps: int = 4,
    minmax_block_t: int | None = None,
):
    """(int32 counts [1 + pair, B, D, bins], min partials [1 + pair, B, S, D], NaN where a
    split of a channel holds a non-finite value)."""
    B, T, D = x.shape
    dev = x.device
    block_d, nd = blocks(D, block_d)
    fp, mp, strides, flags = stream_args(x, f, mask)
    flags["PAIR"] = pair
    sets = 2 if pair else 1

    mbt = minmax_block_t or block_t
    S, rows = token_splits(B, T, nd, mbt, dev, splits)
    pmin = torch.empty((sets, B, S, D), dtype=torch.float32, device=dev)
    pmax = torch.empty((sets, B, S, D), dtype=torch.float32, device=dev)
    _minmax_partial_kernel[(nd, S, B)](
        x,
        fp,
        mp,
        pmin,
        pmax,
        B,
        T,
        D,
        S,
        rows,
        *strides,
        **flags,
        BLOCK_T=mbt,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )

    S2, rows2 = token_splits(B, T, nd, block_t, dev, splits)
    hist = torch.zeros((sets, B, D, bins), dtype=torch.int32, device=dev)
    _bucket_hist_kernel[(nd, S2, B)](
        x,
        fp,
        mp,
        pmin,
        pmax,
        hist,
        B,
        T,
        D,
        S,
        rows2,
        bins,
        *strides,
        **flags,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        BLOCK_S=next_pow2(S),
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return hist, pmin


def bucket_counts(x, f=None, mask=None, bins: int = 20, **config) -> torch.Tensor:
    """Per-(sample, channel) bin counts of the split path, int32 [B, D, bins] (for tests)."""
    return _split_counts(x, f, mask, bins, **config)[0][0]


def entropy_from_counts(
    hist: torch.Tensor, paper_exact: bool = False, pmin: torch.Tensor | None = None
) -> torch.Tensor:
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
        hist,
        pmin,
        out,
        D,
        S,
        bins,
        PAPER_EXACT=bool(paper_exact),
        BLOCK_D=block_d,
        BLOCK_BINS=block_bins,
        BLOCK_S=next_pow2(S),
        num_warps=4,
    )
    return out


def _bucket(
    x,
    f,
    mask,
    bins,
    paper_exact,
    pair,
    *,
    fused: bool | None = None,
    block_t: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    **split_config,
):
    B, T, D = x.shape
    if fused is None:
        fused = _use_fused(B, T, D, bins, block_d or 64, x.device)
    if fused:
        # 256 threads, [32, 64] tiles: 8 channels x 1 token per thread, 16-byte bf16 loads,
        # 5 x 8 packed counters for 20 bins; 128 registers on sm_90 (ptxas), 2 programs per SM.
        # The pair counts X and Y: [16, 64] tiles keep it at 183 registers without spills.
        bt = block_t or (16 if pair else 32)
        return _fused(
            x,
            f,
            mask,
            bins,
            paper_exact,
            pair,
            block_t=bt,
            block_d=block_d or 64,
            num_warps=num_warps or 8,
        )
    cfg = {
        k: v
        for k, v in dict(block_t=block_t, block_d=block_d, num_warps=num_warps).items()
        if v is not None
    }
    hist, pmin = _split_counts(x, f, mask, bins, pair, **cfg, **split_config)
    hs = tuple(entropy_from_counts(hist[i], paper_exact, pmin[i]) for i in range(hist.shape[0]))
    return hs if pair else hs[0]


def bucket(
    x, f=None, mask=None, bins: int = 20, paper_exact: bool = False, **config
) -> torch.Tensor:
    """Per-channel histogram entropy H_d, fp64 [B, D], of Y = x (+ f) over valid tokens.

    x, f: [B, T, D] fp32/fp16/bf16, any strides; mask: [B, T] bool or None. H_d = NaN for
    a (sample, channel) whose Y holds NaN/Inf among the valid tokens. ``config``: fused
    (None: chosen by shape), block_t, block_d, num_warps, splits (split path).
    """
    return _bucket(x, f, mask, bins, paper_exact, False, **config)


def bucket_pair(
    x, f, mask=None, bins: int = 20, paper_exact: bool = False, **config
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_d of Y = x + f, H_d of x), fp64 [B, D] each, from one read of x and f per pass;
    each bit for bit what :func:`bucket` gives."""
    return _bucket(x, f, mask, bins, paper_exact, True, **config)


def bucket_cosine(
    x, f, c, mask=None, bins: int = 20, paper_exact: bool = False, *, fused: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H_d of Y fp64 [B, D], sum over valid tokens of cos(partner_t, Y_t) fp64 [B], count
    fp64 [B]): Y = x + f with partner x (f given) or Y = x with partner c (c given). On the
    fused path the cosine's sums come from the bucket kernel's first pass (no read of their
    own); elsewhere (the split path) bucket, then the cosine kernel. H_d is bit for bit
    :func:`bucket`'s."""
    from entrodrop_fast.ops.triton.cosine import cosine

    B, T, D = x.shape
    for name, t in (("f", f), ("c", c)):
        if t is not None and t.shape != x.shape:  # the kernel reads t with x's shape
            raise ValueError(
                f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}"
            )
    if fused is None:
        fused = _use_fused(B, T, D, bins, 64, x.device)
    if not fused or bins > 32:
        h = _bucket(x, f, mask, bins, paper_exact, False, fused=False if bins > 32 else fused)
        s, n = cosine(x, f, mask, True) if f is not None else cosine(c, x, mask, False)
        return h, s, n
    h, part = _fused(
        x, f, mask, bins, paper_exact, False, block_t=32, block_d=64, num_warps=8,
        cos=1 if f is not None else 2, c=c,
    )  # fmt: skip
    s, n = cosine_from_partials(part, mask)
    return h, s, n
