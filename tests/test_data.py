"""Calibration data: corpora and seeded windows."""

from __future__ import annotations

import json

import pytest
import torch

from entrodrop_fast.data import CorpusError, calibration_windows, load_corpus, sample_windows


class CharTokenizer:
    """One token per character (tests only); the call signature of an HF tokenizer."""

    def __call__(self, docs, add_special_tokens=True):
        return {"input_ids": [[ord(c) % 97 for c in d] for d in docs]}


def test_builtin_corpus():
    c = load_corpus()
    assert c.name.startswith("builtin") and len(c.documents) > 50
    assert sum(map(len, c.documents)) > 400_000


def test_text_dir_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello " * 50)
    f = tmp_path / "one.txt"
    f.write_text("x" * 10)
    assert load_corpus(str(f)).documents == ["x" * 10]
    d = tmp_path / "dir"
    d.mkdir()
    (d / "1.txt").write_text("one")
    (d / "2.txt").write_text("two")
    (d / "skip.md").write_text("no")
    assert load_corpus(str(d)).documents == ["one", "two"]
    j = tmp_path / "c.jsonl"
    j.write_text(json.dumps({"body": "first"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    assert load_corpus(str(j), text_field="body").documents == ["first", "second"]
    with pytest.raises(CorpusError, match="no field 'text'.*with text_field"):
        load_corpus(str(j))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(CorpusError, match="bad.jsonl:1: not valid JSON"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    with pytest.raises(CorpusError, match="corpus not found"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_hf_dataset_needs_datasets_or_hub():
    with pytest.raises(CorpusError, match="datasets|could not load"):
        load_corpus("hf:entrodrop-test/none")


def test_windows_seeded_and_inside_documents():
    docs = [list(range(1000, 1000 + n)) for n in (10, 300, 50, 700)]
    w = sample_windows(docs, samples=16, seq_len=64, seed=2024)
    assert w.shape == (16, 64) and w.dtype == torch.long
    assert torch.equal(w, sample_windows(docs, samples=16, seq_len=64, seed=2024))
    assert not torch.equal(w, sample_windows(docs, samples=16, seq_len=64, seed=7))
    for row in w:  # consecutive tokens of one document longer than the window
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 64))
        assert 1000 <= int(row[0]) and int(row[-1]) < 1700


def test_windows_too_small_is_clear():
    with pytest.raises(CorpusError, match="no document is longer than 256 tokens.*longest 100"):
        sample_windows([[1] * 100, [2] * 30], samples=4, seq_len=256)
    with pytest.raises(CorpusError, match="only 3 distinct windows, fewer than the 10"):
        sample_windows([[1] * 12], samples=10, seq_len=10)


def test_calibration_windows_builtin_paper_defaults():
    w, info = calibration_windows(CharTokenizer())
    assert w.shape == (128, 256) and info["seed"] == 2024 and info["eligible_documents"] > 0


def test_calibration_leaves_the_heldout_documents_out():
    from entrodrop_fast.data import Corpus, split_documents

    docs = [f"doc{i} " + ("abcdefgh " * 40) for i in range(10)]
    _, held = split_documents(docs)
    marked = Corpus("marked", [d.replace("abcdefgh", "ZZZZZZZZ") if d in held else d for d in docs])
    tok = CharTokenizer()
    w, info = calibration_windows(tok, marked, samples=40, seq_len=32)
    z = ord("Z") % 97
    assert info["heldout_documents_excluded"] == 2
    assert not (w == z).any()  # no window comes from a held-out document
    w_all, info_all = calibration_windows(
        tok, marked, samples=40, seq_len=32, exclude_heldout=False
    )
    assert info_all["heldout_documents_excluded"] == 0 and (w_all == z).any()


def test_windows_drawn_from_little_text_warn_and_say_how_much():
    # 128 windows of 64 tokens from one document of 300 tokens: each token about 27 times
    with pytest.warns(
        UserWarning,
        match="128 windows of 64 tokens \\(8192 tokens\\) are drawn "
        "from 300 tokens in 1 document\\(s\\), so each token is seen about 27 times",
    ):
        sample_windows([list(range(300))], samples=128, seq_len=64)
    import warnings

    with warnings.catch_warnings():  # 4x the text asked for, or the built-in default: quiet
        warnings.simplefilter("error")
        sample_windows([list(range(2048))], samples=128, seq_len=64)
        calibration_windows(CharTokenizer())
