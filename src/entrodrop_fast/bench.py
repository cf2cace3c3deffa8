"""Estimator throughput per backend, against a plain read of the same memory (``x.sum()``).

``run_bench`` times each (estimator, backend, shape, dtype) and, in the same run, the
roofline ``x.sum()`` over the same tensor, so every figure comes with a ratio measured on
the same machine at the same time. Used by ``entrodrop bench`` and ``benches/``.

Backends ("providers"):
  cpp        the compiled kernels (entrodrop_fast.ops.cpp_backend; cuda_backend on GPU)
  torch      the readable reference (entrodrop_fast.ops.reference)
  torch_fast the best pure-torch formulation: torch.var_mean + aminmax (moments), one
             flattened bincount over channel-offset bin indices (bucket),
             F.cosine_similarity (cosine), torch.cdist + topk (knn)
  onehot     the paper's one-hot histogram (bucket only; reference.bucket_onehot_reference)
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable

import torch

from entrodrop_fast.ops import reference as ref

ESTIMATORS = ("moments", "bucket", "cosine", "knn")
BACKENDS = ("cpp", "torch_fast", "torch", "onehot")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SHAPES = ((256, 4096), (2048, 4096), (32768, 4096), (128, 256, 4096))
BINS = 80
KNN_K = 25
ONEHOT_MAX_BYTES = 2**30  # the one-hot tensor N*D*bins*4 bytes; beyond this it is not run
KNN_MAX_N = 4096  # knn is O(N^2 D): larger shapes are not run
REFERENCE_MAX_ELEMENTS = 2**28  # the fp64 reference on more elements than this is not run


# ---------------------------------------------------------------- pure-torch formulations


def moments_torch_fast(x: torch.Tensor) -> tuple:
    """var_mean over tokens + min/max, per sample (x: [B, T, D])."""
    var, mean = torch.var_mean(x, dim=1, correction=0)
    mn, mx = torch.aminmax(x, dim=1)
    return var, mean, mn, mx


def bucket_torch_fast(x: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """Per-channel histogram entropy with one bincount per sample (x: [B, T, D])."""
    out = []
    for r in x.float():  # (T, D)
        n, d = r.shape
        idx = ref.bucket_bin_index(r, bins)  # (T, D)
        flat = idx + torch.arange(d, device=r.device) * bins  # channel-offset bins
        counts = torch.bincount(flat.flatten(), minlength=d * bins).view(d, bins)
        p = counts.double() / n
        out.append(-(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1))
    return torch.stack(out)


def cosine_torch_fast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    y = x.float() + f.float()
    return torch.nn.functional.cosine_similarity(x.float(), y, dim=-1).sum(-1)


def knn_torch_fast(x: torch.Tensor, k: int = KNN_K) -> torch.Tensor:
    """torch.cdist (fp32, matmul form) + topk; materialises N x N."""
    xf = x.float()
    d = torch.cdist(xf, xf)  # (N, N)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, dim=1, largest=False).values[:, -1]


# ---------------------------------------------------------------- timing


def _time(fn: Callable[[], object], repeat: int, warmup: int = 1, sync=None) -> list[float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t0)
    return ts


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by torch's CPU allocator while fn runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations are attributed to the op that made them (self memory), frees appear as
    # "[memory]" events; walking both in time order gives the peak of live bytes.
    cur = peak = 0
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    for e in events:
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return int(peak)


def make_input(shape: tuple[int, ...], dtype: torch.dtype, device="cpu", seed=0) -> torch.Tensor:
    """LLM-like hidden states [B, T, D] (2-D shapes get B = 1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape3 = shape if len(shape) == 3 else (1, *shape)
    x = torch.randn(*shape3, generator=g)
    x[..., 1] = x[..., 1] * 50 + 3000.0  # a massive channel, as in real LLMs
    return x.to(dtype=dtype, device=device)


def _provider(estimator: str, backend: str, x: torch.Tensor, f: torch.Tensor, device: str):
    """A zero-argument callable running (estimator, backend) on x, or None if not applicable."""
    if backend == "cpp":
        from entrodrop_fast.ops import cpp_backend as cb

        ok, _ = cb.available()
        if not ok or device not in cb.devices():
            return None
        return {
            "moments": lambda: cb.moments(x, None, None),
            "bucket": lambda: cb.bucket(x, None, None, BINS, False),
            "cosine": lambda: cb.cosine(x, f, None, True),
            "knn": lambda: cb.knn_kth_distance(x[0], KNN_K),
        }[estimator]
    if backend == "torch_fast":
        return {
            "moments": lambda: moments_torch_fast(x),
            "bucket": lambda: bucket_torch_fast(x, BINS),
            "cosine": lambda: cosine_torch_fast(x, f),
            "knn": lambda: knn_torch_fast(x[0], KNN_K),
        }[estimator]
    if backend == "torch":
        if x.numel() > REFERENCE_MAX_ELEMENTS:
            return None
        return {
            "moments": lambda: ref.moments(x, None, None),
            "bucket": lambda: ref.bucket(x, None, None, BINS, False),
            "cosine": lambda: ref.cosine(x, f, None, True),
            "knn": lambda: ref.knn_kth_distance(x[0], KNN_K),
        }[estimator]
    if backend == "onehot" and estimator == "bucket":
        if x.shape[0] != 1 or x.numel() * BINS * 4 > ONEHOT_MAX_BYTES:
            return None
        return lambda: ref.bucket_onehot_reference(x[0], BINS)
    return None


def run_bench(
    estimators: Iterable[str] = ESTIMATORS,
    shapes: Iterable[tuple[int, ...]] = DEFAULT_SHAPES,
    dtypes: Iterable[str] = ("fp32", "bf16"),
    backends: Iterable[str] = BACKENDS,
    repeat: int = 5,
    device: str = "cpu",
) -> list[dict]:
    """Time every applicable (estimator, backend, shape, dtype); one dict per measurement.

    Each dict: estimator, backend, shape, dtype, seconds (median), min_seconds, gbps (bytes
    of the inputs read once / seconds), roofline_gbps (x.sum() on the same input, same run),
    roofline_frac, elements_per_s, speedup_vs (backend -> ratio, filled across the group)
    and, for knn, peak_extra_bytes / nxn_bytes (CPU only).
    """
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    rows: list[dict] = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        for dname in dtypes:
            dtype = DTYPES[dname]
            x = make_input(shape, dtype, device)
            f = None
            roof = None
            for est in estimators:
                if est == "knn" and (x.shape[0] != 1 or x.shape[1] > KNN_MAX_N):
                    continue
                if est == "bucket" or est == "moments" or est == "knn":
                    nbytes = x.numel() * x.element_size()
                else:  # cosine reads x and f
                    if f is None:
                        f = make_input(shape, dtype, device, seed=1)
                    nbytes = 2 * x.numel() * x.element_size()
                if roof is None:
                    roof = statistics.median(_time(x.sum, max(3, repeat), sync=sync))
                roof_gbps = x.numel() * x.element_size() / roof / 1e9
                group = []
                for be in backends:
                    fn = _provider(est, be, x, f, device)
                    if fn is None:
                        continue
                    ts = _time(fn, repeat if be in ("cpp", "torch_fast") else max(1, min(repeat, 2)), sync=sync)
                    med = statistics.median(ts)
                    row = {
                        "estimator": est,
                        "backend": be,
                        "shape": list(shape),
                        "dtype": dname,
                        "device": device,
                        "threads": torch.get_num_threads(),
                        "seconds": med,
                        "min_seconds": min(ts),
                        "gbps": nbytes / med / 1e9,
                        "roofline_gbps": roof_gbps,
                        "roofline_frac": (nbytes / med / 1e9) / roof_gbps,
                        "elements_per_s": x.numel() / med,
                    }
                    if est == "knn" and device == "cpu":
                        n = x.shape[1]
                        row["nxn_bytes"] = n * n * 4
                        row["peak_extra_bytes"] = peak_extra_bytes(fn)
                    group.append(row)
                    gc.collect()
                for row in group:
                    row["speedup_vs"] = {o["backend"]: o["seconds"] / row["seconds"] for o in group if o is not row}
                rows.extend(group)
            x = f = None  # free before the next shape
            gc.collect()
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of run_bench rows."""
    head = "| estimator | shape | dtype | backend | ms | GB/s | % of x.sum() | speedup of cpp |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        cpp = next((o for o in rows if o["backend"] == "cpp" and o["estimator"] == r["estimator"] and o["shape"] == r["shape"] and o["dtype"] == r["dtype"]), None)
        sp = f"{r['seconds'] / cpp['seconds']:.1f}x" if cpp and r is not cpp else ""
        extra = ""
        if "peak_extra_bytes" in r:
            extra = f" (peak extra mem {100 * r['peak_extra_bytes'] / r['nxn_bytes']:.1f}% of NxN)"
        lines.append(
            f"| {r['estimator']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['backend']}{extra} | "
            f"{1e3 * r['seconds']:.2f} | {r['gbps']:.2f} | {100 * r['roofline_frac']:.0f}% | {sp} |"
        )
    return "\n".join(lines)
