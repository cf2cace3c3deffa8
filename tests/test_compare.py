"""entrodrop compare on a tiny random Llama: rows, determinism, outputs; Spearman."""

import json

import pytest
from helpers import DOCS, CharTokenizer, char_llama

from entrodrop_fast.evaluate import compare as C
from entrodrop_fast.models.loading import LoadedModel
from entrodrop_fast.outputs import MARKER, OutputError


@pytest.fixture(scope="module")
def lm():
    return LoadedModel(char_llama(5), CharTokenizer(), "tiny", "tiny", "dir")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(DOCS):
        (d / f"doc{i:02d}.txt").write_text(doc * 2)
    return str(d)


# a small comparison, quietly: 6 calibration windows of 48 tokens, no speed test
QUICK = dict(samples=6, seq_len=48, speed=False, progress=False, log=lambda *a: None)


def _run(lm, corpus):
    return C.compare(
        lm,
        kinds=("attn", "layer"),
        counts=(1, 2),
        methods=("bucket", "random"),
        corpus=corpus,
        eval_windows=2,
        eval_items=6,
        **QUICK,
    )


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
    assert {p.name for p in out.iterdir()} == {
        "comparison.json",
        "comparison.md",
        "comparison.png",
        MARKER,
    }
    md = (out / "comparison.md").read_text()
    assert "| attn | bucket | 1 |" in md and "% of dense retained" in md
    assert json.loads((out / "comparison.json").read_text())["rows"][0]["kind"] == "attn"


def test_write_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="did not write there"):
        C.write(
            {"rows": [], "dense": {"perplexity": 1.0, "params": 1}, "model": {}},
            tmp_path,
            png=False,
        )
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
    report = C.profile_report(
        lm, corpus, samples=6, seq_len=48, seed=1, methods=("bucket",), progress=False
    )
    same = C.calibration_agreement(report, report, "attn", "bucket", [1, 2])
    assert same["spearman"] == pytest.approx(1.0)
    assert same["overlap"]["2"]["shared"] == 2
    flipped = json.loads(json.dumps(report))
    for b in flipped["blocks"]:
        b["delta"]["bucket"]["mean"] = -b["delta"]["bucket"]["mean"]
    assert C.calibration_agreement(report, flipped, "attn", "bucket", [1])[
        "spearman"
    ] == pytest.approx(-1.0)


def test_calibration_agreement_over_droppable_blocks_only(lm, corpus):
    """Protected blocks (here layer 0 and the last, fixed) are left out of
    spearman_droppable: moving only their scores changes the all-blocks figure, not it."""
    report = C.profile_report(
        lm, corpus, samples=6, seq_len=48, seed=1, methods=("bucket",), progress=False
    )
    blocks = sorted((b for b in report["blocks"] if b["kind"] == "attn"), key=lambda b: b["layer"])
    last = blocks[-1]["layer"]
    moved = json.loads(json.dumps(report))
    for b in moved["blocks"]:
        if b["kind"] == "attn" and b["layer"] in (0, last):  # swap the protected ends' scores
            other = 0 if b["layer"] == last else last
            b["delta"]["bucket"]["mean"] = next(
                x["delta"]["bucket"]["mean"] for x in blocks if x["layer"] == other
            ) * 100  # fmt: skip
    prot = [0, last]
    a = C.calibration_agreement(report, moved, "attn", "bucket", [1], protect=(prot, prot))
    assert a["droppable"] == len(blocks) - 2
    assert a["spearman_droppable"] == pytest.approx(1.0)
    assert a["spearman"] < 1.0


def test_lm_eval_missing_gives_a_clear_message(lm, monkeypatch):
    import builtins

    from entrodrop_fast.evaluate.lm_eval import LmEvalUnavailable, run_lm_eval

    real_import = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name.startswith("lm_eval"):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(
        LmEvalUnavailable, match=r"not installed: pip install 'entrodrop_fast\[eval\]'"
    ):
        run_lm_eval(lm.model, lm.tokenizer, ["piqa"])


# ---- the fair protocol (issue 14) ------------------------------------------------------------


def test_entropy_methods_match_the_runner():
    from entrodrop_fast.profile.inmemory import ENTROPY_METHODS

    assert C.ENTROPY == ENTROPY_METHODS


def test_method_names_need_no_torch():
    # the method table (profile.methods), the profile package and compare's names import
    # without torch: the package root, which loads the estimators, is stood in for
    import os
    import subprocess
    import sys

    import entrodrop_fast

    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('entrodrop_fast')\n"
        f"pkg.__path__ = [{os.path.dirname(entrodrop_fast.__file__)!r}]\n"
        "sys.modules['entrodrop_fast'] = pkg\n"
        "import entrodrop_fast.profile, entrodrop_fast.profile.methods\n"
        "import entrodrop_fast.evaluate.compare\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


def test_protocol_one_rule_for_all_methods_cache_and_paired_tests(lm, corpus):
    comp = C.compare(
        lm,
        kinds=("attn", "layer"),
        counts=(1, 2),
        methods=("bucket", "knn", "cosine", "block_influence", "angular", "random"),
        corpus=corpus,
        eval_windows=3,
        eval_items=6,
        **QUICK,
        protect_rule="paper",
        iterative=("knn",),
        iterative_samples=4,
        k=5,
    )
    rows = comp["rows"]
    assert {tuple(r["protected"]) for r in rows} == {
        (0, 1, 4)
    }  # one rule, every method, random included
    assert not any(set(r["dropped"]) & {0, 1, 4} for r in rows)
    assert {r["method"] for r in rows if r["kind"] == "attn"} == {
        "bucket",
        "knn",
        "cosine",
        "random",
    }  # BI / angular: layers only
    assert {"block_influence", "angular"} <= {r["method"] for r in rows if r["kind"] == "layer"}
    bi = [r for r in rows if r["method"] == "block_influence"]
    cos = [r for r in rows if r["method"] == "cosine" and r["kind"] == "layer"]
    assert [r["dropped"] for r in bi] == [
        r["dropped"] for r in cos
    ]  # ShortGPT's BI is cosine on layers
    ang = [r for r in rows if r["method"] == "angular"]
    assert all(
        r["dropped"] == list(range(r["dropped"][0], r["dropped"][0] + r["k"])) for r in ang
    )  # spans
    assert sorted(
        r["seed"] for r in rows if r["method"] == "random" and r["kind"] == "attn" and r["k"] == 1
    ) == [0, 1, 2]
    it = [r for r in rows if r.get("setting") == "iterative"]
    assert {(r["kind"], r["k"]) for r in it} == {
        ("attn", 1),
        ("attn", 2),
        ("layer", 1),
        ("layer", 2),
    }
    for kind in ("attn", "layer"):  # K = 1 of the iterative order is K = 2's first step
        one, two = (next(r for r in it if r["kind"] == kind and r["k"] == k) for k in (1, 2))
        assert set(one["dropped"]) < set(two["dropped"])
    # evaluations are cached by drop set: identical drop sets, identical numbers, one evaluation
    keys = {r["eval_key"] for r in rows}
    assert len(comp["evaluations"]) == len(keys) + 1  # + dense
    assert sum(r["cached"] for r in rows) == len(rows) - len(keys)
    for r in rows:
        twin = next(s for s in rows if s["eval_key"] == r["eval_key"])
        assert (r["perplexity"], r["continuation"]) == (twin["perplexity"], twin["continuation"])
        lo, hi = r["ci95"]["perplexity"]
        assert lo <= r["perplexity"] <= hi
    # the paired tests: best entropy method vs cosine at each K, on the same items
    assert {(t["kind"], t["k"]) for t in comp["paired"]} == {
        ("attn", 1),
        ("attn", 2),
        ("layer", 1),
        ("layer", 2),
    }
    for t in comp["paired"]:
        assert t["a"] in ("bucket", "knn") and t["b"] == "cosine"
        assert t["mcnemar"]["n"] == 12 and 0 <= t["mcnemar"]["p"] <= 1
        assert t["nll_diff"]["n"] == 3
        if t["same_blocks"]:
            assert t["nll_diff"]["mean"] == 0 and t["mcnemar"]["p"] == 1
    md = C.markdown(comp)
    assert (
        "Paired tests" in md
        and "McNemar" in md
        and "Random baseline over seeds" in md
        and "knn (iterative)" in md
    )
    assert "layers 0, 1 and the last, fixed" in md


def test_shared_rule_detects_stage1_once(lm, corpus):
    comp = C.compare(
        lm,
        kinds=("attn",),
        counts=(1,),
        methods=("knn", "cosine", "random"),
        corpus=corpus,
        eval_windows=2,
        eval_items=4,
        **QUICK,
        protect_rule="shared",
        stage1_method="bucket",
        random_seeds=(5,),
        k=5,
    )
    from entrodrop_fast.prune.ranking import protected_by_rule

    want = protected_by_rule(comp["report"], "shared", stage1_method="bucket")[0]
    assert (
        "bucket" in comp["report"]["entropy"]
    )  # profiled for the protection although not compared
    assert all(r["protected"] == want for r in comp["rows"])
    assert comp["protocol"]["stage1_method"] == "bucket"


def test_compare_bad_protocol_input():
    with pytest.raises(ValueError, match="protect rule"):
        C.compare(None, protect_rule="fair")
    with pytest.raises(ValueError, match="iterative"):
        C.compare(None, methods=("bucket",), iterative=("cosine",))


def test_paired_statistics_closed_forms():
    from entrodrop_fast.evaluate.paired import binom_two_sided, mcnemar_exact, paired_mean_diff

    # 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    assert binom_two_sided(1, 10) == pytest.approx(22 / 1024)
    assert binom_two_sided(9, 10) == pytest.approx(22 / 1024)
    assert binom_two_sided(5, 10) == 1.0 and binom_two_sided(0, 0) == 1.0
    a = [1] * 8 + [0] * 2 + [1] * 5
    b = [0] * 8 + [1] * 2 + [1] * 5
    t = mcnemar_exact(a, b)
    assert (t["a_only"], t["b_only"], t["n"]) == (8, 2, 15)
    assert t["p"] == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert t["diff"] == pytest.approx(6 / 15)
    d = paired_mean_diff([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert d["mean"] == 2.0 and d["ci95"][0] == pytest.approx(2 - 1.959963984540054 * (1 / 3**0.5))
    one = paired_mean_diff([1.5], [0.5])  # one pair: no spread, no interval (was [m, m])
    assert one == {"n": 1, "mean": 1.0, "ci95": None}
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact([1], [1, 0])
    with pytest.raises(ValueError, match="0 or 1"):
        mcnemar_exact([2], [1])
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 7), (3, 17), (40, 100), (250, 600)):
        assert binom_two_sided(k, n) == pytest.approx(
            scipy_stats.binomtest(k, n, 0.5).pvalue, rel=1e-9
        )


def test_compare_cli_rejects_bad_protocol_options(capsys):
    from entrodrop_fast.cli import main

    assert (
        main(["compare", "--methods", "bucket", "--iterative", "cosine", "--out", "/nonexistent/x"])
        == 1
    )
    assert "--iterative: unknown 'cosine'" in capsys.readouterr().err
    assert main(["compare", "--stage1-method", "cosine", "--out", "/nonexistent/x"]) == 1
    assert "--stage1-method must be an entropy method" in capsys.readouterr().err
    assert (
        main(
            ["compare", "--preset", "paper", "--protect-rule", "shared", "--out", "/nonexistent/x"]
        )
        == 1
    )
    assert "contradicts" in capsys.readouterr().err
    assert (
        main(
            [
                "compare",
                "--methods",
                "angular",
                "--kind",
                "layer",
                "--drop",
                "25%",
                "--out",
                "/nonexistent/x",
            ]
        )
        == 1
    )
    assert "integer --drop" in capsys.readouterr().err


def test_second_rule_reuses_the_report_and_the_evaluations(lm, corpus):
    kw = dict(
        kinds=("layer",),
        counts=(1,),
        methods=("bucket", "cosine"),
        corpus=corpus,
        eval_windows=2,
        eval_items=4,
        **QUICK,
    )
    cache: dict = {}
    a = C.compare(lm, protect_rule="shared", eval_cache=cache, **kw)
    n = len(cache)
    b = C.compare(lm, protect_rule="paper", report=a["report"], eval_cache=cache, **kw)
    assert b["report"] is a["report"]  # no second profile
    fresh = {r["eval_key"] for r in b["rows"]} - {r["eval_key"] for r in a["rows"]}
    assert len(cache) == n + len(fresh)  # only the drop sets the new rule changed were evaluated
    assert all(r["cached"] for r in b["rows"] if r["eval_key"] not in fresh)
    assert set(b["evaluations"]) == {C.drop_key({})} | {r["eval_key"] for r in b["rows"]}
    with pytest.raises(ValueError, match="no knn profile"):
        C.compare(lm, protect_rule="paper", report=a["report"], **{**kw, "methods": ("knn",)})


def test_perplexity_of_one_window_has_no_interval_and_two_have_one_around_it():
    """One window: ci95 None (it was a zero-width interval that missed the perplexity in the
    8th digit); two or more: an interval that holds the perplexity."""
    from helpers import char_llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from entrodrop_fast.evaluate.heldout import perplexity

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *"abcdefgh"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    model = char_llama(2)
    docs = [" ".join("abcdefgh"[(i * 7 + j) % 8] for j in range(40)) for i in range(4)]
    one = perplexity(model, tok, docs, seq_len=32, max_windows=1)
    assert one["windows"] == 1 and one["ci95"] is None
    assert one["nll"] == pytest.approx(one["window_nll"][0], rel=1e-12)
    many = perplexity(model, tok, docs, seq_len=32, max_windows=4)
    lo, hi = many["ci95"]
    assert many["windows"] == 4 and lo < many["perplexity"] < hi


def test_study_calibration_gives_each_protection_rule_its_own(lm, corpus, monkeypatch):
    """benches/paper_compare.py: the calibration comparison of the paper rule protects 0, 1
    and the last layer in both profiles (not the shared rule's layers), and every rule's
    comparison keeps the second corpus's profile."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "paper_compare", Path(__file__).resolve().parents[1] / "benches" / "paper_compare.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kw = dict(samples=6, seq_len=48, methods=("bucket",), progress=False)
    report = C.profile_report(lm, corpus, seed=1, **kw)
    other = C.profile_report(lm, corpus, seed=7, **kw)
    monkeypatch.setattr(C, "profile_report", lambda *a, **k: other)
    results = {
        rule: {"report": report, "protocol": {"protect_rule": rule, "stage1_method": "bucket"}}
        for rule in ("shared", "paper")
    }
    grid = {"rules": ["shared", "paper"], "second_corpus": "x", "kinds": ["attn"]}
    grid |= {"methods": ["bucket"], "samples": 6, "seq_len": 48}
    mod.calibrate("tiny", lm, results, grid, [1], False)
    from entrodrop_fast.prune.ranking import protected_by_rule

    L = len([b for b in report["blocks"] if b["kind"] == "attn"])
    for rule, comp in results.items():
        assert comp["calibration_report"] is other
        (a,) = comp["calibration_agreement"]
        if rule == "paper":  # layers 0, 1 and the last are protected in both profiles
            assert a["droppable"] == L - 3
        want = C.calibration_agreement(
            report,
            other,
            "attn",
            "bucket",
            [1],
            protect=tuple(
                protected_by_rule(r, rule, method="bucket", stage1_method="bucket")[0]
                for r in (report, other)
            ),
        )
        assert a == want | {"method": "bucket"}


def test_calibration_agreement_with_fractions_and_a_k_too_large_for_one_profile(lm, corpus):
    """A user's test: --drop 0.1 gave no overlap and "droppable" = every block; a K that the
    second profile's protection cannot hold lost the whole run. Fractions now resolve per
    profile, and such a K is recorded as not possible while the others are kept."""
    report = C.profile_report(
        lm, corpus, samples=6, seq_len=48, seed=1, methods=("bucket",), progress=False
    )
    L = len([b for b in report["blocks"] if b["kind"] == "attn"])
    a = C.calibration_agreement(report, report, "attn", "bucket", ["40%"], protect=([0], [0]))
    assert a["overlap"]["40%"]["of"] == round(0.4 * (L - 1)) and a["droppable"] == L - 1
    for r in (a["spearman"], a["spearman_droppable"]):  # clamped: never 1.0000000000000002
        assert r == pytest.approx(1.0) and -1.0 <= r <= 1.0
    a = C.calibration_agreement(report, report, "attn", "bucket", [1, L - 1], protect=([0], [0, 1]))
    assert a["overlap"]["1"]["shared"] == 1
    assert "second profile" in a["overlap"][str(L - 1)]["error"]
    assert a["droppable"] == L - 2


def test_plot_of_one_k_has_room_around_it_and_its_whole_title(tmp_path, monkeypatch):
    # a fresh user's test: with one panel the title was cut at both ends, and one K got an
    # axis from 1.9 to 2.1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    rows = [
        {
            "kind": "layer",
            "method": m,
            "k": 2,
            "eval_key": m,
            "perplexity": p,
            "retained": 0.9,
            "ci95": {"perplexity": [0.9 * p, 1.1 * p]},
        }
        for m, p in (("bucket", 30.0), ("cosine", 25.0))
    ]
    C.plot(
        {"rows": rows, "model": {"name": "SmolLM2-135M-Instruct (built-in)"}}, tmp_path / "c.png"
    )
    fig = figs[0]
    title = fig._suptitle.get_text()
    assert title.replace("\n", " ").startswith("SmolLM2-135M-Instruct") and "\n" in title
    assert max(len(line) for line in title.split("\n")) <= 61  # about one panel's width
    ax_r, ax_p = fig.axes[0], fig.axes[1]
    assert ax_r.get_xlim() == (-0.5, 2.5) and list(ax_r.get_xticks()) == [0, 2]
    assert ax_p.get_xlim() == (1.5, 2.5) and list(ax_p.get_xticks()) == [2]
    assert (tmp_path / "c.png").stat().st_size > 0


def test_a_cached_dense_evaluation_is_not_announced_again(lm, corpus):
    # a fresh user's test: a resumed study printed "evaluating the dense model ..." although
    # it took the evaluation from its log
    cache, said = {}, []
    kw = dict(QUICK, log=said.append)
    args = dict(kinds=("layer",), counts=(1,), methods=("bucket",), corpus=corpus)
    C.compare(lm, eval_windows=2, eval_items=6, eval_cache=cache, **args, **kw)
    assert any("evaluating the dense model" in s for s in said)
    said.clear()
    C.compare(lm, eval_windows=2, eval_items=6, eval_cache=cache, **args, **kw)
    assert said and not any("evaluating the dense model" in s for s in said)
