"""Per-item evaluation records (for paired tests) and the cheaper scoring paths give the same
scores."""

import math

import pytest
import torch
from helpers import DOCS, CharTokenizer, char_llama, tiny_model

from entrodrop_fast.evaluate import heldout as E


@pytest.fixture(scope="module")
def tiny():
    return char_llama(2)


def test_per_item_records_and_batched_items(tiny):
    tok = CharTokenizer()
    one = E.continuation_task(tiny, tok, DOCS, items=10, item_batch=1)
    many = E.continuation_task(tiny, tok, DOCS, items=10, item_batch=4)
    assert one["correct"] == many["correct"] and len(one["correct"]) == 10
    assert one["accuracy"] == sum(one["correct"]) / 10
    lw = E.last_word_task(tiny, tok, DOCS, items=5)
    assert len(lw["correct"]) == 5 and lw["accuracy"] == sum(lw["correct"]) / 5


def test_logits_to_keep_equals_the_full_head(tiny, monkeypatch):
    prefix = torch.randint(1, 250, (3, 20), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(1, 250, (3, 5), generator=torch.Generator().manual_seed(1))
    kept, g1 = E._loglik(tiny, prefix, targets)
    monkeypatch.setattr(E, "_keeps_logits", lambda model: False)
    full, g2 = E._loglik(tiny, prefix, targets)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(g1, g2)


def test_perplexity_interval_from_windows(tiny):
    ppl = E.perplexity(tiny, CharTokenizer(), DOCS, seq_len=32, max_windows=6)
    assert len(ppl["window_nll"]) == 6
    # windows of equal length: the overall NLL is the mean of the window NLLs
    assert math.isclose(
        sum(ppl["window_nll"]) / 6, ppl["nll"], rel_tol=1e-6
    )  # fp32 sums vs fp64 means
    lo, hi = ppl["ci95"]
    assert lo < ppl["perplexity"] < hi


def test_shared_context_equals_separate_rows(tiny):
    tok = CharTokenizer()
    shared = E.continuation_task(tiny, tok, DOCS, items=12, item_batch=5)
    plain = E.continuation_task(tiny, tok, DOCS, items=12, item_batch=5, shared_context=False)
    assert shared["correct"] == plain["correct"]
    ctx = torch.randint(1, 250, (3, 20), generator=torch.Generator().manual_seed(2))
    conts = torch.randint(1, 250, (3, 4, 6), generator=torch.Generator().manual_seed(3))
    a = E._loglik_shared_context(tiny, ctx, conts)
    b, _ = E._loglik(tiny, ctx.repeat_interleave(4, 0), conts.view(12, 6))
    torch.testing.assert_close(a, b.view(3, 4), rtol=1e-5, atol=1e-4)


def test_shared_context_on_a_model_with_dropped_attention(tiny):
    import copy

    from entrodrop_fast.prune.surgery import drop_blocks_

    pruned = copy.deepcopy(tiny)
    drop_blocks_(pruned, {"attn": [1]})
    ctx = torch.randint(1, 250, (2, 20), generator=torch.Generator().manual_seed(4))
    conts = torch.randint(1, 250, (2, 4, 6), generator=torch.Generator().manual_seed(5))
    a = E._loglik_shared_context(pruned, ctx, conts)
    b, _ = E._loglik(pruned, ctx.repeat_interleave(4, 0), conts.view(8, 6))
    torch.testing.assert_close(a, b.view(2, 4), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["gemma3_text", "mistral", "qwen2", "gpt_neox", "phi"])
def test_shared_context_on_other_architectures(name):
    model = tiny_model(name)
    V = model.config.vocab_size
    ctx = torch.randint(1, V, (2, 20), generator=torch.Generator().manual_seed(6))
    conts = torch.randint(1, V, (2, 4, 6), generator=torch.Generator().manual_seed(7))
    a = E._loglik_shared_context(model, ctx, conts)
    b, _ = E._loglik(model, ctx.repeat_interleave(4, 0), conts.view(8, 6))
    torch.testing.assert_close(a, b.view(2, 4), rtol=1e-5, atol=1e-4)
