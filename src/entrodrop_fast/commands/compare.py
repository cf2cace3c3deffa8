"""``entrodrop compare [MODEL]``: which pruning method keeps most quality, at each K."""

from __future__ import annotations

import sys


def register(sub) -> None:
    from entrodrop_fast.cli import add_model_arg, add_preset_arg, int_at_least, positive_int
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
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cpu")
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
    from entrodrop_fast.models import load_model

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
    if args.stage1_method is not None and args.stage1_method not in C.ENTROPY:
        raise ValueError(
            f"--stage1-method must be an entropy method ({', '.join(C.ENTROPY)}), "
            f"got {args.stage1_method!r}"
        )
    if args.preset and args.protect_rule not in (None, "paper"):
        raise ValueError(
            "--preset paper protects layers 0, 1 and the last; it contradicts "
            f"--protect-rule {args.protect_rule}"
        )
    if "angular" in methods and not any(isinstance(c, int) for c in counts):
        raise ValueError(
            "--methods angular scores spans of K whole layers: give integer --drop counts"
        )
    calib = args.calib or [None]
    if len(calib) > 2:
        raise ValueError("--calib can be given at most twice")
    if len(calib) == 2 and methods == ["random"]:
        raise ValueError(
            "two --calib corpora compare the rankings of scoring methods, and random has none; "
            "add one to --methods (e.g. bucket,random)"
        )
    from entrodrop_fast import outputs

    inputs = [*outputs.model_paths(args.model), *outputs.corpus_paths(*calib)]
    outputs.check_dir(
        args.out, kind="comparison", what="comparison", inputs=inputs, overwrite=args.overwrite
    )
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if args.quiet:  # no progress bars, transformers' "Loading weights" included
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from entrodrop_fast.data import calibration_windows, load_corpus
    from entrodrop_fast.evaluate.heldout import heldout_documents

    # unreadable, empty or binary corpora stop the run here
    corpora = [load_corpus(c) for c in calib]
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    # enough text for every step, checked before the first forward pass
    heldout_documents(corpora[0], lm.tokenizer, seq_len=args.seq_len)
    for c in corpora:
        calibration_windows(
            lm.tokenizer, c, samples=args.samples, seq_len=args.seq_len, seed=args.seed
        )
    bins, k, batch = args.bins, args.k, args.batch_size
    rule = args.protect_rule or "shared"
    if args.preset:
        from entrodrop_fast.profile.presets import preset_for_model

        pre = preset_for_model(lm.model.config, args.device)
        bins, k, batch, rule = pre["bins"], pre["k"], pre["batch_size"], "paper"
        log(f"--preset paper: {pre['why']}")
    comp = C.compare(
        lm,
        kinds=kinds,
        counts=counts,
        methods=methods,
        corpus=corpora[0],
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        eval_windows=args.eval_windows,
        eval_items=args.items,
        speed=not args.no_speed,
        progress=not args.quiet,
        log=log,
        protect_rule=rule,
        stage1_method=args.stage1_method,
        random_seeds=tuple(range(args.random_seeds)),
        iterative=tuple(iterative),
        iterative_samples=args.iterative_samples,
        bins=bins,
        k=k,
        batch_size=batch,
    )
    if args.preset:
        comp["protocol"]["preset"] = "paper"
    if len(calib) == 2:
        log(f"profiling again on {calib[1]} for the calibration comparison ...")
        comp["calibration_agreement"] = C.corpus_agreement(
            lm,
            comp,
            corpora[1],
            kinds=kinds,
            methods=methods,
            counts=counts,
            samples=args.samples,
            seq_len=args.seq_len,
            seed=args.seed,
            bins=bins,
            k=k,
            batch_size=batch,
            progress=not args.quiet,
        )
        comp["calibration"] = {"a": calib[0] or "builtin", "b": calib[1]}
    out = C.write(comp, args.out, overwrite=args.overwrite)
    print(C.markdown(comp))
    print(f"wrote {out}/comparison.json, comparison.md, comparison.png")
    return 0
