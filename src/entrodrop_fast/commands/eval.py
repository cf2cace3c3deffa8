"""``entrodrop eval MODEL``: perplexity, zero-shot accuracy and speed of a (pruned) model."""

from __future__ import annotations

import json


def load_any(source, dtype: str, device: str):
    """A model directory (dense or written by ``entrodrop prune``), .gguf, hub id or the built-in model.

    The loader of every command (:func:`entrodrop_fast.models.load_model`): pruned checkpoints
    load as the pruned model, unsupported architectures and checkpoints that do not match
    their config are refused.
    """
    from entrodrop_fast.models.loading import load_model

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


def eval_file_check():
    """Recognises an evaluation JSON written by ``entrodrop eval --json`` (which it may replace)."""
    from entrodrop_fast import outputs

    return outputs.json_with_keys("perplexity", "zero_shot", "model")


def run(args) -> int:
    from entrodrop_fast import outputs

    if args.json:  # checked before any work
        outputs.check_file(args.json, what="evaluation JSON", recognise=eval_file_check(), overwrite=args.overwrite, flag="--json",
                           inputs=[*outputs.model_paths(args.model), *outputs.corpus_paths(args.corpus)])
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
        outputs.publish_file(args.json, json.dumps(res, indent=2), what="evaluation JSON")
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    from entrodrop_fast.cli import int_at_least, positive_int

    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and speed of a (pruned) model")
    p.add_argument("model", nargs="?", default=None, help="model directory (pruned or not), .gguf, hub id, a built-in name (gemma3-270m); default: built-in SmolLM2-135M")
    p.add_argument("--corpus", default=None, help="held-out text source (default built-in): every 5th document, or with fewer than 5 documents the last fifth of each, as held out of calibration")
    p.add_argument("--seq-len", type=int_at_least(2, "a window holds a token and its successor"), default=256, help="tokens per perplexity window (default 256)")
    p.add_argument("--windows", type=positive_int, default=32, help="perplexity windows, at most (default 32)")
    p.add_argument("--items", type=positive_int, default=100, help="items per built-in zero-shot task, at most (default 100)")
    p.add_argument("--tasks", default="", help="lm-evaluation-harness tasks, comma-separated (needs lm_eval and its datasets)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the results here (an existing file is replaced only when it is an earlier eval JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace --json even when it is not an eval JSON")
    p.set_defaults(func=run)
