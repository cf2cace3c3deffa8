"""entrodrop compare on a tiny random Llama: rows, determinism, outputs; Spearman."""

import json

import pytest
import torch
from test_evaluate import DOCS, CharTokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from entrodrop_fast import compare as C
from entrodrop_fast.models.loading import LoadedModel
from entrodrop_fast.outputs import MARKER, OutputError


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LoadedModel(LlamaForCausalLM(cfg).eval(), CharTokenizer(), "tiny", "tiny", "dir")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(DOCS):
        (d / f"doc{i:02d}.txt").write_text(doc * 2)
    return str(d)


def _run(lm, corpus):
    return C.compare(lm, kinds=("attn", "layer"), counts=(1, 2), methods=("bucket", "random"), corpus=corpus, samples=6, seq_len=48, eval_windows=2, eval_items=6, speed=False, progress=False, log=lambda *a: None)


def test_compare_rows_and_determinism(lm, corpus, tmp_path):
    a = _run(lm, corpus)
    assert len(a["rows"]) == 2 * 2 * (1 + 3)  # bucket, and random with 3 seeds
    for r in a["rows"]:
        assert len(r["dropped"]) == r["k"]
        assert r["params"] < a["dense"]["params"]
        assert r["perplexity"] > 0 and 0 <= r["continuation"] <= 1
    b = _run(lm, corpus)
    strip = lambda c: [{k: v for k, v in r.items() if k != "speed"} for r in c["rows"]]
    assert strip(a) == strip(b)  # same command, same table
    out = C.write(a, tmp_path / "cmp")
    assert {p.name for p in out.iterdir()} == {"comparison.json", "comparison.md", "comparison.png", MARKER}
    md = (out / "comparison.md").read_text()
    assert "| attn | bucket | 1 |" in md and "% of dense retained" in md
    assert json.loads((out / "comparison.json").read_text())["rows"][0]["kind"] == "attn"


def test_write_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="did not write there"):
        C.write({"rows": [], "dense": {"perplexity": 1.0, "params": 1}, "model": {}}, tmp_path, png=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_spearman_and_parsing():
    assert C.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert C.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert C.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert C.parse_counts("8,2,4") == [2, 4, 8]
    with pytest.raises(ValueError):
        C.parse_counts("0,2")
    with pytest.raises(ValueError, match="unknown"):
        C.parse_list("bucket,magic", C.SCORING + C.BASELINES, "--methods")


def test_calibration_agreement_of_identical_and_reversed_reports(lm, corpus):
    report = C.profile_report(lm, corpus, samples=6, seq_len=48, seed=1, methods=("bucket",), progress=False)
    same = C.calibration_agreement(report, report, "attn", "bucket", [1, 2])
    assert same["spearman"] == pytest.approx(1.0)
    assert same["overlap"]["2"]["shared"] == 2
    flipped = json.loads(json.dumps(report))
    for b in flipped["blocks"]:
        b["delta"]["bucket"]["mean"] = -b["delta"]["bucket"]["mean"]
    assert C.calibration_agreement(report, flipped, "attn", "bucket", [1])["spearman"] == pytest.approx(-1.0)


def test_lm_eval_missing_gives_a_clear_message(lm, monkeypatch):
    import builtins

    from entrodrop_fast.lm_eval_adapter import LmEvalUnavailable, run_lm_eval

    real_import = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name.startswith("lm_eval"):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(LmEvalUnavailable, match=r"not installed: pip install 'entrodrop_fast\[eval\]'"):
        run_lm_eval(lm.model, lm.tokenizer, ["piqa"])
