"""``entrodrop rank REPORT``: a drop plan (JSON, 0-based layer indices) from a profile report."""

from __future__ import annotations

from entrodrop_fast.prune.ranking import KINDS


def add_ranking_args(p) -> None:
    """Options shared by ``rank`` and the one-step ``prune``."""
    from entrodrop_fast.cli import add_preset_arg

    p.add_argument(
        "--kind",
        choices=KINDS,
        default=None,
        help="blocks to drop: attn, mlp, layer or joint (attn+mlp ranked together)",
    )
    p.add_argument(
        "--drop",
        default=None,
        help="how many: a count (8), a fraction in (0, 1) (0.25) or a percentage (25%%; 100%% = "
        "all) of the candidate blocks (those neither protected nor dropped already), rounded to "
        "the nearest count, halves up; 1.0 is refused as ambiguous (give 1 or 100%%)",
    )
    p.add_argument(
        "--method",
        default=None,
        help="score: an entropy method of the report (default: its first, e.g. bucket), cosine, "
        "or angular (layers)",
    )
    add_preset_arg(
        p,
        "paper: the paper's code's choices (knn k=25 on Llama-family reports, bucket for "
        "Mistral, unless --method; layers 0, 1 and the last protected, unless --protect)",
    )
    p.add_argument(
        "--protect",
        default=None,
        help="0-based layers never dropped, comma-separated (0,1,29), or 'none' to protect "
        "nothing ('' is refused); default: the early layers where entropy still decreases + the "
        "last layer",
    )


def register(subparsers) -> None:
    from entrodrop_fast.cli import add_output_file_args

    p = subparsers.add_parser(
        "rank", help="drop plan from a profile report (which blocks to remove)", description=__doc__
    )
    p.add_argument(
        "report",
        metavar="REPORT",
        help="report directory (from entrodrop profile) or its report.json",
    )
    add_ranking_args(p)
    add_output_file_args(
        p,
        "--out",
        "where to write the plan (default ./plan.json; an existing file is replaced only when "
        "it is a plan)",
        "a plan file",
        default="plan.json",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import contextlib
    import json
    from pathlib import Path

    from entrodrop_fast import outputs
    from entrodrop_fast.prune.ranking import make_plan, plan_file_check, plan_summary, save_plan

    if args.kind is None or args.drop is None:
        raise ValueError(
            "rank needs --kind (attn, mlp, layer, joint) and --drop (a count or a fraction)"
        )
    rep = Path(args.report).expanduser()
    rep = rep / "report.json" if rep.is_dir() else rep
    inputs = [("report", rep)]
    # the model and corpus the report was made from
    with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):
        info = json.loads(rep.read_text())
        inputs += [
            *outputs.model_paths(info["model"].get("path") or "-"),
            *outputs.corpus_paths(info["data"].get("corpus")),
        ]
    outputs.check_file(
        args.out,
        what="drop plan",
        recognise=plan_file_check(),
        overwrite=args.overwrite,
        inputs=inputs,
    )
    plan = make_plan(
        args.report,
        args.kind,
        args.drop,
        method=args.method,
        protect=args.protect,
        preset=args.preset,
    )
    out = save_plan(plan, args.out, overwrite=args.overwrite)
    print(plan_summary(plan))
    print(f"plan written to {out}")
    return 0
