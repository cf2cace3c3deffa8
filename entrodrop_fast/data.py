"""Calibration data: documents from a corpus, tokenised, cut into seeded random windows.

Corpora (:func:`load_corpus`):

- ``None`` / ``"builtin"``: the standard library's ``pydoc_data.topics`` (79 reference
  topics, ~465k characters of English prose; one topic = one document);
- a ``.txt`` file (one document) or a directory (each ``*.txt`` in it is a document);
- a ``.jsonl`` file: one JSON object per line, the document in ``text_field``;
- ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset (needs the ``datasets`` package and
  the hub, or its local cache), the document in ``text_field``.

Sampling as the paper (:func:`sample_windows`): each sample is a window of ``seq_len``
tokens at a random offset of a random document longer than the window, drawn with a
``random.Random(seed)`` (default 128 x 256, seed 2024).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

BUILTIN_CORPUS = "builtin"
PAPER_SAMPLES = 128
PAPER_SEQ_LEN = 256
PAPER_SEED = 2024
HELDOUT_EVERY = 5  # every 5th document of a corpus is kept out of calibration, for evaluation


def split_documents(documents: list[str], every: int = HELDOUT_EVERY) -> tuple[list[str], list[str]]:
    """(calibration, held-out): document i is held out when i % every == every - 1."""
    calib = [d for i, d in enumerate(documents) if i % every != every - 1]
    held = [d for i, d in enumerate(documents) if i % every == every - 1]
    return calib, held


class CorpusError(ValueError):
    """The corpus cannot be read, or is too small for the request."""


@dataclass
class Corpus:
    name: str
    documents: list[str]
    meta: dict = field(default_factory=dict)


def _builtin() -> Corpus:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    return Corpus("builtin:pydoc_data.topics", docs, {"source": "pydoc_data.topics"})


def _jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise CorpusError(f"{path}:{lineno}: no field {text_field!r} (has {keys}); choose it with --text-field")
            if not isinstance(obj[text_field], str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} is not a string")
            docs.append(obj[text_field])
    return docs


def _hf(spec: str, text_field: str) -> Corpus:
    parts = spec[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise CorpusError(f"corpus {spec!r} needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise CorpusError(f"could not load dataset {name!r} (config {config}, split {split}): {type(exc).__name__}: {exc}") from exc
    if text_field not in ds.column_names:
        raise CorpusError(f"dataset {name!r} has no column {text_field!r} (columns: {ds.column_names}); choose it with --text-field")
    return Corpus(spec, [t for t in ds[text_field] if isinstance(t, str)], {"dataset": name, "config": config, "split": split})


def load_corpus(spec: str | None = None, text_field: str = "text") -> Corpus:
    """The documents of a corpus (see the module docstring for what ``spec`` may be)."""
    if spec in (None, "", BUILTIN_CORPUS):
        return _builtin()
    spec = str(spec)
    if spec.startswith("hf:"):
        return _hf(spec, text_field)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CorpusError(f"directory {path} has no *.txt files")
        return Corpus(str(path), [f.read_text(encoding="utf-8", errors="replace") for f in files], {"files": len(files)})
    if not path.is_file():
        raise CorpusError(f"corpus not found: {spec} (expected 'builtin', a .txt/.jsonl file, a directory of .txt files or hf:NAME)")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return Corpus(str(path), _jsonl(path, text_field), {"text_field": text_field})
    return Corpus(str(path), [path.read_text(encoding="utf-8", errors="replace")])


def tokenize_documents(documents: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each document, without special tokens (windows are cut from the middle)."""
    enc = tokenizer(documents, add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in enc]


def sample_windows(
    token_docs: list[list[int]],
    samples: int = PAPER_SAMPLES,
    seq_len: int = PAPER_SEQ_LEN,
    seed: int = PAPER_SEED,
) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens: LongTensor ``(samples, seq_len)``.

    Each window: a uniformly random document among those longer than ``seq_len``
    tokens, then a uniformly random start in it. Windows may repeat (as the paper's
    sampler); a :class:`CorpusError` is raised when there is no eligible document or the
    eligible documents hold fewer than ``samples`` distinct windows.
    """
    if samples < 1 or seq_len < 2:
        raise ValueError(f"need samples >= 1 and seq_len >= 2, got samples={samples}, seq_len={seq_len}")
    eligible = [d for d in token_docs if len(d) > seq_len]
    if not eligible:
        longest = max((len(d) for d in token_docs), default=0)
        raise CorpusError(
            f"corpus too small: no document is longer than {seq_len} tokens "
            f"({len(token_docs)} documents, longest {longest} tokens); use a smaller --seq-len or more text"
        )
    distinct = sum(len(d) - seq_len + 1 for d in eligible)
    if distinct < samples:
        raise CorpusError(
            f"corpus too small: {len(eligible)} document(s) longer than {seq_len} tokens hold only "
            f"{distinct} distinct windows, fewer than the {samples} samples requested"
        )
    rng = random.Random(seed)
    out = torch.empty(samples, seq_len, dtype=torch.long)
    for i in range(samples):
        doc = eligible[rng.randrange(len(eligible))]
        start = rng.randrange(len(doc) - seq_len + 1)
        out[i] = torch.tensor(doc[start : start + seq_len], dtype=torch.long)  # (T,)
    return out


def calibration_windows(
    tokenizer,
    corpus: str | Corpus | None = None,
    *,
    samples: int = PAPER_SAMPLES,
    seq_len: int = PAPER_SEQ_LEN,
    seed: int = PAPER_SEED,
    text_field: str = "text",
    exclude_heldout: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Tokenised calibration windows ``(samples, seq_len)`` and a description for the report.

    With ``exclude_heldout`` (default) and at least :data:`HELDOUT_EVERY` documents, the
    held-out documents of :func:`split_documents` are left out, so evaluation text
    (``entrodrop eval`` / ``compare``) is never calibration text.
    """
    c = corpus if isinstance(corpus, Corpus) else load_corpus(corpus, text_field)
    if not c.documents:
        raise CorpusError(f"corpus {c.name} has no documents")
    documents = c.documents
    excluded = 0
    if exclude_heldout and len(documents) >= HELDOUT_EVERY:
        documents, held = split_documents(documents)
        excluded = len(held)
    docs = tokenize_documents(documents, tokenizer)
    windows = sample_windows(docs, samples, seq_len, seed)
    info = {
        "corpus": c.name,
        "documents": len(docs),
        "eligible_documents": sum(len(d) > seq_len for d in docs),
        "tokens": sum(len(d) for d in docs),
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "heldout_documents_excluded": excluded,
        **c.meta,
    }
    return windows, info
