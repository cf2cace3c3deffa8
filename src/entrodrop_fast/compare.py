"""Comparison of pruning methods: how much quality each keeps at each number of blocks dropped.

:func:`compare` profiles a model once (every requested scoring method in one forward pass,
on the calibration part of the corpus), then for each method and each K builds the drop
plan (:func:`entrodrop_fast.ranking.make_plan`; ``random`` draws K unprotected blocks with
a fixed seed), prunes a copy of the model in memory (:func:`entrodrop_fast.surgery.drop_blocks_`),
and evaluates it on held-out text (:mod:`entrodrop_fast.evaluate`): perplexity and the
built-in zero-shot tasks. The quality table is deterministic (same command, same table);
speed (prefill/decode tokens/s, KV-cache bytes) is measured once per pruned model and
reported apart, since timings vary from run to run.

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

ENTROPY = ("bucket", "gaussian_diag", "gaussian_full", "knn", "renyi")
SCORING = (*ENTROPY, "cosine")
BASELINES = ("random",)


def parse_list(spec: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """``"a,b"`` -> ["a", "b"]: each in ``allowed``, duplicates dropped, at least one."""
    out = list(dict.fromkeys(s.strip() for s in str(spec).split(",") if s.strip()))
    bad = [s for s in out if s not in allowed]
    if bad:
        raise ValueError(f"{what}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
    if not out:
        raise ValueError(f"{what} is empty; choose from {', '.join(allowed)}")
    return out


def parse_counts(spec: str) -> list:
    """``"2,4,25%"`` -> [2, 4, "25%"]: each in a form ``rank --drop`` accepts (a count, a fraction
    in (0, 1), a percentage; :func:`entrodrop_fast.ranking.parse_drop`), checked before any
    profiling. Counts come back as ints, sorted, then the fractions as given; a fraction
    becomes a count per kind when the plans are made (of that kind's candidate blocks)."""
    from entrodrop_fast.ranking import DROP_FORMS, parse_drop

    items = list(dict.fromkeys(s.strip() for s in str(spec).split(",") if s.strip()))
    if not items:
        raise ValueError(f"--drop names no count: give comma-separated values, each {DROP_FORMS}; got {spec!r}")
    counts, fractions = set(), []
    for item in items:
        try:
            form, v = parse_drop(item)
        except ValueError as exc:
            raise ValueError(f"--drop {item!r}: {exc}") from None
        if form == "count":
            counts.add(v)
        else:
            fractions.append(item)
    return sorted(counts) + fractions


ADVICE = "lower --drop (compare protects the default layers: those where the stream entropy still falls, and the last one)"


def random_plan(report: dict, kind: str, k, seed: int = 0) -> dict:
    """K blocks of ``kind`` drawn uniformly among the unprotected ones (same protection as the others).
    ``k``: a count, or a fraction / percentage of those candidates (as in ``rank --drop``)."""
    from entrodrop_fast.ranking import default_protected, is_dropped, parse_count

    L = int(report["model"]["num_layers"])
    protected, _ = default_protected(report)
    gone = {b["layer"] for b in report["blocks"] if b["kind"] == kind and is_dropped(b)}
    free = [i for i in range(L) if i not in set(protected) and i not in gone]
    k = parse_count(k, len(free))
    if k > len(free):
        raise ValueError(f"random: cannot drop {k} {kind} blocks, only {len(free)} are candidates (protected layers {protected}); {ADVICE}")
    chosen = sorted(random.Random(f"{seed}-{kind}-{k}").sample(free, k))
    return {"drop": {"attn": [], "mlp": [], "layer": [], kind: chosen}, "method": "random", "kind": kind, "k": k, "protected": protected}


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
    return cov / (va * vb) if va and vb else float("nan")


def _scores(report: dict, kind: str, method: str) -> list[float]:
    blocks = sorted((b for b in report["blocks"] if b["kind"] == kind), key=lambda b: b["layer"])
    if method == "cosine":
        return [b["cosine"]["mean"] for b in blocks]
    return [b["delta"][method]["mean"] for b in blocks]


def calibration_agreement(report_a: dict, report_b: dict, kind: str, method: str, counts: list[int]) -> dict:
    from entrodrop_fast.ranking import make_plan

    rho = spearman(_scores(report_a, kind, method), _scores(report_b, kind, method))
    overlap = {}
    for k in counts:
        plan_a = make_plan(report_a, kind, k, method=method, advice=ADVICE)
        pa = set(plan_a["drop"][kind])
        pb = set(make_plan(report_b, kind, k, method=method, advice=ADVICE)["drop"][kind])
        overlap[str(k)] = {"shared": len(pa & pb), "of": plan_a["k"], "a": sorted(pa), "b": sorted(pb)}
    return {"kind": kind, "method": method, "spearman": rho, "overlap": overlap}


def _quality(ev: dict) -> dict:
    return {
        "perplexity": ev["perplexity"]["perplexity"],
        **{z["task"]: z["accuracy"] for z in ev["zero_shot"]},
    }


def retained_tasks(dense: dict) -> tuple[list[str], list[str]]:
    """(tasks '% retained' is defined over: dense accuracy > 0, tasks left out: dense accuracy 0)."""
    tasks = [t for t in dense if t not in ("perplexity", "params", "speed")]
    return [t for t in tasks if dense[t] > 0], [t for t in tasks if not dense[t] > 0]


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
            f"% of dense retained: undefined (-): the dense model scores 0 on every zero-shot task ({', '.join(left_out) or 'none'}); "
            "compare by perplexity, or raise --items."
        )
    note = f"% of dense retained: mean of accuracy / dense accuracy over {', '.join(kept)}"
    if left_out:
        note += f"; left out (dense accuracy 0, ratio undefined): {', '.join(left_out)}"
    return note + "."


def profile_report(lm, corpus, *, samples: int, seq_len: int, seed: int, methods, batch_size: int = 8, progress: bool = True) -> dict:
    """Profile on the calibration part of ``corpus`` (held-out documents excluded)."""
    from entrodrop_fast.data import Corpus, calibration_windows, load_corpus
    from entrodrop_fast.report import build_report
    from entrodrop_fast.runner import ProfileSettings, profile

    c = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    windows, data_info = calibration_windows(lm.tokenizer, c, samples=samples, seq_len=seq_len, seed=seed)  # held-out part excluded
    settings = ProfileSettings(methods=tuple(methods), batch_size=batch_size)
    result = profile(lm.model, windows, settings, progress=progress)
    info = {"name": lm.name, "source": lm.source, "path": lm.path, "kind": lm.kind}
    return build_report(result, model_info=info, data_info=data_info, settings={"samples": samples, "seq_len": seq_len, "seed": seed, "batch_size": batch_size}, model=lm.model)


def compare(lm, *, kinds=("attn",), counts=(2, 4, 6, 8), methods=("bucket", "cosine", "random"), corpus=None, samples: int = 128, seq_len: int = 256, seed: int = 2024, eval_windows: int = 32, eval_items: int = 100, speed: bool = True, progress: bool = True, log=print) -> dict:
    """Profile once, prune each (method, K), evaluate; returns the comparison dict."""
    from tqdm.auto import tqdm

    from entrodrop_fast import evaluate as E
    from entrodrop_fast.data import load_corpus
    from entrodrop_fast.ranking import make_plan
    from entrodrop_fast.surgery import count_params, drop_blocks_

    c = load_corpus(corpus)
    _, held = E.split_documents(c.documents)
    # random alone still needs a profile: the protected layers it never draws come from it
    scoring = [m for m in methods if m != "random"] or ["bucket"]
    log(f"profiling once with {', '.join(scoring)} ({samples} x {seq_len} tokens) ...")
    report = profile_report(lm, c, samples=samples, seq_len=seq_len, seed=seed, methods=scoring, progress=progress)

    def evaluate(model, timed: bool) -> dict:
        ev = {"perplexity": E.perplexity(model, lm.tokenizer, held, seq_len=seq_len, max_windows=eval_windows), "zero_shot": E.zero_shot(model, lm.tokenizer, held, items=eval_items)}
        if timed:
            ev["speed"] = E.speed(model, lm.tokenizer, prompt_len=128, new_tokens=16, repeats=2)
        return ev

    log("evaluating the dense model ...")
    dense_ev = evaluate(lm.model, speed)
    dense_q = _quality(dense_ev)
    if retained(dense_q, dense_q) is None:
        log(retained_note(dense_q))
    rows = []
    jobs = [(kind, m, k) for kind in kinds for m in methods for k in counts]
    for kind, m, k in tqdm(jobs, desc="compare", disable=not progress):
        plan = random_plan(report, kind, k) if m == "random" else make_plan(report, kind, k, method=m, advice=ADVICE)
        pruned = copy.deepcopy(lm.model)
        drop_blocks_(pruned, plan)
        # the pruned structure, hence the speed, depends on (kind, K), not on the method:
        # time the first method's model of each (kind, K) only
        timed = speed and m == methods[0]
        ev = evaluate(pruned, timed)
        q = _quality(ev)
        row = {"kind": kind, "method": m, "k": plan["k"], **({"requested_drop": k} if isinstance(k, str) else {}), "dropped": plan["drop"][kind], "params": count_params(pruned), **q, "retained": retained(q, dense_q)}
        if timed:
            row["speed"] = ev["speed"]
        rows.append(row)
        del pruned
    return {
        "model": report["model"],
        "data": {"calibration": report["data"], "heldout_documents": len(held), "eval_windows": eval_windows, "eval_items": eval_items, "seq_len": seq_len},
        "dense": {**dense_q, "params": count_params(lm.model), **({"speed": dense_ev["speed"]} if speed else {})},
        "rows": rows,
        "report": report,
    }


def markdown(comp: dict) -> str:
    d = comp["dense"]
    tasks = [t for t in d if t not in ("perplexity", "params", "speed")]
    lines = [f"Dense: perplexity {d['perplexity']:.2f}, " + ", ".join(f"{t} {d[t]:.3f}" for t in tasks) + f", {d['params'] / 1e6:.1f} M parameters.", ""]
    head = "| kind | method | K | dropped (0-based) | perplexity | " + " | ".join(tasks) + " | % of dense retained |"
    lines += [head, "|" + "---|" * (5 + len(tasks) + 1)]
    for r in comp["rows"]:
        lines.append(f"| {r['kind']} | {r['method']} | {r['k']} | {','.join(map(str, r['dropped']))} | {r['perplexity']:.2f} | " + " | ".join(f"{r[t]:.3f}" for t in tasks) + (f" | {100 * r['retained']:.1f} |" if isinstance(r.get("retained"), (int, float)) and math.isfinite(r["retained"]) else " | - |"))
    lines += ["", retained_note(d)]
    if "speed" in d:
        lines += ["", "Speed (one model per kind and K; timings vary between runs):", "", "| kind | K | prefill tok/s | decode tok/s | decode speed-up | KV-cache bytes/token |", "|---|---|---|---|---|---|"]
        ds = d["speed"]
        lines.append(f"| dense | 0 | {ds['prefill_tokens_per_s']:.0f} | {ds['decode_tokens_per_s']:.1f} | 1.00 | {ds['kv_cache_bytes_per_token']:.0f} |")
        for r in comp["rows"]:
            if "speed" in r:
                s = r["speed"]
                lines.append(f"| {r['kind']} | {r['k']} | {s['prefill_tokens_per_s']:.0f} | {s['decode_tokens_per_s']:.1f} | {s['decode_tokens_per_s'] / ds['decode_tokens_per_s']:.2f} | {s['kv_cache_bytes_per_token']:.0f} |")
    if comp.get("calibration_agreement"):
        lines += ["", "Calibration robustness:", ""]
        for a in comp["calibration_agreement"]:
            ov = ", ".join(f"K={k}: {v['shared']}/{v['of']}" for k, v in a["overlap"].items())
            lines.append(f"- {a['kind']} / {a['method']}: Spearman {a['spearman']:.3f}; overlap of the dropped blocks {ov}")
    return "\n".join(lines) + "\n"


def plot(comp: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in comp["rows"]})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for m in sorted({r["method"] for r in comp["rows"] if r["kind"] == kind}):
            rs = sorted((r for r in comp["rows"] if r["kind"] == kind and r["method"] == m), key=lambda r: r["k"])
            ax.plot([0] + [r["k"] for r in rs], [100.0] + [100 * r["retained"] if isinstance(r.get("retained"), (int, float)) else math.nan for r in rs], marker="o", label=m, linestyle="--" if m == "random" else "-")
        ax.set_title(f"{kind} blocks dropped")
        ax.set_xlabel("blocks dropped (K)")
        ax.set_ylabel("zero-shot accuracy retained (% of dense)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{comp['model'].get('name', '')}: quality kept by each pruning method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(comp: dict, out_dir: str | os.PathLike, png: bool = True, overwrite: bool = False) -> Path:
    """comparison.json / .md / .png into ``out_dir``, written in a temp dir and moved into place.

    ``out_dir`` may be new, empty or an earlier comparison; any other directory needs
    ``overwrite`` and keeps its other files (see :mod:`entrodrop_fast.outputs`).
    """
    from entrodrop_fast import outputs

    out = outputs.check_dir(out_dir, kind="comparison", what="comparison", overwrite=overwrite)
    with outputs.publish_dir(out, kind="comparison", what="comparison", overwrite=overwrite) as tmp:
        from entrodrop_fast.report import json_safe

        (tmp / "comparison.json").write_text(json.dumps(json_safe(comp), indent=2, allow_nan=False))  # NaN -> null
        (tmp / "comparison.md").write_text(markdown(comp))
        if png:
            plot(comp, tmp / "comparison.png")
    return out
