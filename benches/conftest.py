"""pytest-benchmark setup for benches/: run with ``pytest benches/bench_estimators.py``.

Every benchmark stores in ``benchmark.extra_info`` the throughput (GB/s), the roofline
(``x.sum()`` on the same tensor, timed in the same test) and the fraction of it.
"""

import statistics

import pytest
import torch

from entrodrop_fast.ops.bench import time_calls


def pytest_collect_file(file_path, parent):  # collect bench_*.py like test files
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def roofline():
    """roofline(x) -> seconds of the median x.sum() (a plain read of x)."""

    def measure(x: torch.Tensor, repeat: int = 5) -> float:
        return statistics.median(time_calls(x.sum, repeat))  # after one untimed x.sum()

    return measure
