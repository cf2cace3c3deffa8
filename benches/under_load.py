"""The estimators idle and with one core busy, in one run: how much a call slows down when
another process takes a core.

    python benches/under_load.py [--rounds R] [--reps N] [--json PATH] [--quiet-wait] [--nice N]

Cases are the profiler's calls (``validate=False``, as its hooks pass; f = F(X) fused where
the profiler fuses it) at SmolLM2's shape, one sample of 256 tokens x 576 channels (the
paper's batch size 1) and a batch of 8, plus knn on one sample of 256 x 4096 and, for
comparison, the paper's own knn formulation (``torch.cdist`` + ``topk``, fp32). The busy
phase runs one spinning process (``python -c "while True: pass"``; stopped while idle);
``--nice N`` runs the calls at niceness N above the spinner's (another job holding a core at
a higher priority: a thread that waits at a barrier for a descheduled one waits longest);
idle and busy phases alternate ``R`` times and every case runs ``N`` times per phase,
interleaved with the others, so both phases see the same machine. Reported per case:
median and min seconds idle and busy, and busy / idle of the medians. ``--quiet-wait``
(a shared machine) starts each pass over the cases only when no process but this one and
its spinner has been runnable for 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

import torch

import entrodrop_fast as ef
from entrodrop_fast import _ext
from entrodrop_fast.ops.bench import make_input, time_calls

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from knn_vs_cdist import paper_knn_entropy, wait_quiet  # noqa: E402


def cases() -> dict:
    x1 = make_input((1, 256, 576), torch.float32)
    f1 = make_input((1, 256, 576), torch.float32, seed=1)
    x8 = make_input((8, 256, 576), torch.float32)
    f8 = make_input((8, 256, 576), torch.float32, seed=1)
    w = make_input((1, 256, 4096), torch.float32)
    opts = {"validate": False}
    return {
        "knn 1x256x576": lambda: ef.knn_entropy(x1, k=25, **opts),
        "knn 8x256x576": lambda: ef.knn_entropy(x8, k=25, **opts),
        "knn 1x256x4096": lambda: ef.knn_entropy(w, k=25, **opts),
        "paper knn 1x256x576": lambda: paper_knn_entropy(x1),
        "paper knn 8x256x576": lambda: paper_knn_entropy(x8),
        "bucket 1x256x576": lambda: ef.bucket_entropy(x1, f1, bins=20, **opts),
        "bucket 8x256x576": lambda: ef.bucket_entropy(x8, f8, bins=20, **opts),
        "moments 1x256x576": lambda: ef.gaussian_diag_entropy(x1, f1, **opts),
        "moments 8x256x576": lambda: ef.gaussian_diag_entropy(x8, f8, **opts),
        "cosine 1x256x576": lambda: ef.cosine_importance(x1, f1, **opts),
        "cosine 8x256x576": lambda: ef.cosine_importance(x8, f8, **opts),
    }


def phase(fns: dict, reps: int, times: dict, quiet: bool, ignore: set[int]) -> None:
    for _ in range(reps):
        if quiet:
            wait_quiet(ignore=ignore)
        for name, fn in fns.items():
            times[name] += time_calls(fn, 1, warmup=0)


def main(rounds: int, reps: int, json_path: str | None, quiet: bool = False, nice: int = 0) -> dict:
    fns = cases()
    # one spinner, started before this process lowers its priority (--nice), so that it keeps
    # the priority this process had; stopped (SIGSTOP) while idle, continued while busy
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    spinner.send_signal(signal.SIGSTOP)
    try:
        if nice:
            os.nice(nice)
        for fn in fns.values():  # warm up: thread pools, allocator, first-call costs
            fn()
        idle = {n: [] for n in fns}
        busy = {n: [] for n in fns}
        for _ in range(rounds):
            phase(fns, reps, idle, quiet, {spinner.pid})
            spinner.send_signal(signal.SIGCONT)
            time.sleep(0.3)  # let it start spinning
            phase(fns, reps, busy, quiet, {spinner.pid})
            spinner.send_signal(signal.SIGSTOP)
            time.sleep(0.1)
    finally:
        spinner.kill()
        spinner.wait()
    rows = {}
    print(f"{'case':<22} {'idle ms (med/min)':>18} {'busy ms (med/min)':>18} {'busy/idle':>9}")
    for n in fns:
        mi, mb = statistics.median(idle[n]), statistics.median(busy[n])
        rows[n] = {
            "idle_median_s": mi,
            "idle_min_s": min(idle[n]),
            "busy_median_s": mb,
            "busy_min_s": min(busy[n]),
            "busy_over_idle": mb / mi,
        }
        print(
            f"{n:<22} {1e3 * mi:9.3f}/{1e3 * min(idle[n]):7.3f} "
            f"{1e3 * mb:9.3f}/{1e3 * min(busy[n]):7.3f} {mb / mi:9.2f}"
        )
    out = {
        "command": "python " + " ".join(sys.argv),
        "rounds": rounds,
        "reps_per_phase": reps,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "thread_pool": _ext.require().thread_pool_cpu() if _ext.available() else None,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "busy_load": "one process running `while True: pass`",
        "nice": nice,
        "quiet_wait": quiet,
        "cases": rows,
    }
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"wrote {json_path}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="idle/busy phase pairs")
    ap.add_argument("--reps", type=int, default=10, help="runs of every case per phase")
    ap.add_argument("--json", default=None, help="also write the figures as JSON")
    ap.add_argument(
        "--quiet-wait", action="store_true", help="time only while no other process is runnable"
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the calls at this niceness, above the spinner's (a job sharing the machine "
        "at a higher priority)",
    )
    a = ap.parse_args()
    main(a.rounds, a.reps, a.json, a.quiet_wait, a.nice)
