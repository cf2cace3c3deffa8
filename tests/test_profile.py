"""The profiler end to end: runner, report, CLI; agreement across batch sizes and backends."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import TINY, tiny_dir_and_corpus, tiny_model

import entrodrop_fast as ef
from entrodrop_fast.outputs import MARKER
from entrodrop_fast.profile.inmemory import ALL_METHODS, ProfileSettings, parse_methods, profile
from entrodrop_fast.profile.report import (
    build_report,
    load_report,
    ranking,
    ranking_table,
    write_report,
)


def _windows(n=4, t=24, seed=0):
    return torch.randint(3, 97, (n, t), generator=torch.Generator().manual_seed(seed))


def _max_rel(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-3)).max())


def test_parse_methods():
    assert parse_methods("bucket,cosine") == ("bucket", "cosine")
    assert parse_methods(["knn", "bucket,knn"]) == ("knn", "bucket")
    assert parse_methods("all") == ALL_METHODS
    with pytest.raises(ValueError, match="unknown method 'entropy'.*bucket"):
        parse_methods("entropy")


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_type_profiles(name, tmp_path):
    model = tiny_model(name, seed=3)
    res = profile(
        model,
        _windows(3, 20),
        ProfileSettings(
            methods=("bucket", "gaussian_diag", "cosine", "angular"),
            batch_size=2,
            bins=8,
            spans=(1, 2),
        ),
        progress=False,
    )
    assert res["samples"] == 3 and res["num_layers"] == 3
    for kind in ("attn", "mlp", "layer"):
        d = res["delta"]["bucket"][kind]["mean"]
        assert len(d) == 3 and all(v == v for v in d)
    rep = build_report(res, model_info={"name": name}, data_info={}, settings={}, model=model)
    assert len(rep["blocks"]) == 9
    out = write_report(rep, tmp_path / "rep", png=False)
    assert (out / "report.json").is_file() and (out / "scores.csv").is_file()


def test_batch_size_and_backends_agree():
    model = tiny_model("llama", seed=4)
    w = _windows(8, 40, seed=1)
    base = profile(
        model,
        w,
        ProfileSettings(methods=("bucket", "cosine"), batch_size=1, backend="torch"),
        progress=False,
    )
    runs = {
        "bs8": profile(
            model,
            w,
            ProfileSettings(methods=("bucket", "cosine"), batch_size=8, backend="torch"),
            progress=False,
        )
    }
    if ef.backends()["cpp"]["available"]:
        runs["cpp"] = profile(
            model,
            w,
            ProfileSettings(methods=("bucket", "cosine"), batch_size=3, backend="cpp"),
            progress=False,
        )
    for label, r in runs.items():
        for kind in ("attn", "mlp", "layer"):
            assert (
                _max_rel(r["delta"]["bucket"][kind]["mean"], base["delta"]["bucket"][kind]["mean"])
                < 1e-4
            ), (label, kind)
            assert _max_rel(r["cosine"][kind]["mean"], base["cosine"][kind]["mean"]) < 1e-4, (
                label,
                kind,
            )
        assert _max_rel(r["entropy"]["bucket"]["mean"], base["entropy"]["bucket"]["mean"]) < 1e-6


def test_report_files_and_ranking(tmp_path):
    model = tiny_model("qwen2", seed=5)
    res = profile(
        model,
        _windows(4, 32),
        ProfileSettings(
            methods=("bucket", "cosine", "angular"), batch_size=2, bins=10, spans=(1, 3)
        ),
        progress=False,
    )
    rep = build_report(
        res,
        model_info={"name": "tiny"},
        data_info={"corpus": "x"},
        settings={"samples": 4},
        model=model,
    )
    out = write_report(rep, tmp_path / "r")
    assert {p.name for p in out.iterdir()} == {
        "report.json",
        "scores.csv",
        "profile.png",
        "ranking.txt",
        MARKER,
    }
    again = load_report(out)
    assert again["blocks"][0]["delta"]["bucket"]["mean"] == pytest.approx(
        rep["blocks"][0]["delta"]["bucket"]["mean"]
    )
    assert set(again["versions"]) >= {"torch", "transformers", "entrodrop_fast"}
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 9 and "delta_bucket" in rows[0] and "angular_3" in rows[0]
    attn = ranking(rep, "attn")
    assert [b["delta"]["bucket"]["mean"] for b in attn] == sorted(
        b["delta"]["bucket"]["mean"] for b in attn
    )
    layer0 = next(b for b in rep["blocks"] if b["kind"] == "layer" and b["layer"] == 0)
    assert set(layer0["angular"]) == {"1", "3"}
    assert "rank" in ranking_table(rep)
    # overwriting an existing report replaces it whole
    write_report(rep, out, png=False)
    assert not (out / "profile.png").exists()


def test_cli_profile(tmp_path, capsys):
    from entrodrop_fast.cli import main

    d, corpus = tiny_dir_and_corpus(tmp_path)
    out = tmp_path / "report"
    rc = main(
        [
            "profile",
            str(d),
            "--corpus",
            str(corpus),
            "--samples",
            "6",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--method",
            "bucket,knn",
            "--method",
            "cosine",
            "--k",
            "5",
            "--bins",
            "12",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "attn" in text and "rank" in text
    rep = json.loads((out / "report.json").read_text())
    assert (
        rep["settings"]["methods"] == ["bucket", "knn", "cosine"] and rep["settings"]["bins"] == 12
    )
    assert rep["data"]["samples"] == 6 and rep["model"]["model_type"] == "llama"
    # the model's identity, which prune --report checks against the model it prunes
    from entrodrop_fast.prune.surgery import model_identity

    assert {
        k: rep["model"][k] for k in model_identity(json.loads((d / "config.json").read_text()))
    } == model_identity(json.loads((d / "config.json").read_text()))
    # a corpus too small for the request fails cleanly, without a traceback
    rc = main(
        [
            "profile",
            str(d),
            "--corpus",
            str(corpus),
            "--seq-len",
            "32",
            "--samples",
            "1000",
            "--out",
            str(tmp_path / "r2"),
            "-q",
        ]
    )
    assert rc == 1 and "corpus too small" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    rc = main(["profile", str(tmp_path / "nope"), "--out", str(tmp_path / "r3"), "-q"])
    assert rc == 1 and "no such model" in capsys.readouterr().err


@pytest.mark.model
def test_smollm2_profile_agrees_across_batch_and_backend():
    """The built-in model: torch vs cpp give the same ΔH (1e-4 rel); batch size 1 vs 8 too,
    up to the few values that fall on the other side of a bin edge: the fp32 forward itself
    differs in the last bits with the batch shape (GEMM blocking, CPU dependent), and each
    flip moves a channel's entropy by ~log(n)/n. Seen: 0.0067 nats on ΔH ~ 5, 8e-6 of H."""
    from entrodrop_fast.data import calibration_windows
    from entrodrop_fast.models import load_model

    lm = load_model()
    w, _ = calibration_windows(lm.tokenizer, samples=8, seq_len=64)
    backend = "cpp" if ef.backends()["cpp"]["available"] else "torch"
    a = profile(
        lm.model,
        w,
        ProfileSettings(methods=("bucket",), batch_size=1, backend=backend),
        progress=False,
    )
    b = profile(
        lm.model,
        w,
        ProfileSettings(methods=("bucket",), batch_size=8, backend=backend),
        progress=False,
    )
    h_a, h_b = (torch.tensor(r["entropy"]["bucket"]["mean"], dtype=torch.float64) for r in (a, b))
    assert float(((h_a - h_b).abs() / h_b.abs()).max()) < 5e-5
    for kind in ("attn", "mlp", "layer"):
        d_a, d_b = (
            torch.tensor(r["delta"]["bucket"][kind]["mean"], dtype=torch.float64) for r in (a, b)
        )
        assert float((d_a - d_b).abs().max()) < 0.03, kind  # a few bin flips, on ΔH of order 1-10
    if backend == "cpp":
        t = profile(
            lm.model,
            w[:1],
            ProfileSettings(methods=("bucket",), batch_size=1, backend="torch"),
            progress=False,
        )
        c = profile(
            lm.model,
            w[:1],
            ProfileSettings(methods=("bucket",), batch_size=1, backend="cpp"),
            progress=False,
        )
        for kind in ("attn", "mlp", "layer"):
            assert (
                _max_rel(t["delta"]["bucket"][kind]["mean"], c["delta"]["bucket"][kind]["mean"])
                < 1e-4
            ), kind
    h = a["entropy"]["bucket"]["mean"]
    assert len(h) == 61 and all(v > 0 for v in h)


def test_nan_activations_give_a_clear_error():
    model = tiny_model("llama", seed=7)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        profile(model, _windows(2, 16), ProfileSettings(methods=("bucket",)), progress=False)
