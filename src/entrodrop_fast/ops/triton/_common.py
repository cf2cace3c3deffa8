"""Launch helpers shared by the Triton launchers (no kernels here)."""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (a small fixed number under the interpreter)."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def token_splits(
    B: int,
    T: int,
    col_blocks: int,
    block_t: int,
    device: torch.device,
    splits: int | None = None,
    per_sm: int = 16,
    max_splits: int = 64,
) -> tuple[int, int]:
    """Split the T tokens of each sample into S chunks so the grid fills the GPU.

    Returns (S, rows_per_split); rows_per_split is a multiple of block_t.
    """
    if splits is None:
        want = max(1, (num_sms(device) * per_sm) // max(1, B * col_blocks))
        splits = min(want, max_splits, cdiv(T, block_t))
    splits = max(1, min(int(splits), cdiv(T, block_t)))
    rows = cdiv(cdiv(T, splits), block_t) * block_t
    return cdiv(T, rows), rows


def mask_arg(x: torch.Tensor, mask: torch.Tensor | None):
    """(pointer tensor, stride_b, stride_t) for an optional bool [B, T] mask (bytes)."""
    if mask is None:
        return x, 0, 0
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, m.stride(0), m.stride(1)


def f_arg(x: torch.Tensor, f: torch.Tensor | None):
    """(pointer tensor, strides) for an optional f of x's shape."""
    if f is None:
        return x, (0, 0, 0)
    return f, tuple(f.stride())
