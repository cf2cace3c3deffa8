"""The only module that imports the compiled extension ``entrodrop_fast._C``.

If the extension is missing or fails to load, the package still imports and the
torch backend works; :func:`require` raises an error that says why and how to build.
"""

from __future__ import annotations

from types import ModuleType

_C: ModuleType | None = None
_ERROR: str | None = None

try:  # pragma: no branch
    from entrodrop_fast import _C as _C
except Exception as exc:  # ImportError, OSError (bad .so), ...
    _ERROR = f"{type(exc).__name__}: {exc}"
else:
    from entrodrop_fast import _fork

    if _fork.FORKED and hasattr(_C, "mark_forked_cpu"):  # loaded only after a fork
        _C.mark_forked_cpu()

BUILD_HINT = (
    "build it with `pip install .` (or `pip install -e . --no-build-isolation`) from the "
    "source tree; it needs a C++17 compiler and CMake, and nvcc for the CUDA kernels"
)


def available() -> bool:
    return _C is not None


def has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def error() -> str | None:
    return _ERROR


def require() -> ModuleType:
    """Return the extension module (its functions and constants: ``_C.pyi``) or raise a
    RuntimeError saying why it is unavailable."""
    if _C is None:
        raise RuntimeError(
            f"the compiled extension entrodrop_fast._C is not available ({_ERROR}); {BUILD_HINT}"
        )
    return _C
