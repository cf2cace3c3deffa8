"""Model sources and per-architecture adapters."""

from entrodrop_fast.models.adapters import (
    ARCHS,
    BLOCK_KINDS,
    RESIDUAL_KINDS,
    Adapter,
    Arch,
    get_adapter,
    supported_model_types,
)
from entrodrop_fast.models.loading import (
    LoadedModel,
    ModelLoadError,
    builtin_gguf_path,
    cache_root,
    ensure_builtin,
    gguf_to_model,
    load_model,
    parse_device,
    parse_dtype,
)

__all__ = [
    "ARCHS",
    "BLOCK_KINDS",
    "RESIDUAL_KINDS",
    "Adapter",
    "Arch",
    "get_adapter",
    "supported_model_types",
    "LoadedModel",
    "ModelLoadError",
    "builtin_gguf_path",
    "cache_root",
    "ensure_builtin",
    "gguf_to_model",
    "load_model",
    "parse_device",
    "parse_dtype",
]
