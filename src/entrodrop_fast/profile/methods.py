"""The profile's method names, and the parser of a method list: plain Python, no torch.

One table for every place that names the methods: the runners (:mod:`.inmemory`), the
comparison (:mod:`entrodrop_fast.evaluate.compare`) and the command-line parsers, which read
it without loading torch.
"""

from __future__ import annotations

from collections.abc import Iterable

# the last three: robust bucket variants (entrodrop_fast.ops.robust; issue 14), opt-in
ENTROPY_METHODS = (
    "bucket",
    "gaussian_diag",
    "gaussian_full",
    "knn",
    "renyi",
    "bucket_q",
    "bucket_nosink",
    "bucket_tokennorm",
)
SIMILARITY_METHODS = ("cosine", "angular")
ALL_METHODS = ENTROPY_METHODS + SIMILARITY_METHODS


def parse_methods(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"bucket,cosine"`` or ``["bucket", "knn,renyi"]`` -> ("bucket", "cosine", ...), checked.

    Names are lower-cased, ``all`` stands for :data:`ALL_METHODS`, repeats are dropped (first
    place kept). Raises ValueError for an unknown name or an empty list.
    """
    items = [spec] if isinstance(spec, str) else list(spec or [])
    out: list[str] = []
    for item in items:
        for m in str(item).split(","):
            m = m.strip().lower()
            if not m:
                continue
            if m == "all":
                out.extend(x for x in ALL_METHODS if x not in out)
                continue
            if m not in ALL_METHODS:
                raise ValueError(
                    f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)} "
                    "(several: comma-separated)"
                )
            if m not in out:
                out.append(m)
    if not out:
        raise ValueError(f"no method given; choose from {', '.join(ALL_METHODS)}")
    return tuple(out)
