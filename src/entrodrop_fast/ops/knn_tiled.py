"""Exact k-th-nearest-neighbour distances from tiled GEMMs, in plain torch (any device).

The GPU path of ``knn_kth_distance`` (cuda_backend): row blocks x column blocks of
approximate squared distances ``a_ij = |v_i|^2 + |v_j|^2 - 2 v_i . v_j`` from ``torch.mm``
in fp32 (cuBLAS on GPU), each row keeping its ``m`` smallest values seen so far (``topk``
over ``[running m | new tile]`` per column tile), then the exact fp64 refinement of the CPU
path (csrc/knn_cpu.cpp): with ``|a_ij - t_ij| <= delta`` (t the true squared distance),
candidates with ``a < A_k - 2 delta`` are surely among the k nearest, those with
``a > A_k + 2 delta`` surely not, and the k-th distance is the ``(k - sure)``-th smallest
*exact* fp64 distance among the candidates in the band between (a handful per row),
recomputed from the original rows. Memory: O(N m + tile), never the N x N matrix.

Precision: the effective vectors are ``v = (x - mean) * 2^-e`` (fp64 centring, then a
power-of-two scale putting max |v| in [0.5, 1), then fp32, per tile): a large component
shared by all rows (LLM "massive activations") then does not cancel in the Gram trick, and
neither huge nor tiny rows leave fp32's range. Rows whose list of m candidates does not
reach past the band (many near-ties: duplicated rows) are answered from exact fp64
distances to every row instead (``torch.cdist`` without the GEMM trick, a few rows at a time).
"""

from __future__ import annotations

import math

import torch

_FP32_EPS = float(torch.finfo(torch.float32).eps)
# Elements of the [R, C] distance tile (fp32) and of the fp64 temporaries of the exact
# passes: 2^24 x 4 bytes = 64 MiB per tile.
TILE_ELEMENTS = 1 << 24
EXACT_ELEMENTS = 1 << 23
MAX_COL_BLOCK = 4096


def candidates(N: int, k: int) -> int:
    """m: the candidates each row keeps (the k nearest, plus room for the exact band)."""
    return min(N - 1, max(k + 16, 2 * k))


def _blocks(N: int, m: int, row_block: int | None, col_block: int | None) -> tuple[int, int]:
    C = col_block or min(N, MAX_COL_BLOCK)
    R = row_block or min(N, max(1, TILE_ELEMENTS // (C + m)))
    return max(1, int(R)), max(1, int(C))


def _gemm_eps(device: torch.device) -> float:
    """Unit roundoff of torch.mm on fp32 tensors here: fp32's, or wider where the user let
    CUDA GEMMs round their inputs (TF32: 10 mantissa bits; precision "medium": bf16's 7)."""
    if device.type != "cuda":
        return _FP32_EPS
    prec = torch.get_float32_matmul_precision()
    if prec == "medium":
        return 2.0**-8
    if prec == "high" or torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-10
    return _FP32_EPS


def _effective(blk: torch.Tensor, mu: torch.Tensor, scale: float) -> torch.Tensor:
    """v = (blk - mu) * scale in fp32 [n, D], the subtraction in fp64 (cannot overflow)."""
    return ((blk.double() - mu) * scale).float()


def _exact_pairs(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """|x_i - x_j| in fp64 for index pairs (i, j) [P]: exact differences, chunked."""
    D = x.shape[1]
    out = torch.empty(i.numel(), dtype=torch.float64, device=x.device)
    step = max(1, EXACT_ELEMENTS // max(1, D))
    for s in range(0, i.numel(), step):
        a = x[i[s : s + step]].double()  # (p, D)
        a -= x[j[s : s + step]].double()
        out[s : s + step] = torch.linalg.vector_norm(a, dim=1)
    return out


def _exact_rows(x: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest exact fp64 distance from each of ``rows`` to every other row."""
    N, D = x.shape
    out = torch.empty(rows.numel(), dtype=torch.float64, device=x.device)
    cstep = max(1, min(N, EXACT_ELEMENTS // max(1, D)))
    rstep = max(1, EXACT_ELEMENTS // N)
    for s in range(0, rows.numel(), rstep):
        r = rows[s : s + rstep]
        a = x[r].double()  # (p, D)
        d = torch.empty(r.numel(), N, dtype=torch.float64, device=x.device)
        for c0 in range(0, N, cstep):
            b = x[c0 : c0 + cstep].double()
            d[:, c0 : c0 + cstep] = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
        d[torch.arange(r.numel(), device=x.device), r] = float("inf")  # self
        out[s : s + rstep] = d.kthvalue(k, dim=1).values
    return out


def knn_kth_distance_tiled(
    x: torch.Tensor, k: int, *, row_block: int | None = None, col_block: int | None = None
) -> tuple[torch.Tensor, int]:
    """(distances fp64 [N], number of rows answered by the exact whole-row fallback).

    See :func:`knn_kth_distance`; ``row_block`` / ``col_block`` override the tile sides.
    The fallback count is a device-to-host read (a sync); knn_kth_distance returns it only
    for tests.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, D], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    N, D = x.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < N:
        raise ValueError(f"k must be an integer in [1, N - 1] = [1, {N - 1}], got {k!r}")
    if D == 0:
        return torch.zeros(N, dtype=torch.float64, device=x.device), 0
    dev = x.device
    m = candidates(N, k)
    R, C = _blocks(N, m, row_block, col_block)

    # centre (fp64 mean) and scale by 2^-e so that max |v| is in [0.5, 1)
    mu = x.sum(0, dtype=torch.float64) / N  # (D,)
    # one row block (N <= R, e.g. [2048, 4096]): the centred rows once, fp64 [N, D] (the size
    # of one tile's worth of rows); else recomputed per block
    whole = x.double() - mu if R >= N else None
    if whole is not None:
        top_t = whole.abs().amax()
    else:
        top_t = torch.zeros((), dtype=torch.float64, device=dev)
        for r0 in range(0, N, R):
            top_t = torch.maximum(top_t, (x[r0 : r0 + R].double() - mu).abs().amax())
    top = float(top_t)  # a host sync: the scale and the error bound are host numbers
    e = math.frexp(top)[1] if top > 0 and math.isfinite(top) else 0
    scale = math.ldexp(1.0, -e)
    v_all = None
    if whole is not None:
        v_all = (whole * scale).float()  # (N, D)
        del whole

    def eff(a: int, b: int) -> torch.Tensor:
        return v_all[a:b] if v_all is not None else _effective(x[a:b], mu, scale)

    sqn = torch.empty(N, dtype=torch.float32, device=dev)  # |v_i|^2 (fp64 sum, rounded)
    for r0 in range(0, N, R):
        sqn[r0 : r0 + R] = eff(r0, r0 + R).double().square().sum(1).float()
    smax = float(sqn.max())
    # error of the fp32 expansion (as csrc/knn_cpu.cpp): ~sqrt(D) roundings of eps |v|^2 in
    # the dot product plus a few in the norms and the combination, with a wide margin, plus
    # D subnormal roundings of 2^-149; TF32 GEMMs round the inputs to 10 mantissa bits.
    eps = _gemm_eps(dev)
    delta = 4.0 * (D**0.5 + 8.0) * eps * smax + 4.0 * D * 2.0**-149

    vals = torch.empty(N, m, dtype=torch.float32, device=dev)
    ids = torch.empty(N, m, dtype=torch.int64, device=dev)
    inf = float("inf")
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        vr = eff(r0, r1)  # (R, D)
        buf = torch.empty(r1 - r0, m + C, dtype=torch.float32, device=dev)  # [running m | tile]
        ibuf = torch.empty(r1 - r0, m + C, dtype=torch.int64, device=dev)
        buf[:, :m] = inf
        ibuf[:, :m] = -1
        for c0 in range(0, N, C):
            c1 = min(N, c0 + C)
            w = c1 - c0
            vc = vr if (c0, c1) == (r0, r1) else eff(c0, c1)  # (C, D)
            g = torch.mm(vr, vc.t())  # (R, C) fp32
            a = buf[:, m : m + w]
            torch.add(sqn[r0:r1, None], sqn[None, c0:c1], out=a)
            a.sub_(g, alpha=2.0)  # (|v_i|^2 + |v_j|^2) - 2 v_i.v_j, fp32; 2g is exact
            torch.diagonal(a, offset=r0 - c0).fill_(inf)  # row i against itself
            ibuf[:, m : m + w] = torch.arange(c0, c1, device=dev)
            best, pos = torch.topk(buf[:, : m + w], m, dim=1, largest=False, sorted=False)
            ibuf[:, :m] = ibuf[:, : m + w].gather(1, pos)
            buf[:, :m] = best
        vals[r0:r1] = buf[:, :m]
        ids[r0:r1] = ibuf[:, :m]
    vals, order = vals.sort(dim=1)  # (N, m) ascending
    ids = ids.gather(1, order)

    ak = vals[:, k - 1].double()
    lo, hi = ak - 2.0 * delta, ak + 2.0 * delta
    v64 = vals.double()
    sure = (v64 < lo[:, None]).sum(1)
    band = (v64 >= lo[:, None]) & (v64 <= hi[:, None])
    want = k - sure  # 1-based rank of the k-th distance within the band
    # every candidate within the band is in the list: all other rows are, or the m-th is past it
    complete = torch.full_like(ak, True, dtype=torch.bool) if m == N - 1 else v64[:, m - 1] > hi
    ok = complete & (want >= 1) & (want <= band.sum(1))
    band &= ok[:, None]

    exact = torch.full((N, m), inf, dtype=torch.float64, device=dev)
    pi, pj = band.nonzero(as_tuple=True)
    if pi.numel():
        exact[pi, pj] = _exact_pairs(x, pi, ids[pi, pj])
    exact = exact.sort(dim=1).values
    out = exact.gather(1, (want.clamp(1, m) - 1)[:, None]).squeeze(1)
    rest = (~ok).nonzero().flatten()
    n_rest = int(rest.numel())
    if n_rest:
        out[rest] = _exact_rows(x, rest, k)
    return out, n_rest


def knn_kth_distance(x: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance from each row of x to its k-th nearest *other* row.

    x: [N, D] float32/float16/bfloat16 (float64 accepted), any strides, any device; k in
    [1, N - 1]. Returns float64 [N] on x's device, exact to ~1e-15 relative (fp64 distances
    from the original values for every row whose rank could be in doubt). Memory O(N k +
    one tile of up to 2^24 fp32 values); the N x N matrix is never formed. Raises
    ValueError for a bad shape or k, TypeError for another dtype. Finite inputs are assumed
    (the API checks); NaN/Inf give meaningless numbers, never an out-of-bounds access.
    """
    return knn_kth_distance_tiled(x, k)[0]
