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


class MemoryError_(ValueError):
    """A benchmark tensor that does not fit (reported in one line, as a bad request)."""


def _allocatable(shape, dtype, device) -> None:
    import math

    import torch

    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    what = "x".join(map(str, shape))
    try:
        # malloc may promise more than there is (overcommit): compare with the RAM
        if device.type == "cpu":
            import os

            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            if nbytes > ram:
                raise MemoryError(f"more than the {ram / 2**30:.1f} GiB of RAM")
        t = torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as exc:  # torch's allocator: RuntimeError / OutOfMemoryError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MemoryError_(
            f"shape {what} in {str(dtype).replace('torch.', '')} needs "
            f"{nbytes / 2**30:.1f} GiB ({nbytes} bytes), "
            f"which cannot be allocated on {device} ({first}); use smaller --shapes"
        ) from None
    del t


def _shapes_text(shapes) -> str:
    """Shapes as --shapes takes them: ``((256, 4096), (8, 512))`` -> ``"256x4096,8x512"``."""
    return ",".join("x".join(map(str, s)) for s in shapes)


def register(sub) -> None:
    from entrodrop_fast.cli import add_output_file_args, positive_int
    from entrodrop_fast.ops import bench as B

    p = sub.add_parser(
        "bench",
        help="time the estimators per backend against a plain read (x.sum()) of the same tensor",
    )
    p.add_argument(
        "--calls",
        action="store_true",
        help="time the public calls (ef.bucket_entropy(x), delta_entropy(x, f), ...: validation "
        "on) beside the same calls with validate=False and the roofline of reading their inputs, "
        "interleaved; the minimum of the runs",
    )
    p.add_argument(
        "--estimators",
        default=None,
        help=f"comma-separated from {', '.join(B.ESTIMATORS)} (default all); "
        f"with --calls from {', '.join(B.CALLS)}",
    )
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated, e.g. 256x4096,128x256x4096 "
        f"(default {_shapes_text(B.DEFAULT_SHAPES)}; with --calls {_shapes_text(B.CALL_SHAPES)})",
    )
    p.add_argument(
        "--dtypes", default="fp32,bf16", help=f"comma-separated from {', '.join(B.DTYPES)}"
    )
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated from {', '.join(B.BACKENDS)} (default all); with --calls one API "
        "backend, auto (default), cpp, triton or torch",
    )
    p.add_argument(
        "--repeat",
        type=positive_int,
        default=None,
        help="timed runs per case, the median reported (default 5); with --calls rounds, the "
        "minimum reported (default 7)",
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=0.5,
        help="with --calls: more rounds for fast calls, until the default call has run this long "
        "in all (default 0.5; at most 300 rounds): the minimum then comes from a round the "
        "machine did not preempt",
    )
    p.add_argument("--device", default="cpu")
    add_output_file_args(
        p,
        "--json",
        "also write the results as JSON (an existing file is replaced only when it is an earlier "
        "bench JSON)",
        "a bench JSON",
        default=None,
        metavar="PATH",
    )
    p.set_defaults(func=run)


def _is_bench_json(path) -> bool:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and "estimator" in r for r in rows)


def run(args) -> int:
    from entrodrop_fast import outputs
    from entrodrop_fast.ops import bench as B
    from entrodrop_fast.ops.api import BACKENDS as API_BACKENDS

    if args.json is not None:  # checked before the benchmark runs ("" too: refused)
        outputs.check_file(
            args.json,
            what="bench JSON",
            recognise=_is_bench_json,
            overwrite=args.overwrite,
            flag="--json",
        )

    def pick(text, allowed, what):
        items = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad:
            raise ValueError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
        return items

    from entrodrop_fast.models.loading import parse_device

    device = parse_device(args.device)  # a device torch cannot use stops here
    dtypes = pick(args.dtypes, tuple(B.DTYPES), "dtype")
    default_shapes = _shapes_text(B.CALL_SHAPES if args.calls else B.DEFAULT_SHAPES)
    shapes = [_shape(s) for s in (args.shapes or default_shapes).split(",") if s.strip()]
    for shape in shapes:  # every input tensor can be made, before any case runs
        for name in dtypes:
            _allocatable(shape, B.DTYPES[name], device)
    try:
        if args.calls:
            backend = pick(args.backends or "auto", ("auto", *API_BACKENDS), "backend")
            if len(backend) != 1:
                raise ValueError(
                    f"--calls times one API backend at a time, got {', '.join(backend)}"
                )
            rows = B.run_call_bench(
                calls=pick(args.estimators or ",".join(B.CALLS), tuple(B.CALLS), "call"),
                shapes=shapes,
                dtypes=dtypes,
                repeat=args.repeat or 7,
                device=args.device,
                backend=backend[0],
                min_seconds=max(0.0, args.min_seconds),
            )
            print(B.format_call_table(rows))
        else:
            rows = B.run_bench(
                estimators=pick(
                    args.estimators or ",".join(B.ESTIMATORS), B.ESTIMATORS, "estimator"
                ),
                shapes=shapes,
                dtypes=dtypes,
                backends=pick(args.backends or ",".join(B.BACKENDS), B.BACKENDS, "backend"),
                repeat=args.repeat or 5,
                device=args.device,
            )
            print(B.format_table(rows))
    except RuntimeError as exc:
        if "alloc" not in str(exc).lower() and "memory" not in str(exc).lower():
            raise
        raise MemoryError_(
            f"the benchmark ran out of memory on {device} "
            f"({str(exc).strip().splitlines()[0]}); use smaller --shapes"
        ) from None
    if args.json is not None:
        outputs.publish_file(args.json, json.dumps(rows, indent=1), what="bench JSON")
        print(f"wrote {args.json}")
    return 0
