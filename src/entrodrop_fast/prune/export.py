"""Export a pruned checkpoint without loading the model, and load it back.

:func:`export_pruned` rewrites the safetensors shards of a Hugging Face model directory
tensor by tensor: every source header is read and checked with ``safe_open`` first (a
corrupt or truncated shard fails before anything is written), then each kept tensor's bytes
are copied as they are (no dtype conversion) in 16 MB chunks, so memory stays flat whatever
the checkpoint size (measured: peak RSS +17 MB over an idle process with torch imported,
exporting SmolLM2's 513 MB). Tensors of dropped layers / sub-blocks are left out, later
layers are renamed to their new index;
a consistent ``model.safetensors.index.json``, the rewritten config (see
:func:`entrodrop_fast.prune.surgery.pruned_config_dict`), the generation config and the tokenizer
files go with them. Everything is written into a temporary directory beside the output and
renamed into place at the end: a failure leaves no output directory, and the source
directory is only read.

- Whole-layer drops only: a standard checkpoint of the original architecture with fewer
  layers (stock ``transformers`` loads it; so do tools that read standard checkpoints).
- attn / mlp drops: the weights are physically removed, ``config.json`` records the
  dropped sub-blocks (``entrodrop_pruned``) and carries ``auto_map`` to a small modeling
  file written into the directory (``modeling_entrodrop_pruned.py``: stock ``transformers``
  + torch only), so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
  loads it; :func:`load_pruned` loads it without remote code. ``architectures`` names the
  pruned class, so tools that only know standard architectures refuse it. Caveat: stock
  ``from_pretrained(DIR)`` *without* ``trust_remote_code`` still builds the original class
  with random weights in place of the removed ones (it only warns about them); with
  attention dropped its first forward with a KV cache raises ``NotImplementedError``
  (transformers' "Dummy layer" cache), otherwise it runs on those random weights. The
  ``model_type`` is kept so the per-architecture adapters still apply to the loaded model;
  :func:`entrodrop_fast.models.load_model`, the loader of every command, detects such
  directories (config key ``entrodrop_pruned``) and loads them as the pruned model.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import struct
import types
from dataclasses import dataclass, field
from pathlib import Path

from entrodrop_fast import outputs
from entrodrop_fast.models import pruned
from entrodrop_fast.models.adapters import Adapter, get_adapter
from entrodrop_fast.models.checkpoint import INDEX_NAME, SINGLE_NAME
from entrodrop_fast.models.pruned import pruned_model_class
from entrodrop_fast.prune import surgery
from entrodrop_fast.prune.surgery import (
    PRUNED_KEY,
    Drops,
    has_subblock_drops,
    normalize_drops,
    pruned_config_dict,
    read_plan,
)

INDEX = INDEX_NAME
SINGLE = SINGLE_NAME
MODELING_FILE = "modeling_entrodrop_pruned.py"
PLAN_FILE = "entrodrop_plan.json"
# files of the source directory never copied: weights (rewritten), config (rewritten), other
# weight formats (would describe the unpruned model), the built-in model's cache marker
_SKIP = {
    "config.json",
    INDEX,
    MODELING_FILE,
    "entrodrop_source.json",
    "pytorch_model.bin.index.json",
}
_SKIP_SUFFIX = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_CHUNK = 16 << 20  # bytes copied at a time
_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}


class ExportError(RuntimeError):
    """The export could not be completed; no output directory was left behind."""


@dataclass
class ExportSummary:
    out: str
    drops: dict
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    stock_loadable: bool
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ------------------------------------------------------------------ source checkpoint


def _shards(src: Path) -> tuple[dict[str, str], list[str]]:
    """(tensor name -> shard file name, shard file names in order)."""
    if (src / INDEX).is_file():
        try:
            index = json.loads((src / INDEX).read_text())
            weight_map = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ExportError(f"{src / INDEX} is not a valid safetensors index: {exc}") from None
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:
            if not (src / f).is_file():
                raise ExportError(f"shard {f} named in {src / INDEX} is missing")
        return weight_map, files
    if (src / SINGLE).is_file():
        return {}, [SINGLE]
    raise ExportError(f"{src} has no {SINGLE} or {INDEX}: not a safetensors checkpoint")


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise ExportError(
            f"cannot read safetensors file {path}: {type(exc).__name__}: {exc}"
        ) from exc


def _layer_patterns(adapter: Adapter) -> list[re.Pattern]:
    full = adapter.arch.layers
    prefixes = [full] + ([full.split(".", 1)[1]] if "." in full else [])
    return [re.compile(rf"^(?P<pre>{re.escape(p)})\.(?P<idx>\d+)\.(?P<rest>.+)$") for p in prefixes]


def _subblock_of(rest: str, adapter: Adapter, paths: dict) -> str | None:
    """Which sub-block a tensor inside a layer belongs to: attn, mlp, shared, or None (unknown)."""
    groups = {
        "attn": [paths["attn"], *paths["attn_norms"], *adapter.subblock_aliases("attn")],
        "mlp": [paths["mlp"], *paths["mlp_norms"], *adapter.subblock_aliases("mlp")],
        "shared": list(paths.get("shared_norms", [])),
    }
    for group, names in groups.items():
        if any(rest.startswith(n + ".") for n in names):
            return group
    return None


def _plan_tensors(names: list[str], adapter: Adapter, drops: Drops) -> dict[str, str | None]:
    """source name -> output name (None: left out)."""
    pats = _layer_patterns(adapter)
    new_of = {old: new for new, old in enumerate(drops.kept)}
    paths = surgery.subblock_paths(adapter)
    attn, mlp = set(drops.attn), set(drops.mlp)
    out: dict[str, str | None] = {}
    for name in names:
        m = next((mm for p in pats if (mm := p.match(name))), None)
        if m is None:
            out[name] = name
            continue
        i, rest = int(m["idx"]), m["rest"]
        if i >= drops.num_layers:
            raise ExportError(
                f"tensor {name} belongs to layer {i}, but the config has {drops.num_layers} layers"
            )
        if i not in new_of:
            out[name] = None
            continue
        if i in attn or i in mlp:
            group = _subblock_of(rest, adapter, paths)
            if group is None:
                raise ExportError(
                    f"tensor {name}: cannot tell which sub-block of layer {i} it belongs to "
                    f"(expected a name under {paths['attn']}, {paths['mlp']} or their norms)"
                )
            if (group == "attn" and i in attn) or (group == "mlp" and i in mlp):
                out[name] = None
                continue
        out[name] = f"{m['pre']}.{new_of[i]}.{rest}"
    return out


# ------------------------------------------------------------------ writing


def _raw_header(path: str) -> tuple[dict, int]:
    """(header dict, offset of the data section) of a safetensors file, read directly."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(size))
    return head, 8 + size


def _write_shard(
    dst: Path, items: list[tuple[str, str, object, str]], metadata: dict | None
) -> int:
    """Write ``items`` = [(out name, src name, safe_open handle, src file)] as one safetensors file.

    The header is computed from the source headers first; then each tensor is read and its
    bytes written, one at a time. Returns the number of data bytes.
    """
    header: dict = {}
    offset = 0
    specs = []
    for out_name, src_name, handle, src_file in items:
        try:
            sl = handle.get_slice(src_name)
            dtype, shape = sl.get_dtype(), list(sl.get_shape())
        except Exception as exc:
            raise ExportError(
                f"{src_file}: cannot read the header of tensor {src_name}: {exc}"
            ) from exc
        if dtype not in _DTYPE_BYTES:
            raise ExportError(
                f"{src_file}: tensor {src_name} has dtype {dtype}, which export does not know"
            )
        n = _DTYPE_BYTES[dtype]
        for s in shape:
            n *= s
        header[out_name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        specs.append((out_name, src_name, handle, src_file, n))
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    src_headers: dict[str, tuple[dict, int]] = {}
    buf = bytearray(_CHUNK)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _out_name, src_name, _handle, src_file, n in specs:
            if src_file not in src_headers:
                src_headers[src_file] = _raw_header(src_file)
            head, start = src_headers[src_file]
            entry = head.get(src_name)
            if entry is None or entry["data_offsets"][1] - entry["data_offsets"][0] != n:
                raise ExportError(
                    f"{src_file}: the header entry of tensor {src_name} does not match its dtype "
                    "and shape"
                )
            # copy the bytes as they are, in chunks: memory stays at one chunk whatever the tensor
            with open(src_file, "rb") as g:
                g.seek(start + entry["data_offsets"][0])
                left = n
                while left:
                    view = memoryview(buf)[: min(left, _CHUNK)]
                    got = g.readinto(view)
                    if not got:
                        raise ExportError(
                            f"{src_file}: tensor {src_name} is truncated ({n - left} of {n} bytes)"
                        )
                    f.write(view[:got])
                    left -= got
        f.flush()
        os.fsync(f.fileno())
    return offset


def _modeling_source(base_class: str, model_type: str) -> str:
    parts = [
        inspect.getsource(obj)
        for obj in (
            pruned.ZeroAttention,
            pruned.ZeroMLP,
            pruned._set_path,
            pruned._get_path,
            pruned.apply_subblock_drops_,
            pruned.inherit_weight_renaming,
        )
    ]
    return (
        '"""Written by entrodrop_fast: the original architecture with some attention / MLP '
        "sub-blocks\n"
        "removed (listed in config.json under entrodrop_pruned). Needs torch and transformers "
        "only.\n"
        '"""\n\n'
        "from torch import nn\n"
        f"from transformers import {base_class} as _Base\n\n\n"
        + "\n\n".join(parts)
        + f"\n\nclass EntrodropPruned{base_class}(_Base):\n"
        "    def __init__(self, config, *args, **kwargs):\n"
        "        super().__init__(config, *args, **kwargs)\n"
        "        apply_subblock_drops_(self, config.entrodrop_pruned)\n\n\n"
        f'inherit_weight_renaming("EntrodropPruned{base_class}", "{base_class}", "{model_type}")\n'
    )


def _check_against_config(src: Path, per_file: list[tuple[str, object, list[str]]]) -> None:
    """The source tensors are exactly those of the model its config describes (names and shapes).

    Uses the same check as the loader (a ``meta`` skeleton of the config, checkpoint names
    renamed as transformers does on load): a checkpoint missing a tensor, holding one
    too many, or whose config sizes disagree with the weights would export a checkpoint
    that cannot load.
    """
    from entrodrop_fast.models.loading import (
        ModelLoadError,
        checkpoint_problems,
        mismatch_message,
        read_config,
    )

    shapes, file_of = {}, {}
    for fname, h, names in per_file:
        for n in names:
            shapes[n] = list(h.get_slice(n).get_shape())
            file_of[n] = str(src / fname)
    try:
        problems = checkpoint_problems(read_config(str(src), f"the source {src}"), shapes, file_of)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None
    if problems:
        raise ExportError(mismatch_message(src, problems) + "; nothing was exported")


def _param_count(shapes: list[list[int]]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def _main_dtype_bytes(sizes: dict[str, int]) -> int:
    return _DTYPE_BYTES[max(sizes, key=sizes.get)] if sizes else 2


def _read_config(path: Path) -> dict:
    """A model directory's config.json as a dict; :class:`ExportError` naming the file when it
    is not a JSON object (a damaged or hand-edited model directory)."""
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); the "
            "model directory is damaged: restore its config.json"
        ) from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{path} holds {type(cfg).__name__}, not a JSON object of settings")
    return cfg


def export_pruned(
    src, out, plan, *, overwrite: bool = False, plan_to_save: dict | None = None
) -> ExportSummary:
    """Write the checkpoint in ``src`` minus the blocks of ``plan`` to the directory ``out``.

    ``plan``: a plan dict / JSON path from :mod:`entrodrop_fast.prune.ranking` or a plain
    ``{"attn": [...], "mlp": [...], "layer": [...]}`` with 0-based layer indices of ``src``.
    Raises :class:`ExportError` (nothing written) when the source is unreadable or the plan
    does not fit it, :class:`~entrodrop_fast.outputs.OutputError` when ``out`` holds an earlier
    export and ``overwrite`` is false, or holds other files (see :mod:`entrodrop_fast.outputs`).
    ``plan_to_save``: written as ``entrodrop_plan.json`` beside the weights (provenance).
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    if not (src / "config.json").is_file():
        raise ExportError(f"{src} has no config.json: not a Hugging Face model directory")
    if out == src or src in out.parents or out in src.parents:
        raise ExportError(f"output {out} must not be the source {src}, inside it, or contain it")
    outputs.check_dir(
        out, kind="model", what="pruned model", overwrite=overwrite, replace_ours=False
    )
    cfg = _read_config(src / "config.json")
    adapter = get_adapter(types.SimpleNamespace(**cfg))
    L = surgery._num_layers_of(cfg)
    plan_d = read_plan(plan)
    try:
        if isinstance(
            plan_d.get("model"), dict
        ):  # made for this model? (type, sizes, config fingerprint)
            surgery.warn_unchecked(
                surgery.check_same_model(plan_d["model"], cfg, target=str(src)), target=str(src)
            )
        drops = normalize_drops(plan_d, L)
        # per-layer properties written out for the kept layers, checked against a rebuild
        new_cfg = pruned_config_dict(cfg, adapter, drops)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    stock = not has_subblock_drops(new_cfg)

    weight_map, files = _shards(src)
    publisher = outputs.DirPublisher(
        out, kind="model", what="pruned model", overwrite=overwrite, replace_ours=False
    )
    tmp = publisher.tmp
    handles = []
    try:
        # read every source header first: a corrupt shard fails before anything is written
        per_file: list[tuple[str, object, list[str]]] = []
        params_before = 0
        dtype_sizes: dict[str, int] = {}
        for fname in files:
            h = _open(src / fname)
            handles.append(h)
            names = list(h.keys())
            if weight_map:
                listed = [n for n, f in weight_map.items() if f == fname]
                missing = sorted(set(listed) - set(names))
                if missing:
                    raise ExportError(
                        f"{src / fname}: tensors {missing[:3]} are listed in {INDEX} but not in "
                        "the file"
                    )
                names = listed
            shapes = []
            for n in names:
                try:
                    sl = h.get_slice(n)
                    shape, dt = list(sl.get_shape()), sl.get_dtype()
                except Exception as exc:
                    raise ExportError(
                        f"{src / fname}: cannot read the header of tensor {n}: {exc}"
                    ) from exc
                shapes.append(shape)
                dtype_sizes[dt] = dtype_sizes.get(dt, 0) + _param_count([shape])
            params_before += _param_count(shapes)
            per_file.append((fname, h, names))
        all_names = [n for _, _, names in per_file for n in names]
        _check_against_config(src, per_file)
        mapping = _plan_tensors(all_names, adapter, drops)

        groups = []
        for fname, h, names in per_file:
            items = [(mapping[n], n, h, str(src / fname)) for n in names if mapping[n] is not None]
            if items:
                groups.append((fname, h, items))
        out_files, new_map, total = [], {}, 0
        for k, (_fname, h, items) in enumerate(groups):
            oname = (
                SINGLE
                if not weight_map and len(groups) == 1
                else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            )
            total += _write_shard(tmp / oname, items, h.metadata() or {"format": "pt"})
            out_files.append(oname)
            new_map.update({item[0]: oname for item in items})
        if weight_map or len(out_files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")

        if not stock:
            base = (cfg.get("architectures") or [None])[0]
            rec = new_cfg[PRUNED_KEY]
            base = rec.get("base_architecture") or base
            if not base:
                raise ExportError(
                    "config.json has no 'architectures': cannot name the model class to subclass"
                )
            rec["base_architecture"] = base
            new_cfg["architectures"] = [f"EntrodropPruned{base}"]
            new_cfg["auto_map"] = {
                "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.EntrodropPruned{base}"
            }
            (tmp / MODELING_FILE).write_text(_modeling_source(base, adapter.model_type))
        else:
            new_cfg.pop("auto_map", None)
            rec = new_cfg.get(PRUNED_KEY)
            if rec and rec.get("base_architecture"):
                new_cfg["architectures"] = [rec["base_architecture"]]
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
        if plan_to_save is not None:
            (tmp / PLAN_FILE).write_text(json.dumps(plan_to_save, indent=1) + "\n")
        for p in sorted(src.iterdir()):
            if (
                p.is_file()
                and not (plan_to_save is not None and p.name == PLAN_FILE)
                and p.name not in _SKIP
                and not p.name.endswith(_SKIP_SUFFIX)
            ):
                shutil.copy2(p, tmp / p.name)

        # check what was written before it is moved into place
        params_after = 0
        for oname in out_files:
            with _open(tmp / oname) as h:
                params_after += _param_count([list(h.get_slice(n).get_shape()) for n in h.keys()])
        bytes_before = sum((src / f).stat().st_size for f in files)
        bytes_after = sum((tmp / f).stat().st_size for f in out_files)
        handles.clear()
        publisher.commit()
    except BaseException:
        handles.clear()
        publisher.abort()
        raise
    dtb = _main_dtype_bytes(dtype_sizes)
    return ExportSummary(
        out=str(out),
        drops=drops.as_dict(),
        layers_before=L,
        layers_after=len(drops.kept),
        params_before=params_before,
        params_after=params_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        kv_bytes_per_token_before=surgery.kv_bytes_per_token(cfg, dtb),
        kv_bytes_per_token_after=surgery.kv_bytes_per_token(new_cfg, dtb),
        stock_loadable=stock,
        files=sorted(os.listdir(out)),
    )


# ------------------------------------------------------------------ loading


def load_pruned(path, **kwargs):
    """Load a checkpoint written by :func:`export_pruned` (or any HF causal LM directory).

    Sub-block drops recorded in its config are applied to the original architecture before
    the weights are loaded (no remote code runs). ``kwargs`` go to ``from_pretrained``
    (``dtype=``, ``device_map=`` ...). :func:`entrodrop_fast.models.load_model` loads the same
    directories and also refuses missing, unexpected or mismatched tensors.
    """
    import transformers

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a model directory")
    cfg = _read_config(cfg_file)
    kwargs.setdefault("trust_remote_code", False)
    if not has_subblock_drops(cfg):
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
    try:
        cls = pruned_model_class(cfg)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return cls.from_pretrained(str(path), **kwargs).eval()
