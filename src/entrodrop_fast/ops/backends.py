"""The backend table: which implementation runs each op of each backend on each device.

A *backend* is what users name (``backend="cpp"``); a *backend module* implements that
backend's own kernels and nothing else (:class:`BackendModule`):

==========  ===================================  ==========================================
backend     module                               its kernels
==========  ===================================  ==========================================
``cuda``    ``ops/cuda_backend.py``              CUDA C++ (csrc/*_cuda.cu), CUDA tensors
``cpp``     ``ops/cpp_backend.py``               C++ (csrc/*_cpu.cpp), CPU tensors
``triton``  ``ops/triton_backend.py``            Triton (ops/triton/), CUDA tensors; CPU
                                                 tensors under ``TRITON_INTERPRET=1``
``torch``   ``ops/torch_backend.py``             the readable reference (ops/reference.py)
==========  ===================================  ==========================================

:data:`TABLE` says, per (backend, device type), which implementation runs each op:
:data:`NATIVE` (the backend module's own function of that name) or what stands in for it,
tried in order: another backend (``"triton"``, ``"torch"``: that backend's implementation of
the op on the device, where that backend is available) or ``"knn_tiled"`` (the tiled GEMM
search of :mod:`entrodrop_fast.ops.knn_tiled`). Nothing else hands work between modules: the
API asks :func:`kernel` and calls what it returns. :data:`ALIASES` keeps old spellings:
``backend="cpp"`` on CUDA tensors means the ``cuda`` backend (resolved in one place,
:func:`resolve_backend`). :func:`backends` reports all of it, fallbacks included.

A backend module's declarations apply to its native ops only: ``REPORTS_NONFINITE[device]``
(the kernel reports NaN/Inf in Y through its outputs, docs/CONTRACT.md "Non-finite values")
and ``PAIRS[device]`` (an ``<op>_pair`` kernel, for delta_entropy). A stand-in is treated as
neither (the API validates before it runs and calls it twice for a delta).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeAlias

import torch

# every backend name, in the order "auto" prefers (the first available for the device wins)
BACKENDS = ("cuda", "cpp", "triton", "torch")
# (name the user gave, device type) -> the backend that runs it
ALIASES: dict[tuple[str, str], str] = {("cpp", "cuda"): "cuda"}

# The ops of the table (what the estimators of ops/api.py call):
#   moments(x, f, mask) -> dict               count/mean/m2/min/max of Y = x (+ f), [B, T, D]
#   bucket(x, f, mask, bins, paper_exact)     H_d fp64 [B, D]
#   cosine(x, other, mask, fused)             (sum of cos, count) fp64 [B] each
#   bucket_cosine(x, f, c, mask, bins,        (H_d [B, D], sum of cos [B], count [B]) fp64: bucket
#                 paper_exact)                of Y = x (+ f) and cosine of Y with x (f given) or
#                                             c, from one read; optional (without it: bucket,
#                                             then cosine)
#   knn_kth_distance(x, k)                    fp64 [N] for x [N, D]
#   knn_terms(x, f, mask, k)                  (count, logsum) fp64 [B]: the whole batch at once;
#                                             optional (without it: knn_kth_distance per sample)
#   covariance(r) / renyi(r, alpha)           gaussian_full's covariance, renyi's entropy of one
#                                             sample [N, D]: the torch reference everywhere
OPS = (
    "moments",
    "bucket",
    "cosine",
    "bucket_cosine",
    "knn_kth_distance",
    "knn_terms",
    "covariance",
    "renyi",
)
OPTIONAL_OPS = frozenset({"knn_terms", "bucket_cosine"})

NATIVE = "native"
# a table entry: NATIVE, or the stand-ins tried in order
Route: TypeAlias = str | tuple[str, ...]
_KNN_TILED = "knn_tiled"  # not a backend: the tiled GEMM knn of ops/knn_tiled.py (any device)
_REFERENCE_ONLY: dict[str, Route] = {"covariance": ("torch",), "renyi": ("torch",)}
_TORCH: dict[str, Route] = {
    "moments": NATIVE,
    "bucket": NATIVE,
    "cosine": NATIVE,
    "knn_kth_distance": NATIVE,
    "covariance": NATIVE,
    "renyi": NATIVE,
}
_TRITON: dict[str, Route] = {
    "moments": NATIVE,
    "bucket": NATIVE,
    "cosine": NATIVE,
    "bucket_cosine": NATIVE,
    "knn_kth_distance": (_KNN_TILED,),
    **_REFERENCE_ONLY,
}

# (backend, device type) -> op -> NATIVE, or the stand-ins tried in order
TABLE: dict[tuple[str, str], dict[str, Route]] = {
    ("cuda", "cuda"): {
        "moments": NATIVE,
        "bucket": NATIVE,
        "cosine": ("triton", "torch"),  # no CUDA C++ kernel
        # no bucket_cosine: the CUDA bucket kernel, then Triton's cosine (Triton's fused
        # bucket_cosine is not measured against that pair on a GPU yet)
        "knn_kth_distance": (_KNN_TILED,),  # cuBLAS tiles beat a custom kernel (28x, H200)
        **_REFERENCE_ONLY,
    },
    ("cpp", "cpu"): {
        "moments": NATIVE,
        "bucket": NATIVE,
        "cosine": NATIVE,
        "bucket_cosine": NATIVE,
        "knn_kth_distance": NATIVE,
        "knn_terms": NATIVE,
        **_REFERENCE_ONLY,
    },
    ("triton", "cuda"): _TRITON,
    ("triton", "cpu"): _TRITON,  # under TRITON_INTERPRET=1 only (triton_backend.devices())
    ("torch", "cpu"): _TORCH,
    ("torch", "cuda"): _TORCH,
}

_MODULES = {
    "cuda": "entrodrop_fast.ops.cuda_backend",
    "cpp": "entrodrop_fast.ops.cpp_backend",
    "triton": "entrodrop_fast.ops.triton_backend",
    "torch": "entrodrop_fast.ops.torch_backend",
}


class BackendModule(Protocol):
    """What a backend module exports (ops/cuda_backend.py, cpp_backend.py, triton_backend.py,
    torch_backend.py): where it runs, its declarations, and the kernels :data:`TABLE` marks
    :data:`NATIVE` for it, with the signatures of :class:`Kernels`."""

    # device type -> ops whose kernel reports NaN/Inf in Y through its outputs
    REPORTS_NONFINITE: Mapping[str, frozenset[str]]
    # device type -> ops with an <op>_pair kernel (Y = x + f and x from one read)
    PAIRS: Mapping[str, frozenset[str]]

    def available(self) -> tuple[bool, str]: ...  # (usable here, why not)

    def devices(self) -> set[str]: ...  # device types its kernels take


class Kernels(Protocol):
    """The signatures of the table's ops (a backend module defines those it runs natively)."""

    def moments(
        self, x: torch.Tensor, f: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]: ...

    def bucket(
        self,
        x: torch.Tensor,
        f: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        bins: int = 20,
        paper_exact: bool = False,
    ) -> torch.Tensor: ...

    def cosine(
        self,
        x: torch.Tensor,
        other: torch.Tensor,
        mask: torch.Tensor | None = None,
        fused: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def bucket_cosine(
        self,
        x: torch.Tensor,
        f: torch.Tensor | None,
        c: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        bins: int = 20,
        paper_exact: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def knn_kth_distance(self, x: torch.Tensor, k: int) -> torch.Tensor: ...

    def knn_terms(
        self, x: torch.Tensor, f: torch.Tensor | None, mask: torch.Tensor | None, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def covariance(self, r: torch.Tensor) -> torch.Tensor: ...

    def renyi(self, r: torch.Tensor, alpha: float = 4.0) -> torch.Tensor: ...

    def moments_pair(
        self, x: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[dict, dict]: ...

    def bucket_pair(
        self,
        x: torch.Tensor,
        f: torch.Tensor,
        mask: torch.Tensor | None = None,
        bins: int = 20,
        paper_exact: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


# ---------------------------------------------------------------- loading


_imported: dict[str, Any] = {}  # name -> module, or None where it failed to import
_loaded: dict[str, Any] = {}  # name -> module, for the backends available here
_load_errors: dict[str, str] = {}  # name -> why not


def _import(name: str) -> Any:
    """The backend module (its declarations), available here or not; None if it fails to
    import."""
    if name not in _imported:
        try:
            _imported[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # a backend must never break the package import
            _imported[name] = None
            _load_errors.setdefault(name, f"{type(exc).__name__}: {exc}")
    return _imported[name]


def _module(name: str) -> Any:
    """The backend module when it is available here, else None (the reason in _load_errors)."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    mod = _import(name)
    if mod is None:
        return None
    try:
        ok, why = mod.available()
    except Exception as exc:
        ok, why = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        _load_errors[name] = why or "unavailable"
        return None
    _loaded[name] = mod
    return mod


def _runs(name: str, dev: str) -> bool:
    mod = _module(name)
    return mod is not None and dev in mod.devices()


def _dev(device: torch.device | str) -> str:
    return device if isinstance(device, str) else torch.device(device).type


# ---------------------------------------------------------------- choosing a backend


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Name of the backend to use for tensors on ``device`` (aliases resolved: "cpp" on CUDA
    tensors is "cuda"); raises ValueError if impossible."""
    dev = _dev(device)
    if backend == "auto":
        forced = os.environ.get("ENTRODROP_BACKEND")
        if forced:
            return resolve_backend(forced, device)
        for name in BACKENDS:
            if _runs(name, dev):
                if name == "torch":
                    _warn_reference_fallback()
                return name
        _warn_reference_fallback()
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r}; choose from 'auto', "
            + ", ".join(repr(b) for b in BACKENDS)
            + f" (available here: {_available_list(dev)})"
        )
    name = ALIASES.get((backend, dev), backend)
    said = repr(backend) if name == backend else f"{backend!r} (on {dev} tensors: {name!r})"
    mod = _module(name)
    if mod is None:
        hint = ""
        why = str(_load_errors.get(name))
        # built, but nothing to run it on: building again would not help
        if why == "no CUDA device":
            hint = (
                "; the CUDA kernels need a GPU (on a CPU, backend 'cpp' or 'auto' runs the "
                "compiled CPU kernels)"
            )
        elif name in ("cpp", "cuda"):
            from entrodrop_fast import _ext

            if _ext.BUILD_HINT not in why:
                hint = f"; {_ext.BUILD_HINT}"
        raise ValueError(
            f"backend {said} is not available ({_load_errors.get(name)}){hint}; "
            f"available here: {_available_list(dev)}"
        )
    if dev not in mod.devices():
        raise ValueError(
            f"backend {said} does not run on {dev} tensors; "
            f"available for {dev}: {_available_list(dev)}"
        )
    return name


_fallback_warned = False


def _warn_reference_fallback() -> None:
    """Once per process: ``auto`` fell back to the torch reference because the compiled
    extension did not load (a source checkout on sys.path, a failed build, a bad .so)."""
    global _fallback_warned
    if _fallback_warned or "cpp" not in _load_errors:
        return
    _fallback_warned = True
    from entrodrop_fast import _ext

    warnings.warn(
        f"entrodrop_fast: the compiled kernels are not available ({_load_errors['cpp']}); "
        "backend='auto' uses the torch reference, 25-600x slower. "
        f"Package imported from {os.path.dirname(os.path.dirname(__file__))}; "
        f"{_ext.BUILD_HINT}",
        RuntimeWarning,
        stacklevel=4,
    )


def _available_list(dev: str) -> str:
    return ", ".join(n for n in BACKENDS if _runs(n, dev)) or "none"


# ---------------------------------------------------------------- the table's answers


def route(backend: str, device: torch.device | str, op: str) -> Route | None:
    """The table's entry for ``op`` of ``backend`` (aliases resolved) on ``device``: NATIVE,
    the stand-ins in order, or None (no such op there: only optional ops)."""
    dev = _dev(device)
    name = ALIASES.get((backend, dev), backend)
    return TABLE.get((name, dev), {}).get(op)


def kernel(backend: str, device: torch.device | str, op: str) -> Callable[..., Any] | None:
    """The function that runs ``op`` for ``backend`` on ``device`` (the first usable
    implementation of its table entry), or None where the table has none (an optional op)."""
    dev = _dev(device)
    name = ALIASES.get((backend, dev), backend)
    impl = route(name, dev, op)
    if impl is None:
        if op in OPTIONAL_OPS:
            return None
        raise ValueError(f"backend {name!r} has no {op!r} on {dev} tensors (ops/backends.py TABLE)")
    if impl == NATIVE:
        return getattr(_import(name), op)
    for target in impl:
        if target == _KNN_TILED:
            from entrodrop_fast.ops import knn_tiled

            return knn_tiled.knn_kth_distance
        if _runs(target, dev):
            return kernel(target, dev, op)
    raise ValueError(
        f"no implementation of {op!r} for backend {name!r} on {dev} tensors: "
        f"{', '.join(impl)} unavailable"
    )


def _native_module(backend: str, dev: str, op: str) -> Any:
    """The backend module when ``op`` is native to it on ``dev`` (its declarations apply)."""
    name = ALIASES.get((backend, dev), backend)
    if route(name, dev, op) != NATIVE:
        return None
    return _import(name)


def reports_nonfinite(backend: str, device: torch.device | str, op: str) -> bool:
    """Whether ``backend``'s ``op`` kernel reports NaN/Inf in Y among the valid tokens through
    its outputs on this device (``REPORTS_NONFINITE`` of its module; stand-ins never do)."""
    dev = _dev(device)
    mod = _native_module(backend, dev, op)
    return mod is not None and op in getattr(mod, "REPORTS_NONFINITE", {}).get(dev, ())


def pair_kernel(backend: str, device: torch.device | str, op: str) -> Callable[..., Any] | None:
    """``backend``'s pair kernel ``<op>_pair`` on this device (``PAIRS`` of its module), or
    None."""
    dev = _dev(device)
    mod = _native_module(backend, dev, op)
    if mod is None or op not in getattr(mod, "PAIRS", {}).get(dev, ()):
        return None
    return getattr(mod, f"{op}_pair", None)


def _describe(impl: Route) -> str:
    if impl == NATIVE:
        return NATIVE
    return " or ".join(t if t != _KNN_TILED else "knn_tiled (ops/knn_tiled.py)" for t in impl)


def backends() -> dict[str, dict[str, Any]]:
    """Which backends exist, on which devices, why not where they don't, and per device what
    runs each op: ``"native"`` or the implementation it falls back to (``ops``), which ops
    have pair kernels (``pairs``) and report non-finite input themselves (``reports_nonfinite``),
    and the old spellings that lead to it (``aliases``: name -> device type)."""
    out = {}
    for name in BACKENDS:
        mod = _module(name)
        decl = mod if mod is not None else _import(name)
        rows = {
            dev: {op: _describe(impl) for op, impl in ops.items()}
            for (b, dev), ops in TABLE.items()
            if b == name
        }
        info = {
            "available": mod is not None,
            "devices": sorted(mod.devices()) if mod is not None else [],
            "reason": "" if mod is not None else _load_errors.get(name, ""),
            "ops": rows,
            "pairs": {dev: sorted(getattr(decl, "PAIRS", {}).get(dev, ())) for dev in rows},
            "reports_nonfinite": {
                dev: sorted(getattr(decl, "REPORTS_NONFINITE", {}).get(dev, ())) for dev in rows
            },
            "aliases": {alias: dev for (alias, dev), target in ALIASES.items() if target == name},
        }
        out[name] = info
    return out
