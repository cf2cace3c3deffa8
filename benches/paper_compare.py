"""The paper's claims on the two built-in real models: one command for the whole study (issue 14).

    python benches/paper_compare.py --out DIR  # the full study: SmolLM2-135M and Gemma-3-270M
    python benches/paper_compare.py --quick --out DIR  # the plumbing on SmolLM2, a few minutes

Per model:
1. one profile (every method in one pass) on the built-in corpus's calibration part;
2. ``compare`` under two protection rules, the same for every method: ``shared`` (stage 1
   detected once from the bucket stream entropy, plus the last layer) and ``paper``
   (layers 0, 1 and the last); methods bucket (the paper's), knn (k = 25, paper form: what
   the paper's code runs on Llama), gaussian_diag, renyi, the robust bucket variants
   (bucket_q, bucket_nosink, bucket_tokennorm), cosine (LLM-Drop), block_influence
   (ShortGPT, layers), angular (PruneMe spans, layers), random (3 seeds); iterative
   re-scoring for knn and cosine; attention and whole-layer drops; evaluation cached by
   drop set and shared between the two rules;
3. the same profile on a second corpus (``stdlib-docs``): Spearman correlation of every
   method's block scores and overlap of the K dropped;
4. the massive-activation diagnosis of the residual stream, with its figure.

Writes into --out: ``study.json`` (everything, with timings), ``study.md`` (all tables),
and per model ``MODEL/comparison_{shared,paper}.{json,md,png}``, ``MODEL/massive.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ENTROPY = [
    "bucket",
    "knn",
    "gaussian_diag",
    "renyi",
    "bucket_q",
    "bucket_nosink",
    "bucket_tokennorm",
]
SIMILARITY = ["cosine", "block_influence", "angular"]

# the full grid: chosen to fit about 2 h for both models on the shared 2-core CPU (see
# estimate() and the README); every number is a parameter of the command
FULL = {
    "models": ["smollm2", "gemma3-270m"],
    "kinds": ["attn", "layer"],
    "counts": {
        "smollm2": [2, 4, 6, 8, 10],
        "gemma3-270m": [1, 2, 4, 6],
    },  # K up to about a third of the layers (30, 18)
    "methods": ENTROPY + SIMILARITY + ["random"],
    "random_seeds": 3,
    "iterative": ["knn", "cosine"],
    "iterative_samples": 16,
    "samples": 128,
    "seq_len": 256,
    "eval_windows": 64,  # 64 x 256 = 16k held-out tokens
    "items": 200,  # per zero-shot task
    # the evaluation text: the held-out fifths of the built-in corpus (7.4k tokens, 107
    # continuation passages with SmolLM2's tokenizer) and of stdlib-docs (23k, 334), so that
    # 16k tokens and 200 items per task exist; neither is ever calibrated on
    "eval_corpora": ["builtin", "stdlib-docs"],
    "rules": ["shared", "paper"],
    "second_corpus": "stdlib-docs",
    "massive_windows": 16,
}
# what fits about 2 h for both models on the quiet 2-core CPU at 700 tokens/s (--estimate):
# the statistical power of the full grid (200 items per task, 16k perplexity tokens), fewer
# cells: one protection rule, K = two values, the paper's estimators, one robust variant, cosine
# (= block influence on layers), one random seed, no iterative re-scoring
CPU2H = {
    **FULL,
    "counts": {"smollm2": [2, 6], "gemma3-270m": [2, 4]},
    "methods": ["bucket", "knn", "bucket_q", "cosine", "block_influence", "random"],
    "random_seeds": 1,
    "iterative": [],
    "rules": ["shared"],
}
# every method and setting of the full grid at one K per model (K = 2): both protection rules,
# every estimator and robust variant, cosine, block influence, angular, random x 3 and the
# iterative re-scoring; --reuse-evaluations takes the drop sets another study already
# evaluated with the same settings (the cpu2h study's)
METHODS = {
    **FULL,
    "counts": {"smollm2": [2], "gemma3-270m": [2]},
}
# K from 1 (or 2) to about a third of the layers for the paper's two estimators and cosine
# (= block influence on whole layers), one rule: the cpu2h grid's rows extended along K;
# --reuse-evaluations takes the cells a cpu2h study already evaluated
KSWEEP = {
    **FULL,
    "methods": ["bucket", "knn", "cosine", "block_influence"],
    "random_seeds": 1,
    "iterative": [],
    "rules": ["shared"],
}
QUICK = {
    **FULL,
    "models": ["smollm2"],
    "kinds": ["layer"],  # whole layers: where the paper's bucket failed
    "counts": {"smollm2": [2], "gemma3-270m": [2]},
    "methods": ["bucket", "knn", "bucket_q", "cosine", "block_influence", "angular", "random"],
    "random_seeds": 1,
    "iterative": [],
    "samples": 8,
    "eval_windows": 2,
    "items": 8,
    "massive_windows": 2,
}


# forward tokens/s on the 2-core CPU, fp32, from the CPU time of one 1-thread forward of 2 x 256
# tokens (x 2 cores) measured here on 2026-11-30 (the wall clock was useless: load 12):
# "head" = the LM head on every position (perplexity), "kept" = on the scored positions only
RATES = {"smollm2": {"head": 480.0, "kept": 656.0}, "gemma3-270m": {"head": 250.0, "kept": 580.0}}


def estimate(grid: dict, scale: float = 1.0) -> dict:
    """Seconds the grid costs per model on the 2-core CPU (:data:`RATES` x ``scale``), an upper
    bound: every plan evaluated (the cache only lowers it). An evaluation is the perplexity
    windows (LM head everywhere) + per zero-shot item 48 + 4 x 16 tokens (continuation, shared
    context) and ~194 (last_word); profiles (two corpora, iterative re-profiles, the diagnosis)
    count their tokens at half the kept rate (the estimators' share)."""
    T = grid["seq_len"]
    out = {}
    for m in grid["models"]:
        r = {k: v * scale for k, v in RATES[m].items()}
        ks = grid["counts"][m]
        plans = 0
        for kind in grid["kinds"]:
            for meth in grid["methods"]:
                if meth in ("block_influence", "angular") and kind != "layer":
                    continue
                if meth == "block_influence" and "cosine" in grid["methods"]:
                    continue  # the same drop sets as cosine: cached
                plans += len(ks) * (grid["random_seeds"] if meth == "random" else 1)
            plans += len(grid["iterative"]) * len(ks)
        plans *= len(grid["rules"])
        ppl_tokens = grid["eval_windows"] * T
        zs_tokens = grid["items"] * (48 + 4 * 16 + 194)
        per_eval = ppl_tokens / r["head"] + zs_tokens / r["kept"]
        iter_tokens = sum(
            max(ks) * grid["iterative_samples"] * T
            for _ in grid["kinds"]
            for _ in grid["iterative"]
        )
        profile_tokens = 2 * grid["samples"] * T + iter_tokens + grid["massive_windows"] * T
        seconds = (plans + 1) * per_eval + profile_tokens / (0.5 * r["kept"])
        out[m] = {
            "evaluations_at_most": plans + 1,
            "seconds_per_evaluation": per_eval,
            "profile_tokens": profile_tokens,
            "seconds": seconds,
        }
    return out


class EvaluationLog(dict):
    """The evaluation cache of one model (drop-set key -> evaluation), kept on disk as it grows:
    every new evaluation is appended to ``path`` (one JSON line, flushed and synced), so a study
    that is interrupted (a session's end, Ctrl-C, a power cut) and started again with
    ``--resume`` evaluates only the drop sets it had not finished. The first line records the
    evaluation settings; a log written with other settings is refused, never mixed in."""

    def __init__(self, path: Path, settings: dict):
        super().__init__()
        self.path = path
        self.settings = settings
        if path.exists():
            lines = path.read_text().splitlines()
            head = json.loads(lines[0]) if lines else {}
            if head.get("settings") != settings:
                raise SystemExit(
                    f"paper_compare: error: {path} was written with other evaluation settings "
                    f"({head.get('settings')}); use a new --out, or --overwrite to start again"
                )
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # the line being written when the run stopped: evaluated again
                super().__setitem__(rec["key"], rec["evaluation"])
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": settings}) + "\n")

    def adopt(self, other: Path) -> int:
        """Take the evaluations of another study's log ``other`` made with the same settings
        (appended to this log, so that it stays complete on its own). Returns how many were
        new; a log with other settings is refused."""
        if not other.is_file():
            return 0
        theirs = EvaluationLog.__new__(EvaluationLog)
        dict.__init__(theirs)
        lines = other.read_text().splitlines()
        head = json.loads(lines[0]) if lines else {}
        if head.get("settings") != self.settings:
            raise SystemExit(
                f"paper_compare: error: --reuse-evaluations: {other} was made with other "
                f"evaluation settings ({head.get('settings')} against {self.settings}); its "
                "numbers are not comparable"
            )
        new = 0
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if rec["key"] not in self:
                self[rec["key"]] = rec["evaluation"]
                new += 1
        return new

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        # NaN / inf stay as they are (Python's JSON reads them back): a broken model's perplexity
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "evaluation": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def eval_settings(name: str, grid: dict, dtype: str) -> dict:
    """What an evaluation's numbers depend on besides the drop set."""
    from entrodrop_fast import __version__

    return {
        "model": name,
        "dtype": dtype,
        "seq_len": grid["seq_len"],
        "eval_windows": grid["eval_windows"],
        "items": grid["items"],
        "eval_corpora": list(grid.get("eval_corpora") or ["builtin"]),
        "entrodrop_fast": __version__,
    }


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def write_comparison(comp: dict, d: Path, rule: str) -> None:
    """``d/comparison_{rule}.{json,md,png}`` of one protection rule's comparison."""
    from entrodrop_fast.evaluate import compare as C
    from entrodrop_fast.profile.report import json_safe

    d.mkdir(parents=True, exist_ok=True)
    (d / f"comparison_{rule}.json").write_text(
        json.dumps(json_safe(comp), indent=1, allow_nan=False)
    )
    (d / f"comparison_{rule}.md").write_text(C.markdown(comp))
    C.plot(comp, d / f"comparison_{rule}.png")


def calibrate(name: str, lm, results: dict, grid: dict, counts, progress: bool) -> None:
    """Profile on the grid's second corpus and put the calibration comparison (Spearman of
    every method's block scores, over all blocks and over the droppable ones, and the overlap
    of the K dropped) and that profile into every rule's comparison in ``results``."""
    from entrodrop_fast.evaluate import compare as C

    log(f"{name}: profile on {grid['second_corpus']} for the calibration comparison")
    first = results[grid["rules"][0]]
    agreement = C.corpus_agreement(
        lm,
        first,
        grid["second_corpus"],
        kinds=grid["kinds"],
        methods=grid["methods"],
        counts=counts,
        samples=grid["samples"],
        seq_len=grid["seq_len"],
        seed=2024,
        progress=progress,
    )
    first["calibration_agreement"] = agreement
    for rule, comp in results.items():
        if rule != grid["rules"][0]:  # the agreement under this rule's own protection
            comp["calibration_report"] = first["calibration_report"]
            comp["calibration_agreement"] = C.agreement_with(
                comp,
                first["calibration_report"],
                kinds=grid["kinds"],
                methods=grid["methods"],
                counts=counts,
            )
        comp["calibration"] = {"a": "builtin", "b": grid["second_corpus"]}


def redo_calibration(name: str, grid: dict, out: Path, *, device, dtype, progress) -> dict:
    """The calibration comparison of a model this study finished in ``out``, again (with the
    current code: e.g. Spearman over the droppable blocks): profiles the second corpus, then
    rewrites MODEL/comparison_*.{json,md,png} and MODEL/result.json. Returns the result."""
    from entrodrop_fast.models import load_model

    d = out / name
    saved = json.loads((d / "result.json").read_text())
    results = {
        rule: json.loads((d / f"comparison_{rule}.json").read_text()) for rule in grid["rules"]
    }
    lm = load_model(name, dtype=dtype, device=device)
    t = time.perf_counter()
    calibrate(name, lm, results, grid, grid["counts"][name], progress)
    result = saved["result"]
    result["timing"]["calibration_s"] = time.perf_counter() - t
    for rule, comp in results.items():
        write_comparison(comp, d, rule)
        result["comparisons"][rule]["calibration_agreement"] = comp["calibration_agreement"]
    done = d / "result.json"
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps(saved))
    os.replace(tmp, done)
    return result


def run_model(
    name: str,
    grid: dict,
    out: Path,
    *,
    device: str,
    dtype: str,
    progress: bool,
    reuse: Path | None = None,
) -> dict:
    from entrodrop_fast.data import calibration_windows, load_corpus
    from entrodrop_fast.evaluate import compare as C
    from entrodrop_fast.models import load_model
    from entrodrop_fast.profile import massive as M

    t0 = time.perf_counter()
    lm = load_model(name, dtype=dtype, device=device)
    timing = {"load_s": time.perf_counter() - t0}
    corpus = load_corpus(None)
    counts = grid["counts"][name]
    cache = EvaluationLog(out / name / "evaluations.jsonl", eval_settings(name, grid, dtype))
    if cache:
        log(f"{name}: {len(cache)} evaluations from an earlier run of this study ({cache.path})")
    if reuse is not None:
        n = cache.adopt(reuse / name / "evaluations.jsonl")
        log(f"{name}: {n} evaluations taken from {reuse / name / 'evaluations.jsonl'}")
    known = len(cache)  # evaluations this run did not have to make
    results = {}
    report = None
    for rule in grid["rules"]:
        t = time.perf_counter()
        log(f"{name}: compare, protection rule {rule}")
        comp = C.compare(
            lm,
            kinds=tuple(grid["kinds"]),
            counts=tuple(counts),
            methods=tuple(grid["methods"]),
            corpus=corpus,
            samples=grid["samples"],
            seq_len=grid["seq_len"],
            seed=2024,
            eval_windows=grid["eval_windows"],
            eval_items=grid["items"],
            speed=False,
            progress=progress,
            log=lambda *a: log(name, *a),
            protect_rule=rule,
            stage1_method="bucket",
            random_seeds=tuple(range(grid["random_seeds"])),
            iterative=tuple(grid["iterative"]),
            iterative_samples=grid["iterative_samples"],
            report=report,
            eval_cache=cache,
            eval_corpora=grid.get("eval_corpora"),
        )
        report = comp["report"]  # one profile for both rules
        timing[f"compare_{rule}_s"] = time.perf_counter() - t
        results[rule] = comp
        write_comparison(comp, out / name, rule)  # readable before the study ends
    # calibration robustness: the same methods' rankings from a second corpus
    t = time.perf_counter()
    calibrate(name, lm, results, grid, counts, progress)
    timing["calibration_s"] = time.perf_counter() - t
    # massive activations
    t = time.perf_counter()
    log(f"{name}: massive-activation diagnosis")
    windows, _ = calibration_windows(
        lm.tokenizer, corpus, samples=grid["massive_windows"], seq_len=grid["seq_len"], seed=2024
    )
    diag = M.diagnose(lm.model, lm.tokenizer, windows, top=3, bins=20)
    timing["massive_s"] = time.perf_counter() - t
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    from entrodrop_fast.profile.report import json_safe

    for rule, comp in results.items():  # again, now with the calibration agreement
        write_comparison(comp, d, rule)
    (d / "massive.json").write_text(json.dumps(json_safe(diag), indent=1, allow_nan=False))
    (d / "massive.md").write_text(M.markdown(diag))
    M.plot(
        diag, d / "massive.png", title=f"{name}: massive activations and the bucket histogram range"
    )
    evaluated = len(cache) - 1
    made = len(cache) - known  # by this run (the rest: resumed or reused)
    rows = sum(len(c["rows"]) for c in results.values())
    timing["total_s"] = time.perf_counter() - t0
    timing["evaluations"] = evaluated
    timing["evaluated_in_this_run"] = made
    timing["rows"] = rows
    timing["seconds_per_evaluation"] = (
        timing[f"compare_{grid['rules'][0]}_s"]
        + sum(timing[f"compare_{r}_s"] for r in grid["rules"][1:])
    ) / max(1, made)
    log(f"{name}: {rows} rows from {evaluated} distinct pruned models in {timing['total_s']:.0f} s")
    result = {
        "model": name,
        "timing": timing,
        "comparisons": {
            r: {k: v for k, v in c.items() if k not in ("report", "evaluations")}
            for r, c in results.items()
        },
        "massive": diag,
    }
    done = d / "result.json"
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps({"grid": grid, "dtype": dtype, "result": result}))
    os.replace(tmp, done)  # a finished model: --resume skips it
    return result


MARKER = ".paper-compare-study"  # written into --out when a study starts there


def _is_evaluation_log(p: Path) -> bool:
    """Whether ``p`` is an evaluation log this script wrote (its first line: the settings)."""
    try:
        with p.open() as f:
            head = json.loads(f.readline() or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(head, dict) and isinstance(head.get("settings"), dict)


def holds_study(out: Path) -> bool:
    """Whether ``out`` holds a study of this script to continue with --resume: its marker, or
    (a study written before the marker existed) a model's evaluation log. A ``result.json`` or
    ``study.md`` alone may be anyone's: it never counts."""
    if not out.is_dir():
        return False
    return (out / MARKER).is_file() or any(
        _is_evaluation_log(p) for p in out.glob("*/evaluations.jsonl")
    )


def _model_files(d: Path) -> list[Path]:
    """The files a study writes into a model's directory ``d`` (by name)."""
    return [
        d / f"{stem}.{ext}"
        for stem in ("comparison_shared", "comparison_paper", "massive")
        for ext in ("json", "md", "png")
    ] + [d / "evaluations.jsonl", d / "result.json", d / "result.json.tmp"]


def finished_model(d: Path, grid: dict, dtype: str) -> dict | None:
    """The result a run of the same grid (whichever models it ran) and dtype finished in
    ``d`` (``d/result.json``), or None."""
    done = d / "result.json"
    if not done.is_file():
        return None
    prev = json.loads(done.read_text())

    def same(g):
        return {k: v for k, v in json.loads(json.dumps(g)).items() if k != "models"}

    if same(prev.get("grid") or {}) != same(grid) or prev.get("dtype") != dtype:
        return None
    return prev["result"]


def summary_md(study: dict) -> str:
    from entrodrop_fast.evaluate import compare as C
    from entrodrop_fast.profile import massive as M

    lines = [
        f"# EntroDrop study (grid {study.get('grid_name', 'full')})",
        "",
        f"Command: `{study['command']}`",
        "",
        f"Wall time of the last run {study['wall_s'] / 60:.1f} min on {study['device']} "
        f"({study['dtype']}); the run that finished each model took "
        + ", ".join(
            f"{m['model']} {m.get('timing', {}).get('total_s', float('nan')) / 60:.1f} min"
            for m in study["models"]
        )
        + ".",
        "",
    ]
    for m in study["models"]:
        lines += [
            f"## {m['model']}",
            "",
            "Timing: "
            + ", ".join(
                f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in m["timing"].items()
            ),
            "",
        ]
        for rule, comp in m["comparisons"].items():
            lines += [f"### protection rule: {rule}", "", C.markdown(comp)]
        lines += ["### massive activations", "", M.markdown(m["massive"])]
    return "\n".join(lines) + "\n"


def remove_earlier_study(out: Path, models) -> None:
    """--overwrite: remove the files an earlier study wrote into ``out``, by name only (never a
    directory tree, never a link, never anything else the directory holds). Only where a study
    wrote: ``out``'s own files in a directory that holds a study (:func:`holds_study`), a
    model's files in a model directory that holds its evaluation log (the first file a study
    writes there). Elsewhere a file of one of those names is the user's, and the run is
    refused before anything is removed."""
    root = [out / "study.json", out / "study.md", out / MARKER]
    plan = [(p, holds_study(out)) for p in root]
    for m in models:
        ours = _is_evaluation_log(out / m / "evaluations.jsonl")
        plan += [(p, ours) for p in _model_files(out / m)]
    plan = [(p, ours) for p, ours in plan if p.is_file() and not p.is_symlink()]
    foreign = [p for p, ours in plan if not ours]
    if foreign:
        names = ", ".join(str(p.relative_to(out)) for p in foreign[:4])
        raise SystemExit(
            f"paper_compare: error: --overwrite: {out} holds {names}, which no study of this "
            "script wrote there (no study marker or evaluation log); move them or choose "
            "another --out"
        )
    for p, _ in plan:
        p.unlink()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        required=True,
        help="output directory (new or empty; --resume to continue a study there, --overwrite "
        "to start one again)",
    )
    ap.add_argument(
        "--grid",
        default=None,
        choices=["full", "cpu2h", "methods", "ksweep"],
        help="full: the issue's whole grid (about 15-21 h on the 2-core CPU, minutes on a GPU); "
        "cpu2h: the cells that fit about 2 h there; methods: every method and setting at "
        "K = 2; ksweep: bucket, knn and cosine at every K of the full grid, one rule "
        "(default: full on CUDA, cpu2h on CPU)",
    )
    ap.add_argument(
        "--reuse-evaluations",
        metavar="DIR",
        default=None,
        help="take the evaluations another study in DIR made with the same evaluation "
        "settings (DIR/MODEL/evaluations.jsonl; the same pruned model gives the same numbers) "
        "instead of evaluating those drop sets again",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the plumbing only: SmolLM2, whole layers, K = 2, 7 methods, both rules, 8 items, "
        "2 perplexity windows (a few minutes on a quiet machine)",
    )
    ap.add_argument(
        "--models",
        default=None,
        help="comma-separated built-in names (default: smollm2,gemma3-270m; --quick: smollm2)",
    )
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="model dtype (default fp32)",
    )
    ap.add_argument(
        "--overwrite", action="store_true", help="replace the files of an earlier study in --out"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted study in --out (same grid and settings): finished models "
        "and every evaluation already made are reused",
    )
    ap.add_argument(
        "--redo-calibration",
        action="store_true",
        help="with --resume: run the calibration comparison of the finished models again "
        "(a new profile on the second corpus; the evaluations are kept) and rewrite their files",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default torch's; on a machine shared with other jobs 1 thread "
        "was 2x faster than 2 here: OpenMP threads spin-wait)",
    )
    ap.add_argument(
        "--estimate",
        action="store_true",
        help="print the grid's evaluations, forward-pass tokens and time on the 2-core CPU "
        "measured here (x --rate-scale), run nothing",
    )
    ap.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="--estimate: throughput relative to the 2-core CPU measured here "
        "(e.g. 4 for 8 such cores)",
    )
    args = ap.parse_args(argv)
    import torch

    if args.threads is not None:
        if args.threads < 1:
            print(
                f"paper_compare: error: --threads must be >= 1, got {args.threads}", file=sys.stderr
            )
            return 1
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    grid = dict(
        QUICK
        if args.quick
        else {"full": FULL, "cpu2h": CPU2H, "methods": METHODS, "ksweep": KSWEEP}[
            args.grid or ("full" if cuda else "cpu2h")
        ]
    )
    if args.models:
        grid["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in grid["models"] if m not in grid["counts"]]
        if bad:
            print(
                f"paper_compare: error: unknown model(s) {bad}; "
                f"choose from {', '.join(grid['counts'])}",
                file=sys.stderr,
            )
            return 1
    if args.estimate:
        est = estimate(grid, args.rate_scale)
        for m, e in est.items():
            print(
                f"{m}: at most {e['evaluations_at_most']} evaluations x "
                f"{e['seconds_per_evaluation']:.0f} s + profiles ({e['profile_tokens']} tokens): "
                f"{e['seconds'] / 3600:.2f} h"
            )
        print(
            f"total: {sum(e['seconds'] for e in est.values()) / 3600:.2f} h "
            f"on the quiet 2-core CPU (x {args.rate_scale:g})"
        )
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out).expanduser()
    if args.redo_calibration and not args.resume:
        print(
            "paper_compare: error: --redo-calibration works on a finished study: add --resume",
            file=sys.stderr,
        )
        return 1
    if args.resume and args.overwrite:
        print(
            "paper_compare: error: --resume keeps an earlier study's work and --overwrite "
            "removes it; give one",
            file=sys.stderr,
        )
        return 1
    if out.exists() and not out.is_dir():
        print(
            f"paper_compare: error: --out {out} exists and is not a directory; give a directory",
            file=sys.stderr,
        )
        return 1
    if args.resume and not holds_study(out):
        empty = not out.exists() or not any(out.iterdir())
        print(
            f"paper_compare: error: --resume: {out} holds no study of this script to continue "
            "(no study marker or MODEL/evaluations.jsonl); "
            + ("drop --resume" if empty else "choose a new --out (its files are not a study's)"),
            file=sys.stderr,
        )
        return 1
    reuse = Path(args.reuse_evaluations).expanduser() if args.reuse_evaluations else None
    if reuse is not None and not any(
        _is_evaluation_log(reuse / m / "evaluations.jsonl") for m in grid["models"]
    ):
        print(
            f"paper_compare: error: --reuse-evaluations: {reuse} holds no evaluation log of "
            f"{', '.join(grid['models'])} (MODEL/evaluations.jsonl); give the --out of an "
            "earlier study",
            file=sys.stderr,
        )
        return 1
    if out.exists() and any(out.iterdir()) and not args.resume:
        if not args.overwrite:
            print(
                f"paper_compare: error: {out} is not empty; choose a new directory, add --resume "
                "to continue a study there, or --overwrite",
                file=sys.stderr,
            )
            return 1
        remove_earlier_study(out, grid["counts"])
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("a study of benches/paper_compare.py (--resume continues it)\n")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    study = {
        "quick": args.quick,
        "grid_name": "quick" if args.quick else (args.grid or ("full" if cuda else "cpu2h")),
        "command": " ".join(
            ["python benches/paper_compare.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "device": device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "grid": grid,
        "models": [],
    }
    for name in grid["models"]:
        prev = finished_model(out / name, grid, args.dtype) if args.resume else None
        if prev is not None and args.redo_calibration:
            log(f"{name}: the calibration comparison again ({out / name})")
            prev = redo_calibration(
                name, grid, out, device=device, dtype=args.dtype, progress=not args.quiet
            )
        if prev is not None:
            log(f"{name}: finished by an earlier run of this study ({out / name / 'result.json'})")
            study["models"].append(prev)
            continue
        study["models"].append(
            run_model(
                name,
                grid,
                out,
                device=device,
                dtype=args.dtype,
                progress=not args.quiet,
                reuse=reuse,
            )
        )
    # the models an earlier run of the same grid finished in this directory (e.g. one model
    # per run, --models): study.json sums up every model there
    for name in grid["counts"]:
        prev = None if name in grid["models"] else finished_model(out / name, grid, args.dtype)
        if prev is not None:
            log(f"{name}: kept in the summary, finished by an earlier run of this study")
            study["models"].append(prev)
    study["wall_s"] = time.perf_counter() - t0
    from entrodrop_fast.profile.report import json_safe

    (out / "study.json").write_text(json.dumps(json_safe(study), indent=1, allow_nan=False))
    (out / "study.md").write_text(summary_md(study))
    log(f"study done in {study['wall_s'] / 60:.1f} min: {out}/study.md")
    return 0


def _main() -> int:
    try:
        return main()
    except KeyboardInterrupt:
        print(
            "paper_compare: interrupted; the evaluations finished so far are kept: add --resume "
            "to the same command to continue",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(_main())
