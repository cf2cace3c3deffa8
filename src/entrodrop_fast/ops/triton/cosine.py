"""Per-token cosine between X and Y (Y = X + F fused, or Y given), summed per sample.

``_cosine_kernel``: one program per [BLOCK_T] tokens of one sample, looping over the
channels in BLOCK_D chunks and accumulating x.y, |x|^2 and |y|^2 in fp32; it writes
cos per token (0 for masked or padded tokens). The per-sample sum is taken in fp64.
A token whose x or Y (x + f added in fp32, or y) holds NaN/Inf gets cos = NaN (found in
the same pass: a running ``x * 0 + y * 0``), so the sample's sum is NaN when a valid
token has one (docs/CONTRACT.md, "Non-finite values").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrodrop_fast.ops.triton._common import cdiv, mask_arg, next_pow2
from entrodrop_fast.ops.triton._tiles import load_raw, token_keep


@triton.jit
def _cosine_kernel(
    x_ptr,
    o_ptr,
    m_ptr,
    cos_ptr,  # cos: [B, T] fp32
    T,
    D,
    sxb,
    sxt,
    sxd,
    sob,
    sot,
    sod,
    smb,
    smt,
    FUSED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    offs_t64 = offs_t.to(tl.int64)
    src = (x_ptr, o_ptr, m_ptr, b, sxb, sxt, sxd, sob, sot, sod, smb, smt)
    dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    nx = tl.zeros([BLOCK_T], dtype=tl.float32)
    ny = tl.zeros([BLOCK_T], dtype=tl.float32)
    z = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # sum of x * 0 + y * 0: 0, or NaN
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        # x and other as x and f of a tile (the token mask is applied to cos at the end)
        x_raw, o_raw, _ = load_raw(src, offs_t, tmask, offs_d.to(tl.int64), offs_d < D, True, False)
        xv = x_raw.to(tl.float32)
        ov = o_raw.to(tl.float32)
        if FUSED:
            yv = xv + ov
        else:
            yv = ov
        dot += tl.sum(xv * yv, axis=1)
        nx += tl.sum(xv * xv, axis=1)
        ny += tl.sum(yv * yv, axis=1)
        z += xv * 0.0 + yv * 0.0
    cos = dot / tl.maximum(tl.sqrt(nx) * tl.sqrt(ny), 1e-12)
    cos = tl.where(tl.sum(z, axis=1) != 0.0, float("nan"), cos)  # the report: x or Y not finite
    keep = tmask
    if HAS_MASK:
        keep = token_keep(m_ptr, b, offs_t64, tmask, smb, smt)
    tl.store(cos_ptr + b * T + offs_t64, tl.where(keep, cos, 0.0), mask=tmask)


# ---------------------------------------------------------------- launchers


def cosine_per_token(
    x,
    other,
    mask=None,
    fused: bool = True,
    *,
    block_t: int = 16,
    block_d: int = 256,
    num_warps: int = 4,
) -> torch.Tensor:
    """cos(x_t, Y_t) per token, fp32 [B, T] (0 where masked)."""
    B, T, D = x.shape
    block_d = min(block_d, next_pow2(D))
    cos = torch.empty((B, T), dtype=torch.float32, device=x.device)
    mp, smb, smt = mask_arg(x, mask)
    _cosine_kernel[(cdiv(T, block_t), B)](
        x,
        other,
        mp,
        cos,
        T,
        D,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        other.stride(0),
        other.stride(1),
        other.stride(2),
        smb,
        smt,
        FUSED=bool(fused),
        HAS_MASK=mask is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return cos


def cosine(x, other, mask=None, fused: bool = True, **config):
    """(sum over valid tokens of cos(x_t, Y_t) fp64 [B], count fp64 [B]); Y = x + other if
    fused."""
    B, T, _ = x.shape
    total = cosine_per_token(x, other, mask, fused, **config).sum(-1, dtype=torch.float64)
    if mask is None:
        count = torch.full((B,), float(T), dtype=torch.float64, device=x.device)
    else:
        count = mask.sum(-1, dtype=torch.float64)
    return total, count
