"""Interleaved timing of the cpp knn against torch.cdist + topk, [2048, 4096] fp32, k = 25.

    python benches/knn_vs_cdist.py [RUNS]

Also checks the radii against the fp64 reference on three inputs and measures the peak
extra memory of the cpp path as a fraction of the N x N matrix.
"""

import statistics
import sys
import time

import torch

from entrodrop_fast.bench import knn_torch_fast, make_input, peak_extra_bytes
from entrodrop_fast.ops import cpp_backend, reference


def llm_like(n, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 1] = x[:, 1] * 50 + 3000.0
    x[:, d // 2] *= 400.0
    return x


def main(runs: int = 7) -> None:
    torch.set_num_threads(2)
    n, k = 2048, 25
    x = make_input((n, 4096), torch.float32)[0]
    for name, xx in (("bench", x), ("llm_like", llm_like(n, 4096)), ("randn", torch.randn(n, 4096))):
        r, o = reference.knn_kth_distance(xx, k), cpp_backend.knn_kth_distance(xx, k)
        print(f"precision {name}: max rel err {((o - r).abs() / r).max().item():.2e}")
    mem = peak_extra_bytes(lambda: cpp_backend.knn_kth_distance(x, k)) / (n * n * 4)
    fns = {"cdist+topk": lambda: knn_torch_fast(x, k), "cpp": lambda: cpp_backend.knn_kth_distance(x, k)}
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(runs):  # interleaved, so both see the same machine state
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name in fns:
        print(f"{name}: median {med[name]:.3f} s over {runs} runs")
    print(f"cpp / (cdist + topk) = {med['cpp'] / med['cdist+topk']:.3f}; peak extra memory {100 * mem:.1f}% of N x N")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
