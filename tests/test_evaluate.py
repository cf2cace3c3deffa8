"""Evaluation on a tiny random Llama: perplexity, zero-shot tasks, speed and KV bytes."""

import math

import pytest
import torch
from helpers import DOCS, CharTokenizer, char_llama

from entrodrop_fast.evaluate import heldout as E


@pytest.fixture(scope="module")
def tiny():
    return char_llama(2)


def test_split_documents_is_disjoint_and_deterministic():
    calib, held = E.split_documents(DOCS, every=5)
    assert held == [DOCS[4], DOCS[9]]
    assert len(calib) == 8 and not set(calib) & set(held)


def test_perplexity_matches_manual_nll(tiny):
    tok = CharTokenizer()
    r = E.perplexity(tiny, tok, DOCS[:2], seq_len=64, max_windows=3, batch_size=2)
    ids = []
    for d in DOCS[:2]:
        ids += tok(d)["input_ids"] + [0]
    w = torch.tensor(ids[: 3 * 64]).view(3, 64)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(
            tiny(w).logits[:, :-1].reshape(-1, 300), w[:, 1:].reshape(-1)
        )
    assert r["tokens"] == 3 * 63 and r["windows"] == 3
    assert r["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        E.perplexity(tiny, tok, ["short"], seq_len=64)


def test_zero_shot_tasks_report_items_and_interval(tiny):
    res = E.zero_shot(tiny, CharTokenizer(), DOCS, items=12)
    for r in res:
        assert r["items"] == 12
        lo, hi = r["ci95"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1
    again = E.zero_shot(tiny, CharTokenizer(), DOCS, items=12)
    assert [r["accuracy"] for r in res] == [r["accuracy"] for r in again]  # deterministic


def test_speed_measures_kv_cache(tiny):
    r = E.speed(tiny, CharTokenizer(), prompt_len=16, new_tokens=4, repeats=1)
    # 2 layers x (K + V) x 2 kv heads x head_dim 8 x 4 bytes
    assert r["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 8 * 4
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
