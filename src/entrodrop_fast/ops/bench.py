"""Estimator throughput per backend, against a plain read of the same memory (``x.sum()``).

``run_bench`` times each (estimator, backend, shape, dtype) and, in the same run, the
roofline ``x.sum()`` over the same tensor, so every figure comes with a ratio measured on
the same machine at the same time. Used by ``entrodrop bench`` and ``benches/``.

Backends ("providers"):
  cpp        the compiled kernels (entrodrop_fast.ops.cpp_backend; the cuda backend on GPU)
  torch      the readable reference (entrodrop_fast.ops.reference)
  torch_fast the best pure-torch formulation: torch.var_mean + aminmax (moments), one
             flattened bincount over channel-offset bin indices (bucket),
             F.cosine_similarity (cosine), torch.cdist + topk (knn)
  onehot     the paper's one-hot histogram (bucket only; reference.bucket_onehot_reference)

``run_call_bench`` times what users call instead: the public API with its defaults
(``ef.bucket_entropy(x)``: validation on, backend "auto") beside the same call with
``validate=False``, and the roofline of reading its inputs (``x.sum()``, or ``x.sum()`` +
``f.sum()`` for the calls that read the pair X, F), interleaved in the same run.
"""

from __future__ import annotations

import gc
import statistics
import time
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
# Public calls (run_call_bench): name -> (reads the pair X, F?, call(x, f, validate, backend))
CALLS = {
    "bucket": (False, lambda x, f, v, be: _api().bucket_entropy(x, validate=v, backend=be)),
    "gaussian_diag": (
        False,
        lambda x, f, v, be: _api().gaussian_diag_entropy(x, validate=v, backend=be),
    ),
    "delta_bucket": (
        True,
        lambda x, f, v, be: _api().delta_entropy(x, f, "bucket", validate=v, backend=be),
    ),
    "delta_gaussian_diag": (
        True,
        lambda x, f, v, be: _api().delta_entropy(x, f, "gaussian_diag", validate=v, backend=be),
    ),
    "cosine": (True, lambda x, f, v, be: _api().cosine_importance(x, f, validate=v, backend=be)),
    "bucket_and_cosine": (
        True,
        lambda x, f, v, be: _api().bucket_entropy_and_cosine(x, f, validate=v, backend=be),
    ),
}
# the profiler's taps (SmolLM2 / 4096-wide models, batch 1, 8 and 128 samples of 256 tokens)
# and one big sample
CALL_SHAPES = ((1, 256, 4096), (8, 256, 4096), (128, 256, 4096), (8, 256, 576), (32768, 4096))


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


def time_calls(
    fn: Callable[[], object],
    repeat: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    cuda_events: bool = False,
) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn()``: the one timer of the benchmarks.

    ``warmup`` untimed calls come first (thread pools, allocator, first-call compilation).
    Each timed call is wall-clock time (``time.perf_counter``) around ``fn()`` alone. On a CUDA
    ``device`` the device is synchronized before and after each call, so that the work the
    call queued is counted in it and nothing queued earlier is; on the CPU (``device`` None or
    a CPU device) nothing is synchronized. With ``cuda_events`` each call is timed on the GPU
    instead, by CUDA events recorded just before and after it (the device is synchronized once
    after the warm-up, and each call's end event is waited for). Returns one figure per call,
    in order: callers take the median or the minimum.
    """
    for _ in range(warmup):
        fn()
    if cuda_events:
        torch.cuda.synchronize()
        ts = []
        for _ in range(repeat):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return ts
    sync = device is not None and torch.device(device).type == "cuda"
    ts = []
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize(device)
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


def make_input(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> torch.Tensor:
    """LLM-like hidden states [B, T, D] (2-D shapes get B = 1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape3 = shape if len(shape) == 3 else (1, *shape)
    x = torch.randn(*shape3, generator=g)
    x[..., 1] = x[..., 1] * 50 + 3000.0  # a massive channel, as in real LLMs
    return x.to(dtype=dtype, device=device)


def _provider(
    estimator: str, backend: str, x: torch.Tensor, f: torch.Tensor | None, device: str
) -> Callable[[], object] | None:
    """A zero-argument callable running (estimator, backend) on x, or None if not applicable
    (f: the second input of cosine; None for the other estimators)."""
    if f is None:
        if estimator == "cosine":
            raise ValueError("the cosine benchmark reads f: pass it")
        f = x  # not read: only cosine reads f
    if backend == "cpp":  # (on CUDA tensors: the cuda backend, as ops/backends.py resolves "cpp")
        from entrodrop_fast.ops.backends import kernel, resolve_backend

        try:
            name = resolve_backend("cpp", torch.device(device))
        except ValueError:
            return None
        op = {
            "moments": "moments",
            "bucket": "bucket",
            "cosine": "cosine",
            "knn": "knn_kth_distance",
        }[estimator]
        fn = kernel(name, device, op)
        if fn is None:  # (an optional op without a kernel: none of these)
            return None
        return {
            "moments": lambda: fn(x, None, None),
            "bucket": lambda: fn(x, None, None, BINS, False),
            "cosine": lambda: fn(x, f, None, True),
            "knn": lambda: fn(x[0], KNN_K),
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


def _cases(
    shapes: Iterable[tuple[int, ...]], dtypes: Iterable[str]
) -> Iterator[tuple[tuple[int, ...], str, torch.dtype]]:
    """(shape, dtype name, dtype) for every shape, then every dtype of it."""
    for shape in shapes:
        for dname in dtypes:
            yield tuple(int(s) for s in shape), dname, DTYPES[dname]


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
    rows: list[dict] = []
    for shape, dname, dtype in _cases(shapes, dtypes):
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
                roof = statistics.median(time_calls(x.sum, max(3, repeat), device=device))
            roof_gbps = x.numel() * x.element_size() / roof / 1e9
            group: list[dict[str, Any]] = []
            for be in backends:
                fn = _provider(est, be, x, f, device)
                if fn is None:
                    continue
                ts = time_calls(
                    fn,
                    repeat if be in ("cpp", "torch_fast") else max(1, min(repeat, 2)),
                    device=device,
                )
                med = statistics.median(ts)
                row: dict[str, Any] = {
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
                row["speedup_vs"] = {
                    o["backend"]: o["seconds"] / row["seconds"] for o in group if o is not row
                }
            rows.extend(group)
        del x, f  # free before the next shape
        gc.collect()
    return rows


def _api() -> types.ModuleType:
    from entrodrop_fast.ops import api

    return api


def _call_fns(
    name: str, x: torch.Tensor, f: torch.Tensor, backend: str
) -> dict[str, Callable[[], object]]:
    """The three timed callables of one call: default, validate=False, roofline."""
    pair, call = CALLS[name]
    return {
        "default": lambda: call(x, f, True, backend),
        "novalidate": lambda: call(x, f, False, backend),
        "roofline": (lambda: (x.sum(), f.sum())) if pair else x.sum,
    }


def run_call_bench(
    calls: Iterable[str] = tuple(CALLS),
    shapes: Iterable[tuple[int, ...]] = CALL_SHAPES,
    dtypes: Iterable[str] = ("fp32", "bf16"),
    repeat: int = 7,
    device: str = "cpu",
    backend: str = "auto",
    min_seconds: float = 0.5,
    max_rounds: int = 300,
) -> list[dict]:
    """Time each public call with its defaults beside ``validate=False`` and the roofline.

    The three are interleaved (one of each per round, after a warm-up), so that a load
    change on the machine hits all of them, in an order that rotates every round (so that
    none always runs right after another); the minimum of the rounds is reported. Rounds:
    ``repeat``, or more for fast calls, until the default call has run ``min_seconds`` in
    all (at most ``max_rounds``): on a shared machine a short call is often preempted, and
    the minimum needs rounds that were not. One dict per (call, shape, dtype): estimator
    (the call), mode "calls", shape, dtype, reads ("x" or "x,f"), bytes (of the inputs read
    once), rounds, default_s, novalidate_s, roofline_s (min), their medians (*_median_s), the
    minimum CPU time of the process (*_cpu_s: all threads; it excludes time the process
    waited for a core), default_over_novalidate, default_roofline_frac and
    novalidate_roofline_frac (roofline_s / the call's time), and the same two from CPU times
    (*_cpu).
    """
    import warnings

    rows: list[dict] = []
    for shape, dname, dtype in _cases(shapes, dtypes):
        x = make_input(shape, dtype, device)
        f = make_input(shape, dtype, device, seed=1)
        x3 = x if x.dim() == 3 else x[None]
        for name in calls:
            pair = CALLS[name][0]
            fns = _call_fns(name, x, f, backend)
            ts: dict[str, list[float]] = {k: [] for k in fns}
            cpu: dict[str, list[float]] = {k: [] for k in fns}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # floored variances etc.
                for fn in fns.values():
                    time_calls(fn, 0, warmup=1, device=device)
                rounds = 0
                keys = list(fns)
                while rounds < repeat or (sum(ts["default"]) < min_seconds and rounds < max_rounds):
                    # the order rotates every round: each callable follows each other one
                    # equally often (torch's x.sum() leaves its OpenMP threads spinning for
                    # a while, which slows whatever runs next on a 2-core machine)
                    for k in keys[rounds % 3 :] + keys[: rounds % 3]:
                        fn = fns[k]
                        c0 = time.process_time()
                        ts[k] += time_calls(fn, 1, warmup=0, device=device)
                        cpu[k].append(time.process_time() - c0)
                    rounds += 1
            best = {k: min(v) for k, v in ts.items()}
            bcpu = {k: max(min(v), 1e-9) for k, v in cpu.items()}
            rows.append(
                {
                    "estimator": name,
                    "mode": "calls",
                    "backend": backend,
                    "shape": list(shape),
                    "dtype": dname,
                    "device": device,
                    "threads": torch.get_num_threads(),
                    "reads": "x,f" if pair else "x",
                    "bytes": x3.numel() * x3.element_size() * (2 if pair else 1),
                    "rounds": rounds,
                    "default_s": best["default"],
                    "novalidate_s": best["novalidate"],
                    "roofline_s": best["roofline"],
                    **{f"{k}_median_s": statistics.median(v) for k, v in ts.items()},
                    **{f"{k}_cpu_s": v for k, v in bcpu.items()},
                    "default_over_novalidate": best["default"] / best["novalidate"],
                    "default_roofline_frac": best["roofline"] / best["default"],
                    "novalidate_roofline_frac": best["roofline"] / best["novalidate"],
                    "default_over_novalidate_cpu": bcpu["default"] / bcpu["novalidate"],
                    "default_roofline_frac_cpu": bcpu["roofline"] / bcpu["default"],
                }
            )
        del x, f, x3
        gc.collect()
    return rows


def format_call_table(rows: list[dict]) -> str:
    """A markdown table of run_call_bench rows."""
    head = (
        "| call | shape | dtype | reads | default ms | validate=False ms "
        "| default / validate=False | roofline ms | default % of roofline "
        "| validate=False % of roofline | CPU time: default / validate=False, % of roofline |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['estimator']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} "
            f"| {r['reads']} | {1e3 * r['default_s']:.2f} | {1e3 * r['novalidate_s']:.2f} "
            f"| {r['default_over_novalidate']:.2f}x | {1e3 * r['roofline_s']:.2f} "
            f"| {100 * r['default_roofline_frac']:.0f}% "
            f"| {100 * r['novalidate_roofline_frac']:.0f}% "
            f"| {r['default_over_novalidate_cpu']:.2f}x, "
            f"{100 * r['default_roofline_frac_cpu']:.0f}% |"
        )
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """A markdown table of run_bench rows."""
    head = "| estimator | shape | dtype | backend | ms | GB/s | % of x.sum() | speedup of cpp |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        cpp = next(
            (
                o
                for o in rows
                if o["backend"] == "cpp"
                and o["estimator"] == r["estimator"]
                and o["shape"] == r["shape"]
                and o["dtype"] == r["dtype"]
            ),
            None,
        )
        sp = f"{r['seconds'] / cpp['seconds']:.1f}x" if cpp and r is not cpp else ""
        extra = ""
        if "peak_extra_bytes" in r:
            share = 100 * r["peak_extra_bytes"] / r["nxn_bytes"]
            extra = f" (peak extra mem {share:.1f}% of NxN)"
        lines.append(
            f"| {r['estimator']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} "
            f"| {r['backend']}{extra} | {1e3 * r['seconds']:.2f} | {r['gbps']:.2f} "
            f"| {100 * r['roofline_frac']:.0f}% | {sp} |"
        )
    return "\n".join(lines)
