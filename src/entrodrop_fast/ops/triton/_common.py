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


def blocks(D: int, block_d: int) -> tuple[int, int]:
    """(block_d, number of blocks): block_d shrunk to the power of two >= D when D is small."""
    block_d = min(block_d, next_pow2(D))
    return block_d, cdiv(D, block_d)


def stream_args(x: torch.Tensor, f: torch.Tensor | None, mask: torch.Tensor | None):
    """Launch arguments of a kernel that streams x [B, T, D] (+ an optional f of x's shape)
    under an optional bool [B, T] mask: (f pointer, mask pointer, the element strides
    (sxb, sxt, sxd, sfb, sft, sfd, smb, smt), {HAS_F, HAS_MASK}). A missing f or mask is
    passed as x with zero strides (never read)."""
    fp, fs = (x, (0, 0, 0)) if f is None else (f, tuple(f.stride()))
    mp, smb, smt = mask_arg(x, mask)
    flags = dict(HAS_F=f is not None, HAS_MASK=mask is not None)
    return fp, mp, (*x.stride(), *fs, smb, smt), flags
