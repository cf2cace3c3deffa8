"""The architecture of a pruned checkpoint: a model with some attention / MLP sub-blocks removed.

``entrodrop prune`` records the dropped sub-blocks in ``config.entrodrop_pruned``
(:data:`PRUNED_KEY`); loading such a checkpoint builds the base architecture and replaces
each dropped sub-block by a module with no weights that adds exactly 0 to the residual
stream (:func:`apply_subblock_drops_`). Whole-layer drops need nothing here: the config
simply has fewer layers.

Everything between the ``# --- self-contained`` markers depends on ``torch`` only:
:mod:`entrodrop_fast.prune.export` writes that source verbatim into the modeling file of an
attn/mlp-pruned checkpoint, so the in-memory and the reloaded model run the very same code.
"""

from __future__ import annotations

from torch import nn

PRUNED_KEY = "entrodrop_pruned"  # config attribute / config.json key of the record


# --- self-contained: begin


class ZeroAttention(nn.Module):
    """Stands in for a dropped attention: adds exactly 0 to the residual, caches nothing.

    Returns ``(zeros, None)`` like a ``transformers`` attention module; the zeros are a
    zero-stride view of one scalar (no compute, no memory).
    """

    def forward(self, hidden_states=None, *args, **kwargs):
        x = hidden_states if hidden_states is not None else args[0]
        return x.new_zeros(()).expand_as(x), None


class ZeroMLP(nn.Module):
    """Stands in for a dropped MLP / MoE block: adds exactly 0 to the residual stream."""

    def forward(self, hidden_states=None, *args, **kwargs):
        x = hidden_states if hidden_states is not None else args[0]
        return x.new_zeros(()).expand_as(x)


def _set_path(root, path, module):
    parent = root
    parts = path.split(".")
    for part in parts[:-1]:
        parent = getattr(parent, part)
    setattr(parent, parts[-1], module)


def _get_path(root, path):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def apply_subblock_drops_(model, record):
    """Replace the attn / MLP sub-blocks listed in ``record`` by zero modules, in place.

    ``record`` is ``config.entrodrop_pruned``: ``dropped_attn`` / ``dropped_mlp`` (0-based
    indices of the model's current layers) and ``paths`` (where the layers, the sub-blocks
    and their own norms are; norms shared by both sub-blocks are listed in ``shared_norms``
    and only removed when both sub-blocks are gone).
    """
    paths = record["paths"]
    layers = _get_path(model, paths["layers"])
    attn, mlp = set(record.get("dropped_attn", [])), set(record.get("dropped_mlp", []))
    for i in sorted(attn | mlp):
        if not 0 <= i < len(layers):
            raise ValueError(
                f"dropped sub-block in layer {i}, but the model has {len(layers)} layers"
            )
        layer = layers[i]
        if i in attn:
            _set_path(layer, paths["attn"], ZeroAttention())
            for name in paths["attn_norms"]:
                _set_path(layer, name, nn.Identity())
        if i in mlp:
            _set_path(layer, paths["mlp"], ZeroMLP())
            for name in paths["mlp_norms"]:
                _set_path(layer, name, nn.Identity())
        if i in attn and i in mlp:
            for name in paths.get("shared_norms", []):
                _set_path(layer, name, nn.Identity())
    return model


def inherit_weight_renaming(class_name, base_class_name, model_type):
    """Let a subclass ``class_name`` read checkpoints the way its base class does.

    transformers >= 5 renames some checkpoint tensors on load (``embed_out`` -> ``lm_head``,
    per-expert -> fused MoE weights), keyed by class name or model_type, and skips classes
    defined outside the library unless they are registered; older versions rename nothing.
    """
    try:
        from transformers import conversion_mapping as cm
    except ImportError:
        return
    get = getattr(cm, "get_checkpoint_conversion_mapping", None)
    register = getattr(cm, "register_checkpoint_conversion_mapping", None)
    if get is None or register is None:
        return
    mapping = get(base_class_name) or get(model_type)
    if mapping is not None:
        register(class_name, mapping, overwrite=True)


# --- self-contained: end


def has_subblock_drops(cfg: dict) -> bool:
    rec = cfg.get(PRUNED_KEY) or {}
    return bool(rec.get("dropped_attn") or rec.get("dropped_mlp"))


def pruned_record(config) -> dict | None:
    """``config.entrodrop_pruned`` when it records attention / MLP drops (a checkpoint of
    ``entrodrop prune``)."""
    rec = (
        config.get("entrodrop_pruned")
        if isinstance(config, dict)
        else getattr(config, "entrodrop_pruned", None)
    )
    if isinstance(rec, dict) and (rec.get("dropped_attn") or rec.get("dropped_mlp")):
        return rec
    return None


def pruned_model_class(cfg: dict):
    """The class that builds the model of a config with sub-block drops (``cfg``: its dict).

    The base architecture, with the recorded drops applied at construction (no remote code
    runs); it reads checkpoints the way its base class does.
    """
    import transformers

    base_name = cfg[PRUNED_KEY].get("base_architecture") or ""
    base = getattr(transformers, base_name, None)
    if base is None:
        raise ValueError(
            f"base architecture {base_name!r} of the pruned checkpoint is not a class of "
            f"transformers {transformers.__version__}"
        )

    def __init__(self, config, *args, **kw):
        base.__init__(self, config, *args, **kw)
        apply_subblock_drops_(self, config.entrodrop_pruned)

    name = f"EntrodropPruned{base_name}"
    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__})
    inherit_weight_renaming(name, base_name, cfg.get("model_type"))
    return cls
