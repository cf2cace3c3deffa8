"""The profiler's bucket + cosine at a block: one fused call against the two calls it replaces.

    python benches/bucket_cosine.py [--device cpu|cuda] [--backend B] [--rounds N]
                                    [--shapes 8x256x576,...] [--json PATH]

What the taps run at a block when ``--method bucket,cosine`` is asked for: the public
``bucket_entropy_and_cosine(x, y=y)`` (a sequential model's attention / layer block: Y is
the block's output) and ``bucket_entropy_and_cosine(x, f)`` (Y = x + f: a parallel model),
against ``bucket_entropy(Y) + cosine_importance(x, Y)``, both with their defaults
(validation on), at the profiler's shapes ([8, 256, 576] SmolLM2, [8, 256, 4096],
[128, 256, 4096]), fp32 and bf16. The two candidates alternate within every round (the
order flips each round); medians and minima over the rounds. ``ratio`` = fused / separate
(below 1: the fused call is faster). The roofline, ``x.sum() + y.sum()``, is the time to
read both inputs once. ``--backend``: what both candidates run on (default ``auto``; on a
GPU with the CUDA extension ``auto`` has no fused kernel and runs the CUDA bucket then
Triton's cosine, ``--backend triton`` runs Triton's fused kernel against Triton's two).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import entrodrop_fast as ef
from entrodrop_fast.ops.bench import make_input, time_calls

SHAPES = ((8, 256, 576), (8, 256, 4096), (128, 256, 4096))


def _candidates(x, o, mode: str, kw: dict) -> dict:
    """The timed callables: the fused call, the two it replaces, the roofline."""
    if mode == "y":  # Y = o: a sequential model's block output
        return {
            "fused": lambda: ef.bucket_entropy_and_cosine(x, y=o, **kw),
            "separate": lambda: (ef.bucket_entropy(o, **kw), ef.cosine_importance(x, y=o, **kw)),
            "roofline": lambda: (x.sum(), o.sum()),
        }
    return {  # Y = x + o: a parallel model's branch output o
        "fused": lambda: ef.bucket_entropy_and_cosine(x, o, **kw),
        "separate": lambda: (ef.bucket_entropy(x, o, **kw), ef.cosine_importance(x, o, **kw)),
        "roofline": lambda: (x.sum(), o.sum()),
    }


def run(
    device: str, rounds: int, shapes=SHAPES, dtypes=("fp32", "bf16"), backend: str = "auto"
) -> list[dict]:
    kw = {"backend": backend}
    rows = []
    for shape in shapes:
        for dname in dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
            x = make_input(shape, dtype, device)
            o = make_input(shape, dtype, device, seed=1)
            for mode in ("y", "f"):
                fns = _candidates(x, o, mode, kw)
                ts: dict[str, list[float]] = {k: [] for k in fns}
                for fn in fns.values():
                    time_calls(fn, 0, warmup=2, device=device)
                n = rounds if shape[0] < 100 else max(3, rounds // 4)
                for r in range(n):
                    order = list(fns) if r % 2 == 0 else list(reversed(fns))
                    for k in order:
                        ts[k] += time_calls(fns[k], 1, warmup=0, device=device)
                med = {k: statistics.median(v) for k, v in ts.items()}
                row = {
                    "shape": list(shape),
                    "dtype": dname,
                    "mode": mode,
                    "device": device,
                    "backend": backend,
                    "rounds": n,
                    **{f"{k}_median_s": v for k, v in med.items()},
                    **{f"{k}_min_s": min(v) for k, v in ts.items()},
                    "ratio": med["fused"] / med["separate"],
                    "fused_roofline_frac": med["roofline"] / med["fused"],
                    "separate_roofline_frac": med["roofline"] / med["separate"],
                }
                rows.append(row)
                print(
                    f"{'x'.join(map(str, shape)):>13} {dname} Y={'y' if mode == 'y' else 'x+f'}:"
                    f" fused {1e3 * med['fused']:.2f} ms, separate {1e3 * med['separate']:.2f}"
                    f" ms, fused/separate {row['ratio']:.2f}x; roofline"
                    f" {1e3 * med['roofline']:.2f} ms ({100 * row['fused_roofline_frac']:.0f}%"
                    f" fused, {100 * row['separate_roofline_frac']:.0f}% separate)",
                    flush=True,
                )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--shapes", default=None, help="e.g. 8x256x576,8x256x4096")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bucket_cosine.py: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    shapes = (
        tuple(tuple(int(v) for v in s.split("x")) for s in a.shapes.split(","))
        if a.shapes
        else SHAPES
    )
    rows = run(a.device, a.rounds, shapes, backend=a.backend)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows, "threads": torch.get_num_threads()}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
