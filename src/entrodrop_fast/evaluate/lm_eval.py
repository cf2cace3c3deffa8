"""Run lm-evaluation-harness tasks on a (pruned) model.

The model object is handed to lm-eval's Hugging Face wrapper (``HFLM``) as it is, so
attention- or MLP-dropped models (whose modeling code lives in this package or in their
directory) are evaluated exactly as they run here, with the same per-choice
log-likelihoods as ``lm-eval run --model hf --model_args pretrained=DIR`` on the same
directory.

Two steps, so that a command can refuse a bad request before it loads a model:

- :func:`prepare_tasks` imports lm-eval, registers the task directories of
  ``include_path``, resolves every requested task (a registered name, group or tag, a task
  YAML file, or a config dict) and reads its data;
- :func:`evaluate_tasks` / :func:`run_lm_eval` run them on a model.

Every failure raises a subclass of :class:`LmEvalUnavailable` whose message says what was
wrong and what to do: lm-eval or a module of its ``[hf]`` extra missing
(:class:`LmEvalMissing`), a task that is not registered (:class:`TaskNotFound`), a hub
dataset that cannot be fetched (:class:`HubUnreachable`), a local data file that is missing
or unreadable (:class:`TaskDataError`), an invalid task config (:class:`TaskConfigError`)
or a failure while the tasks ran (:class:`TaskRunError`).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrodrop_fast._names import setting

MIN_VERSION = "0.4.13"
INSTALL_HINT = f"pip install 'entrodrop_fast[eval]' (or pip install 'lm-eval[hf]>={MIN_VERSION}')"
DEFAULT_BATCH_SIZE = 8
# modules that lm-eval >= 0.4.13 installs only with its [hf] extra
_HF_EXTRA = {"torch", "transformers", "accelerate", "peft"}


def _how_to_register() -> str:
    return (
        "a local task is registered by putting its YAML (with `task: NAME`) in a directory and "
        f"passing {setting('include_path')} DIR, then asking for NAME; a task YAML's own path "
        "works too; `lm-eval ls tasks` lists the built-in ones"
    )


class LmEvalUnavailable(RuntimeError):
    """lm-eval tasks cannot be run here; the message says why and what to do."""


class LmEvalMissing(LmEvalUnavailable):
    """lm-eval, or a module of its [hf] extra, is not installed (or it is too old)."""


class TaskNotFound(LmEvalUnavailable):
    """A requested task is neither a registered name nor an existing task file."""


class HubUnreachable(LmEvalUnavailable):
    """A task's dataset lives on the Hugging Face hub, which could not be reached."""


class TaskDataError(LmEvalUnavailable):
    """A task's data is missing or unreadable (a local data file, or a hub dataset that does not
    exist)."""


class TaskConfigError(LmEvalUnavailable):
    """A task config (YAML or dict) is invalid."""


class TaskRunError(LmEvalUnavailable):
    """lm-eval failed while running the tasks on the model."""


@dataclass
class PreparedTasks:
    """Tasks resolved and with their data read, ready for :func:`evaluate_tasks`."""

    specs: list  # as requested
    names: list[str]  # one per spec, for messages
    items: list = field(repr=False)  # lm-eval Task / Group objects, one or more per spec
    task_manager: Any = field(repr=False)
    include_path: list[str] = field(default_factory=list)


def spec_name(spec) -> str:
    """A task spec as a short text: a name or path, a config dict's task/group, a Task's name."""
    if isinstance(spec, str | os.PathLike):
        return str(spec)
    if isinstance(spec, dict):
        for key in ("task", "group"):
            if isinstance(spec.get(key), str):
                return spec[key]
        keys = ", ".join(map(str, spec)) or "none"
        return f"a config dict without a 'task' or 'group' name (keys: {keys})"
    return str(
        getattr(spec, "task_name", None) or getattr(spec, "name", None) or type(spec).__name__
    )


def _missing_dependency(exc: ImportError) -> LmEvalMissing:
    named = getattr(exc, "name", None) or next(
        iter(re.findall(r"No module named '([^']+)'", str(exc))), ""
    )
    missing = named.split(".")[0]
    if missing == "lm_eval":
        return LmEvalMissing(
            f"lm-evaluation-harness is not installed: {INSTALL_HINT}; the built-in zero-shot tasks "
            "need nothing"
        )
    if missing in _HF_EXTRA:
        return LmEvalMissing(
            "lm-evaluation-harness is installed without its Hugging Face extra: the module "
            f"'{missing}' is missing (lm-eval 0.4.13 and later install torch, transformers, "
            f"accelerate and peft only with lm-eval[hf]): {INSTALL_HINT}"
        )
    what = f"the module '{missing}'" if missing else str(exc)
    return LmEvalMissing(
        f"lm-evaluation-harness cannot be imported: {what} is missing ({exc}): {INSTALL_HINT}"
    )


def import_lm_eval():
    """(lm_eval, HFLM, TaskManager), or :class:`LmEvalMissing` naming the module that is missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise _missing_dependency(exc) from None
    from packaging.version import InvalidVersion, Version

    version = getattr(lm_eval, "__version__", "0")
    try:
        too_old = Version(version) < Version(MIN_VERSION)
    except InvalidVersion:
        too_old = False
    if too_old or not hasattr(TaskManager, "load"):
        raise LmEvalMissing(
            f"lm-evaluation-harness {version} is installed; entrodrop needs {MIN_VERSION} or "
            "later: pip install -U 'entrodrop_fast[eval]'"
        )
    return lm_eval, HFLM, TaskManager


def check_include_path(include_path) -> list[str]:
    """The task directories as absolute paths; each must be an existing directory."""
    if include_path is None:
        return []
    paths = [include_path] if isinstance(include_path, str | os.PathLike) else list(include_path)
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise TaskNotFound(
                f"include path {p}: no such directory (it should hold lm-eval task YAML files)"
            )
        if not path.is_dir():
            hint = (
                "; give the directory holding it, or the YAML file itself as a task"
                if path.suffix in (".yaml", ".yml")
                else ""
            )
            raise TaskNotFound(
                f"include path {p} is not a directory (lm-eval registers the task YAML files found "
                f"under a directory){hint}"
            )
        out.append(str(path.resolve()))
    return out


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...]):
    """lm-eval's task index (its built-in tasks plus ``include_path``); building it reads every
    built-in YAML (seconds), so one per set of paths is kept for the process."""
    _, _, TaskManager = import_lm_eval()
    return TaskManager(include_path=list(include_path) or None)


def _under(path, roots: list[str]) -> bool:
    try:
        resolved = Path(path).resolve()
    except (OSError, TypeError):
        return False
    return any(resolved.is_relative_to(r) for r in roots)


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec or (os.altsep or os.sep) in spec


def _not_found_message(missing: list[str], tm, include_path: list[str]) -> str:
    names = ", ".join(repr(m) for m in missing)
    text = (
        f"lm-eval task{'s' if len(missing) > 1 else ''} {names} not found: not a registered task, "
        "group or tag name, nor an existing task YAML file"
    )
    index = tm.task_index
    hints = []
    for m in missing:
        if _looks_like_path(m):
            hints.append(f"{m}: no such file")
            continue
        close = difflib.get_close_matches(m, tm.all_tasks, n=3, cutoff=0.75)
        if close:
            hints.append(f"did you mean {' or '.join(close)} (for {m!r})?")
    if include_path:
        local = sorted(
            name
            for name, e in index.items()
            if e.yaml_path is not None and _under(e.yaml_path, include_path)
        )
        shown = ", ".join(local[:12]) + (f" and {len(local) - 12} more" if len(local) > 12 else "")
        hints.append(
            f"registered from the include path: {shown}"
            if local
            else "no task was registered from the include path"
        )
        skipped = _skipped_yaml(include_path, index)
        if skipped:
            hints.append("lm-eval skipped " + "; ".join(skipped))
    else:
        hints.append("no include path was given")
    return f"{text} ({'; '.join(hints)}); {_how_to_register()}"


def _skipped_yaml(include_path: list[str], index) -> list[str]:
    """YAML files under the include path that registered nothing, with the reason (at most 3)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    registered = {
        str(Path(e.yaml_path).resolve()) for e in index.values() if e.yaml_path is not None
    }
    out: list[str] = []
    for root in include_path:
        for p in sorted(Path(root).glob("**/*.yaml")):
            if len(out) == 3 or str(p.resolve()) in registered:
                continue
            try:
                cfg = load_yaml(p, resolve_func=False, recursive=True)
                why = (
                    "it has no 'task' or 'group' key"
                    if not ({"task", "group", "class"} & set(cfg))
                    else "a name registered twice"
                )
            except Exception as exc:  # the reason lm-eval skipped it
                why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
            out.append(f"{p} ({why})")
    return out


def _config_of(spec, tm) -> dict:
    """Best effort: the task config a spec names (includes resolved), for messages only."""
    try:
        if isinstance(spec, dict):
            return spec
        entry = tm.task_index.get(spec) if isinstance(spec, str) else None
        if entry is not None:
            return dict(entry.cfg or {}, _yaml=entry.yaml_path)
        if isinstance(spec, str | os.PathLike) and Path(spec).is_file():
            from lm_eval.tasks._yaml_loader import load_yaml

            return dict(load_yaml(spec, resolve_func=False, recursive=True), _yaml=spec)
    except Exception:  # a config that cannot be read is reported by the loader itself
        pass
    return {}


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes and contexts (each once, at most 20)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 20:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
    return seen


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_HUB_ERRORS = {
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "HfHubHTTPError",
    "ConnectTimeout",
    "ReadTimeout",
    "ConnectError",
    "Timeout",
}


def _is_hub_failure(e: BaseException) -> bool:
    if isinstance(e, ConnectionError | TimeoutError):
        return True
    if type(e).__name__ in _HUB_ERRORS:
        return True
    return type(e).__module__.split(".")[0] in ("requests", "urllib3", "httpx", "httpcore")


def classify_failure(
    exc: BaseException, spec, *, tm=None, stage: str = "load"
) -> LmEvalUnavailable:
    """The :class:`LmEvalUnavailable` subclass and message for a failure of one task spec.

    ``stage``: ``"load"`` (building the task and reading its data) or ``"run"`` (evaluating).
    """
    name = spec_name(spec)
    cfg = _config_of(spec, tm) if tm is not None else (spec if isinstance(spec, dict) else {})
    where = f" ({cfg['_yaml']})" if cfg.get("_yaml") else ""
    label = f"lm-eval task {name!r}{where}"
    chain = _chain(exc)
    dataset = cfg.get("dataset_path")

    not_found = next((e for e in chain if type(e).__name__ == "DatasetNotFoundError"), None)
    missing_file = next((e for e in chain if isinstance(e, FileNotFoundError)), None)
    hub = next((e for e in chain if _is_hub_failure(e)), None)
    if missing_file is not None and hub is None and not_found is None:
        return TaskDataError(
            f"{label}: a data file is missing: {' '.join(str(missing_file).split())} (check "
            "dataset_path / data_files in the task config; relative paths are read from the "
            f"current directory, {os.getcwd()}, not from the YAML's)"
        )
    ds = f"the dataset {dataset!r}" if isinstance(dataset, str) else "its dataset"
    if hub is not None:
        offline = "OfflineModeIsEnabled" in " ".join(f"{type(e).__name__} {e}" for e in chain)
        why = (
            "which is not cached here, and HF_HUB_OFFLINE forbids fetching it"
            if offline
            else "which could not be reached (no network, a proxy or a firewall?)"
        )
        return HubUnreachable(
            f"{label} needs {ds} from the Hugging Face hub, {why} ({_short(hub)}): run it once "
            "where the hub is reachable (the dataset is then cached, and HF_HUB_OFFLINE=1 reads "
            "the cache without trying the network), or evaluate a local task: a YAML with "
            f"`dataset_path: json` and `data_files`, registered with {setting('include_path')} DIR"
        )
    if not_found is not None:
        return TaskDataError(
            f"{label}: {ds} was not found ({_short(not_found)}): check dataset_path / dataset_name "
            "in the task config (a gated hub dataset also needs a login: hf auth login)"
        )
    data_error = next((e for e in chain if type(e).__module__.startswith("datasets")), None)
    if data_error is not None:
        root = chain[-1] if chain[-1] is not data_error else data_error
        return TaskDataError(
            f"{label}: its data could not be read "
            f"({_short(data_error)}{'; ' + _short(root) if root is not data_error else ''}): check "
            "the data files and the task's dataset settings"
        )
    if stage == "run":
        return TaskRunError(f"lm-eval failed while evaluating {name} ({_short(exc)})")
    shape = (
        " (a task config needs a 'task' key, a group config a 'group' key)"
        if "config shape" in str(exc)
        else ""
    )
    return TaskConfigError(
        f"{label}: the task config is invalid ({_short(exc)}){shape}: fix the config (lm-eval "
        "validate --tasks ... checks it)"
    )


def _top_level(loaded: dict) -> list:
    """The items a spec loaded to: its group(s) (their subtasks inside), else its task(s)."""
    groups = loaded.get("groups") or {}
    if groups:
        children = {c for kids in (loaded.get("group_map") or {}).values() for c in kids}
        return [g for name, g in groups.items() if name not in children]
    return list((loaded.get("tasks") or {}).values())


def prepare_tasks(tasks, *, include_path=None) -> PreparedTasks:
    """Resolve ``tasks`` (names, YAML paths, config dicts or lm-eval Task objects) and read their
    data.

    Raises a :class:`LmEvalUnavailable` subclass naming the first task that cannot run and why.
    """
    if isinstance(tasks, PreparedTasks):
        return tasks
    specs = [tasks] if isinstance(tasks, str | dict) else list(tasks)
    specs = [s.strip() if isinstance(s, str) else s for s in specs]
    if not specs or any(s == "" for s in specs):
        raise TaskNotFound("no lm-eval task given (an empty task name)")
    paths = check_include_path(include_path)
    tm = _task_manager(tuple(paths))
    missing = [
        s
        for s in specs
        if isinstance(s, str)
        and s not in tm.task_index
        and not (_looks_like_path(s) and Path(s).expanduser().is_file())
    ]
    if missing:
        raise TaskNotFound(_not_found_message(missing, tm, paths))
    items: list = []
    for spec in specs:
        try:
            loaded = tm.load(
                [
                    str(Path(spec).expanduser())
                    if isinstance(spec, str) and spec not in tm.task_index
                    else spec
                ]
            )
        except Exception as exc:
            raise classify_failure(exc, spec, tm=tm) from exc
        items += _top_level(loaded)
    return PreparedTasks(
        specs=specs,
        names=[spec_name(s) for s in specs],
        items=items,
        task_manager=tm,
        include_path=paths,
    )


def _check_count(value, what: str, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")


def evaluate_tasks(
    model,
    tokenizer,
    tasks,
    *,
    include_path=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> dict:
    """lm-eval's own result dict (``simple_evaluate``) for ``tasks`` on ``model``.

    ``tasks``: a :class:`PreparedTasks` or what :func:`prepare_tasks` takes. ``limit``: at
    most this many documents per task; ``num_fewshot``: examples in each prompt (tasks
    whose config fixes 0 keep 0, as in lm-eval); ``log_samples``: keep each document's
    requests and responses (per-choice log-likelihoods) under ``"samples"``.
    """
    _check_count(batch_size, "batch_size", 1)
    _check_count(limit, "limit", 1)
    _check_count(num_fewshot, "num_fewshot", 0)
    lm_eval, HFLM, _ = import_lm_eval()
    prepared = prepare_tasks(tasks, include_path=include_path)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=list(prepared.items),
            task_manager=prepared.task_manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=log_samples,
        )
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            raise  # the command line has its own advice for this
        raise classify_failure(exc, ", ".join(prepared.names), stage="run") from exc


def _number(v) -> float | None:
    return (
        float(v)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        else None
    )


def result_rows(out: dict) -> list[dict]:
    """One row per task and group of an lm-eval result: every metric under its own name.

    ``metrics`` maps lm-eval's metric names (``acc``, ``acc_norm``, ``exact_match``, ...;
    ``name/filter`` for a filter other than ``none``) to their value, ``stderr`` to the
    standard error where lm-eval computed one; ``items`` is the number of documents scored.
    """
    rows = []
    groups = set(out.get("groups") or {})
    for task, res in (out.get("results") or {}).items():
        metrics, stderr = {}, {}
        for key, value in res.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}/{filt}"
            if _number(value) is None:
                continue
            metrics[name] = float(value)
            err = _number(res.get(f"{metric}_stderr,{filt}"))
            if err is not None:
                stderr[name] = err
        n = (out.get("n-samples") or {}).get(task, {})
        rows.append(
            {
                "task": task,
                "source": "lm_eval",
                "group": task in groups,
                "metrics": metrics,
                "stderr": stderr,
                "items": n.get("effective"),
                "documents": n.get("original"),
                "num_fewshot": (out.get("n-shot") or {}).get(task),
            }
        )
    return rows


def run_lm_eval(model, tokenizer, tasks, **options: Any) -> list[dict]:
    """The metrics of each task (see :func:`result_rows`): :func:`evaluate_tasks` with the
    same arguments (``options``: its keyword arguments, ``include_path``, ``batch_size``,
    ``limit``, ``num_fewshot``), its result as rows."""
    return result_rows(evaluate_tasks(model, tokenizer, tasks, **options))


def format_row(row: dict) -> str:
    """``task  acc 0.500 (stderr 0.289), acc_norm 0.750 (stderr 0.250); 4 items, 0-shot``."""
    parts = []
    for name, value in row["metrics"].items():
        err = row["stderr"].get(name)
        parts.append(f"{name} {value:.4g}" + (f" (stderr {err:.3g})" if err is not None else ""))
    extra = []
    if row.get("items") is not None:
        of = f" of {row['documents']}" if row.get("documents") not in (None, row["items"]) else ""
        extra.append(f"{row['items']}{of} items")
    if row.get("num_fewshot") is not None:
        extra.append(f"{row['num_fewshot']}-shot")
    if row.get("group"):
        extra.append("group")
    return f"{row['task']}  {', '.join(parts) or 'no numeric metric'}" + (
        f"; {', '.join(extra)}" if extra else ""
    )
