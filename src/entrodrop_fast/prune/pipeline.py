"""The prune stage in one call: a model source and a drop plan -> a smaller checkpoint on disk.

:func:`prune_model` is what ``entrodrop prune`` calls. The plan comes from
:func:`entrodrop_fast.prune.ranking.make_plan` (a profile's report), from
:func:`entrodrop_fast.prune.ranking.iterative_plan`, or from a plan file; the checkpoint is
rewritten tensor by tensor (:func:`entrodrop_fast.prune.export.export_pruned`), published
atomically, and the source is only read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def prune_model(
    source,
    out,
    plan: dict | str | Path | Callable[[Path], dict],
    *,
    cache_dir=None,
    overwrite: bool = False,
):
    """Write ``source`` without the blocks of ``plan`` into the directory ``out``.

    ``source``: what :func:`entrodrop_fast.models.loading.resolve_source` accepts (None: the
    built-in SmolLM2-135M-Instruct; a built-in name, a local directory, a ``.gguf`` file
    converted into a scratch directory beside ``out`` and removed afterwards, a hub id).
    ``plan``: a plan dict, the path of a plan JSON, or a callable that receives the local
    source directory and returns the plan (to profile the very files that are pruned).
    ``overwrite``: replace an earlier pruned model in ``out``, or write into a directory
    holding other files (left untouched).

    Returns ``(source directory, plan, ExportSummary)``. Raises ValueError for a bad plan,
    ModelLoadError / ExportError when the model cannot be read or written; ``out`` is then
    as it was.
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
