"""``entrodrop bench``: estimator throughput per backend against the x.sum() roofline.

``--calls``: the public calls users make (default arguments, validation on) beside the same
calls with ``validate=False`` and the roofline of reading their inputs.
"""

from __future__ import annotations

import json


def _shape(s: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in s.lower().split("x"))
    except ValueError:
        raise ValueError(f"a shape is like 256x4096 or 128x256x4096, got {s!r}") from None
    if len(dims) not in (2, 3) or min(dims) < 1:
        raise ValueError(f"a shape has 2 or 3 positive sizes, got {s!r}")
    return dims


def register(sub) -> None:
    from entrodrop_fast.bench import (
        BACKENDS,
        CALL_SHAPES,
        CALLS,
        DEFAULT_SHAPES,
        DTYPES,
        ESTIMATORS,
    )
    from entrodrop_fast.cli import positive_int

    def shapes(ss):
        return ",".join("x".join(map(str, s)) for s in ss)

    p = sub.add_parser("bench", help="time the estimators per backend against a plain read (x.sum()) of the same tensor")
    p.add_argument("--calls", action="store_true",
                   help="time the public calls (ef.bucket_entropy(x), delta_entropy(x, f), ...: validation on) beside the same "
                        "calls with validate=False and the roofline of reading their inputs, interleaved; the minimum of the runs")
    p.add_argument("--estimators", default=None,
                   help=f"comma-separated from {', '.join(ESTIMATORS)} (default all); with --calls from {', '.join(CALLS)}")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated, e.g. 256x4096,128x256x4096 (default {shapes(DEFAULT_SHAPES)}; with --calls {shapes(CALL_SHAPES)})")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated from {', '.join(DTYPES)}")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated from {', '.join(BACKENDS)} (default all); with --calls one API backend, auto (default), cpp, triton or torch")
    p.add_argument("--repeat", type=positive_int, default=None,
                   help="timed runs per case, the median reported (default 5); with --calls rounds, the minimum reported (default 7)")
    p.add_argument("--min-seconds", type=float, default=0.5,
                   help="with --calls: more rounds for fast calls, until the default call has run this long in all (default 0.5; "
                        "at most 300 rounds): the minimum then comes from a round the machine did not preempt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON (an existing file is replaced only when it is an earlier bench JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace --json even when it is not a bench JSON")
    p.set_defaults(func=run)


def _is_bench_json(path) -> bool:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and "estimator" in r for r in rows)


def run(args) -> int:
    from entrodrop_fast import outputs
    from entrodrop_fast.bench import (
        BACKENDS,
        CALL_SHAPES,
        CALLS,
        DEFAULT_SHAPES,
        DTYPES,
        ESTIMATORS,
        format_call_table,
        format_table,
        run_bench,
        run_call_bench,
    )
    from entrodrop_fast.ops.api import BACKENDS as API_BACKENDS

    if args.json:  # checked before the benchmark runs
        outputs.check_file(args.json, what="bench JSON", recognise=_is_bench_json, overwrite=args.overwrite, flag="--json")

    def pick(text, allowed, what):
        items = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad:
            raise ValueError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
        return items

    if args.calls:
        backend = pick(args.backends or "auto", ("auto", *API_BACKENDS), "backend")
        if len(backend) != 1:
            raise ValueError(f"--calls times one API backend at a time, got {', '.join(backend)}")
        rows = run_call_bench(
            calls=pick(args.estimators or ",".join(CALLS), tuple(CALLS), "call"),
            shapes=[_shape(s) for s in (args.shapes or ",".join("x".join(map(str, s)) for s in CALL_SHAPES)).split(",") if s.strip()],
            dtypes=pick(args.dtypes, tuple(DTYPES), "dtype"),
            repeat=args.repeat or 7,
            device=args.device,
            backend=backend[0],
            min_seconds=max(0.0, args.min_seconds),
        )
        print(format_call_table(rows))
    else:
        rows = run_bench(
            estimators=pick(args.estimators or ",".join(ESTIMATORS), ESTIMATORS, "estimator"),
            shapes=[_shape(s) for s in (args.shapes or ",".join("x".join(map(str, s)) for s in DEFAULT_SHAPES)).split(",") if s.strip()],
            dtypes=pick(args.dtypes, tuple(DTYPES), "dtype"),
            backends=pick(args.backends or ",".join(BACKENDS), BACKENDS, "backend"),
            repeat=args.repeat or 5,
            device=args.device,
        )
        print(format_table(rows))
    if args.json:
        outputs.publish_file(args.json, json.dumps(rows, indent=1), what="bench JSON")
        print(f"wrote {args.json}")
    return 0
