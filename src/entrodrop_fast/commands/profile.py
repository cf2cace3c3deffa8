"""``entrodrop profile [MODEL]``: the entropy profile of a model's blocks (the main job).

With no arguments: the built-in SmolLM2-135M-Instruct on the built-in corpus with the
paper's defaults (128 windows x 256 tokens, seed 2024, bucket entropy, 20 bins), report in
``./entrodrop_report``.
"""

from __future__ import annotations

import sys

from entrodrop_fast.data import PAPER_SAMPLES, PAPER_SEED, PAPER_SEQ_LEN


def _spans(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--spans must be comma-separated integers, got {s!r}") from None
    if not out or min(out) < 1:
        raise ValueError(f"--spans must be positive integers, got {s!r}")
    return out


def check_targets(args) -> None:
    """Refuse unusable --out / --resume-dir before any work (see entrodrop_fast.outputs)."""

    from entrodrop_fast import outputs

    inputs = [*outputs.model_paths(args.model, args.cache_dir), *outputs.corpus_paths(args.corpus)]
    out = outputs.check_dir(
        args.out, kind="report", what="report", inputs=inputs, overwrite=args.overwrite
    )
    if args.resume_dir:
        from entrodrop_fast.profile.pipeline import check_resume_dir

        check_resume_dir(args.resume_dir, inputs=[*inputs, ("report directory --out", out)])


def _apply_preset(args) -> dict | None:
    """``--preset paper``: set the estimator (knn k=25, or bucket 80 bins for Mistral), batch 1
    and the dtype (fp16 on CUDA, fp32 on CPU) from the model's config; methods given with
    --method are profiled too. The report records the preset, so rank / prune protect layers
    0, 1 and the last from it. None without a preset."""
    from entrodrop_fast.profile.presets import check_preset, preset_for_model

    if check_preset(getattr(args, "preset", None)) is None:
        return None
    p = preset_for_model(args.model, args.device, cache_dir=args.cache_dir)
    extra = [
        m
        for spec in (args.method or [])
        for m in str(spec).split(",")
        if m.strip() and m.strip() != p["method"]
    ]
    args.method = [p["method"], *extra]
    args.k, args.bins = p["k"], p["bins"]
    args.batch_size = args.batch_size or p["batch_size"]
    if p["dtype"] == "fp16":
        args.dtype = "fp16"
    print(f"entrodrop profile: --preset paper: {p['why']}", file=sys.stderr)
    return p


def add_placement_args(p) -> None:
    """--dtype and --device: where and in what precision the model runs."""
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["bf16", "fp16", "fp32"],
        help="model dtype (default fp32)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def add_calibration_args(p, *, batch_size: int | None, batch_help: str, step: str = "") -> None:
    """--samples, --seq-len, --batch-size and --seed: the calibration options of ``profile``, and
    of ``prune``'s profile step (``step``, e.g. ``"profile step: "``, starts each help text).
    ``batch_size`` is --batch-size's default, ``batch_help`` its help after ``step``."""
    from entrodrop_fast.cli import int_at_least, positive_int

    p.add_argument(
        "--samples",
        type=positive_int,
        default=PAPER_SAMPLES,
        help=f"{step}calibration windows (default {PAPER_SAMPLES})",
    )
    p.add_argument(
        "--seq-len",
        type=int_at_least(2, "an entropy needs at least 2 tokens"),
        default=PAPER_SEQ_LEN,
        help=f"{step}tokens per window (default {PAPER_SEQ_LEN})",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help=f"{step}{batch_help}"
    )
    p.add_argument(
        "--seed", type=int, default=PAPER_SEED, help=f"{step}sampling seed (default {PAPER_SEED})"
    )


def calibration_of(args):
    """The :class:`~entrodrop_fast.profile.pipeline.Calibration` that a command's --corpus and
    :func:`add_calibration_args` options ask for (and its --text-field, where it has one)."""
    from entrodrop_fast.profile.pipeline import Calibration

    field = {"text_field": args.text_field} if hasattr(args, "text_field") else {}
    return Calibration(
        corpus=args.corpus, samples=args.samples, seq_len=args.seq_len, seed=args.seed, **field
    )


def register(subparsers) -> None:
    from entrodrop_fast.cli import add_model_arg, add_preset_arg, positive_int

    p = subparsers.add_parser(
        "profile",
        help="entropy profile of a model's attention / MLP / layer blocks (the main job)",
        description=__doc__,
    )
    add_model_arg(
        p,
        "local HF directory, .gguf file, hub id or a built-in name (gemma3-270m); "
        "default: built-in SmolLM2-135M-Instruct",
        metavar="MODEL",
    )
    p.add_argument(
        "--method",
        "-m",
        action="append",
        default=None,
        help="bucket, gaussian_diag, gaussian_full, knn, renyi, cosine, angular or all; several "
        "comma-separated or repeated (default bucket); all run in one forward pass",
    )
    add_preset_arg(
        p,
        "paper: what the paper's code runs for this architecture (knn k=25, or bucket 80 bins "
        "for Mistral; batch 1; fp16 on CUDA, fp32 on CPU); rank/prune then protect layers 0, 1 "
        "and the last",
    )
    add_calibration_args(
        p,
        batch_size=None,
        batch_help="windows per forward pass (default 1, as the paper; with --max-memory, "
        "the largest up to 8 that fits)",
    )
    p.add_argument(
        "--bins",
        type=positive_int,
        default=20,
        help="bucket: bins per channel (default 20; the paper used 20 for Llama, 80 for Mistral)",
    )
    p.add_argument(
        "--paper-exact",
        action="store_true",
        help="bucket: clamp probabilities at 1e-10 as the paper's code",
    )
    p.add_argument("--k", type=positive_int, default=25, help="knn: neighbour rank k (default 25)")
    p.add_argument("--spans", default="1,2,4,8", help="angular: layer spans n (default 1,2,4,8)")
    add_placement_args(p)
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "cuda", "cpp", "triton", "torch"],
        help="estimator backend (default auto: the fastest available; cuda: the CUDA C++ "
        "kernels, cpp: the CPU ones, also accepted for CUDA tensors)",
    )
    p.add_argument(
        "--out",
        default="entrodrop_report",
        help="report directory (default ./entrodrop_report; new, empty or an earlier report)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write the report into --out even when it holds other files (they are left untouched)",
    )
    p.add_argument(
        "--corpus",
        default=None,
        help="builtin (default), stdlib-docs (docstrings of the standard library), a .txt file, "
        "a directory of .txt, a .jsonl file or hf:NAME[:CONFIG][:SPLIT]",
    )
    p.add_argument(
        "--text-field", default="text", help="JSONL / dataset field holding the text (default text)"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the built-in model is converted (default $ENTRODROP_CACHE or "
        "~/.cache/entrodrop_fast)",
    )
    p.add_argument(
        "--streaming",
        action="store_true",
        help="run layer by layer from the checkpoint's safetensors shards (models larger than "
        "memory)",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        help="memory budget, e.g. 8GB: streams when the model does not fit, and keeps "
        "activations on disk beyond it",
    )
    p.add_argument(
        "--resume-dir",
        default=None,
        help="keep the streaming states here after every layer; rerun with the same arguments "
        "to resume (implies --streaming)",
    )
    p.add_argument(
        "--top",
        type=positive_int,
        default=8,
        help="blocks per kind in the terminal table (default 8)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip profile.png")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from entrodrop_fast.profile.inmemory import ProfileSettings, parse_methods
    from entrodrop_fast.profile.pipeline import (
        Memory,
        check_inputs,
        parse_bytes,
        profile_model,
    )
    from entrodrop_fast.profile.report import ranking_table, write_report

    def warn(msg):  # warnings are shown with -q too
        print(f"entrodrop profile: {msg}", file=sys.stderr)

    # --preset paper: method, k, bins, batch size, dtype from the architecture
    preset = _apply_preset(args)
    methods = parse_methods(args.method or ["bucket"])
    for name, v in (
        ("--samples", args.samples),
        ("--seq-len", args.seq_len),
        ("--batch-size", args.batch_size or 1),
        ("--bins", args.bins),
        ("--k", args.k),
    ):
        if v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    from entrodrop_fast.ops.api import MAX_BINS

    if args.bins > MAX_BINS:  # before the model loads, not at the first estimator call
        raise ValueError(
            f"--bins must be at most {MAX_BINS} (every backend keeps that many counters per "
            f"channel), got {args.bins}"
        )
    settings = ProfileSettings(
        methods=methods,
        batch_size=args.batch_size or 1,
        backend=args.backend,
        bins=args.bins,
        k=args.k,
        paper_exact=args.paper_exact,
        spans=_spans(args.spans),
    )
    check_targets(args)
    if args.quiet:  # -q: no progress bars, transformers' "Loading weights" included
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    budget = parse_bytes(args.max_memory) if args.max_memory is not None else None
    calibration = calibration_of(args)
    corpus = check_inputs(
        args.model,
        settings,
        calibration,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    memory = Memory(
        max_bytes=budget,
        streaming=args.streaming,
        resume_dir=args.resume_dir,
        label=args.max_memory,
    )
    report = profile_model(
        args.model,
        settings,
        memory,
        calibration=calibration,
        dtype=args.dtype,
        device=args.device,
        cache_dir=args.cache_dir,
        preset=preset,
        batch_size_fixed=args.batch_size is not None,
        progress=not args.quiet,
        log=log,
        warn=warn,
        corpus=corpus,
    )
    if report is None:  # another rank of a distributed run: rank 0 writes the report
        return 0
    out = write_report(report, args.out, png=not args.no_plot, overwrite=args.overwrite)
    print(ranking_table(report, top=args.top))
    t = report["timing"]
    L = report["model"].get("num_layers")
    speed = (
        f"resumed at layer {t['resumed_from_layer']} of {L}: the remaining layers"
        if t.get("resumed_from_layer")
        else f"{t['tokens_per_s']:.0f} tokens/s"
    )
    print(
        f"\nprofiled {t['samples']} samples in {t['seconds']:.1f} s "
        f"({speed}, backend {report['settings']['backend']}); report: {out}"
    )
    return 0
