"""Comparison of pruning methods: how much quality each keeps at each number of blocks dropped.

:func:`compare` profiles a model once (every requested scoring method in one forward pass,
on the calibration part of the corpus), then for each method and each K builds the drop
plan (:func:`entrodrop_fast.prune.ranking.make_plan`; ``random`` draws K unprotected blocks with
a fixed seed), prunes a copy of the model in memory
(:func:`entrodrop_fast.prune.surgery.drop_blocks_`), and evaluates it on held-out text
(:mod:`entrodrop_fast.evaluate.heldout`): perplexity and the built-in zero-shot tasks. The
quality table is deterministic (same command, same table); speed (prefill/decode tokens/s,
KV-cache bytes) is measured once per pruned model and reported apart, since timings vary
from run to run.

:func:`calibration_agreement` compares the rankings obtained from two calibration corpora
(Spearman correlation of the block scores, overlap of the K dropped).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from pathlib import Path
from typing import Any

from entrodrop_fast._names import setting

# the profile's table of method names, which needs no torch (for the CLI parser)
from entrodrop_fast.profile.methods import ENTROPY_METHODS as ENTROPY

SCORING = (*ENTROPY, "cosine", "block_influence", "angular")
BASELINES = ("random",)


def parse_list(spec: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """``"a,b"`` -> ["a", "b"]: each in ``allowed``, duplicates dropped, at least one."""
    out = list(dict.fromkeys(s.strip() for s in str(spec).split(",") if s.strip()))
    bad = [s for s in out if s not in allowed]
    if bad:
        raise ValueError(
            f"{what}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}"
        )
    if not out:
        raise ValueError(f"{what} is empty; choose from {', '.join(allowed)}")
    return out


def parse_counts(spec: str) -> list:
    """``"2,4,25%"`` -> [2, 4, "25%"]: each in a form ``rank --drop`` accepts (a count, a fraction
    in (0, 1), a percentage; :func:`entrodrop_fast.prune.ranking.parse_drop`), checked before any
    profiling. Counts come back as ints, sorted, then the fractions as given; a fraction
    becomes a count per kind when the plans are made (of that kind's candidate blocks)."""
    from entrodrop_fast.prune.ranking import DROP_FORMS, parse_drop

    items = list(dict.fromkeys(s.strip() for s in str(spec).split(",") if s.strip()))
    if not items:
        raise ValueError(
            f"{setting('drop')} names no count: give comma-separated values, each {DROP_FORMS}; "
            f"got {spec!r}"
        )
    counts, fractions = set(), []
    for item in items:
        try:
            form, v = parse_drop(item)
        except ValueError as exc:
            raise ValueError(f"{setting('drop')} {item!r}: {exc}") from None
        if form == "count":
            counts.add(v)
        else:
            fractions.append(item)
    return sorted(counts) + fractions


def drop_advice() -> str:
    """What the error of a too large drop in a comparison tells the user to do."""
    return (
        f"lower {setting('drop')} (compare protects the default layers: those where the stream "
        "entropy still falls, and the last one)"
    )


def random_plan(
    report: dict, kind: str, k, seed: int = 0, protected: list[int] | None = None
) -> dict:
    """K blocks of ``kind`` drawn uniformly among the unprotected ones (same protection as the
    others: ``protected``, default the report's default rule). ``k``: a count, or a fraction /
    percentage of those candidates (as in ``rank --drop``)."""
    from entrodrop_fast.prune.ranking import default_protected, is_dropped, parse_count

    L = int(report["model"]["num_layers"])
    if protected is None:
        protected, _ = default_protected(report)
    gone = {b["layer"] for b in report["blocks"] if b["kind"] == kind and is_dropped(b)}
    free = [i for i in range(L) if i not in set(protected) and i not in gone]
    k = parse_count(k, len(free))
    if k > len(free):
        raise ValueError(
            f"random: cannot drop {k} {kind} blocks, only {len(free)} are candidates (protected "
            f"layers {protected}); {drop_advice()}"
        )
    chosen = sorted(random.Random(f"{seed}-{kind}-{k}").sample(free, k))
    return {
        "drop": {"attn": [], "mlp": [], "layer": [], kind: chosen},
        "method": "random",
        "kind": kind,
        "k": k,
        "protected": protected,
    }


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return max(-1.0, min(1.0, cov / (va * vb))) if va and vb else float("nan")


def _scores(report: dict, kind: str, method: str) -> list[float]:
    blocks = sorted((b for b in report["blocks"] if b["kind"] == kind), key=lambda b: b["layer"])
    if method in ("cosine", "block_influence"):
        return [b["cosine"]["mean"] for b in blocks]
    return [b["delta"][method]["mean"] for b in blocks]


def calibration_agreement(
    report_a: dict, report_b: dict, kind: str, method: str, counts: list[int], protect=(None, None)
) -> dict:
    """Spearman correlation of the per-block scores of ``method`` in two reports, over all
    blocks of ``kind`` (``spearman``) and over the droppable ones only (``spearman_droppable``:
    the layers neither report's rule protects, ``droppable`` of them; protected blocks, often
    the first and last layers with extreme scores, inflate the first), and the overlap of
    the K blocks each would drop. ``protect``: the protected layers used with each report
    (None: the report's default rule)."""
    from entrodrop_fast.prune.ranking import make_plan

    sa, sb = _scores(report_a, kind, method), _scores(report_b, kind, method)
    rho = spearman(sa, sb)
    overlap = {}
    protected: set[int] = set()
    for k in counts:
        advice = drop_advice()
        plan_a = make_plan(report_a, kind, k, method=method, advice=advice, protect=protect[0])
        try:
            plan_b = make_plan(report_b, kind, k, method=method, advice=advice, protect=protect[1])
        except ValueError as exc:  # K blocks are droppable in the first profile, not here
            overlap[str(k)] = {"error": f"second profile: {exc}", "of": plan_a["k"]}
            protected |= set(plan_a["protected"])
            continue
        protected |= set(plan_a["protected"]) | set(plan_b["protected"])
        pa, pb = set(plan_a["drop"][kind]), set(plan_b["drop"][kind])
        overlap[str(k)] = {
            "shared": len(pa & pb),
            "of": plan_a["k"],
            "a": sorted(pa),
            "b": sorted(pb),
        }
    layers = sorted(b["layer"] for b in report_a["blocks"] if b["kind"] == kind)
    free = [i for i, layer in enumerate(layers) if layer not in protected]
    rho_free = spearman([sa[i] for i in free], [sb[i] for i in free]) if counts else rho
    return {
        "kind": kind,
        "method": method,
        "spearman": rho,
        "spearman_droppable": rho_free,
        "droppable": len(free) if counts else len(layers),
        "overlap": overlap,
    }


def corpus_agreement(
    lm, comp: dict, corpus_b, *, kinds, methods, counts, **profiling: Any
) -> list[dict]:
    """Profile again on ``corpus_b`` and compare each scoring method's ranking with the one in
    ``comp["report"]`` (:func:`calibration_agreement`; block_influence on layers only; angular
    and random have no per-block ranking). Protection: the comparison's rule, on each report.
    The second profile is kept in ``comp["calibration_report"]``.

    ``profiling``: the profile's settings as :func:`profile_report` takes them, those of the
    comparison (``samples``, ``seq_len`` and ``seed`` required; ``bins``, ``k``,
    ``batch_size``; ``progress``, default False)."""
    proto = comp.get("protocol") or {}
    scoring = _scoring_methods([m for m in methods if m != "angular"])
    s1 = proto.get("stage1_method")
    if s1 and s1 not in scoring:
        scoring.insert(0, s1)
    other = profile_report(lm, corpus_b, methods=scoring, **{"progress": False, **profiling})
    comp["calibration_report"] = other  # the second profile, for later questions
    return agreement_with(comp, other, kinds=kinds, methods=methods, counts=counts)


def agreement_with(comp: dict, other: dict, *, kinds, methods, counts) -> list[dict]:
    """:func:`calibration_agreement` of every scoring method (block_influence on layers only;
    angular and random have no per-block ranking) between ``comp["report"]`` and another
    profile ``other``, each protected by ``comp``'s rule."""
    from entrodrop_fast.prune.ranking import protected_by_rule

    proto = comp.get("protocol") or {}
    rule, s1 = proto.get("protect_rule", "per-method"), proto.get("stage1_method")

    def protected(report: dict, method: str) -> list[int] | None:
        """The comparison's protected layers in ``report`` (None: ``method``'s own default)."""
        if rule == "per-method":
            return None
        return protected_by_rule(report, rule, method=method, stage1_method=s1)[0]

    out = []
    for kind in kinds:
        for m in methods:
            if m in ("random", "angular") or (m == "block_influence" and kind != "layer"):
                continue
            pm = "cosine" if m == "block_influence" else m
            out.append(
                calibration_agreement(
                    comp["report"],
                    other,
                    kind,
                    pm,
                    list(counts),
                    protect=(protected(comp["report"], pm), protected(other, pm)),
                )
                | {"method": m}
            )
    return out


def _quality(ev: dict) -> dict:
    return {
        "perplexity": ev["perplexity"]["perplexity"],
        **{z["task"]: z["accuracy"] for z in ev["zero_shot"]},
    }


def _intervals(ev: dict) -> dict:
    """95% intervals of an evaluation: perplexity (from the per-window NLL), each task (Wilson)."""
    out = {"perplexity": ev["perplexity"].get("ci95")}
    out.update({z["task"]: z.get("ci95") for z in ev["zero_shot"]})
    return out


def retained_tasks(dense: dict) -> tuple[list[str], list[str]]:
    """(tasks '% retained' is defined over: dense accuracy > 0, tasks left out: dense
    accuracy 0)."""
    tasks = [t for t in dense if t not in NOT_TASKS]
    return [t for t in tasks if dense[t] > 0], [t for t in tasks if not dense[t] > 0]


NOT_TASKS = ("perplexity", "params", "speed", "ci95")


def retained(q: dict, dense: dict) -> float | None:
    """Mean over the zero-shot tasks of accuracy / dense accuracy (the paper's '% retained'),
    over the tasks whose dense accuracy is > 0 (a ratio to 0 is undefined); None (JSON null)
    when there is none: the table says so (:func:`retained_note`), perplexity still compares."""
    tasks, _ = retained_tasks(dense)
    return sum(q[t] / dense[t] for t in tasks) / len(tasks) if tasks else None


def retained_note(dense: dict) -> str:
    """The table note: which tasks '% of dense retained' averages over, which it leaves out."""
    kept, left_out = retained_tasks(dense)
    if not kept:
        return (
            "% of dense retained: undefined (-): the dense model scores 0 on every zero-shot "
            f"task ({', '.join(left_out) or 'none'}); compare by perplexity, or raise "
            f"{setting('items', python='eval_items')}."
        )
    note = f"% of dense retained: mean of accuracy / dense accuracy over {', '.join(kept)}"
    if left_out:
        note += f"; left out (dense accuracy 0, ratio undefined): {', '.join(left_out)}"
    return note + "."


def profile_report(
    lm,
    corpus,
    *,
    samples: int,
    seq_len: int,
    seed: int,
    methods,
    batch_size: int = 8,
    progress: bool = True,
    bins: int = 20,
    k: int = 25,
    spans=None,
    windows_out: list | None = None,
) -> dict:
    """Profile on the calibration part of ``corpus`` (held-out documents excluded), through
    :func:`entrodrop_fast.profile.pipeline.profile_model`. ``windows_out``: a list that
    receives the calibration windows (for iterative re-scoring)."""
    from entrodrop_fast.data import Corpus, load_corpus
    from entrodrop_fast.profile.inmemory import DEFAULT_SPANS, ProfileSettings
    from entrodrop_fast.profile.pipeline import Calibration, profile_model

    c = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    settings = ProfileSettings(
        methods=tuple(methods),
        batch_size=batch_size,
        bins=bins,
        k=k,
        spans=tuple(spans) if spans else DEFAULT_SPANS,
    )
    calibration = Calibration(corpus=c, samples=samples, seq_len=seq_len, seed=seed)
    return profile_model(
        lm, settings, calibration=calibration, progress=progress, windows_out=windows_out
    )


def heldout_text(corpora) -> list[str]:
    """The held-out documents of each corpus (:func:`entrodrop_fast.data.split_documents`),
    joined in order: the evaluation text of :func:`compare`."""
    from entrodrop_fast.data import load_corpus, split_documents

    held: list[str] = []
    for x in corpora:
        held += split_documents(load_corpus(x).documents)[1]
    return held


def drop_key(drop: dict) -> str:
    """A canonical key of a drop set (the cache of evaluations): 'attn:3,5|layer:' style."""
    return "|".join(
        f"{kind}:{','.join(map(str, sorted(drop.get(kind) or [])))}"
        for kind in ("attn", "mlp", "layer")
    )


def _scoring_methods(methods) -> list[str]:
    """The methods a profile must run for ``methods`` (block_influence is cosine on layers)."""
    out = []
    for m in methods:
        m = {"block_influence": "cosine", "random": None}.get(m, m)
        if m is not None and m not in out:
            out.append(m)
    return out


def best_entropy_method(rows: list[dict], kind: str) -> str | None:
    """The entropy method whose one-shot rows of ``kind`` keep most quality: the highest mean
    '% retained' over K (ties, or no retained: the lowest mean log-perplexity). None without any."""
    from entrodrop_fast.profile.inmemory import ENTROPY_METHODS

    cands = {}
    for r in rows:
        if (
            r["kind"] == kind
            and r["method"] in ENTROPY_METHODS
            and r.get("setting", "one-shot") == "one-shot"
        ):
            cands.setdefault(r["method"], []).append(r)
    if not cands:
        return None

    def key(m):
        rs = cands[m]
        ret = [r["retained"] for r in rs if isinstance(r.get("retained"), (int, float))]
        lp = sum(math.log(r["perplexity"]) for r in rs) / len(rs)
        return (-(sum(ret) / len(ret)) if ret else 0.0, lp)

    return min(sorted(cands), key=key)


def paired_tests(
    rows: list[dict], evaluations: dict, kinds, *, against: str = "cosine"
) -> list[dict]:
    """At each (kind, K): the best entropy method (:func:`best_entropy_method`) against
    ``against`` on the same items: exact McNemar on the zero-shot items of every task pooled,
    and the paired per-window NLL difference (best - against) with its 95% interval."""
    from entrodrop_fast.evaluate.paired import mcnemar_exact, paired_mean_diff

    out = []
    for kind in kinds:
        best = best_entropy_method(rows, kind)
        if best is None:
            continue
        one = lambda m, kk, kind=kind: next(
            (
                r
                for r in rows
                if r["kind"] == kind
                and r["method"] == m
                and r["k"] == kk
                and r.get("setting", "one-shot") == "one-shot"
            ),
            None,
        )  # noqa: E731
        for k in sorted({r["k"] for r in rows if r["kind"] == kind and r["method"] == best}):
            a, b = one(best, k), one(against, k)
            if a is None or b is None:
                continue
            ea, eb = evaluations[a["eval_key"]], evaluations[b["eval_key"]]
            tasks = [t for t in ea["correct"] if t in eb["correct"]]
            ia = [v for t in tasks for v in ea["correct"][t]]
            ib = [v for t in tasks for v in eb["correct"][t]]
            test = {
                "kind": kind,
                "k": k,
                "a": best,
                "b": against,
                "same_blocks": a["eval_key"] == b["eval_key"],
                "tasks": tasks,
            }
            test["mcnemar"] = mcnemar_exact(ia, ib) if ia else None
            test["nll_diff"] = paired_mean_diff(ea["window_nll"], eb["window_nll"])
            out.append(test)
    return out


def _row_head(kind: str, method: str, mode: str = "one-shot", **extra: Any) -> dict:
    """The first entries of a row of :func:`compare`: which blocks, by which method, in which
    setting (``mode``: one-shot or iterative)."""
    return {"kind": kind, "method": method, "setting": mode, **extra}


def compare(
    lm,
    *,
    kinds=("attn",),
    counts=(2, 4, 6, 8),
    methods=("bucket", "cosine", "random"),
    corpus=None,
    samples: int = 128,
    seq_len: int = 256,
    seed: int = 2024,
    eval_windows: int = 32,
    eval_items: int = 100,
    speed: bool = True,
    progress: bool = True,
    log=print,
    protect_rule: str = "shared",
    stage1_method: str | None = None,
    random_seeds=(0, 1, 2),
    iterative=(),
    iterative_samples: int | None = None,
    bins: int = 20,
    k: int = 25,
    batch_size: int = 8,
    report: dict | None = None,
    eval_cache: dict | None = None,
    eval_corpora=None,
) -> dict:
    """Profile once, prune each (method, K), evaluate; returns the comparison dict.

    ``methods``: entropy estimators (:data:`entrodrop_fast.profile.inmemory.ENTROPY_METHODS`),
    ``cosine`` (LLM-Drop), ``block_influence`` (ShortGPT: cosine on whole layers; layer rows only),
    ``angular`` (PruneMe: the best span of K consecutive layers; layer rows, integer K only),
    ``random`` (one row per seed of ``random_seeds``). ``protect_rule`` (the same for every
    method, :func:`entrodrop_fast.prune.ranking.protected_by_rule`): ``"shared"`` (stage 1 from the
    stream entropy of ``stage1_method``, default the first entropy method, + the last layer),
    ``"paper"`` (layers 0, 1 and the last) or ``"per-method"`` (each method's own profile).
    ``iterative``: methods also run with iterative re-scoring (drop one, re-profile on
    ``iterative_samples`` windows), rows with ``setting="iterative"``. Evaluations are cached
    by drop set: methods that pick the same blocks are evaluated once. Rows carry 95%
    intervals; ``paired`` holds the tests of the best entropy method against cosine.
    ``report``: a profile of this model and corpus made with these settings (by an earlier
    call: ``result["report"]``), used instead of profiling again; ``eval_cache``: a dict
    shared between calls on the same model and evaluation settings (drop-set key ->
    evaluation), so a second protection rule re-evaluates only the drop sets that changed.
    ``eval_corpora``: corpora whose held-out parts are the evaluation text, joined in order
    (default: ``corpus`` alone); each one's calibration part is never evaluated on, so a
    second calibration corpus can lend its held-out fifth for more perplexity tokens and
    zero-shot items.
    """
    from tqdm.auto import tqdm

    from entrodrop_fast.data import load_corpus
    from entrodrop_fast.evaluate import heldout as E
    from entrodrop_fast.profile.inmemory import ENTROPY_METHODS, ProfileSettings
    from entrodrop_fast.prune.ranking import (
        PROTECT_RULES,
        iterative_plan,
        make_plan,
        protected_by_rule,
    )
    from entrodrop_fast.prune.surgery import count_params, drop_blocks_

    if protect_rule not in PROTECT_RULES:
        raise ValueError(
            f"protect rule must be one of {', '.join(PROTECT_RULES)}, got {protect_rule!r}"
        )
    for m in iterative:
        if m not in methods or m in ("random", "angular"):
            raise ValueError(
                f"iterative re-scoring of {m!r}: give a scoring method that is also in methods "
                "(not random / angular)"
            )
    if "random" in methods and not random_seeds:
        raise ValueError("random needs at least one seed")
    c = load_corpus(corpus)
    held = heldout_text(eval_corpora if eval_corpora else [c])
    ent = [m for m in methods if m in ENTROPY_METHODS]
    stage1_method = stage1_method or (ent[0] if ent else "bucket")
    if stage1_method not in ENTROPY_METHODS:
        raise ValueError(
            f"stage1 method must be an entropy method ({', '.join(ENTROPY_METHODS)}), got "
            f"{stage1_method!r}"
        )
    scoring = _scoring_methods(methods)
    if stage1_method not in scoring:
        scoring.insert(0, stage1_method)  # the shared protection's profile
    int_counts = [kk for kk in counts if isinstance(kk, int)]
    spans = tuple(int_counts) if "angular" in methods else None
    if "angular" in methods and not spans:
        raise ValueError(
            f"angular scores spans of K whole layers: give integer {setting('drop')} counts"
        )
    windows_box: list = []
    if report is None:
        log(f"profiling once with {', '.join(scoring)} ({samples} x {seq_len} tokens) ...")
        report = profile_report(
            lm,
            c,
            samples=samples,
            seq_len=seq_len,
            seed=seed,
            methods=scoring,
            progress=progress,
            bins=bins,
            k=k,
            spans=spans,
            batch_size=batch_size,
            windows_out=windows_box,
        )
    else:
        from entrodrop_fast.data import calibration_windows

        missing = [
            m
            for m in scoring
            if m not in report.get("entropy", {}) and m != "cosine" and m != "angular"
        ]
        if missing:
            raise ValueError(
                f"the given report has no {', '.join(missing)} profile; profile with those methods"
            )
        windows_box.append(
            calibration_windows(lm.tokenizer, c, samples=samples, seq_len=seq_len, seed=seed)[0]
        )

    def protection(method: str):
        if protect_rule == "per-method":
            m = {"block_influence": "cosine", "random": None, "angular": None}.get(method, method)
            return protected_by_rule(report, "per-method", method=m)
        return protected_by_rule(report, protect_rule, stage1_method=stage1_method)

    evaluations: dict[str, dict] = {} if eval_cache is None else eval_cache

    def evaluate(model, key: str) -> dict:
        if key not in evaluations:
            ppl = E.perplexity(model, lm.tokenizer, held, seq_len=seq_len, max_windows=eval_windows)
            zs = E.zero_shot(model, lm.tokenizer, held, items=eval_items)
            evaluations[key] = {
                "perplexity": ppl,
                "zero_shot": zs,
                "window_nll": ppl["window_nll"],
                "correct": {z["task"]: z["correct"] for z in zs},
                "params": count_params(model),
            }
        return evaluations[key]

    dense_key = drop_key({})
    if dense_key not in evaluations:
        log("evaluating the dense model ...")
    dense_ev = evaluate(lm.model, dense_key)
    dense_q = _quality(dense_ev)
    dense_speed = (
        E.speed(lm.model, lm.tokenizer, prompt_len=128, new_tokens=16, repeats=2) if speed else None
    )
    if retained(dense_q, dense_q) is None:
        log(retained_note(dense_q))

    # every plan first (cheap), then one evaluation per distinct drop set
    plans: list[tuple[dict, dict]] = []  # (row head, plan)
    skipped = []
    for kind in kinds:
        for m in methods:
            if m in ("block_influence", "angular") and kind != "layer":
                skipped.append(f"{m} on {kind} (it scores whole layers)")
                continue
            prot, why = protection(m)
            for kk in counts:
                if m == "angular" and not isinstance(kk, int):
                    skipped.append(
                        f"angular at {setting('drop')} {kk} (a span length must be a count)"
                    )
                    continue
                if m == "random":
                    for s in random_seeds:
                        plan = random_plan(report, kind, kk, seed=s, protected=prot)
                        plans.append((_row_head(kind, "random", seed=s, protected=prot), plan))
                    continue
                plan = make_plan(report, kind, kk, method=m, protect=prot, advice=drop_advice())
                if m == "angular":
                    plan["k"] = len(plan["drop"]["layer"])
                plans.append((_row_head(kind, m, protected=prot, protect_reason=why), plan))
        for m in iterative:
            if m == "block_influence" and kind != "layer":
                continue
            if not int_counts:
                skipped.append(f"iterative {m} (needs integer counts)")
                continue
            prot, why = protection(m)
            kmax = max(int_counts)
            log(f"iterative re-scoring: {m}, {kind}, up to K = {kmax} ...")
            settings = ProfileSettings(
                methods=tuple(_scoring_methods([m])), batch_size=batch_size, bins=bins, k=k
            )
            wins = windows_box[0][: iterative_samples or samples]
            it = iterative_plan(
                copy.deepcopy(lm.model), wins, kind, kmax, method=m, protect=prot, settings=settings
            )
            order = [st["layer"] for st in it["steps"]]
            for kk in int_counts:
                plan = {
                    "drop": {"attn": [], "mlp": [], "layer": [], kind: sorted(order[:kk])},
                    "k": kk,
                    "kind": kind,
                }
                first = _row_head(
                    kind, m, "iterative", protected=prot, protect_reason=why, steps=it["steps"][:kk]
                )
                plans.append((first, plan))
    for note in dict.fromkeys(skipped):
        log(f"skipped: {note}")

    rows = []
    timed: set = set()
    for head, plan in tqdm(plans, desc="compare", disable=not progress):
        key = drop_key(plan["drop"])
        cached = key in evaluations
        pruned = None
        if not cached or (speed and (head["kind"], plan["k"]) not in timed):
            pruned = copy.deepcopy(lm.model)
            drop_blocks_(pruned, plan)
        ev = evaluate(pruned, key)
        q = _quality(ev)
        row = {
            **head,
            "k": plan["k"],
            **(
                {"requested_drop": plan.get("requested_drop")}
                if isinstance(plan.get("requested_drop"), str)
                else {}
            ),
            "dropped": plan["drop"][head["kind"]],
            "eval_key": key,
            "cached": cached,
            "params": ev["params"],
            **q,
            "ci95": _intervals(ev),
            "retained": retained(q, dense_q),
        }
        # the pruned structure, hence the speed, depends on (kind, K), not on the method
        if speed and (head["kind"], plan["k"]) not in timed:
            row["speed"] = E.speed(pruned, lm.tokenizer, prompt_len=128, new_tokens=16, repeats=2)
            timed.add((head["kind"], plan["k"]))
        rows.append(row)
        del pruned
    log(
        f"{len(rows)} rows, {len({r['eval_key'] for r in rows})} distinct pruned models "
        f"({sum(not r['cached'] for r in rows)} evaluated in this call)"
    )
    return {
        "model": report["model"],
        "data": {
            "calibration": report["data"],
            "heldout_documents": len(held),
            "eval_windows": eval_windows,
            "eval_items": eval_items,
            "seq_len": seq_len,
            "eval_corpora": [load_corpus(x).name for x in eval_corpora]
            if eval_corpora
            else [c.name],
        },
        "protocol": {
            "protect_rule": protect_rule,
            "stage1_method": stage1_method if protect_rule == "shared" else None,
            "random_seeds": list(random_seeds) if "random" in methods else [],
            "iterative": list(iterative),
            "iterative_samples": (iterative_samples or samples) if iterative else None,
            "bins": bins,
            "k": k,
            "skipped": list(dict.fromkeys(skipped)),
        },
        "dense": {
            **dense_q,
            "ci95": _intervals(dense_ev),
            "params": count_params(lm.model),
            **({"speed": dense_speed} if speed else {}),
        },
        "rows": rows,
        "paired": paired_tests(rows, evaluations, kinds),
        "evaluations": {
            key: {"window_nll": e["window_nll"], "correct": e["correct"]}
            for key, e in evaluations.items()
            if key == dense_key or key in {r["eval_key"] for r in rows}
        },
        "report": report,
    }


def _ci(v, ci, fmt: str) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    s = format(v, fmt)
    if ci and all(isinstance(x, (int, float)) and math.isfinite(x) for x in ci):
        s += f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"
    return s


def _ppl_fmt(v) -> str:
    return ".3g" if isinstance(v, (int, float)) and v >= 1000 else ".2f"


def random_summary(rows: list[dict]) -> list[dict]:
    """Per (kind, K): the mean and spread (min, max, standard deviation) over the random seeds."""
    out = []
    groups: dict = {}
    for r in rows:
        if r["method"] == "random":
            groups.setdefault((r["kind"], r["k"]), []).append(r)
    for (kind, k), rs in groups.items():

        def stat(vals):
            vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
            if not vals:
                return None
            m = sum(vals) / len(vals)
            sd = (
                math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
                if len(vals) > 1
                else 0.0
            )
            return {"mean": m, "sd": sd, "min": min(vals), "max": max(vals)}

        out.append(
            {
                "kind": kind,
                "k": k,
                "seeds": len(rs),
                "perplexity": stat([r["perplexity"] for r in rs]),
                "retained": stat([r.get("retained") for r in rs]),
            }
        )
    return out


def _table_head(title: str, columns: list[str]) -> list[str]:
    """The lines that open a titled table of the markdown: blank, title, blank, header, rule."""
    return ["", title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _corpus_identity(c) -> object:
    """What a corpus argument names, for spotting the same corpus given twice: None and
    "builtin" alike, a path by its resolved location, a Corpus object by itself."""
    if c is None:
        return "builtin"
    if isinstance(c, str):
        p = Path(c).expanduser()
        return str(p.resolve()) if p.exists() else c.strip()
    return id(c)


def check_protocol(
    methods,
    counts,
    calib=(None,),
    *,
    preset: str | None = None,
    protect_rule: str | None = None,
    stage1_method: str | None = None,
) -> None:
    """Refuse a comparison that cannot run as asked, before any model loads: ValueError naming
    the setting (its Python keyword, or inside ``entrodrop compare`` its flag)."""
    if stage1_method is not None and stage1_method not in ENTROPY:
        raise ValueError(
            f"{setting('stage1_method')} must be an entropy method ({', '.join(ENTROPY)}), "
            f"got {stage1_method!r}"
        )
    if preset and protect_rule not in (None, "paper"):
        raise ValueError(
            f"{setting('preset')} paper protects layers 0, 1 and the last; it contradicts "
            f"{setting('protect_rule')} {protect_rule}"
        )
    if "angular" in methods and not any(isinstance(c, int) for c in counts):
        raise ValueError(
            f"{setting('methods')} angular scores spans of K whole layers: give integer "
            f"{setting('drop')} counts"
        )
    if len(calib) > 2:
        raise ValueError(f"{setting('calib')} can be given at most twice")
    if any(isinstance(c, str) and not c.strip() for c in calib):
        raise ValueError(
            f"{setting('calib')} '' names no corpus: give 'builtin', 'stdlib-docs', a file or "
            "a directory"
        )
    if len(calib) == 2:
        a, b = (_corpus_identity(c) for c in calib)
        if a == b:
            raise ValueError(
                f"{setting('calib')} names the same corpus twice ({calib[0] or 'builtin'}): the "
                "calibration comparison profiles two different corpora, e.g. "
                f"{setting('calib')} builtin {setting('calib')} stdlib-docs"
            )
    if len(calib) == 2 and set(methods) <= {"random", "angular"}:
        raise ValueError(
            f"two {setting('calib')} corpora compare the per-block rankings of scoring methods, "
            f"and {' and '.join(sorted(set(methods)))} have none; add one to "
            f"{setting('methods')} (e.g. bucket,random)"
        )


def compare_model(
    source=None,
    *,
    kinds=("attn",),
    counts=(2, 4, 6, 8),
    methods=("bucket", "cosine", "random"),
    calib=(None,),
    dtype: str = "fp32",
    device: str | None = None,
    preset: str | None = None,
    protect_rule: str | None = None,
    stage1_method: str | None = None,
    bins: int = 20,
    k: int = 25,
    batch_size: int = 8,
    log=print,
    **protocol: Any,
) -> dict:
    """The whole comparison from a model source: load the model and the calibration corpora
    (``calib``: one, or two to compare the rankings they give), check there is text enough for
    every step before the first forward pass, apply ``preset`` ("paper": the paper's estimator
    settings and its fixed protection of layers 0, 1 and the last), then :func:`compare` and,
    with two corpora, :func:`corpus_agreement` (in ``"calibration_agreement"``).

    ``source``: what :func:`entrodrop_fast.models.load_model` takes (None: the built-in
    SmolLM2-135M-Instruct). ``protocol``: the other keywords of :func:`compare` (samples,
    seq_len, seed, eval_windows, eval_items, speed, random_seeds, iterative, ...). Returns the
    comparison dict; writes nothing. Raises ValueError (:func:`check_protocol`), CorpusError
    when a corpus is unreadable or too short, ModelLoadError when the model cannot be loaded.
    """
    from entrodrop_fast.data import calibration_windows, load_corpus
    from entrodrop_fast.evaluate.heldout import heldout_documents
    from entrodrop_fast.models import load_model

    calib = list(calib) or [None]
    check_protocol(
        methods,
        counts,
        calib,
        preset=preset,
        protect_rule=protect_rule,
        stage1_method=stage1_method,
    )
    samples = protocol.get("samples", 128)
    seq_len = protocol.get("seq_len", 256)
    seed = protocol.get("seed", 2024)
    # unreadable, empty or binary corpora stop the run here
    corpora = [load_corpus(c) for c in calib]
    lm = load_model(source, dtype=dtype, device=device)
    # enough text for every step, checked before the first forward pass
    heldout_documents(corpora[0], lm.tokenizer, seq_len=seq_len)
    for c in corpora:
        calibration_windows(lm.tokenizer, c, samples=samples, seq_len=seq_len, seed=seed)
    rule = protect_rule or "shared"
    if preset:
        from entrodrop_fast.profile.presets import check_preset, preset_for_model

        check_preset(preset)
        pre = preset_for_model(lm.model.config, device or "cpu")
        bins, k, batch_size, rule = pre["bins"], pre["k"], pre["batch_size"], "paper"
        log(f"{setting('preset')} paper: {pre['why']}")
    comp = compare(
        lm,
        kinds=kinds,
        counts=counts,
        methods=methods,
        corpus=corpora[0],
        log=log,
        protect_rule=rule,
        stage1_method=stage1_method,
        bins=bins,
        k=k,
        batch_size=batch_size,
        **protocol,
    )
    if preset:
        comp["protocol"]["preset"] = "paper"
    if len(calib) == 2:
        log(f"profiling again on {calib[1]} for the calibration comparison ...")
        comp["calibration_agreement"] = corpus_agreement(
            lm,
            comp,
            corpora[1],
            kinds=kinds,
            methods=methods,
            counts=counts,
            samples=samples,
            seq_len=seq_len,
            seed=seed,
            bins=bins,
            k=k,
            batch_size=batch_size,
            progress=protocol.get("progress", True),
        )
        comp["calibration"] = {"a": calib[0] or "builtin", "b": calib[1]}
    return comp


def markdown(comp: dict) -> str:
    d = comp["dense"]
    tasks = [t for t in d if t not in NOT_TASKS]
    dci = d.get("ci95") or {}
    lines = [
        f"Dense: perplexity {_ci(d['perplexity'], dci.get('perplexity'), '.2f')}, "
        + ", ".join(f"{t} {_ci(d[t], dci.get(t), '.3f')}" for t in tasks)
        + f", {d['params'] / 1e6:.1f} M parameters.",
        "",
    ]
    proto = comp.get("protocol")
    if proto:
        rule = {
            "shared": (
                f"shared: stage 1 detected once from the {proto.get('stage1_method')} stream "
                "entropy, plus the last layer, for every method"
            ),
            "paper": "paper: layers 0, 1 and the last, fixed, for every method",
            "per-method": (
                "per method: stage 1 from each method's own profile (cosine/random: the first "
                "entropy method's), plus the last layer"
            ),
        }[proto["protect_rule"]]
        lines += [
            f"Protection: {rule}. Intervals: 95% (perplexity: from the per-window NLL; accuracy: "
            "Wilson).",
            "",
        ]
    head = (
        "| kind | method | K | dropped (0-based) | perplexity [95%] | "
        + " | ".join(f"{t} [95%]" for t in tasks)
        + " | % of dense retained |"
    )
    lines += [head, "|" + "---|" * (5 + len(tasks) + 1)]
    for r in comp["rows"]:
        ci = r.get("ci95") or {}
        name = (
            r["method"]
            + (" (iterative)" if r.get("setting") == "iterative" else "")
            + (f" seed {r['seed']}" if r["method"] == "random" and "seed" in r else "")
        )
        lines.append(
            f"| {r['kind']} | {name} | {r['k']} | {','.join(map(str, r['dropped']))} | "
            f"{_ci(r['perplexity'], ci.get('perplexity'), _ppl_fmt(r['perplexity']))} | "
            + " | ".join(_ci(r[t], ci.get(t), ".3f") for t in tasks)
            + (
                f" | {100 * r['retained']:.1f} |"
                if isinstance(r.get("retained"), (int, float)) and math.isfinite(r["retained"])
                else " | - |"
            )
        )
    lines += ["", retained_note(d)]
    rs = random_summary(comp["rows"])
    if rs and any(s["seeds"] > 1 for s in rs):
        lines += _table_head(
            "Random baseline over seeds (mean ± sd [min, max]):",
            ["kind", "K", "seeds", "perplexity", "% retained"],
        )
        for s in rs:
            p, t = s["perplexity"], s["retained"]
            ps = f"{p['mean']:.2f} ± {p['sd']:.2f} [{p['min']:.2f}, {p['max']:.2f}]" if p else "-"
            ts = (
                f"{100 * t['mean']:.1f} ± {100 * t['sd']:.1f} [{100 * t['min']:.1f}, "
                f"{100 * t['max']:.1f}]"
                if t
                else "-"
            )
            lines.append(f"| {s['kind']} | {s['k']} | {s['seeds']} | {ps} | {ts} |")
    if comp.get("paired"):
        lines += _table_head(
            "Paired tests on the same items (best entropy method vs cosine): exact McNemar on the "
            "zero-shot items of all tasks pooled; per-window NLL difference (negative: the entropy "
            "method's model predicts the held-out text better):",
            [
                "kind",
                "K",
                "entropy method",
                "vs",
                "right only A / only B",
                "accuracy diff",
                "McNemar p",
                "ΔNLL (A − B) [95%]",
            ],
        )
        for t in comp["paired"]:
            mc, nd = t.get("mcnemar"), t["nll_diff"]
            same = " (same blocks)" if t.get("same_blocks") else ""
            mcs = (
                f"{mc['a_only']} / {mc['b_only']} | {mc['diff']:+.3f} | {mc['p']:.3g}"
                if mc
                else "- | - | -"
            )
            lines.append(
                f"| {t['kind']} | {t['k']} | {t['a']}{same} | {t['b']} | {mcs} | {nd['mean']:+.4f} "
                + (f"[{nd['ci95'][0]:+.4f}, {nd['ci95'][1]:+.4f}] |" if nd["ci95"] else "|")
            )
    if "speed" in d:
        lines += _table_head(
            "Speed (one model per kind and K; timings vary between runs):",
            [
                "kind",
                "K",
                "prefill tok/s",
                "decode tok/s",
                "decode speed-up",
                "KV-cache bytes/token",
            ],
        )
        ds = d["speed"]
        lines.append(
            f"| dense | 0 | {ds['prefill_tokens_per_s']:.0f} | {ds['decode_tokens_per_s']:.1f} | "
            f"1.00 | {ds['kv_cache_bytes_per_token']:.0f} |"
        )
        for r in comp["rows"]:
            if "speed" in r:
                s = r["speed"]
                lines.append(
                    f"| {r['kind']} | {r['k']} | {s['prefill_tokens_per_s']:.0f} | "
                    f"{s['decode_tokens_per_s']:.1f} | "
                    f"{s['decode_tokens_per_s'] / ds['decode_tokens_per_s']:.2f} | "
                    f"{s['kv_cache_bytes_per_token']:.0f} |"
                )
    if comp.get("calibration_agreement"):
        cal = comp.get("calibration") or {}
        lines += ["", f"Calibration robustness ({cal.get('a', 'a')} vs {cal.get('b', 'b')}):", ""]
        for a in comp["calibration_agreement"]:
            ov = ", ".join(
                f"K={k}: not possible ({v['error']})"
                if "error" in v
                else f"K={k}: {v['shared']}/{v['of']}"
                for k, v in a["overlap"].items()
            )
            free = (
                f" ({a['spearman_droppable']:.3f} over the {a['droppable']} droppable blocks)"
                if "spearman_droppable" in a
                else ""
            )
            lines.append(
                f"- {a['kind']} / {a['method']}: Spearman {a['spearman']:.3f}{free}; overlap of "
                f"the dropped blocks {ov}"
            )
    return "\n".join(lines) + "\n"


def _same_as_cosine(rows: list[dict], kind: str) -> bool:
    """Whether block_influence's one-shot rows of ``kind`` dropped exactly cosine's blocks at
    every K."""
    pick = lambda m: {
        r["k"]: r["eval_key"]
        for r in rows
        if r["kind"] == kind and r["method"] == m and r.get("setting", "one-shot") == "one-shot"
    }  # noqa: E731
    bi, cos = pick("block_influence"), pick("cosine")
    return bool(bi) and bi == cos


def plot(comp: dict, path: Path) -> None:
    """Per kind: % retained and perplexity against K for every method (random: mean over seeds
    with its min-max band; entropy/cosine: 95% interval bars on perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in comp["rows"]})
    fig, axes = plt.subplots(
        2, max(1, len(kinds)), figsize=(5.5 * max(1, len(kinds)), 8), squeeze=False
    )
    num = lambda v: v if isinstance(v, (int, float)) and math.isfinite(v) else math.nan  # noqa: E731
    # one colour per method in every panel
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {
        m: palette[i % len(palette)]
        for i, m in enumerate(sorted({r["method"] for r in comp["rows"]}))
    }
    for col, kind in enumerate(kinds):
        ax_r, ax_p = axes[0][col], axes[1][col]
        labels = sorted(
            {(r["method"], r.get("setting", "one-shot")) for r in comp["rows"] if r["kind"] == kind}
        )
        same = _same_as_cosine(
            comp["rows"], kind
        )  # block_influence picked cosine's blocks: one line
        for m, mode in labels:
            if m == "block_influence" and same:
                continue
            rs = [
                r
                for r in comp["rows"]
                if r["kind"] == kind and r["method"] == m and r.get("setting", "one-shot") == mode
            ]
            ks = sorted({r["k"] for r in rs})
            label = ("cosine = block_influence" if m == "cosine" and same else m) + (
                " (iter.)" if mode == "iterative" else ""
            )
            style = "--" if m == "random" else (":" if mode == "iterative" else "-")
            ret = [[num(r.get("retained")) * 100 for r in rs if r["k"] == k] for k in ks]
            ppl = [[num(r["perplexity"]) for r in rs if r["k"] == k] for k in ks]
            mean = lambda vs: sum(vs) / len(vs)  # noqa: E731
            line = ax_r.plot(
                [0, *ks],
                [100.0] + [mean(v) for v in ret],
                marker="o",
                label=label,
                linestyle=style,
                color=colours[m],
            )[0]
            ax_p.plot(
                ks,
                [mean(v) for v in ppl],
                marker="o",
                label=label,
                linestyle=style,
                color=line.get_color(),
            )
            if m == "random" and any(len(v) > 1 for v in ret):
                for ax, vals in ((ax_r, ret), (ax_p, ppl)):
                    lo, hi = [min(v) for v in vals], [max(v) for v in vals]
                    ax.fill_between(ks, lo, hi, alpha=0.15, color=line.get_color())
            elif m != "random":
                cis = [
                    next((r.get("ci95") or {}).get("perplexity") for r in rs if r["k"] == k)
                    for k in ks
                ]
                if all(c for c in cis):
                    ys = [mean(v) for v in ppl]
                    ax_p.errorbar(
                        ks,
                        ys,
                        yerr=[
                            [max(0.0, y - c[0]) for y, c in zip(ys, cis, strict=True)],
                            [max(0.0, c[1] - y) for y, c in zip(ys, cis, strict=True)],
                        ],
                        fmt="none",
                        ecolor=line.get_color(),
                        alpha=0.5,
                    )
        ax_r.set_title(f"{kind} blocks dropped")
        ax_r.set_xlabel("blocks dropped (K)")
        ax_r.set_ylabel("zero-shot accuracy retained (% of dense)")
        ax_p.set_xlabel("blocks dropped (K)")
        ax_p.set_ylabel("perplexity (held-out; log scale)")
        ax_p.set_yscale("log")
        # integer K ticks, and half a block of room either side (one K alone would otherwise
        # get an axis of +-0.1 around it)
        all_k = sorted({r["k"] for r in comp["rows"] if r["kind"] == kind})
        for ax, ticks in ((ax_r, [0, *all_k]), (ax_p, all_k)):
            if ticks:
                ax.set_xticks(ticks)
                ax.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)
        for ax in (ax_r, ax_p):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    import textwrap

    # wrapped to the figure's width (one panel is 5.5 inches: about 60 characters a line)
    fig.suptitle(
        textwrap.fill(
            f"{comp['model'].get('name', '')}: quality kept by each pruning method",
            width=int(11 * 5.5 * max(1, len(kinds))),
        )
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    comp: dict, out_dir: str | os.PathLike, png: bool = True, overwrite: bool = False
) -> Path:
    """comparison.json / .md / .png into ``out_dir``, written in a temp dir and moved into place.

    ``out_dir`` may be new, empty or an earlier comparison; any other directory needs
    ``overwrite`` and keeps its other files (see :mod:`entrodrop_fast.outputs`).
    """
    from entrodrop_fast import outputs

    out = outputs.check_dir(out_dir, kind="comparison", what="comparison", overwrite=overwrite)
    with outputs.publish_dir(out, kind="comparison", what="comparison", overwrite=overwrite) as tmp:
        from entrodrop_fast.profile.report import json_safe

        (tmp / "comparison.json").write_text(
            json.dumps(json_safe(comp), indent=2, allow_nan=False)
        )  # NaN -> null
        (tmp / "comparison.md").write_text(markdown(comp))
        if png:
            plot(comp, tmp / "comparison.png")
    return out
