"""Calibration data: documents from a corpus, tokenised, cut into seeded random windows.

Corpora (:func:`load_corpus`):

- ``None`` / ``"builtin"``: the standard library's ``pydoc_data.topics`` (79 reference
  topics, ~465k characters of English prose; one topic = one document);
- ``"stdlib-docs"``: the docstrings of the standard library's public modules, read from
  their sources with ``ast`` (one module = one document, at most 2000 characters each,
  465k in all; deterministic for a Python version): a second corpus with nothing in common
  with the first, for calibration-robustness checks;
- a ``.txt`` file (one document) or a directory (each ``*.txt`` in it is a document);
- a ``.txt`` file or a directory: the suffix in any case (``.TXT``);
- a ``.jsonl`` file: one JSON object per line, the document in ``text_field`` (a UTF-8 BOM is
  ignored);
- a ``.json`` file: a JSON array of strings or of objects (the document in ``text_field``), or
  JSON Lines under a .json name; any other JSON (an object, e.g. a tokenizer.json) is refused;
- ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset (needs the ``datasets`` package and
  the hub, or its local cache), the document in ``text_field``.

A file must be UTF-8 text: an empty file, one with NUL bytes, or one where more than 1% of
the characters are not valid UTF-8 is refused with a :class:`CorpusError` naming it (a few
undecodable bytes become U+FFFD, with a warning).

Held-out text (:func:`split_documents`): with at least :data:`HELDOUT_EVERY` documents every
5th document is kept out of calibration for ``entrodrop eval`` / ``compare``; with fewer
(one long ``.txt`` is a common corpus) the last fifth of each document is held out instead,
cut at a whitespace. Calibration (:func:`calibration_windows`) excludes the held-out text.

Sampling as the paper (:func:`sample_windows`): each sample is a window of ``seq_len``
tokens at a random offset of a random document longer than the window, drawn with a
``random.Random(seed)`` (default 128 x 256, seed 2024).
"""

from __future__ import annotations

import json
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from entrodrop_fast._names import setting

BUILTIN_CORPUS = "builtin"
PAPER_SAMPLES = 128
PAPER_SEQ_LEN = 256
PAPER_SEED = 2024
HELDOUT_EVERY = 5  # every 5th document of a corpus is kept out of calibration, for evaluation


def split_documents(
    documents: list[str], every: int = HELDOUT_EVERY
) -> tuple[list[str], list[str]]:
    """(calibration, held-out): disjoint and deterministic.

    With at least ``every`` documents, document i is held out when i % every == every - 1.
    With fewer (say one long .txt), each document is cut in two at the first whitespace at
    or after (every - 1) / every of its characters (within 1000 characters; else exactly
    there): the heads are calibration text, the tails (the last ~1/every) are held out.
    Empty (or whitespace-only) pieces are left out.
    """
    if every < 2:
        raise ValueError(f"every must be >= 2, got {every}")
    if len(documents) >= every:
        calib = [d for i, d in enumerate(documents) if i % every != every - 1]
        held = [d for i, d in enumerate(documents) if i % every == every - 1]
        return calib, held
    calib, held = [], []
    for d in documents:
        cut = len(d) * (every - 1) // every
        space = _SPACE.search(d, cut, cut + 1000)
        cut = space.start() if space else cut
        calib += [d[:cut]] if d[:cut].strip() else []
        held += [d[cut:]] if d[cut:].strip() else []
    return calib, held


def describe_split(n_documents: int, every: int = HELDOUT_EVERY) -> str:
    """In words, which text :func:`split_documents` holds out of ``n_documents`` documents."""
    if n_documents >= every:
        return f"every {every}th of {n_documents} documents"
    return f"the last 1/{every} of each of {n_documents} document{'s' if n_documents != 1 else ''}"


_SPACE = re.compile(r"\s")
# a file is refused as not text when more than this fraction of its characters is not UTF-8
MAX_UNDECODABLE = 0.01


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


# ---- second built-in corpus: docstrings of the standard library (issue 14) -------------------
STDLIB_DOCS = "stdlib-docs"
STDLIB_DOCS_MODULE_CHARS = 2000  # at most this much of each module (cut at a paragraph end)
STDLIB_DOCS_CHARS = 465_000  # in all: the size of the built-in corpus
STDLIB_DOCS_MIN_CHARS = 500  # modules with less docstring text are left out
_STDLIB_SKIP = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "lib2to3",
        "ensurepip",
        "encodings",
        "pydoc_data",
    }
)


def _module_docstrings(path: Path) -> str:
    """The docstrings of a module file (module, classes, functions, methods; in source order,
    duplicates once), read with ``ast``: nothing is imported or run."""
    import ast

    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and d.strip():
                docs.append(d.strip())
    return "\n\n".join(dict.fromkeys(docs))


def _stdlib_docs() -> Corpus:
    """A fresh copy of the (cached) stdlib-docs corpus: see :func:`_stdlib_docs_build`."""
    docs, meta = _stdlib_docs_cached()
    return Corpus("builtin:stdlib-docs", list(docs), dict(meta))


def _stdlib_docs_cached() -> tuple[tuple[str, ...], dict]:
    global _STDLIB_CACHE
    if _STDLIB_CACHE is None:
        c = _stdlib_docs_build()
        _STDLIB_CACHE = (tuple(c.documents), c.meta)
    return _STDLIB_CACHE


_STDLIB_CACHE = None


def _stdlib_docs_build() -> Corpus:
    """The docstrings of the standard library's public modules: one document per module file
    (sorted by path; packages' private and test modules left out), each cut to
    :data:`STDLIB_DOCS_MODULE_CHARS` at a paragraph end, modules with fewer than
    :data:`STDLIB_DOCS_MIN_CHARS` characters skipped, the total capped at
    :data:`STDLIB_DOCS_CHARS`. Deterministic for a given Python version (the report records
    it and the text's sha256); read from the source files, never imported."""
    import hashlib
    import platform
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        f
        for f in root.rglob("*.py")
        if not any(
            p in _STDLIB_SKIP or (p.startswith("_") and p != "__init__.py")
            for p in f.relative_to(root).parts
        )
    )
    docs, names, total = [], [], 0
    for f in files:
        text = _module_docstrings(f)
        if len(text) < STDLIB_DOCS_MIN_CHARS:
            continue
        if len(text) > STDLIB_DOCS_MODULE_CHARS:
            cut = text.rfind("\n\n", 0, STDLIB_DOCS_MODULE_CHARS)
            text = text[: cut if cut > STDLIB_DOCS_MODULE_CHARS // 2 else STDLIB_DOCS_MODULE_CHARS]
        if total + len(text) > STDLIB_DOCS_CHARS:
            break
        docs.append(text)
        names.append(str(f.relative_to(root)))
        total += len(text)
    if not docs:
        raise CorpusError(
            f"stdlib-docs: no module with docstrings under {root} (a standard library without "
            "sources?)"
        )
    digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()
    return Corpus(
        "builtin:stdlib-docs",
        docs,
        {
            "source": "docstrings of the standard library's modules",
            "python": platform.python_version(),
            "modules": len(docs),
            "characters": total,
            "sha256": digest,
        },
    )


# ---- end of stdlib-docs --------------------------------------------------------------------------


def _read_text(path: Path, allow_empty: bool = False) -> str:
    """The text of a corpus file; CorpusError when it is empty (unless allowed) or not UTF-8
    text."""
    data = path.read_bytes()
    if not data.strip():
        if allow_empty:
            return ""
        raise CorpusError(f"corpus file {path} is empty; give a file with text")
    if b"\0" in data:
        raise CorpusError(
            f"corpus file {path} holds NUL bytes: it is binary (or UTF-16), not UTF-8 text; "
            "give a text file (convert UTF-16 to UTF-8)"
        )
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > MAX_UNDECODABLE * len(text):
        raise CorpusError(
            f"corpus file {path} is not UTF-8 text: {bad} of its {len(text)} characters cannot "
            "be decoded; give a UTF-8 text file (convert it, e.g. with iconv)"
        )
    if bad:
        warnings.warn(
            f"corpus file {path}: {bad} bytes that are not UTF-8 were replaced by U+FFFD",
            stacklevel=3,
        )
    return text


def _document(obj, text_field: str, where: str) -> str:
    """The text of one JSON record: a string, or an object's ``text_field``."""
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict) or text_field not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CorpusError(
            f"{where}: no field {text_field!r} (has {keys}); choose it with {setting('text_field')}"
        )
    if not isinstance(obj[text_field], str):
        raise CorpusError(f"{where}: field {text_field!r} is not a string")
    return obj[text_field]


def _json(path: Path, text_field: str) -> tuple[list[str], str]:
    """A ``.json`` corpus: a JSON array of documents (strings or objects with ``text_field``), or
    JSON Lines under a .json name. Returns (documents, the layout found)."""
    text = _read_text(path).lstrip("\ufeff")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
        first = next((ln for ln in text.split("\n") if ln.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:
            raise CorpusError(
                f"corpus file {path} is neither a JSON array of documents nor JSON Lines (one "
                "object per line): give a .json array of strings or objects with a "
                f"{setting('text_field')}, a .jsonl file, or a .txt file"
            ) from None
        return _jsonl(path, text_field), "jsonl"
    if not isinstance(obj, list):
        what = (
            f"a JSON object with keys {sorted(obj)[:6]}"
            if isinstance(obj, dict)
            else f"a JSON {type(obj).__name__}"
        )
        raise CorpusError(
            f"corpus file {path} holds {what}, not a list of documents: a .json corpus is an "
            f"array of strings or of objects with a {setting('text_field')} (or JSON Lines)"
        )
    return [
        _document(item, text_field, f"{path}: item {i} of the array")
        for i, item in enumerate(obj, 1)
    ], "array"


def _jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(path).lstrip("\ufeff").split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):  # a line of JSON Lines is a record
            raise CorpusError(
                f"{path}:{lineno}: no field {text_field!r} (has {type(obj).__name__}); choose it "
                f"with {setting('text_field')}"
            )
        docs.append(_document(obj, text_field, f"{path}:{lineno}"))
    return docs


def _hf(spec: str, text_field: str) -> Corpus:
    parts = spec[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise CorpusError(
            f"corpus {spec!r} needs the `datasets` package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise CorpusError(
            f"could not load dataset {name!r} (config {config}, split {split}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if text_field not in ds.column_names:
        raise CorpusError(
            f"dataset {name!r} has no column {text_field!r} (columns: {ds.column_names}); "
            f"choose it with {setting('text_field')}"
        )
    return Corpus(
        spec,
        [t for t in ds[text_field] if isinstance(t, str)],
        {"dataset": name, "config": config, "split": split},
    )


def load_corpus(spec: str | Corpus | None = None, text_field: str = "text") -> Corpus:
    """The documents of a corpus (see the module docstring for what ``spec`` may be).

    A :class:`Corpus` is returned as it is. CorpusError when the corpus cannot be read,
    is not text, or holds no text at all.
    """
    if isinstance(spec, Corpus):
        return spec
    if text_field != "text" and not _has_fields(spec):
        flag = setting("text_field")
        raise CorpusError(
            f"{flag} {text_field} applies to .jsonl / .json corpora and hf: datasets; the corpus "
            f"{spec or BUILTIN_CORPUS} is plain text: drop {flag}"
        )
    c = _load(spec, text_field)
    if not any(d.strip() for d in c.documents):
        n = len(c.documents)
        what = f"{n} document{'s' if n != 1 else ''}, all empty" if n else "no documents"
        raise CorpusError(f"corpus {c.name} has no text ({what}); give a corpus with text")
    return c


_FIELD_SUFFIXES = (".jsonl", ".ndjson", ".json")


def _has_fields(spec) -> bool:
    """The corpus has records with fields (``text_field`` applies): hf: datasets and JSON
    files."""
    if spec in (None, "", BUILTIN_CORPUS):
        return False
    spec = str(spec)
    return spec.startswith("hf:") or Path(spec).suffix.lower() in _FIELD_SUFFIXES


def _load(spec, text_field: str) -> Corpus:
    if spec in (None, "", BUILTIN_CORPUS):
        return _builtin()
    if spec == STDLIB_DOCS:
        return _stdlib_docs()
    spec = str(spec)
    if spec.startswith("hf:"):
        return _hf(spec, text_field)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(
            f for f in path.iterdir() if f.suffix.lower() == ".txt" and f.is_file()
        )  # .txt, .TXT, ...
        if not files:
            raise CorpusError(f"directory {path} has no .txt files")
        return Corpus(
            str(path), [_read_text(f, allow_empty=True) for f in files], {"files": len(files)}
        )
    if not path.is_file():
        raise CorpusError(
            f"corpus not found: {spec} (expected 'builtin', a .txt/.jsonl/.json file, a directory "
            "of .txt files or hf:NAME)"
        )
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return Corpus(str(path), _jsonl(path, text_field), {"text_field": text_field})
    if path.suffix.lower() == ".json":
        docs, layout = _json(path, text_field)
        return Corpus(str(path), docs, {"text_field": text_field, "json_layout": layout})
    return Corpus(str(path), [_read_text(path)])


def tokenize_documents(documents: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each document, without special tokens (windows are cut from the middle)."""
    enc = tokenizer(documents, add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in enc]


# sample_windows warns when the windows asked for hold more than this many times the text
# they are drawn from (the built-in corpus's calibration part holds about 0.9 times the
# default 128 x 256 tokens; a few hundred tokens for 128 windows is a profile of one passage)
MIN_TEXT_PER_WINDOWS = 4


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
    eligible documents hold fewer than ``samples`` distinct windows, and a ``UserWarning``
    when the windows' tokens exceed :data:`MIN_TEXT_PER_WINDOWS` times the eligible text
    (they then overlap heavily: a profile of little text).
    """
    if samples < 1 or seq_len < 2:
        raise ValueError(
            f"need samples >= 1 and seq_len >= 2, got samples={samples}, seq_len={seq_len}"
        )
    eligible = [d for d in token_docs if len(d) > seq_len]
    if not eligible:
        longest = max((len(d) for d in token_docs), default=0)
        raise CorpusError(
            f"corpus too small: no document is longer than {seq_len} tokens "
            f"({len(token_docs)} documents, longest {longest} tokens); use a smaller "
            f"{setting('seq_len')} or more text"
        )
    distinct = sum(len(d) - seq_len + 1 for d in eligible)
    if distinct < samples:
        raise CorpusError(
            f"corpus too small: {len(eligible)} document(s) longer than {seq_len} tokens hold only "
            f"{distinct} distinct windows, fewer than the {samples} samples requested; lower "
            f"{setting('samples')} or {setting('seq_len')}, or give more text"
        )
    text = sum(len(d) for d in eligible)
    if text * MIN_TEXT_PER_WINDOWS < samples * seq_len:
        warnings.warn(
            f"calibration text is small for the windows asked: {samples} windows of {seq_len} "
            f"tokens ({samples * seq_len} tokens) are drawn from {text} tokens in "
            f"{len(eligible)} document(s), so each token is seen about "
            f"{samples * seq_len / text:.0f} times and the profile rests on little text; give "
            f"more text, or lower {setting('samples')}",
            stacklevel=2,
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

    With ``exclude_heldout`` (default) the held-out text of :func:`split_documents` (every
    5th document, or the last fifth of each document of a corpus of fewer than
    :data:`HELDOUT_EVERY`) is left out, so evaluation text (``entrodrop eval`` /
    ``compare``) is never calibration text.
    """
    c = load_corpus(corpus, text_field)
    documents = c.documents
    excluded, heldout = 0, None
    if exclude_heldout:
        documents, held = split_documents(documents)
        excluded = len(held) if len(c.documents) >= HELDOUT_EVERY else 0
        heldout = describe_split(len(c.documents))
    docs = tokenize_documents(documents, tokenizer)
    try:
        windows = sample_windows(docs, samples, seq_len, seed)
    except CorpusError as exc:
        part = f" (calibration part: {heldout} held out for evaluation)" if heldout else ""
        raise CorpusError(f"{c.name}{part}: {exc}") from None
    info = {
        "corpus": c.name,
        "documents": len(docs),
        "eligible_documents": sum(len(d) > seq_len for d in docs),
        "tokens": sum(len(d) for d in docs),
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "heldout_documents_excluded": excluded,
        "heldout": heldout,
        **c.meta,
    }
    return windows, info
