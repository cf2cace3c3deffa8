"""Ranking: drop plans from reports (synthetic, and a real profile of a tiny model)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import manual_reference_logits, tiny_model

from entrodrop_fast.prune.ranking import (
    iterative_plan,
    make_plan,
    parse_count,
    parse_protect,
    save_plan,
)
from entrodrop_fast.prune.surgery import drop_blocks_

L = 8
# residual-stream entropy: falls over layers 0..1 (stage 1), then rises
R = [10.0, 9.0, 8.5, 9.0, 9.5, 10.0, 10.4, 10.6, 11.0]
DH = {  # per kind, per layer: ΔH of the bucket method
    "attn": [0.5, -0.2, 0.01, 0.4, 0.03, 0.02, 0.3, 0.001],
    "mlp": [0.3, 0.2, 0.5, 0.05, 0.6, 0.7, 0.04, 0.8],
    "layer": [-1.0, -0.5, 0.5, 0.5, 0.5, 0.4, 0.2, 0.4],
}
COS = {
    "attn": [0.9, 0.8, 0.3, 0.1, 0.5, 0.6, 0.7, 0.05],
    "mlp": [0.5] * L,
    "layer": [0.2, 0.3, 0.1, 0.4, 0.5, 0.6, 0.7, 0.8],
}


def synthetic_report() -> dict:
    points = []
    for i in range(L):
        points += [f"r{i}", f"m{i}"]
    points.append(f"r{L}")
    h = []
    for i in range(L):
        h += [R[i], R[i] + DH["attn"][i]]
    h.append(R[L])
    blocks = []
    for kind in ("attn", "mlp", "layer"):
        for i in range(L):
            b = {
                "kind": kind,
                "layer": i,
                "delta": {"bucket": {"mean": DH[kind][i], "stderr": 0.01}},
                "cosine": {"mean": COS[kind][i], "stderr": 0.01},
            }
            if kind == "layer":
                b["angular"] = (
                    {"2": {"mean": 0.1 + 0.05 * abs(i - 4), "stderr": 0.0}} if i <= L - 2 else {}
                )
            blocks.append(b)
    return {
        "format": 1,
        "model": {"name": "synthetic", "model_type": "llama", "num_layers": L},
        "points": points,
        "entropy": {"bucket": {"mean": h, "stderr": [0.0] * len(h)}},
        "blocks": blocks,
        "layer_indices": "0-based",
    }


def test_default_protection_and_attn_plan(tmp_path):
    plan = make_plan(synthetic_report(), "attn", 3)
    assert plan["protected"] == [0, 1, 7]  # entropy decreases over layers 0, 1; last layer
    assert plan["protected_reason"]["stage1_entropy_decreasing"] == [0, 1]
    assert plan["drop"] == {
        "attn": [2, 4, 5],
        "mlp": [],
        "layer": [],
    }  # 0.001 (layer 7) is protected
    assert plan["indexing"].startswith("0-based")
    assert [r["layer"] for r in plan["ranked"] if r["dropped"]] == [2, 5, 4]
    assert plan["residual_entropy"]["values"] == R
    p = save_plan(plan, tmp_path / "plan.json")
    assert json.loads(p.read_text())["drop"]["attn"] == [2, 4, 5]


def test_kinds_methods_and_overrides():
    rep = synthetic_report()
    assert make_plan(rep, "mlp", 2)["drop"]["mlp"] == [3, 6]
    assert make_plan(rep, "layer", 2)["drop"]["layer"] == [5, 6]
    joint = make_plan(rep, "joint", 4)
    assert joint["drop"]["attn"] == [2, 4, 5] and joint["drop"]["mlp"] == [6]
    assert make_plan(rep, "attn", 2, protect="none")["drop"]["attn"] == [1, 7]
    assert make_plan(rep, "attn", 2, protect=[7])["drop"]["attn"] == [1, 2]
    assert make_plan(rep, "attn", 2, method="cosine")["drop"]["attn"] == [2, 3]
    assert (
        make_plan(rep, "attn", 0.25)["k"] == 1
    )  # a quarter of the 5 candidates (layers 0, 1, 7 protected), rounded
    ang = make_plan(rep, "layer", 2, method="angular")
    assert ang["drop"]["layer"] == [4, 5]
    with pytest.raises(ValueError, match="only 5 are not protected"):
        make_plan(rep, "attn", 6)
    with pytest.raises(ValueError, match="not in the report"):
        make_plan(rep, "attn", 2, method="knn")
    with pytest.raises(ValueError, match="out of range"):
        make_plan(rep, "attn", 2, protect="0,8")
    with pytest.raises(ValueError, match="kind must be"):
        make_plan(rep, "heads", 2)
    with pytest.raises(ValueError, match="spans of 3"):
        make_plan(rep, "layer", 3, method="angular")


def test_parsers():
    assert parse_count("8", 30) == 8 and parse_count(0.25, 30) == 8 and parse_count("10%", 30) == 3
    assert parse_count(2.0, 30) == 2
    for bad in ("0", "-1", "x", 1.5, True):
        with pytest.raises(ValueError):
            parse_count(bad, 30)
    assert (
        parse_protect("0,1, 29") == [0, 1, 29]
        and parse_protect("none") == []
        and parse_protect(None) is None
    )
    with pytest.raises(ValueError, match="comma-separated"):
        parse_protect("a,b")


@pytest.fixture(scope="module")
def tiny_profiled():
    from entrodrop_fast.profile.inmemory import ProfileSettings, profile
    from entrodrop_fast.profile.report import build_report

    model = tiny_model("llama", "mixed", num_hidden_layers=6)
    windows = torch.randint(3, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    settings = ProfileSettings(methods=("bucket", "cosine"), batch_size=2, backend="torch")
    report = build_report(
        profile(model, windows, settings, progress=False),
        model_info={"name": "tiny"},
        data_info={},
        settings={},
        model=model,
    )
    return model, windows, settings, report


def test_plan_from_real_profile_drives_surgery(tiny_profiled, tmp_path):
    from entrodrop_fast.profile.report import write_report

    model, windows, _, report = tiny_profiled
    out = write_report(report, tmp_path / "rep", png=False)
    plan = make_plan(out, "attn", 2, protect=[5])
    assert plan["report"] == str(out) and plan["model"]["num_layers"] == 6
    scores = {r["layer"]: r["score"] for r in plan["ranked"]}
    expected = sorted(range(5), key=lambda i: scores[i])[:2]
    assert plan["drop"]["attn"] == sorted(expected)
    ids = windows[:1, :10]
    ref = manual_reference_logits(model, plan["drop"], ids)
    pruned = copy.deepcopy(model)
    drop_blocks_(pruned, plan)
    with torch.no_grad():
        assert (pruned(ids).logits - ref).abs().max().item() <= 1e-5


def test_iterative_plan(tiny_profiled):
    model, windows, settings, report = tiny_profiled
    m = copy.deepcopy(model)
    plan = iterative_plan(m, windows, "layer", 2, protect=[0], settings=settings)
    assert plan["iterative"] and len(plan["drop"]["layer"]) == 2 and 0 not in plan["drop"]["layer"]
    assert m.config.num_hidden_layers == 4 and len(plan["steps"]) == 2
    one_shot = make_plan(report, "layer", 1, protect=[0])
    assert plan["steps"][0]["layer"] == one_shot["drop"]["layer"][0]  # first step = one-shot best
    plan = iterative_plan(
        copy.deepcopy(model), windows, "attn", 2, protect="none", settings=settings
    )
    assert len(set(plan["drop"]["attn"])) == 2


def test_rank_cli(tmp_path, capsys):
    from entrodrop_fast.cli import main

    rep = synthetic_report()
    rep.update({"timing": {"samples": 1}, "settings": {}, "data": {}})
    rep_dir = tmp_path / "rep"
    rep_dir.mkdir()
    (rep_dir / "report.json").write_text(json.dumps(rep))
    out = tmp_path / "plan.json"
    assert main(["rank", str(rep_dir), "--kind", "attn", "--drop", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["drop"]["attn"] == [2, 4, 5]
    assert "0-based" in capsys.readouterr().out
    assert (
        main(
            [
                "rank",
                str(rep_dir / "report.json"),
                "--kind",
                "layer",
                "--drop",
                "25%",
                "--protect",
                "none",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["drop"]["layer"] == [0, 1]
    assert main(["rank", str(rep_dir), "--kind", "attn", "--drop", "7", "--out", str(out)]) == 1
    assert "only 5 are not protected" in capsys.readouterr().err


# ---- protection rules and the paper preset (issue 14) ----------------------------------------


def _two_method_report() -> dict:
    """The synthetic report plus a knn profile whose stream entropy never falls (no stage 1)."""
    rep = synthetic_report()
    rising = [float(i) for i in range(len(rep["points"]))]
    rep["entropy"]["knn"] = {"mean": rising, "stderr": [0.0] * len(rising)}
    for b in rep["blocks"]:
        b["delta"]["knn"] = {"mean": float(b["layer"]) / 10, "stderr": 0.01}  # layer 0 lowest
    return rep


def test_protect_rules_shared_paper_and_per_method():
    from entrodrop_fast.prune.ranking import protected_by_rule

    rep = _two_method_report()
    assert protected_by_rule(rep, "shared", stage1_method="bucket")[0] == [0, 1, 7]
    assert protected_by_rule(rep, "shared", stage1_method="knn")[0] == [7]  # knn sees no stage 1
    assert protected_by_rule(rep, "paper")[0] == [0, 1, 7]
    assert protected_by_rule(rep, "per-method", method="knn")[0] == [7]
    assert protected_by_rule(rep, "per-method", method="bucket")[0] == [0, 1, 7]
    with pytest.raises(ValueError, match="no 'renyi' entropy profile"):
        protected_by_rule(rep, "shared", stage1_method="renyi")
    with pytest.raises(ValueError, match="unknown protect rule"):
        protected_by_rule(rep, "fair")
    # the same rule for two methods: knn may no longer drop layer 0, it did by its own profile
    assert make_plan(rep, "attn", 2, method="knn")["drop"]["attn"] == [0, 1]
    shared = make_plan(rep, "attn", 2, method="knn", protect_rule="shared", stage1_method="bucket")
    assert shared["drop"]["attn"] == [2, 3] and shared["protected_reason"]["rule"] == "shared"


def test_paper_preset_plan_uses_knn_and_fixed_protection():
    from entrodrop_fast.profile.presets import paper_preset, paper_protected

    rep = _two_method_report()
    plan = make_plan(rep, "attn", 2, preset="paper")
    assert plan["method"] == "knn" and plan["protected"] == [0, 1, 7]
    assert plan["drop"]["attn"] == [2, 3]
    assert make_plan(rep, "attn", 2, preset="paper", protect="none")["drop"]["attn"] == [
        0,
        1,
    ]  # --protect wins
    assert make_plan(rep, "attn", 1, preset="paper", method="bucket")["method"] == "bucket"
    # a report profiled with the preset applies its rule without being told
    rep["settings"] = {"preset": "paper"}
    rep["entropy"] = {"knn": rep["entropy"]["knn"]}
    assert make_plan(rep, "attn", 2)["protected"] == [0, 1, 7]
    mistral = paper_preset("mistral", 32, "cuda")
    assert (mistral["method"], mistral["bins"], mistral["dtype"], mistral["protect"]) == (
        "bucket",
        80,
        "fp16",
        [0, 1, 31],
    )
    llama = paper_preset("llama", 30, "cpu")
    assert (llama["method"], llama["k"], llama["form"], llama["batch_size"], llama["dtype"]) == (
        "knn",
        25,
        "paper",
        1,
        "fp32",
    )
    assert paper_protected(1) == [0] and paper_protected(2) == [0, 1]
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        make_plan(rep, "attn", 1, preset="fast")


def test_block_influence_is_cosine_on_layers():
    rep = synthetic_report()
    bi = make_plan(rep, "layer", 2, method="block_influence", protect="none")
    cos = make_plan(rep, "layer", 2, method="cosine", protect="none")
    assert bi["drop"] == cos["drop"] == {"attn": [], "mlp": [], "layer": [0, 2]}
    with pytest.raises(ValueError, match="whole layers"):
        make_plan(rep, "attn", 2, method="block_influence")


def test_rank_cli_preset_paper(tmp_path, capsys):
    from entrodrop_fast.cli import main

    rep = _two_method_report()
    (tmp_path / "report.json").write_text(json.dumps(rep))
    assert (
        main(
            [
                "rank",
                str(tmp_path),
                "--kind",
                "attn",
                "--drop",
                "2",
                "--preset",
                "paper",
                "--out",
                str(tmp_path / "plan.json"),
            ]
        )
        == 0
    )
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["method"] == "knn" and plan["protected"] == [0, 1, 7]
    with pytest.raises(SystemExit):
        main(["rank", str(tmp_path), "--kind", "attn", "--drop", "2", "--preset", "fast"])
