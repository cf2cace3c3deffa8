"""Per-architecture knowledge: ONE table keyed by ``config.model_type``.

Each entry says where the decoder layers, the attention, the MLP and the norms of a
Hugging Face causal LM live, and how the residual stream flows through a layer. The
profiler (taps), the streaming runner and surgery all read this table; nothing else
in the package knows about a model family.

Residual structure kinds (``r_l`` = residual stream entering layer ``l``; ``F_attn`` /
``F_mlp`` = the exact tensors the layer adds to the residual stream, i.e. the outputs of
the ``attn_out`` / ``mlp_out`` modules below):

``pre_norm``  (Llama, Mistral, Qwen, Phi-3, Mixtral, ...)::

    m_l     = r_l + attn(norm1(r_l))          # F_attn = attn(...)
    r_{l+1} = m_l + mlp(norm2(m_l))           # F_mlp  = mlp(...)

``sandwich`` (Gemma-2/3): the branch output is normed again before the add::

    m_l     = r_l + post_attn_norm(attn(pre_attn_norm(r_l)))   # F_attn = post_attn_norm(...)
    r_{l+1} = m_l + post_ffn_norm(mlp(pre_ffn_norm(m_l)))      # F_mlp  = post_ffn_norm(...)

``post_norm`` (OLMo-2): no norm on the branch input, one on its output::

    m_l     = r_l + post_attn_norm(attn(r_l))
    r_{l+1} = m_l + post_ffn_norm(mlp(m_l))

For these three *sequential* kinds the blocks are ``attn: X = r_l, Y = m_l``,
``mlp: X = m_l, Y = r_{l+1}``, ``layer: X = r_l, Y = r_{l+1}``.

``parallel`` (GPT-NeoX with ``use_parallel_residual``, Phi-2): both branches read the
layer input::

    r_{l+1} = r_l + attn(norm1(r_l)) + mlp(norm2(r_l))

There is no mid-layer point on the residual stream. Each branch is scored by what it
adds to the stream it reads: ``attn: X = r_l, Y = r_l + F_attn``; ``mlp: X = r_l,
Y = r_l + F_mlp`` (so ``ΔH_attn + ΔH_mlp`` need not equal ``ΔH_layer``; removing one
branch leaves the other's input unchanged, which is what these Y's measure);
``layer: X = r_l, Y = r_{l+1}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

RESIDUAL_KINDS = ("pre_norm", "sandwich", "post_norm", "parallel")
SEQUENTIAL_KINDS = ("pre_norm", "sandwich", "post_norm")


@dataclass(frozen=True)
class Arch:
    """Where things are in one model family. Paths are dotted attribute paths.

    ``layers``/``embed``/``final_norm``/``rotary``/``lm_head`` are relative to the
    ``*ForCausalLM`` model; the rest are relative to one decoder layer.
    """

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str | None = "model.rotary_emb"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    # modules whose output is exactly the term added to the residual stream
    attn_out: str = "self_attn"
    mlp_out: str = "mlp"
    # norms belonging to each sub-block (removed together with it by surgery)
    attn_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    # a module whose first input is the mid-layer residual m_l (sequential kinds only); a
    # callable of the config where it depends on it
    mid: str | None | Callable[[object], str | None] = "post_attention_layernorm"
    residual: str | Callable[[object], str] = "pre_norm"
    moe: bool = False
    # older checkpoint names of a sub-block, which transformers renames on load (export maps
    # a checkpoint's tensors to sub-blocks by name)
    attn_aliases: tuple[str, ...] = ()
    mlp_aliases: tuple[str, ...] = ()
    # the module under an MoE block holding the experts (its tensors: ``....{experts}.``)
    experts: str = "experts"
    # which of the paper's code paths (its official code) scores this family: "llama" (knn,
    # k = 25) or "mistral" (bucket, 80 bins); used by --preset paper
    paper_family: str = "llama"
    # how a layer drop rewrites the config (surgery reads these two):
    # fields holding one entry per decoder layer, cut to the kept layers' entries ...
    layer_lists: tuple[str, ...] = ("layer_types", "no_rope_layers")
    # ... and the fields from which the config class derives per-layer properties otherwise:
    # each callable takes the config as that class builds it (``to_dict()``) and the kept
    # layers' indices, and returns the fields that state those properties for the kept layers
    layer_rewrites: tuple[Callable[[dict, list[int]], dict], ...] = ()


def _window_layers(built: dict, kept: list[int]) -> dict:
    """Qwen's ``max_window_layers`` N: layers below N use full attention, the rest sliding
    windows (with ``use_sliding_window``); N becomes the number of kept layers below it."""
    n = built.get("max_window_layers")
    if isinstance(n, int) and not isinstance(n, bool):
        return {"max_window_layers": sum(1 for i in kept if i < n)}
    return {}


def _sparse_moe_layers(built: dict, kept: list[int]) -> dict:
    """Qwen-MoE: layer ``i`` has a sparse MoE block when it is not in ``mlp_only_layers``, there
    are experts, and ``(i + 1) % decoder_sparse_step == 0``. The kept layers' pattern need not
    be periodic: stated layer by layer (step 1, the dense layers' new indices listed)."""
    if "decoder_sparse_step" not in built and "mlp_only_layers" not in built:
        return {}
    only = set(built.get("mlp_only_layers") or [])
    step = built.get("decoder_sparse_step") or 1
    experts = built.get("num_experts", built.get("num_local_experts", 0)) or 0

    def sparse(i: int) -> bool:
        return (i not in only) and experts > 0 and (i + 1) % step == 0

    return {
        "decoder_sparse_step": 1,
        "mlp_only_layers": [j for j, i in enumerate(kept) if not sparse(i)],
    }


_QWEN = (_window_layers,)
_QWEN_MOE = (_window_layers, _sparse_moe_layers)
_PRE_NORM = Arch()
_SANDWICH = Arch(
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    attn_norms=("input_layernorm", "post_attention_layernorm"),
    mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    mid="pre_feedforward_layernorm",
    residual="sandwich",
)


def _neox_kind(config) -> str:
    return "parallel" if getattr(config, "use_parallel_residual", True) else "pre_norm"


def _neox_mid(config) -> str | None:
    return None if _neox_kind(config) == "parallel" else "post_attention_layernorm"


ARCHS: dict[str, Arch] = {
    "llama": _PRE_NORM,
    "mistral": Arch(paper_family="mistral"),
    "qwen2": Arch(layer_rewrites=_QWEN),
    "qwen3": Arch(layer_rewrites=_QWEN),
    "phi3": Arch(attn_out="resid_attn_dropout", mlp_out="resid_mlp_dropout"),
    "gemma2": _SANDWICH,
    "gemma3_text": _SANDWICH,
    "mixtral": Arch(moe=True, mlp_aliases=("block_sparse_moe",), paper_family="mistral"),
    "qwen2_moe": Arch(moe=True, layer_rewrites=_QWEN_MOE),
    "qwen3_moe": Arch(moe=True, layer_rewrites=_QWEN_MOE),
    "olmo2": Arch(
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        attn_norms=("post_attention_layernorm",),
        mlp_norms=("post_feedforward_layernorm",),
        mid="mlp",
        residual="post_norm",
    ),
    "gpt_neox": Arch(
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        rotary="gpt_neox.rotary_emb",
        attn="attention",
        attn_out="post_attention_dropout",
        mlp_out="post_mlp_dropout",
        mid=_neox_mid,  # the sequential variant has one
        residual=_neox_kind,
    ),
    "phi": Arch(
        final_norm="model.final_layernorm",
        attn_out="self_attn",  # resid_dropout is shared by both branches: tap the branches
        mlp_out="mlp",
        attn_norms=("input_layernorm",),  # one norm shared by both branches
        mlp_norms=(),
        mid=None,
        residual="parallel",
    ),
}


def supported_model_types() -> list[str]:
    return sorted(ARCHS)


def get_attr(root: nn.Module, path: str):
    """Follow a dotted attribute path (``"model.layers"``)."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class Adapter:
    """The table entry for one model, bound to its config (some choices depend on it)."""

    def __init__(self, config):
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHS:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: "
                f"{', '.join(supported_model_types())}"
            )
        self.config = config
        self.model_type = model_type
        self.arch = ARCHS[model_type]
        kind = self.arch.residual(config) if callable(self.arch.residual) else self.arch.residual
        assert kind in RESIDUAL_KINDS, kind
        self.residual = kind
        mid = self.arch.mid(config) if callable(self.arch.mid) else self.arch.mid
        self.mid_path = mid if kind in SEQUENTIAL_KINDS else None

    # ----------------------------------------------------------- whole model
    @property
    def sequential(self) -> bool:
        return self.residual in SEQUENTIAL_KINDS

    def base(self, model: nn.Module) -> nn.Module:
        """The decoder stack without the LM head (``model.model``): runs the layers, no logits."""
        return get_attr(model, self.arch.layers.rsplit(".", 1)[0])

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_attr(model, self.arch.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def embed(self, model: nn.Module) -> nn.Module:
        return get_attr(model, self.arch.embed)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return get_attr(model, self.arch.final_norm)

    def rotary(self, model: nn.Module) -> nn.Module | None:
        return None if self.arch.rotary is None else get_attr(model, self.arch.rotary)

    def lm_head(self, model: nn.Module) -> nn.Module:
        return get_attr(model, self.arch.lm_head)

    # ----------------------------------------------------------- one layer
    def attn(self, layer: nn.Module) -> nn.Module:
        return get_attr(layer, self.arch.attn)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return get_attr(layer, self.arch.mlp)

    def attn_out(self, layer: nn.Module) -> nn.Module:
        return get_attr(layer, self.arch.attn_out)

    def mlp_out(self, layer: nn.Module) -> nn.Module:
        return get_attr(layer, self.arch.mlp_out)

    def mid(self, layer: nn.Module) -> nn.Module | None:
        return None if self.mid_path is None else get_attr(layer, self.mid_path)

    def norms(self, layer: nn.Module, block: str) -> list[nn.Module]:
        names = {"attn": self.arch.attn_norms, "mlp": self.arch.mlp_norms}[block]
        return [get_attr(layer, n) for n in names]

    def block_module_names(self, block: str) -> tuple[str, ...]:
        """Attribute names inside a layer that make up a sub-block (for surgery)."""
        if block == "attn":
            return (self.arch.attn, *self.arch.attn_norms)
        if block == "mlp":
            return (self.arch.mlp, *self.arch.mlp_norms)
        raise ValueError(f"block must be 'attn' or 'mlp', got {block!r}")

    def points(self, num_layers: int) -> list[str]:
        """Names of the residual-stream points whose entropy is measured, in depth order.

        ``r{l}``: input of layer l (``r{L}`` = output of the last layer, before the final
        norm); sequential kinds add ``m{l}`` (mid-layer); parallel kinds add ``a{l}`` =
        r_l + F_attn and ``p{l}`` = r_l + F_mlp (not on the stream; see module doc).
        """
        out = []
        for layer in range(num_layers):
            out.append(f"r{layer}")
            out.extend([f"m{layer}"] if self.sequential else [f"a{layer}", f"p{layer}"])
        out.append(f"r{num_layers}")
        return out

    def block_points(self, kind: str, layer: int) -> tuple[str, str]:
        """(X point, Y point) of block ``kind`` in layer ``layer``."""
        return block_points(kind, layer, self.residual)

    def subblock_aliases(self, block: str) -> tuple[str, ...]:
        """Older checkpoint names of sub-block ``block`` ("attn" or "mlp")."""
        return {"attn": self.arch.attn_aliases, "mlp": self.arch.mlp_aliases}[block]

    def is_expert_tensor(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` belongs to one MoE expert."""
        return self.arch.moe and f".{self.arch.experts}." in name


def block_points(kind: str, layer: int, residual: str) -> tuple[str, str]:
    """(X point, Y point) of block ``kind`` in layer ``layer`` of a model whose residual
    structure is ``residual`` (one of :data:`RESIDUAL_KINDS`; reports record it)."""
    if kind == "layer":
        return f"r{layer}", f"r{layer + 1}"
    if residual in SEQUENTIAL_KINDS:
        if kind == "attn":
            return f"r{layer}", f"m{layer}"
        if kind == "mlp":
            return f"m{layer}", f"r{layer + 1}"
    else:
        if kind == "attn":
            return f"r{layer}", f"a{layer}"
        if kind == "mlp":
            return f"r{layer}", f"p{layer}"
    raise ValueError(f"block kind must be 'attn', 'mlp' or 'layer', got {kind!r}")


def paper_family(model_type: str | None) -> str:
    """The paper's code path for ``model_type``: "mistral" (bucket, 80 bins) or "llama" (knn,
    k = 25; also for a type outside the table, as the paper's default class)."""
    arch = ARCHS.get((model_type or "").lower())
    return arch.paper_family if arch is not None else "llama"


def get_adapter(model_or_config) -> Adapter:
    """The adapter for a model (or its config). ValueError for an unsupported model_type."""
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, torch.nn.Module):  # pragma: no cover - a module without config
        raise ValueError("expected a transformers model or config with a model_type")
    return Adapter(config)


BLOCK_KINDS = ("attn", "mlp", "layer")
