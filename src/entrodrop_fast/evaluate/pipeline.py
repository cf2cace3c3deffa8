"""The evaluation stage in one call: what a (pruned) model keeps.

:func:`evaluate_model` is what ``entrodrop eval`` calls: perplexity and the built-in zero-shot
tasks on the corpus's held-out documents (:mod:`.heldout`), lm-evaluation-harness tasks
(:mod:`.lm_eval`) and generation speed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from entrodrop_fast.data import Corpus
    from entrodrop_fast.evaluate.lm_eval import PreparedTasks


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    corpus: str | Corpus | None = None,
    seq_len: int = 256,
    windows: int = 32,
    items: int = 100,
    tasks: str | dict | Iterable[Any] | PreparedTasks = (),
    speed: bool = True,
    include_path: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    lm_eval_batch_size: int | None = None,
) -> dict[str, Any]:
    """Perplexity, the built-in zero-shot tasks, lm-eval ``tasks`` (names, YAML paths, or
    :class:`~entrodrop_fast.evaluate.lm_eval.PreparedTasks`) and speed.

    ``model``: a Hugging Face causal LM (dense or pruned), evaluated where its weights are;
    ``tokenizer``: its tokenizer. ``corpus``: what :func:`entrodrop_fast.data.load_corpus`
    takes (None: the built-in one); only its held-out documents are read. Perplexity over at
    most ``windows`` windows of ``seq_len`` tokens; each built-in zero-shot task on at most
    ``items`` items. ``include_path`` / ``limit`` / ``num_fewshot`` / ``lm_eval_batch_size``:
    for the lm-eval ``tasks`` (:func:`~entrodrop_fast.evaluate.lm_eval.evaluate_tasks`;
    batch size default ``DEFAULT_BATCH_SIZE``). ``speed``: also time prefill and decode.

    Returns a JSON-ready dict: ``corpus``, ``heldout_documents`` (a count), ``heldout`` (how
    the corpus was split), ``perplexity`` (:func:`~entrodrop_fast.evaluate.heldout.perplexity`:
    exp of the mean NLL in nats per token, its 95% interval, the token count), ``zero_shot``
    (one dict per task: accuracy in [0, 1], 95% interval, items), ``lm_eval`` (with
    ``tasks``) and ``speed`` (tokens/s, KV-cache bytes per token, peak memory bytes).

    Raises CorpusError when the held-out text is too short for one window or the zero-shot
    tasks (before the model runs), ValueError when the model gives non-finite logits, and a
    subclass of ``LmEvalUnavailable`` when the lm-eval tasks cannot run; nothing half-done is
    returned.
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
