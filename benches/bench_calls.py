"""What users call: the public API with its defaults (validation on) beside validate=False.

Run: ``pytest benches/bench_calls.py --benchmark-columns=min,median`` (add
``--benchmark-json=out.json``). Each test times the default call with pytest-benchmark and,
interleaved with it (before each round, untimed by pytest-benchmark), the same call with
``validate=False`` and the roofline of reading its inputs (``x.sum()``, or ``x.sum()`` +
``f.sum()`` for delta_entropy / cosine, which read the pair X, F); ``extra_info`` holds the
ratios. ``entrodrop bench --calls``
prints the same as one table (``entrodrop_fast.ops.bench.run_call_bench``).
"""

import warnings

import pytest

from entrodrop_fast.ops import bench as B

ROUNDS = 7
_inputs: dict = {}


def _pair(shape, dtype):
    key = (shape, dtype)
    if key not in _inputs:
        _inputs.clear()  # keep one pair of tensors alive at a time
        _inputs[key] = (
            B.make_input(shape, B.DTYPES[dtype]),
            B.make_input(shape, B.DTYPES[dtype], seed=1),
        )
    return _inputs[key]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", B.CALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("call", list(B.CALLS))
def test_call(benchmark, call, shape, dtype):
    x, f = _pair(shape, dtype)
    fns = B._call_fns(call, x, f, "auto")
    best = {k: float("inf") for k in ("novalidate", "roofline")}

    order = [list(best)]

    def others():  # before each timed round of the default call: the two others, timed here
        # (in alternating order: torch's x.sum() leaves its OpenMP threads spinning for a
        # while, which slows whatever runs next on a small machine)
        order[0].reverse()
        for k in order[0]:
            best[k] = min(best[k], *B.time_calls(fns[k], 1, warmup=0))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        benchmark.pedantic(fns["default"], setup=others, rounds=ROUNDS, warmup_rounds=1)
    default = benchmark.stats.stats.min
    benchmark.extra_info.update(
        default_s=default,
        novalidate_s=best["novalidate"],
        roofline_s=best["roofline"],
        default_over_novalidate=default / best["novalidate"],
        default_roofline_frac=best["roofline"] / default,
        reads="x,f" if B.CALLS[call][0] else "x",
    )
