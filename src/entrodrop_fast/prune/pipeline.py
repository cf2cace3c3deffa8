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
    from entrodrop_fast.profile.inmemory import ProfileSettings
    from entrodrop_fast.profile.pipeline import Calibration
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


def iterative_plan_for(
    source_dir: str | os.PathLike[str],
    kind: str,
    drop: int | float | str,
    *,
    method: str | None = None,
    protect: str | list[int] | None = None,
    settings: ProfileSettings | None = None,
    calibration: Calibration | None = None,
    dtype: str = "fp32",
    device: str | None = None,
    preset: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Iterative re-scoring of the model in the local directory ``source_dir``: load it, draw
    the calibration windows, then drop one block at a time and profile again
    (:func:`entrodrop_fast.prune.ranking.iterative_plan`). Returns the plan dict. As
    :func:`prune_model`'s plan, pass ``lambda src: iterative_plan_for(src, ...)`` so that the
    very files pruned are the ones scored.

    ``kind`` / ``drop`` / ``method`` / ``protect`` / ``preset``: as for ``make_plan``;
    ``settings``: the estimators' settings
    (:class:`~entrodrop_fast.profile.inmemory.ProfileSettings`);
    ``calibration``: where the windows come from (None: the paper's 128 x 256 of the built-in
    corpus). Raises what loading, the corpus and ``iterative_plan`` raise (ValueError,
    ModelLoadError, CorpusError); nothing is written.
    """
    from entrodrop_fast.data import calibration_windows
    from entrodrop_fast.models import load_model
    from entrodrop_fast.profile.pipeline import Calibration
    from entrodrop_fast.prune.ranking import iterative_plan

    calibration = calibration or Calibration()
    lm = load_model(str(source_dir), dtype=dtype, device=device)
    windows, info = calibration_windows(
        lm.tokenizer,
        calibration.corpus,
        samples=calibration.samples,
        seq_len=calibration.seq_len,
        seed=calibration.seed,
        text_field=calibration.text_field,
    )
    if log is not None:
        methods = ", ".join(settings.methods) if settings is not None else "bucket"
        log(
            f"profiling {Path(source_dir).name}: {info['samples']} x {info['seq_len']} tokens, "
            f"method {methods} ..."
        )
    plan = iterative_plan(
        lm.model,
        windows,
        kind,
        drop,
        method=method,
        protect=protect,
        settings=settings,
        progress=progress,
        preset=preset,
    )
    plan["model"].update({"name": str(source_dir), "path": str(source_dir)})
    return plan
