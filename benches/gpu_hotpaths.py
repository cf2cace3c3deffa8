"""Figures of benches/gpu_hotpaths.sh that no other bench gives, and its report.

    python benches/gpu_hotpaths.py micro --out DIR [--device cuda] [--dry-run]
    python benches/gpu_hotpaths.py report --out DIR

``micro`` (writes DIR/micro.json), every ratio measured interleaved in the same run:

- copy bandwidth: ``y.copy_(x)`` on [32768, 8192] bf16 (read + write) and ``x.sum()`` (read),
  the reference the call figures are compared with (the issue's targets: moments and bucket
  default calls >= 70% of copy bandwidth on [32768, 8192] bf16, >= 60% on the profiler's
  shapes);
- knn radii: the cuda backend's ``knn_kth_distance`` (tiled GEMMs + exact fp64 band,
  ops/knn_tiled.py) against ``torch.cdist`` + ``topk(k + 1)`` (the paper's formulation) on
  [2048, 4096] and [256, 4096] (one profiler sample) fp32 and bf16, k = 25, and its precision
  against exact fp64 distances.

``report`` reads DIR/{micro.json, calls.json, profile_*/bench_profile.json} and writes
DIR/hotpaths.json and DIR/hotpaths.md (one markdown table per part, the targets beside).
``--dry-run``: tiny shapes on the CPU, to check the plumbing (CI).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

K = 25


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _interleaved(fns: dict, dev: torch.device, rounds: int) -> dict:
    """{name: (min, median) seconds}: one call of each per round, after a warm-up call."""
    from entrodrop_fast.ops.bench import time_calls

    for fn in fns.values():
        fn()
    _sync(dev)
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            ts[k] += time_calls(fn, 1, warmup=0, device=dev)
    return {k: (min(v), statistics.median(v)) for k, v in ts.items()}


def _llm_like(n: int, d: int, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    x[:, 1] = x[:, 1] * 50 + 3000.0
    x[:, d // 2] *= 400.0
    return x.to(dtype).to(dev)


def _copy(shape, dev: torch.device, rounds: int) -> dict:
    x = torch.randn(shape, device=dev).to(torch.bfloat16)
    y = torch.empty_like(x)
    t = _interleaved({"copy": lambda: y.copy_(x), "sum": x.sum}, dev, rounds)
    nbytes = x.numel() * x.element_size()
    return {
        "shape": list(shape),
        "dtype": "bf16",
        "bytes": nbytes,
        "copy_s": t["copy"][0],
        "sum_s": t["sum"][0],
        "copy_GBps": 2 * nbytes / t["copy"][0] / 1e9,  # read + write
        "sum_GBps": nbytes / t["sum"][0] / 1e9,
    }


def _rel_err(a: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((a.double() - exact).abs() / exact.abs().clamp_min(1e-300)).max())


def _knn(n: int, d: int, dname: str, dev: torch.device, rounds: int) -> dict:
    from entrodrop_fast.ops import knn_tiled

    x = _llm_like(n, d, {"fp32": torch.float32, "bf16": torch.bfloat16}[dname], dev)

    def cdist_topk():
        xf = x.float()
        return torch.cdist(xf, xf).topk(K + 1, dim=1, largest=False).values[:, -1]

    def tiled():
        return knn_tiled.knn_kth_distance(x, K)

    t = _interleaved({"tiled": tiled, "cdist_topk": cdist_topk}, dev, rounds)
    r64 = x.double()
    exact = torch.cdist(r64, r64, compute_mode="donot_use_mm_for_euclid_dist").fill_diagonal_(
        float("inf")
    )
    exact = exact.kthvalue(K, dim=1).values
    return {
        "shape": [n, d],
        "dtype": dname,
        "k": K,
        "tiled_s": t["tiled"][0],
        "cdist_topk_s": t["cdist_topk"][0],
        "tiled_median_s": t["tiled"][1],
        "cdist_topk_median_s": t["cdist_topk"][1],
        "speedup_vs_cdist_topk": t["cdist_topk"][0] / t["tiled"][0],
        "tiled_max_rel_err": _rel_err(tiled(), exact),
        "cdist_topk_max_rel_err": _rel_err(cdist_topk(), exact),
    }


def _fused_kernels(shapes, dev: torch.device, rounds: int) -> list[dict]:
    """cuda_backend's two single-read bucket kernels (FUSED_KERNEL "registers" / "tile") on the
    profiler's shapes, bf16, X alone and with F, beside x.sum() (+ f.sum())."""
    from entrodrop_fast.ops import cuda_backend as cb

    rows = []
    saved = cb.FUSED_KERNEL
    try:
        for shape in shapes:
            x = torch.randn(shape, device=dev).to(torch.bfloat16)
            f = torch.randn(shape, device=dev).to(torch.bfloat16)
            for with_f in (False, True):
                ff = f if with_f else None

                def run(kind, ff=ff, x=x):
                    cb.FUSED_KERNEL = kind
                    return cb.bucket(x, ff, None, 20, False)

                fns = {
                    "registers": lambda: run("registers"),
                    "tile": lambda: run("tile"),
                    "roofline": (lambda x=x, f=f: (x.sum(), f.sum())) if with_f else x.sum,
                }
                t = _interleaved(fns, dev, rounds)
                nbytes = x.numel() * x.element_size() * (2 if with_f else 1)
                rows.append(
                    {
                        "shape": list(shape),
                        "dtype": "bf16",
                        "reads": "x,f" if with_f else "x",
                        "bytes": nbytes,
                        **{f"{k}_s": v[0] for k, v in t.items()},
                        **{f"{k}_GBps": nbytes / v[0] / 1e9 for k, v in t.items()},
                    }
                )
    finally:
        cb.FUSED_KERNEL = saved
    return rows


def micro(out: Path, device: str, dry: bool) -> dict:
    dev = torch.device(device)
    rounds = 3 if dry else 20
    res: dict = {"device": device, "dry_run": dry, "torch": torch.__version__}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    res["copy"] = _copy((512, 256) if dry else (32768, 8192), dev, rounds)
    knn_shapes = (
        [(120, 16)] if dry else [(2048, 4096), (256, 4096)]
    )  # and one profiler sample (k = 25, Llama)
    res["knn"] = [
        _knn(n, d, dname, dev, max(3, rounds // 4))
        for n, d in knn_shapes
        for dname in ("fp32", "bf16")
    ]
    if dev.type == "cuda":
        res["fused_bucket"] = _fused_kernels(
            [(1, 256, 4096), (8, 256, 4096), (128, 256, 4096), (8, 256, 576)], dev, rounds
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "micro.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


def _load(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _calls_rows(calls) -> list[dict]:
    if isinstance(calls, dict):
        for key in ("rows", "results", "calls"):
            if isinstance(calls.get(key), list):
                return calls[key]
        return []
    return calls if isinstance(calls, list) else []


# issue 12's GPU targets: default call bandwidth as a fraction of copy bandwidth
TARGETS = {(32768, 8192): 0.70, (8, 256, 4096): 0.60, (128, 256, 4096): 0.60}


def report(out: Path) -> dict:
    micro_res = _load(out / "micro.json") or {}
    rows = _calls_rows(_load(out / "calls.json"))
    copy_bw = (micro_res.get("copy") or {}).get("copy_GBps")
    table_calls = []
    for r in rows:
        gbps = r["bytes"] / r["default_s"] / 1e9
        frac = gbps / copy_bw if copy_bw else None
        tgt = (
            TARGETS.get(tuple(r["shape"]))
            if r["estimator"] in ("bucket", "gaussian_diag", "delta_bucket", "delta_gaussian_diag")
            else None
        )
        table_calls.append(
            {
                **{
                    k: r[k]
                    for k in (
                        "estimator",
                        "shape",
                        "dtype",
                        "reads",
                        "bytes",
                        "default_s",
                        "novalidate_s",
                        "default_over_novalidate",
                    )
                },
                "default_GBps": gbps,
                "default_frac_of_copy": frac,
                "target_frac_of_copy": tgt,
                "meets_target": None if tgt is None or frac is None else frac >= tgt,
            }
        )
    profiles = {}
    for p in sorted(out.glob("profile_*/bench_profile.json")):
        d = _load(p)
        if d:
            profiles[p.parent.name.removeprefix("profile_")] = {
                "model": d.get("model"),
                "methods": d.get("methods"),
                "batch_size": d.get("batch_size"),
                "seconds_per_batch_min": d.get("seconds_per_batch_min"),
                "overhead_median_of_batch_ratios": (
                    d.get("overhead_median_of_batch_ratios") or {}
                ).get("taps"),
                "overhead_min_over_min": (d.get("overhead_min_over_min") or {}).get("taps"),
            }
    skipped = sorted(p.name for p in out.glob("SKIPPED_*"))
    res = {
        "copy": micro_res.get("copy"),
        "knn": micro_res.get("knn", []),
        "fused_bucket": micro_res.get("fused_bucket", []),
        "calls": table_calls,
        "profiles": profiles,
        "skipped": [(out / s).read_text().strip() for s in skipped],
        "device": micro_res.get("device"),
        "gpu": micro_res.get("gpu"),
        "dry_run": micro_res.get("dry_run"),
    }
    (out / "hotpaths.json").write_text(json.dumps(res, indent=1))
    (out / "hotpaths.md").write_text(_markdown(res) + "\n")
    print(_markdown(res))
    return res


def _table(header: list[str], rows) -> list[str]:
    """A markdown table: the header, its separator, one line per row of cells, a blank line."""
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header), *map(line, rows), ""]


def _markdown(res: dict) -> str:
    ms = lambda s: f"{1e3 * s:.3f}"  # noqa: E731
    shape = lambda r: "x".join(map(str, r["shape"]))  # noqa: E731
    pct = lambda v: "" if v is None else f"{v:.1%}"  # noqa: E731
    dry = ", dry run" if res.get("dry_run") else ""
    lines = [f"# GPU hot paths ({res.get('gpu') or res.get('device')}{dry})", ""]
    c = res.get("copy")
    if c:
        where = f"{shape(c)} {c['dtype']}"
        lines += _table(
            ["reference", "shape", "ms", "GB/s"],
            [
                ["copy (read + write)", where, ms(c["copy_s"]), f"{c['copy_GBps']:.0f}"],
                ["x.sum() (read)", where, ms(c["sum_s"]), f"{c['sum_GBps']:.0f}"],
            ],
        )
    if res.get("calls"):
        rows = []
        for r in res["calls"]:
            frac = (
                ""
                if r["default_frac_of_copy"] is None
                else f"{100 * r['default_frac_of_copy']:.0f}%"
            )
            tgt = (
                ""
                if r["target_frac_of_copy"] is None
                else f">= {100 * r['target_frac_of_copy']:.0f}% "
                f"{'ok' if r['meets_target'] else 'MISSED'}"
            )
            rows.append(
                [
                    r["estimator"],
                    shape(r),
                    r["dtype"],
                    str(r["reads"]),
                    ms(r["default_s"]),
                    ms(r["novalidate_s"]),
                    f"{r['default_over_novalidate']:.2f}x",
                    f"{r['default_GBps']:.0f}",
                    frac,
                    tgt,
                ]
            )
        header = "call, shape, dtype, reads, default ms, validate=False ms, "
        header += "default / validate=False, default GB/s, % of copy, target"
        lines += _table(header.split(", "), rows)
    if res.get("knn"):
        header = "knn radii (k = 25), dtype, tiled ms, cdist + topk ms, speedup, "
        header += "tiled max rel err, cdist + topk max rel err"
        rows = [
            [
                shape(r),
                r["dtype"],
                ms(r["tiled_s"]),
                ms(r["cdist_topk_s"]),
                f"{r['speedup_vs_cdist_topk']:.2f}x",
                f"{r['tiled_max_rel_err']:.1e}",
                f"{r['cdist_topk_max_rel_err']:.1e}",
            ]
            for r in res["knn"]
        ]
        lines += _table(header.split(", "), rows)
    if res.get("fused_bucket"):
        header = "single-read bucket kernel, reads, registers ms, tile ms, roofline ms, "
        header += "registers GB/s, tile GB/s"
        rows = [
            [
                f"{shape(r)} {r['dtype']}",
                str(r["reads"]),
                ms(r["registers_s"]),
                ms(r["tile_s"]),
                ms(r["roofline_s"]),
                f"{r['registers_GBps']:.0f}",
                f"{r['tile_GBps']:.0f}",
            ]
            for r in res["fused_bucket"]
        ]
        lines += _table(header.split(", "), rows)
    if res.get("profiles"):
        header = "tap overhead, model, methods, batch, plain s/batch, "
        header += "taps overhead (median ratio), (min/min)"
        rows = []
        for name, p in res["profiles"].items():
            plain = (p.get("seconds_per_batch_min") or {}).get("plain")
            rows.append(
                [
                    name,
                    str(p["model"]),
                    ",".join(p["methods"] or []),
                    str(p["batch_size"]),
                    "" if plain is None else f"{plain:.4f}",
                    pct(p.get("overhead_median_of_batch_ratios")),
                    pct(p.get("overhead_min_over_min")),
                ]
            )
        lines += _table(header.split(", "), rows)
    for s in res.get("skipped", []):
        lines.append(f"- skipped: {s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("part", choices=("micro", "report"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes (use with --device cpu)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.part == "micro":
        micro(out, args.device, args.dry_run)
    else:
        report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
