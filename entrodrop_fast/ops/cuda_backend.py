"""CUDA kernels of the compiled extension (csrc/stats_cuda.cu) with the backend signatures.

For CUDA tensors; ``cpp_backend`` delegates its CUDA tensors here. The extension takes raw
device pointers, shapes, strides (in elements), a dtype code and the caller's stream, so
everything runs on ``torch.cuda.current_stream()`` and nothing synchronises the host.
``cosine`` and ``knn_kth_distance`` have no CUDA C++ kernel: they run the Triton kernels
when Triton works, else the torch reference.
"""

from __future__ import annotations

import torch

from entrodrop_fast import _ext

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_THREADS_ROWS = 64  # rows one block reads per step (8 warps x 8 rows): the split granule
_BLOCKS_PER_SM = 3


def available() -> tuple[bool, str]:
    if not _ext.available():
        return False, f"the compiled extension is not available ({_ext.error()}); {_ext.BUILD_HINT}"
    if not _ext.has_cuda():
        return False, "the extension was built without CUDA kernels (no nvcc at build time, or ENTRODROP_CUDA=OFF)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def devices() -> set[str]:
    return {"cuda"}


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _vec(x, f) -> int:
    """2 channels per lane (4-byte loads) for 16-bit dtypes with unit channel stride."""
    if x.dtype == torch.float32 or x.shape[2] % 2:
        return 1
    for t in (x,) if f is None else (x, f):
        if t.stride(2) != 1 or t.stride(0) % 2 or t.stride(1) % 2 or t.data_ptr() % 4:
            return 1
    return 2


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


def _splits(x, vec: int, splits: int | None) -> tuple[int, int]:
    """(S, rows per split): ~8 waves of _BLOCKS_PER_SM blocks per SM (a small tail wave)."""
    B, T, D = x.shape
    col_blocks = -(-D // (32 * vec))
    if splits is None:
        want = 8 * _BLOCKS_PER_SM * _num_sms(x.device)
        splits = max(1, -(-want // (B * col_blocks)))
    splits = max(1, min(int(splits), -(-T // _THREADS_ROWS), 65535))
    rows = -(-T // splits)
    rows = -(-rows // _THREADS_ROWS) * _THREADS_ROWS
    return -(-T // rows), rows


def _launch_ctx(x):
    return x.device.index if x.device.index is not None else torch.cuda.current_device(), torch.cuda.current_stream(x.device).cuda_stream


def moments(x, f=None, mask=None, *, splits: int | None = None) -> dict:
    """count [B] fp64, mean/m2 [B, D] fp64, min/max [B, D] fp32 of Y = x (+ f) over valid tokens."""
    C = _ext.require()
    B, _, D = x.shape
    args = _args(x, f, mask)
    S, rows = _splits(x, args[-1], splits)
    dev = x.device
    pn = torch.empty((B, S), dtype=torch.float32, device=dev)
    pmean = torch.empty((B, S, D), dtype=torch.float64, device=dev)
    pm2 = torch.empty((B, S, D), dtype=torch.float64, device=dev)
    pmin = torch.empty((B, S, D), dtype=torch.float32, device=dev)
    pmax = torch.empty((B, S, D), dtype=torch.float32, device=dev)
    device, stream = _launch_ctx(x)
    C.cuda_moments_partial(*args, S, rows, pn.data_ptr(), pmean.data_ptr(), pm2.data_ptr(), pmin.data_ptr(), pmax.data_ptr(), device, stream)
    out = {
        "count": torch.empty((B,), dtype=torch.float64, device=dev),
        "mean": torch.empty((B, D), dtype=torch.float64, device=dev),
        "m2": torch.empty((B, D), dtype=torch.float64, device=dev),
        "min": torch.empty((B, D), dtype=torch.float32, device=dev),
        "max": torch.empty((B, D), dtype=torch.float32, device=dev),
    }
    C.cuda_moments_merge(B, D, S, pn.data_ptr(), pmean.data_ptr(), pm2.data_ptr(), pmin.data_ptr(), pmax.data_ptr(), *(out[k].data_ptr() for k in ("count", "mean", "m2", "min", "max")), device, stream)
    return out


def bucket_counts(x, f=None, mask=None, bins: int = 20, *, splits: int | None = None) -> torch.Tensor:
    """Per-(sample, channel) bin counts, int32 [B, D, bins]."""
    C = _ext.require()
    B, _, D = x.shape
    args = _args(x, f, mask)
    S, rows = _splits(x, args[-1], splits)
    dev = x.device
    pmin = torch.empty((B, S, D), dtype=torch.float32, device=dev)
    pmax = torch.empty((B, S, D), dtype=torch.float32, device=dev)
    device, stream = _launch_ctx(x)
    C.cuda_minmax_partial(*args, S, rows, pmin.data_ptr(), pmax.data_ptr(), device, stream)
    hist = torch.zeros((B, D, bins), dtype=torch.int32, device=dev)
    C.cuda_bucket_hist(*args, S, pmin.data_ptr(), pmax.data_ptr(), S, rows, int(bins), hist.data_ptr(), device, stream)
    return hist


def entropy_from_counts(hist: torch.Tensor, paper_exact: bool = False) -> torch.Tensor:
    C = _ext.require()
    B, D, bins = hist.shape
    out = torch.empty((B, D), dtype=torch.float64, device=hist.device)
    device, stream = _launch_ctx(hist)
    C.cuda_bucket_entropy(B, D, bins, hist.data_ptr(), bool(paper_exact), out.data_ptr(), device, stream)
    return out


def bucket(x, f=None, mask=None, bins: int = 20, paper_exact: bool = False, *, splits: int | None = None) -> torch.Tensor:
    """Per-channel histogram entropy H_d, fp64 [B, D], of Y = x (+ f) over valid tokens."""
    return entropy_from_counts(bucket_counts(x, f, mask, bins, splits=splits), paper_exact)


def _triton_ready() -> bool:
    try:
        from entrodrop_fast.ops import triton_backend

        return triton_backend.available()[0]
    except Exception:  # a broken triton must not break the CUDA backend
        return False


def cosine(x, other, mask=None, fused: bool = True):
    """No CUDA C++ kernel: the Triton kernel when Triton works, else the torch reference."""
    if _triton_ready():
        from entrodrop_fast.ops.triton.cosine import cosine as _cosine

        return _cosine(x, other, mask, fused)
    from entrodrop_fast.ops import reference

    return reference.cosine(x, other, mask, fused)


def knn_kth_distance(x, k: int) -> torch.Tensor:
    """No CUDA C++ kernel: the tiled Triton kernel when Triton works, else the torch reference."""
    if _triton_ready():
        from entrodrop_fast.ops.triton.knn import knn_kth_distance as _knn

        return _knn(x, k)
    from entrodrop_fast.ops import reference

    return reference.knn_kth_distance(x, k)
