"""Distance from each row to its k-th nearest other row, tiled, never the N x N matrix.

``_knn_kernel``: one program per BLOCK_M query rows keeps the KP (power of two >= k)
smallest squared distances seen so far, sorted ascending, in registers. For each tile of
KP candidate rows it computes exact squared differences (not |a|^2 + |b|^2 - 2ab, which
cancels for near neighbours) in BLOCK_D chunks, sorts the tile descending and takes the
elementwise minimum with the buffer: the lower half of a bitonic merge, i.e. the KP
smallest of both. Memory: O(N + BLOCK_M * KP) per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrodrop_fast.ops.triton._common import cdiv, next_pow2


@triton.jit
def _rows(x_ptr, rows64, rmask, offs_d64, dm, sxn, sxd, inv):
    """Rows rows64 (where rmask) of x, channels offs_d64 (where dm), in fp32 times inv; 0
    elsewhere."""
    r = tl.load(
        x_ptr + rows64[:, None] * sxn + offs_d64[None, :] * sxd,
        mask=rmask[:, None] & dm[None, :],
        other=0.0,
    )
    return r.to(tl.float32) * inv


@triton.jit
def _knn_kernel(
    x_ptr,
    out_ptr,
    scale_ptr,  # x: [N, D]; out: [N] fp64; scale: [2] fp64 (2^-e, 2^e)
    N,
    D,
    k,
    sxn,
    sxd,
    BLOCK_M: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    inv = tl.load(scale_ptr).to(tl.float32)  # rows read as x * 2^-e: no fp32 overflow
    best = tl.full([BLOCK_M, KP], float("inf"), dtype=tl.float32)
    for c0 in range(0, N, KP):
        cols = c0 + tl.arange(0, KP)
        cmask = cols < N
        cols64 = cols.to(tl.int64)
        d2 = tl.zeros([BLOCK_M, KP], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dm = offs_d < D
            offs_d64 = offs_d.to(tl.int64)
            a = _rows(x_ptr, rows64, rmask, offs_d64, dm, sxn, sxd, inv)
            c = _rows(x_ptr, cols64, cmask, offs_d64, dm, sxn, sxd, inv)
            diff = a[:, None, :] - c[None, :, :]  # (BLOCK_M, KP, BLOCK_D)
            d2 += tl.sum(diff * diff, axis=2)
        bad = (rows[:, None] == cols[None, :]) | (~cmask)[None, :]
        d2 = tl.where(bad, float("inf"), d2)
        cand = tl.sort(d2, dim=1, descending=True)
        best = tl.sort(tl.minimum(best, cand), dim=1)
    slot = tl.arange(0, KP)
    kth = tl.sum(tl.where(slot[None, :] == k - 1, best, 0.0), axis=1)
    tl.store(out_ptr + rows64, tl.sqrt(kth.to(tl.float64)) * tl.load(scale_ptr + 1), mask=rmask)


# ---------------------------------------------------------------- launchers


def knn_kth_distance(
    x, k: int, *, block_m: int = 16, block_d: int = 32, num_warps: int = 4
) -> torch.Tensor:
    """x: [N, D] (any strides, fp32/fp16/bf16); float64 [N]: distance to the k-th nearest
    other row."""
    N, D = x.shape
    kp = max(16, next_pow2(k))
    block_d = min(block_d, max(16, next_pow2(D)))
    out = torch.empty((N,), dtype=torch.float64, device=x.device)
    # Squared differences of rows beyond ~1e19 (or below ~1e-19) over- (under-) flow fp32:
    # the kernel reads the rows scaled by 2^-e, max |x| 2^-e in [0.5, 1), and scales the
    # distances back (exact powers of two; computed on the device, no host sync)
    e = torch.frexp(torch.linalg.vector_norm(x, float("inf")).double()).exponent.to(torch.int64)
    e = e.clamp(-126, 128)  # 2^-e within fp32's range (subnormal x: scaled by 2^126 at most)
    scale = (torch.stack([1023 - e, 1023 + e]) << 52).view(torch.float64)  # exactly 2^-e, 2^e
    _knn_kernel[(cdiv(N, block_m),)](
        x,
        out,
        scale,
        N,
        D,
        k,
        x.stride(0),
        x.stride(1),
        BLOCK_M=block_m,
        KP=kp,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out
