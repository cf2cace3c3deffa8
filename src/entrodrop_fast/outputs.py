"""Where commands write: targets checked before any work, results published atomically.

Every file or directory the package writes for the user (a profile report, a comparison,
a pruned checkpoint, a drop plan, an evaluation JSON, a resume directory) goes through
this module, so the rules hold everywhere:

- A target that is, contains or lies inside an input (the model, the corpus, ...) is
  refused before any work is done.
- An existing directory is replaced only when it is one of ours: it holds :data:`MARKER`,
  which lists the files we wrote there, and nothing else. A directory holding anything
  else is written into only with ``overwrite=True`` (``--overwrite``), and then only the
  files we write are replaced: everything else in it is left as it was.
- An existing file is replaced only when it is one of ours (a caller-supplied check of its
  content) or with ``overwrite=True``.
- Results are written into a temporary path beside the target (``.NAME.entrodrop-tmp-PID-*``)
  and moved into place at the end; a failure (a full disk, an interrupt) removes it, and a
  temporary left by a killed process is removed by the next run that writes beside it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NoReturn

from entrodrop_fast._names import setting

MARKER = ".entrodrop-output.json"
_TMP_TAG = ".entrodrop-tmp-"
_PARTIAL = ".entrodrop-partial"  # inside a temporary directory until it is published


class OutputError(ValueError):
    """An output target cannot be used; the message says why and what to do instead."""


def _resolve(p, flag: str = "path") -> Path:
    if not str(p).strip():
        raise OutputError(f"{flag} is empty: give a path")
    try:
        return Path(p).expanduser().resolve()
    except RuntimeError as exc:  # pathlib: "Symlink loop from ..."
        raise OutputError(f"{flag} {p}: {exc}; fix the link or give another path") from None


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def marker_of(directory) -> dict | None:
    """The marker of a directory we wrote (``{"kind": ..., "files": [...]}``), or None."""
    try:
        m = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("files"), list):
        return None
    return m


def _stamp(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def _unchanged(directory: Path, m: dict) -> set[str]:
    """Names of the marker's files that are still as we wrote them (size and mtime)."""
    stamps = m.get("stamps") or {}
    out = set()
    for name in m["files"]:
        p = Path(directory) / name
        try:
            if (
                p.is_file()
                and not p.is_symlink()
                and (name not in stamps or _stamp(p) == stamps[name])
            ):
                out.add(name)
        except OSError:
            pass
    return out


def foreign_entries(directory, kind: str) -> list[str]:
    """What ``directory`` holds that an earlier ``kind`` output of ours did not write there, or
    changed since (a file edited by hand is the user's now)."""
    m = marker_of(directory)
    ours = (
        _unchanged(Path(directory), m) | {MARKER}
        if m is not None and m.get("kind") == kind
        else set()
    )
    return sorted(e.name for e in Path(directory).iterdir() if e.name not in ours)


def is_ours(directory, kind: str) -> bool:
    """True when ``directory`` holds only what an earlier ``kind`` output of ours wrote there,
    unchanged since."""
    m = marker_of(directory)
    return m is not None and m.get("kind") == kind and not foreign_entries(directory, kind)


# files that make a directory a model: a pruned model is never written over another one
_MODEL_FILES = re.compile(
    r"(config\.json|.*\.safetensors|.*\.bin|.*\.gguf|.*\.safetensors\.index\.json|.*\.pt|.*\.pth)$"
)


def _overlap(out: Path, inputs: Iterable[tuple[str, object]], flag: str) -> None:
    for name, p in inputs:
        if p is None:
            continue
        try:
            q = Path(p).expanduser().resolve()
        except RuntimeError:  # a looping input link is reported where it is read
            continue
        if out == q:
            rel = "is"
        elif q in out.parents:
            rel = "lies inside"
        elif out in q.parents:
            rel = "contains"
        else:
            continue
        raise OutputError(
            f"{flag} {out} {rel} the {name} {q}; writing there could destroy it: "
            "choose a path outside it"
        )


def _check_parent(out: Path, flag: str) -> None:
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"{flag} {out}: cannot write in {parent} (permission denied or read-only); "
            "choose another path"
        )


def _overwrite() -> str:
    """How messages name the ``overwrite`` switch (``overwrite=True``, ``--overwrite``)."""
    return setting("overwrite", python="overwrite=True")


def _check_existing_dir(
    out: Path, *, kind: str, what: str, overwrite: bool, replace_ours: bool, flag: str
) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise OutputError(
            f"{flag} {out} exists and is not a directory; give a directory path for the {what}"
        )
    if not any(out.iterdir()):
        return
    foreign = foreign_entries(out, kind)
    if not foreign:
        if not replace_ours and not overwrite:
            raise OutputError(
                f"{flag} {out} holds an earlier {what}; pass {_overwrite()} to replace it, "
                "or choose another path"
            )
        return
    shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
    models = [n for n in foreign if _MODEL_FILES.fullmatch(n)]
    if kind == "model" and models:
        raise OutputError(
            f"{flag} {out} holds another model ({', '.join(models[:4])}); a pruned model is "
            f"never written over or beside another one, even with {_overwrite()}: choose a new "
            "or empty directory"
        )
    if not overwrite:
        raise OutputError(
            f"{flag} {out} already holds files entrodrop did not write there or that were "
            f"changed since ({shown}); choose a new or empty directory, or pass {_overwrite()} "
            f"to write the {what} into it (a file of the same name as one the {what} writes is "
            "replaced; the others are left untouched)"
        )


def check_dir(
    path,
    *,
    kind: str,
    what: str,
    inputs: Iterable[tuple[str, object]] = (),
    overwrite: bool = False,
    replace_ours: bool = True,
    flag: str | None = None,
) -> Path:
    """Check a directory target before any work; returns it resolved.

    ``kind``: the marker kind of our own outputs of this sort ("report", "comparison",
    "model"); ``inputs``: ``(name, path)`` pairs the target must not be, contain or lie in;
    ``replace_ours=False`` asks for ``overwrite`` even to replace an earlier output of ours.
    A "model" target never holds another model's files, even with ``overwrite``. ``flag``:
    how messages name the target (default: the setting ``out``, as the caller spells it).
    Raises :class:`OutputError` naming the problem and what to do.
    """
    flag = flag or setting("out")
    out = _resolve(path, flag)
    _overlap(out, inputs, flag)
    if kind != "resume" and out.is_dir() and os.path.ismount(out):
        # the output is built beside the target and renamed into place: a rename cannot
        # replace a mount point or cross into another filesystem (EBUSY / EXDEV, found only
        # after the work)
        raise OutputError(
            f"{flag} {out} is a mount point (e.g. a volume mounted into a container): "
            f"entrodrop builds the {what} beside its target and moves it into place, which "
            f"cannot replace a mount point; give a new directory inside it, e.g. "
            f"{out / _default_name(kind)}"
        )
    _check_existing_dir(
        out, kind=kind, what=what, overwrite=overwrite, replace_ours=replace_ours, flag=flag
    )
    _check_parent(out, flag)
    return out


def _default_name(kind: str) -> str:
    return {"report": "entrodrop_report", "model": "pruned_model"}.get(kind, f"entrodrop_{kind}")


def check_file(
    path,
    *,
    what: str,
    recognise: Callable[[Path], bool] | None = None,
    inputs: Iterable[tuple[str, object]] = (),
    overwrite: bool = False,
    flag: str | None = None,
) -> Path:
    """Check a file target before any work; returns it resolved.

    An existing file is replaced only when ``recognise(path)`` says it is one of ours, or
    with ``overwrite``. ``flag``: how messages name the target (default: the setting
    ``out``, as the caller spells it). Raises :class:`OutputError`.
    """
    flag = flag or setting("out")
    out = _resolve(path, flag)
    _overlap(out, inputs, flag)
    if out.exists() and not out.is_dir() and not out.is_file():
        raise OutputError(
            f"{flag} {path} is not a regular file (a device, FIFO or socket: {out}); "
            f"give a file path for the {what}"
        )
    if out.is_dir():
        raise OutputError(
            f"{flag} {out} is a directory; give a file path for the {what} "
            f"(e.g. {out / 'out.json'})"
        )
    if out.exists() and not overwrite and not (recognise is not None and recognise(out)):
        raise OutputError(
            f"{flag} {out} exists and was not written by entrodrop; pass {_overwrite()} to "
            "replace it, or choose another path"
        )
    _check_parent(out, flag)
    return out


def json_with_keys(*keys: str) -> Callable[[Path], bool]:
    """A ``recognise`` check: the file is a JSON object holding all of ``keys``."""

    def check(p: Path) -> bool:
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(d, dict) and all(k in d for k in keys)

    return check


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: Path, name: str) -> list[Path]:
    """Remove temporaries of ``name`` in ``parent`` left by processes that no longer run.

    Only paths named ``.NAME.entrodrop-tmp-PID-*`` whose PID is dead are touched, and a
    directory only when it still holds our in-progress mark.
    """
    pat = re.compile(re.escape(f".{name}{_TMP_TAG}") + r"(\d+)-")
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for e in entries:
        m = pat.match(e.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        if e.is_dir() and not e.is_symlink():
            if (e / _PARTIAL).exists() or (e / MARKER).exists():
                shutil.rmtree(e, ignore_errors=True)
                removed.append(e)
        elif e.is_file():
            with contextlib.suppress(OSError):
                e.unlink()
                removed.append(e)
    return removed


def _written(exc: BaseException, what: str, out: Path) -> OutputError:
    reason = getattr(exc, "strerror", None) or str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC:
        reason = "no space left on the device"
    return OutputError(f"could not write the {what} to {out}: {reason}; nothing was changed there")


class DirPublisher:
    """Writes a directory output atomically: fill :attr:`tmp`, then :meth:`commit` or :meth:`abort`.

    On :meth:`commit` the temporary directory takes the place of ``out`` (checked beforehand
    with :func:`check_dir`): renamed into place when ``out`` is absent, empty or one of ours;
    otherwise its files are moved in one by one and the rest of ``out`` is left alone.
    :meth:`abort` (or any failure in :meth:`commit`) removes it and leaves ``out`` unchanged.
    """

    def __init__(
        self, out, *, kind: str, what: str, overwrite: bool = True, replace_ours: bool = True
    ):
        self.out, self.kind, self.what = _resolve(out), kind, what
        # the rules of check_dir, applied again at commit: another run may have written
        # ``out`` meanwhile (two runs with the same --out)
        self.overwrite, self.replace_ours = overwrite, replace_ours
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(parent, self.out.name)
            self.tmp = Path(
                tempfile.mkdtemp(prefix=f".{self.out.name}{_TMP_TAG}{os.getpid()}-", dir=parent)
            )
            os.chmod(
                self.tmp, 0o777 & ~_umask()
            )  # mkdtemp makes 0700; an output is an ordinary directory
            (self.tmp / _PARTIAL).touch()
        except OSError as exc:
            raise _written(exc, what, self.out) from exc

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> Path:
        out, tmp, kind = self.out, self.tmp, self.kind
        try:
            (tmp / _PARTIAL).unlink()
            files = sorted(e.name for e in tmp.iterdir())
            stamps = {name: _stamp(tmp / name) for name in files if (tmp / name).is_file()}
            (tmp / MARKER).write_text(
                json.dumps({"kind": kind, "files": files, "stamps": stamps}, indent=1) + "\n"
            )
            _check_existing_dir(
                out,
                kind=kind,
                what=self.what,
                overwrite=self.overwrite,
                replace_ours=self.replace_ours,
                flag="output",
            )
            if not out.exists() or not any(out.iterdir()):
                os.replace(tmp, out)  # rename(2) replaces an empty directory
            elif is_ours(out, kind):
                old = Path(
                    tempfile.mkdtemp(
                        prefix=f".{out.name}{_TMP_TAG}{os.getpid()}-old-", dir=out.parent
                    )
                )
                (old / _PARTIAL).touch()
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:  # a directory that also holds other things (allowed by overwrite): ours only
                previous = marker_of(out)
                stale = (
                    _unchanged(out, previous) - set(files)
                    if previous and previous.get("kind") == kind
                    else set()
                )
                for name in files:
                    q = out / name
                    if q.is_dir() and not q.is_symlink():
                        raise OutputError(
                            f"{q} is a directory; cannot write the {self.what} file {name} over it"
                        )
                    if q.exists() and not q.is_file():
                        raise OutputError(
                            f"{q} is not a regular file (a device, FIFO or socket); "
                            f"cannot write the {self.what} file {name} over it"
                        )
                for name in files:
                    os.replace(tmp / name, out / name)
                for name in stale:
                    p = out / name
                    if p.is_file() and not p.is_symlink():
                        p.unlink()
                os.replace(tmp / MARKER, out / MARKER)
        except OSError as exc:
            raise _written(exc, self.what, out) from exc
        finally:
            self.abort()
        return out


@contextlib.contextmanager
def publish_dir(
    out, *, kind: str, what: str, overwrite: bool = True, replace_ours: bool = True
) -> Iterator[Path]:
    """:class:`DirPublisher` as a context: yields the temporary directory, commits on success."""
    pub = DirPublisher(out, kind=kind, what=what, overwrite=overwrite, replace_ours=replace_ours)
    try:
        yield pub.tmp
    except BaseException:
        pub.abort()
        raise
    pub.commit()


@contextlib.contextmanager
def scratch_dir(out) -> Iterator[Path]:
    """A temporary working directory beside ``out`` (same file system), removed afterwards;
    one left by a killed process is removed by the next run writing beside ``out``."""
    out = _resolve(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_TAG}{os.getpid()}-work-", dir=out.parent))
    try:
        (tmp / _PARTIAL).touch()
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(directory: str | os.PathLike) -> None:
    """Put ``directory``'s entries (a rename in it) on disk, where the system allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(
    out: str | os.PathLike,
    write: Callable[[BinaryIO], object],
    *,
    fail: Callable[[BaseException], NoReturn],
    fail_on: tuple[type[BaseException], ...] = (OSError,),
    tmp: str | os.PathLike | None = None,
    durable: bool = False,
) -> None:
    """Write the file ``out`` all at once: ``write(fh)`` fills a temporary file beside it
    (``fh``: binary, open for writing), which then replaces ``out`` by a rename.

    A process killed at any point leaves ``out`` as it was or complete. ``tmp``: the
    temporary's path; by default a new ``.NAME.entrodrop-tmp-PID-*`` beside ``out`` (mode
    0666 less the umask), made after the parent directory is created and the temporaries of
    killed runs are removed (:func:`sweep_stale`); a given ``tmp`` must lie in a directory the
    caller owns (what is there is unlinked first, never written through). ``durable``: the
    file is put on disk (fsync) before the rename, and the directory after it. On a failure
    the temporary is removed and ``out`` left as it was; an exception of a class in
    ``fail_on`` is passed to ``fail``, which raises the error to report; any other goes on as
    it is.
    """
    made = None
    try:
        if tmp is None:
            parent, name = Path(out).parent, Path(out).name
            parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(parent, name)
            fd, made = tempfile.mkstemp(prefix=f".{name}{_TMP_TAG}{os.getpid()}-", dir=parent)
            fh = os.fdopen(fd, "wb")
        else:
            # the caller's own name in a directory it owns (a resume directory): what is there
            # is a killed write's leftover. It is unlinked, never written through: a symlink's
            # target is not touched, and a directory is refused (an OSError, given to fail).
            path = os.fspath(tmp)
            if os.path.isdir(path) and not os.path.islink(path):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            made = path
            fh = os.fdopen(fd, "wb")
        with fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        if tmp is None:
            os.chmod(made, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(made, os.fspath(out))
        made = None
    except BaseException as exc:
        if made is not None:
            with contextlib.suppress(OSError):
                os.remove(made)
        if isinstance(exc, fail_on):
            fail(exc)
        raise
    if durable:
        _fsync_dir(os.path.dirname(os.fspath(out)) or ".")


def publish_file(out, data: str | bytes, *, what: str) -> Path:
    """Write ``data`` to ``out`` through a temporary file beside it (checked beforehand).

    Returns ``out`` resolved. Raises :class:`OutputError` when it cannot be written (nothing
    is changed there then).
    """
    out = _resolve(out)

    def fail(exc: BaseException) -> NoReturn:
        raise _written(exc, what, out) from exc

    payload = data.encode() if isinstance(data, str) else data
    write_atomic(out, lambda fh: fh.write(payload), fail=fail)
    return out


def model_paths(model, cache_dir=None) -> list[tuple[str, object]]:
    """The local paths a model argument reads (nothing is loaded or converted)."""
    from entrodrop_fast.models.loading import builtin_files, builtin_model, cache_root

    b = builtin_model(model)
    if b is not None:
        out: list[tuple[str, object]] = [
            (
                "built-in model cache",
                (Path(cache_dir).expanduser() if cache_dir else cache_root()) / b.name,
            )
        ]
        with contextlib.suppress(Exception):  # not installed: the load reports it
            out += [
                ("built-in model file" if p.is_file() else "built-in model package", p)
                for p in builtin_files(b)
            ]
        return out
    p = Path(str(model)).expanduser()
    return _with_link_targets("model", p) if p.exists() else []


def _with_link_targets(name: str, p: Path) -> list[tuple[str, object]]:
    """``p`` and, for a directory, the targets of the links in it (a hub snapshot's files are
    links into a blob store): writing over a target destroys the input as surely."""
    out: list[tuple[str, object]] = [(name, p)]
    if p.is_dir():
        with contextlib.suppress(OSError):
            for e in p.iterdir():
                if e.is_symlink():
                    with contextlib.suppress(OSError, RuntimeError):
                        out.append((f"{name} file {e.name} (a link to)", e.resolve()))
    return out


def corpus_paths(*corpora) -> list[tuple[str, object]]:
    """The local paths of corpus arguments (``builtin`` and ``hf:`` corpora have none)."""
    out: list[tuple[str, object]] = []
    for c in corpora:
        if c and str(c) != "builtin" and not str(c).startswith("hf:"):
            p = Path(str(c)).expanduser()
            if p.exists():
                out += _with_link_targets("corpus", p)
    return out
