"""Device helpers shared by the kernels that stream [BLOCK_T, BLOCK_D] tiles of x (and f).

The loops keep the *next* tile's raw loads in flight while they compute on the current
one (``load_tile`` one or two tiles ahead, carried through the loop): a memory-bound kernel
with two programs of 8 warps per SM otherwise has only one tile per program in flight
(8 KiB per SM at [32, 64] bf16 x + f), a third of what H200's bandwidth-latency product
asks for.

A kernel names what it streams once, as a tuple ``src = (x_ptr, f_ptr, m_ptr, b, sxb, sxt,
sxd, sfb, sft, sfd, smb, smt)``: the x, f and token-mask pointers, the sample b (int64)
and the element strides of x [B, T, D], f [B, T, D] and the mask [B, T] (bytes). A raw tile
is a tuple ``(xr, fr, tmask)``: x and f [BLOCK_T, BLOCK_D] in their own dtype (fr = xr
without f), tmask [BLOCK_T] the tokens that count. The per-slot range state is a tuple
``(mn, mx, z)`` of fp32 [BLOCK_T, BLOCK_D]: running min, max and the sum of v * 0, which
is 0, or NaN exactly when a valid value is not finite (the kernels' non-finite report).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def channel_block(D, BLOCK_D: tl.constexpr):
    """This program's channels and sample, for a grid (blocks of BLOCK_D channels, samples).
    Returns (b int64, offs_d int32 [BLOCK_D], dmask, offs_d as int64)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    return b, offs_d, offs_d < D, offs_d.to(tl.int64)


@triton.jit
def split_block(D, BLOCK_D: tl.constexpr):
    """This program's channels, split and sample, for a grid (blocks of BLOCK_D channels,
    splits of the tokens, samples). Returns (b int64, dmask [BLOCK_D], offs_d int64, split)."""
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    return b, offs_d < D, offs_d.to(tl.int64), split


@triton.jit
def token_range(split, rows_per_split, T):
    """(t_begin, t_end): the tokens [t_begin, t_end) of split ``split`` of the T tokens."""
    t_begin = split * rows_per_split
    return t_begin, tl.minimum(t_begin + rows_per_split, T)


@triton.jit
def token_keep(m_ptr, b, offs_t64, tmask, smb, smt):
    """tmask & the token mask of sample b at tokens offs_t64 (read only where tmask)."""
    keep = tl.load(m_ptr + b * smb + offs_t64 * smt, mask=tmask, other=0)
    return tmask & (keep != 0)


@triton.jit
def load_raw(src, offs_t, tmask, offs_d64, dmask, HAS_F: tl.constexpr, HAS_MASK: tl.constexpr):
    """The raw tile (xr, fr, tmask) of ``src`` at tokens offs_t where tmask and channels
    offs_d64 where dmask: x and f in their own dtype (fr = xr without f), 0 where not valid
    (masked-out or padded tokens are not read)."""
    x_ptr, f_ptr, m_ptr, b, sxb, sxt, sxd, sfb, sft, sfd, smb, smt = src
    offs_t64 = offs_t.to(tl.int64)
    if HAS_MASK:
        tmask = token_keep(m_ptr, b, offs_t64, tmask, smb, smt)
    valid = tmask[:, None] & dmask[None, :]
    xr = tl.load(
        x_ptr + b * sxb + offs_t64[:, None] * sxt + offs_d64[None, :] * sxd, mask=valid, other=0.0
    )
    fr = xr
    if HAS_F:
        fr = tl.load(
            f_ptr + b * sfb + offs_t64[:, None] * sft + offs_d64[None, :] * sfd,
            mask=valid,
            other=0.0,
        )
    return xr, fr, tmask


@triton.jit
def load_tile(
    src,
    t,
    t_end,
    offs_d64,
    dmask,
    HAS_F: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """The raw tile of tokens [t, t + BLOCK_T) below t_end (see :func:`load_raw`)."""
    offs_t = t + tl.arange(0, BLOCK_T)
    return load_raw(src, offs_t, offs_t < t_end, offs_d64, dmask, HAS_F, HAS_MASK)


@triton.jit
def widen(raw, dmask, HAS_F: tl.constexpr):
    """(x, y, valid) in fp32 from a raw tile: y = x + f added in fp32 (= x without f)."""
    xr, fr, tmask = raw
    xv = xr.to(tl.float32)
    y = xv
    if HAS_F:
        y = xv + fr.to(tl.float32)
    return xv, y, tmask[:, None] & dmask[None, :]


@triton.jit
def range_init(BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """An empty range state (mn, mx, z): +inf, -inf and 0 in every slot."""
    mn = tl.full([BLOCK_T, BLOCK_D], float("inf"), dtype=tl.float32)
    mx = tl.full([BLOCK_T, BLOCK_D], float("-inf"), dtype=tl.float32)
    return mn, mx, tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)


@triton.jit
def range_add(state, v, valid):
    """The range state with the fp32 tile v added where valid (z: every v, see above)."""
    mn, mx, z = state
    mn = tl.minimum(mn, tl.where(valid, v, float("inf")))
    mx = tl.maximum(mx, tl.where(valid, v, float("-inf")))
    z += v * 0.0
    return mn, mx, z


@triton.jit
def range_bad(state):
    """Per channel [BLOCK_D] of a range state: a valid value was NaN/Inf."""
    return tl.sum(state[2], axis=0) != 0.0


@triton.jit
def range_final(state):
    """(min, max, bad) per channel [BLOCK_D] of a range state (min and max are not
    meaningful where bad, see :func:`range_bad`)."""
    mn, mx, _ = state
    bad = range_bad(state)
    return tl.min(mn, axis=0), tl.max(mx, axis=0), bad


@triton.jit
def store_range(pmin_ptr, pmax_ptr, out, state, bad, dmask):
    """Store the range's min and max per channel [BLOCK_D] at pmin_ptr + out / pmax_ptr + out
    (fp32) where dmask: NaN where bad (:func:`range_bad`)."""
    mn, mx, _ = state
    tl.store(pmin_ptr + out, tl.where(bad, float("nan"), tl.min(mn, axis=0)), mask=dmask)
    tl.store(pmax_ptr + out, tl.where(bad, float("nan"), tl.max(mx, axis=0)), mask=dmask)
