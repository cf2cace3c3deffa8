"""The evaluation stage in one call: what a (pruned) model keeps.

:func:`evaluate_model` is what ``entrodrop eval`` calls: perplexity and the built-in zero-shot
tasks on the corpus's held-out documents (:mod:`.heldout`), lm-evaluation-harness tasks
(:mod:`.lm_eval`) and generation speed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from entrodrop_fast._names import setting

if TYPE_CHECKING:
    from torch import nn

    from entrodrop_fast.data import Corpus
    from entrodrop_fast.evaluate.lm_eval import PreparedTasks


def position_needs(seq_len: int, speed: bool = True) -> list[tuple[int, str]]:
    """The lengths :func:`evaluate_model` runs through the model: (tokens, what) pairs for
    :func:`entrodrop_fast.models.loading.check_positions`."""
    import inspect

    from entrodrop_fast.evaluate import heldout as E

    kw = E.continuation_task.__kwdefaults__
    # (decorated: its own signature)
    spd = {k: v.default for k, v in inspect.signature(E.speed).parameters.items()}
    needs = [
        (seq_len, setting("seq_len")),
        (
            kw["ctx_len"] + kw["cont_len"],
            f"a zero-shot continuation item ({kw['ctx_len']} + {kw['cont_len']} tokens)",
        ),
        (
            E.LAST_WORD_CONTEXT + 1,
            f"a zero-shot last_word item (up to {E.LAST_WORD_CONTEXT} context tokens and the word)",
        ),
    ]
    if speed:
        needs.append(
            (
                spd["prompt_len"] + spd["new_tokens"],
                f"the speed test ({spd['prompt_len']}-token prompt + {spd['new_tokens']} new "
                f"tokens; skip it with {setting('no_speed', python='speed=False')})",
            )
        )
    return needs


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

    Raises ValueError for a ``seq_len`` below 2, ``windows`` or ``items`` below 1, or a
    ``seq_len`` beyond the model's ``max_position_embeddings``; CorpusError when
    the held-out text is too short for one window or the zero-shot
    tasks (before the model runs), ValueError when the model gives non-finite logits, and a
    subclass of ``LmEvalUnavailable`` when the lm-eval tasks cannot run; nothing half-done is
    returned.
    """
    from entrodrop_fast.data import describe_split, load_corpus
    from entrodrop_fast.evaluate import heldout as E
    from entrodrop_fast.evaluate.heldout import heldout_documents
    from entrodrop_fast.models.loading import check_positions

    for value, name, low in ((seq_len, "seq_len", 2), (windows, "windows", 1), (items, "items", 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{setting(name)} must be an integer >= {low}, got {value!r}")
    # the perplexity window (the zero-shot items and the speed test are short and fixed;
    # `entrodrop eval` checks them too, against the config before the model loads)
    check_positions(getattr(model, "config", None), position_needs(seq_len)[:1], "the model")
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
