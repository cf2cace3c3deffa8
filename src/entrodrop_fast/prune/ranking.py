"""Ranking: a drop plan from a profile report (EntroDrop selection, arXiv 2504.03794).

One-shot selection: the candidate blocks of the chosen kind are sorted by ascending score
(ΔH of an entropy method; the cosine importance 1 - cos for ``cosine``; for ``angular``
the span of K consecutive layers whose ends are closest), protected layers are skipped,
and the K lowest are dropped. Kinds: ``attn``, ``mlp``, ``layer`` or ``joint`` (attention
and MLP sub-blocks ranked together).

Protected layers (never dropped; all their blocks): by default the early layers over which
the residual-stream entropy still decreases (the paper's stage 1, detected from the
report by :func:`entrodrop_fast.profile.report.stage1_layers`) and the last layer. ``protect=[...]``
replaces the default (``[]``: protect nothing).

The plan (JSON) names layers by 0-based index and says so; it keeps the scores that led
to it. :func:`iterative_plan` drops one block at a time and re-profiles in between.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from entrodrop_fast._names import how, setting

KINDS = ("attn", "mlp", "layer", "joint")
PLAN_FORMAT = "entrodrop-plan/1"
INDEXING = "0-based decoder-layer indices (layer 0 is the first decoder layer)"


DROP_FORMS = (
    "a count (8), a fraction in (0, 1) (0.25) or a percentage (25%, 100% = every candidate)"
)


def parse_drop(drop):
    """The form of ``drop`` (``rank --drop``), checked without a report: ``("count", n)`` or
    ``("fraction", f)``.

    ``8`` / ``"8"`` / ``8.0``: a count. ``0.25`` / ``"0.25"`` / ``"25%"``: a fraction of the
    candidate blocks, 0 < f <= 1 (only a percentage can say 100%). ``1.0`` is refused as
    ambiguous (one block, or all of them?): give ``1`` or ``100%``.
    """
    what = f"{setting('drop')} must be {DROP_FORMS}"
    if isinstance(drop, str):
        s = drop.strip()
        if s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                raise ValueError(f"{what}; got {drop!r}") from None
            if math.isnan(pct) or not 0 < pct <= 100:
                raise ValueError(
                    f"a {setting('drop')} percentage must lie in (0%, 100%], got {drop!r}"
                )
            return ("fraction", pct / 100)
        if s.isdigit():
            drop = int(s)
        else:
            try:
                drop = float(s)
            except ValueError:
                raise ValueError(f"{what}; got {drop!r}") from None
    if (
        isinstance(drop, bool)
        or not isinstance(drop, (int, float))
        or (isinstance(drop, float) and not math.isfinite(drop))
    ):
        raise ValueError(f"{what}; got {drop!r}")
    if isinstance(drop, float):
        if drop == 1:
            raise ValueError(
                f"{setting('drop')} 1.0 is ambiguous (one block, or all of them?): give 1 for one "
                "block, or 100% for every candidate block"
            )
        if drop.is_integer() and drop > 1:
            return ("count", int(drop))  # 2.0: a count (a fraction lies below 1)
        if drop < 0:
            raise ValueError(f"a {setting('drop')} count must be >= 1, got {drop:g}")
        if not 0 < drop < 1:
            raise ValueError(
                f"a fractional {setting('drop')} must lie in (0, 1) (or give a count, or a "
                f"percentage up to 100%), got {drop}"
            )
        return ("fraction", drop)
    if drop < 1:
        raise ValueError(f"a {setting('drop')} count must be >= 1, got {drop}")
    return ("count", drop)


def parse_count(drop, candidates: int) -> int:
    """``8`` -> 8; ``0.25`` or ``"25%"`` -> that fraction of the ``candidates`` (the blocks that
    may be dropped: neither protected nor dropped already), rounded to the nearest count, halves
    up (25% of 6 -> 2, 25% of 10 -> 3); ``"100%"`` -> every candidate. A fraction that rounds to
    0 blocks is refused. See :func:`parse_drop` for the accepted forms."""
    form, v = parse_drop(drop)
    if form == "count":
        return v
    k = math.floor(v * candidates + 0.5)
    if k < 1:
        raise ValueError(
            f"{setting('drop')} {drop} of {candidates} candidate block(s) rounds to 0 blocks; "
            "give a larger fraction or a count (>= 1)"
        )
    return k


def parse_protect(spec) -> list[int] | None:
    """``"0,1,29"`` -> [0, 1, 29]; ``"none"`` -> []; None -> None (the default); ``""`` is
    refused."""
    if spec is None:
        return None
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "none":
            return []
        try:
            out = sorted({int(v) for v in s.split(",") if v.strip()})
        except ValueError:
            raise ValueError(
                f"{setting('protect')} must be comma-separated 0-based layer indices (0,1,29) "
                f"or 'none', got {spec!r}"
            ) from None
        if not out:
            raise ValueError(
                f"{setting('protect')} {spec!r} names no layer: give 0-based layer indices "
                "(0,1,29), or 'none' to protect nothing"
            )
        return out
    return sorted({int(v) for v in spec})


def _entropy_method(report: dict, method: str | None) -> str | None:
    if method in report.get("entropy", {}):
        return method
    return next(iter(report.get("entropy", {})), None)


def residual_entropy(report: dict, method: str | None = None) -> dict | None:
    """H(r_l), l = 0..L, of the residual stream entering each layer (r_L: last layer's output)."""
    m = _entropy_method(report, method)
    if m is None:
        return None
    pts, h = report["points"], report["entropy"][m]["mean"]
    L = report["model"]["num_layers"]
    return {
        "method": m,
        "points": [f"r{i}" for i in range(L + 1)],
        "values": [h[pts.index(f"r{i}")] for i in range(L + 1)],
    }


def default_protected(report: dict, method: str | None = None) -> tuple[list[int], dict]:
    """(protected layers, why): the stage-1 layers of the profile and the last layer."""
    from entrodrop_fast.profile.report import stage1_layers

    L = report["model"]["num_layers"]
    m = _entropy_method(report, method)
    stage1 = stage1_layers(report, m) if m is not None else []
    return sorted(set(stage1) | {L - 1}), {
        "stage1_entropy_decreasing": stage1,
        "last_layer": L - 1,
        "entropy_method": m,
    }


def _score(block: dict, method: str) -> tuple[float, float] | None:
    """(mean, stderr) of ``block`` by ``method``; None when the report has no such entry.
    A NaN / null mean comes back as NaN; a null stderr (one sample) as NaN."""
    if method == "cosine":
        c = block.get("cosine")
        if not c:
            return None
    else:
        c = (block.get("delta") or {}).get(method)
        if c is None:
            return None
    mean, se = c.get("mean"), c.get("stderr")
    return (float("nan") if mean is None else mean, float("nan") if se is None else se)


def is_dropped(block: dict) -> bool:
    """Whether the profiled model no longer has this block (see
    :func:`entrodrop_fast.profile.report.build_report`)."""
    return bool(block.get("dropped"))


def _methods_in(report: dict) -> list[str]:
    out = list(report.get("entropy", {}))
    if any(b.get("cosine") for b in report["blocks"]):
        out.append("cosine")
    if any(b.get("angular") for b in report["blocks"]):
        out.append("angular")
    return out


def _made_for(model: dict) -> dict:
    """The plan's ``model`` entry: where the report's model came from, and what identifies it
    (:data:`~entrodrop_fast.prune.surgery.IDENTITY_FIELDS`, those the report records), so that a
    plan is only applied to the model it was made for."""
    from entrodrop_fast.prune.surgery import IDENTITY_FIELDS

    out = {key: model.get(key) for key in ("name", "source", "path", "model_type", "num_layers")}
    out.update({key: model[key] for key in IDENTITY_FIELDS if model.get(key) is not None})
    return out


def drop_advice() -> str:
    """What the error of a too large drop tells the user to do (:func:`make_plan`'s default)."""
    return f"lower {setting('drop')} or change {setting('protect')}"


PROTECT_RULES = ("shared", "paper", "per-method")


def protected_by_rule(
    report: dict, rule: str, *, method: str | None = None, stage1_method: str | None = None
) -> tuple[list[int], dict]:
    """(protected layers, why) by a named rule, the same for every scoring method:

    - ``"shared"``: stage 1 detected once, from the stream entropy of ``stage1_method``
      (default: the report's first entropy method), plus the last layer;
    - ``"paper"``: layers 0, 1 and the last, fixed (the paper's code);
    - ``"per-method"``: stage 1 from ``method``'s own stream entropy (cosine / random: the
      report's first entropy method), plus the last layer (the product's default).
    """
    from entrodrop_fast.profile.presets import paper_protected

    L = int(report["model"]["num_layers"])
    if rule == "paper":
        prot = paper_protected(L)
        return prot, {"rule": "paper", "fixed": prot}
    if rule == "shared":
        m = _entropy_method(report, stage1_method)
        if stage1_method is not None and m != stage1_method:
            raise ValueError(
                f"protect rule 'shared': the report has no {stage1_method!r} entropy profile to "
                f"detect stage 1 from (has {', '.join(report.get('entropy', {})) or 'none'})"
            )
        prot, why = default_protected(report, m)
        return prot, {"rule": "shared", **why}
    if rule == "per-method":
        prot, why = default_protected(report, method)
        return prot, {"rule": "per-method", **why}
    raise ValueError(f"unknown protect rule {rule!r}; choose from {', '.join(PROTECT_RULES)}")


def _preset_choice(
    report: dict, preset: str | None, method: str | None, protect
) -> tuple[str | None, list[int] | None, dict | None]:
    """(method, protected layers, why) under ``preset`` ("paper": the method the paper's code
    uses for the report's architecture, and layers 0, 1 and the last); unchanged without one.
    A report profiled with ``--preset paper`` applies the paper's rule unless ``protect`` says
    otherwise."""
    from entrodrop_fast.profile.presets import check_preset, paper_preset, report_preset

    preset = check_preset(preset) or report_preset(report)
    if preset != "paper":
        return method, None, None
    cfg = paper_preset(report["model"].get("model_type"), int(report["model"]["num_layers"]))
    if method is None:
        method = cfg["method"]
    if protect is not None:
        return method, None, None
    return method, cfg["protect"], {"preset": "paper", "fixed": cfg["protect"], "why": cfg["why"]}


def make_plan(
    report: dict[str, Any] | str | os.PathLike[str],
    kind: str = "attn",
    drop: int | float | str = 4,
    *,
    method: str | None = None,
    protect: str | Iterable[int] | None = None,
    report_path: str | None = None,
    advice: str | None = None,
    preset: str | None = None,
    protect_rule: str | None = None,
    stage1_method: str | None = None,
) -> dict[str, Any]:
    """A drop plan from a report dict (or the path of a report directory / ``report.json``).

    ``kind``: one of :data:`KINDS`. ``drop``: a count (``8``), or a fraction of the candidate
    blocks (``0.25``, ``"25%"``; the candidates: the blocks of ``kind`` neither protected nor
    dropped already; :func:`parse_count`). ``method``: an entropy method of the report
    (default: its first), ``cosine``, ``block_influence`` or ``angular`` (layers only).
    ``protect``: 0-based layers never dropped (a list, or ``"0,1,29"`` / ``"none"``),
    replacing the default (stage 1 + last layer). ``preset="paper"`` (or a report profiled
    with it): the paper's method for the architecture (knn; bucket for Mistral) unless
    ``method`` is given, and layers 0, 1 and the last protected unless ``protect`` is given.
    ``protect_rule``: one of :data:`PROTECT_RULES` (:func:`protected_by_rule`;
    ``stage1_method`` for "shared"), used when ``protect`` is None. ``advice``: what the
    error of a too large ``drop`` tells the user to do (default: :func:`drop_advice`).
    Blocks the report marks ``dropped`` (the profiled model was pruned already) are neither
    ranked nor counted.

    Returns the plan, ready for JSON: ``drop`` (``{"attn": [...], "mlp": [...], "layer":
    [...]}``, 0-based layer indices), ``k``, ``method``, ``protected`` and why, ``ranked``
    (the blocks in ascending score, with their standard errors) and the ``model`` it was made
    for. Raises ValueError for an unknown kind or method, a method or score the report lacks,
    protected layers out of range, or more blocks than there are candidates.
    """
    advice = drop_advice() if advice is None else advice
    if isinstance(report, (str, os.PathLike)):
        from entrodrop_fast.profile.report import load_report

        report_path = str(report)
        report = load_report(report)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    L = int(report["model"]["num_layers"])
    where = f"report {report_path}" if report_path else "the report"
    method, preset_protect, preset_why = _preset_choice(report, preset, method, protect)
    if method == "block_influence":  # ShortGPT's block influence IS cosine on whole layers
        if kind != "layer":
            raise ValueError(
                "method block_influence (ShortGPT) scores whole layers: use "
                f"{setting('kind')} layer (cosine scores attn / mlp blocks)"
            )
        method = "cosine"
    available = _methods_in(report)
    method = (
        method or _entropy_method(report, None) or ("cosine" if "cosine" in available else None)
    )
    if method not in available:
        from entrodrop_fast.profile.inmemory import ALL_METHODS

        has = f"{where} has: {', '.join(available) or 'no method'}"
        if method not in ALL_METHODS:
            raise ValueError(
                f"unknown {setting('method')} {method!r}: give one of {', '.join(ALL_METHODS)} "
                f"({has})"
            )
        raise ValueError(
            f"method {method!r} is not in {where} ({has}); rank by one of those, or profile "
            f"again with {setting('method')} {method}"
        )
    if method == "angular" and kind != "layer":
        raise ValueError(
            f"method angular scores spans of whole layers: use {setting('kind')} layer"
        )
    user_protect = parse_protect(protect)
    if user_protect is None and protect_rule is not None:
        protected, why = protected_by_rule(
            report, protect_rule, method=method, stage1_method=stage1_method
        )
    elif user_protect is None and preset_protect is not None:
        protected, why = preset_protect, preset_why
    elif user_protect is None:
        protected, why = default_protected(report, method)
    else:
        bad = [i for i in user_protect if not 0 <= i < L]
        if bad:
            raise ValueError(
                f"protected layers {bad} out of range for {L} layers (0-based: 0..{L - 1})"
            )
        protected, why = user_protect, {"user": user_protect}
    kinds = ("attn", "mlp") if kind == "joint" else (kind,)
    # blocks the profiled model no longer has (an earlier prune): not candidates, not counted
    gone = [
        (b["kind"], b["layer"]) for b in report["blocks"] if b["kind"] in kinds and is_dropped(b)
    ]
    already = {
        "attn": sorted(i for kk, i in gone if kk == "attn"),
        "mlp": sorted(i for kk, i in gone if kk == "mlp"),
    }
    if method == "angular":
        # k is a span length: a fraction counts the unprotected layers
        k = parse_count(drop, L - len(set(protected)))
    else:
        n_candidates = sum(
            1
            for b in report["blocks"]
            if b["kind"] in kinds and b["layer"] not in set(protected) and not is_dropped(b)
        )
        if n_candidates == 0:
            raise ValueError(
                f"no {kind} block can be dropped: of {L} layers, {sorted(set(protected))} are "
                "protected"
                + (f" and {len(gone)} block(s) are dropped already" if gone else "")
                + f"; {advice}"
            )
        k = parse_count(drop, n_candidates)

    ranked: list[dict] = []
    if method == "angular":
        spans = {}
        for b in report["blocks"]:
            if b["kind"] == "layer" and b.get("angular") and str(k) in b["angular"]:
                spans[b["layer"]] = b["angular"][str(k)]
        if not spans:
            have = sorted(
                {n for b in report["blocks"] if b.get("angular") for n in b["angular"]}, key=int
            )
            raise ValueError(
                f"the report has no angular distance for spans of {k} layers (has spans "
                f"{', '.join(have) or 'none'}); profile with spans of {k} layers "
                f"({how(f'entrodrop profile --spans {k}', f'ProfileSettings(spans=({k},))')})"
            )
        for start, a in sorted(spans.items(), key=lambda kv: kv[1]["mean"]):
            hit = [i for i in range(start, start + k) if i in set(protected)]
            ranked.append(
                {
                    "kind": "span",
                    "layer": start,
                    "layers": list(range(start, start + k)),
                    "score": a["mean"],
                    "stderr": a["stderr"],
                    "protected": bool(hit),
                }
            )
        best = next((r for r in ranked if not r["protected"]), None)
        if best is None:
            raise ValueError(
                f"every span of {k} layers touches a protected layer {protected}; {advice}"
            )
        best["dropped"] = True
        chosen = {"layer": best["layers"]}
    else:
        for b in report["blocks"]:
            if b["kind"] not in kinds or is_dropped(b):
                continue
            s = _score(b, method)
            prot = b["layer"] in set(protected)
            if s is None or math.isnan(s[0]):
                if prot:
                    continue  # never a candidate: its score does not matter
                raise ValueError(
                    f"{where}: the {method} score of the {b['kind']} block of layer {b['layer']} "
                    "(0-based) is "
                    + ("missing" if s is None else "NaN / null")
                    + "; "
                    + how(
                        f"run entrodrop profile again (with --method {method}) to rewrite the "
                        "report",
                        f"profile again with method {method} for a new report",
                    )
                )
            ranked.append(
                {
                    "kind": b["kind"],
                    "layer": b["layer"],
                    "score": s[0],
                    "stderr": s[1],
                    "protected": prot,
                }
            )
        ranked.sort(key=lambda r: r["score"])
        free = [r for r in ranked if not r["protected"]]
        if k > len(free):
            raise ValueError(
                f"cannot drop {k} {kind} blocks: only {len(free)} are not protected"
                + (" or dropped already" if gone else "")
                + " "
                f"(protected layers {protected}"
                + (
                    f"; dropped already: {'; '.join(f'{kk} {v}' for kk, v in already.items() if v)}"
                    if gone
                    else ""
                )
                + f"); {advice}"
            )
        chosen = {"attn": [], "mlp": [], "layer": []}
        for r in free[:k]:
            r["dropped"] = True
            chosen[r["kind"]].append(r["layer"])
    for r in ranked:
        r.setdefault("dropped", False)
    drop_spec = {kk: sorted(v) for kk, v in chosen.items() if v}
    return {
        "format": PLAN_FORMAT,
        "indexing": INDEXING,
        "model": _made_for(report["model"]),
        "report": report_path,
        "kind": kind,
        "method": method,
        "k": k,
        "requested_drop": drop if isinstance(drop, (int, float)) else str(drop),
        "protected": protected,
        "protected_reason": why,
        "drop": {
            "attn": drop_spec.get("attn", []),
            "mlp": drop_spec.get("mlp", []),
            "layer": drop_spec.get("layer", []),
        },
        "ranked": ranked,
        **({"already_dropped": {kk: v for kk, v in already.items() if v}} if gone else {}),
        "residual_entropy": residual_entropy(report, method),
        "iterative": False,
    }


def save_plan(plan: dict, path, *, overwrite: bool = False) -> Path:
    """Write a drop plan as JSON, through a temporary file moved into place.

    An existing file is replaced only when it is a plan (or with ``overwrite``); raises
    :class:`~entrodrop_fast.outputs.OutputError` otherwise.
    """
    from entrodrop_fast import outputs
    from entrodrop_fast.profile.report import json_safe

    p = outputs.check_file(path, what="drop plan", recognise=plan_file_check(), overwrite=overwrite)
    # undefined numbers (a stderr of one sample) are written as null: bare NaN is not JSON
    return outputs.publish_file(
        p, json.dumps(json_safe(plan), indent=1, allow_nan=False) + "\n", what="drop plan"
    )


def plan_file_check():
    """Recognises a drop plan written by :func:`save_plan` (an existing file it may replace)."""
    from entrodrop_fast import outputs

    return outputs.json_with_keys("drop", "kind", "ranked")


def plan_summary(plan: dict) -> str:
    d = plan["drop"]
    parts = [f"{kk} {d[kk]}" for kk in ("attn", "mlp", "layer") if d.get(kk)]
    lines = [
        f"drop plan ({plan['indexing']}): {plan['k']} {plan['kind']} block(s) by {plan['method']}"
        + (" (iterative)" if plan.get("iterative") else ""),
        f"  drop:      {'; '.join(parts) or 'nothing'}",
        f"  protected: {plan['protected']}  ({json.dumps(plan['protected_reason'])})",
    ]
    if plan.get("already_dropped"):
        gone = "; ".join(f"{kk} {v}" for kk, v in plan["already_dropped"].items())
        lines.append(f"  dropped already (not ranked): {gone}")
    shown = [r for r in plan["ranked"] if r.get("dropped")][:16]
    for r in shown:
        se = r.get("stderr")
        err = (
            f" ± {se:.2g}"
            if isinstance(se, (int, float)) and math.isfinite(se)
            else " (no stderr: needs >= 2 samples)"
        )
        what = (
            f"layer {r['layer']}" if r["kind"] == "layer" else f"{r['kind']} of layer {r['layer']}"
        )
        lines.append(f"    {what:16s}  score {r['score']:.5g}{err}")
    return "\n".join(lines)


def iterative_plan(
    model,
    windows,
    kind: str = "attn",
    drop=4,
    *,
    method: str | None = None,
    protect=None,
    settings=None,
    progress: bool = False,
    preset: str | None = None,
    protect_rule: str | None = None,
    stage1_method: str | None = None,
) -> dict:
    """Drop one block at a time, re-profiling the pruned model in between (in memory).

    ``model`` is pruned in place (a copy is not made: pass one you can spare). Returns a plan
    in the numbering of the *original* model, like :func:`make_plan`.
    """
    from entrodrop_fast.models.adapters import get_adapter
    from entrodrop_fast.profile.inmemory import ProfileSettings, profile
    from entrodrop_fast.profile.report import build_report
    from entrodrop_fast.prune.surgery import drop_blocks_, model_identity

    if kind not in ("attn", "mlp", "layer"):
        raise ValueError(f"iterative mode supports kinds attn, mlp, layer; got {kind!r}")
    identity = model_identity(model.config)  # of the model before any drop
    settings = settings or ProfileSettings()
    L0 = get_adapter(model).num_layers(model)
    parse_drop(drop)  # its form, checked before the first profile
    k = None  # a fraction counts the candidate blocks of the unpruned model's profile
    orig = list(range(L0))  # current index -> original index
    dropped: list[int] = []  # original indices of dropped sub-blocks
    steps = []
    first_plan = None
    while k is None or len(steps) < k:
        report = build_report(
            profile(model, windows, settings, progress=progress),
            model_info={},
            data_info={},
            settings={},
            model=model,
        )
        if first_plan is None:
            # protection is decided once, on the unpruned model's profile
            first_plan = make_plan(
                report,
                kind,
                drop,
                method=method,
                protect=protect,
                preset=preset,
                protect_rule=protect_rule,
                stage1_method=stage1_method,
            )
            protected_orig = set(first_plan["protected"])
            k = first_plan["k"]
        cur_protect = [
            i
            for i, o in enumerate(orig)
            if o in protected_orig or (kind != "layer" and o in dropped)
        ]
        step = make_plan(report, kind, 1, method=first_plan["method"], protect=cur_protect)
        cur = step["drop"][kind][0]
        steps.append(
            {
                "layer": orig[cur],
                "score": next(r["score"] for r in step["ranked"] if r.get("dropped")),
            }
        )
        drop_blocks_(model, {kind: [cur]})
        dropped.append(orig[cur])
        if kind == "layer":
            del orig[cur]
    plan = dict(first_plan)
    plan["model"] = {**first_plan["model"], **identity}
    plan.update(
        {
            "k": k,
            "requested_drop": drop if isinstance(drop, (int, float)) else str(drop),
            "drop": {"attn": [], "mlp": [], "layer": [], kind: sorted(dropped)},
            "iterative": True,
            "steps": steps,
        }
    )
    for r in plan["ranked"]:
        r["dropped"] = r["kind"] == kind and r["layer"] in set(dropped)
    return plan
