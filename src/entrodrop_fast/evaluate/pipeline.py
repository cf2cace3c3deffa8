"""The evaluation stage in one call: what a (pruned) model keeps.

:func:`evaluate_model` is what ``entrodrop eval`` calls: perplexity and the built-in zero-shot
tasks on the corpus's held-out documents (:mod:`.heldout`), lm-evaluation-harness tasks
(:mod:`.lm_eval`) and generation speed.
"""

from __future__ import annotations


def evaluate_model(
    model,
    tokenizer,
    *,
    corpus=None,
    seq_len=256,
    windows=32,
    items=100,
    tasks=(),
    speed=True,
    include_path=None,
    limit=None,
    num_fewshot=None,
    lm_eval_batch_size=None,
) -> dict:
    """Perplexity, the built-in zero-shot tasks, lm-eval ``tasks`` (names, YAML paths, or
    :class:`~entrodrop_fast.evaluate.lm_eval.PreparedTasks`) and speed.

    A failure of the lm-eval tasks raises (a subclass of ``LmEvalUnavailable``); nothing
    half-done is returned.
    """
    from entrodrop_fast.data import describe_split, load_corpus
    from entrodrop_fast.evaluate import heldout as E
    from entrodrop_fast.evaluate.heldout import heldout_documents

    c = load_corpus(corpus)
    held = heldout_documents(
        c, tokenizer, seq_len=seq_len
    )  # checked to be enough before any model runs
    out = {
        "corpus": c.name,
        "heldout_documents": len(held),
        "heldout": describe_split(len(c.documents)),
    }
    out["perplexity"] = E.perplexity(model, tokenizer, held, seq_len=seq_len, max_windows=windows)
    out["zero_shot"] = E.zero_shot(model, tokenizer, held, items=items)
    if tasks:
        from entrodrop_fast.evaluate import lm_eval as L

        prepared = L.prepare_tasks(tasks, include_path=include_path)
        batch = lm_eval_batch_size or L.DEFAULT_BATCH_SIZE
        rows = L.run_lm_eval(
            model, tokenizer, prepared, batch_size=batch, limit=limit, num_fewshot=num_fewshot
        )
        out["lm_eval"] = {
            "tasks": rows,
            "requested": prepared.names,
            "include_path": prepared.include_path,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch,
        }
    if speed:
        out["speed"] = E.speed(model, tokenizer)
    return out
