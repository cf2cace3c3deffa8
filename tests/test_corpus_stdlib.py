"""The second built-in corpus, stdlib-docs: deterministic, offline, disjoint from the first."""

import pytest
from helpers import CharTokenizer

from entrodrop_fast import data as D
from entrodrop_fast.evaluate.heldout import heldout_documents


def test_stdlib_docs_is_deterministic_and_sized():
    a = D._stdlib_docs_build()  # built twice from the sources, not the cache
    b = D._stdlib_docs_build()
    assert a.documents == b.documents and a.meta == b.meta
    assert a.meta["modules"] == len(a.documents) >= 50
    assert sum(map(len, a.documents)) == a.meta["characters"] <= D.STDLIB_DOCS_CHARS
    assert all(
        D.STDLIB_DOCS_MIN_CHARS // 2 <= len(d) <= D.STDLIB_DOCS_MODULE_CHARS for d in a.documents
    )
    c = D.load_corpus("stdlib-docs")
    assert c.documents == a.documents and c.name == "builtin:stdlib-docs"
    c.documents.clear()  # a caller's copy: the cache is not touched
    assert D.load_corpus("stdlib-docs").documents == a.documents


def test_stdlib_docs_shares_no_document_with_the_builtin_corpus():
    docs = D.load_corpus("stdlib-docs").documents
    topics = D.load_corpus(None).documents
    assert not set(docs) & set(topics)
    # not even long passages: no 200-character piece of a docstring document is in the topics
    joined = "\n".join(topics)
    pieces = [d[i : i + 200] for d in docs[::10] for i in range(0, len(d) - 200, 400)]
    assert pieces and not any(p in joined for p in pieces)


def test_stdlib_docs_gives_calibration_windows_and_heldout_text():
    tok = CharTokenizer()
    w, info = D.calibration_windows(tok, "stdlib-docs", samples=8, seq_len=64, seed=3)
    w2, _ = D.calibration_windows(tok, "stdlib-docs", samples=8, seq_len=64, seed=3)
    assert w.shape == (8, 64) and bool((w == w2).all())
    assert info["corpus"] == "builtin:stdlib-docs" and info["sha256"]
    held = heldout_documents("stdlib-docs", tok, seq_len=64)
    assert held and not set(held) & set(
        D.split_documents(D.load_corpus("stdlib-docs").documents)[0]
    )


def test_text_field_is_refused_for_stdlib_docs():
    with pytest.raises(D.CorpusError, match="plain text"):
        D.load_corpus("stdlib-docs", text_field="body")
