"""``entrodrop prune [MODEL] --out DIR``: write a smaller checkpoint without the dropped blocks.

With ``--plan PLAN`` the plan's blocks are removed. Without it, ``--kind`` and ``--drop``
choose them, from ``--report REPORT`` when given, otherwise from a profile run first
(built-in corpus, paper defaults unless ``--samples`` / ``--seq-len`` say otherwise).
The shards are rewritten tensor by tensor (the model is never loaded to export it); the
source directory is only read. Whole-layer drops give a standard checkpoint; attention /
MLP drops load with ``entrodrop_fast.load_pruned(DIR)`` or
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from entrodrop_fast.commands.profile import add_calibration_args, calibration_of
from entrodrop_fast.commands.rank import add_ranking_args


def register(subparsers) -> None:
    from entrodrop_fast.cli import add_model_arg

    p = subparsers.add_parser(
        "prune",
        help="remove blocks and save the smaller model (from a plan, or profile + rank first)",
        description=__doc__,
    )
    add_model_arg(
        p,
        "local HF directory (safetensors), .gguf file, hub id, a built-in name (gemma3-270m), "
        "or nothing for the built-in SmolLM2-135M-Instruct",
        metavar="MODEL",
    )
    p.add_argument(
        "--out", required=True, help="output directory (new or empty, unless --overwrite)"
    )
    p.add_argument("--plan", default=None, help="drop plan JSON from entrodrop rank")
    p.add_argument(
        "--report",
        default=None,
        help="rank from this report instead of profiling (with --kind/--drop)",
    )
    add_ranking_args(p)
    add_calibration_args(
        p,
        batch_size=8,
        batch_help="windows per forward (default 8; the result does not depend on it)",
        step="profile step: ",
    )
    p.add_argument(
        "--corpus", default=None, help="profile step: calibration text (default: built-in corpus)"
    )
    p.add_argument("--device", default="cpu", help="profile step: cpu, cuda or cuda:N")
    p.add_argument("--cache-dir", default=None, help="where the built-in model is converted")
    p.add_argument(
        "--iterative",
        action="store_true",
        help="drop one block at a time and re-profile the pruned model in between (kinds attn, "
        "mlp, layer; slower)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier pruned model in --out, or write into a directory holding other "
        "files (they are left untouched)",
    )
    p.set_defaults(func=run)


def _log(*a) -> None:
    print(*a, file=sys.stderr)


def _profile_settings(src: Path, args):
    """(preset, ProfileSettings, dtype) of the profile step."""
    from entrodrop_fast.profile.inmemory import ProfileSettings

    preset = _preset(src, args)  # --preset paper: the paper's estimator, batch 1, dtype
    default = preset["method"] if preset else "bucket"
    method = args.method if args.method and args.method not in ("cosine", "angular") else default
    methods = (
        (method, "cosine")
        if args.method == "cosine"
        else ((method, "angular") if args.method == "angular" else (method,))
    )
    settings = ProfileSettings(methods=methods, batch_size=args.batch_size)
    if preset:
        settings.batch_size, settings.k, settings.bins = (
            preset["batch_size"],
            preset["k"],
            preset["bins"],
        )
    if "angular" in methods and args.drop is not None and str(args.drop).isdigit():
        settings.spans = (int(args.drop),)
    return preset, settings, preset["dtype"] if preset else "fp32"


def _preset(src: Path, args) -> dict | None:
    """--preset paper: the paper's configuration for the model's architecture (None without)."""
    if getattr(args, "preset", None) is None:
        return None
    from entrodrop_fast.profile.presets import preset_for_model

    preset = preset_for_model(str(src), args.device)
    _log(f"--preset paper: {preset['why']}")
    return preset


def profile_report(src: Path, args, windows_out: list | None = None) -> dict:
    """The profile step: :func:`entrodrop_fast.profile.profile_model` on ``src``."""
    from entrodrop_fast.profile.pipeline import profile_model

    preset, settings, dtype = _profile_settings(src, args)
    _log(
        f"profiling {src.name}: {args.samples} x {args.seq_len} tokens, "
        f"method {', '.join(settings.methods)} ..."
    )
    report = profile_model(
        str(src),
        settings,
        calibration=calibration_of(args),
        dtype=dtype,
        device=args.device,
        preset=preset,
        progress=True,
        warn=_log,
        windows_out=windows_out,
    )
    report["model"].update({"name": str(src), "source": str(src), "path": str(src)})
    return report


def report_for(src: Path, report_path) -> dict:
    """The --report report, refused (ValueError naming the fields) when it was made for another
    model than ``src``: model type, layer count, sizes and config fingerprint are compared."""
    import json

    from entrodrop_fast.profile.report import load_report
    from entrodrop_fast.prune.surgery import check_same_model

    report = load_report(report_path)
    cfg = json.loads((Path(src) / "config.json").read_text())
    check_same_model(report.get("model"), cfg, what=f"report {report_path}", target=str(src))
    return report


def iterative(src: Path, args) -> dict:
    from entrodrop_fast.prune.pipeline import iterative_plan_for

    _, settings, dtype = _profile_settings(src, args)
    return iterative_plan_for(
        src,
        args.kind,
        args.drop,
        method=args.method,
        protect=args.protect,
        settings=settings,
        calibration=calibration_of(args),
        dtype=dtype,
        device=args.device,
        preset=args.preset,
        progress=True,
        log=_log,
    )


def _h(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):  # powers of 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(args) -> int:
    from entrodrop_fast import outputs
    from entrodrop_fast.prune.pipeline import prune_model
    from entrodrop_fast.prune.ranking import make_plan, plan_summary
    from entrodrop_fast.prune.surgery import read_plan

    inputs = [
        *outputs.model_paths(args.model, args.cache_dir),
        *outputs.corpus_paths(args.corpus),
        ("plan", args.plan),
        ("report", args.report),
    ]
    out = outputs.check_dir(
        args.out,
        kind="model",
        what="pruned model",
        inputs=inputs,
        overwrite=args.overwrite,
        replace_ours=False,
    )
    if args.plan and (args.kind or args.drop or args.report):
        raise ValueError(
            "give either --plan, or --kind/--drop (with an optional --report), not both"
        )
    if not args.plan and (args.kind is None or args.drop is None):
        raise ValueError(
            "prune needs --plan PLAN, or --kind (attn, mlp, layer, joint) and --drop N"
        )

    def plan_for(src: Path) -> dict:
        if args.iterative:
            if args.report:
                raise ValueError("--iterative re-profiles the model itself: drop --report")
            plan = iterative(src, args)
        else:
            report = (
                report_for(src, args.report)
                if args.report is not None
                else profile_report(src, args)
            )
            plan = make_plan(
                report,
                args.kind,
                args.drop,
                method=args.method,
                protect=args.protect,
                report_path=args.report,
                preset=args.preset,
            )
        print(plan_summary(plan))
        return plan

    src, plan, s = prune_model(
        args.model,
        out,
        read_plan(args.plan) if args.plan else plan_for,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
    )
    d = s.drops
    dropped = "; ".join(f"{k} {d[k]}" for k in ("attn", "mlp", "layer") if d[k]) or "nothing"
    pct = lambda a, b: f"{100 * (b - a) / a:+.1f}%" if a else ""
    print(f"pruned {src} -> {s.out}")
    print(f"  blocks dropped (0-based layers): {dropped}")
    print(f"  layers:                {s.layers_before} -> {s.layers_after}")
    print(
        f"  parameters:            {s.params_before:,} -> {s.params_after:,} "
        f"({pct(s.params_before, s.params_after)})"
    )
    print(
        f"  checkpoint bytes:      {_h(s.bytes_before)} -> {_h(s.bytes_after)} "
        f"({pct(s.bytes_before, s.bytes_after)})"
    )
    kv_before, kv_after = s.kv_bytes_per_token_before, s.kv_bytes_per_token_after
    print(f"  KV cache bytes/token:  {kv_before:,} -> {kv_after:,} ({pct(kv_before, kv_after)})")
    if s.stock_loadable:
        print("  load: AutoModelForCausalLM.from_pretrained(DIR)  (standard checkpoint)")
    else:
        print(
            "  load: entrodrop_fast.load_pruned(DIR) or "
            "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)"
        )
    return 0
