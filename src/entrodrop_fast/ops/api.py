"""Public estimator API: input checks, backend choice, and the estimators (README, "Estimators,
exactly"; EntroDrop, arXiv 2504.03794).

Every function accepts ``[N, D]`` (one sample: returns a 0-d tensor) or ``[B, T, D]``
(B samples of T tokens: returns ``[B]``), in float32/float16/bfloat16 (float64 is read as
float32), contiguous or strided, as a torch tensor or anything with DLPack (numpy
included: then the result is a numpy array). Results are float64, on the input's device.

Block scoring passes ``f`` = F(X): the statistics are then of ``Y = X + F(X)``, added in
fp32 inside the kernel, never allocated. ``mask`` (``[N]`` or ``[B, T]`` bool) excludes
padding tokens.

Entropies are in nats; cosine_importance is 1 - mean cosine (in [0, 2]) and
angular_distance a fraction of pi (in [0, 1]). Errors: TypeError for an input that is no
array or of another dtype, and for an option of the wrong type; ValueError for a bad shape,
device or option value, NaN/Inf in the valid tokens (``nan_policy="raise"``), too few valid
tokens, or a backend that is not available.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, cast

import numpy as np
import torch

from entrodrop_fast.ops import reference
from entrodrop_fast.ops.backends import (  # noqa: F401 (re-exported)
    BACKENDS,
    backends,
    kernel,
    resolve_backend,
)
from entrodrop_fast.ops.backends import pair_kernel as _pair_kernel
from entrodrop_fast.ops.backends import (  # noqa: F401 (hooks.py)
    reports_nonfinite as _reports_nonfinite,
)

METHODS = ("bucket", "gaussian_diag", "gaussian_full", "knn", "renyi")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Most bins per channel: every backend keeps bins counters per channel (the GPU kernels
# D x bins int32 per sample: 1 GiB at D = 4096), and 2^16 bins already resolve more than
# any sample of up to 65536 tokens can fill. (Also the kernels' limit,
# entrodrop_fast._C.MAX_BINS: the API needs it without the extension, and
# tests/test_backends.py checks they agree.)
MAX_BINS = 1 << 16
_FP32_MAX = float(torch.finfo(torch.float32).max)


class SupportsDLPack(Protocol):
    """An array torch reads through DLPack (numpy, cupy, ...: ``__dlpack__``)."""

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any: ...


#: what the estimators read (``x``, ``f``, ``y``, ``mask``): a torch tensor, or an array with
#: DLPack (numpy included)
Array: TypeAlias = torch.Tensor | SupportsDLPack
#: what they return: a float64 torch tensor on the input's device (0-d for an ``[N, D]``
#: input, ``[B]`` for ``[B, T, D]``), or the same as a numpy array when the input was not a
#: torch tensor
Result: TypeAlias = torch.Tensor | np.ndarray


# ---------------------------------------------------------------- backends
# Which implementation runs each op of each backend on each device: ops/backends.py.


def _kernel(p: _Prepared, op: str) -> Any:
    """The function running ``op`` for the prepared input's backend and device (the table's)."""
    return kernel(p.backend, p.x.device, op)


# ---------------------------------------------------------------- input checks


@dataclass
class _Prepared:
    x: torch.Tensor  # (B, T, D)
    f: torch.Tensor | None
    mask: torch.Tensor | None  # (B, T) bool
    single: bool  # input was [N, D]
    numpy_out: bool
    backend: str
    # validation left to the kernel's report: the caller checks the kernel's outputs and,
    # when they show a non-finite value, calls _recheck (the exact path)
    deferred: bool = False
    omitted: bool = False  # nan_policy="omit" took tokens out of the mask


def _to_torch(a: Array, name: str) -> tuple[torch.Tensor, bool]:
    if isinstance(a, torch.Tensor):
        return a, False
    if hasattr(a, "__dlpack__"):
        strides = getattr(a, "strides", None)  # numpy / cupy: bytes
        if strides is not None and any(s < 0 for s in strides):
            # torch has no negative strides, and torch.from_dlpack aborts the interpreter on
            # them (np.flip): read a positive-stride copy instead
            copy = getattr(a, "copy", None)
            if copy is None:
                raise TypeError(
                    f"{name} has negative strides {tuple(strides)} and no .copy(); "
                    "pass a contiguous copy"
                )
            a = copy()
        try:
            return torch.from_dlpack(a), True
        except Exception as exc:
            raise TypeError(f"{name}: could not import the array through DLPack ({exc})") from exc
    raise TypeError(
        f"{name} must be a torch tensor or an array supporting DLPack, got {type(a).__name__}"
    )


def _check_dtype(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype == torch.float64:
        return t.float()
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 (float64 is read as float32), "
            f"got {t.dtype}"
        )
    return t


def _token_scan(t: torch.Tensor) -> torch.Tensor:
    """Per token (B, T): a value that is non-finite wherever the token holds NaN or Inf.

    For fp32/bf16 the 2-norm, which also bounds every |element| (and overflows, making a
    false alarm re-checked exactly, only past 1.8e19); fp16 cannot come near fp32's range, so
    a sum serves (an fp16 sum past 65504 is such a false alarm). Both are single reads
    without a temporary of t's size (isfinite(t).all(-1) costs 20-40x more).
    """
    if t.dtype == torch.float16:
        return t.sum(-1)
    return torch.linalg.vector_norm(t, 2, dim=-1)


def _nonfinite_tokens(
    x: torch.Tensor, f: torch.Tensor | None, add: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bad, overflow): bool (B, T) tokens holding NaN/Inf in x or f, and (when f is added)
    tokens where x and f are finite but Y = x + f overflows fp32 (None when impossible)."""
    sx = _token_scan(x)
    if f is None:
        cand = ~torch.isfinite(sx)
        cand_y = None
    else:
        sf = _token_scan(f)
        cand = ~torch.isfinite(sx) | ~torch.isfinite(sf)
        # |x_d + f_d| <= |x|_2 + |f|_2: only where those reach 2^126 (half of fp32's range,
        # a margin for the norms' rounding) can the fp32 add overflow
        big = x.dtype != torch.float16 and add
        cand_y = cand | ((sx.double() + sf.double()) > 2.0**126) if big else None
    check = cand if cand_y is None else cand_y
    if not bool(check.any()):  # the usual case: one host sync, nothing more read
        return cand, None
    idx = check.nonzero(as_tuple=True)
    xs = x[idx].float()  # (n, D): the suspect tokens only
    bad_rows = ~torch.isfinite(xs).all(-1)
    ovf_rows = None
    if f is not None:
        fs = f[idx].float()
        bad_rows |= ~torch.isfinite(fs).all(-1)
        if cand_y is not None:
            ovf_rows = ~bad_rows & ~torch.isfinite(xs + fs).all(-1)
    bad = torch.zeros_like(check)
    bad[idx] = bad_rows
    ovf = None
    if ovf_rows is not None:
        ovf = torch.zeros_like(check)
        ovf[idx] = ovf_rows
    return bad, ovf


def _validate(
    x: torch.Tensor,
    f: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    min_tokens: int,
    nan_policy: str,
    f_name: str,
    add: bool,
    stacklevel: int = 4,
) -> tuple[torch.Tensor | None, bool]:
    """The exact check: (mask, omitted). Raises on NaN/Inf or an fp32 overflow of Y = x + f
    among the valid tokens (or, with nan_policy="omit", warns and takes those tokens out of
    the mask), then on fewer than ``min_tokens`` valid tokens in a sample. Called by
    :func:`prepare` (whose caller is an estimator) or :func:`_recheck` (called by an
    estimator): the warning points at the estimator's caller either way (``stacklevel``
    counts from here)."""
    bad, ovf = _nonfinite_tokens(x, f, add)
    if mask is not None:
        bad &= mask
        if ovf is not None:
            ovf &= mask
    nbad = int(bad.sum())
    novf = int(ovf.sum()) if ovf is not None else 0
    omitted = False
    if nbad or novf:
        if nan_policy == "raise":
            if nbad:
                raise ValueError(
                    f"input holds NaN or Inf in {nbad} token(s); "
                    "pass nan_policy='omit' to skip those tokens"
                )
            raise ValueError(
                f"Y = X + {f_name.upper()} overflowed float32 in {novf} token(s): x and {f_name} "
                "are finite, but their sum exceeds float32's range (+-3.4e38); the estimators "
                f"add them in float32 ({x.dtype} input; float64 input is read as float32 too, so "
                f"a wider input dtype cannot help): divide x and {f_name} by a common power of two "
                "(entropy differences do not change), or pass nan_policy='omit' to skip those "
                "tokens"
            )
        what = (
            f"({nbad} holding NaN or Inf, {novf} where Y = X + {f_name.upper()} overflowed float32)"
            if novf
            else "holding NaN or Inf"
        )
        warnings.warn(
            f"nan_policy='omit': skipped {nbad + novf} token(s) {what}",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        if ovf is not None:
            bad |= ovf
        mask = ~bad if mask is None else mask & ~bad
        omitted = True
    _check_min_tokens(x, mask, min_tokens, omitted)
    return mask, omitted


def _least_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> int:
    return int(mask.sum(1).min()) if mask is not None else x.shape[1]


def _check_min_tokens(
    x: torch.Tensor, mask: torch.Tensor | None, min_tokens: int, omitted: bool = False
) -> None:
    """ValueError naming the samples with fewer than ``min_tokens`` valid tokens (and, after
    ``nan_policy="omit"`` took tokens out, saying so)."""
    least = _least_tokens(x, mask)
    if least >= min_tokens:
        return
    counts = mask.sum(1) if mask is not None else torch.full((x.shape[0],), x.shape[1])
    few = (counts < min_tokens).nonzero().flatten().tolist()
    which = ", ".join(f"sample {b} has {int(counts[b])}" for b in few[:5])
    more = f" and {len(few) - 5} more" if len(few) > 5 else ""
    why = " after nan_policy='omit' skipped the NaN/Inf tokens" if omitted else ""
    raise ValueError(
        f"every sample needs at least {min_tokens} valid tokens: {which}{more}{why} (0-based "
        "index along the first axis of [B, T, D] input; the mask's False tokens do not count)"
    )


class _CannotDefer(Exception):
    """Raised by :func:`prepare` with ``defer_only`` where the check cannot be deferred."""


def prepare(
    x: Array,
    f: Array | None = None,
    mask: Array | None = None,
    *,
    min_tokens: int = 2,
    nan_policy: str = "raise",
    backend: str = "auto",
    validate: bool = True,
    f_name: str = "f",
    add: bool = True,
    op: str | None = None,
    defer_only: bool = False,
) -> _Prepared:
    """Check the inputs and bring them to ``(B, T, D)``; see the module docstring.

    ``f_name``: what the caller called the second tensor (``"y"`` for cosine's y), for the
    messages; ``add``: the estimator reads Y = x + f (checked for fp32 overflow), not f alone.
    ``op``: the backend op that will read x (and f): where its kernel reports non-finite
    values itself (:func:`_reports_nonfinite`), the separate NaN/Inf pass is skipped
    (``deferred``) and the caller, after the kernel, calls :func:`_recheck` when its outputs
    show a non-finite value; the results and errors are those of the exact check either way.
    ``defer_only``: raise :class:`_CannotDefer` instead of validating when the check cannot be
    deferred.
    Raises TypeError / ValueError for inputs the estimators refuse (dtype, shape, device,
    NaN/Inf with ``nan_policy="raise"``, fewer than ``min_tokens`` valid tokens, a backend
    that is not available).
    """
    x, numpy_out = _to_torch(x, "x")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2-D [N, D] or 3-D [B, T, D], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    x = _check_dtype(x, "x")
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    if f is not None:
        f, _ = _to_torch(f, f_name)
        f = _check_dtype(f, f_name)
        if single:
            f = f.unsqueeze(0)
        if f.shape != x.shape:
            raise ValueError(
                f"{f_name} must have the shape of x {tuple(x.shape[single:])}, "
                f"got {tuple(f.shape[single:])}"
            )
        if f.dtype != x.dtype:
            raise ValueError(f"{f_name} must have the dtype of x ({x.dtype}), got {f.dtype}")
        if f.device != x.device:
            raise ValueError(f"{f_name} must be on the device of x ({x.device}), got {f.device}")
    if mask is not None:
        mask, _ = _to_torch(mask, "mask")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
        if single:
            mask = mask.unsqueeze(0)
        if mask.shape != x.shape[:2]:
            raise ValueError(
                f"mask must have shape {tuple(x.shape[single:2])} (the token axes of x), "
                f"got {tuple(mask.shape[single:])}"
            )
        mask = mask.to(x.device)
    if nan_policy not in ("raise", "omit"):
        raise ValueError(f"nan_policy must be 'raise' or 'omit', got {nan_policy!r}")
    name = None
    deferred = omitted = False
    if validate and op is not None:
        try:
            name = resolve_backend(backend, x.device)
        except ValueError:
            name = None  # raised again below, after the checks, as without op
        # too few tokens: the exact check, whose NaN error (if any) comes first
        deferred = (
            name is not None
            and _reports_nonfinite(name, x.device, op)
            and _least_tokens(x, mask) >= min_tokens
        )
    if validate and not deferred:
        if defer_only:
            raise _CannotDefer
        mask, omitted = _validate(
            x, f, mask, min_tokens=min_tokens, nan_policy=nan_policy, f_name=f_name, add=add
        )
    if name is None:
        name = resolve_backend(backend, x.device)
    return _Prepared(x, f, mask, single, numpy_out, name, deferred, omitted)


def _recheck(
    p: _Prepared,
    *,
    min_tokens: int = 2,
    nan_policy: str = "raise",
    f_name: str = "f",
    add: bool = True,
    stacklevel: int = 4,
) -> _Prepared:
    """A deferred ``p`` whose kernel outputs showed a non-finite value: the exact check of
    :func:`prepare` (same errors, same warning), returning ``p`` with the omitted tokens out
    of its mask (``omitted``: the caller runs the kernel again) or ``p`` as it was (a false
    alarm: finite values the kernel's fp32 arithmetic overflowed on; its result stands)."""
    mask, omitted = _validate(
        p.x,
        p.f,
        p.mask,
        min_tokens=min_tokens,
        nan_policy=nan_policy,
        f_name=f_name,
        add=add,
        stacklevel=stacklevel,
    )
    return _Prepared(p.x, p.f, mask, p.single, p.numpy_out, p.backend, False, omitted)


def _all_finite(*ts: torch.Tensor) -> bool:
    """Whether every element of the (small: [B] or [B, D]) kernel outputs is finite: their
    sum is (NaN and Inf propagate; the fp64 sums of entropies and moments cannot overflow:
    |mean| < 3.5e38, m2 < 5e77 N per channel). One reduction each, one host sync."""
    total = ts[0].sum()
    for t in ts[1:]:
        total = total + t.sum()
    return math.isfinite(float(total))


def _finish(p: _Prepared, h: torch.Tensor) -> Result:
    h = h.to(torch.float64)
    if p.single:
        h = h[0]
    return h.cpu().numpy() if p.numpy_out else h


# ---------------------------------------------------------------- option checks


def _integer(value, name: str, lo: int, hi: int | None = None, why: str = "") -> int:
    """value as an int: any integral number (int, numpy integer, 0-d integer tensor), never
    a bool or a float (20.5 or 20.0); ValueError outside [lo, hi]."""
    is_bool = isinstance(value, bool) or str(getattr(value, "dtype", "")) in (
        "bool",
        "torch.bool",
    )  # numpy / torch bools too
    if is_bool or isinstance(value, (float, complex)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer (int, numpy integer or 0-d integer tensor), "
            f"got {value!r} ({type(value).__name__})"
        ) from None
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}{why}, got {v}")
    return v


def _flag(value, name: str) -> bool:
    """value as a bool: True / False (numpy and 0-d torch bools too), never a string, None
    or a number (``paper_exact="no"`` would have been truthy)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (np.bool_, torch.Tensor)) and str(getattr(value, "dtype", "")) in (
        "bool",
        "torch.bool",
    ):
        if getattr(value, "ndim", 0) == 0:
            return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def _real(value, name: str, *, lo: float, lo_open: bool = False, why: str = "") -> float:
    """value as a finite float >= lo (> lo if lo_open); TypeError for non-numbers and bools."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or v < lo or (lo_open and v == lo):
        raise ValueError(
            f"{name} must be a finite number {'>' if lo_open else '>='} {lo:g}{why}, got {v!r}"
        )
    return v


# ---------------------------------------------------------------- estimators


_BINS_WHY = (
    " (every backend keeps bins counters per channel, D x bins per sample on GPUs; "
    "2**16 bins already resolve more than a sample of 65536 tokens can fill)"
)


def bucket_entropy(
    x: Array,
    f: Array | None = None,
    *,
    bins: int = 20,
    paper_exact: bool = False,
    mask: Array | None = None,
    backend: str = "auto",
    nan_policy: str = "raise",
    validate: bool = True,
) -> Result:
    """Histogram ("bucket") entropy, the paper's estimator: sum over channels of H_d.

    Per channel, ``bins`` equal-width bins over [min, max] of the sample's tokens.
    ``paper_exact=True`` clamps probabilities at 1e-10 as the paper's code does.
    """
    bins = _integer(bins, "bins", 1, MAX_BINS, _BINS_WHY)
    paper_exact = _flag(paper_exact, "paper_exact")
    p = prepare(x, f, mask, nan_policy=nan_policy, backend=backend, validate=validate, op="bucket")
    h = _kernel(p, "bucket")(p.x, p.f, p.mask, bins, paper_exact).to(torch.float64).sum(-1)  # (B,)
    if p.deferred and not _all_finite(h):  # the kernel saw NaN/Inf: H_d = NaN
        p = _recheck(p, nan_policy=nan_policy)
        if p.omitted:
            h = _kernel(p, "bucket")(p.x, p.f, p.mask, bins, paper_exact).to(torch.float64).sum(-1)
    return _finish(p, h)


def _moments(p: _Prepared) -> dict:
    m = _kernel(p, "moments")(p.x, p.f, p.mask)
    return {k: v.to(torch.float64) for k, v in m.items()}


def _checked_moments(
    p: _Prepared, *, min_tokens: int, nan_policy: str, stacklevel: int = 5
) -> tuple[_Prepared, dict]:
    """_moments, and for a deferred p the exact check when the kernel reported a non-finite
    value (m2 = NaN for such a channel; a non-finite m2 from finite values, past fp32 in the
    kernel's arithmetic, is re-checked as such)."""
    m = _moments(p)
    if p.deferred and not _all_finite(m["m2"]):
        p = _recheck(p, min_tokens=min_tokens, nan_policy=nan_policy, stacklevel=stacklevel)
        if p.omitted:
            m = _moments(p)
    return p, m


def gaussian_diag_entropy(
    x: Array,
    f: Array | None = None,
    *,
    var_floor: float = 1e-12,
    mask: Array | None = None,
    backend: str = "auto",
    nan_policy: str = "raise",
    validate: bool = True,
) -> Result:
    """sum_d 1/2 ln(2 pi e sigma_d^2), population variances floored at ``var_floor``.

    A constant channel has variance 0 and would give -inf; it is counted with
    variance ``var_floor`` instead (1/2 ln(2 pi e 1e-12) = -12.4 nats by default), and a
    warning says how many channels were floored.
    """
    var_floor = _real(var_floor, "var_floor", lo=0.0, why=" (0 gives -inf for a constant channel)")
    p = prepare(x, f, mask, nan_policy=nan_policy, backend=backend, validate=validate, op="moments")
    m = _moments(p)
    var = m["m2"] / m["count"][:, None]  # (B, D)
    if validate:
        # one reduction for both checks: NaN where the kernel reported NaN/Inf (m2 = NaN)
        low = _amin(var)
        if p.deferred and math.isnan(low):
            p = _recheck(p, nan_policy=nan_policy)
            if p.omitted:
                m = _moments(p)
                var = m["m2"] / m["count"][:, None]
                low = _amin(var)
        _warn_floored(var, low, var_floor)
    return _finish(p, _gaussian_half_log_sum(var, var_floor))


def _amin(v: torch.Tensor) -> float:
    """min(v) as a float, NaN if any is (as torch.amin); on CPU in numpy, for the reason of
    _half_log_sum."""
    if v.device.type == "cpu":
        import numpy as np

        return float(np.min(v.detach().numpy()))
    return float(v.amin())


def _gaussian_half_log_sum(var: torch.Tensor, var_floor: float) -> torch.Tensor:
    """sum_d 1/2 ln(2 pi e max(var_d, var_floor)), fp64 [B] from var [B, D] (on CPU in numpy:
    the same IEEE operations as the torch ones, without torch's thread team)."""
    if var.device.type == "cpu":
        import numpy as np

        v = np.maximum(var.detach().numpy(), var_floor) * (2 * math.pi * math.e)
        return _half_log_sum(torch.from_numpy(v))
    return _half_log_sum((2 * math.pi * math.e) * var.clamp_min(var_floor))


def _half_log_sum(v: torch.Tensor) -> torch.Tensor:
    """0.5 * sum over the last axis of ln(v), fp64. On CPU in numpy: torch.log of a few hundred
    values or more may enter torch's OpenMP team (MKL), which stalls for a whole time slice
    (4-12 ms, against microseconds) when another process holds a core. (numpy's log is scalar
    on machines without AVX-512, 3x torch's; torch.log on slices of 16384 values, below its
    grain size, was tried in session 12 and still stalled with a core busy:
    `benches/under_load.py`, gaussian_diag at 8x256x576, busy median 2.3-3.7 ms against
    1.1-1.3.)"""
    if v.device.type == "cpu":
        import numpy as np

        with np.errstate(divide="ignore"):  # ln 0 = -inf (var_floor=0), as torch.log
            return torch.from_numpy(0.5 * np.log(v.detach().numpy()).sum(-1))
    return 0.5 * torch.log(v).sum(-1)


def _warn_floored(var: torch.Tensor, low: float, var_floor: float) -> None:
    """The warning of gaussian_diag_entropy, for the variances var whose minimum is low
    (NaN where a variance is NaN: then counted among the others as well)."""
    if math.isnan(low) or low < var_floor:
        nfloor = int((var < var_floor).sum())
        if nfloor:
            warnings.warn(
                f"gaussian_diag: {nfloor} channel variance(s) below var_floor={var_floor:g} were "
                "floored",
                RuntimeWarning,
                stacklevel=3,
            )


def _rows(p: _Prepared, b: int) -> torch.Tensor:
    r = p.x[b] if p.f is None else p.x[b].float() + p.f[b].float()
    r = r.float()
    return r if p.mask is None else r[p.mask[b]]


def gaussian_full_entropy(
    x: Array,
    f: Array | None = None,
    *,
    ridge: float | None = None,
    mask: Array | None = None,
    backend: str = "auto",
    nan_policy: str = "raise",
    validate: bool = True,
) -> Result:
    """1/2 logdet(2 pi e Sigma) with Sigma the D x D population covariance.

    The rows are centred on their exact fp64 mean before the fp64 Gram product, so the
    large channels of LLM activations do not cancel. Sigma is singular when N <= D or
    channels are dead: ``ridge=None`` (default) then adds ``1e-6 * trace(Sigma) / D`` to the
    diagonal with a warning; a number uses that ridge always; ``ridge=0`` returns -inf.
    """
    if ridge is not None:
        ridge = _real(ridge, "ridge", lo=0.0, why=" or None (automatic)")
    p = prepare(x, f, mask, nan_policy=nan_policy, backend=backend, validate=validate)
    covariance = _kernel(p, "covariance")
    out = []
    for b in range(p.x.shape[0]):
        r = _rows(p, b)  # (N, D)
        cov = covariance(r)
        D = cov.shape[0]
        eye = torch.eye(D, dtype=cov.dtype, device=cov.device)
        if ridge is None:
            sign, logdet = torch.linalg.slogdet(cov)
            if r.shape[0] <= D or sign <= 0 or not torch.isfinite(logdet):
                lam = 1e-6 * float(cov.diagonal().mean()) or 1e-12
                warnings.warn(
                    f"gaussian_full: covariance is singular (N={r.shape[0]}, D={D}); added ridge "
                    f"{lam:.3g}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                sign, logdet = torch.linalg.slogdet(cov + lam * eye)
        else:
            sign, logdet = torch.linalg.slogdet(cov + ridge * eye)
        h = (
            0.5 * (D * math.log(2 * math.pi * math.e) + logdet)
            if sign > 0
            else torch.tensor(float("-inf"), dtype=torch.float64, device=cov.device)
        )
        out.append(h)
    return _finish(p, torch.stack(out))


def knn_entropy(
    x: Array,
    f: Array | None = None,
    *,
    k: int = 25,
    form: str = "paper",
    mask: Array | None = None,
    backend: str = "auto",
    nan_policy: str = "raise",
    validate: bool = True,
) -> Result:
    """Kozachenko-Leonenko entropy from each token's k-th nearest other token.

    ``form="paper"``: ... + ln N - ln k (the paper's code); ``form="digamma"``: the standard
    psi(N) - psi(k). The fast paths never hold the N x N distance matrix.
    """
    k = _integer(k, "k", 1)
    if form not in ("paper", "digamma"):
        raise ValueError(f"knn form must be 'paper' or 'digamma', got {form!r}")
    p = prepare(
        x,
        f,
        mask,
        min_tokens=k + 1,
        nan_policy=nan_policy,
        backend=backend,
        validate=validate,
        op="knn_terms",
    )
    terms = _kernel(p, "knn_terms")
    if terms is not None:  # the whole batch in one call
        n, logsum = terms(p.x, p.f, p.mask, k)
        if p.deferred and not math.isfinite(sum(logsum.tolist())):  # the kernel saw NaN/Inf
            p = _recheck(p, min_tokens=k + 1, nan_policy=nan_policy)
            if p.omitted:
                n, logsum = terms(p.x, p.f, p.mask, k)
        return _finish(p, reference.knn_entropy_from_logsum(logsum, n, p.x.shape[2], k, form))
    kth = _kernel(p, "knn_kth_distance")
    out = []
    for b in range(p.x.shape[0]):
        r = _rows(p, b)
        radii = kth(r, k).to(torch.float64)
        out.append(reference.knn_entropy_from_radii(radii, r.shape[0], r.shape[1], k, form))
    return _finish(p, torch.stack(out))


def renyi_entropy(
    x: Array,
    f: Array | None = None,
    *,
    alpha: float = 4.0,
    mask: Array | None = None,
    backend: str = "auto",
    nan_policy: str = "raise",
    validate: bool = True,
) -> Result:
    """The paper's Renyi entropy of order ``alpha`` of the Gaussian-kernel similarity matrix.

    Every backend computes this one with the torch reference (it needs the median of all
    N^2 pairwise distances; ops/backends.py TABLE).
    """
    alpha = _real(alpha, "alpha", lo=0.0, lo_open=True, why=" other than 1")
    if alpha == 1:
        raise ValueError(
            "alpha must differ from 1 (the Renyi entropy of order 1 is a limit, not this formula)"
        )
    p = prepare(x, f, mask, nan_policy=nan_policy, backend=backend, validate=validate)
    renyi = _kernel(p, "renyi")
    out = [renyi(_rows(p, b), alpha) for b in range(p.x.shape[0])]
    return _finish(p, torch.stack(out))


_ESTIMATORS: dict[str, Callable[..., Result]] = {
    "bucket": bucket_entropy,
    "gaussian_diag": gaussian_diag_entropy,
    "gaussian_full": gaussian_full_entropy,
    "knn": knn_entropy,
    "renyi": renyi_entropy,
}


def _estimator(method: str) -> Callable[..., Result]:
    """The estimator of ``method``: one of :data:`METHODS` (the paper's) or a robust bucket
    variant (:data:`entrodrop_fast.ops.robust.ROBUST_METHODS`, opt-in)."""
    fn = _ESTIMATORS.get(method)
    if fn is None:
        from entrodrop_fast.ops.robust import ROBUST_ESTIMATORS, ROBUST_METHODS

        fn = ROBUST_ESTIMATORS.get(method)
        if fn is None:
            raise ValueError(
                f"unknown entropy method {method!r}; "
                f"choose from {', '.join(METHODS + ROBUST_METHODS)}"
            )
    return fn


def entropy(x: Array, method: str = "bucket", f: Array | None = None, **opts: Any) -> Result:
    """Entropy of x (or of x + f) by ``method``: one of :data:`METHODS` (the paper's
    estimators) or the robust bucket variants ``bucket_q``, ``bucket_nosink``,
    ``bucket_tokennorm`` (:mod:`entrodrop_fast.ops.robust`). ``opts`` are the method's own
    keyword options; shapes, dtypes, units and errors are those of the method's function."""
    return _estimator(method)(x, f, **opts)


def delta_entropy(x: Array, f: Array, method: str = "bucket", **opts: Any) -> Result:
    """Entropy increase of a block, H(X + F(X)) - H(X), per sample.

    bucket and gaussian_diag on a backend with a pair kernel (cpp, CPU) read x and f once for
    both entropies; the result, errors and warnings are those of the two calls.

    Raises ValueError when f is None (H(X + F) - H(X) needs the block's output F).
    """
    if f is None:
        raise ValueError(
            "delta_entropy needs f, the block's output F(X) (the residual update): "
            "H(X + F) - H(X) of f = None would be 0; for H(X) alone call entropy(x, method)"
        )
    # the warnings (of the pair kernel's path or of the two calls), re-issued at the caller of
    # delta_entropy (not inside the package)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _paired_delta(x, f, method, opts) if method in _PAIR_OPTS else None
        if out is None:
            out = entropy(x, method, f, **opts) - entropy(x, method, None, **opts)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package
    for w in caught:
        if os.path.abspath(w.filename).startswith(here):
            warnings.warn(w.message, w.category, stacklevel=2)
        else:  # another library's (numpy, triton): where it was
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


# method -> (its keyword options, the backend op with a pair kernel)
_PAIR_OPTS = {
    "bucket": ({"bins", "paper_exact", "mask", "backend", "nan_policy", "validate"}, "bucket"),
    "gaussian_diag": ({"var_floor", "mask", "backend", "nan_policy", "validate"}, "moments"),
}


def _paired_delta(x: Array, f: Array, method: str, opts: dict[str, Any]) -> Result | None:
    """delta_entropy from one pair kernel call, or None where the two calls must run: no pair
    kernel, an option the estimator would refuse, bad input (the two calls then raise, or
    omit and warn, exactly as they do), or a non-finite output (the same)."""
    names, op = _PAIR_OPTS[method]
    if not set(opts) <= names:
        return None  # the estimator raises its TypeError
    validate = opts.get("validate", True)
    nan_policy = opts.get("nan_policy", "raise")
    try:
        if method == "bucket":
            bins = _integer(opts.get("bins", 20), "bins", 1, MAX_BINS)
            _flag(opts.get("paper_exact", False), "paper_exact")
        else:
            var_floor = _real(opts.get("var_floor", 1e-12), "var_floor", lo=0.0)
        xt, _ = _to_torch(x, "x")
        pair = _pair_kernel(resolve_backend(opts.get("backend", "auto"), xt.device), xt.device, op)
    except (TypeError, ValueError):
        return None  # the estimator raises it, with its own message
    if pair is None:
        return None
    try:
        p = prepare(
            x,
            f,
            opts.get("mask"),
            nan_policy=nan_policy,
            backend=opts.get("backend", "auto"),
            validate=validate,
            op=op,
            defer_only=True,
        )
    except _CannotDefer:  # (too few tokens: the two calls raise)
        return None
    if method == "bucket":
        hy, hx = (
            h.to(torch.float64).sum(-1)
            for h in pair(p.x, p.f, p.mask, bins, opts.get("paper_exact", False))
        )
        if p.deferred and not _all_finite(hy, hx):
            return None
        return _finish(p, hy) - _finish(p, hx)
    ms = pair(p.x, p.f, p.mask)
    var = [m["m2"] / m["count"][:, None] for m in ms]
    if validate:
        low = [_amin(v) for v in var]
        if p.deferred and any(math.isnan(v) for v in low):
            return None
        for v, lo in zip(
            var, low, strict=True
        ):  # as gaussian_diag_entropy: Y's warning first, then x's
            _warn_floored(v, lo, var_floor)
    hs = [_gaussian_half_log_sum(v, var_floor) for v in var]
    return _finish(p, hs[0]) - _finish(p, hs[1])


# ---------------------------------------------------------------- similarity


def cosine_importance(
    x: Array,
    f: Array | None = None,
    *,
    y: Array | None = None,
    mask: Array | None = None,
    backend: str = "auto",
    nan_policy: str = "raise",
    validate: bool = True,
) -> Result:
    """LLM-Drop / ShortGPT importance: 1 - mean over tokens of cos(X_t, Y_t).

    Give either ``f`` (then Y = X + f, fused) or ``y`` itself.
    """
    other, fused, f_name = _second_input(f, y)
    p = prepare(
        x,
        other,
        mask,
        min_tokens=1,
        nan_policy=nan_policy,
        backend=backend,
        validate=validate,
        op="cosine",
        f_name=f_name,
        add=fused,
    )
    s, n = _kernel(p, "cosine")(p.x, p.f, p.mask, fused)
    if p.deferred and not _all_finite(s):  # a token's x or Y held NaN/Inf: its cos is NaN
        p = _recheck(p, min_tokens=1, nan_policy=nan_policy, f_name=f_name, add=fused)
        if p.omitted:
            s, n = _kernel(p, "cosine")(p.x, p.f, p.mask, fused)
    return _finish(p, 1.0 - s.to(torch.float64) / n.to(torch.float64))


def _second_input(f: Array | None, y: Array | None) -> tuple[Array, bool, str]:
    """(the tensor, fused, its name) of the cosine's second input: f (Y = X + f) or y."""
    if (f is None) == (y is None):
        raise ValueError("give exactly one of f (Y = X + f) or y")
    return (f, True, "f") if f is not None else (cast(Array, y), False, "y")


def bucket_entropy_and_cosine(
    x: Array,
    f: Array | None = None,
    *,
    y: Array | None = None,
    bins: int = 20,
    paper_exact: bool = False,
    mask: Array | None = None,
    backend: str = "auto",
    nan_policy: str = "raise",
    validate: bool = True,
) -> tuple[Result, Result]:
    """``(bucket_entropy(x, f), cosine_importance(x, f))`` (or with ``y=``) from one read of
    the inputs, where the backend has the fused kernel: ``cpp`` on CPU when no sample has more
    than 2048 valid tokens, ``triton`` on its fused bucket path (bins <= 32); elsewhere the
    two kernels run in turn.

    What the profiler needs at a block when both are asked for: Y = x + f (give ``f``: a
    block's input and its branch output) or Y = ``y`` (the block's output itself). x, f, y:
    ``[N, D]`` or ``[B, T, D]``, float32 / float16 / bfloat16 (float64 is read as float32),
    one dtype and device; ``mask`` ``[N]`` or ``[B, T]`` bool. Returns two float64 results
    as :func:`bucket_entropy` (nats, summed over channels; EntroDrop, arXiv 2504.03794, Eq. 5)
    and :func:`cosine_importance` (1 - mean cos; LLM-Drop / ShortGPT), each 0-d for ``[N, D]``
    and ``[B]`` for ``[B, T, D]``, numpy arrays for non-torch input.

    Raises as the two estimators do, with one difference: a token holding NaN/Inf in x (or
    in Y) counts for both results, so ``nan_policy="omit"`` takes it out of both, and with
    ``"raise"`` NaN/Inf in x raises even though the entropy reads only Y. The cosine then
    needs at least 2 valid tokens, as the entropy does. The fused CPU kernel's histograms are
    bit-identical to :func:`bucket_entropy`'s; its cosine sums in another order than
    :func:`cosine_importance`'s (fp32 partial sums of 64 channels, folded in fp64), so the
    two importances agree to fp32 rounding: about 1e-8 absolute. Near 0 (x and Y nearly
    parallel) that is a relative difference up to ~1e-4, as between
    :func:`cosine_importance` itself and an fp64 computation.
    """
    bins = _integer(bins, "bins", 1, MAX_BINS, _BINS_WHY)
    paper_exact = _flag(paper_exact, "paper_exact")
    other, fused, f_name = _second_input(f, y)
    p = prepare(
        x,
        other,
        mask,
        nan_policy=nan_policy,
        backend=backend,
        validate=validate,
        op="bucket_cosine",
        f_name=f_name,
        add=fused,
    )

    def run(p: _Prepared) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = _kernel(p, "bucket_cosine")  # None where the backend has no fused kernel
        if k is not None:
            hd, s, n = (
                k(p.x, p.f, None, p.mask, bins, paper_exact)
                if fused
                else k(p.f, None, p.x, p.mask, bins, paper_exact)
            )
        else:  # the two kernels in turn
            yx, yf = (p.x, p.f) if fused else (p.f, None)
            hd = _kernel(p, "bucket")(yx, yf, p.mask, bins, paper_exact)
            s, n = _kernel(p, "cosine")(p.x, p.f, p.mask, fused)
        return hd.to(torch.float64).sum(-1), s.to(torch.float64), n.to(torch.float64)

    h, s, n = run(p)
    if p.deferred and not _all_finite(h, s):  # the kernel saw NaN/Inf in x or Y
        p = _recheck(p, nan_policy=nan_policy, f_name=f_name, add=fused)
        if p.omitted:
            h, s, n = run(p)
    return _finish(p, h), _finish(p, 1.0 - s / n)


def angular_distance(
    x: Array,
    y: Array,
    *,
    mask: Array | None = None,
    nan_policy: str = "raise",
    validate: bool = True,
) -> Result:
    """arccos(cos(x_last, y_last)) / pi on the last valid token of each sample (Gromov et al.)."""
    p = prepare(
        x,
        y,
        mask,
        min_tokens=1,
        nan_policy=nan_policy,
        backend="torch",
        validate=validate,
        f_name="y",
        add=False,
    )
    B, T, _ = p.x.shape
    if p.mask is None:
        last = torch.full((B,), T - 1, device=p.x.device)
    else:
        last = T - 1 - p.mask.flip(1).to(torch.int8).argmax(1)  # index of the last True
    rows = torch.arange(B, device=p.x.device)
    a = p.x[rows, last].double()
    c = cast(torch.Tensor, p.f)[rows, last].double()  # p.f: y
    cos = (a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1)).clamp_min(reference.COS_EPS)
    return _finish(p, torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi)
