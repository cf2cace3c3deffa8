"""The benchmarks' one timer (entrodrop_fast.ops.bench.time_calls)."""

import time

from entrodrop_fast.ops.bench import time_calls


def test_time_calls_warms_up_then_times_each_call():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.01 if len(calls) > 2 else 0)

    ts = time_calls(fn, 3, warmup=2)
    assert len(calls) == 5 and len(ts) == 3  # two untimed calls, then one figure per timed call
    assert all(0.01 <= t < 1.0 for t in ts)
    assert time_calls(fn, 0, warmup=1) == [] and len(calls) == 6
    assert (
        len(time_calls(fn, 2, warmup=0, device="cpu")) == 2
    )  # a CPU device: nothing to synchronize
