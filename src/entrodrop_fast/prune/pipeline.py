"""The prune stage in one call: a model source and a drop plan -> a smaller checkpoint on disk.

:func:`prune_model` is what ``entrodrop prune`` calls. The plan comes from
:func:`entrodrop_fast.prune.ranking.make_plan` (a profile's report), from
:func:`entrodrop_fast.prune.ranking.iterative_plan`, or from a plan file; the checkpoint is
rewritten tensor by tensor (:func:`entrodrop_fast.prune.export.export_pruned`), published
atomically, and the source is only read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from entrodrop_fast.prune.export import ExportSummary


def prune_model(
    source: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    plan: dict[str, Any] | str | os.PathLike[str] | Callable[[Path], dict[str, Any]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> tuple[Path, dict[str, Any], ExportSummary]:
    """Write ``source`` without the blocks of ``plan`` into the directory ``out``.

    ``source``: what :func:`entrodrop_fast.models.loading.resolve_source` accepts (None: the
    built-in SmolLM2-135M-Instruct; a built-in name, a local directory, a ``.gguf`` file
    converted into a scratch directory beside ``out`` and removed afterwards, a hub id).
    ``plan``: a plan dict, the path of a plan JSON, or a callable that receives the local
    source directory and returns the plan (to profile the very files that are pruned).
    ``overwrite``: replace an earlier pruned model in ``out``, or write into a directory
    holding other files (left untouched). ``cache_dir``: where a built-in model is converted
    and kept (None: the default cache).

    Returns ``(source directory, plan, ExportSummary)``: the local directory that was read
    (for a ``.gguf`` source, its scratch conversion, removed by then), the plan as a dict (as
    written beside the checkpoint) and what was written. Raises
    ValueError for a bad plan, ModelLoadError / ExportError when the model cannot be read or
    written, OutputError when ``out`` holds something else and ``overwrite`` is not set;
    ``out`` is then as it was.
    """
    from entrodrop_fast import outputs
    from entrodrop_fast.models.loading import resolve_source
    from entrodrop_fast.prune.export import export_pruned
    from entrodrop_fast.prune.surgery import read_plan

    out = Path(out).expanduser()
    with outputs.scratch_dir(out) as work:
        src = resolve_source(source, cache_dir, workdir=Path(work))
        if callable(plan):
            plan = plan(src)
        elif not isinstance(plan, dict):
            plan = read_plan(plan)
        summary = export_pruned(src, out, plan, overwrite=overwrite, plan_to_save=plan)
    return src, plan, summary
