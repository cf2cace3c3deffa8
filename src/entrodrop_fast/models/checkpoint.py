"""A Hugging Face model directory's safetensors checkpoint, read tensor by tensor.

Layer-by-layer profiling (:mod:`entrodrop_fast.profile.layerwise`) materialises one decoder
layer at a time from it; loading (:mod:`entrodrop_fast.models.loading`) checks a checkpoint
against its config from the headers, without reading a weight.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"

SINGLE_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """The checkpoint on disk is missing, incomplete, corrupt or does not match its config."""


class Checkpoint:
    """The safetensors tensors of a Hugging Face model directory, read tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(path)
        if not (self.dir / "config.json").is_file():
            raise CheckpointError(
                f"{self.dir}: no config.json (not a Hugging Face model directory)"
            )
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        elif (self.dir / SINGLE_NAME).is_file():
            weight_map = None
        else:
            raise CheckpointError(
                f"{self.dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found (only safetensors "
                "checkpoints stream)"
            )
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        self.shapes: dict[str, list[int]] = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            f = self.dir / name
            if not f.is_file():
                example = next(k for k, v in weight_map.items() if v == name)
                raise CheckpointError(
                    f"{f}: shard listed in {INDEX_NAME} is missing (it holds e.g. {example})"
                )
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for key in fh.keys():
                        self.shapes[key] = list(fh.get_slice(key).get_shape())
                        self.file_of[key] = name
            except Exception as exc:
                raise CheckpointError(
                    f"{f}: not a readable safetensors file, truncated or corrupt? "
                    f"({type(exc).__name__}: {exc})"
                ) from None
        if weight_map:
            for key, name in weight_map.items():
                if self.file_of.get(key) != name:
                    raise CheckpointError(
                        f"{self.dir / name}: tensor {key} listed in {INDEX_NAME} is not in that "
                        "file"
                    )
        self.bytes = sum((self.dir / n).stat().st_size for n in files)
        self.files = files

    def identity(self) -> dict:
        """What identifies these weights without reading them: the config's content, and the
        name, size and modification time of the index and of every shard."""
        names = ([INDEX_NAME] if (self.dir / INDEX_NAME).is_file() else []) + list(self.files)
        stats = [[n, st.st_size, st.st_mtime_ns] for n in names for st in [(self.dir / n).stat()]]
        return {
            "config": hashlib.sha256((self.dir / "config.json").read_bytes()).hexdigest(),
            "weights": hashlib.sha256(json.dumps(stats).encode()).hexdigest(),
        }

    def load(self, keys, device, dtype) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        for name, ks in by_file.items():
            path = self.dir / name
            try:
                with safe_open(str(path), framework="pt", device="cpu") as fh:
                    for k in ks:
                        out[k] = fh.get_tensor(k).to(device=device, dtype=dtype)
            except Exception as exc:
                raise CheckpointError(
                    f"{path}: could not read tensors {ks[:3]} ({type(exc).__name__}: {exc})"
                ) from None
        return out
