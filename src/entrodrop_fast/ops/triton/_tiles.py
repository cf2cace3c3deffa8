"""Device helpers shared by the kernels that stream [BLOCK_T, BLOCK_D] tiles of x (and f).

The loops keep the *next* tile's raw loads in flight while they compute on the current
one (``load_raw`` one or two tiles ahead, carried through the loop): a memory-bound kernel with two
programs of 8 warps per SM otherwise has only one tile per program in flight (8 KiB per SM
at [32, 64] bf16 x + f), a third of what H200's bandwidth-latency product asks for.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_raw(
    x_ptr,
    f_ptr,
    m_ptr,
    b,
    offs_t,
    tmask,
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
    HAS_F: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """(x, f, token mask) of one tile, x and f in their own dtype (f = x without f); 0 where
    not valid (masked-out or padded tokens are not read)."""
    offs_t64 = offs_t.to(tl.int64)
    if HAS_MASK:
        keep = tl.load(m_ptr + b * smb + offs_t64 * smt, mask=tmask, other=0)
        tmask = tmask & (keep != 0)
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
def widen(xr, fr, tmask, dmask, HAS_F: tl.constexpr):
    """(x, y, valid) in fp32 from a raw tile: y = x + f added in fp32 (= x without f)."""
    xv = xr.to(tl.float32)
    y = xv
    if HAS_F:
        y = xv + fr.to(tl.float32)
    return xv, y, tmask[:, None] & dmask[None, :]
