"""Per-item evaluation records (for paired tests) and the cheaper scoring paths give the same scores."""

import math

import torch
from test_evaluate import DOCS, CharTokenizer, tiny  # noqa: F401  (fixture)

from entrodrop_fast import evaluate as E


def test_per_item_records_and_batched_items(tiny):  # noqa: F811
    tok = CharTokenizer()
    one = E.continuation_task(tiny, tok, DOCS, items=10, item_batch=1)
    many = E.continuation_task(tiny, tok, DOCS, items=10, item_batch=4)
    assert one["correct"] == many["correct"] and len(one["correct"]) == 10
    assert one["accuracy"] == sum(one["correct"]) / 10
    lw = E.last_word_task(tiny, tok, DOCS, items=5)
    assert len(lw["correct"]) == 5 and lw["accuracy"] == sum(lw["correct"]) / 5


def test_logits_to_keep_equals_the_full_head(tiny, monkeypatch):  # noqa: F811
    prefix = torch.randint(1, 250, (3, 20), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(1, 250, (3, 5), generator=torch.Generator().manual_seed(1))
    kept, g1 = E._loglik(tiny, prefix, targets)
    monkeypatch.setattr(E, "_keeps_logits", lambda model: False)
    full, g2 = E._loglik(tiny, prefix, targets)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(g1, g2)


def test_perplexity_interval_from_windows(tiny):  # noqa: F811
    ppl = E.perplexity(tiny, CharTokenizer(), DOCS, seq_len=32, max_windows=6)
    assert len(ppl["window_nll"]) == 6
    # windows of equal length: the overall NLL is the mean of the window NLLs
    assert math.isclose(sum(ppl["window_nll"]) / 6, ppl["nll"], rel_tol=1e-6)  # fp32 sums vs fp64 means
    lo, hi = ppl["ci95"]
    assert lo < ppl["perplexity"] < hi
