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

The taps and estimators are the in-memory runner's (:mod:`entrodrop_fast.hooks`), so the
report is the same. The masks, position ids and rotary embeddings each layer receives are
captured from the model's own forward (run once per batch with the layers replaced by
recorders), so they are exactly what the model would pass.

Activations live in two buffers (read one, write the other) in RAM up to a budget, beyond
it in files in a temporary directory that is removed afterwards. With ``resume_dir`` the
buffers and, after each layer, the estimator states are kept there (states written
atomically), and a run restarted with the same arguments continues after the last
finished layer.

Peak memory: on the device, the embedding while the batches are embedded, then one layer
+ one batch's activations; in RAM, the prefetched layer + the activation buffers
(2 x samples x T x D x bytes; on disk beyond ``ram_budget_bytes``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from entrodrop_fast.hooks import BlockStatistics, ResidualTaps
from entrodrop_fast.models.adapters import get_adapter, get_attr

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """The checkpoint on disk is missing, incomplete, corrupt or does not match its config."""


# ---------------------------------------------------------------- checkpoint reading


class Checkpoint:
    """The safetensors tensors of a Hugging Face model directory, read tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(path)
        if not (self.dir / "config.json").is_file():
            raise CheckpointError(f"{self.dir}: no config.json (not a Hugging Face model directory)")
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        elif (self.dir / SINGLE_NAME).is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{self.dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found (only safetensors checkpoints stream)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        self.shapes: dict[str, list[int]] = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            f = self.dir / name
            if not f.is_file():
                example = next(k for k, v in weight_map.items() if v == name)
                raise CheckpointError(f"{f}: shard listed in {INDEX_NAME} is missing (it holds e.g. {example})")
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for key in fh.keys():
                        self.shapes[key] = list(fh.get_slice(key).get_shape())
                        self.file_of[key] = name
            except Exception as exc:
                raise CheckpointError(f"{f}: not a readable safetensors file, truncated or corrupt? ({type(exc).__name__}: {exc})") from None
        if weight_map:
            for key, name in weight_map.items():
                if self.file_of.get(key) != name:
                    raise CheckpointError(f"{self.dir / name}: tensor {key} listed in {INDEX_NAME} is not in that file")
        self.bytes = sum((self.dir / n).stat().st_size for n in files)

    def check(self, expected: dict[str, torch.Size], what: str) -> None:
        """Every expected tensor exists with the expected shape (else: the config does not match)."""
        for key, shape in expected.items():
            if key not in self.shapes:
                raise CheckpointError(f"{self.dir}: tensor {key} ({what}) is not in the checkpoint")
            if list(shape) != self.shapes[key]:
                raise CheckpointError(f"{self.dir / self.file_of[key]}: tensor {key} has shape {self.shapes[key]}, the config expects {list(shape)}: config and weights do not match")

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
                raise CheckpointError(f"{path}: could not read tensors {ks[:3]} ({type(exc).__name__}: {exc})") from None
        return out


# ---------------------------------------------------------------- activation buffers


class ActivationBuffers:
    """Two [S, T, D] buffers, in RAM or memory-mapped files; ``cur`` is read, ``nxt`` written."""

    def __init__(self, shape, dtype, *, budget_bytes: float, directory: str | None, resume: bool = False):
        numel = shape[0] * shape[1] * shape[2]
        self.nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self.on_disk = directory is not None and (resume or 2 * self.nbytes > budget_bytes)
        self.files = []
        bufs = []
        for name in ("act_a.bin", "act_b.bin"):
            if self.on_disk:
                path = os.path.join(directory, name)
                if not (resume and os.path.exists(path) and os.path.getsize(path) == self.nbytes):
                    with open(path, "wb") as fh:
                        fh.truncate(self.nbytes)
                self.files.append(path)
                bufs.append(torch.from_file(path, shared=True, size=numel, dtype=dtype).view(*shape))
            else:
                bufs.append(torch.empty(shape, dtype=dtype))
        self.bufs = bufs
        self.cur_index = 0

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
            raise RuntimeError("the streaming runner expects decoder layers to be called with keyword arguments")
        self.store.append(kwargs)
        return hidden_states


def _pending(s: BlockStatistics) -> dict:
    return {"h": s._h, "cos": s._cos, "last": s._last}


def _restore_pending(s: BlockStatistics, d: dict) -> None:
    s._h, s._cos, s._last = d["h"], d["cos"], d["last"]


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def _materialise(model, path: str, ckpt: Checkpoint, device, dtype) -> None:
    """Load one (non-layer) module's weights, e.g. the embedding, onto ``device``."""
    mod = get_attr(model, path)
    expected = {f"{path}.{k}": v.shape for k, v in mod.state_dict().items()}
    ckpt.check(expected, path)
    _real_buffers_(model, mod, device)
    sd = ckpt.load(expected, device, dtype)
    mod.load_state_dict({k[len(path) + 1 :]: v for k, v in sd.items()}, assign=True)


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

    Returns the same dictionary as :func:`entrodrop_fast.runner.profile`.
    """
    import time

    from tqdm.auto import tqdm

    from entrodrop_fast.runner import ProfileSettings, _check, resolved_backend

    settings = settings or ProfileSettings()
    device = torch.device(device)
    ckpt = Checkpoint(model_dir)
    model = build_skeleton(model_dir, dtype)
    adapter = get_adapter(model)
    if adapter.arch.moe:
        raise NotImplementedError(
            f"streaming a {adapter.model_type} checkpoint is not supported yet: mixture-of-experts checkpoints store "
            "each expert separately while transformers fuses them at load time; profile it in memory instead"
        )
    layers = adapter.layers(model)
    L = len(layers)
    _check(settings, windows, adapter, L)
    layer_keys = []
    for i, layer in enumerate(layers):
        prefix = f"{adapter.arch.layers}.{i}"
        expected = {f"{prefix}.{k}": v.shape for k, v in layer.state_dict().items()}
        ckpt.check(expected, f"layer {i}")
        layer_keys.append(expected)
    for path in (adapter.arch.embed, adapter.arch.final_norm):
        _materialise(model, path, ckpt, device, dtype)
    _real_rotary(model, adapter, device)

    backend = resolved_backend(settings.backend, device)
    ts = settings.tap_settings()
    ts.backend = backend
    bs = settings.batch_size
    starts = list(range(0, windows.shape[0], bs))
    sinks = [BlockStatistics(adapter, L, ts) for _ in starts]
    dispatch = _BatchDispatch(sinks)
    S, T = windows.shape
    D = int(model.config.hidden_size)

    tmp_dir = None
    state_path = None
    first_layer = 0
    if resume_dir is not None:
        os.makedirs(resume_dir, exist_ok=True)
        state_path = os.path.join(resume_dir, "state.pt")
        fingerprint = {"model_dir": str(Path(model_dir).resolve()), "windows": int(windows.sum()), "shape": list(windows.shape), "settings": repr(settings)}
        resume = os.path.exists(state_path)
        if resume:
            saved = torch.load(state_path, weights_only=False)
            if saved["fingerprint"] != fingerprint:
                raise ValueError(f"{resume_dir} holds a run with other arguments; use another --resume-dir or remove it")
        acts = ActivationBuffers((S, T, D), dtype, budget_bytes=0, directory=resume_dir, resume=resume)
        if resume:
            first_layer = saved["layers_done"]
            acts.cur_index = saved["cur_index"]
            for s, d in zip(sinks, saved["pending"], strict=True):
                _restore_pending(s, d)
    else:
        tmp_dir = tempfile.mkdtemp(prefix="entrodrop-acts-")
        acts = ActivationBuffers((S, T, D), dtype, budget_bytes=ram_budget_bytes, directory=tmp_dir)

    base = adapter.base(model)
    layers_attr_owner, _, layers_attr = adapter.arch.layers.rpartition(".")
    owner = get_attr(model, layers_attr_owner)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entrodrop-prefetch")
    t0 = time.perf_counter()
    try:
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
        def fetch(i):  # runs on the single prefetch thread
            return ckpt.load(layer_keys[i], "cpu", dtype)

        future = pool.submit(fetch, first_layer) if first_layer < L else None
        with ResidualTaps(model, dispatch, adapter), torch.inference_mode():
            for i in tqdm(range(first_layer, L), desc="layers", disable=not progress, leave=False):
                weights = future.result()
                future = pool.submit(fetch, i + 1) if i + 1 < L else None
                layer = layers[i]
                _real_buffers_(model, layer, device)
                prefix = f"{adapter.arch.layers}.{i}."
                layer.load_state_dict({k[len(prefix) :]: v.to(device) for k, v in weights.items()}, assign=True)
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
                    _atomic_save({"fingerprint": fingerprint, "layers_done": i + 1, "cur_index": acts.cur_index, "pending": [_pending(s) for s in sinks]}, state_path)
                if _stop_after_layer is not None and i + 1 >= _stop_after_layer and i + 1 < L:
                    raise KeyboardInterrupt(f"stopped after layer {i} (test hook)")
    finally:
        pool.shutdown(wait=True)
        if tmp_dir is not None:
            del acts
            shutil.rmtree(tmp_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    for s in sinks:
        s.end_batch()
    stats = sinks[0]
    for s in sinks[1:]:
        stats.merge(s)
    from entrodrop_fast.runner import finish

    return finish(stats, adapter, settings, backend=backend, seconds=seconds, windows=windows, device=device, dtype=dtype, hidden_size=D, runner="streaming", checkpoint_bytes=ckpt.bytes)

