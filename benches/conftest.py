"""pytest-benchmark setup for benches/: run with ``pytest benches/bench_estimators.py``.

Every benchmark stores in ``benchmark.extra_info`` the throughput (GB/s), the roofline
(``x.sum()`` on the same tensor, timed in the same test) and the fraction of it.
"""

import statistics
import time

import pytest
import torch


def pytest_collect_file(file_path, parent):  # collect bench_*.py like test files
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def roofline():
    """roofline(x) -> seconds of the median x.sum() (a plain read of x)."""

    def measure(x: torch.Tensor, repeat: int = 5) -> float:
        x.sum()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            x.sum()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return measure
