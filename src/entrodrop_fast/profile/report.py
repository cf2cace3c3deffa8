"""The profile report: ``report.json``, ``scores.csv``, ``profile.png`` and a terminal table.

Everything is written into a temporary directory beside the target and moved into place
at the end (:mod:`entrodrop_fast.outputs`), so a failed run never leaves a half-written report.
Layer indices are 0-based.

``report.json``::

    {"format": 1, "model": {...}, "data": {...}, "settings": {...}, "versions": {...},
     "timing": {...}, "points": ["r0", "m0", "r1", ...],
     "entropy": {method: {"mean": [...per point], "stderr": [...]}},
     "blocks": [{"kind": "attn", "layer": 0, "x": "r0", "y": "m0",
                 "H_x": {method: v}, "H_y": {method: v},
                 "delta": {method: {"mean": v, "stderr": v}},
                 "cosine": {"mean": v, "stderr": v} | null,          # 1 - mean cos(X, Y)
                 "angular": {"1": {"mean": v, "stderr": v}, ...}}]}   # layer blocks: span l..l+n

``scores.csv``: one row per block (kind, layer) with the same numbers, flat; a block removed
by an earlier prune has empty number cells and ``dropped`` = ``yes``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from pathlib import Path

from entrodrop_fast._names import setting
from entrodrop_fast.models.adapters import BLOCK_KINDS, block_points, get_adapter
from entrodrop_fast.models.config import model_identity

FORMAT = 1


def json_safe(obj):
    """``obj`` with every NaN / infinity replaced by None, so that it is written as JSON
    ``null`` (undefined: e.g. the stderr of one sample), never as a bare ``NaN``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _csv_value(v):
    """A CSV cell: undefined numbers (NaN, None) are left empty."""
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def versions() -> dict:
    import torch
    import transformers

    from entrodrop_fast import __version__
    from entrodrop_fast.ops.api import backends

    return {
        "entrodrop_fast": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backends": {k: v["available"] for k, v in backends().items()},
    }


def build_report(
    result: dict, *, model_info: dict, data_info: dict, settings: dict, model=None
) -> dict:
    """Turn the runner's result into the report dict (see the module docstring)."""
    adapter = get_adapter(model) if model is not None else None
    # which model this is (type, sizes, config fingerprint): prune --report checks it
    identity = model_identity(model.config) if model is not None else {}
    # sub-blocks an earlier prune removed (ZeroAttention / ZeroMLP): marked, never ranked
    from entrodrop_fast.models.loading import pruned_record

    rec = (pruned_record(model.config) if model is not None else None) or {}
    gone = {"attn": set(rec.get("dropped_attn") or []), "mlp": set(rec.get("dropped_mlp") or [])}
    points = result["points"]
    pidx = {p: i for i, p in enumerate(points)}
    L = result["num_layers"]
    methods = list(result["entropy"])
    blocks = []
    for kind in BLOCK_KINDS:
        for li in range(L):
            if adapter is not None:
                x, y = adapter.block_points(kind, li)
            else:  # the point names of the result suffice
                x, y = block_points(kind, li, result["residual"])
            b = {"kind": kind, "layer": li, "x": x, "y": y, "H_x": {}, "H_y": {}, "delta": {}}
            if li in gone.get(kind, ()):
                b["dropped"] = True
            for m in methods:
                b["H_x"][m] = result["entropy"][m]["mean"][pidx[x]]
                b["H_y"][m] = result["entropy"][m]["mean"][pidx[y]]
                d = result["delta"][m][kind]
                b["delta"][m] = {"mean": d["mean"][li], "stderr": d["stderr"][li]}
            c = result["cosine"].get(kind)
            b["cosine"] = {"mean": c["mean"][li], "stderr": c["stderr"][li]} if c else None
            if kind == "layer" and result["angular"]:
                b["angular"] = {
                    n: {"mean": a["mean"][li], "stderr": a["stderr"][li]}
                    for n, a in result["angular"].items()
                    if li < len(a["mean"])
                }
            blocks.append(b)
    return {
        "format": FORMAT,
        "model": {
            **identity,
            **model_info,
            **({"dropped": {k: sorted(v) for k, v in gone.items() if v}} if rec else {}),
            "model_type": result["model_type"],
            "residual": result["residual"],
            "num_layers": L,
            "hidden_size": result["hidden_size"],
            "dtype": result["dtype"],
            "device": result["device"],
        },
        "data": data_info,
        "settings": {**settings, "methods": result["methods"], "backend": result["backend"]},
        "versions": versions(),
        "timing": {
            "seconds": result["seconds"],
            "tokens": result["tokens"],
            "tokens_per_s": result["tokens_per_s"],
            "samples": result["samples"],
            **(
                {"resumed_from_layer": result["resumed_from_layer"]}
                if result.get("resumed_from_layer")
                else {}
            ),
        },
        "points": points,
        "entropy": result["entropy"],
        "blocks": blocks,
        "layer_indices": "0-based",
    }


def primary_method(report: dict) -> str | None:
    """The method used for ranking and the picture: the first entropy method, if any."""
    return next(iter(report["entropy"]), None)


def ranking(report: dict, kind: str, method: str | None = None) -> list[dict]:
    """Blocks of ``kind`` sorted by ascending score (drop first): ΔH, or the cosine importance."""
    method = method or primary_method(report) or "cosine"
    # blocks the model no longer has are not ranked; undefined scores go last
    blocks = [b for b in report["blocks"] if b["kind"] == kind and not b.get("dropped")]

    def key(v):
        return (v is None or math.isnan(v), 0.0 if v is None or math.isnan(v) else v)

    if method == "cosine":
        return sorted((b for b in blocks if b["cosine"]), key=lambda b: key(b["cosine"]["mean"]))
    return sorted(blocks, key=lambda b: key(b["delta"][method]["mean"]))


def stage1_layers(report: dict, method: str | None = None) -> list[int]:
    """Early layers over which the residual-stream entropy still decreases (the paper's stage 1)."""
    method = method or primary_method(report)
    if method is None:
        return []
    pts, h = report["points"], report["entropy"][method]["mean"]
    r = [h[pts.index(f"r{i}")] for i in range(report["model"]["num_layers"] + 1)]
    low = min(range(len(r)), key=r.__getitem__)
    # stage 1 ends at the minimum of the stream entropy when it lies in the first half
    return list(range(low)) if low < len(r) // 2 else []


def _fmt(v: float, se: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    s = f"{v:10.4f}"
    if se is not None and not (isinstance(se, float) and math.isnan(se)):
        s += f" ± {se:.4f}"
    return s


def ranking_table(report: dict, top: int = 8) -> str:
    """A plain-text table: per kind, the ``top`` blocks with the lowest score."""
    method = primary_method(report) or "cosine"
    samples = report.get("timing", {}).get("samples")
    lines = [
        f"{report['model'].get('name', '?')}: {report['model']['num_layers']} layers, "
        f"{samples} samples, method {method} (layers 0-based; lowest first = drop first)"
    ]
    if isinstance(samples, int) and samples < 2:
        lines.append(
            "  (no ± stderr: a standard error needs >= 2 samples; profile with "
            f"{setting('samples')} 2 or more)"
        )
    for kind in BLOCK_KINDS:
        rows = ranking(report, kind, method)[:top]
        if not rows:
            continue
        score_name = "ΔH" if method != "cosine" else "1-cos"
        # the cosine column only when cosine was profiled beside an entropy method
        with_cos = method != "cosine" and any(b.get("cosine") for b in rows)
        lines.append(
            f"\n  {kind:5s}  rank  layer   {score_name:>10s} ± stderr      H(X)        H(Y)"
            + ("   cosine-imp" if with_cos else "")
        )
        for i, b in enumerate(rows, 1):
            if method == "cosine":
                score, hx, hy = _fmt(b["cosine"]["mean"], b["cosine"]["stderr"]), "", ""
            else:
                score = _fmt(b["delta"][method]["mean"], b["delta"][method]["stderr"])
                hx, hy = (
                    f"{v:11.3f}" if isinstance(v, (int, float)) else f"{'-':>11s}"
                    for v in (b["H_x"].get(method), b["H_y"].get(method))
                )
            cos = (
                f"{b['cosine']['mean']:.4f}"
                if b.get("cosine") and b["cosine"]["mean"] is not None
                else "-"
            )
            line = f"  {'':5s}  {i:4d}  {b['layer']:5d}  {score:>20s} {hx} {hy}"
            lines.append(f"{line}   {cos}" if with_cos else line.rstrip())
        for b in report["blocks"]:
            if b["kind"] == kind and b.get("dropped"):
                lines.append(
                    f"  {'':5s}  {'-':>4s}  {b['layer']:5d}  {'dropped':>20s}   "
                    "(removed by an earlier prune; not ranked)"
                )
    return "\n".join(lines)


def write_csv(report: dict, path: Path) -> None:
    methods = list(report["entropy"])
    spans = sorted({n for b in report["blocks"] for n in (b.get("angular") or {})}, key=int)
    header = ["kind", "layer", "x", "y"]
    for m in methods:
        header += [f"H_x_{m}", f"H_y_{m}", f"delta_{m}", f"delta_{m}_stderr"]
    header += ["cosine_importance", "cosine_importance_stderr"] + [f"angular_{n}" for n in spans]
    header += ["dropped"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for b in report["blocks"]:
            row = [b["kind"], b["layer"], b["x"], b["y"]]
            if b.get("dropped"):
                # removed by an earlier prune: no block there to score (its X and Y are the
                # same point, so its numbers would read as a real 0 to anyone sorting them)
                w.writerow(row + [""] * (len(header) - len(row) - 1) + ["yes"])
                continue
            for m in methods:
                row += [b["H_x"][m], b["H_y"][m], b["delta"][m]["mean"], b["delta"][m]["stderr"]]
            c = b.get("cosine")
            row += [c["mean"] if c else "", c["stderr"] if c else ""]
            ang = b.get("angular") or {}
            row += [ang[n]["mean"] if n in ang else "" for n in spans]
            row += [""]
            w.writerow([_csv_value(v) for v in row])  # undefined (NaN) numbers: empty cells


def plot(report: dict, path: Path, mark: int = 4) -> None:
    """profile.png: stream entropy across depth (top) and ΔH per block (bottom), lowest marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    method = primary_method(report)
    L = report["model"]["num_layers"]
    fig, axes = plt.subplots(2, 1, figsize=(10, 7.5), constrained_layout=True)
    ax = axes[0]
    pts = report["points"]
    name = report["model"].get("name", "")
    if method is not None:
        h = report["entropy"][method]
        pos = {"r": 0.0, "m": 0.5, "a": 0.5, "p": 0.5}
        xs = [int(p[1:]) + pos[p[0]] for p in pts]
        r_i = [i for i, p in enumerate(pts) if p[0] == "r"]
        o_i = [i for i, p in enumerate(pts) if p[0] != "r"]
        ax.errorbar(
            [xs[i] for i in r_i],
            [h["mean"][i] for i in r_i],
            yerr=[h["stderr"][i] for i in r_i],
            marker="o",
            ms=4,
            lw=1.5,
            capsize=2,
            label="layer input r_l (r_L = last layer output)",
        )
        lbl = (
            "mid-layer m_l = r_l + attn"
            if report["model"]["residual"] != "parallel"
            else "r_l + attn / r_l + mlp (parallel branches)"
        )
        ax.plot([xs[i] for i in o_i], [h["mean"][i] for i in o_i], "s", ms=3, alpha=0.7, label=lbl)
        s1 = stage1_layers(report)
        if s1:
            ax.axvspan(
                -0.25,
                s1[-1] + 1,
                color="grey",
                alpha=0.15,
                label="before the stream-entropy minimum (stage 1)",
            )
        ax.set_ylabel(f"H ({method}), nats")
        ax.set_title(f"{name}: residual-stream entropy across depth")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no entropy method requested", ha="center", transform=ax.transAxes)
    ax.set_xlabel("layer (0-based)")
    ax = axes[1]
    width = 0.27
    colors = {"attn": "tab:blue", "mlp": "tab:orange", "layer": "tab:green"}
    for j, kind in enumerate(BLOCK_KINDS):
        blocks = [b for b in report["blocks"] if b["kind"] == kind]
        if method is not None:
            vals = [b["delta"][method]["mean"] for b in blocks]
            errs = [b["delta"][method]["stderr"] for b in blocks]
        else:
            vals = [b["cosine"]["mean"] if b["cosine"] else float("nan") for b in blocks]
            errs = [b["cosine"]["stderr"] if b["cosine"] else 0.0 for b in blocks]
        x = [b["layer"] + (j - 1) * width for b in blocks]
        ax.bar(
            x,
            vals,
            width,
            yerr=errs,
            color=colors[kind],
            label=kind,
            capsize=1.5,
            error_kw={"lw": 0.6},
        )
        low = ranking(report, kind, method or "cosine")[:mark]
        for b in low:
            v = b["delta"][method]["mean"] if method else b["cosine"]["mean"]
            ax.plot(b["layer"] + (j - 1) * width, v, marker="v", color="red", ms=6, zorder=5)
    ax.plot([], [], "v", color="red", label=f"{mark} lowest per kind")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlim(-0.6, L - 0.4)
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel(f"ΔH = H(Y) - H(X) ({method})" if method else "1 - mean cos(X, Y)")
    ax.set_title("entropy increase per block (low = adds least = drop first)")
    ax.legend(fontsize=8, ncol=4)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    report: dict, out_dir: str | os.PathLike, *, png: bool = True, overwrite: bool = False
) -> Path:
    """Write report.json, scores.csv, profile.png and ranking.txt into ``out_dir``, atomically.

    ``out_dir`` may be new, empty or an earlier report; any other directory needs
    ``overwrite`` and keeps its other files (see :mod:`entrodrop_fast.outputs`).
    Raises :class:`~entrodrop_fast.outputs.OutputError` when it cannot be used.
    """
    from entrodrop_fast import outputs

    out = outputs.check_dir(out_dir, kind="report", what="report", overwrite=overwrite)
    with outputs.publish_dir(out, kind="report", what="report", overwrite=overwrite) as tmp:
        with (tmp / "report.json").open("w") as fh:
            json.dump(json_safe(report), fh, indent=1, allow_nan=False)  # NaN -> null
        write_csv(report, tmp / "scores.csv")
        if png:
            plot(report, tmp / "profile.png")
        (tmp / "ranking.txt").write_text(
            ranking_table(report, top=report["model"]["num_layers"]) + "\n"
        )
    return out


def load_report(path: str | os.PathLike) -> dict:
    """A report.json (or the directory holding one); ValueError naming the file when it is
    unusable (FileNotFoundError when there is none)."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"no report at {p}: give a report directory from entrodrop profile, or its report.json"
        )
    try:
        rep = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = (
            f" (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise ValueError(
            f"{p} is not valid JSON{where}: truncated or corrupt; run entrodrop profile again to "
            "rewrite it"
        ) from None
    if not isinstance(rep, dict):
        raise ValueError(
            f"{p} holds a JSON {type(rep).__name__}, not a report; give the report.json written "
            "by entrodrop profile"
        )
    if rep.get("format") != FORMAT:
        fmt = rep.get("format")
        kind = (
            " (this is a plan, written by rank: give it as the plan, and the report.json of "
            "entrodrop profile as the report)"
            if isinstance(fmt, str) and fmt.startswith("entrodrop-plan")
            else ""
        )
        raise ValueError(f"{p}: unsupported report format {fmt!r} (expected {FORMAT}){kind}")
    check_report(rep, p)
    return rep


def _is_num(v, *, null: bool = False) -> bool:
    if v is None:
        return null
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind_of(v) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(v), type(v).__name__)


def check_report(rep: dict, path="the report") -> None:
    """Check the parts of a report that ranking and the table use; ValueError naming the file
    and the field (``blocks[3].delta``) and what it should be. A block's score may be null or
    NaN (ranking refuses it when the block is a candidate); the stream entropy may not."""

    rewrite = "run entrodrop profile again to rewrite the report"

    def bad(field: str, want: str, got) -> ValueError:
        shown = f"{_kind_of(got)} ({got!r:.60})"
        return ValueError(f"{path}: {field} must be {want}, got {shown}; {rewrite}")

    model = rep.get("model")
    if not isinstance(model, dict):
        raise bad("model", "an object", model)
    L = model.get("num_layers")
    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise bad("model.num_layers", "a positive integer", L)
    points = rep.get("points")
    if not isinstance(points, list) or not all(isinstance(x, str) for x in points):
        raise bad("points", "a list of point names (r0, m0, ...)", points)
    missing = [f"r{i}" for i in range(L + 1) if f"r{i}" not in points]
    if missing:
        raise ValueError(
            f"{path}: points lacks {', '.join(missing[:4])} of a {L}-layer model; {rewrite}"
        )
    entropy = rep.get("entropy")
    if not isinstance(entropy, dict):
        raise bad("entropy", "an object {method: {mean: [...], stderr: [...]}}", entropy)
    for m, e in entropy.items():
        if not isinstance(e, dict):
            raise bad(f"entropy.{m}", "an object {mean: [...], stderr: [...]}", e)
        mean, se = e.get("mean"), e.get("stderr")
        if not isinstance(mean, list) or len(mean) != len(points):
            raise bad(f"entropy.{m}.mean", f"a list of {len(points)} numbers (one per point)", mean)
        for i, v in enumerate(mean):
            if not _is_num(v) or not math.isfinite(v):
                raise bad(f"entropy.{m}.mean[{i}] (point {points[i]})", "a finite number", v)
        if (
            not isinstance(se, list)
            or len(se) != len(points)
            or not all(_is_num(v, null=True) for v in se)
        ):
            raise bad(f"entropy.{m}.stderr", f"a list of {len(points)} numbers or nulls", se)
    blocks = rep.get("blocks")
    if not isinstance(blocks, list):
        raise bad("blocks", "a list of blocks", blocks)

    def score(field: str, v) -> None:
        if not isinstance(v, dict):
            raise bad(field, "an object {mean: number, stderr: number}", v)
        for key in ("mean", "stderr"):
            if not _is_num(v.get(key), null=True):
                raise bad(f"{field}.{key}", "a number (or null)", v.get(key))

    for j, b in enumerate(blocks):
        f = f"blocks[{j}]"
        if not isinstance(b, dict):
            raise bad(f, "an object", b)
        if b.get("kind") not in BLOCK_KINDS:
            raise bad(f"{f}.kind", f"one of {', '.join(BLOCK_KINDS)}", b.get("kind"))
        li = b.get("layer")
        if not isinstance(li, int) or isinstance(li, bool) or not 0 <= li < L:
            raise bad(f"{f}.layer", f"a 0-based layer index (an integer 0..{L - 1})", li)
        delta = b.get("delta", {})
        if not isinstance(delta, dict):
            raise bad(f"{f}.delta", "an object {method: {mean, stderr}}", delta)
        for m, d in delta.items():
            score(f"{f}.delta.{m}", d)
        for key in ("H_x", "H_y"):
            h = b.get(key, {})
            if not isinstance(h, dict) or not all(_is_num(v, null=True) for v in h.values()):
                raise bad(f"{f}.{key}", "an object {method: number}", h)
        if b.get("cosine") is not None:
            score(f"{f}.cosine", b["cosine"])
        ang = b.get("angular")
        if ang is not None:
            if not isinstance(ang, dict):
                raise bad(f"{f}.angular", "an object {span: {mean, stderr}}", ang)
            for n, a in ang.items():
                score(f"{f}.angular.{n}", a)
