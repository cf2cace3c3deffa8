"""``entrodrop profile [MODEL]``: the entropy profile of a model's blocks (the main job).

With no arguments: the built-in SmolLM2-135M-Instruct on the built-in corpus with the
paper's defaults (128 windows x 256 tokens, seed 2024, bucket entropy, 20 bins), report in
``./entrodrop_report``.
"""

from __future__ import annotations

import math
import sys
import time

from entrodrop_fast.data import PAPER_SAMPLES, PAPER_SEED, PAPER_SEQ_LEN


def _spans(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--spans must be comma-separated integers, got {s!r}") from None
    if not out or min(out) < 1:
        raise ValueError(f"--spans must be positive integers, got {s!r}")
    return out


def parse_bytes(s: str) -> float:
    """'8GB', '512MiB', '1.5G', '1000000' -> bytes (K, M, G, T are powers of 1024)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(s))
    if not m:
        raise ValueError(f"--max-memory must look like 8GB, 512MB or 1.5G, got {s!r}")
    unit = m.group(2).upper()
    value = float(m.group(1)) * (1024 ** ("KMGT".index(unit) + 1) if unit else 1)
    if value <= 0:
        raise ValueError(f"--max-memory must be a positive size like 8GB, 512MB or 1.5G, got {s!r}")
    return value


def streaming_source(model, cache_dir):
    """The safetensors directory to stream from: a local model directory, or a built-in model's cache."""
    from pathlib import Path

    from entrodrop_fast.models.loading import builtin_model, ensure_builtin

    b = builtin_model(model)
    if b is not None:
        return ensure_builtin(cache_dir, b)
    p = Path(str(model)).expanduser()
    if not p.is_dir():
        raise ValueError(f"streaming reads a local Hugging Face directory with safetensors shards; {model!r} is not one")
    return p


class MemoryPlan:
    """What a profile of the checkpoint in ``model_dir`` needs in memory, from its tensor shapes.

    ``total``: all weights; ``resident``: the most a streamed run holds at once, the larger of
    the embedding and one layer (they are never resident together), a layer counted with every
    tensor the model builds for it: in a mixture-of-experts model its experts (``experts``: their
    bytes in that layer), router and shared expert, whether the checkpoint stores them per
    expert or fused; ``fuse_extra``: for experts stored per expert, what fusing a layer holds
    besides it (its largest fused tensor, e.g. every expert's gate and up projections, once more);
    ``per_token``: the activations of one token (fp32-sized hidden state + MLP intermediates; in
    an MoE layer each of the top-k experts gets a copy of the token and its intermediates; x3
    for the temporaries of a layer).
    """

    def __init__(self, model_dir, dtype: str):
        import json
        from pathlib import Path

        from entrodrop_fast.models.adapters import get_adapter
        from entrodrop_fast.models.loading import parse_dtype
        from entrodrop_fast.profile.layerwise import Checkpoint, WeightPlan, build_skeleton

        per = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
        ckpt = Checkpoint(model_dir)
        self.total = sum(math.prod(shape) for shape in ckpt.shapes.values()) * per
        model = build_skeleton(str(model_dir), parse_dtype(dtype))  # on meta: no memory
        adapter = get_adapter(model)
        weights = WeightPlan(model, ckpt)  # the model's tensors as transformers builds them from the checkpoint's
        size = lambda name: math.prod(weights.expected[name]) * per  # noqa: E731
        embed = sum(size(f"{adapter.arch.embed}.{k}") for k in adapter.embed(model).state_dict())
        self.resident, self.experts, self.fuse_extra = embed, 0, 0
        dense = False
        for i, layer in enumerate(adapter.layers(model)):
            names = [f"{adapter.arch.layers}.{i}.{k}" for k in layer.state_dict()]
            self.resident = max(self.resident, sum(size(n) for n in names))
            self.experts = max(self.experts, sum(size(n) for n in names if adapter.is_expert_tensor(n)))
            groups = {id(g): g for n in names for g in [weights.made_by.get(n)] if g is not None}.values()
            made = [math.prod(shape) * per for g in groups for shape in g.outputs.values()]
            self.fuse_extra = max(self.fuse_extra, max(made, default=0))
            dense = dense or not hasattr(adapter.mlp(layer), adapter.arch.experts)
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        d = int(cfg.get("hidden_size", 0))
        inter = int(cfg.get("intermediate_size", 4 * d) or 4 * d)
        if self.experts:  # top-k copies of each token through its experts, + the shared expert
            k = int(cfg.get("num_experts_per_tok", 1) or 1)
            moe = k * (d + int(cfg.get("moe_intermediate_size") or inter)) + int(cfg.get("shared_expert_intermediate_size") or 0)
            inter = max(moe, inter) if dense else moe
        self.per_token = (d + inter) * 4 * 3

    def peak(self, streaming: bool, batch_size: int, seq_len: int) -> float:
        held = self.resident + self.fuse_extra if streaming else self.total
        return held + batch_size * seq_len * self.per_token


def resume_dir_is_ours(path) -> bool:
    """A resume directory of ours: only the streaming runner's files (and per-rank subdirectories)."""
    import re
    from pathlib import Path

    from entrodrop_fast.profile.layerwise import RESUME_NAMES

    return all(e.name in RESUME_NAMES or (e.is_dir() and re.fullmatch(r"rank\d+-of-\d+", e.name)) for e in Path(path).iterdir())


def check_targets(args) -> None:
    """Refuse unusable --out / --resume-dir before any work (see entrodrop_fast.outputs)."""
    from pathlib import Path

    from entrodrop_fast import outputs

    inputs = [*outputs.model_paths(args.model, args.cache_dir), *outputs.corpus_paths(args.corpus)]
    out = outputs.check_dir(args.out, kind="report", what="report", inputs=inputs, overwrite=args.overwrite)
    if args.resume_dir:
        resume = Path(args.resume_dir).expanduser().resolve()
        outputs.check_dir(resume, kind="resume", what="resume state", flag="--resume-dir", overwrite=True, inputs=[*inputs, ("report directory --out", out)])
        if resume.is_dir() and not resume_dir_is_ours(resume):
            shown = ", ".join(sorted(e.name for e in resume.iterdir())[:4])
            raise outputs.OutputError(f"--resume-dir {resume} holds files that are not a resume state of entrodrop ({shown}); choose a new or empty directory")


def check_before_loading(args, methods):
    """What can be checked before the model loads: the corpus (read here, returned), --max-memory,
    knn's k against --seq-len, the estimator backend on --device, and --seq-len against the
    model's positions when its config is at hand (a local directory or a built-in model)."""
    import os

    from entrodrop_fast.data import load_corpus
    from entrodrop_fast.models.loading import (
        check_positions,
        display_name,
        parse_device,
        peek_config,
    )
    from entrodrop_fast.profile.inmemory import resolved_backend

    if args.max_memory is not None:
        parse_bytes(args.max_memory)
    if "knn" in methods and args.seq_len <= args.k:
        raise ValueError(f"knn needs more tokens per sample than k: --seq-len {args.seq_len} <= --k {args.k}; raise --seq-len or lower --k")
    device = parse_device(args.device)
    try:
        resolved_backend(args.backend, device)
    except ValueError as exc:
        forced = os.environ.get("ENTRODROP_BACKEND")
        if args.backend == "auto" and forced:
            raise ValueError(f"ENTRODROP_BACKEND={forced}: {exc}") from None
        raise ValueError(f"--backend {args.backend}: {exc}") from None
    corpus = load_corpus(args.corpus, args.text_field)
    check_positions(peek_config(args.model, args.cache_dir), [(args.seq_len, "--seq-len")], f"the model {display_name(args.model)}")
    return corpus


def _apply_preset(args) -> dict | None:
    """``--preset paper``: set the estimator (knn k=25, or bucket 80 bins for Mistral), batch 1
    and the dtype (fp16 on CUDA, fp32 on CPU) from the model's config; methods given with
    --method are profiled too. The report records the preset, so rank / prune protect layers
    0, 1 and the last from it. None without a preset."""
    from entrodrop_fast.profile.presets import check_preset, paper_preset

    if check_preset(getattr(args, "preset", None)) is None:
        return None
    from entrodrop_fast.models.loading import peek_config

    cfg = peek_config(args.model, args.cache_dir)
    if cfg is None:
        raise ValueError(f"--preset paper reads the architecture from the model's config.json: give a local model directory or a built-in name, not {args.model!r}")
    p = paper_preset(cfg.get("model_type"), cfg.get("num_hidden_layers"), args.device)
    extra = [m for spec in (args.method or []) for m in str(spec).split(",") if m.strip() and m.strip() != p["method"]]
    args.method = [p["method"], *extra]
    args.k, args.bins = p["k"], p["bins"]
    args.batch_size = args.batch_size or p["batch_size"]
    if p["dtype"] == "fp16":
        args.dtype = "fp16"
    print(f"entrodrop profile: --preset paper: {p['why']}", file=sys.stderr)
    return p


def register(subparsers) -> None:
    from entrodrop_fast.cli import int_at_least, positive_int

    p = subparsers.add_parser(
        "profile",
        help="entropy profile of a model's attention / MLP / layer blocks (the main job)",
        description=__doc__,
    )
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help="local HF directory, .gguf file, hub id or a built-in name (gemma3-270m); default: built-in SmolLM2-135M-Instruct")
    p.add_argument("--method", "-m", action="append", default=None, help="bucket, gaussian_diag, gaussian_full, knn, renyi, cosine, angular or all; several comma-separated or repeated (default bucket); all run in one forward pass")
    p.add_argument("--preset", default=None, choices=["paper"], help="paper: what the paper's code runs for this architecture (knn k=25, or bucket 80 bins for Mistral; batch 1; fp16 on CUDA, fp32 on CPU); rank/prune then protect layers 0, 1 and the last")
    p.add_argument("--samples", type=positive_int, default=PAPER_SAMPLES, help=f"calibration windows (default {PAPER_SAMPLES})")
    p.add_argument("--seq-len", type=int_at_least(2, "an entropy needs at least 2 tokens"), default=PAPER_SEQ_LEN, help=f"tokens per window (default {PAPER_SEQ_LEN})")
    p.add_argument("--batch-size", type=positive_int, default=None, help="windows per forward pass (default 1, as the paper; with --max-memory, the largest up to 8 that fits)")
    p.add_argument("--seed", type=int, default=PAPER_SEED, help=f"sampling seed (default {PAPER_SEED})")
    p.add_argument("--bins", type=positive_int, default=20, help="bucket: bins per channel (default 20; the paper used 20 for Llama, 80 for Mistral)")
    p.add_argument("--paper-exact", action="store_true", help="bucket: clamp probabilities at 1e-10 as the paper's code")
    p.add_argument("--k", type=positive_int, default=25, help="knn: neighbour rank k (default 25)")
    p.add_argument("--spans", default="1,2,4,8", help="angular: layer spans n (default 1,2,4,8)")
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"], help="model dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpp", "triton", "torch"], help="estimator backend (default auto: the fastest available)")
    p.add_argument("--out", default="entrodrop_report", help="report directory (default ./entrodrop_report; new, empty or an earlier report)")
    p.add_argument("--overwrite", action="store_true", help="write the report into --out even when it holds other files (they are left untouched)")
    p.add_argument("--corpus", default=None, help="builtin (default), stdlib-docs (docstrings of the standard library), a .txt file, a directory of .txt, a .jsonl file or hf:NAME[:CONFIG][:SPLIT]")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text (default text)")
    p.add_argument("--cache-dir", default=None, help="where the built-in model is converted (default $ENTRODROP_CACHE or ~/.cache/entrodrop_fast)")
    p.add_argument("--streaming", action="store_true", help="run layer by layer from the checkpoint's safetensors shards (models larger than memory)")
    p.add_argument("--max-memory", default=None, help="memory budget, e.g. 8GB: streams when the model does not fit, and keeps activations on disk beyond it")
    p.add_argument("--resume-dir", default=None, help="keep the streaming states here after every layer; rerun with the same arguments to resume (implies --streaming)")
    p.add_argument("--top", type=positive_int, default=8, help="blocks per kind in the terminal table (default 8)")
    p.add_argument("--no-plot", action="store_true", help="skip profile.png")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from entrodrop_fast.data import calibration_windows
    from entrodrop_fast.models import load_model
    from entrodrop_fast.profile.inmemory import (
        ProfileSettings,
        grouped_warnings,
        parse_methods,
        profile,
    )
    from entrodrop_fast.profile.report import build_report, ranking_table, write_report

    def warn(msg):  # warnings are shown with -q too
        print(f"entrodrop profile: {msg}", file=sys.stderr)
    from entrodrop_fast.prune.surgery import model_identity

    preset = _apply_preset(args)  # --preset paper: method, k, bins, batch size, dtype from the architecture
    methods = parse_methods(args.method or ["bucket"])
    for name, v in (("--samples", args.samples), ("--seq-len", args.seq_len), ("--batch-size", args.batch_size or 1), ("--bins", args.bins), ("--k", args.k)):
        if v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    from entrodrop_fast.ops.api import MAX_BINS

    if args.bins > MAX_BINS:  # before the model loads, not at the first estimator call
        raise ValueError(f"--bins must be at most {MAX_BINS} (every backend keeps that many counters per channel), got {args.bins}")
    settings = ProfileSettings(methods=methods, batch_size=args.batch_size or 1, backend=args.backend, bins=args.bins, k=args.k, paper_exact=args.paper_exact, spans=_spans(args.spans))
    check_targets(args)
    if args.quiet:  # -q: no progress bars, transformers' "Loading weights" included
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    corpus = check_before_loading(args, methods)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if args.resume_dir and not args.streaming:  # resuming exists only layer by layer: never ignore --resume-dir
        args.streaming = True
        log(f"--resume-dir {args.resume_dir}: streaming layer by layer (--resume-dir implies --streaming)")
    t0 = time.perf_counter()
    from entrodrop_fast.models.loading import display_name, parse_device, parse_dtype
    from entrodrop_fast.profile import distributed

    distributed.init_from_env(parse_device(args.device))
    rank, world = distributed.world()
    if rank:
        log = lambda *a: None  # noqa: E731
    budget = parse_bytes(args.max_memory) if args.max_memory is not None else None
    stream_dir = streaming_source(args.model, args.cache_dir) if (args.streaming or budget) else None
    if stream_dir is not None:  # an architecture outside the adapter table stops here, with the list
        from entrodrop_fast.models.loading import read_config

        read_config(str(stream_dir), f"the model directory {stream_dir}")
    plan = MemoryPlan(stream_dir, args.dtype) if budget else None
    if plan is not None and not args.streaming:
        if plan.total <= budget:
            stream_dir = None
        else:
            log(f"the model needs {plan.total / 2**30:.1f} GiB in {args.dtype}, more than --max-memory {args.max_memory}: streaming layer by layer")
    log(f"loading {'tokenizer' if stream_dir else 'model'} {display_name(args.model)} ({args.dtype}, {args.device}) ...")
    if stream_dir is not None:
        from entrodrop_fast.models.loading import check_vocab, config_value, load_tokenizer
        from entrodrop_fast.profile.layerwise import profile_streaming

        tokenizer = load_tokenizer(stream_dir)
        rows = config_value(json.loads((Path(stream_dir) / "config.json").read_text()), "vocab_size")
        rows = rows if isinstance(rows, int) else 0
        check_vocab(tokenizer, rows, stream_dir)
        lm = None
    else:
        lm = load_model(args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
        tokenizer = lm.tokenizer
        rows = lm.model.get_input_embeddings().weight.shape[0]
        from entrodrop_fast.models.loading import check_positions

        check_positions(lm.model.config, [(args.seq_len, "--seq-len")], f"the model {display_name(args.model)}")
    t_load = time.perf_counter() - t0
    windows, data_info = calibration_windows(tokenizer, corpus, samples=args.samples, seq_len=args.seq_len, seed=args.seed, text_field=args.text_field)
    from entrodrop_fast.models.loading import check_token_ids

    check_token_ids(windows, rows)  # before the first forward
    log(f"calibration: {data_info['samples']} x {data_info['seq_len']} tokens from {data_info['corpus']}; methods {', '.join(methods)}" + (f"; {world} processes" if world > 1 else ""))
    mine = distributed.shard(windows)
    streaming = stream_dir is not None
    if args.batch_size is None and plan is not None:
        # the largest batch (up to 8) whose peak fits the budget
        fits = [b for b in range(8, 0, -1) if plan.peak(streaming, b, args.seq_len) <= budget]
        if fits:
            args.batch_size = fits[0]
            log(f"batch size {args.batch_size} (the largest up to 8 that fits --max-memory {args.max_memory})")
    args.batch_size = args.batch_size or 1
    settings.batch_size = args.batch_size
    if streaming:
        if plan is not None:
            need = plan.peak(True, args.batch_size, args.seq_len)
            if need > budget:
                from entrodrop_fast.profile.layerwise import _size

                experts = f" with its experts ({_size(plan.experts)})" if plan.experts else ""
                fusing = f", plus {_size(plan.fuse_extra)} to fuse a layer's per-expert tensors" if plan.fuse_extra else ""
                raise ValueError(
                    f"--max-memory {args.max_memory} is too small: streaming needs about {_size(need)} (the largest of "
                    f"embedding and one layer{experts}{fusing}, plus one batch of {args.batch_size} x {args.seq_len} tokens); "
                    "raise it or lower --batch-size / --seq-len"
                )
        ram = budget if budget else 8 * 2**30
        with grouped_warnings(warn):
            result = profile_streaming(str(stream_dir), mine, settings, device=parse_device(args.device), dtype=parse_dtype(args.dtype), ram_budget_bytes=ram, resume_dir=args.resume_dir, progress=not args.quiet and rank == 0)
        source = args.model or "builtin"
        model_info = {"name": display_name(args.model), "source": source, "path": str(stream_dir), "kind": "streaming",
                      **model_identity(json.loads((Path(stream_dir) / "config.json").read_text()))}
    else:
        with grouped_warnings(warn):
            result = profile(lm.model, mine, settings, progress=not args.quiet and rank == 0)
        model_info = {"name": lm.name, "source": lm.source, "path": lm.path, "kind": lm.kind}
    result["tokens"] = int(windows.numel())
    result["tokens_per_s"] = windows.numel() / result["seconds"] if result["seconds"] > 0 else float("nan")
    if rank:
        return 0
    settings_info = {**({"preset": preset["preset"], "preset_why": preset["why"]} if preset else {}), "samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size, "seed": args.seed, "bins": args.bins, "paper_exact": args.paper_exact, "k": args.k, "spans": list(settings.spans) if "angular" in methods else [], "dtype": args.dtype, "device": args.device}
    if world > 1:
        settings_info["processes"] = world
    report = build_report(result, model_info=model_info, data_info=data_info, settings=settings_info, model=lm.model if lm else None)
    report["timing"]["load_seconds"] = t_load
    out = write_report(report, args.out, png=not args.no_plot, overwrite=args.overwrite)
    print(ranking_table(report, top=args.top))
    print(f"\nprofiled {result['samples']} samples in {result['seconds']:.1f} s ({result['tokens_per_s']:.0f} tokens/s, backend {result['backend']}); report: {out}")
    return 0
