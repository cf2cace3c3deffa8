"""``entrodrop eval MODEL``: perplexity, zero-shot accuracy and speed of a (pruned) model."""

from __future__ import annotations

import json
import os


def load_any(source, dtype: str, device: str):
    """A model directory (dense or written by ``entrodrop prune``), .gguf, hub id or the
    built-in model: ``(model, tokenizer)``.

    The loader of every command (:func:`entrodrop_fast.models.load_model`): pruned checkpoints
    load as the pruned model, unsupported architectures and checkpoints that do not match
    their config are refused.
    """
    from entrodrop_fast.models.loading import load_model

    lm = load_model(source, dtype=dtype, device=device)
    return lm.model, lm.tokenizer


def eval_file_check():
    """Recognises an evaluation JSON written by ``entrodrop eval --json`` (which it may replace)."""
    from entrodrop_fast import outputs

    return outputs.json_with_keys("perplexity", "zero_shot", "model")


def run(args) -> int:
    from entrodrop_fast import outputs

    if args.json is not None:  # checked before any work ("" too: refused)
        outputs.check_file(
            args.json,
            what="evaluation JSON",
            recognise=eval_file_check(),
            overwrite=args.overwrite,
            flag="--json",
            inputs=[*outputs.model_paths(args.model), *outputs.corpus_paths(args.corpus)],
        )
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    lm_flags = [
        flag
        for flag, value in (
            ("--include-path", args.include_path),
            ("--limit", args.limit),
            ("--num-fewshot", args.num_fewshot),
            ("--lm-eval-batch-size", args.lm_eval_batch_size),
        )
        if value is not None
    ]
    if lm_flags and not tasks:
        raise ValueError(
            f"{', '.join(lm_flags)} only apply to lm-evaluation-harness tasks: give them with "
            "--tasks NAME[,NAME...]"
        )
    for d in args.include_path or []:
        if not os.path.isdir(d):
            raise ValueError(
                f"--include-path {d}: "
                f"{'not a directory' if os.path.exists(d) else 'no such directory'} "
                "(give a directory of lm-eval task YAML files)"
            )
    from entrodrop_fast.data import load_corpus

    # an unreadable, empty or binary corpus stops the run before the model loads
    corpus = load_corpus(args.corpus)
    prepared = None
    if tasks:  # lm-eval installed, every task found and its data read, before the model loads
        from entrodrop_fast.evaluate.lm_eval import prepare_tasks

        prepared = prepare_tasks(tasks, include_path=args.include_path)
    from entrodrop_fast.models.loading import (
        check_positions,
        display_name,
        parse_device,
        peek_config,
    )

    parse_device(args.device)
    from entrodrop_fast.evaluate.pipeline import position_needs

    needs = position_needs(args.seq_len, speed=not args.no_speed)
    where = f"the model {display_name(args.model)}"
    # before the model loads, when its config is at hand
    check_positions(peek_config(args.model), needs, where)
    model, tok = load_any(args.model, args.dtype, args.device)
    check_positions(model.config, needs, where)
    from entrodrop_fast.evaluate.pipeline import evaluate_model

    res = evaluate_model(
        model,
        tok,
        corpus=corpus,
        seq_len=args.seq_len,
        windows=args.windows,
        items=args.items,
        tasks=prepared,
        speed=not args.no_speed,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        lm_eval_batch_size=args.lm_eval_batch_size,
    )
    res["model"] = str(args.model or "builtin")
    p = res["perplexity"]
    print(
        f"perplexity {p['perplexity']:.3f} on {p['tokens']} held-out tokens "
        f"({p['windows']} windows of {p['seq_len']})"
    )
    for z in res["zero_shot"]:
        ci = z["ci95"]
        print(
            f"{z['task']:14s} accuracy {z['accuracy']:.3f}  95% CI [{ci[0]:.3f}, {ci[1]:.3f}], "
            f"{z['items']} items"
        )
    if "lm_eval" in res:
        from entrodrop_fast.evaluate.lm_eval import format_row

        partial = f" (--limit {args.limit}: a partial run, not for reporting)" if args.limit else ""
        print(f"lm-evaluation-harness{partial}:")
        for row in res["lm_eval"]["tasks"]:
            print(f"  {format_row(row)}")
    if "speed" in res:
        s = res["speed"]
        print(
            f"prefill {s['prefill_tokens_per_s']:.1f} tok/s, "
            f"decode {s['decode_tokens_per_s']:.1f} tok/s, "
            f"KV cache {s['kv_cache_bytes_per_token']:.0f} B/token, "
            f"peak {s['peak_memory_bytes'] / 2**20:.0f} MiB ({s['peak_memory_kind']})"
        )
    if args.json is not None:
        outputs.publish_file(args.json, json.dumps(res, indent=2), what="evaluation JSON")
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    from entrodrop_fast.cli import (
        add_model_arg,
        add_output_file_args,
        int_at_least,
        positive_int,
    )
    from entrodrop_fast.commands.profile import add_placement_args

    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and speed of a (pruned) model")
    add_model_arg(
        p,
        "model directory (pruned or not), .gguf, hub id, a built-in name (gemma3-270m); "
        "default: built-in SmolLM2-135M",
    )
    p.add_argument(
        "--corpus",
        default=None,
        help="held-out text source (default built-in): every 5th document, or with fewer than 5 "
        "documents the last fifth of each, as held out of calibration",
    )
    p.add_argument(
        "--seq-len",
        type=int_at_least(2, "a window holds a token and its successor"),
        default=256,
        help="tokens per perplexity window (default 256)",
    )
    p.add_argument(
        "--windows", type=positive_int, default=32, help="perplexity windows, at most (default 32)"
    )
    p.add_argument(
        "--items",
        type=positive_int,
        default=100,
        help="items per built-in zero-shot task, at most (default 100)",
    )
    p.add_argument(
        "--tasks",
        default="",
        help="lm-evaluation-harness tasks, comma-separated: registered names (built-in or from "
        "--include-path) or task YAML paths (needs: pip install 'entrodrop_fast[eval]')",
    )
    p.add_argument(
        "--include-path",
        action="append",
        metavar="DIR",
        help="register the lm-eval task YAMLs under DIR, so --tasks can name them (repeatable)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="lm-eval: score at most N documents per task (a quick, partial run)",
    )
    p.add_argument(
        "--num-fewshot",
        type=int_at_least(0),
        default=None,
        metavar="N",
        help="lm-eval: N examples in each prompt (default: each task's own)",
    )
    p.add_argument(
        "--lm-eval-batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="lm-eval: requests per forward pass (default 8)",
    )
    p.add_argument(
        "--no-speed",
        action="store_true",
        help="skip the prefill / decode throughput and KV-cache memory measurement",
    )
    add_placement_args(p)
    add_output_file_args(
        p,
        "--json",
        "write the results here (an existing file is replaced only when it is an earlier eval "
        "JSON)",
        "an eval JSON",
    )
    p.set_defaults(func=run)
