"""Streaming runner: profile a model larger than memory, one decoder layer at a time.

The model is built as a skeleton on the ``meta`` device (no weights). Only the embedding,
the final norm and the rotary embedding (whose buffers are computed, not stored) are made
real. Then, layer-outer::

    activations[s] = embed(window s)                      for every calibration batch s
    for l in layers:
        load layer l's tensors from the safetensors shards onto the device
        (layer l + 1's are read on a background thread meanwhile)
        activations[s] = layer_l(activations[s])          for every batch, under the taps
        free layer l

Checkpoint names become the model's tensors through transformers' own load-time rules for
the model class (:class:`WeightPlan`): a mixture-of-experts checkpoint stored per expert
(Mixtral's ``block_sparse_moe.experts.N.w1/w2/w3``, Qwen-MoE's ``experts.N.gate_proj/up_proj/
down_proj``) has each layer's experts read and fused into the model's ``gate_up_proj`` /
``down_proj`` on the prefetch thread, exactly as ``from_pretrained`` fuses them; the MLP block
of such a layer is the whole sparse-MoE block (router, experts, shared expert).

The taps and estimators are the in-memory runner's (:mod:`entrodrop_fast.profile.taps`), so the
report is the same. The masks, position ids and rotary embeddings each layer receives are
captured from the model's own forward (run once per batch with the layers replaced by
recorders), so they are exactly what the model would pass.

Activations live in two buffers (read one, write the other) in RAM up to a budget, beyond
it in files in a temporary directory that is removed afterwards. Their space is reserved
before any work (``posix_fallocate``), so a full disk is an error with a message, never a
SIGBUS halfway through.

With ``resume_dir`` the buffers and, after each layer, the estimator states are kept there,
and a run restarted with the same arguments continues after the last finished layer. The
directory holds ``run.json`` (the fingerprint of the run: model files, dtype, device,
calibration tokens, every setting), ``act_a.bin`` / ``act_b.bin`` (the buffers) and
``state.pt`` (layers done, which buffer is current, the estimator states; written
atomically after the finished layer's activations are on disk). A resume with other
arguments, or from a directory with a file missing, truncated or corrupt, stops with a
message naming what is wrong; activation files are never re-created on resume. Under
``torchrun`` each rank keeps its files in ``rank{R}-of-{N}/`` inside ``resume_dir``.

Peak memory: on the device, the embedding while the batches are embedded, then one layer
(with all its experts) + one batch's activations; in RAM, the prefetched layer + the
activation buffers (2 x samples x T x D x bytes; on disk beyond ``ram_budget_bytes``), and
while a per-expert layer is fused, its largest fused tensor once more.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from entrodrop_fast import outputs
from entrodrop_fast._names import setting
from entrodrop_fast.models.adapters import get_adapter, get_attr
from entrodrop_fast.models.checkpoint import (  # noqa: F401  (part of this module's API)
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    CheckpointError,
)
from entrodrop_fast.models.loading import load_time_transforms
from entrodrop_fast.profile.taps import BlockStatistics, ResidualTaps

RUN_NAME = "run.json"
STATE_NAME = "state.pt"
ACT_NAMES = ("act_a.bin", "act_b.bin")
#: every name the runner writes in a resume directory (``state.pt.tmp`` while a state is
#: being saved, ``rank{R}-of-{N}`` directories under torchrun)
RESUME_NAMES = (RUN_NAME, STATE_NAME, *ACT_NAMES, STATE_NAME + ".tmp", RUN_NAME + ".tmp")


#: a run without ``resume_dir`` keeps its activation files in TMPDIR/entrodrop-acts-PID-XXXX
ACT_DIR_PREFIX = "entrodrop-acts-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True


def sweep_stale_activation_dirs(root: str | None = None) -> list[str]:
    """Remove the activation directories of runs that were killed (their PID is gone): only
    ``entrodrop-acts-PID-*`` directories holding nothing but our activation files. Returns
    them."""
    import re

    root = root or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for e in entries:
        m = re.fullmatch(re.escape(ACT_DIR_PREFIX) + r"(\d+)-[A-Za-z0-9_]+", e.name)
        if (
            not m
            or not e.is_dir(follow_symlinks=False)
            or int(m.group(1)) == os.getpid()
            or _pid_alive(int(m.group(1)))
        ):
            continue
        try:
            names = os.listdir(e.path)
            if any(n not in ACT_NAMES for n in names):
                continue  # not only ours: left alone
            for n in names:
                os.remove(os.path.join(e.path, n))
            os.rmdir(e.path)
            removed.append(e.path)
        except OSError:
            continue
    return removed


class ResumeError(ValueError):
    """The resume directory holds a run with other arguments, or is incomplete or corrupt."""


def _remove_it() -> str:
    """What to do about a resume directory that cannot be used (the end of a message)."""
    return f"remove it or choose another {setting('resume_dir')}"


def _writable_hint(directory: str) -> str:
    """What to do when ``directory``, a resume directory, cannot be written."""
    another = setting("resume_dir")
    return f"free space or make {directory} writable and rerun, or choose another {another}"


class StorageError(OSError):
    """A file the streaming runner needs cannot be written: full disk, read-only directory."""

    def __str__(self):
        return self.strerror or super().__str__()


def _storage_error(exc: BaseException, path, what: str, hint: str) -> StorageError:
    """A :class:`StorageError` saying why ``what`` could not be written at ``path``, and what to
    do."""
    code = getattr(exc, "errno", None)
    detail = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = f"no space left on the device ({detail})"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = f"the directory is read-only or not writable ({detail})"
    else:
        why = f"{detail}; is the disk full or read-only?"
    return StorageError(code, f"{path}: cannot write {what}: {why}; {hint}")


# ---------------------------------------------------------------- checkpoint names -> model tensors


def natural_key(name: str) -> list:
    """Sort key for tensor names with numbers compared as numbers (``experts.10`` after
    ``experts.9``): the order transformers collects per-expert tensors in before stacking them."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


class _Group:
    """Checkpoint tensors that one transformers converter combines (e.g. every expert's ``w1`` and
    ``w3`` of a layer into its ``gate_up_proj``)."""

    def __init__(self, target: str, converter):
        self.target = target  # the name transformers keys the group by (its first output)
        self.converter = converter  # the prototype: copied for every conversion
        self.sources: list[
            tuple[str, str]
        ] = []  # (checkpoint name, the converter's pattern it matched)
        self.outputs: dict[
            str, list[int]
        ] = {}  # model tensor -> shape, from a conversion on meta tensors
        self.error: str | None = None

    def describe(self, ckpt) -> str:
        keys = [k for k, _ in self.sources]
        files = ", ".join(sorted({ckpt.file_of[k] for k in keys}))
        if len(keys) == 1:
            return f"tensor {keys[0]} in {files}"
        return f"the {len(keys)} tensors {keys[0]} ... {keys[-1]} in {files}"


class WeightPlan:
    """How every tensor of the model is made from the checkpoint's tensors, by transformers'
    own rules.

    Each checkpoint name goes through the renamings and conversions transformers applies in
    ``from_pretrained`` for the model's class
    (:func:`entrodrop_fast.models.loading.load_time_transforms`). Most names map one to one,
    perhaps renamed; tensors stored per expert in a mixture-of-experts checkpoint
    (Mixtral's ``block_sparse_moe.experts.N.w1/w2/w3``, Qwen-MoE's ``mlp.experts.N.gate_proj/
    up_proj/down_proj``) are grouped per target, in expert order, and combined by the
    converter's own operations (stack the experts, concatenate gate and up) when their layer is
    read. A checkpoint already fused maps one to one. Every group is converted once on ``meta``
    tensors (shapes only, no memory), so a missing expert or a config that does not match the
    weights is found before any weight is read. Names that make no model tensor (e.g. an LM
    head the model ties to the embedding) are ignored, as the runner never needs them.
    """

    def __init__(self, model, ckpt: Checkpoint):
        import copy

        self.ckpt = ckpt
        self.model = model
        expected = {k: list(v.shape) for k, v in model.state_dict().items()}
        self.expected = expected
        renamings, converters, rename = load_time_transforms(model)
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix = getattr(model, "base_model_prefix", "") or ""
        self.direct: dict[str, str] = {}  # model tensor -> checkpoint name
        self.groups: dict[str, _Group] = {}  # group target -> group
        self.made_by: dict[str, _Group] = {}  # model tensor -> the group producing it
        for key in sorted(ckpt.shapes, key=natural_key):
            target, pattern = rename(key, renamings, converters, prefix, expected)
            if (
                target not in expected and key in expected
            ):  # as transformers: a name already right stays
                target, pattern = key, None
            if target not in expected:
                continue
            if pattern is None:
                self.direct.setdefault(target, key)
            else:
                group = self.groups.get(target)
                if group is None:
                    group = self.groups[target] = _Group(target, by_pattern[pattern])
                group.sources.append((key, pattern))
        for group in self.groups.values():
            conv = copy.deepcopy(group.converter)
            for key, pattern in group.sources:
                conv.add_tensor(
                    group.target,
                    key,
                    pattern,
                    lambda shape=ckpt.shapes[key]: torch.empty(shape, device="meta"),
                )
            try:
                out = conv.convert(group.target, model=model, config=model.config)
            except Exception as exc:
                counts = {}
                for _, p in group.sources:
                    counts[p] = counts.get(p, 0) + 1
                shown = ", ".join(f"{n} x {p}" for p, n in counts.items())
                group.error = (
                    f"{group.describe(ckpt)} ({shown}) do not combine into {group.target} "
                    f"{expected[group.target]} ({type(exc).__name__}: {exc}): a tensor of one "
                    "expert is missing or has another shape"
                )
                self.made_by[group.target] = group
                continue
            for name, t in out.items():
                t = t[0] if isinstance(t, list) else t
                group.outputs[name] = list(t.shape)
                if name in expected:
                    self.made_by.setdefault(name, group)

    def check(self, names, what: str) -> None:
        """Every tensor in ``names`` (model names) can be made, with the shape the config
        implies."""
        for name in names:
            want = self.expected[name]
            group = self.made_by.get(name)
            if group is not None:
                if group.error is not None:
                    raise CheckpointError(
                        f"{self.ckpt.dir}: {group.error} ({what}): config and weights do not match"
                    )
                if group.outputs[name] != want:
                    raise CheckpointError(
                        f"{self.ckpt.dir}: {group.describe(self.ckpt)} combine into {name} of "
                        f"shape {group.outputs[name]}, the config expects {want} ({what}): "
                        "config and weights do not match"
                    )
                continue
            key = self.direct.get(name)
            if key is None:
                raise CheckpointError(
                    f"{self.ckpt.dir}: tensor {name} ({what}) is not in the checkpoint"
                )
            if self.ckpt.shapes[key] != want:
                raise CheckpointError(
                    f"{self.ckpt.dir / self.ckpt.file_of[key]}: tensor {key} has shape "
                    f"{self.ckpt.shapes[key]}, the config expects {want}: config and weights do "
                    "not match"
                )

    def sources(self, names) -> list[str]:
        """The checkpoint names read to make the model tensors ``names``."""
        out: dict[str, None] = {}
        for name in names:
            group = self.made_by.get(name)
            for key in [k for k, _ in group.sources] if group is not None else [self.direct[name]]:
                out[key] = None
        return list(out)

    def load(self, names, dtype) -> dict[str, torch.Tensor]:
        """The model tensors ``names`` (checked before), read onto the CPU in ``dtype``.

        A group's tensors are read when its converter asks for them, each through its own
        handle, so that the pages of a per-expert tensor are let go as soon as it has been
        stacked (safetensors maps files: one handle for the layer would keep every touched page
        of the layer's experts mapped until the last one is freed). Fusing a layer holds its
        largest fused tensor (``gate_up_proj``) at most once more besides the layer.
        """
        import copy

        from safetensors import safe_open

        ckpt = self.ckpt
        names = list(names)
        plain = [n for n in names if n not in self.made_by]
        read = ckpt.load([self.direct[n] for n in plain], "cpu", dtype) if plain else {}
        out = {n: read[self.direct[n]] for n in plain}
        del read

        def reader(key):
            def read_one():
                with safe_open(
                    str(ckpt.dir / ckpt.file_of[key]), framework="pt", device="cpu"
                ) as fh:
                    return fh.get_tensor(key).to(dtype=dtype)

            return read_one

        for group in {
            id(self.made_by[n]): self.made_by[n] for n in names if n in self.made_by
        }.values():
            conv = copy.deepcopy(group.converter)
            for key, pattern in group.sources:
                conv.add_tensor(group.target, key, pattern, reader(key))
            try:
                made = conv.convert(group.target, model=self.model, config=self.model.config)
            except Exception as exc:
                raise CheckpointError(
                    f"{ckpt.dir}: could not read or combine {group.describe(ckpt)} "
                    f"({type(exc).__name__}: {exc}); truncated or corrupt?"
                ) from None
            for name, t in made.items():
                if name in names:
                    out[name] = t[0] if isinstance(t, list) else t
            del made
        return out


# ---------------------------------------------------------------- activation buffers


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _reserve(path: str, nbytes: int, *, create: bool, made: list) -> None:
    """Allocate ``nbytes`` of disk space to ``path`` (created empty, or existing and kept as is).

    With the space allocated, writes through a memory map cannot fail for want of it
    (which would be a SIGBUS, without a message, halfway through a run).
    """
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0), 0o644)
    if create:
        made.append(path)
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, nbytes)  # fills holes only: what is written stays
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        if create:  # no fallocate on this system or filesystem: writing zeros allocates them
            chunk = bytes(1 << 20)
            left = nbytes
            while left:
                left -= os.write(fd, chunk[: min(left, len(chunk))])
    finally:
        os.close(fd)


class ActivationBuffers:
    """Two [S, T, D] buffers, in RAM or memory-mapped files; ``cur`` is read, ``nxt`` written.

    On disk, new files get their space reserved first: a full disk raises
    :class:`StorageError` (and the files made are removed) before any work. With
    ``resume=True`` the existing files in ``directory`` are opened and none is ever created:
    one missing or of another size raises :class:`ResumeError`.
    """

    def __init__(
        self,
        shape,
        dtype,
        *,
        budget_bytes: float,
        directory: str | None,
        resume: bool = False,
        hint: str = "",
    ):
        numel = shape[0] * shape[1] * shape[2]
        self.nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self.on_disk = directory is not None and (resume or 2 * self.nbytes > budget_bytes)
        self.files = [os.path.join(directory, name) for name in ACT_NAMES] if self.on_disk else []
        if resume:
            dt = str(dtype).replace("torch.", "")
            what = f"{shape[0]} x {shape[1]} x {shape[2]} {dt} activations"
            for path in self.files:
                if not os.path.isfile(path):
                    raise ResumeError(
                        f"{path} is missing: the resume directory {directory} is incomplete "
                        "(activations are never re-created on resume, the run would go on from "
                        f"zeros); {_remove_it()}"
                    )
                size = os.path.getsize(path)
                if size != self.nbytes:
                    raise ResumeError(
                        f"{path} has {size} bytes where {what} take {self.nbytes}: truncated, or "
                        f"not from this run; the resume directory {directory} is incomplete or "
                        f"corrupt; {_remove_it()}"
                    )
        made: list[str] = []
        path = directory
        try:
            for path in self.files:
                _reserve(path, self.nbytes, create=not resume, made=made)
        except OSError as exc:
            for p in made:
                try:
                    os.remove(p)
                except OSError:
                    pass
            what = f"the activation files (2 x {_size(self.nbytes)}"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                try:
                    what += f", {_size(shutil.disk_usage(directory).free)} free there"
                except OSError:
                    pass
            raise _storage_error(exc, path, what + ")", hint) from None
        if self.on_disk:
            self.bufs = [
                torch.from_file(p, shared=True, size=numel, dtype=dtype).view(*shape)
                for p in self.files
            ]
        else:
            self.bufs = [torch.empty(shape, dtype=dtype) for _ in ACT_NAMES]
        self.cur_index = 0

    def flush_cur(self) -> None:
        """Put the current buffer's file on disk (before a state pointing at it is saved)."""
        if self.on_disk:
            fd = os.open(self.files[self.cur_index], os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @property
    def cur(self) -> torch.Tensor:
        return self.bufs[self.cur_index]

    @property
    def nxt(self) -> torch.Tensor:
        return self.bufs[1 - self.cur_index]

    def swap(self) -> None:
        self.cur_index = 1 - self.cur_index


# ---------------------------------------------------------------- per-batch sinks


class _BatchDispatch:
    """A sink for :class:`ResidualTaps` that forwards to the current batch's statistics."""

    def __init__(self, sinks: list[BlockStatistics]):
        self.sinks = sinks
        self.current = 0

    def __getattr__(self, name):  # on_input, on_attn, on_mid, on_mlp, on_output
        return getattr(self.sinks[self.current], name)


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the keyword arguments the model passes it."""

    def __init__(self, layer: nn.Module, store: list):
        super().__init__()
        self.store = store
        for attr in ("attention_type", "layer_type", "is_sliding", "sliding_window", "layer_idx"):
            if attr in layer.__dict__:
                self.__dict__[attr] = layer.__dict__[attr]

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError(
                "the streaming runner expects decoder layers to be called with keyword arguments"
            )
        self.store.append(kwargs)
        return hidden_states


def _pending(s: BlockStatistics) -> dict:
    return {"h": s._h, "cos": s._cos, "last": s._last}


def _restore_pending(s: BlockStatistics, d: dict, device=None) -> None:
    """Put saved per-batch values back (onto ``device``: they were on the run's device, and
    a state is read onto the CPU first)."""

    def to(x):
        if isinstance(x, dict):
            return {k: to(v) for k, v in x.items()}
        if isinstance(x, list):
            return [to(v) for v in x]
        return x.to(device) if isinstance(x, torch.Tensor) and device is not None else x

    s._h, s._cos, s._last = to(d["h"]), to(d["cos"]), to(d["last"])


# ---------------------------------------------------------------- the resume directory

#: version of what a resume directory holds; a directory of another version is refused
RESUME_FORMAT = 2

# fingerprint field -> what the user changes to change it (in messages); the fields not
# named here or in _label are the settings of the same name
_LABELS = {
    "format": "resume format (the directory was written by another version of entrodrop_fast)",
    "model_dir": "model directory",
    "config": "the model's config.json",
    "weights": "the model's weight files (names, sizes or modification times)",
    "process": "torchrun rank / number of processes",
    "versions": "library versions",
}


def _label(key: str) -> str:
    """How a message names the fingerprint field ``key``: what the user changes to change it,
    a setting named as the caller spells it (:func:`entrodrop_fast._names.setting`)."""
    if key in _LABELS:
        return _LABELS[key]
    samples, seq_len = setting("samples"), setting("seq_len")
    tokens = ", ".join([samples, seq_len, setting("seed"), setting("corpus")])
    backend = setting("backend", python="settings.backend")
    named = {
        "shape": f"calibration shape ({samples} x {seq_len})",
        "windows": f"calibration tokens ({tokens}, {setting('text_field')} or the tokenizer)",
        "methods": setting("method", python="methods"),
        "backend_resolved": f"the backend {backend} resolves to",
    }
    return named[key] if key in named else setting(key)


_HASHED = {"config", "weights", "windows"}  # digests: naming the field says it all


def _fingerprint(
    ckpt: Checkpoint,
    windows: torch.Tensor,
    settings,
    *,
    dtype,
    device,
    backend: str,
    rank: int,
    world: int,
) -> dict:
    """Everything that changes the numbers of a streamed profile, as plain JSON values."""
    import dataclasses

    import transformers

    import entrodrop_fast
    from entrodrop_fast.profile.inmemory import parse_methods

    ids = windows.detach().to("cpu", torch.int64).contiguous()
    dev = device.type
    if dev == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    fp = {
        "format": RESUME_FORMAT,
        "model_dir": str(ckpt.dir.resolve()),
        **ckpt.identity(),
        "dtype": str(dtype).replace("torch.", ""),
        "device": dev,
        "shape": list(ids.shape),
        "windows": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "backend_resolved": backend,
        "process": f"rank {rank} of {world}",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"entrodrop_fast {entrodrop_fast.__version__}",
    }
    for f in dataclasses.fields(settings):  # every setting, present and future
        value = getattr(settings, f.name)
        fp[f.name if f.name not in fp else f"settings.{f.name}"] = (
            list(parse_methods(value)) if f.name == "methods" else value
        )
    return json.loads(json.dumps(fp, default=repr))  # tuples -> lists, as they come back from disk


def _compare(saved, now: dict, where: str, directory: str) -> None:
    """Raise :class:`ResumeError` naming every field in which ``saved`` differs from ``now``."""
    if not isinstance(saved, dict):
        raise ResumeError(
            f"{where} holds no run fingerprint: the resume directory {directory} is corrupt; "
            f"{_remove_it()}"
        )
    if saved.get("format") != now["format"]:
        keys = ["format"]
    else:
        keys = list(now) + [k for k in saved if k not in now]
    diff = []
    for key in keys:
        a, b = saved.get(key, "(not recorded)"), now.get(key, "(not recorded)")
        if a != b:
            label = _label(key)
            diff.append(label if key in _HASHED else f"{label}: {a!r} there, {b!r} now")
    if diff:
        raise ResumeError(
            f"{directory} holds a run with other arguments ({'; '.join(diff)}): rerun with that "
            f"run's arguments to resume it, or use another {setting('resume_dir')} (or remove "
            "this one) to start anew"
        )


def _atomic_write(path: str, write, what: str, hint: str) -> None:
    """``write(fh)`` into ``path.tmp``, put it on disk, rename it over ``path``
    (:func:`entrodrop_fast.outputs.write_atomic`).

    A kill at any point leaves ``path`` as it was or complete; a failure to write (full
    disk, read-only directory) raises :class:`StorageError` and leaves ``path`` as it was.
    """

    def fail(exc: BaseException):
        raise _storage_error(exc, path, what, hint) from None

    outputs.write_atomic(
        path, write, tmp=path + ".tmp", durable=True, fail=fail, fail_on=(OSError, RuntimeError)
    )


def _atomic_save(obj, path: str, hint: str = "free space or make the directory writable") -> None:
    _atomic_write(path, lambda fh: torch.save(obj, fh), "the resume state", hint)


def _write_run(path: str, fingerprint: dict, hint: str) -> None:
    text = json.dumps(fingerprint, indent=1) + "\n"
    _atomic_write(path, lambda fh: fh.write(text.encode()), "the run fingerprint", hint)


def _same_structure(d, ref) -> bool:
    """``d`` has the dicts and list lengths of ``ref`` (whose lists are all None), tensors or
    None inside."""
    if isinstance(ref, dict):
        return (
            isinstance(d, dict)
            and set(d) == set(ref)
            and all(_same_structure(d[k], ref[k]) for k in ref)
        )
    return (
        isinstance(d, list)
        and len(d) == len(ref)
        and all(x is None or isinstance(x, torch.Tensor) for x in d)
    )


def _lock(directory: str) -> int | None:
    """Hold an exclusive lock on ``directory`` (an open descriptor to close at the end), or
    refuse."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise ResumeError(
                f"{directory} is in use by another running profile; wait for it to end or "
                f"choose another {setting('resume_dir')}"
            ) from None
        # a filesystem without locks (some network filesystems): go on without
    return fd


def _open_resume_dir(
    directory: str, fingerprint: dict, shape, dtype, sinks: list, num_layers: int, device
):
    """(activation buffers, first layer to run) for ``directory``: a new run, one to continue,
    or an error.

    Files are written only for a new run (or one that never finished its first layer);
    anything missing, truncated, unreadable or from other arguments raises
    :class:`ResumeError`, and a directory that cannot be written :class:`StorageError`.
    """
    hint = _writable_hint(directory)
    broken = (
        f"the resume directory {directory} is incomplete or corrupt (a copy cut short, a full "
        f"disk?); {_remove_it()}"
    )
    run_path, state_path = os.path.join(directory, RUN_NAME), os.path.join(directory, STATE_NAME)
    not_ours = (
        f"a file of yours? entrodrop does not use or remove it: choose a new or empty "
        f"{setting('resume_dir')}"
    )
    run_fp = None
    if os.path.exists(run_path):
        try:
            run_fp = json.loads(Path(run_path).read_text())
        except (OSError, ValueError) as exc:
            raise ResumeError(
                f"{run_path}: cannot be read ({type(exc).__name__}: {exc}); {broken}"
            ) from None
        if not (isinstance(run_fp, dict) and "format" in run_fp and "windows" in run_fp):
            raise ResumeError(f"{run_path} is not a resume state of entrodrop ({not_ours})")
        _compare(run_fp, fingerprint, run_path, directory)
    if os.path.exists(state_path):
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except (
            Exception
        ) as exc:  # truncated, garbage, not a torch file, unreadable: all the same to us
            if run_fp is None:  # no run.json of ours beside it: never written by entrodrop
                raise ResumeError(
                    f"{state_path} is not a resume state of entrodrop ({not_ours})"
                ) from None
            msg = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ResumeError(
                f"{state_path}: cannot be read ({type(exc).__name__}: {msg}); {broken}"
            ) from None
        if not isinstance(state, dict) or not {
            "fingerprint",
            "layers_done",
            "cur_index",
            "pending",
        } <= set(state):
            raise ResumeError(f"{state_path}: not a resume state of this program; {broken}")
        _compare(state["fingerprint"], fingerprint, state_path, directory)
        done, cur = state["layers_done"], state["cur_index"]
        if (
            type(done) is not int
            or not 0 <= done <= num_layers
            or type(cur) is not int
            or cur not in (0, 1)
        ):
            raise ResumeError(
                f"{state_path}: layers done {done!r} / current buffer {cur!r} out of range for "
                f"{num_layers} layers; {broken}"
            )
        pending = state["pending"]
        if not (
            isinstance(pending, list)
            and len(pending) == len(sinks)
            and all(_same_structure(d, _pending(s)) for d, s in zip(pending, sinks, strict=True))
        ):
            raise ResumeError(
                f"{state_path}: the estimator states in it do not have this run's layout; {broken}"
            )
        acts = ActivationBuffers(
            shape, dtype, budget_bytes=0, directory=directory, resume=True, hint=hint
        )
        if run_fp is None:
            _write_run(run_path, fingerprint, hint)
        acts.cur_index = cur
        for s, d in zip(sinks, pending, strict=True):
            _restore_pending(s, d, device)
        return acts, done
    present = [n for n in ACT_NAMES if os.path.exists(os.path.join(directory, n))]
    if present and run_fp is None:
        raise ResumeError(
            f"{directory} holds {' and '.join(present)} but neither {STATE_NAME} nor {RUN_NAME}: "
            f"not a resume directory of this program, or an incomplete one; {_remove_it()}"
        )
    if run_fp is None:
        _write_run(
            run_path, fingerprint, hint
        )  # before the activation files: they are known to be ours
    acts = ActivationBuffers(shape, dtype, budget_bytes=0, directory=directory, hint=hint)
    if present:
        warnings.warn(
            f"{directory}: no {STATE_NAME} (the previous run stopped before finishing its "
            "first layer, or it was removed): starting from the first layer",
            stacklevel=3,
        )
    return acts, 0


# ---------------------------------------------------------------- the runner


def build_skeleton(model_dir: str, dtype: torch.dtype):
    """The model with every parameter on ``meta`` (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _real_buffers_(model, module: nn.Module, device) -> None:
    """Give ``module``'s non-persistent buffers (not in the checkpoint) real values on ``device``.

    They are computed at construction (e.g. Gemma's embedding scale), which the ``meta``
    skeleton skipped; the model's own ``_init_weights`` computes them again. Parameters
    are still on ``meta`` here, so that call costs nothing for them.
    """
    owners = {}
    for m in module.modules():
        for name in m._non_persistent_buffers_set:
            b = m._buffers.get(name)
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device=device)
                owners[id(m)] = m
    for m in owners.values():
        model._init_weights(m)


def _materialise(model, path: str, plan: WeightPlan, device, dtype) -> None:
    """Load one (non-layer) module's weights, e.g. the embedding, onto ``device``."""
    mod = get_attr(model, path)
    expected = [f"{path}.{k}" for k in mod.state_dict()]
    plan.check(expected, path)
    _real_buffers_(model, mod, device)
    sd = plan.load(expected, dtype)
    mod.load_state_dict({k[len(path) + 1 :]: v.to(device) for k, v in sd.items()}, assign=True)


def _real_rotary(model, adapter, device) -> None:
    if adapter.arch.rotary is None:
        return
    rot = adapter.rotary(model)
    owner_path, _, attr = adapter.arch.rotary.rpartition(".")
    owner = get_attr(model, owner_path)
    with torch.device(device):
        try:
            new = type(rot)(config=rot.config)
        except TypeError:
            new = type(rot)(model.config)
    setattr(owner, attr, new)


def profile_streaming(
    model_dir: str,
    windows: torch.Tensor,
    settings=None,
    *,
    device="cpu",
    dtype=torch.float32,
    ram_budget_bytes: float = 8 * 2**30,
    resume_dir: str | None = None,
    progress: bool = True,
    _stop_after_layer: int | None = None,
) -> dict:
    """Profile the checkpoint in ``model_dir`` on token ``windows`` (samples, T), layer by layer.

    Returns the same dictionary as :func:`entrodrop_fast.profile.inmemory.profile`. With
    ``resume_dir`` the run continues where one with the same arguments stopped; other
    arguments, or a directory with a file missing, truncated or corrupt, raise
    :class:`ResumeError` (a ``ValueError``); a full disk or a read-only directory raises
    :class:`StorageError` (an ``OSError``), before any work where the activation files are
    concerned.
    """
    import time

    from tqdm.auto import tqdm

    from entrodrop_fast.profile.inmemory import ProfileSettings, _check, resolved_backend

    settings = settings or ProfileSettings()
    device = torch.device(device)
    ckpt = Checkpoint(model_dir)
    model = build_skeleton(model_dir, dtype)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    L = len(layers)
    _check(settings, windows, adapter, L)
    plan = WeightPlan(
        model, ckpt
    )  # checkpoint names -> model tensors (per-expert MoE tensors fused)
    layer_keys = []
    for i, layer in enumerate(layers):
        prefix = f"{adapter.arch.layers}.{i}"
        expected = [f"{prefix}.{k}" for k in layer.state_dict()]
        plan.check(expected, f"layer {i}")
        layer_keys.append(expected)
    backend = resolved_backend(settings.backend, device)
    ts = settings.tap_settings()
    ts.backend = backend
    bs = settings.batch_size
    starts = list(range(0, windows.shape[0], bs))
    sinks = [BlockStatistics(adapter, L, ts) for _ in starts]
    dispatch = _BatchDispatch(sinks)
    S, T = windows.shape
    D = int(model.config.hidden_size)

    tmp_dir = lock = pool = acts = None
    state_path = None
    first_layer = 0
    try:
        # 0. the activation buffers, and where a resumed run starts; before anything is loaded
        if resume_dir is not None:
            from entrodrop_fast.profile import distributed

            rank, world = distributed.world()
            if world > 1:  # each rank profiles its own samples: its own files
                resume_dir = os.path.join(resume_dir, f"rank{rank}-of-{world}")
            hint = _writable_hint(resume_dir)
            if os.path.exists(resume_dir) and not os.path.isdir(resume_dir):
                raise ResumeError(
                    f"{setting('resume_dir')} {resume_dir} exists and is not a directory; "
                    "choose another"
                )
            try:
                os.makedirs(resume_dir, exist_ok=True)
            except OSError as exc:
                raise _storage_error(exc, resume_dir, "the resume directory", hint) from None
            lock = _lock(resume_dir)
            fingerprint = _fingerprint(
                ckpt,
                windows,
                settings,
                dtype=dtype,
                device=device,
                backend=backend,
                rank=rank,
                world=world,
            )
            acts, first_layer = _open_resume_dir(
                resume_dir, fingerprint, (S, T, D), dtype, sinks, L, device
            )
            state_path = os.path.join(resume_dir, STATE_NAME)
        else:
            sweep_stale_activation_dirs()
            tmp_dir = tempfile.mkdtemp(prefix=f"{ACT_DIR_PREFIX}{os.getpid()}-")
            hint = (
                f"set TMPDIR to a directory on a larger disk, use {setting('resume_dir')} on "
                f"one, or raise {setting('max_memory')} to keep them in RAM "
                f"(now {_size(ram_budget_bytes)})"
            )
            acts = ActivationBuffers(
                (S, T, D), dtype, budget_bytes=ram_budget_bytes, directory=tmp_dir, hint=hint
            )
        for path in (adapter.arch.embed, adapter.arch.final_norm):
            _materialise(model, path, plan, device, dtype)
        _real_rotary(model, adapter, device)

        base = adapter.base(model)
        layers_attr_owner, _, layers_attr = adapter.arch.layers.rpartition(".")
        owner = get_attr(model, layers_attr_owner)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entrodrop-prefetch")
        t0 = time.perf_counter()
        # 1. embeddings, and the keyword arguments every layer receives, per batch
        stores = [[] for _ in starts]
        with torch.inference_mode():
            for j, s0 in enumerate(starts):
                recorders = nn.ModuleList([_Recorder(layer, stores[j]) for layer in layers])
                setattr(owner, layers_attr, recorders)
                try:
                    ids = windows[s0 : s0 + bs].to(device)  # (b, T)
                    h = adapter.embed(model)(ids)
                    base(input_ids=ids, use_cache=False)
                finally:
                    setattr(owner, layers_attr, layers)
                if first_layer == 0:
                    acts.cur[s0 : s0 + bs] = h.to(dtype).cpu()
        adapter.embed(model).to_empty(device="meta")  # the embedding is not needed any more

        # 2. layer by layer under the taps
        def fetch(i):  # runs on the single prefetch thread: reads layer i (and fuses its experts)
            return plan.load(layer_keys[i], dtype)

        future = pool.submit(fetch, first_layer) if first_layer < L else None
        with ResidualTaps(model, dispatch, adapter), torch.inference_mode():
            for i in tqdm(range(first_layer, L), desc="layers", disable=not progress, leave=False):
                weights = future.result()
                future = pool.submit(fetch, i + 1) if i + 1 < L else None
                layer = layers[i]
                _real_buffers_(model, layer, device)
                prefix = f"{adapter.arch.layers}.{i}."
                layer.load_state_dict(
                    {k[len(prefix) :]: v.to(device) for k, v in weights.items()}, assign=True
                )
                del weights
                for j, s0 in enumerate(starts):
                    dispatch.current = j
                    x = acts.cur[s0 : s0 + bs].to(device)  # (b, T, D)
                    out = layer(x, **stores[j][i])
                    out = out[0] if isinstance(out, tuple) else out
                    acts.nxt[s0 : s0 + bs] = out.to(dtype).cpu()
                layer.to_empty(device="meta")  # free the weights
                acts.swap()
                if state_path is not None:
                    try:
                        # the activations on disk before the state that points at them
                        acts.flush_cur()
                    except OSError as exc:
                        raise _storage_error(
                            exc, acts.files[acts.cur_index], "the activations", hint
                        ) from None
                    state = {
                        "fingerprint": fingerprint,
                        "layers_done": i + 1,
                        "cur_index": acts.cur_index,
                        "pending": [_pending(s) for s in sinks],
                    }
                    _atomic_save(
                        state, state_path, f"the state saved before layer {i} is kept; {hint}"
                    )
                if _stop_after_layer is not None and i + 1 >= _stop_after_layer and i + 1 < L:
                    raise KeyboardInterrupt(f"stopped after layer {i} (test hook)")
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if tmp_dir is not None:
            del acts
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if lock is not None:
            os.close(lock)
    seconds = time.perf_counter() - t0
    for s in sinks:
        s.end_batch()
    stats = sinks[0]
    for s in sinks[1:]:
        stats.merge(s)
    from entrodrop_fast.profile.inmemory import finish

    result = finish(
        stats,
        settings,
        model,
        seconds=seconds,
        windows=windows,
        device=device,
        dtype=dtype,
        runner="streaming",
        checkpoint_bytes=ckpt.bytes,
    )
    if first_layer:  # this process ran only the layers a stopped run had not finished
        result["resumed_from_layer"] = first_layer
    return result
