"""Evaluation of dense and pruned models without downloads.

- :func:`perplexity`: windowed perplexity on held-out text, with the token count.
- :func:`zero_shot`: multiple-choice tasks built deterministically from held-out text and
  scored by log-likelihood as lm-evaluation-harness does (``continuation``: pick the true
  continuation of a passage among distractors cut from other passages; ``last_word``:
  LAMBADA-style greedy prediction of a passage's next word), with a 95% interval.
- :func:`speed`: prefill and decode tokens/s, peak memory and measured KV-cache bytes per
  token, on the same prompts for every model.

Held-out text: :func:`split_documents` keeps every ``every``-th document of a corpus out
of calibration (the profiler samples its windows from the rest); a corpus of fewer than
``every`` documents (one long .txt) gives the last ``1/every`` of each document instead.
:func:`heldout_documents` checks it is enough before a model runs.
"""

from __future__ import annotations

import math
import random
import re
import resource
import time

import torch

from entrodrop_fast._names import setting
from entrodrop_fast.data import (  # noqa: F401  (split_documents re-exported)
    HELDOUT_EVERY,
    Corpus,
    CorpusError,
    describe_split,
    load_corpus,
    split_documents,
    tokenize_documents,
)

#: the built-in last_word task keeps at most this many context tokens before the word
LAST_WORD_CONTEXT = 192


def _device(model) -> torch.device:
    return next(model.parameters()).device


def model_name(model) -> str:
    """Where a model was loaded from (its class name when it was built in memory)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return str(name) or type(model).__name__


def check_finite(logits: torch.Tensor, model, what: str) -> None:
    """Refuse NaN / Inf logits: every score computed from them would be a quiet wrong number."""
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        hint = (
            "check the checkpoint"
            if dtype == "float32"
            else f"check the checkpoint, or load the model in fp32 ({setting('dtype')} fp32)"
        )
        raise ValueError(
            f"model {model_name(model)} produced {int(bad.sum())} non-finite (NaN or Inf) logits "
            f"of {logits.numel()} while computing {what}; its weights are probably broken (NaN/Inf "
            f"values in the checkpoint, or an overflow in {dtype}): {hint}"
        )


def _interval(correct: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    z = 1.959963984540054
    p = correct / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (
        max(0.0, min(centre - half, p)),
        min(1.0, max(centre + half, p)),
    )  # rounding at p = 0 or 1


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    documents: list[str],
    *,
    seq_len: int = 256,
    max_windows: int = 64,
    batch_size: int = 8,
) -> dict:
    """exp(mean NLL) over non-overlapping windows of the concatenated documents."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
    n_windows = min(max_windows, len(ids) // seq_len)
    if n_windows < 1:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = torch.tensor(ids[: n_windows * seq_len]).view(n_windows, seq_len)  # (W, T)
    dev = _device(model)
    nll, count = 0.0, 0
    per_window: list[float] = []
    for i in range(0, n_windows, batch_size):
        batch = windows[i : i + batch_size].to(dev)
        logits = model(batch).logits[:, :-1].float()  # (b, T-1, V)
        check_finite(logits, model, "perplexity")
        lp = torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None])[..., 0]  # (b, T-1)
        nll -= float(lp.double().sum())
        count += lp.numel()
        per_window += [-float(v) for v in lp.double().mean(1)]
    ci = _mean_interval(per_window)
    return {
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "tokens": count,
        "windows": n_windows,
        "seq_len": seq_len,
        "window_nll": per_window,
        # None from one window: no spread to estimate an interval from
        "ci95": None if ci is None else [math.exp(ci[0]), math.exp(ci[1])],
    }


def _mean_interval(values: list[float]) -> tuple[float, float] | None:
    """95% normal interval of the mean of ``values`` (mean ± 1.96 standard errors; None for
    fewer than 2 values). Used for the per-window NLL: perplexity's interval
    is exp of it (windows of equal length, so their mean NLL is the overall NLL)."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)
    return (m - 1.959963984540054 * se, m + 1.959963984540054 * se)


def _passages(tokenizer, documents: list[str], ctx_len: int, cont_len: int) -> list[list[int]]:
    out = []
    for enc in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        step = ctx_len + cont_len
        for s in range(0, len(enc) - step + 1, step):
            out.append(enc[s : s + step])
    return out


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do): the
    LM head then runs on the last positions only, the ones a score reads (a 262k vocabulary
    head costs more than Gemma-3-270M's decoder per token)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def _loglik(model, prefix: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target tokens | prefix) for each row: prefix (n, P), targets (n, C)."""
    dev = _device(model)
    ids = torch.cat([prefix, targets], 1).to(dev)  # (n, P + C)
    C = targets.shape[1]
    if _keeps_logits(model):
        logits = (
            model(ids, logits_to_keep=C + 1).logits[:, :-1].float()
        )  # (n, C, V): positions P-1 .. P+C-2
    else:
        logits = model(ids).logits[:, prefix.shape[1] - 1 : -1].float()  # (n, C, V)
    check_finite(logits, model, "zero-shot log-likelihoods")
    lp = torch.log_softmax(logits, -1).gather(-1, targets.to(dev)[..., None])[..., 0]
    return lp.sum(-1).cpu(), logits.argmax(-1).cpu()


def continuation_task(
    model,
    tokenizer,
    documents,
    *,
    items: int = 200,
    choices: int = 4,
    ctx_len: int = 48,
    cont_len: int = 16,
    seed: int = 1234,
    item_batch: int = 8,
    shared_context: bool = True,
) -> dict:
    """Pick the true continuation among ``choices`` (the others from other passages).
    ``item_batch`` items (x ``choices`` rows of equal length) go through one forward pass;
    with ``shared_context`` (and a model that takes a KV cache) the context runs once per
    item and its cache serves every choice (48 + 4 x 16 tokens instead of 4 x 64)."""
    shared_context = shared_context and _cache_ok(model)
    passages = _passages(tokenizer, documents, ctx_len, cont_len)
    if len(passages) < choices:
        raise ValueError(f"held-out text gives {len(passages)} passages, need at least {choices}")
    rng = random.Random(seed)
    order = list(range(len(passages)))
    rng.shuffle(order)
    per_item: list[int] = []
    batch: list[tuple[list[int], list[list[int]]]] = []  # (context, choices), the true one first

    def score(batch):
        if shared_context:
            ll = _loglik_shared_context(
                model,
                torch.tensor([c for c, _ in batch]),
                torch.tensor([conts for _, conts in batch]),
            )  # (items, choices)
        else:
            ctx = torch.tensor(
                [c for c, conts in batch for _ in conts]
            )  # (items * choices, ctx_len)
            ll, _ = _loglik(
                model, ctx, torch.tensor([t for _, conts in batch for t in conts])
            )  # equal lengths
        for row in ll.view(len(batch), choices):
            per_item.append(int(row.argmax() == 0))

    for idx in order[:items]:
        others = rng.sample([j for j in range(len(passages)) if j != idx], choices - 1)
        batch.append(
            (
                passages[idx][:ctx_len],
                [passages[idx][ctx_len:]] + [passages[j][ctx_len:] for j in others],
            )
        )
        if len(batch) == item_batch:
            score(batch)
            batch = []
    if batch:
        score(batch)
    return _task_result("continuation", per_item, choices=choices, chance=1 / choices)


def _task_result(task: str, per_item: list[int], **extra) -> dict:
    """A zero-shot task's result: accuracy over ``per_item`` (1 = right, 0 = wrong) with its
    Wilson 95% interval, ``extra`` entries, and the items themselves (for paired tests)."""
    n, correct = len(per_item), sum(per_item)
    lo, hi = _interval(correct, n)
    return {
        "task": task,
        "accuracy": correct / n,
        "ci95": [lo, hi],
        "items": n,
        **extra,
        "correct": per_item,
    }


def _cache_ok(model) -> bool:
    """Whether the shared-context path applies: a transformers causal LM taking a KV cache."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "use_cache" in params and _keeps_logits(model)


@torch.no_grad()
def _loglik_shared_context(model, ctx: torch.Tensor, conts: torch.Tensor) -> torch.Tensor:
    """Sum of log p(continuation | context) per (item, choice): ctx (n, P), conts (n, c, C)
    -> (n, c). The context runs once with a KV cache, repeated for the c choices; the same
    numbers as :func:`_loglik` on the concatenated rows up to floating-point reassociation."""
    dev = _device(model)
    n, c, C = conts.shape
    out = model(ctx.to(dev), use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float()  # (n, V): predicts each continuation's first token
    check_finite(first, model, "zero-shot log-likelihoods")
    cache = _cache_of(out)
    cache.batch_repeat_interleave(c)  # (n * c) rows, item-major as conts.view(n * c, C)
    tgt = conts.reshape(n * c, C).to(dev)
    pos = torch.arange(ctx.shape[1], ctx.shape[1] + C, device=dev).expand(n * c, C)
    rest = (
        model(tgt, use_cache=True, position_ids=pos, **{_cache_arg(model): cache})
        .logits[:, :-1]
        .float()
    )  # (n c, C - 1, V)
    check_finite(rest, model, "zero-shot log-likelihoods")
    lp_first = (
        torch.log_softmax(first, -1).repeat_interleave(c, 0).gather(-1, tgt[:, :1])[:, 0]
    )  # (n c,)
    lp_rest = torch.log_softmax(rest, -1).gather(-1, tgt[:, 1:, None])[..., 0].sum(-1)  # (n c,)
    return (lp_first + lp_rest).view(n, c).cpu()


_WORD = re.compile(r"\s([A-Za-z]{4,})\b")


def last_word_task(
    model, tokenizer, documents, *, items: int = 200, min_chars: int = 300, seed: int = 4321
) -> dict:
    """LAMBADA-style: is the next word the model's greedy prediction (every token of it)?"""
    rng = random.Random(seed)
    cases = []
    for doc in documents:
        for m in _WORD.finditer(doc, min_chars):
            cases.append((doc[max(0, m.start() - 2000) : m.start()], " " + m.group(1)))
    if not cases:
        raise ValueError("held-out text has no passage long enough for the last-word task")
    rng.shuffle(cases)
    per_item: list[int] = []
    for ctx_text, word in cases[:items]:
        ctx = tokenizer(ctx_text, add_special_tokens=False)["input_ids"][-LAST_WORD_CONTEXT:]
        tgt = tokenizer(word, add_special_tokens=False)["input_ids"]
        _, greedy = _loglik(model, torch.tensor([ctx]), torch.tensor([tgt]))
        per_item.append(int(greedy[0].tolist() == tgt))
    return _task_result("last_word", per_item)


def zero_shot(model, tokenizer, documents, *, items: int = 200) -> list[dict]:
    return [
        continuation_task(model, tokenizer, documents, items=items),
        last_word_task(model, tokenizer, documents, items=items),
    ]


def _cache_arg(model) -> str:
    """Name of the forward argument taking the KV cache (``cache`` in transformers >= 5.2x)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers cache (keys and values of every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def speed(
    model,
    tokenizer,
    *,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 3,
) -> dict:
    """Prefill and decode throughput, KV-cache bytes per token, and peak memory."""
    dev = _device(model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab - 1, (batch_size, prompt_len), generator=g).to(dev)  # (B, T)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    prefill = decode = float("inf")
    kv = 0
    arg = _cache_arg(model)
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        sync()
        prefill = min(prefill, time.perf_counter() - t0)
        check_finite(out.logits, model, "the speed benchmark's greedy tokens")
        cache, nxt = _cache_of(out), out.logits[:, -1:].argmax(-1)
        kv = kv_cache_bytes(cache)
        sync()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            o = model(nxt, use_cache=True, **{arg: cache})
            cache, nxt = _cache_of(o), o.logits[:, -1:].argmax(-1)
        sync()
        decode = min(decode, time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated(dev)
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "prefill_tokens_per_s": batch_size * prompt_len / prefill,
        "decode_tokens_per_s": batch_size * new_tokens / decode,
        "kv_cache_bytes_per_token": kv / (batch_size * prompt_len),
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda max allocated" if dev.type == "cuda" else "process max RSS",
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
    }


def heldout_documents(
    corpus: str | Corpus | None,
    tokenizer,
    *,
    seq_len: int,
    zero_shot: bool = True,
    text_field: str = "text",
) -> list[str]:
    """The held-out text of a corpus (:func:`split_documents`), checked to be enough for
    ``entrodrop eval`` / ``compare`` before any model runs: one perplexity window of
    ``seq_len`` tokens and, with ``zero_shot``, the built-in zero-shot tasks' minimum
    (passages for the continuation task, a long enough passage for last_word).
    CorpusError saying what there is and what is needed otherwise.
    """
    c = load_corpus(corpus, text_field)
    _, held = split_documents(c.documents)
    where = f"the held-out text of corpus {c.name} ({describe_split(len(c.documents))})"
    ids = tokenize_documents(held, tokenizer) if held else []
    eos = (
        1 if getattr(tokenizer, "eos_token_id", None) is not None else 0
    )  # perplexity() appends EOS to each document
    tokens = sum(len(d) + eos for d in ids)
    if tokens < seq_len:
        raise CorpusError(
            f"{where} has {tokens} tokens in {len(held)} piece(s), fewer than one perplexity "
            f"window of {seq_len}; give more text (about {HELDOUT_EVERY * seq_len} tokens or more) "
            f"or a smaller {setting('seq_len')}"
        )
    if zero_shot:
        kw = continuation_task.__kwdefaults__
        step, choices = kw["ctx_len"] + kw["cont_len"], kw["choices"]
        passages = sum(len(d) // step for d in ids)
        if passages < choices:
            raise CorpusError(
                f"{where} gives {passages} passage(s) of {step} tokens; the continuation task "
                f"needs at least {choices} (about {choices * step} tokens, within documents); give "
                "more text"
            )
        min_chars = last_word_task.__kwdefaults__["min_chars"]
        if not any(_WORD.search(d, min_chars) for d in held):
            raise CorpusError(
                f"{where} has no passage longer than {min_chars} characters followed by a word, "
                "which the last_word task needs; give more text"
            )
    return held
