"""Surgery: remove blocks from a loaded model, in place (``drop_blocks_``).

A *drop plan* names blocks by 0-based decoder-layer index of the model it is applied to::

    {"attn": [3, 7], "mlp": [], "layer": [12, 13]}      # or a full plan from ranking.py

- ``layer``: the decoder layer leaves the ``ModuleList``; later layers move down, every
  ``layer_idx`` attribute inside them is renumbered (so the KV cache is indexed by the
  new position), and the config fields tied to the layer count (``num_hidden_layers``,
  ``per_layer_config``, and the fields the architecture's entry in the adapter table names:
  ``Arch.layer_lists`` / ``Arch.layer_rewrites``) are rewritten to describe the layers that
  remain. Per-layer properties the config class *derives* (``layer_types`` from a
  sliding-window pattern, ...) are read from the config as transformers builds it and
  stated explicitly for the kept layers; the rewritten config is then rebuilt (on the meta
  device) and each layer compared with the source layer it keeps: a layer pattern the
  config class cannot state is refused.
- Plans record the model they were made for (type, sizes, config fingerprint:
  :func:`model_identity`); one made for another model is refused (:func:`check_same_model`).
- ``attn`` / ``mlp``: the sub-block (and the norms that only it uses) is replaced by a
  module with no weights that adds exactly 0 to the residual stream (a zero-stride view:
  no compute, no memory). The config records the dropped sub-blocks in
  ``config.entrodrop_pruned``; for dropped attention ``config.kv_sharing_modes`` marks the
  layer as holding no KV cache, so ``transformers`` builds a ``DummyLayer`` for it
  (nothing is cached, and ``get_seq_length`` skips it even when layer 0's attention is gone).
- A layer whose attention *and* MLP are both dropped is removed as a whole layer (same
  function: r + 0 + 0 = r).

The old modules lose their last reference: their weights are freed, not zeroed.

The zero modules and the pruned architecture are in :mod:`entrodrop_fast.models.pruned`
(loading a pruned checkpoint needs them); the config machinery and :func:`model_identity` in
:mod:`entrodrop_fast.models.config`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass, field

from torch import nn

from entrodrop_fast._names import how
from entrodrop_fast.models.adapters import Adapter, get_adapter
from entrodrop_fast.models.config import (  # noqa: F401  (part of this module's API)
    IDENTITY_FIELDS,
    _num_layers_of,
    build_config,
    model_identity,
)
from entrodrop_fast.models.pruned import (  # noqa: F401  (part of this module's API)
    PRUNED_KEY,
    ZeroAttention,
    ZeroMLP,
    _get_path,
    _set_path,
    apply_subblock_drops_,
    has_subblock_drops,
    inherit_weight_renaming,
)


def shared_norms(adapter: Adapter) -> tuple[str, ...]:
    """Norms read by both branches (Phi: one ``input_layernorm`` feeds attention and MLP)."""
    if adapter.residual == "parallel" and not adapter.arch.mlp_norms:
        return tuple(adapter.arch.attn_norms)
    return ()


def subblock_paths(adapter: Adapter) -> dict:
    """Where the sub-blocks and their own norms are, as stored in ``config.entrodrop_pruned``."""
    shared = shared_norms(adapter)
    return {
        "layers": adapter.arch.layers,
        "attn": adapter.arch.attn,
        "attn_norms": [n for n in adapter.arch.attn_norms if n not in shared],
        "mlp": adapter.arch.mlp,
        "mlp_norms": [n for n in adapter.arch.mlp_norms if n not in shared],
        "shared_norms": list(shared),
    }


# ------------------------------------------------------------------ plans


@dataclass
class Drops:
    """A normalised drop set, in the numbering of the model it applies to (0-based)."""

    num_layers: int
    layer: list[int] = field(default_factory=list)
    attn: list[int] = field(default_factory=list)
    mlp: list[int] = field(default_factory=list)

    @property
    def kept(self) -> list[int]:
        gone = set(self.layer)
        return [i for i in range(self.num_layers) if i not in gone]

    @property
    def empty(self) -> bool:
        return not (self.layer or self.attn or self.mlp)

    def as_dict(self) -> dict:
        return {"layer": list(self.layer), "attn": list(self.attn), "mlp": list(self.mlp)}


def read_plan(plan) -> dict:
    """A plan as a dict: a dict already, a JSON file path, or a :class:`Drops`."""
    if isinstance(plan, Drops):
        return {"drop": plan.as_dict()}
    if isinstance(plan, (str, os.PathLike)):
        try:
            with open(plan) as f:
                return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan file {plan} is not valid JSON: {exc}") from None
    if not isinstance(plan, dict):
        raise TypeError(
            f"plan must be a dict, a JSON file path or Drops, got {type(plan).__name__}"
        )
    return plan


def _warn_other_path(made_for: dict, path, what: str) -> None:
    """Warn when ``made_for`` records another model path than ``path`` (same config identity:
    e.g. a fine-tuned copy, which is legitimate, or another checkpoint by mistake)."""
    from pathlib import Path

    there = made_for.get("path")
    if not isinstance(there, str) or there in ("", "-") or path is None:
        return
    try:
        same = Path(there).expanduser().resolve() == Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        same = there == str(path)
    if not same:
        import warnings

        warnings.warn(
            f"{what} was made from the model at {there}, not {path}: the configs match, so it is "
            "applied, but its scores describe the weights of that model (fine if this is a copy "
            "or fine-tune of it)",
            stacklevel=3,
        )


def check_same_model(
    made_for, config, *, what: str = "the plan", target: str = "this model", path=None
) -> list[str]:
    """Refuse a plan or report made for another model than ``config`` (object or dict).

    ``made_for``: the ``model`` entry of the plan / report. Every field of
    :data:`IDENTITY_FIELDS` it records is compared with this model; ValueError naming the
    fields that differ. Returns the fields it does not record (older reports), unchecked.
    When the identity matches but the recorded model ``path`` differs from ``path`` (default:
    ``target`` when it names an existing directory), a warning names both paths.
    """
    if not isinstance(made_for, dict):
        return list(IDENTITY_FIELDS)
    here = model_identity(config)
    diffs, unchecked = [], []
    for key in IDENTITY_FIELDS:
        there = made_for.get(key)
        if there is None or here.get(key) is None:
            unchecked.append(key)
        elif there != here[key]:
            diffs.append(key)
    if not diffs:
        if path is None and os.path.isdir(target):
            path = target
        _warn_other_path(made_for, path, what)
        return unchecked
    if "num_layers" in diffs:
        head = (
            f"{what} was made for a model with {made_for['num_layers']} layers; {target} has "
            f"{here['num_layers']}"
        )
    else:
        head = f"{what} was made for another model than {target}"
    rest = []
    for key in diffs:
        if key == "num_layers":
            continue
        if key == "config_sha256":
            rest.append(
                f"config fingerprint {str(made_for[key])[:12]}... there, {here[key][:12]}... here "
                "(the configs differ " + ("beyond the sizes" if len(diffs) == 1 else "too") + ")"
            )
        else:
            rest.append(f"{key} {made_for[key]!r} there, {here[key]!r} here")
    msg = head + (": " + "; ".join(rest) if rest else "")
    raise ValueError(
        f"{msg}. Its layer indices and scores describe that model, not this one: profile this "
        "model first ("
        + how("entrodrop profile MODEL --out REPORT", "profile.pipeline.profile_model(MODEL)")
        + ") and rank from that report."
    )


def warn_unchecked(
    unchecked: list[str], what: str = "the plan", target: str = "this model"
) -> None:
    """Say which identity fields a plan / report with a ``model`` entry did not record."""
    if unchecked:
        import warnings

        warnings.warn(
            f"{what} does not record the model's {', '.join(unchecked)}: not checked against "
            f"{target} (reports of older versions lack them)",
            stacklevel=3,
        )


def normalize_drops(plan, num_layers: int) -> Drops:
    """Check a plan against a model of ``num_layers`` layers; merge attn+mlp of one layer into a
    layer drop."""
    plan = read_plan(plan)
    planned_for = (
        (plan.get("model") or {}).get("num_layers") if isinstance(plan.get("model"), dict) else None
    )
    if isinstance(planned_for, int) and planned_for != num_layers:
        raise ValueError(
            f"the plan was made for a model with {planned_for} layers; this one has {num_layers}"
        )
    spec = plan.get("drop", plan)
    form = '{"attn": [1, 3], "mlp": [], "layer": []} (lists of 0-based layer indices)'
    if not isinstance(spec, dict):
        raise ValueError(
            f"plan: 'drop' must be an object {form}, got {type(spec).__name__} {spec!r:.60}"
        )
    unknown = set(spec) - {"attn", "mlp", "layer"}
    if unknown and {"blocks", "entropy", "points"} & set(spec):
        raise ValueError(
            "this is a profile report (report.json of entrodrop profile), not a plan: make a "
            "plan from it with "
            + how(
                "entrodrop rank REPORT --kind ... --drop N",
                "prune.ranking.make_plan(report, kind, drop)",
            )
            + ", or pass it to prune as the report, with the kind and count to drop"
        )
    if unknown:
        raise ValueError(
            f"plan drops have unknown keys {sorted(unknown)}; expected attn, mlp, layer (or a full "
            "plan with a 'drop' entry)"
        )
    out = {}
    for kind in ("attn", "mlp", "layer"):
        vals = spec.get(kind)
        if vals is None:
            vals = []
        if not isinstance(vals, list):
            raise ValueError(
                f"plan: drop.{kind} must be a list of 0-based layer indices (e.g. [{vals!r:.20}] "
                f"or []), got {type(vals).__name__} {vals!r:.60}"
            )
        idx = []
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(
                    f"plan: {kind} indices must be integers (0-based layer indices), got {v!r}"
                )
            if not 0 <= v < num_layers:
                raise ValueError(
                    f"plan: {kind} index {v} out of range for a model with {num_layers} layers "
                    f"(0-based: 0..{num_layers - 1})"
                )
            idx.append(v)
        out[kind] = sorted(set(idx))
    if not any(out.values()):
        raise ValueError(
            "the plan drops nothing (its attn, mlp and layer lists are empty or missing): name at "
            f"least one block, e.g. {form}, or make a plan with "
            + how(
                "entrodrop rank --kind ... --drop N", "prune.ranking.make_plan(report, kind, drop)"
            )
        )
    both = set(out["attn"]) & set(out["mlp"])
    layer = sorted(set(out["layer"]) | both)
    if len(layer) >= num_layers:
        raise ValueError(f"plan drops all {num_layers} layers; at least one must remain")
    gone = set(layer)
    return Drops(
        num_layers,
        layer=layer,
        attn=[i for i in out["attn"] if i not in gone],
        mlp=[i for i in out["mlp"] if i not in gone],
    )


# ----------------------------------------------------- the config as transformers builds it

# module attributes that name a layer's position, not a property of it
_POSITION_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "training"})


def _simple(v) -> bool:
    if isinstance(v, tuple):
        return all(_simple(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def layer_properties(cfg: dict, adapter: Adapter) -> list[dict]:
    """What each decoder layer of a model with this config is, as transformers builds it.

    One dict per layer: its entries of the per-layer config lists (``Arch.layer_lists``) and,
    for every module inside the layer, its class, its scalar attributes (``sliding_window``,
    ``is_sliding``, ``rotary_ndims``, ...; not the layer index) and its parameter shapes. The
    model is built on the meta device: no weights are allocated. ValueError when it cannot be.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(cfg)
    L = _num_layers_of(config.to_dict())
    per_layer = {}
    for key in adapter.arch.layer_lists:
        v = getattr(config, key, None)
        if isinstance(v, (list, tuple)) and len(v) == L:
            per_layer[key] = list(v)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise ValueError(
            f"cannot build a {config.model_type} model from the config to read its per-layer "
            f"properties: {type(exc).__name__}: {exc}"
        ) from exc
    out = []
    for i, layer in enumerate(_get_path(model, adapter.arch.layers)):
        modules = {}
        for name, mod in layer.named_modules():
            attrs = {
                k: v
                for k, v in vars(mod).items()
                if not k.startswith("_") and k not in _POSITION_ATTRS and _simple(v)
            }
            shapes = {
                n: tuple(t.shape)
                for n, t in (
                    *mod.named_parameters(recurse=False),
                    *mod.named_buffers(recurse=False),
                )
            }
            modules[name or "<layer>"] = {
                "class": type(mod).__name__,
                **attrs,
                **{f"shape of {n}": s for n, s in shapes.items()},
            }
        out.append({"config": {k: v[i] for k, v in per_layer.items()}, "modules": modules})
    return out


def _first_difference(want: dict, got: dict) -> str:
    for key in sorted(set(want["config"]) | set(got["config"])):
        a, b = want["config"].get(key), got["config"].get(key)
        if a != b:
            return f"config {key} {b!r} instead of {a!r}"
    for name in list(dict.fromkeys([*want["modules"], *got["modules"]])):
        a, b = want["modules"].get(name), got["modules"].get(name)
        if a is None or b is None:
            return f"module {name} {'missing' if b is None else 'added'}"
        for key in list(dict.fromkeys([*a, *b])):
            if a.get(key) != b.get(key):
                return f"{name}.{key} {b.get(key)!r} instead of {a.get(key)!r}"
    return "no difference"


def check_layer_properties(old_cfg: dict, new_cfg: dict, kept: list[int], adapter: Adapter) -> None:
    """Raise ValueError unless layer ``j`` of a model built from ``new_cfg`` is what layer
    ``kept[j]`` of one built from ``old_cfg`` is (same attention kind and window, MLP kind,
    rope use, shapes, ...)."""
    old, new = layer_properties(old_cfg, adapter), layer_properties(new_cfg, adapter)
    if len(new) != len(kept):
        raise ValueError(f"the rewritten config builds {len(new)} layers, expected {len(kept)}")
    for j, i in enumerate(kept):
        if old[i] != new[j]:
            import transformers

            raise ValueError(
                f"cannot write a {old_cfg.get('model_type')} config that keeps the kept layers as "
                f"they are: source layer {i} becomes layer {j}, and transformers "
                f"{transformers.__version__} would build it with "
                f"{_first_difference(old[i], new[j])} (the config class cannot state this layer "
                "pattern explicitly). Nothing was changed or written; drop other layers, or "
                "attention / MLP sub-blocks instead of whole layers."
            )


def pruned_config_dict(
    cfg: dict, adapter: Adapter, drops: Drops, base_architecture: str | None = None
) -> dict:
    """The config (as a ``to_dict()``/config.json dict) of the model after ``drops``.

    Pure function shared by in-memory surgery and export. Layer-count fields are rewritten
    for the layers that remain; sub-block drops (plus any recorded earlier, renumbered) go
    to ``cfg[PRUNED_KEY]``, dropped attention to ``kv_sharing_modes``.
    """
    source, cfg = cfg, copy.deepcopy(cfg)
    L = _num_layers_of(cfg)
    if L != drops.num_layers:
        raise ValueError(f"plan was normalised for {drops.num_layers} layers, config has {L}")
    kept = drops.kept
    new_of = {old: new for new, old in enumerate(kept)}
    prev = cfg.get(PRUNED_KEY) or {}
    again = {
        kind: sorted(set(getattr(drops, kind)) & set(prev.get(f"dropped_{kind}") or []))
        for kind in ("attn", "mlp")
    }
    if any(again.values()):
        named = "; ".join(f"{kind} {v}" for kind, v in again.items() if v)
        raise ValueError(
            f"the plan drops blocks this model no longer has ({named}, 0-based: removed by an "
            "earlier prune, recorded in its config's entrodrop_pruned); rank again from a profile "
            "of this model, which skips them"
        )

    if drops.layer:
        # Every per-layer property of the kept layers is stated explicitly, whether config.json
        # states it or the config class derives it (the architecture's table entry says from
        # which fields): left to be derived again, it would be derived from the new positions
        # and describe other layers.
        built = build_config(cfg).to_dict()
        cfg["num_hidden_layers"] = len(kept)
        for key in adapter.arch.layer_lists:
            v = built.get(key)
            if isinstance(v, (list, tuple)) and len(v) == L:
                cfg[key] = [v[i] for i in kept]
        for rewrite in adapter.arch.layer_rewrites:
            cfg.update(rewrite(built, kept))
        plc = cfg.get("per_layer_config")
        if isinstance(plc, dict) and plc:
            cfg["per_layer_config"] = {
                str(new_of[int(k)]): v for k, v in plc.items() if int(k) in new_of
            }
        kvm = cfg.get("kv_sharing_modes")
        if isinstance(kvm, list) and len(kvm) == L:
            cfg["kv_sharing_modes"] = [kvm[i] for i in kept]
        check_layer_properties(source, cfg, kept, adapter)

    orig = prev.get("kept_layers") or list(range(L))
    attn = sorted(
        {new_of[i] for i in prev.get("dropped_attn", []) if i in new_of}
        | {new_of[i] for i in drops.attn}
    )
    mlp = sorted(
        {new_of[i] for i in prev.get("dropped_mlp", []) if i in new_of}
        | {new_of[i] for i in drops.mlp}
    )
    if len(attn) >= len(kept):
        earlier = len(set(prev.get("dropped_attn", [])) & set(new_of))
        raise ValueError(
            f"the plan leaves no attention block: all {len(kept)} remaining decoder layers would "
            f"have their attention dropped ({earlier} by an earlier prune); such a model cannot "
            "use its context, and transformers cannot build its KV cache (it fails on the first "
            "forward pass). Keep at least one attention block: drop fewer, or protect one"
        )
    record = {
        "format": 1,
        "indexing": "0-based indices of this model's decoder layers",
        "original_num_layers": int(prev.get("original_num_layers", L)),
        "kept_layers": [orig[i] for i in kept],
        "dropped_attn": attn,
        "dropped_mlp": mlp,
        "paths": subblock_paths(adapter),
    }
    base = (
        prev.get("base_architecture")
        or base_architecture
        or (cfg.get("architectures") or [None])[0]
    )
    if base:
        record["base_architecture"] = base
    if attn or mlp or prev or drops.layer:
        cfg[PRUNED_KEY] = record
    if attn:
        modes = cfg.get("kv_sharing_modes")
        n = len(kept)
        base = list(modes) if isinstance(modes, list) and len(modes) == n else [None] * n
        cfg["kv_sharing_modes"] = ["reuse" if i in set(attn) else base[i] for i in range(n)]
    return cfg


# ------------------------------------------------------------------ in-memory surgery


def _renumber_(layer: nn.Module, idx: int) -> None:
    for mod in layer.modules():
        if isinstance(getattr(mod, "layer_idx", None), int):
            mod.layer_idx = idx


def _apply_config_(config, new: dict, old: dict) -> None:
    for key, value in new.items():
        if key not in old or old[key] != value:
            setattr(config, key, value)


@functools.lru_cache(maxsize=1)
def cache_skips_dropped_attention() -> bool:
    """Whether this transformers builds no KV-cache layer where ``kv_sharing_modes`` says
    "reuse"."""
    try:
        from transformers import DynamicCache, LlamaConfig

        cfg = LlamaConfig(
            num_hidden_layers=2,
            hidden_size=8,
            intermediate_size=8,
            num_attention_heads=2,
            vocab_size=8,
        )
        cfg.kv_sharing_modes = ["reuse", None]
        return list(getattr(DynamicCache(config=cfg), "is_dummy", [])) == [True, False]
    except Exception:
        return False


def _check_cache_support() -> None:
    if not cache_skips_dropped_attention():
        import warnings

        warnings.warn(
            "this transformers version cannot mark a layer as holding no KV cache; dropped "
            "attention layers leave empty cache slots, and generation is wrong if layer 0's "
            "attention is dropped",
            stacklevel=3,
        )


def drop_blocks_(model: nn.Module, plan) -> dict:
    """Remove the blocks of ``plan`` from ``model`` in place. Returns the summary record.

    ``plan``: a plan dict from :mod:`entrodrop_fast.prune.ranking` (its ``drop`` entry is used), a
    path to its JSON file, or a plain ``{"attn": [...], "mlp": [...], "layer": [...]}`` with
    0-based indices of ``model``'s current decoder layers.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    L = len(layers)
    cfg_layers = getattr(model.config, "num_hidden_layers", L)
    if cfg_layers != L:
        raise ValueError(
            f"model has {L} decoder layers but config.num_hidden_layers = {cfg_layers}"
        )
    plan = read_plan(plan)
    if isinstance(plan.get("model"), dict):
        warn_unchecked(check_same_model(plan["model"], model.config))
    drops = normalize_drops(plan, L)
    old_cfg = model.config.to_dict()
    base = type(model).__name__
    base = base[len("EntrodropPruned") :] if base.startswith("EntrodropPruned") else base
    new_cfg = pruned_config_dict(old_cfg, adapter, drops, base_architecture=base)

    if drops.layer:
        kept_modules = nn.ModuleList([layers[i] for i in drops.kept])
        _set_path(model, adapter.arch.layers, kept_modules)
        for j, layer in enumerate(kept_modules):
            _renumber_(layer, j)
    if drops.attn:
        _check_cache_support()
    if drops.attn or drops.mlp:
        new_of = {old: new for new, old in enumerate(drops.kept)}
        apply_subblock_drops_(
            model,
            {
                "paths": subblock_paths(adapter),
                "dropped_attn": [new_of[i] for i in drops.attn],
                "dropped_mlp": [new_of[i] for i in drops.mlp],
            },
        )
    _apply_config_(model.config, new_cfg, old_cfg)
    return new_cfg.get(PRUNED_KEY, {})


# ------------------------------------------------------------------ sizes


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token costs across all layers that keep their attention (batch 1)."""
    L = _num_layers_of(cfg)
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads)
    dropped = set((cfg.get(PRUNED_KEY) or {}).get("dropped_attn", []))
    return sum(2 * kv * head_dim * dtype_bytes for i in range(L) if i not in dropped)
