"""A model's config as transformers builds it, and the identity recorded in reports and plans."""

from __future__ import annotations

import copy
import json


def _num_layers_of(cfg: dict) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    raise ValueError("config has no num_hidden_layers")


def build_config(cfg: dict):
    """The config object ``from_pretrained`` builds from this config.json dict: defaults
    filled in and the per-layer fields its ``__post_init__`` derives (``layer_types`` from
    a sliding-window pattern, ...) set. ValueError when transformers cannot build it."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(
            f"transformers {transformers.__version__} has no config class for model_type "
            f"{model_type!r}"
        ) from None
    d = {k: v for k, v in copy.deepcopy(cfg).items() if k != "auto_map"}
    try:
        return cls.from_dict(d)
    except Exception as exc:
        raise ValueError(
            f"transformers {transformers.__version__} cannot build the {model_type} config from "
            "this config.json: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


# what a report's / plan's "model" entry records about the model it was made for
IDENTITY_FIELDS = (
    "model_type",
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "config_sha256",
)

# config entries that say how a model was loaded or saved, not what it is: not fingerprinted
_NOT_IDENTITY = frozenset(
    {
        "transformers_version",
        "dtype",
        "torch_dtype",
        "architectures",
        "auto_map",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


def model_identity(config) -> dict:
    """Which model this is, as recorded in reports and plans: model type, layer count, sizes and
    ``config_sha256``, a fingerprint of the config as transformers builds it (so a config.json
    that leaves defaults out and the loaded model's config agree), less how it was loaded or
    saved (dtype, architectures, ...). ``config``: a config object or a config.json dict.
    Entries that cannot be told are left out."""
    import hashlib

    d = config if isinstance(config, dict) else config.to_dict()
    try:
        built = build_config(d).to_dict()
    except ValueError:
        built = None
    src = built or d
    out = {"model_type": src.get("model_type")}
    try:
        out["num_layers"] = _num_layers_of(src)
    except ValueError:
        pass
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        out[key] = src.get(key)
    if built is not None:
        kept = {k: v for k, v in built.items() if not k.startswith("_") and k not in _NOT_IDENTITY}
        out["config_sha256"] = hashlib.sha256(
            json.dumps(kept, sort_keys=True, default=str).encode()
        ).hexdigest()
    return {k: v for k, v in out.items() if v is not None}
