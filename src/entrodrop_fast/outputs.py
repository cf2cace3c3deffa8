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

MARKER = ".entrodrop-output.json"
_TMP_TAG = ".entrodrop-tmp-"
_PARTIAL = ".entrodrop-partial"  # inside a temporary directory until it is published


class OutputError(ValueError):
    """An output target cannot be used; the message says why and what to do instead."""


def _resolve(p) -> Path:
    return Path(p).expanduser().resolve()


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


def is_ours(directory, kind: str) -> bool:
    """True when ``directory`` holds only what an earlier ``kind`` output of ours wrote there."""
    m = marker_of(directory)
    if m is None or m.get("kind") != kind:
        return False
    ours = set(m["files"]) | {MARKER}
    return all(e.name in ours for e in Path(directory).iterdir())


def _overlap(out: Path, inputs: Iterable[tuple[str, object]], flag: str) -> None:
    for name, p in inputs:
        if p is None:
            continue
        q = _resolve(p)
        if out == q:
            rel = "is"
        elif q in out.parents:
            rel = "lies inside"
        elif out in q.parents:
            rel = "contains"
        else:
            continue
        raise OutputError(f"{flag} {out} {rel} the {name} {q}; writing there could destroy it: choose a path outside it")


def _check_parent(out: Path, flag: str) -> None:
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {out}: cannot write in {parent} (permission denied or read-only); choose another path")


def check_dir(path, *, kind: str, what: str, inputs: Iterable[tuple[str, object]] = (), overwrite: bool = False,
              replace_ours: bool = True, flag: str = "--out") -> Path:
    """Check a directory target before any work; returns it resolved.

    ``kind``: the marker kind of our own outputs of this sort ("report", "comparison",
    "model"); ``inputs``: ``(name, path)`` pairs the target must not be, contain or lie in;
    ``replace_ours=False`` asks for ``overwrite`` even to replace an earlier output of ours.
    Raises :class:`OutputError` naming the problem and what to do.
    """
    out = _resolve(path)
    _overlap(out, inputs, flag)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"{flag} {out} exists and is not a directory; give a directory path for the {what}")
        entries = sorted(e.name for e in out.iterdir())
        if entries and is_ours(out, kind):
            if not replace_ours and not overwrite:
                raise OutputError(f"{flag} {out} holds an earlier {what}; pass --overwrite to replace it, or choose another path")
        elif entries and not overwrite:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise OutputError(
                f"{flag} {out} already holds files entrodrop did not write there ({shown}); choose a new or empty "
                f"directory, or pass --overwrite to write the {what} into it (its other files are left untouched)"
            )
    _check_parent(out, flag)
    return out


def check_file(path, *, what: str, recognise: Callable[[Path], bool] | None = None,
               inputs: Iterable[tuple[str, object]] = (), overwrite: bool = False, flag: str = "--out") -> Path:
    """Check a file target before any work; returns it resolved.

    An existing file is replaced only when ``recognise(path)`` says it is one of ours, or
    with ``overwrite``. Raises :class:`OutputError`.
    """
    out = _resolve(path)
    _overlap(out, inputs, flag)
    if out.is_dir():
        raise OutputError(f"{flag} {out} is a directory; give a file path for the {what} (e.g. {out / 'out.json'})")
    if out.exists() and not overwrite and not (recognise is not None and recognise(out)):
        raise OutputError(f"{flag} {out} exists and was not written by entrodrop; pass --overwrite to replace it, or choose another path")
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


def _written(exc: OSError, what: str, out: Path) -> OutputError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return OutputError(f"could not write the {what} to {out}: {reason}; nothing was changed there")


class DirPublisher:
    """Writes a directory output atomically: fill :attr:`tmp`, then :meth:`commit` or :meth:`abort`.

    On :meth:`commit` the temporary directory takes the place of ``out`` (checked beforehand
    with :func:`check_dir`): renamed into place when ``out`` is absent, empty or one of ours;
    otherwise its files are moved in one by one and the rest of ``out`` is left alone.
    :meth:`abort` (or any failure in :meth:`commit`) removes it and leaves ``out`` unchanged.
    """

    def __init__(self, out, *, kind: str, what: str):
        self.out, self.kind, self.what = _resolve(out), kind, what
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(parent, self.out.name)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{_TMP_TAG}{os.getpid()}-", dir=parent))
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an output is an ordinary directory
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
            (tmp / MARKER).write_text(json.dumps({"kind": kind, "files": files}, indent=1) + "\n")
            if not out.exists() or not any(out.iterdir()):
                os.replace(tmp, out)  # rename(2) replaces an empty directory
            elif is_ours(out, kind):
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_TAG}{os.getpid()}-old-", dir=out.parent))
                (old / _PARTIAL).touch()
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:  # a directory that also holds other things (allowed by overwrite): ours only
                previous = marker_of(out)
                stale = set(previous["files"]) - set(files) if previous and previous.get("kind") == kind else set()
                for name in files:
                    if (out / name).is_dir() and not (out / name).is_symlink():
                        raise OutputError(f"{out / name} is a directory; cannot write the {self.what} file {name} over it")
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
def publish_dir(out, *, kind: str, what: str) -> Iterator[Path]:
    """:class:`DirPublisher` as a context: yields the temporary directory, commits on success."""
    pub = DirPublisher(out, kind=kind, what=what)
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


def publish_file(out, data: str | bytes, *, what: str) -> Path:
    """Write ``data`` to ``out`` through a temporary file beside it (checked beforehand)."""
    out = _resolve(out)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out.parent, out.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}{_TMP_TAG}{os.getpid()}-", dir=out.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, out)
        tmp = None
    except OSError as exc:
        raise _written(exc, what, out) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return out


def model_paths(model, cache_dir=None) -> list[tuple[str, object]]:
    """The local paths a model argument reads (nothing is loaded or converted)."""
    from entrodrop_fast.models.loading import builtin_files, builtin_model, cache_root

    b = builtin_model(model)
    if b is not None:
        out: list[tuple[str, object]] = [("built-in model cache", (Path(cache_dir).expanduser() if cache_dir else cache_root()) / b.name)]
        with contextlib.suppress(Exception):  # not installed: the load reports it
            out += [("built-in model file" if p.is_file() else "built-in model package", p) for p in builtin_files(b)]
        return out
    p = Path(str(model)).expanduser()
    return [("model", p)] if p.exists() else []


def corpus_paths(*corpora) -> list[tuple[str, object]]:
    """The local paths of corpus arguments (``builtin`` and ``hf:`` corpora have none)."""
    out: list[tuple[str, object]] = []
    for c in corpora:
        if c and str(c) != "builtin" and not str(c).startswith("hf:"):
            p = Path(str(c)).expanduser()
            if p.exists():
                out.append(("corpus", p))
    return out
