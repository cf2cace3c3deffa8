"""How an error message names a setting: by its Python spelling, or by the caller's.

The library's messages tell the user what to change ("lower drop", "pass overwrite=True").
Called from Python, a setting is named as the keyword argument it is; inside an ``entrodrop``
command, the command line sets its flags' spellings for the duration of the command
(:func:`spelled`), so the same message reads "lower --drop", "pass --overwrite". The flags
come from the command's own argparse options (``entrodrop_fast.cli.flag_spellings``: an
option's ``dest`` is the setting's name); no library module names a flag itself.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from types import MappingProxyType

_SPELLINGS: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "entrodrop_setting_spellings", default=MappingProxyType({})
)


def setting(name: str, python: str | None = None) -> str:
    """How to name the setting ``name`` in a message.

    ``python``: the Python spelling when it differs from ``name`` (e.g. ``"overwrite=True"``
    for a switch). Returns the spelling :func:`spelled` set for ``name``, else ``python``,
    else ``name``.
    """
    return _SPELLINGS.get().get(name, python or name)


@contextlib.contextmanager
def spelled(spellings: Mapping[str, str] | None) -> Iterator[None]:
    """Within the block, :func:`setting` names each setting of ``spellings`` as given there."""
    if not spellings:
        yield
        return
    token = _SPELLINGS.set({**_SPELLINGS.get(), **spellings})
    try:
        yield
    finally:
        _SPELLINGS.reset(token)


def how(command: str, python: str) -> str:
    """Advice that differs by caller: ``command`` (a command line to run) inside an
    ``entrodrop`` command, ``python`` (the library call that does the same) elsewhere."""
    return command if _SPELLINGS.get() else python
