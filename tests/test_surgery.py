"""In-memory surgery: drop_blocks_ on tiny random models of every supported architecture."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from helpers import TYPES, manual_reference_logits, tiny_model

from entrodrop_fast.prune.surgery import (
    ZeroAttention,
    ZeroMLP,
    count_params,
    drop_blocks_,
    kv_bytes_per_token,
    normalize_drops,
)

PLANS = [
    {"attn": [0, 2]},
    {"mlp": [1, 3]},
    {"layer": [1, 2]},
    {"attn": [0], "mlp": [3], "layer": [1]},  # mixed; layer 0 keeps no KV cache
]


@pytest.mark.parametrize("model_type", TYPES)
def test_equivalence_and_generate(model_type):
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    base = tiny_model(model_type, "mixed")
    for plan in PLANS:
        ref = manual_reference_logits(base, plan, ids)
        model = copy.deepcopy(base)
        drop_blocks_(model, plan)
        with torch.no_grad():
            got = model(ids, use_cache=False).logits
        err = (got - ref).abs().max().item()
        assert err <= 1e-5, f"{model_type} {plan}: max |pruned - reference| = {err:.3e}"
    # generate with the KV cache == without (cache indexing right after renumbering); the
    # cache holds tensors for the kept attention layers only
    prompt = ids[:1, :5]
    out = model.generate(
        prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    nocache = model.generate(
        prompt, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0
    )
    assert torch.equal(out.sequences, nocache), f"{model_type}: cached generation differs"
    dropped_attn = set(model.config.entrodrop_pruned["dropped_attn"])
    assert dropped_attn == {0}
    held = [
        i for i, layer in enumerate(out.cache.layers) if getattr(layer, "keys", None) is not None
    ]
    assert len(out.cache.layers) == model.config.num_hidden_layers == 3
    assert set(held) == {1, 2}, held


def test_config_fields_follow_layer_drops():
    m = tiny_model(
        "qwen2_moe",
        "mixed",
        num_hidden_layers=6,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        max_window_layers=3,
        use_sliding_window=True,
    )
    sparse_before = [type(layer.mlp).__name__ for layer in m.model.layers]
    types_before = list(m.config.layer_types)
    drop_blocks_(m, {"layer": [0, 4]})
    kept = [1, 2, 3, 5]
    assert m.config.num_hidden_layers == 4
    assert m.config.layer_types == [types_before[i] for i in kept]
    assert m.config.max_window_layers == 2  # kept layers 1, 2 were below 3
    # a fresh model built from the rewritten config has the same MLP kinds in the same places
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(m.config)
    assert [type(layer.mlp).__name__ for layer in fresh.model.layers] == [
        sparse_before[i] for i in kept
    ]
    assert [layer.self_attn.layer_idx for layer in m.model.layers] == [0, 1, 2, 3]


def test_mlp_only_layers_listing_every_layer_is_not_a_per_layer_list():
    """mlp_only_layers names layers; with as many entries as layers it is still not one entry
    per layer (the table's ``layer_lists``): renumbered, the kept layers compare equal."""
    m = tiny_model("qwen2_moe", "mixed", mlp_only_layers=[0, 1, 2, 3])
    drop_blocks_(m, {"layer": [1]})
    assert m.config.mlp_only_layers == [0, 1, 2]
    assert [type(layer.mlp).__name__ for layer in m.model.layers] == ["Qwen2MoeMLP"] * 3


def test_weights_freed_and_counts():
    m = tiny_model("llama", "mixed")
    before = count_params(m)
    kv_before = kv_bytes_per_token(m.config.to_dict())
    ref_attn = weakref.ref(m.model.layers[2].self_attn.q_proj.weight)
    ref_layer = weakref.ref(m.model.layers[1].mlp.up_proj.weight)
    drop_blocks_(m, {"attn": [2], "layer": [1]})
    gc.collect()
    assert ref_attn() is None and ref_layer() is None, "dropped weights are still referenced"
    assert isinstance(m.model.layers[1].self_attn, ZeroAttention)
    assert isinstance(m.model.layers[1].input_layernorm, torch.nn.Identity)
    assert count_params(m) < before
    assert (
        kv_bytes_per_token(m.config.to_dict()) == kv_before // 4 * 2
    )  # 4 layers -> 3 with 1 attention gone
    m2 = tiny_model("llama", "mixed")
    drop_blocks_(m2, {"mlp": [0]})
    assert isinstance(m2.model.layers[0].mlp, ZeroMLP)
    assert not list(m2.model.layers[0].mlp.parameters())


def test_shared_norm_kept_for_phi():
    m = tiny_model("phi", "mixed")
    drop_blocks_(m, {"attn": [1]})
    assert isinstance(
        m.model.layers[1].input_layernorm, torch.nn.LayerNorm
    )  # the MLP still reads it


def test_both_subblocks_become_layer_drop_and_bad_plans():
    d = normalize_drops({"attn": [1, 2], "mlp": [2]}, 4)
    assert d.layer == [2] and d.attn == [1] and d.mlp == []
    with pytest.raises(ValueError, match="out of range"):
        normalize_drops({"attn": [4]}, 4)
    with pytest.raises(ValueError, match="all 4 layers"):
        normalize_drops({"layer": [0, 1, 2, 3]}, 4)
    with pytest.raises(ValueError, match="integers"):
        normalize_drops({"attn": ["1"]}, 4)
    with pytest.raises(ValueError, match="unknown keys"):
        normalize_drops({"atn": [1]}, 4)


def test_repeated_surgery_composes():
    ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(2))
    ref = manual_reference_logits(
        tiny_model("mistral", "mixed"), {"attn": [3], "layer": [0, 2]}, ids
    )
    m = tiny_model("mistral", "mixed")
    drop_blocks_(m, {"attn": [3]})
    drop_blocks_(m, {"layer": [0, 2]})  # indices of the current model: original layers 0 and 2
    rec = m.config.entrodrop_pruned
    assert rec["kept_layers"] == [1, 3] and rec["dropped_attn"] == [1]
    with torch.no_grad():
        got = m(ids, use_cache=False).logits
    assert (got - ref).abs().max().item() <= 1e-5


def test_plan_for_another_model_is_refused():
    with pytest.raises(ValueError, match="made for a model with 30 layers"):
        drop_blocks_(
            tiny_model("llama", "mixed"), {"model": {"num_layers": 30}, "drop": {"attn": [1]}}
        )


def test_this_transformers_keeps_no_cache_for_dropped_attention():
    from entrodrop_fast.prune.surgery import cache_skips_dropped_attention

    assert cache_skips_dropped_attention()
