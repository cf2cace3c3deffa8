"""``entrodrop eval MODEL``: perplexity, zero-shot accuracy and speed of a (pruned) model."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def load_any(source, dtype: str, device: str):
    """A dense model (see models.loading) or a checkpoint written by ``entrodrop prune``."""
    from entrodrop_fast.models.loading import load_model

    cfg = Path(str(source)) / "config.json" if source not in (None, "builtin") else None
    if cfg is not None and cfg.is_file() and "entrodrop_pruned" in json.loads(cfg.read_text()):
        from transformers import AutoTokenizer

        from entrodrop_fast.export import load_pruned
        from entrodrop_fast.models.loading import parse_device, parse_dtype

        model = load_pruned(str(source)).to(device=parse_device(device), dtype=parse_dtype(dtype)).eval()
        return model, AutoTokenizer.from_pretrained(str(source))
    lm = load_model(source, dtype=dtype, device=device)
    return lm.model, lm.tokenizer


def evaluate_model(model, tokenizer, *, corpus=None, seq_len=256, windows=32, items=100, tasks=(), speed=True) -> dict:
    from entrodrop_fast import evaluate as E
    from entrodrop_fast.data import describe_split, heldout_documents, load_corpus

    c = load_corpus(corpus)
    held = heldout_documents(c, tokenizer, seq_len=seq_len)  # checked to be enough before any model runs
    out = {"corpus": c.name, "heldout_documents": len(held), "heldout": describe_split(len(c.documents))}
    out["perplexity"] = E.perplexity(model, tokenizer, held, seq_len=seq_len, max_windows=windows)
    out["zero_shot"] = E.zero_shot(model, tokenizer, held, items=items)
    if tasks:
        from entrodrop_fast.lm_eval_adapter import LmEvalUnavailable, run_lm_eval

        try:
            out["zero_shot"] += run_lm_eval(model, tokenizer, list(tasks))
        except LmEvalUnavailable as exc:
            out["lm_eval_error"] = str(exc)
    if speed:
        out["speed"] = E.speed(model, tokenizer)
    return out


def _atomic_json(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(args) -> int:
    from entrodrop_fast.data import load_corpus

    corpus = load_corpus(args.corpus)  # an unreadable, empty or binary corpus stops the run before the model loads
    model, tok = load_any(args.model, args.dtype, args.device)
    tasks = [t for t in (args.tasks or "").split(",") if t]
    res = evaluate_model(model, tok, corpus=corpus, seq_len=args.seq_len, windows=args.windows, items=args.items, tasks=tasks, speed=not args.no_speed)
    res["model"] = str(args.model or "builtin")
    p = res["perplexity"]
    print(f"perplexity {p['perplexity']:.3f} on {p['tokens']} held-out tokens ({p['windows']} windows of {p['seq_len']})")
    for z in res["zero_shot"]:
        ci = z.get("ci95")
        extra = f"  95% CI [{ci[0]:.3f}, {ci[1]:.3f}], {z['items']} items" if ci else f"  (lm_eval, stderr {z.get('stderr')})"
        print(f"{z['task']:14s} accuracy {z['accuracy']:.3f}{extra}")
    if "lm_eval_error" in res:
        print(f"lm_eval tasks skipped: {res['lm_eval_error']}")
    if "speed" in res:
        s = res["speed"]
        print(f"prefill {s['prefill_tokens_per_s']:.1f} tok/s, decode {s['decode_tokens_per_s']:.1f} tok/s, KV cache {s['kv_cache_bytes_per_token']:.0f} B/token, peak {s['peak_memory_bytes'] / 2**20:.0f} MiB ({s['peak_memory_kind']})")
    if args.json:
        _atomic_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    from entrodrop_fast.cli import int_at_least, positive_int

    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and speed of a (pruned) model")
    p.add_argument("model", nargs="?", default=None, help="model directory (pruned or not), .gguf, hub id; default: built-in SmolLM2-135M")
    p.add_argument("--corpus", default=None, help="held-out text source (default built-in): every 5th document, or with fewer than 5 documents the last fifth of each, as held out of calibration")
    p.add_argument("--seq-len", type=int_at_least(2, "a window holds a token and its successor"), default=256, help="tokens per perplexity window (default 256)")
    p.add_argument("--windows", type=positive_int, default=32, help="perplexity windows, at most (default 32)")
    p.add_argument("--items", type=positive_int, default=100, help="items per built-in zero-shot task, at most (default 100)")
    p.add_argument("--tasks", default="", help="lm-evaluation-harness tasks, comma-separated (needs lm_eval and its datasets)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=run)
