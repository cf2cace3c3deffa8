"""``entrodrop compare [MODEL]``: which pruning method keeps most quality, at each K."""

from __future__ import annotations

import sys


def register(sub) -> None:
    from entrodrop_fast.cli import add_model_arg, add_preset_arg, int_at_least, positive_int
    from entrodrop_fast.commands.profile import add_placement_args
    from entrodrop_fast.evaluate.compare import BASELINES, SCORING

    p = sub.add_parser(
        "compare", help="profile once, prune with each method and K, evaluate, tabulate and plot"
    )
    add_model_arg(
        p,
        "local HF directory, .gguf, hub id or a built-in name (gemma3-270m); default: built-in "
        "SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--kind", default="attn", help="attn, mlp, layer; several comma-separated (default attn)"
    )
    p.add_argument(
        "--drop",
        default="2,4,6,8",
        help="how many blocks to drop, comma-separated, each as in rank: a count (8), a fraction "
        "(0.25) or a percentage (25%%) of the candidate blocks (default 2,4,6,8)",
    )
    p.add_argument(
        "--methods",
        default="bucket,knn,gaussian_diag,cosine,random",
        help=f"from {', '.join(SCORING + BASELINES)} "
        "(default bucket,knn,gaussian_diag,cosine,random)",
    )
    p.add_argument(
        "--calib",
        action="append",
        default=None,
        help="calibration corpus (builtin, stdlib-docs, a file or directory); give it twice to "
        "compare the rankings from two corpora (the first is also the evaluation text)",
    )
    p.add_argument(
        "--samples", type=positive_int, default=128, help="calibration windows (default 128)"
    )
    p.add_argument(
        "--seq-len",
        type=int_at_least(2, "an entropy needs at least 2 tokens"),
        default=256,
        help="tokens per calibration and perplexity window (default 256)",
    )
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument(
        "--eval-windows",
        type=positive_int,
        default=32,
        help="perplexity windows on held-out text, at most (default 32; every 5th document, or "
        "the last fifth of each of fewer than 5)",
    )
    p.add_argument(
        "--items",
        type=positive_int,
        default=100,
        help="items per zero-shot task, at most (default 100)",
    )
    p.add_argument(
        "--protect-rule",
        default=None,
        choices=["shared", "paper", "per-method"],
        help="one protection for every method: shared (default: stage 1 detected once from "
        "--stage1-method's stream entropy, plus the last layer), paper (layers 0, 1 and the "
        "last, fixed), per-method (each method's own profile)",
    )
    p.add_argument(
        "--stage1-method",
        default=None,
        help="entropy method whose stream entropy detects stage 1 for --protect-rule shared "
        "(default: the first entropy method of --methods)",
    )
    p.add_argument(
        "--random-seeds",
        type=positive_int,
        default=3,
        help="random baseline: this many seeds (default 3; the table gives mean and spread)",
    )
    p.add_argument(
        "--iterative",
        default="",
        help="methods also run with iterative re-scoring (drop one, re-profile), "
        "comma-separated, e.g. knn,cosine",
    )
    p.add_argument(
        "--iterative-samples",
        type=positive_int,
        default=None,
        help="calibration windows per re-profile of --iterative (default --samples)",
    )
    p.add_argument(
        "--bins",
        type=positive_int,
        default=20,
        help="bucket (and its variants): bins per channel (default 20)",
    )
    p.add_argument("--k", type=positive_int, default=25, help="knn: neighbour rank (default 25)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="profile: windows per forward pass (default 8; the scores do not depend on it)",
    )
    add_preset_arg(
        p,
        "paper: the paper's code's settings for the architecture (knn k=25; bucket 80 bins for "
        "Mistral; batch 1) and its protection (layers 0, 1, last) for every method",
    )
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    add_placement_args(p)
    p.add_argument(
        "--out",
        default="entrodrop_compare",
        help="output directory (default ./entrodrop_compare; new, empty or an earlier comparison)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into --out even when it holds other files (they are left untouched)",
    )
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from entrodrop_fast.evaluate import compare as C

    kinds = C.parse_list(args.kind, ("attn", "mlp", "layer"), "--kind")
    methods = C.parse_list(args.methods, C.SCORING + C.BASELINES, "--methods")
    counts = C.parse_counts(args.drop)
    iterative = (
        C.parse_list(
            args.iterative,
            tuple(m for m in methods if m not in ("random", "angular")),
            "--iterative",
        )
        if args.iterative.strip()
        else []
    )
    calib = args.calib or [None]
    from entrodrop_fast import outputs

    C.check_protocol(
        methods,
        counts,
        calib,
        preset=args.preset,
        protect_rule=args.protect_rule,
        stage1_method=args.stage1_method,
    )
    inputs = [*outputs.model_paths(args.model), *outputs.corpus_paths(*calib)]
    outputs.check_dir(
        args.out, kind="comparison", what="comparison", inputs=inputs, overwrite=args.overwrite
    )
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if args.quiet:  # no progress bars, transformers' "Loading weights" included
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    comp = C.compare_model(
        args.model,
        kinds=kinds,
        counts=counts,
        methods=methods,
        calib=calib,
        dtype=args.dtype,
        device=args.device,
        preset=args.preset,
        protect_rule=args.protect_rule,
        stage1_method=args.stage1_method,
        random_seeds=tuple(range(args.random_seeds)),
        iterative=tuple(iterative),
        iterative_samples=args.iterative_samples,
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        eval_windows=args.eval_windows,
        eval_items=args.items,
        speed=not args.no_speed,
        bins=args.bins,
        k=args.k,
        batch_size=args.batch_size,
        progress=not args.quiet,
        log=log,
    )
    out = C.write(comp, args.out, overwrite=args.overwrite)
    print(C.markdown(comp))
    print(f"wrote {out}/comparison.json, comparison.md, comparison.png")
    return 0
