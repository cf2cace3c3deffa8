"""A new user's findings on ranking, plans, reports and compare (numbers as in the findings)."""

from __future__ import annotations

import csv
import json
import math
import warnings

import pytest
import torch
from helpers import tiny_model

from entrodrop_fast._names import spelled
from entrodrop_fast.cli import build_parser, flag_spellings
from entrodrop_fast.evaluate import compare as C
from entrodrop_fast.profile.report import build_report, load_report, ranking_table, write_report
from entrodrop_fast.prune.ranking import (
    make_plan,
    parse_count,
    parse_protect,
    plan_summary,
    save_plan,
)
from entrodrop_fast.prune.surgery import (
    check_same_model,
    drop_blocks_,
    model_identity,
    normalize_drops,
)


def flat_report(L: int) -> dict:
    """L layers, stream entropy rising throughout (no stage 1): only the last layer is protected."""
    points = []
    for i in range(L):
        points += [f"r{i}", f"m{i}"]
    points.append(f"r{L}")
    h = [1.0 + 0.1 * j for j in range(len(points))]
    blocks = [
        {
            "kind": kind,
            "layer": i,
            "delta": {
                "bucket": {"mean": 0.1 * (i + 1) + (0.01 if kind == "mlp" else 0.0), "stderr": 0.01}
            },
            "cosine": None,
        }
        for kind in ("attn", "mlp", "layer")
        for i in range(L)
    ]
    return {
        "format": 1,
        "model": {"name": "flat", "model_type": "llama", "num_layers": L},
        "points": points,
        "entropy": {"bucket": {"mean": h, "stderr": [0.0] * len(h)}},
        "blocks": blocks,
        "timing": {"samples": 4},
    }


def _write(tmp_path, rep, name="rep") -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "report.json").write_text(json.dumps(rep))
    return str(d / "report.json")


# 7 ---------------------------------------------------------------------------------------


def test_7_percentages_and_fractions_are_of_the_candidates():
    rep4 = flat_report(4)  # 3 candidates (layer 3 protected)
    for spec in ("100%", "100.0%"):
        assert make_plan(rep4, "attn", spec)["drop"]["attn"] == [0, 1, 2]
    assert make_plan(rep4, "attn", "99%")["k"] == 3  # 2.97 rounds to 3
    for spec in (1.0, "1.0"):
        with pytest.raises(ValueError, match=r"ambiguous.*give 1 for one block, or 100%"):
            make_plan(rep4, "attn", spec)
    rep6 = flat_report(6)  # 5 candidates per kind
    assert make_plan(rep6, "attn", 0.8)["k"] == 4
    assert make_plan(rep6, "joint", "50%")["k"] == 5  # half of 10
    assert (
        parse_count("25%", 6) == 2 and parse_count("25%", 10) == 3 and parse_count(0.5, 5) == 3
    )  # halves up
    with pytest.raises(ValueError, match="of 5 candidate block"):
        make_plan(rep6, "attn", 0.0001)
    for bad in ("0%", "101%", "x%", "1.5"):
        with pytest.raises(ValueError, match="drop") as exc:
            parse_count(bad, 5)
        assert "--" not in str(exc.value)  # called from Python: the argument's name
        with spelled(flag_spellings(build_parser(), "rank")):
            with pytest.raises(ValueError, match="--drop"):
                parse_count(bad, 5)


def test_7_rank_cli_rounding_to_zero_is_an_error(tmp_path, capsys):
    from entrodrop_fast.cli import main

    path = _write(tmp_path, flat_report(6))
    assert (
        main(
            ["rank", path, "--kind", "attn", "--drop", "0.0001", "--out", str(tmp_path / "p.json")]
        )
        == 1
    )
    assert "entrodrop rank: error:" in capsys.readouterr().err


# 8 ---------------------------------------------------------------------------------------


def _bucket_report(model, windows, name: str) -> dict:
    """The report of a bucket profile (torch backend, all windows in one batch) of ``model``."""
    from entrodrop_fast.profile.inmemory import ProfileSettings, profile

    settings = ProfileSettings(methods=("bucket",), batch_size=len(windows), backend="torch")
    return build_report(
        profile(model, windows, settings, progress=False),
        model_info={"name": name},
        data_info={},
        settings={},
        model=model,
    )


@pytest.fixture(scope="module")
def pruned_profile():
    model = tiny_model("llama", "mixed", num_hidden_layers=5)
    drop_blocks_(model, {"attn": [1, 2]})
    windows = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, _bucket_report(model, windows, "pruned")


def test_8_blocks_already_dropped_are_marked_skipped_shown_and_refused(pruned_profile):
    model, rep = pruned_profile
    gone = sorted(b["layer"] for b in rep["blocks"] if b["kind"] == "attn" and b.get("dropped"))
    assert gone == [1, 2] and rep["model"]["dropped"] == {"attn": [1, 2]}
    plan = make_plan(rep, "attn", 2, protect="none")
    assert not set(plan["drop"]["attn"]) & {1, 2} and len(plan["drop"]["attn"]) == 2
    assert {r["layer"] for r in plan["ranked"]} == {0, 3, 4}  # not ranked
    assert plan["already_dropped"] == {"attn": [1, 2]}
    assert make_plan(rep, "attn", "100%", protect="none")["k"] == 3  # not counted
    with pytest.raises(ValueError, match="only 3 are not protected or dropped already"):
        make_plan(rep, "attn", 4, protect="none")
    table = ranking_table(rep)
    assert table.count("dropped") >= 2 and "removed by an earlier prune" in table
    with pytest.raises(ValueError, match=r"no longer has \(attn \[1\]"):
        drop_blocks_(model, {"attn": [1, 3]})


def test_8_scores_csv_marks_dropped_blocks_and_leaves_their_numbers_empty(pruned_profile, tmp_path):
    """A user sorting scores.csv to choose what to drop got the removed blocks first: their
    ΔH is 0 (X and Y are one point). Now they are marked, with no numbers."""
    _, rep = pruned_profile
    out = write_report(rep, tmp_path / "rep", png=False)
    rows = list(csv.DictReader((out / "scores.csv").open()))
    gone = [r for r in rows if r["dropped"] == "yes"]
    assert sorted((r["kind"], int(r["layer"])) for r in gone) == [("attn", 1), ("attn", 2)]
    assert all(r["delta_bucket"] == "" and r["H_x_bucket"] == "" for r in gone)
    kept = [r for r in rows if r["dropped"] == ""]
    assert len(kept) == len(rows) - 2 and all(r["delta_bucket"] != "" for r in kept)


# 10 --------------------------------------------------------------------------------------


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_10_one_sample_writes_null_not_nan(tmp_path):
    model = tiny_model("llama", "mixed", num_hidden_layers=3)
    windows = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(1))
    rep = _bucket_report(model, windows, "one")
    out = write_report(rep, tmp_path / "rep", png=False)
    data = _strict((out / "report.json").read_text())
    assert data["blocks"][0]["delta"]["bucket"]["stderr"] is None
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert rows[0]["delta_bucket_stderr"] == "" and rows[0]["delta_bucket"] != ""
    assert ">= 2 samples" in (out / "ranking.txt").read_text()
    plan = make_plan(load_report(out), "attn", 1, protect="none", report_path=str(out))
    p = save_plan(plan, tmp_path / "plan.json")
    assert _strict(p.read_text())["ranked"][0]["stderr"] is None
    assert "needs >= 2 samples" in plan_summary(plan)


# 11 --------------------------------------------------------------------------------------


def test_11_nan_score_of_a_candidate_is_an_error_naming_block_and_file(tmp_path):
    rep = flat_report(4)
    rep["blocks"][1]["delta"]["bucket"]["mean"] = float("nan")  # attn layer 1
    path = _write(tmp_path, rep)
    with pytest.raises(ValueError, match=rf"report {path}.*attn block of layer 1.*profile again"):
        make_plan(path, "attn", 2)
    rep["blocks"][1]["delta"]["bucket"]["mean"] = None
    with pytest.raises(ValueError, match="attn block of layer 1"):
        make_plan(rep, "attn", 1)
    bad = flat_report(4)
    bad["entropy"]["bucket"]["mean"][2] = float("nan")
    with pytest.raises(ValueError, match=r"entropy\.bucket\.mean\[2\]"):
        load_report(_write(tmp_path, bad, "bad"))


# 13 --------------------------------------------------------------------------------------


def test_13_another_model_path_with_the_same_config_warns(tmp_path):
    cfg = tiny_model("llama", "mixed", num_hidden_layers=2).config
    here = tmp_path / "finetuned"
    here.mkdir()
    made_for = {**model_identity(cfg), "path": str(tmp_path / "base")}
    with pytest.warns(
        UserWarning, match=rf"made from the model at {tmp_path / 'base'}, not {here}"
    ):
        assert check_same_model(made_for, cfg, target=str(here)) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_same_model(
            {**made_for, "path": str(here)}, cfg, target=str(here)
        )  # same path: no warning


# 14 --------------------------------------------------------------------------------------


def test_14_empty_plans_and_empty_protect_are_errors():
    for plan in (
        {},
        {"drop": {"attn": None}},
        {"drop": {"attn": [], "mlp": [], "layer": []}},
        {"attn": []},
    ):
        with pytest.raises(ValueError, match="the plan drops nothing"):
            normalize_drops(plan, 4)
    for spec in ("", " ", ","):
        with pytest.raises(ValueError, match="'none' to protect nothing"):
            parse_protect(spec)
    assert parse_protect("none") == []


# 17 --------------------------------------------------------------------------------------


def test_17_retained_leaves_out_zero_dense_tasks_and_says_so():
    dense = {"perplexity": 10.0, "a": 0.5, "b": 0.0}
    assert C.retained({"perplexity": 12.0, "a": 0.25, "b": 0.3}, dense) == pytest.approx(0.5)
    comp = {
        "dense": {**dense, "params": 1e6},
        "rows": [
            {
                "kind": "attn",
                "method": "bucket",
                "k": 1,
                "dropped": [2],
                "perplexity": 12.0,
                "a": 0.25,
                "b": 0.3,
                "retained": 0.5,
            }
        ],
    }
    md = C.markdown(comp)
    assert "left out (dense accuracy 0, ratio undefined): b" in md and "| 50.0 |" in md
    none = {"perplexity": 3.0, "a": 0.0, "params": 1e6}
    assert C.retained({"a": 0.1}, none) is None
    md = C.markdown(
        {
            "dense": none,
            "rows": [
                {
                    "kind": "attn",
                    "method": "cosine",
                    "k": 1,
                    "dropped": [0],
                    "perplexity": 4.0,
                    "a": 0.1,
                    "retained": None,
                }
            ],
        }
    )
    assert (
        "| 4.00 | 0.100 | - |" in md
        and "undefined (-): the dense model scores 0 on every zero-shot task (a)" in md
    )


# 20 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("delta", 0.5, r"blocks\[0\]\.delta must be an object"),
        ("layer", "1", r"blocks\[0\]\.layer must be a 0-based layer index"),
        ("kind", "heads", r"blocks\[0\]\.kind must be one of"),
    ],
)
def test_20_report_with_wrong_types_names_file_and_field(tmp_path, field, value, match):
    rep = flat_report(3)
    rep["blocks"][0][field] = value
    path = _write(tmp_path, rep)
    with pytest.raises(ValueError, match=match) as exc:
        load_report(path)
    assert path in str(exc.value)


# 23 --------------------------------------------------------------------------------------


def test_23_plan_with_wrong_types_names_the_field():
    with pytest.raises(ValueError, match=r"drop\.attn must be a list of 0-based layer indices"):
        normalize_drops({"drop": {"attn": 1}}, 4)
    with pytest.raises(ValueError, match=r"'drop' must be an object"):
        normalize_drops({"drop": "attn"}, 4)


# 26 --------------------------------------------------------------------------------------


def test_26_compare_accepts_the_drop_forms_of_rank_and_names_its_own_flags():
    assert C.parse_counts("4,2,50%,0.25") == [2, 4, "50%", "0.25"]
    rep = flat_report(6)
    with pytest.raises(ValueError, match=r"^drop '1\.0'.*ambiguous"):  # from Python
        C.parse_counts("2,1.0")
    with pytest.raises(ValueError, match=r"lower drop \(compare protects"):
        C.random_plan(rep, "attn", 10)
    with spelled(flag_spellings(build_parser(), "compare")):  # as `entrodrop compare` runs it
        with pytest.raises(ValueError, match=r"--drop '1\.0'.*ambiguous"):
            C.parse_counts("2,1.0")
        assert make_plan(rep, "attn", "50%", advice=C.drop_advice())["k"] == 3
        assert C.random_plan(rep, "attn", "100%")["k"] == 5
        with pytest.raises(ValueError, match="lower --drop") as exc:
            make_plan(rep, "attn", 10, advice=C.drop_advice())
        assert "--protect" not in str(exc.value)
        with pytest.raises(ValueError, match="lower --drop") as exc:
            C.random_plan(rep, "attn", 10)
        assert "--protect" not in str(exc.value)


# 27 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bogus", "random", "BUCKET", "bucket,cosine"])
def test_27_unknown_method_names_the_valid_ones_and_the_reports(method):
    with pytest.raises(ValueError) as exc:
        make_plan(flat_report(4), "attn", 1, method=method)
    msg = str(exc.value)
    assert f"unknown method {method!r}" in msg and "gaussian_diag" in msg and "has: bucket" in msg
    assert f"method {method}" not in msg.replace(f"unknown method {method!r}", "")
    with spelled(flag_spellings(build_parser(), "rank")), pytest.raises(ValueError) as exc:
        make_plan(flat_report(4), "attn", 1, method=method)
    msg = str(exc.value)
    assert f"unknown --method {method!r}" in msg
    assert f"--method {method}" not in msg.replace(f"unknown --method {method!r}", "")


def test_27_valid_method_missing_from_the_report():
    with pytest.raises(
        ValueError,
        match=r"'knn' is not in the report \(the report has: bucket\)"
        r".*profile again with method knn",
    ):
        make_plan(flat_report(4), "attn", 1, method="knn")
    assert not math.isnan(make_plan(flat_report(4), "attn", 1)["ranked"][0]["score"])


def test_7_iterative_fraction_counts_the_candidates():
    from entrodrop_fast.profile.inmemory import ProfileSettings
    from entrodrop_fast.prune.ranking import iterative_plan

    model = tiny_model("llama", "mixed", num_hidden_layers=5)
    windows = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = ProfileSettings(methods=("bucket",), batch_size=2, backend="torch")
    plan = iterative_plan(
        model, windows, "attn", "50%", protect="0,4", settings=settings
    )  # 3 candidates: 1.5 -> 2
    assert (
        plan["k"] == 2 and len(plan["drop"]["attn"]) == 2 and not set(plan["drop"]["attn"]) & {0, 4}
    )


def test_the_ranking_table_shows_cosine_only_when_it_was_profiled():
    rep = flat_report(4)
    for b in rep["blocks"]:  # H_x / H_y as a profile writes them
        b["H_x"], b["H_y"] = {"bucket": 1.0}, {"bucket": 1.1}
    assert "cosine-imp" not in ranking_table(rep)  # it was a column of '-'
    for b in rep["blocks"]:
        b["cosine"] = {"mean": 0.25, "stderr": 0.01}
    table = ranking_table(rep)
    assert "cosine-imp" in table and "0.2500" in table
