"""Interleaved timing of the cpp knn against torch.cdist + topk, [2048, 4096] fp32, k = 25.

    python benches/knn_vs_cdist.py [RUNS] [--json PATH]

Also checks the radii against the fp64 reference on three inputs and measures the peak
extra memory of the cpp path as a fraction of the N x N matrix.
"""

import argparse
import json
import statistics
import time

import torch

from entrodrop_fast import _ext
from entrodrop_fast.bench import knn_torch_fast, make_input, peak_extra_bytes
from entrodrop_fast.ops import cpp_backend, reference


def llm_like(n, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 1] = x[:, 1] * 50 + 3000.0
    x[:, d // 2] *= 400.0
    return x


def main(runs: int = 7, json_path: str | None = None) -> None:
    torch.set_num_threads(2)
    n, k = 2048, 25
    x = make_input((n, 4096), torch.float32)[0]
    precision = {}
    for name, xx in (("bench", x), ("llm_like", llm_like(n, 4096)), ("randn", torch.randn(n, 4096))):
        r, o = reference.knn_kth_distance(xx, k), cpp_backend.knn_kth_distance(xx, k)
        precision[name] = ((o - r).abs() / r).max().item()
        print(f"precision {name}: max rel err {precision[name]:.2e}")
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
    ratio = med["cpp"] / med["cdist+topk"]
    print(f"cpp / (cdist + topk) = {ratio:.3f} (cpp {1 / ratio:.2f}x as fast); peak extra memory {100 * mem:.1f}% of N x N")
    if json_path:
        out = {"shape": [n, 4096], "k": k, "runs": runs, "threads": torch.get_num_threads(),
               "thread_pool": _ext.require().thread_pool_cpu(), "median_seconds": med,
               "cpp_over_cdist_topk": ratio, "peak_extra_fraction_of_nxn": mem, "max_rel_err": precision}
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"wrote {json_path}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="?", type=int, default=7)
    ap.add_argument("--json", default=None, help="also write the figures as JSON")
    a = ap.parse_args()
    main(a.runs, a.json)
