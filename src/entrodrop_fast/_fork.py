"""Whether this process was forked after the package was imported.

A child forked from a process whose OpenMP team (torch's libgomp) had started has none of the
team's threads, and libgomp waits for them forever at the end of the child's first parallel
region. The compiled CPU kernels borrow that team (csrc/threads_cpu.cpp), so a child must use
their own pool instead. The extension notices forks after it was loaded by itself; this hook
covers a child that loads it only after the fork (the extension is loaded on first use).
"""

from __future__ import annotations

import os
import sys

FORKED = False


def _after_fork_in_child() -> None:
    global FORKED
    FORKED = True
    ext = sys.modules.get("entrodrop_fast._C")
    if ext is not None:
        ext.mark_forked_cpu()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
