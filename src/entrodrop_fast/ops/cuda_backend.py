"""The ``cuda`` backend: the CUDA kernels of the compiled extension (csrc/*_cuda.cu).

For CUDA tensors (``backend="cpp"`` on CUDA tensors is this backend too: ops/backends.py
ALIASES). The extension takes raw device pointers, shapes, strides (in elements), a dtype code
and the caller's stream, so everything runs on ``torch.cuda.current_stream()`` and nothing
synchronises the host. Only moments and bucket have CUDA C++ kernels; ops/backends.py TABLE
sends this backend's cosine to Triton (else the torch reference) and its knn to the tiled GEMM
search of ops/knn_tiled.py (cuBLAS tiles; the Triton ``_knn_kernel`` was 28x slower than
cdist + topk on an H200).
"""

from __future__ import annotations

import torch

from entrodrop_fast import _ext

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Kernels that report NaN/Inf in Y = x (+ f) among the valid tokens through their outputs
# (docs/CONTRACT.md, "Non-finite values"; their min/max propagate NaN): the API then skips its
# separate pass over x (and f) on CUDA tensors and checks the small outputs instead.
REPORTS_NONFINITE = {"cuda": frozenset({"moments", "bucket"})}
# Ops with a pair kernel (<op>_pair: the op of Y = x + f and of x in one launch, x read from
# HBM about once; each output bit for bit the single op's), for delta_entropy.
PAIRS = {"cuda": frozenset({"moments", "bucket"})}
# The kernels' limits, read from the extension (csrc/entrodrop_cuda.h; None when it has no
# CUDA kernels, and then this backend is unavailable): most tokens of the single-read bucket
# kernels, most rows per block of the 16-bit shared-memory counters, most token splits.
_C = _ext.require() if _ext.has_cuda() else None
_FUSED_MAX_ROWS = _C.cuda_fused_max_rows() if _C is not None else None
_HIST_MAX_ROWS = _C.cuda_hist_max_rows() if _C is not None else None
_MAX_SPLITS = _C.CUDA_MAX_SPLITS if _C is not None else None
_FUSED_MAX_BINS = 128  # keeps the fused kernel's shared memory near 100 KB
_PARTIAL_BYTES = 1 << 30  # per-split partial histograms [B, S, D, bins] int32: fewer splits beyond
_occ_cache: dict = {}
# Single-read bucket kernel for short samples: "registers" (bucket_fused: the rows in registers,
# 106-128 registers per thread, 25% occupancy; measured on an H200) or "tile" (bucket_tile: the
# sample's tile in shared memory, owner thread per channel and row part, no atomics, 43-62
# registers; compiled, not yet measured). Same outputs bit for bit (tests/test_cuda_backend.py);
# benches/gpu_hotpaths.sh times both, to pick the default from.
FUSED_KERNEL = "registers"


def available() -> tuple[bool, str]:
    if not _ext.available():
        return False, f"the compiled extension is not available ({_ext.error()}); {_ext.BUILD_HINT}"
    if not _ext.has_cuda():
        return (
            False,
            "the extension was built without CUDA kernels "
            "(no nvcc at build time, or ENTRODROP_CUDA=OFF)",
        )
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def devices() -> set[str]:
    return {"cuda"}


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _vec(x, f) -> int:
    """Channels per thread: 8 (fp16/bf16) or 4 (fp32) with one 16-byte load per row when the
    channel stride is 1, D % vec == 0 and every row starts 16-byte aligned; else 1 (generic)."""
    vec = 4 if x.dtype == torch.float32 else 8
    if x.shape[2] % vec:
        return 1
    for t in (x,) if f is None else (x, f):
        if t.stride(2) != 1 or t.stride(0) % vec or t.stride(1) % vec or t.data_ptr() % 16:
            return 1
    return vec


def _geometry(vec: int) -> tuple[int, int]:
    """(channels per block, row groups per block) of the streaming kernels."""
    return {1: (32, 8), 4: (64, 16), 8: (64, 32)}[vec]


def _args(x, f, mask):
    """(x, f, mask, shape, x_strides, f_strides, mask_strides, dtype, vec) for the extension."""
    m = mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask
    return (
        x.data_ptr(),
        0 if f is None else f.data_ptr(),
        0 if m is None else m.data_ptr(),
        tuple(x.shape),
        tuple(x.stride()),
        (0, 0, 0) if f is None else tuple(f.stride()),
        (0, 0) if m is None else tuple(m.stride()),
        _DTYPE_CODE[x.dtype],
        _vec(x, f),
    )


def _occupancy(kind: int, x, vec: int, bins: int, has_f: bool, device: int) -> int:
    key = (kind, x.dtype, vec, bins if kind >= 2 else 0, has_f, device)
    n = _occ_cache.get(key)
    if n is None:
        n = max(
            1,
            int(
                _ext.require().cuda_occupancy(
                    kind, _DTYPE_CODE[x.dtype], vec, int(bins), bool(has_f), device
                )
            ),
        )
        _occ_cache[key] = n
    return n


def _splits(
    x,
    vec: int,
    splits: int | None,
    *,
    kind: int = 0,
    bins: int = 0,
    has_f: bool = False,
    waves: int = 2,
    max_rows: int | None = None,
) -> tuple[int, int]:
    """(S, rows per split). Default: about `waves` full waves of resident blocks (channel tiles x
    splits x samples), so a single sample (B = 1) still fills every SM; rows rounded to whole
    steps of the kernel (row groups x 12, a multiple of every per-thread row count)."""
    B, T, D = x.shape
    ct, rg = _geometry(vec)
    gran = rg * 12
    tiles = -(-D // ct)
    if splits is None:
        device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        slots = _occupancy(kind, x, vec, bins, has_f, device) * _num_sms(x.device)
        splits = max(1, (waves * slots) // (B * tiles))
    splits = max(1, min(int(splits), -(-T // gran), _MAX_SPLITS))
    rows = -(-T // splits)
    rows = -(-rows // gran) * gran
    if max_rows is not None and rows > max_rows:
        rows = max(gran, (max_rows // gran) * gran)
    return -(-T // rows), rows


def _launch_ctx(x):
    return (
        x.device.index if x.device.index is not None else torch.cuda.current_device(),
        torch.cuda.current_stream(x.device).cuda_stream,
    )


def _moment_partials(x, has_f: bool, vec: int, splits: int | None):
    """(S, rows, pn, pmean, pm2, pmin, pmax): the splits and partial buffers of moments."""
    B, _, D = x.shape
    S, rows = _splits(x, vec, splits, kind=0, has_f=has_f, waves=2)
    dev = x.device
    pn = torch.empty((B, S), dtype=torch.float32, device=dev)
    pmean = torch.empty((B, S, D), dtype=torch.float64, device=dev)
    pm2 = torch.empty((B, S, D), dtype=torch.float64, device=dev)
    pmin = torch.empty((B, S, D), dtype=torch.float32, device=dev)
    pmax = torch.empty((B, S, D), dtype=torch.float32, device=dev)
    return S, rows, pn, pmean, pm2, pmin, pmax


def _moments_merge(x, part) -> dict:
    C = _ext.require()
    B, _, D = x.shape
    S, _, pn, pmean, pm2, pmin, pmax = part
    dev = x.device
    out = {
        "count": torch.empty((B,), dtype=torch.float64, device=dev),
        "mean": torch.empty((B, D), dtype=torch.float64, device=dev),
        "m2": torch.empty((B, D), dtype=torch.float64, device=dev),
        "min": torch.empty((B, D), dtype=torch.float32, device=dev),
        "max": torch.empty((B, D), dtype=torch.float32, device=dev),
    }
    device, stream = _launch_ctx(x)
    C.cuda_moments_merge(
        B,
        D,
        S,
        pn.data_ptr(),
        pmean.data_ptr(),
        pm2.data_ptr(),
        pmin.data_ptr(),
        pmax.data_ptr(),
        *(out[k].data_ptr() for k in ("count", "mean", "m2", "min", "max")),
        device,
        stream,
    )
    return out


def _ptrs(part):
    S, rows, *bufs = part
    return (S, rows, *(t.data_ptr() for t in bufs))


def moments_pair(x, f, mask=None) -> tuple[dict, dict]:
    """(moments of Y = x + f, moments of x), each exactly what :func:`moments` returns, from
    one launch (the blocks of Y and of x for a channel tile run side by side: x is read from
    HBM about once). x, f: CUDA [B, T, D] of one dtype."""
    vec = _vec(x, f)
    if vec != _vec(x, None):  # the single launches would differ in layout: run them
        return moments(x, f, mask), moments(x, None, mask)
    C = _ext.require()
    args = _args(x, f, mask)
    py, px = _moment_partials(x, True, vec, None), _moment_partials(x, False, vec, None)
    device, stream = _launch_ctx(x)
    C.cuda_moments_pair_partial(*args, *_ptrs(py), *_ptrs(px), device, stream)
    return _moments_merge(x, py), _moments_merge(x, px)


def moments(x, f=None, mask=None, *, splits: int | None = None) -> dict:
    """count [B] fp64, mean/m2 [B, D] fp64, min/max [B, D] fp32 of Y = x (+ f) over valid tokens;
    mean = m2 = min = max = NaN for a (sample, channel) whose Y holds NaN/Inf."""
    C = _ext.require()
    args = _args(x, f, mask)
    part = _moment_partials(x, f is not None, args[-1], splits)
    device, stream = _launch_ctx(x)
    C.cuda_moments_partial(*args, *_ptrs(part), device, stream)
    return _moments_merge(x, part)


def _fused_ok(x, vec: int, bins: int) -> bool:
    """Short samples on the 16-byte path: one read of x (bucket_fused)."""
    return vec > 1 and x.shape[1] <= _FUSED_MAX_ROWS and 1 <= bins <= _FUSED_MAX_BINS


def _fused_kernel(C):
    """The extension's single-read bucket launcher chosen by FUSED_KERNEL."""
    if FUSED_KERNEL not in ("registers", "tile"):
        raise ValueError(
            f"cuda_backend.FUSED_KERNEL must be 'registers' or 'tile', got {FUSED_KERNEL!r}"
        )
    return C.cuda_bucket_tile if FUSED_KERNEL == "tile" else C.cuda_bucket_fused


def _partial_counts(x, f, mask, bins: int, splits: int | None, fused: bool | None):
    """(counts, S): per-split bin counts int32 [B, S, D, bins] from the two-pass kernels, or
    (counts [B, D, bins], 0) from the single-pass kernel."""
    C = _ext.require()
    B, T, D = x.shape
    args = _args(x, f, mask)
    vec = args[-1]
    dev = x.device
    device, stream = _launch_ctx(x)
    if fused is None:
        fused = splits is None and _fused_ok(x, vec, bins)
    if fused:
        counts = torch.empty((B, D, bins), dtype=torch.int32, device=dev)
        _fused_kernel(C)(*args, int(bins), False, counts.data_ptr(), 0, device, stream)
        return counts, 0
    mm, hist = _hist_plan(x, f is not None, vec, bins, splits)
    Sp, rows_p, pmin, pmax = mm
    C.cuda_minmax_partial(*args, Sp, rows_p, pmin.data_ptr(), pmax.data_ptr(), device, stream)
    S, rows, phist = hist
    C.cuda_bucket_hist(
        *args,
        Sp,
        pmin.data_ptr(),
        pmax.data_ptr(),
        S,
        rows,
        int(bins),
        phist.data_ptr(),
        device,
        stream,
    )
    return phist, S


def _hist_plan(x, has_f: bool, vec: int, bins: int, splits: int | None):
    """((Sp, rows, pmin, pmax), (S, rows, phist)): the splits and buffers of bucket's two
    passes (min/max, then the bins)."""
    B, _, D = x.shape
    dev = x.device
    Sp, rows_p = _splits(x, vec, splits, kind=1, has_f=has_f, waves=2)
    pmin = torch.empty((B, Sp, D), dtype=torch.float32, device=dev)
    pmax = torch.empty((B, Sp, D), dtype=torch.float32, device=dev)
    # binning: about one wave of blocks (few splits: small partial histograms)
    S, rows = _splits(
        x, vec, splits, kind=2, bins=int(bins), has_f=has_f, waves=1, max_rows=_HIST_MAX_ROWS
    )
    fit = max(
        1, _PARTIAL_BYTES // (B * D * int(bins) * 4)
    )  # many bins (up to 2^16): bounded memory
    if splits is None and S > fit:
        S, rows = _splits(
            x, vec, fit, kind=2, bins=int(bins), has_f=has_f, waves=1, max_rows=_HIST_MAX_ROWS
        )
    phist = torch.empty((B, S, D, bins), dtype=torch.int32, device=dev)
    return (Sp, rows_p, pmin, pmax), (S, rows, phist)


def bucket_pair(
    x, f, mask=None, bins: int = 20, paper_exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_d of Y = x + f, H_d of x), fp64 [B, D] each, each exactly what :func:`bucket`
    returns, from one launch per pass (the blocks of Y and of x for a channel tile run side by
    side: x is read from HBM about once). x, f: CUDA [B, T, D] of one dtype."""
    vec = _vec(x, f)
    if vec != _vec(x, None):  # the single launches would differ in layout: run them
        return bucket(x, f, mask, bins, paper_exact), bucket(x, None, mask, bins, paper_exact)
    C = _ext.require()
    B, _, D = x.shape
    args = _args(x, f, mask)
    device, stream = _launch_ctx(x)
    if _fused_ok(x, vec, bins):
        hy = torch.empty((B, D), dtype=torch.float64, device=x.device)
        hx = torch.empty((B, D), dtype=torch.float64, device=x.device)
        C.cuda_bucket_fused_pair(
            *args, int(bins), bool(paper_exact), 0, hy.data_ptr(), 0, hx.data_ptr(), device, stream
        )
        return hy, hx
    (Spy, rpy, miny, maxy), (Sy, ry, phy) = _hist_plan(x, True, vec, bins, None)
    (Spx, rpx, minx, maxx), (Sx, rx, phx) = _hist_plan(x, False, vec, bins, None)
    C.cuda_minmax_pair_partial(
        *args,
        Spy,
        rpy,
        miny.data_ptr(),
        maxy.data_ptr(),
        Spx,
        rpx,
        minx.data_ptr(),
        maxx.data_ptr(),
        device,
        stream,
    )
    C.cuda_bucket_hist_pair(
        *args,
        int(bins),
        Spy,
        miny.data_ptr(),
        maxy.data_ptr(),
        Sy,
        ry,
        phy.data_ptr(),
        Spx,
        minx.data_ptr(),
        maxx.data_ptr(),
        Sx,
        rx,
        phx.data_ptr(),
        device,
        stream,
    )
    return entropy_from_counts(phy, paper_exact), entropy_from_counts(phx, paper_exact)


def bucket_counts(
    x, f=None, mask=None, bins: int = 20, *, splits: int | None = None, fused: bool | None = None
) -> torch.Tensor:
    """Per-(sample, channel) bin counts, int32 [B, D, bins]. A channel whose Y holds NaN/Inf
    among the valid tokens has negative counts in bin 0 and 0 elsewhere (the kernels' report)."""
    counts, S = _partial_counts(x, f, mask, bins, splits, fused)
    if S == 0:
        return counts
    return counts[:, 0] if S == 1 else counts.sum(dim=1, dtype=torch.int32)


def entropy_from_counts(hist: torch.Tensor, paper_exact: bool = False) -> torch.Tensor:
    """H_d from counts [B, D, bins] or per-split counts [B, S, D, bins] (int32, contiguous)."""
    C = _ext.require()
    phist = hist.contiguous()
    if phist.dim() == 3:
        B, D, bins = phist.shape
        S = 1
    else:
        B, S, D, bins = phist.shape
    out = torch.empty((B, D), dtype=torch.float64, device=hist.device)
    device, stream = _launch_ctx(hist)
    C.cuda_bucket_entropy(
        B, D, bins, S, phist.data_ptr(), bool(paper_exact), out.data_ptr(), device, stream
    )
    return out


def bucket(
    x,
    f=None,
    mask=None,
    bins: int = 20,
    paper_exact: bool = False,
    *,
    splits: int | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """Per-channel histogram entropy H_d, fp64 [B, D], of Y = x (+ f) over valid tokens;
    NaN for a (sample, channel) whose Y holds NaN/Inf."""
    B, T, D = x.shape
    args = _args(x, f, mask)
    if fused is None:
        fused = splits is None and _fused_ok(x, args[-1], bins)
    if fused:
        C = _ext.require()
        out = torch.empty((B, D), dtype=torch.float64, device=x.device)
        device, stream = _launch_ctx(x)
        _fused_kernel(C)(*args, int(bins), bool(paper_exact), 0, out.data_ptr(), device, stream)
        return out
    counts, _ = _partial_counts(x, f, mask, bins, splits, False)
    return entropy_from_counts(counts, paper_exact)
