"""The profile stage in one call: model source -> calibration windows -> one tapped pass -> report.

:func:`profile_model` is what ``entrodrop profile``, ``entrodrop prune`` (when it profiles
first) and :mod:`entrodrop_fast.evaluate.compare` call; it decides between the in-memory
runner (:mod:`.inmemory`) and the layer-by-layer one (:mod:`.layerwise`) from a memory budget,
sizes the batch, joins a distributed run (:mod:`.distributed`) and builds the report
(:mod:`.report`). It writes nothing: the caller publishes the report.

Errors name the settings through :func:`entrodrop_fast._names.setting`: by their Python names
(``max_memory``, ``seq_len``, ...), inside an ``entrodrop`` command by its flags
(``--max-memory``); a caller with other spellings passes ``names`` (setting -> spelling).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrodrop_fast._names import setting, spelled
from entrodrop_fast.data import PAPER_SAMPLES, PAPER_SEED, PAPER_SEQ_LEN
from entrodrop_fast.profile.inmemory import ProfileSettings

if TYPE_CHECKING:
    import torch

    from entrodrop_fast.data import Corpus
    from entrodrop_fast.models.loading import LoadedModel


@dataclass
class Calibration:
    """Where the calibration windows come from: ``corpus`` (None: the built-in reference prose;
    see :func:`entrodrop_fast.data.load_corpus`), ``samples`` windows of ``seq_len`` tokens
    drawn with ``seed`` (the paper's 128 x 256, seed 2024), the held-out part excluded."""

    corpus: str | Corpus | None = None
    text_field: str = "text"
    samples: int = PAPER_SAMPLES
    seq_len: int = PAPER_SEQ_LEN
    seed: int = PAPER_SEED


def check_resume_dir(path: str | os.PathLike[str], inputs: Iterable = ()) -> Path:
    """Refuse a resume directory that holds anything but a resume state of ours (the streaming
    runner's files, per-rank subdirectories), is a file, or is or lies in one of ``inputs``
    (``(name, path)`` pairs: the model, the corpus, the report's directory). Returns it
    resolved. Raises :class:`entrodrop_fast.outputs.OutputError` naming what to do; nothing is
    written into a directory of the user's."""
    from entrodrop_fast import outputs
    from entrodrop_fast.profile.layerwise import RESUME_NAMES, RUN_NAME

    resume = Path(path).expanduser().resolve()
    flag = setting("resume_dir")
    outputs.check_dir(
        resume, kind="resume", what="resume state", flag=flag, overwrite=True, inputs=inputs
    )
    if resume.is_dir():
        # a temporary of ours (state.pt.tmp, run.json.tmp) lies beside the run.json every run
        # writes first; without it, a file of that name is not ours (it would be removed)
        ours = set(RESUME_NAMES)
        if not (resume / RUN_NAME).is_file():
            ours = {n for n in ours if not n.endswith(".tmp")}
        foreign = sorted(
            e.name
            for e in resume.iterdir()
            if not (e.name in ours or (e.is_dir() and re.fullmatch(r"rank\d+-of-\d+", e.name)))
        )
        if foreign:
            raise outputs.OutputError(
                f"{flag} {resume} holds files that are not a resume state of entrodrop "
                f"({', '.join(foreign[:4])}); choose a new or empty directory"
            )
    return resume


def _budget_name() -> str:
    """How messages name the memory budget: ``Memory.max_bytes``, or the command's flag."""
    return setting("max_memory", python="Memory.max_bytes")


@dataclass
class Memory:
    """How much memory the profile may use. ``max_bytes``: a budget (None: no limit); the model
    is streamed layer by layer when it does not fit, and the batch is the largest (up to 8)
    that fits unless the settings fix it. ``streaming``: always layer by layer.
    ``resume_dir``: keep the layer-by-layer states there after every layer (implies
    streaming); a rerun with the same arguments resumes. ``label``: the budget as the user
    wrote it (``"8GB"``), for messages.

    ``max_bytes`` may be given as text (``"8GB"``, ``"512MiB"``: :func:`parse_bytes`). Raises
    ValueError for a budget that is not a positive size."""

    max_bytes: float | str | None = None
    streaming: bool = False
    resume_dir: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        value = self.max_bytes
        if value is None:
            return
        if isinstance(value, str):
            self.label = self.label or value
            self.max_bytes = parse_bytes(value)
            return
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            name = _budget_name()
            raise ValueError(
                f"{name} must be a positive number of bytes or a size like '8GB', got {value!r}"
            )


def parse_bytes(s: str, name: str | None = None) -> float:
    """'8GB', '512MiB', '1.5G', '1000000' -> bytes (K, M, G, T are powers of 1024).

    ``name``: how errors name the setting (default: ``max_memory``, as the caller spells it).
    Raises ValueError for anything else, or a size that is not positive.
    """
    name = name or _budget_name()
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(s))
    if not m:
        raise ValueError(f"{name} must look like 8GB, 512MB or 1.5G, got {s!r}")
    unit = m.group(2).upper()
    value = float(m.group(1)) * (1024 ** ("KMGT".index(unit) + 1) if unit else 1)
    if value <= 0:
        raise ValueError(f"{name} must be a positive size like 8GB, 512MB or 1.5G, got {s!r}")
    return value


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

    def __init__(self, model_dir: str | os.PathLike[str], dtype: str):
        from entrodrop_fast.models.adapters import get_adapter
        from entrodrop_fast.models.checkpoint import Checkpoint
        from entrodrop_fast.models.loading import parse_dtype
        from entrodrop_fast.profile.layerwise import WeightPlan, build_skeleton

        per = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
        ckpt = Checkpoint(model_dir)
        self.total = sum(math.prod(shape) for shape in ckpt.shapes.values()) * per
        model = build_skeleton(str(model_dir), parse_dtype(dtype))  # on meta: no memory
        adapter = get_adapter(model)
        weights = WeightPlan(
            model, ckpt
        )  # the model's tensors as transformers builds them from the checkpoint's
        size = lambda name: math.prod(weights.expected[name]) * per  # noqa: E731
        embed = sum(size(f"{adapter.arch.embed}.{k}") for k in adapter.embed(model).state_dict())
        self.resident, self.experts, self.fuse_extra = embed, 0, 0
        dense = False
        for i, layer in enumerate(adapter.layers(model)):
            names = [f"{adapter.arch.layers}.{i}.{k}" for k in layer.state_dict()]
            self.resident = max(self.resident, sum(size(n) for n in names))
            self.experts = max(
                self.experts, sum(size(n) for n in names if adapter.is_expert_tensor(n))
            )
            groups = {
                id(g): g for n in names for g in [weights.made_by.get(n)] if g is not None
            }.values()
            made = [math.prod(shape) * per for g in groups for shape in g.outputs.values()]
            self.fuse_extra = max(self.fuse_extra, max(made, default=0))
            dense = dense or not hasattr(adapter.mlp(layer), adapter.arch.experts)
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        d = int(cfg.get("hidden_size", 0))
        inter = int(cfg.get("intermediate_size", 4 * d) or 4 * d)
        if self.experts:  # top-k copies of each token through its experts, + the shared expert
            k = int(cfg.get("num_experts_per_tok", 1) or 1)
            moe = k * (d + int(cfg.get("moe_intermediate_size") or inter)) + int(
                cfg.get("shared_expert_intermediate_size") or 0
            )
            inter = max(moe, inter) if dense else moe
        self.per_token = (d + inter) * 4 * 3

    def peak(self, streaming: bool, batch_size: int, seq_len: int) -> float:
        held = self.resident + self.fuse_extra if streaming else self.total
        return held + batch_size * seq_len * self.per_token


def check_inputs(
    source: str | os.PathLike[str] | None,
    settings: ProfileSettings,
    calibration: Calibration,
    *,
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    names: Mapping[str, str] | None = None,
) -> Corpus:
    """What can be checked before the model loads: the corpus (read here, returned), knn's k
    against the window length, the estimator backend on ``device``, and the window length
    against the model's positions when its config is at hand (a local directory or a
    built-in model). ValueError naming the setting otherwise (``names``: other spellings of
    the settings, as for :func:`profile_model`)."""
    from entrodrop_fast.data import load_corpus
    from entrodrop_fast.models.loading import (
        check_positions,
        display_name,
        parse_device,
        peek_config,
    )
    from entrodrop_fast.profile.inmemory import parse_methods, resolved_backend

    with spelled(names):
        methods = parse_methods(settings.methods)
        if "knn" in methods and calibration.seq_len <= settings.k:
            seq_len, k = setting("seq_len"), setting("k")
            raise ValueError(
                f"knn needs more tokens per sample than k: {seq_len} {calibration.seq_len} <= "
                f"{k} {settings.k}; raise {seq_len} or lower {k}"
            )
        try:
            dev = parse_device(device)
        except ValueError as exc:  # the device's own fault, not the backend's
            raise ValueError(f"{setting('device')} {device}: {exc}") from None
        try:
            resolved_backend(settings.backend, dev)
        except ValueError as exc:
            forced = os.environ.get("ENTRODROP_BACKEND")
            if settings.backend == "auto" and forced:
                raise ValueError(f"ENTRODROP_BACKEND={forced}: {exc}") from None
            raise ValueError(f"{setting('backend')} {settings.backend}: {exc}") from None
        corpus = load_corpus(calibration.corpus, calibration.text_field)
        check_positions(
            peek_config(source, cache_dir),
            [(calibration.seq_len, setting("seq_len"))],
            f"the model {display_name(source)}",
        )
        return corpus


def profile_model(
    source: str | os.PathLike[str] | LoadedModel | None = None,
    settings: ProfileSettings | None = None,
    memory: Memory | None = None,
    *,
    calibration: Calibration | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    preset: dict[str, Any] | None = None,
    batch_size_fixed: bool = True,
    progress: bool = True,
    log: Callable[[str], object] | None = None,
    warn: Callable[[str], object] | None = None,
    names: Mapping[str, str] | None = None,
    corpus: str | Corpus | None = None,
    windows_out: list[torch.Tensor] | None = None,
) -> dict[str, Any] | None:
    """Profile the blocks of a model and return its report
    (:func:`entrodrop_fast.profile.report.build_report`).

    ``source``: what :func:`entrodrop_fast.models.load_model` accepts (None: the built-in
    SmolLM2-135M-Instruct), or a loaded :class:`entrodrop_fast.models.LoadedModel` (then
    ``dtype`` and ``device`` are the model's, and no memory plan applies).
    ``settings``: the estimators and their options (:class:`ProfileSettings`; default bucket,
    20 bins, batch 1). ``memory``: :class:`Memory` (None: in memory, no budget).
    ``calibration``: :class:`Calibration` (default: the built-in corpus, 128 x 256 tokens,
    seed 2024). ``batch_size_fixed=False``: the batch is the largest (up to 8) that fits
    ``memory.max_bytes``, else ``settings.batch_size``. ``preset``: the preset applied to the
    settings (:func:`entrodrop_fast.profile.presets.paper_preset`), recorded in the report.
    ``log``: a callable for progress lines (default silent); ``warn``: a callable that receives
    the estimators' warnings grouped, one line per kind (default: they go through
    :mod:`warnings` as they are). ``corpus``: the corpus already read by :func:`check_inputs`.
    ``windows_out``: a list that receives the calibration windows (``[samples, seq_len]`` token
    ids; for iterative re-scoring). ``names``: how messages spell the settings, setting ->
    spelling (e.g. ``{"max_memory": "--max-memory"}``; default: their Python names, or inside
    an ``entrodrop`` command its flags: :func:`entrodrop_fast._names.setting`).

    Returns the report, or None on a non-zero rank of a distributed run (rank 0 holds the
    merged report). Raises ValueError for bad settings, ModelLoadError / CheckpointError
    for a model that cannot be loaded or streamed.
    """
    from entrodrop_fast.data import calibration_windows
    from entrodrop_fast.models.config import model_identity
    from entrodrop_fast.models.loading import (
        LoadedModel,
        check_positions,
        check_token_ids,
        check_vocab,
        config_value,
        display_name,
        load_model,
        load_tokenizer,
        parse_device,
        parse_dtype,
        read_config,
        resolve_source,
    )
    from entrodrop_fast.profile import distributed
    from entrodrop_fast.profile.inmemory import grouped_warnings, parse_methods, profile
    from entrodrop_fast.profile.report import build_report

    with spelled(names):
        settings = settings or ProfileSettings()
        memory = memory or Memory()
        calibration = calibration or Calibration()
        log = log or (lambda *a: None)
        if memory.resume_dir:
            check_resume_dir(memory.resume_dir)
        methods = parse_methods(settings.methods)
        loaded = source if isinstance(source, LoadedModel) else None
        if loaded is not None:  # the model's own dtype and device
            import torch

            first = next(loaded.model.parameters())
            dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
                first.dtype, str(first.dtype)
            )
            device = str(first.device)
        if corpus is None:
            if isinstance(source, LoadedModel):
                corpus = calibration.corpus
            else:
                corpus = check_inputs(
                    source, settings, calibration, device=device, cache_dir=cache_dir
                )
        streaming_asked = memory.streaming or memory.resume_dir is not None
        if memory.resume_dir and not memory.streaming:
            # resuming exists only layer by layer: never ignore resume_dir
            resume_dir = setting("resume_dir")
            log(
                f"{resume_dir} {memory.resume_dir}: streaming layer by layer ({resume_dir} "
                f"implies {setting('streaming')})"
            )
        t0 = time.perf_counter()
        distributed.init_from_env(parse_device(device))
        rank, world = distributed.world()
        if rank:
            log = lambda *a: None  # noqa: E731
        budget = memory.max_bytes
        label = memory.label or (f"{budget:.0f} bytes" if budget else "")
        stream_dir = None
        if loaded is None and (streaming_asked or budget):
            stream_dir = resolve_source(source, cache_dir, need="local")
            # an architecture outside the adapter table stops here
            read_config(str(stream_dir), f"the model directory {stream_dir}")
        plan = MemoryPlan(stream_dir, dtype) if budget and stream_dir is not None else None
        if plan is not None and not streaming_asked:
            if plan.total <= budget:
                stream_dir = None
            else:
                log(
                    f"the model needs {plan.total / 2**30:.1f} GiB in {dtype}, more than "
                    f"{_budget_name()} {label}: streaming layer by layer"
                )
        if loaded is None:
            what = "tokenizer" if stream_dir else "model"
            log(f"loading {what} {display_name(source)} ({dtype}, {device}) ...")
        if stream_dir is not None:
            tokenizer = load_tokenizer(stream_dir)
            rows = config_value(
                json.loads((Path(stream_dir) / "config.json").read_text()), "vocab_size"
            )
            rows = rows if isinstance(rows, int) else 0
            check_vocab(tokenizer, rows, stream_dir)
            lm = None
        else:
            lm = loaded or load_model(source, dtype=dtype, device=device, cache_dir=cache_dir)
            tokenizer = lm.tokenizer
            rows = lm.model.get_input_embeddings().weight.shape[0]
            check_positions(
                lm.model.config,
                [(calibration.seq_len, setting("seq_len"))],
                f"the model {lm.name}",
            )
        t_load = time.perf_counter() - t0
        windows, data_info = calibration_windows(
            tokenizer,
            corpus,
            samples=calibration.samples,
            seq_len=calibration.seq_len,
            seed=calibration.seed,
            text_field=calibration.text_field,
        )
        check_token_ids(windows, rows)  # before the first forward
        log(
            f"calibration: {data_info['samples']} x {data_info['seq_len']} tokens from "
            f"{data_info['corpus']}; methods {', '.join(methods)}"
            + (f"; {world} processes" if world > 1 else "")
        )
        mine = distributed.shard(windows)
        streaming = stream_dir is not None
        if not batch_size_fixed and plan is not None:
            # the largest batch (up to 8) whose peak fits the budget
            fits = [
                b for b in range(8, 0, -1) if plan.peak(streaming, b, calibration.seq_len) <= budget
            ]
            if fits:
                settings.batch_size = fits[0]
                log(
                    f"batch size {settings.batch_size} (the largest up to 8 that fits "
                    f"{_budget_name()} {label})"
                )
        # warn: the estimators' warnings grouped, one line per kind; None: left to the warnings
        # module
        grouped = (lambda: grouped_warnings(warn)) if warn is not None else contextlib.nullcontext
        if streaming:
            from entrodrop_fast.profile.layerwise import _size, profile_streaming

            if plan is not None:
                need = plan.peak(True, settings.batch_size, calibration.seq_len)
                if need > budget:
                    experts = f" with its experts ({_size(plan.experts)})" if plan.experts else ""
                    fusing = (
                        f", plus {_size(plan.fuse_extra)} to fuse a layer's per-expert tensors"
                        if plan.fuse_extra
                        else ""
                    )
                    batch = f"{settings.batch_size} x {calibration.seq_len} tokens"
                    raise ValueError(
                        f"{_budget_name()} {label} is too small: streaming needs about "
                        f"{_size(need)} (the largest of embedding and one layer{experts}{fusing}, "
                        f"plus one batch of {batch}); raise it or lower {setting('batch_size')} / "
                        f"{setting('seq_len')}"
                    )
            ram = budget if budget else 8 * 2**30
            with grouped():
                result = profile_streaming(
                    str(stream_dir),
                    mine,
                    settings,
                    device=parse_device(device),
                    dtype=parse_dtype(dtype),
                    ram_budget_bytes=ram,
                    resume_dir=memory.resume_dir,
                    progress=progress and rank == 0,
                )
            model_info = {
                "name": display_name(source),
                "source": source or "builtin",
                "path": str(stream_dir),
                "kind": "streaming",
                **model_identity(json.loads((Path(stream_dir) / "config.json").read_text())),
            }
        else:
            with grouped():
                result = profile(lm.model, mine, settings, progress=progress and rank == 0)
            model_info = {"name": lm.name, "source": lm.source, "path": lm.path, "kind": lm.kind}
        result["tokens"] = int(windows.numel())
        result["tokens_per_s"] = (
            windows.numel() / result["seconds"] if result["seconds"] > 0 else float("nan")
        )
        if result.get("resumed_from_layer"):  # the seconds cover only the layers run here
            result["tokens_per_s"] = float("nan")
        if rank:
            return None
        settings_info = {
            **({"preset": preset["preset"], "preset_why": preset["why"]} if preset else {}),
            "samples": calibration.samples,
            "seq_len": calibration.seq_len,
            "batch_size": settings.batch_size,
            "seed": calibration.seed,
            "bins": settings.bins,
            "paper_exact": settings.paper_exact,
            "k": settings.k,
            "spans": list(settings.spans) if "angular" in methods else [],
            "dtype": dtype,
            "device": device,
        }
        if world > 1:
            settings_info["processes"] = world
        report = build_report(
            result,
            model_info=model_info,
            data_info=data_info,
            settings=settings_info,
            model=lm.model if lm else None,
        )
        report["timing"]["load_seconds"] = t_load
        if windows_out is not None:
            windows_out.append(windows)
        return report
