"""GPU benchmark of the moments and bucket kernels against the memory roofline of the same run.

    python benches/bench_gpu.py --out OUT_DIR          # on a CUDA GPU
    GPU_CHECK_DRY=1 python benches/bench_gpu.py        # CPU dry run: tiny shapes, interpreter

For [32768, 8192] bf16 and fp32 it times, with CUDA events (median of several runs after a
warm-up), the device-to-device copy ``x.clone()`` (bytes read + written: the roofline the
target is set against), ``x.sum()`` (a plain read), and moments / bucket (80 bins) of the
``triton`` and ``cuda`` backends, plus a few Triton block configurations. Each result gives
the time, the "effective" bandwidth (x's bytes once / time, the number the issue's 70%
target is about), the fraction of the copy bandwidth, and the bandwidth of the bytes the
kernel really reads (bucket reads x twice: min/max first, then the bins). Writes
bench.json and bench.md to the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

DRY = os.environ.get("GPU_CHECK_DRY", "0") not in ("", "0")
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(msg: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timeit(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds per call: CUDA events on a GPU, wall-clock on the CPU (dry run)."""
    from entrodrop_fast.ops.bench import time_calls

    return statistics.median(
        time_calls(fn, reps, warmup, cuda_events=torch.cuda.is_available() and not DRY)
    )


def make(shape, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
    x[..., 1] = x[..., 1] * 50 + 3000.0  # LLM-like outlier channels
    x[..., shape[-1] // 2] *= 400.0
    return x.to(dtype)


def backends(device):
    out = {}
    try:
        from entrodrop_fast.ops import triton_backend

        ok, why = triton_backend.available()
        out["triton"] = triton_backend if ok else why
    except Exception as exc:
        out["triton"] = f"{type(exc).__name__}: {exc}"
    try:
        from entrodrop_fast.ops import cuda_backend

        ok, why = cuda_backend.available()
        out["cuda"] = cuda_backend if ok else why
    except Exception as exc:
        out["cuda"] = f"{type(exc).__name__}: {exc}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "./gpu_out"))
    ap.add_argument("--reps", type=int, default=3 if DRY else 15)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="skip the Triton block-size sweep (and Triton bucket/moments on fp32)",
    )
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    device = "cpu" if DRY else "cuda"
    if not DRY and not torch.cuda.is_available():
        log("no CUDA device; use GPU_CHECK_DRY=1 for a CPU dry run")
        return 2
    shapes = [(1, 64, 96)] if DRY else [(1, 32768, 8192)]
    dtypes = [torch.bfloat16, torch.float32]
    bins = 80
    info = {
        "device": torch.cuda.get_device_name() if not DRY else "cpu (dry run)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dry_run": DRY,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if not DRY:
        p = torch.cuda.get_device_properties(0)
        info.update(sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1))
    bk = backends(device)
    info["backends"] = {k: ("ok" if not isinstance(v, str) else v) for k, v in bk.items()}
    log(f"{info}")

    rows = []

    def record(shape, dtype, op, impl, seconds, nbytes, reads, copy_bw, extra=None):
        eff = nbytes / seconds
        row = {
            "shape": list(shape),
            "dtype": str(dtype).replace("torch.", ""),
            "op": op,
            "impl": impl,
            "time_us": round(seconds * 1e6, 2),
            "eff_GBps": round(eff / 1e9, 1),
            "frac_of_copy": round(eff / copy_bw, 3) if copy_bw else None,
            "traffic_GBps": round(reads * nbytes / seconds / 1e9, 1),
        }
        if extra:
            row.update(extra)
        rows.append(row)
        log(
            f"{op:>8} {impl:<28} {row['dtype']:<9} {row['time_us']:>9.1f} us  "
            f"eff {row['eff_GBps']:>7.1f} GB/s  "
            f"{(row['frac_of_copy'] or 0) * 100:5.1f}% of copy  "
            f"(traffic {row['traffic_GBps']} GB/s)"
        )

    for shape in shapes:
        for dtype in dtypes:
            x = make(shape, dtype, device)
            nbytes = x.numel() * x.element_size()
            t_copy = timeit(lambda x=x: x.clone(), args.reps)
            copy_bw = 2 * nbytes / t_copy  # read + write
            rows.append(
                {
                    "shape": list(shape),
                    "dtype": str(dtype).replace("torch.", ""),
                    "op": "copy",
                    "impl": "x.clone()",
                    "time_us": round(t_copy * 1e6, 2),
                    "copy_GBps": round(copy_bw / 1e9, 1),
                }
            )
            log(
                f"    copy x.clone()                   {t_copy * 1e6:9.1f} us  "
                f"{copy_bw / 1e9:.1f} GB/s (read+write)"
            )
            record(
                shape,
                dtype,
                "read",
                "x.sum()",
                timeit(lambda x=x: x.sum(), args.reps),
                nbytes,
                1,
                copy_bw,
            )
            for name, mod in bk.items():
                if isinstance(mod, str):
                    continue
                for op, call, reads in [
                    ("moments", lambda m=mod, x=x: m.moments(x, None, None), 1),
                    ("bucket", lambda m=mod, x=x: m.bucket(x, None, None, bins, False), 2),
                ]:
                    try:
                        record(
                            shape, dtype, op, name, timeit(call, args.reps), nbytes, reads, copy_bw
                        )
                    except Exception as exc:
                        traceback.print_exc()
                        rows.append(
                            {
                                "shape": list(shape),
                                "dtype": str(dtype),
                                "op": op,
                                "impl": name,
                                "error": f"{type(exc).__name__}: {exc}",
                            }
                        )
            # parts of the bucket pipeline and a few Triton block configurations (bf16 only)
            if dtype != torch.bfloat16:
                continue
            if not isinstance(bk.get("cuda"), str):
                from entrodrop_fast.ops import cuda_backend as cb

                try:
                    record(
                        shape,
                        dtype,
                        "bucket",
                        "cuda counts only",
                        timeit(lambda x=x: cb.bucket_counts(x, None, None, bins), args.reps),
                        nbytes,
                        2,
                        copy_bw,
                    )
                    if args.quick:  # the two passes of the CUDA bucket, timed alone
                        from entrodrop_fast import _ext

                        C = _ext.require()
                        a = cb._args(x, None, None)
                        B_, T_, D_ = x.shape
                        Sp, rp = cb._splits(x, a[-1], None, kind=1, waves=2)
                        pmin = torch.empty((B_, Sp, D_), dtype=torch.float32, device=x.device)
                        pmax = torch.empty_like(pmin)
                        dev, st = cb._launch_ctx(x)
                        record(
                            shape,
                            dtype,
                            "minmax",
                            f"cuda pass 1 (S={Sp})",
                            timeit(
                                lambda: C.cuda_minmax_partial(
                                    *a, Sp, rp, pmin.data_ptr(), pmax.data_ptr(), dev, st
                                ),
                                args.reps,
                            ),
                            nbytes,
                            1,
                            copy_bw,
                        )
                        S2, r2 = cb._splits(
                            x, a[-1], None, kind=2, bins=bins, waves=1, max_rows=cb._HIST_MAX_ROWS
                        )
                        ph = torch.empty((B_, S2, D_, bins), dtype=torch.int32, device=x.device)
                        record(
                            shape,
                            dtype,
                            "bins",
                            f"cuda pass 2 (S={S2})",
                            timeit(
                                lambda: C.cuda_bucket_hist(
                                    *a,
                                    Sp,
                                    pmin.data_ptr(),
                                    pmax.data_ptr(),
                                    S2,
                                    r2,
                                    bins,
                                    ph.data_ptr(),
                                    dev,
                                    st,
                                ),
                                args.reps,
                            ),
                            nbytes,
                            1,
                            copy_bw,
                        )
                except Exception as exc:
                    log(f"cuda counts: {exc}")
            if not isinstance(bk.get("triton"), str) and not args.quick:
                from entrodrop_fast.ops.triton import bucket as tb
                from entrodrop_fast.ops.triton import moments as tm

                configs = [
                    dict(block_t=32, block_d=128, num_warps=4),
                    dict(block_t=64, block_d=128, num_warps=8),
                    dict(block_t=32, block_d=256, num_warps=8),
                    dict(block_t=16, block_d=256, num_warps=4),
                    dict(block_t=64, block_d=64, num_warps=4),
                ]
                if DRY:
                    configs = configs[:1]
                for cfg in configs:
                    tag = "triton t{block_t} d{block_d} w{num_warps}".format(**cfg)
                    try:
                        record(
                            shape,
                            dtype,
                            "moments",
                            tag,
                            timeit(lambda c=cfg, x=x: tm.moments(x, None, None, **c), args.reps),
                            nbytes,
                            1,
                            copy_bw,
                            {"config": cfg},
                        )
                        record(
                            shape,
                            dtype,
                            "bucket",
                            tag,
                            timeit(
                                lambda c=cfg, x=x: tb.bucket(x, None, None, bins, False, **c),
                                args.reps,
                            ),
                            nbytes,
                            2,
                            copy_bw,
                            {"config": cfg},
                        )
                    except Exception as exc:
                        log(f"{tag}: {type(exc).__name__}: {exc}")
                        rows.append(
                            {"op": "config", "impl": tag, "error": f"{type(exc).__name__}: {exc}"}
                        )
            del x
            if not DRY:
                torch.cuda.empty_cache()

    # batched bucket, as in issue 3's list
    bshape = (2, 16, 64) if DRY else (128, 256, 4096)
    x = make(bshape, torch.bfloat16, device)
    nbytes = x.numel() * x.element_size()
    t_copy = timeit(lambda x=x: x.clone(), args.reps)
    copy_bw = 2 * nbytes / t_copy
    rows.append(
        {
            "shape": list(bshape),
            "dtype": "bfloat16",
            "op": "copy",
            "impl": "x.clone()",
            "time_us": round(t_copy * 1e6, 2),
            "copy_GBps": round(copy_bw / 1e9, 1),
        }
    )
    for name, mod in bk.items():
        if not isinstance(mod, str):
            try:
                record(
                    bshape,
                    torch.bfloat16,
                    "bucket",
                    name,
                    timeit(lambda m=mod, x=x: m.bucket(x, None, None, bins, False), args.reps),
                    nbytes,
                    2,
                    copy_bw,
                )
                if name == "cuda":  # the same through the two-pass kernels (fused=False)
                    record(
                        bshape,
                        torch.bfloat16,
                        "bucket",
                        "cuda two-pass",
                        timeit(
                            lambda m=mod, x=x: m.bucket(x, None, None, bins, False, fused=False),
                            args.reps,
                        ),
                        nbytes,
                        2,
                        copy_bw,
                    )
            except Exception as exc:
                rows.append(
                    {
                        "shape": list(bshape),
                        "op": "bucket",
                        "impl": name,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )

    (out_dir / "bench.json").write_text(json.dumps({"info": info, "results": rows}, indent=1))
    md = [
        "# entrodrop_fast GPU benchmark",
        "",
        f"{info}",
        "",
        "eff = bytes of x (read once) / time; "
        "% of copy = eff / (x.clone() bytes read+written / time); "
        "traffic = bytes the kernel really reads / time (bucket reads x twice).",
        "",
        "| shape | dtype | op | impl | time (us) | eff GB/s | % of copy | traffic GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            md.append(
                f"| {r.get('shape', '')} | {r.get('dtype', '')} | {r['op']} | {r['impl']} "
                f"| error: {r['error'][:80]} | | | |"
            )
        elif r["op"] == "copy":
            md.append(
                f"| {r['shape']} | {r['dtype']} | copy | x.clone() | {r['time_us']} "
                f"| {r['copy_GBps']} (r+w) | 100 | |"
            )
        else:
            md.append(
                f"| {r['shape']} | {r['dtype']} | {r['op']} | {r['impl']} | {r['time_us']} "
                f"| {r['eff_GBps']} | {100 * r['frac_of_copy']:.1f} | {r['traffic_GBps']} |"
            )
    (out_dir / "bench.md").write_text("\n".join(md) + "\n")
    log(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
