"""The ``cpp`` backend: the compiled CPU kernels of ``entrodrop_fast._C`` (docs/CONTRACT.md).

Tensors cross to C++ as ``data_ptr`` + shape + strides (in elements) + a dtype code; the
outputs are torch tensors allocated here and filled in place. CPU tensors only: the CUDA
kernels are the ``cuda`` backend (ops/cuda_backend.py; ``backend="cpp"`` on CUDA tensors is
resolved to it in ops/backends.py). The C++ kernels run on ``torch.get_num_threads()`` threads
of torch's own OpenMP team where torch loaded one, else of a pool of their own
(csrc/threads_cpu.cpp; ``ENTRODROP_THREADS=pool`` forces the pool), and release the GIL.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from entrodrop_fast import _ext

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Kernels that report NaN/Inf in Y = x (+ f) among the valid tokens through their outputs
# (docs/CONTRACT.md, "Non-finite values"), per device type: the API then skips its separate
# validation pass and checks the outputs instead.
REPORTS_NONFINITE = {
    "cpu": frozenset({"moments", "bucket", "cosine", "bucket_cosine", "knn_terms"})
}
# Ops with a pair kernel (<op>_pair: the op of Y = x + f and of x from one read of x and f,
# for delta_entropy), per device type.
PAIRS = {"cpu": frozenset({"moments", "bucket"})}

# knn: the Gram matrix is computed in T x T tiles on and above the diagonal into one reused
# buffer (T ~ KNN_TILE_FRACTION x N, so the tile is ~2.5% of N x N), and each row keeps a
# candidate list of KNN_CAP_FACTOR x k entries (8 bytes each): peak extra memory is
# O(T^2 + N k), ~8% of the N x N matrix at N = 2048, k = 25.
KNN_TILE_FRACTION = 0.16
KNN_MIN_TILE = 128
KNN_MAX_TILE = 4096
KNN_CAP_FACTOR = 2
# Samples of up to this many valid tokens (an LLM calibration window: 256 in the paper) are
# done entirely in C++ by knn_fused_cpu, the whole batch in one call: its own Gram
# micro-kernel on the centred rows, the N x N fp32 matrix (<= 1 MiB), a sorting network per
# 16 rows, the same exact fp64 band (csrc/knn_fused_cpu.cpp). Read from the extension
# (csrc/entrodrop.h kKnnFusedMaxN); None when it is not built (then this backend is unavailable).
KNN_FUSED_MAX_N: int | None = _ext.require().KNN_FUSED_MAX_N if _ext.available() else None
# _knn (larger samples): up to this many rows the whole Gram matrix is one block of whole
# rows for knn_select_cpu (the tile machinery's fixed costs would dominate).
KNN_WHOLE_ROWS = 512
# Channels whose mean square exceeds KNN_HEAVY_RATIO x the median are "heavy" (LLM massive
# activations); they leave the big GEMM and enter as a small centred [N, E] copy, together
# with the channels of gaps shorter than KNN_MIN_RANGE (not worth a GEMM call).
KNN_HEAVY_RATIO = 64.0
KNN_MAX_HEAVY = 32
KNN_MIN_RANGE = 64


def available() -> tuple[bool, str]:
    if not _ext.available():
        return False, f"the compiled extension is not available ({_ext.error()}); {_ext.BUILD_HINT}"
    return True, ""


def devices() -> set[str]:
    return {"cpu"} if _ext.available() else set()


def _code(x: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[x.dtype]
    except KeyError:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}") from None


def _arg(t: torch.Tensor | None) -> tuple[int, list[int]]:
    """(pointer, strides) of an optional tensor; (0, []) for None."""
    if t is None:
        return 0, []
    return t.data_ptr(), list(t.stride())


def _mask_arg(mask: torch.Tensor | None) -> tuple[int, list[int]]:
    if mask is None:
        return 0, []
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be torch.bool, got {mask.dtype}")
    return mask.data_ptr(), list(mask.stride())


# What every streaming kernel of the extension takes first, in this order: the pointers of x,
# f (or the other tensor; 0 for none) and mask (0 for none), x's dtype code, x's shape
# [B, T, D], then the strides of x, f and mask (in elements; [] for an absent one).
_Inputs = tuple[int, int, int, int, list[int], list[int], list[int], list[int]]


def _inputs(x: torch.Tensor, f: torch.Tensor | None, mask: torch.Tensor | None) -> _Inputs:
    """The leading arguments of a kernel call on x [B, T, D], f (or None) and mask (or None).

    Raises ValueError for a mask that is not torch.bool or an x of another dtype than
    float32 / float16 / bfloat16."""
    fp, fs = _arg(f)
    mp, ms = _mask_arg(mask)
    return x.data_ptr(), fp, mp, _code(x), list(x.shape), list(x.stride()), fs, ms


# ENTRODROP_THREADS (csrc/threads_cpu.cpp): unset / auto: torch's OpenMP team while it keeps
# up, else a pool of the package's own; omp: the team always; pool: the pool always; std:
# std::threads per call. (A forked child, or a torch without OpenMP: the pool.)
THREAD_MODES = ("", "auto", "omp", "pool", "std")
_thread_mode_checked = False


def _outside_package() -> int:
    """The stacklevel of warnings.warn, called here, that names the first caller outside the
    package."""
    import sys
    import types

    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(root):
        frame, level = frame.f_back, level + 1
    return level


def _threads() -> int:
    global _thread_mode_checked
    if not _thread_mode_checked:
        _thread_mode_checked = True
        mode = os.environ.get("ENTRODROP_THREADS", "")
        if mode not in THREAD_MODES:
            warnings.warn(
                f"ENTRODROP_THREADS={mode!r} is not one of auto, omp, pool, std (lower case): "
                "the CPU kernels use the default, auto (torch's OpenMP team while it keeps up, "
                "else the package's own pool)",
                RuntimeWarning,
                stacklevel=_outside_package(),
            )
    return max(1, torch.get_num_threads())


def moments(
    x: torch.Tensor, f: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """count [B] f64, mean/m2 [B, D] f64, min/max [B, D] f32 of Y = x (+ f); x: [B, T, D]."""
    C = _ext.require()
    B, _, D = x.shape
    count = torch.empty(B, dtype=torch.float64)
    mean = torch.empty(B, D, dtype=torch.float64)
    m2 = torch.empty(B, D, dtype=torch.float64)
    mn = torch.empty(B, D, dtype=torch.float32)
    mx = torch.empty(B, D, dtype=torch.float32)
    C.moments_cpu(
        *_inputs(x, f, mask),
        count.data_ptr(),
        mean.data_ptr(),
        m2.data_ptr(),
        mn.data_ptr(),
        mx.data_ptr(),
        _threads(),
    )
    return {"count": count, "mean": mean, "m2": m2, "min": mn, "max": mx}


def moments_pair(
    x: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(moments of Y = x + f, moments of x) from one read of x and f; CPU tensors."""
    C = _ext.require()
    B, _, D = x.shape
    count = torch.empty(B, dtype=torch.float64)
    outs = []
    for _ in range(2):
        outs.append(
            {
                "count": count,
                "mean": torch.empty(B, D, dtype=torch.float64),
                "m2": torch.empty(B, D, dtype=torch.float64),
                "min": torch.empty(B, D, dtype=torch.float32),
                "max": torch.empty(B, D, dtype=torch.float32),
            }
        )
    ptrs = [o[k].data_ptr() for o in outs for k in ("mean", "m2", "min", "max")]
    C.moments_pair_cpu(
        *_inputs(x, f, mask),
        count.data_ptr(),
        *ptrs,
        _threads(),
    )
    return outs[0], outs[1]


def bucket_pair(
    x: torch.Tensor,
    f: torch.Tensor,
    mask: torch.Tensor | None = None,
    bins: int = 20,
    paper_exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_d of Y = x + f, H_d of x), fp64 [B, D] each, from one read of x and f; CPU tensors."""
    C = _ext.require()
    B, _, D = x.shape
    hy = torch.empty(B, D, dtype=torch.float64)
    hx = torch.empty(B, D, dtype=torch.float64)
    C.bucket_pair_cpu(
        *_inputs(x, f, mask),
        int(bins),
        bool(paper_exact),
        hy.data_ptr(),
        hx.data_ptr(),
        _threads(),
    )
    return hy, hx


def bucket(
    x: torch.Tensor,
    f: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    bins: int = 20,
    paper_exact: bool = False,
) -> torch.Tensor:
    """Per-channel histogram entropy H_d, fp64 [B, D]; x: [B, T, D]."""
    C = _ext.require()
    B, _, D = x.shape
    out = torch.empty(B, D, dtype=torch.float64)
    C.bucket_cpu(
        *_inputs(x, f, mask),
        int(bins),
        bool(paper_exact),
        out.data_ptr(),
        _threads(),
    )
    return out


def bucket_cosine(
    x: torch.Tensor,
    f: torch.Tensor | None,
    c: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    bins: int = 20,
    paper_exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H_d of Y, sum over valid tokens of cos(partner_t, Y_t), count): fp64 [B, D], [B], [B];
    Y = x + f with partner x (f given), or Y = x with partner c (c given); one read of x, f
    and c. CPU tensors of one dtype."""
    C = _ext.require()
    for name, t in (("f", f), ("c", c)):
        if t is not None and t.shape != x.shape:  # the kernel reads t with x's shape
            raise ValueError(
                f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}"
            )
    if c is not None and c.dtype != x.dtype:  # the API checks this; read both as fp32 (exact)
        x, c = x.float(), c.float()
    if f is not None and f.dtype != x.dtype:
        x, f = x.float(), f.float()
    B, _, D = x.shape
    out = torch.empty(B, D, dtype=torch.float64)
    s = torch.empty(B, dtype=torch.float64)
    n = torch.empty(B, dtype=torch.float64)
    xp, fp, mp, code, shape, xs, fs, ms = _inputs(x, f, mask)
    cp, cs = _arg(c)
    C.bucket_cosine_cpu(
        xp, fp, cp, mp, code, shape, xs, fs, cs, ms,
        int(bins),
        bool(paper_exact),
        out.data_ptr(),
        s.data_ptr(),
        n.data_ptr(),
        _threads(),
    )  # fmt: skip
    return out, s, n


def cosine(
    x: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None = None, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over valid tokens of cos(x_t, Y_t), count), fp64 [B] each; Y = x + other if fused."""
    C = _ext.require()
    if other.dtype != x.dtype:  # the API checks this for f; a y given on its own may differ
        x, other = x.float(), other.float()
    B = x.shape[0]
    s = torch.empty(B, dtype=torch.float64)
    c = torch.empty(B, dtype=torch.float64)
    C.cosine_cpu(
        *_inputs(x, other, mask),
        bool(fused),
        s.data_ptr(),
        c.data_ptr(),
        _threads(),
    )
    return s, c


def _knn_split(xf: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """(ranges, U): contiguous channel ranges for the big GEMM, and the centred heavy /
    leftover channels as a small [N, E] fp32 copy (E <= KNN_MAX_HEAVY + gaps)."""
    N, D = xf.shape
    step = max(1, N // 256)  # massive channels show in every row: a row sample finds them
    xs = xf[::step]
    ms = torch.linalg.vector_norm(
        xs, dim=0
    ).square()  # (D,) squared column norms, no [n, D] temporary
    top = torch.topk(ms, min(KNN_MAX_HEAVY, D))
    thr = KNN_HEAVY_RATIO * float(ms.median())
    heavy = sorted(top.indices[top.values > thr].tolist())
    ranges: list[tuple[int, int]] = []
    small: list[int] = []
    start = 0
    for c in [*heavy, D]:
        a = -(-start // 16) * 16  # GEMM ranges start on a 64-byte boundary (BLAS speed)
        if c - a >= KNN_MIN_RANGE:
            ranges.append((a, c))
            small.extend(range(start, a))
        else:
            small.extend(range(start, c))
        start = c + 1
    cols = sorted(set(small) | set(heavy))
    if not ranges:  # tiny D: everything in the small copy
        cols = list(range(D))
    u = xf[:, cols] if cols else xf.new_zeros(N, 0)
    u = u - u.mean(0)  # centring makes |u_i - u_j|^2 via the Gram trick cancellation-free
    return ranges, u.contiguous()


def _gram_into(
    buf: torch.Tensor, xf: torch.Tensor, u: torch.Tensor, ranges, rows, cols
) -> torch.Tensor:
    """v[rows] . v[cols]^T into the front of the flat buffer, as a contiguous [nr, nc] view
    (v = x on `ranges` plus the centred small copy u; rows/cols: slices or index tensors)."""
    a_rows = xf[rows]
    b_rows = xf[cols]
    g = buf[: a_rows.shape[0] * b_rows.shape[0]].view(a_rows.shape[0], b_rows.shape[0])
    first = True
    for a, b in ranges:
        if first:
            torch.mm(a_rows[:, a:b], b_rows[:, a:b].t(), out=g)
        else:
            g.addmm_(a_rows[:, a:b], b_rows[:, a:b].t())
        first = False
    if first:
        torch.mm(u[rows], u[cols].t(), out=g)
    elif u.shape[1]:
        g.addmm_(u[rows], u[cols].t())
    return g


def knn_tile_side(N: int) -> int:
    t = int(KNN_TILE_FRACTION * N) // 64 * 64
    return min(N, max(KNN_MIN_TILE, min(KNN_MAX_TILE, t)))


# The fp32 Gram product needs the effective vectors' largest squared norm `smax` in a range
# where neither it (<= 4 smax per entry) overflows fp32 nor its products fall into
# subnormals (absolute error D * 2^-149 against the bound delta ~ sqrt(D) eps smax).
# Outside it the rows are scaled by a power of two (exact) and the distances scaled back.
KNN_SMAX_RANGE = (2.0**-90, 2.0**120)


def knn_kth_distance(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x [N, D] to its k-th nearest other row, fp64 [N]."""
    if KNN_FUSED_MAX_N is not None and x.shape[0] <= KNN_FUSED_MAX_N:
        N = x.shape[0]
        if not 1 <= k < N:
            raise ValueError(f"k must be in [1, N - 1] = [1, {N - 1}], got {k}")
        return knn_radii(x.unsqueeze(0), None, None, k)[0][0]
    return _knn(x, k)[0]


def knn_radii(
    x: torch.Tensor, f: torch.Tensor | None, mask: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(radii fp64 [B, T], count fp64 [B], logsum fp64 [B]) of y = x (+ f) [B, T, D] on CPU:
    the distance from each valid token to its k-th nearest other valid token (NaN at masked
    tokens), the number of valid tokens, and the sum over them of ln(r + 1e-10) -- all the
    Kozachenko-Leonenko estimator needs. Samples of up to KNN_FUSED_MAX_N valid tokens run in
    one C++ call (no torch op); larger ones take the tiled path (_knn), one by one. A sample
    whose valid rows of y hold NaN/Inf gets NaN radii and logsum (REPORTS_NONFINITE)."""
    C = _ext.require()
    B, T, D = x.shape
    radii = torch.empty(B, T, dtype=torch.float64)
    count = torch.empty(B, dtype=torch.float64)
    logsum = torch.empty(B, dtype=torch.float64)
    skipped = C.knn_fused_cpu(
        *_inputs(x, f, mask),
        int(k),
        radii.data_ptr(),
        count.data_ptr(),
        logsum.data_ptr(),
        _threads(),
    )
    if skipped:
        for b in range(B):
            if KNN_FUSED_MAX_N is not None and count[b] <= KNN_FUSED_MAX_N:
                continue
            rows = x[b] if f is None else x[b].float() + f[b].float()
            keep = None if mask is None else mask[b]
            rows = rows if keep is None else rows[keep]
            if not bool(torch.isfinite(rows).all()):  # reported as the fused kernel does
                continue  # (radii and logsum stay NaN)
            r = _knn(rows, k)[0]
            if keep is None:
                radii[b] = r
            else:
                radii[b, keep] = r
            logsum[b] = torch.log(r + 1e-10).sum()
    return radii, count, logsum


def knn_terms(
    x: torch.Tensor, f: torch.Tensor | None, mask: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, logsum) fp64 [B] of knn_radii, for the estimator (CPU tensors only)."""
    _, count, logsum = knn_radii(x, f, mask, k)
    return count, logsum


def _knn_scale(xf: torch.Tensor, smax: float) -> int:
    """e such that the rows xf * 2^-e have their largest squared norm near 1 (in [1, 4) from a
    finite smax; from max |x| when the centred copy overflowed: inf or NaN), but no |x|
    beyond 2^120."""
    top = math.frexp(float(torch.linalg.vector_norm(xf, float("inf"))))[1]  # max |x| < 2^top
    e = math.floor(math.log2(smax) / 2) if math.isfinite(smax) else top
    return max(e, top - 120)


def _knn(x: torch.Tensor, k: int, scale_exp: int | None = None) -> tuple[torch.Tensor, int]:
    """(distances, number of rows answered by the whole-row fallback).

    What runs where: torch.mm/addmm (BLAS) compute the Gram matrix in T x T tiles, only on and
    above the diagonal (about half the work of a full N x N product), into one reused
    buffer; C++ (``knn_tile_cpu``) turns each tile into squared distances and offers them
    to both rows involved, each keeping a short list of candidates below a falling
    threshold; ``knn_finish_cpu`` finds the k-th smallest per row and recomputes exactly
    (fp64, from x itself) the distances whose order the fp32 error could change. Rows whose
    lists overflow (many near-ties: duplicated rows) are redone from whole Gram rows
    (``knn_select_cpu``). Precision: LLM activations have a few massive channels whose
    large shared component makes the fp32 Gram trick cancel badly; those channels (and
    short gaps between them) are taken out of the big GEMM and enter as a small centred
    copy U [N, E] (distances are translation invariant), so the error scales with the
    ordinary channels. The N x N matrix is never formed beyond KNN_WHOLE_ROWS rows (where it
    is at most 1 MiB): peak extra memory is the T x T tile, the N x cap lists and O(N*E)
    (plus an fp32 copy of x when x is not already fp32 with channel stride 1 and distinct
    rows). Rows too large or too small for an fp32 Gram product (|x|^2 past 2^120 or
    below 2^-90) are scaled by a power of two 2^-e first (``scale_exp`` = e; exact but for
    values 2^-126 below the largest): the Gram tiles, norms and delta are of the scaled
    rows, the exact distances of x itself.
    """
    C = _ext.require()
    N, D = x.shape
    if not 1 <= k < N:
        raise ValueError(f"k must be in [1, N - 1] = [1, {N - 1}], got {k}")
    # fp32 rows with channel stride 1 and a row stride of at least D (not an expand view)
    dense = x.dtype == torch.float32 and x.stride(1) == 1 and x.stride(0) >= D
    xf = x if dense else x.float().contiguous()
    unit = 1.0
    if scale_exp is not None:
        unit = 2.0**scale_exp
        xf = (xf.double() / unit).float()
    ranges, u = _knn_split(xf)
    nt = _threads()
    # squared norms of the effective vectors [x_ranges, u], fp32 from an fp64 accumulation
    sqn = u.double().pow(2).sum(1)
    C.knn_sqnorm_cpu(
        xf.data_ptr(), N, D, xf.stride(0), [c for r in ranges for c in r], sqn.data_ptr(), nt
    )
    smax = float(sqn.max())
    # (NaN or inf: the centred copy u overflowed fp32; the API has checked x is finite)
    if smax != 0.0 and not (KNN_SMAX_RANGE[0] <= smax <= KNN_SMAX_RANGE[1]) and scale_exp is None:
        return _knn(x, k, _knn_scale(xf, smax))
    sqn = sqn.float()
    # Error of the fp32 expansion |v_i|^2 + |v_j|^2 - 2 v_i.v_j: a dot product of D terms
    # accumulates ~sqrt(D) roundings of size eps * |v|^2 (random sign), the norms and the
    # combination a few more; 4 (sqrt(D) + 8) eps max|v|^2 bounds it with a wide margin
    # (measured: <= 1/20 of delta on LLM-like data) and keeps the exact band a few rows.
    eps = torch.finfo(torch.float32).eps
    # (+ D subnormal roundings of 2^-149 each, immaterial unless the rows are tiny)
    delta = 4.0 * (D**0.5 + 8.0) * eps * float(sqn.max()) + 4.0 * D * 2.0**-149
    out = torch.empty(N, dtype=torch.float64)

    def whole_rows(buf: torch.Tensor, rows: torch.Tensor) -> None:
        """out[rows] from whole Gram rows, as many at a time as the buffer holds."""
        step = max(1, buf.numel() // N)
        for s0 in range(0, rows.numel(), step):
            part_rows = rows[s0 : s0 + step].contiguous()
            every = part_rows.numel() == N  # all rows in order: a view, not a gathered copy
            g = _gram_into(buf, xf, u, ranges, slice(None) if every else part_rows, slice(None))
            part = torch.empty(part_rows.numel(), dtype=torch.float64)
            C.knn_select_cpu(
                g.data_ptr(),
                sqn.data_ptr(),
                part_rows.numel(),
                N,
                part_rows.data_ptr(),
                int(k),
                delta,
                x.data_ptr(),
                _code(x),
                list(x.stride()),
                D,
                part.data_ptr(),
                nt,
                unit,
            )
            out[part_rows] = part

    if N <= KNN_WHOLE_ROWS:
        whole_rows(torch.empty(N * N, dtype=torch.float32), torch.arange(N))
        return out, 0
    T = knn_tile_side(N)
    # every row is first seen in its diagonal tile, which sets its threshold in one selection
    tiles = [(r0, r0) for r0 in range(0, N, T)] + [
        (r0, c0) for r0 in range(0, N, T) for c0 in range(r0 + T, N, T)
    ]
    cap = max(KNN_CAP_FACTOR * k, k + 16)
    buf = torch.empty(T * T, dtype=torch.float32)  # the reused tile
    val = torch.empty(N, cap, dtype=torch.float32)
    idx = torch.empty(N, cap, dtype=torch.int32)
    cnt = torch.zeros(N, dtype=torch.int32)
    thr = torch.full((N,), float("inf"), dtype=torch.float32)
    lists = (val.data_ptr(), idx.data_ptr(), cnt.data_ptr(), thr.data_ptr())
    for r0, c0 in tiles:
        r1, c1 = min(N, r0 + T), min(N, c0 + T)
        g = _gram_into(buf, xf, u, ranges, slice(r0, r1), slice(c0, c1))
        C.knn_tile_cpu(
            g.data_ptr(),
            c1 - c0,
            sqn.data_ptr(),
            N,
            r0,
            r1 - r0,
            c0,
            c1 - c0,
            int(k),
            delta,
            *lists,
            cap,
            nt,
        )
    C.knn_finish_cpu(
        *lists[:3],
        N,
        cap,
        int(k),
        delta,
        x.data_ptr(),
        _code(x),
        list(x.stride()),
        D,
        out.data_ptr(),
        nt,
        unit,
    )
    rest = (cnt < int(k)).nonzero().flatten()  # overflowed lists (-1)
    whole_rows(buf, rest)  # in the tile buffer
    return out, int(rest.numel())
