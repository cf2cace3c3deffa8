"""Estimator benchmarks: provider (cpp, torch_fast, torch, onehot) x estimator x shape x dtype.

Run: ``pytest benches/bench_estimators.py --benchmark-columns=median,ops`` (add
``--benchmark-json=out.json``). Providers that do not apply (onehot beyond 1 GiB, the
reference on huge tensors, knn beyond 4096 tokens) are skipped with the reason.
"""

import pytest
import torch

from entrodrop_fast.ops import bench as B

SHAPES = [(256, 4096), (2048, 4096), (32768, 4096), (128, 256, 4096)]
DTYPES = ["fp32", "fp16", "bf16"]
_inputs: dict = {}


def _input(shape, dtype, seed=0):
    key = (shape, dtype, seed)
    if key not in _inputs:
        _inputs.clear()  # keep one pair of tensors alive at a time
        _inputs[key] = B.make_input(shape, B.DTYPES[dtype], seed=seed)
    return _inputs[key]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("estimator", B.ESTIMATORS)
@pytest.mark.parametrize("provider", B.BACKENDS)
def test_estimator(benchmark, roofline, provider, estimator, shape, dtype):
    if estimator == "bucket" or len(shape) == 2:
        pass
    else:
        pytest.skip("the batched shape is benchmarked for bucket only")
    x = _input(shape, dtype)
    if estimator == "knn" and (x.shape[0] != 1 or x.shape[1] > B.KNN_MAX_N):
        pytest.skip("knn is O(N^2 D): run on [N <= 4096, D] only")
    if (
        provider in ("torch", "onehot")
        and shape[-2] * shape[-1] * (shape[0] if len(shape) == 3 else 1) > 2**24
    ):
        pytest.skip("the slow reference providers run on small shapes only")
    f = B.make_input(shape, B.DTYPES[dtype], seed=1) if estimator == "cosine" else None
    fn = B._provider(estimator, provider, x, f, "cpu")
    if fn is None:
        pytest.skip(f"{provider} does not apply to {estimator} on {shape}")
    roof = roofline(x)
    rounds = 5 if provider in ("cpp", "torch_fast") else 1
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    sec = benchmark.stats.stats.median
    nbytes = x.numel() * x.element_size() * (2 if estimator == "cosine" else 1)
    gbps = nbytes / sec / 1e9
    roof_gbps = x.numel() * x.element_size() / roof / 1e9
    benchmark.extra_info.update(
        gbps=gbps,
        roofline_gbps=roof_gbps,
        roofline_frac=gbps / roof_gbps,
        elements_per_s=x.numel() / sec,
        threads=torch.get_num_threads(),
    )
