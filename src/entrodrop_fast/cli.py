"""The ``entrodrop`` command line.

Every module in :mod:`entrodrop_fast.commands` that defines ``register(subparsers)`` adds
one subcommand; its parser sets ``func`` to a callable taking the parsed args and
returning an exit code.

Errors: argparse rejects malformed arguments (exit 2, as argparse does; the numeric flags
use :func:`int_at_least` so ``--seq-len 1`` or ``--batch-size 0`` stop there). A run that
fails for a reason the user can act on (see :func:`is_expected`: bad values, files that are
missing, unreadable, corrupt, a full or read-only disk, a model that cannot be loaded)
prints ``entrodrop CMD: error: MESSAGE`` and exits 1, without a traceback. Anything else is
a bug in entrodrop_fast: it says so and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import os
import pkgutil
import re
import sys
import warnings

from entrodrop_fast import __version__, commands
from entrodrop_fast._names import spelled

# exception classes defined by the project (or libraries) that mean "the input or the
# environment is wrong", not "the code is wrong"; looked up only when their module is
# loaded (an exception of a class cannot exist before its module is imported)
_EXPECTED_ELSEWHERE = (
    ("safetensors", "SafetensorError"),
    ("entrodrop_fast.models.loading", "ModelLoadError"),
    ("entrodrop_fast.prune.export", "ExportError"),
    ("entrodrop_fast.models.checkpoint", "CheckpointError"),
    ("entrodrop_fast.evaluate.lm_eval", "LmEvalUnavailable"),
    ("torch", "OutOfMemoryError"),
)

# what to do, by errno, after the OS's own words and the path
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "check the permissions, or use another path",
    errno.EPERM: "check the permissions, or use another path",
    errno.EISDIR: "that path is a directory: give a file path",
    errno.ENOTDIR: "a part of that path is a file, not a directory",
    errno.ENOENT: "check the path",
}


def int_at_least(low: int, why: str = ""):
    """An argparse ``type``: an integer >= ``low``.

    The returned parser raises ``argparse.ArgumentTypeError`` (argparse adds the flag's name
    and exits 2) for text that is not an integer or is below ``low``; ``why`` is said after.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(
                f"must be {what}{f' ({why})' if why else ''}, got {text!r}"
            )
        return value

    parse.__name__ = f"int>={low}"
    return parse


positive_int = int_at_least(1)


def add_model_arg(p: argparse.ArgumentParser, help: str, metavar: str | None = None) -> None:
    """The optional ``model`` positional of a command (None when omitted: the built-in model)."""
    p.add_argument("model", nargs="?", default=None, metavar=metavar, help=help)


def add_preset_arg(p: argparse.ArgumentParser, help: str) -> None:
    """``--preset paper`` (None when omitted); ``help`` says what it sets in this command."""
    p.add_argument("--preset", default=None, choices=["paper"], help=help)


def add_output_file_args(p: argparse.ArgumentParser, flag: str, help: str, what: str, **kw) -> None:
    """``flag``, a file the command writes (``kw``: more of its argparse settings), and
    ``--overwrite``, which replaces that file even when it is not ``what`` (e.g. "a plan file";
    without it, an existing file is replaced only when the command recognises it as its own)."""
    p.add_argument(flag, help=help, **kw)
    p.add_argument(
        "--overwrite", action="store_true", help=f"replace {flag} even when it is not {what}"
    )


def is_expected(exc: BaseException) -> bool:
    """True for failures the user can act on (reported in one line), False for bugs (traceback).

    Expected: ValueError (bad values; includes ``json.JSONDecodeError``,
    ``UnicodeDecodeError`` and the project's ``CorpusError``), TypeError, OSError (missing,
    unreadable or unwritable files, a full or read-only disk), safetensors' SafetensorError,
    the project's ModelLoadError / ExportError / CheckpointError / LmEvalUnavailable, and
    torch's OutOfMemoryError. Everything else (AssertionError, KeyError, IndexError, a bare
    RuntimeError, ...) is a bug and keeps its traceback.
    """
    if isinstance(exc, ValueError | TypeError | OSError) or _symlink_loop(exc) is not None:
        return True
    for module, name in _EXPECTED_ELSEWHERE:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def _symlink_loop(exc: BaseException) -> str | None:
    """The path of pathlib's ``RuntimeError("Symlink loop from '...'")`` (Path.resolve), else
    None."""
    if type(exc) is RuntimeError and exc.args and isinstance(exc.args[0], str):
        m = re.fullmatch(r"Symlink loop from (['\"])(.*)\1", exc.args[0].strip())
        if m:
            return m.group(2)
    return None


def error_message(exc: BaseException) -> str:
    """One message for an expected failure: what went wrong, on which file, and what to do."""
    loop = _symlink_loop(exc)
    if loop is not None:
        return (
            f"symbolic link loop at {loop}: it leads back to itself "
            "(remove or fix the link, or give another path)"
        )
    # the project's own OSError subclasses (e.g. streaming's StorageError) carry their own
    # message and advice; bare OSErrors get the path and a hint by errno
    if (
        isinstance(exc, OSError)
        and exc.strerror
        and not type(exc).__module__.startswith("entrodrop_fast")
    ):
        text = exc.strerror
        if exc.filename is not None:
            text += f": {exc.filename}"
            if exc.filename2 is not None:
                text += f" -> {exc.filename2}"
        hint = _OS_HINTS.get(exc.errno)
        return f"{text} ({hint})" if hint else text
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    if type(exc).__name__ == "OutOfMemoryError":
        return (
            f"out of memory: {text.splitlines()[0]} (lower --batch-size or --seq-len, "
            "or profile with --streaming / --max-memory)"
        )
    if type(exc).__module__.startswith(("safetensors", "torch")):
        return f"{type(exc).__name__}: {text}"
    return text


# subcommands in the order a user runs them; any other command module follows, by name
PIPELINE_ORDER = ("profile", "rank", "prune", "eval", "compare", "entropy", "bench", "info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entrodrop",
        description="Entropy-based block pruning of LLMs (EntroDrop) with fast estimators.",
    )
    parser.add_argument("--version", action="version", version=f"entrodrop_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = {info.name for info in pkgutil.iter_modules(commands.__path__)}
    # the pipeline's order (profile -> rank -> prune -> eval -> compare), then the tools
    order = [n for n in PIPELINE_ORDER if n in names] + sorted(names - set(PIPELINE_ORDER))
    for name in order:
        mod = importlib.import_module(f"{commands.__name__}.{name}")
        if hasattr(mod, "register"):
            mod.register(sub)
    return parser


def flag_spellings(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """Each option of ``command`` by its Python name (the argparse ``dest``) -> its long flag.

    Library messages name settings through :func:`entrodrop_fast._names.setting`; inside a
    command they read as these flags (``drop`` -> ``--drop``, ``resume_dir`` -> ``--resume-dir``).
    """
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    spellings = {}
    for action in subparsers.choices[command]._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest != "help":
            spellings[action.dest] = longs[0]
    return spellings


@contextlib.contextmanager
def _tidy_warnings(command: str):
    """The package's own warnings read as ``entrodrop CMD: warning: ...`` on stderr, like its
    errors, not as Python's ``file:line: UserWarning`` with a line of our source; other
    libraries' warnings keep their own form."""
    shown = warnings.showwarning
    # warnings being recorded (catch_warnings(record=True): pytest.warns, a caller of main)
    # or shown by a replacement of someone else's are left to them
    impl = getattr(warnings, "_showwarnmsg_impl", None)
    if shown is not getattr(warnings, "_showwarning_orig", shown) or (
        getattr(impl, "__module__", None) != "warnings"
    ):
        yield
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(_PACKAGE_DIR):
            print(f"entrodrop {command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # a quoted '~/x' means the home directory, never a folder named '~'
    for name in ("cache_dir",):
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    try:
        with spelled(flag_spellings(parser, args.command)), _tidy_warnings(args.command):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not is_expected(exc):
            print(
                f"entrodrop {args.command}: internal error ({type(exc).__name__}), a bug in "
                f"entrodrop_fast {__version__}: please report it with the traceback below",
                file=sys.stderr,
            )
            raise
        print(f"entrodrop {args.command}: error: {error_message(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
