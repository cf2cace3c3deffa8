"""Faults in surgery and export (issue 11): per-layer config fields that a checkpoint's
config.json leaves to be derived, and plans / reports made for another model."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import manual_reference_logits, tiny_model

from entrodrop_fast.models.adapters import get_adapter
from entrodrop_fast.prune.export import ExportError, export_pruned
from entrodrop_fast.prune.ranking import make_plan
from entrodrop_fast.prune.surgery import (
    IDENTITY_FIELDS,
    check_same_model,
    drop_blocks_,
    layer_properties,
    model_identity,
)

IDS = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(5))
S, F = "sliding_attention", "full_attention"


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def published_checkpoint(model, path: Path, omit=(), add=None) -> Path:
    """Save ``model``, then write its config.json the way many published checkpoints have it:
    without the fields ``omit`` (that the config class derives), plus ``add``."""
    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    for key in omit:
        cfg.pop(key, None)
    cfg.update(add or {})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def mlp_kinds(model) -> list[str]:
    return [type(layer.mlp).__name__ for layer in get_adapter(model).layers(model)]


# ------------------------------------------------------------------ per-layer fields (issue 11.5)

# (model type, tiny-model overrides, config.json fields left out, fields added, layers dropped,
#  expected layer_types of the pruned model or None, expected MLP kinds or None)
DERIVED = {
    # sliding / full alternate from layer 0: [S, F, S, F]; dropping layer 1 must give [S, S, F]
    "gemma2": ("gemma2", {}, ["layer_types"], None, [1], [S, S, F], None),
    # pattern 6: layers 0-4 sliding, 5 full; re-derived for 5 layers it would have no full layer
    "gemma3": (
        "gemma3_text",
        {"num_hidden_layers": 6, "layer_types": None},
        ["layer_types"],
        {"sliding_window_pattern": 6},
        [0],
        [S, S, S, S, F],
        None,
    ),
    # max_window_layers 2: layers 0-1 full, 2-3 sliding
    "qwen2": ("qwen2", {}, ["layer_types"], None, [0, 3], [F, S], None),
    "qwen3": (
        "qwen3",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
        ["layer_types"],
        None,
        [1],
        [F, S, S],
        None,
    ),
    # decoder_sparse_step 2: layers 1, 3 sparse; num_experts left to its default (60); sliding
    # layers alternate below max_window_layers
    "qwen2_moe": (
        "qwen2_moe",
        {
            "num_experts": 60,
            "mlp_only_layers": [],
            "use_sliding_window": True,
            "max_window_layers": 4,
        },
        ["layer_types", "num_experts", "mlp_only_layers"],
        None,
        [0],
        [F, S, F],
        ["Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP", "Qwen2MoeSparseMoeBlock"],
    ),
    "qwen3_moe": (
        "qwen3_moe",
        {"decoder_sparse_step": 2, "mlp_only_layers": []},
        ["mlp_only_layers"],
        None,
        [2],
        None,
        ["Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock"],
    ),
    # one window for every layer: nothing per layer to restate
    "mistral": ("mistral", {}, ["layer_types"], None, [1], None, None),
}


@pytest.mark.parametrize("case", list(DERIVED))
def test_export_states_derived_per_layer_fields(case, tmp_path):
    from transformers import AutoModelForCausalLM

    model_type, overrides, omit, add, layer, want_types, want_mlp = DERIVED[case]
    src = published_checkpoint(
        tiny_model(model_type, "mixed", **overrides), tmp_path / "src", omit, add
    )
    raw = json.loads((src / "config.json").read_text())
    assert not set(omit) & set(raw)
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    plan = {"layer": layer}
    kept = [i for i in range(base.config.num_hidden_layers) if i not in layer]

    mem = copy.deepcopy(base)
    drop_blocks_(mem, plan)
    assert (logits(mem) - manual_reference_logits(base, plan, IDS)).abs().max().item() <= 1e-5

    summary = export_pruned(src, tmp_path / "out", plan)
    assert summary.stock_loadable
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    err = (logits(loaded) - logits(mem)).abs().max().item()
    assert err <= 1e-5, (
        f"{case}: stock-reloaded export differs from the in-memory drop by {err:.3e}"
    )
    ad = get_adapter(base)
    before = layer_properties(base.config.to_dict(), ad)
    assert layer_properties(loaded.config.to_dict(), ad) == [before[i] for i in kept]
    assert getattr(loaded.config, "layer_types", None) == getattr(mem.config, "layer_types", None)
    if want_types is not None:
        assert loaded.config.layer_types == want_types
        windows = [
            bool(getattr(layer.self_attn, "sliding_window", None)) for layer in loaded.model.layers
        ]
        assert windows == [t == S for t in want_types]
    if want_mlp is not None:
        assert mlp_kinds(loaded) == want_mlp == mlp_kinds(mem)


def test_gemma2_export_matches_the_issue_numbers(tmp_path):
    """The issue's case: 4 layers, layer 1 dropped; the exported config states [S, S, F]."""
    src = published_checkpoint(tiny_model("gemma2", "mixed"), tmp_path / "src", ["layer_types"])
    export_pruned(src, tmp_path / "out", {"layer": [1]})
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["layer_types"] == [S, S, F] and cfg["num_hidden_layers"] == 3


@pytest.fixture
def gemma2_pattern_fixed(monkeypatch):
    """A Gemma-2 config class that ignores an explicit layer_types and always derives the
    alternating pattern from the layer positions (as older transformers hard-coded it)."""
    from transformers import Gemma2Config

    real = Gemma2Config.__post_init__

    def post_init(self, **kwargs):
        self.layer_types = None
        return real(self, **kwargs)

    monkeypatch.setattr(Gemma2Config, "__post_init__", post_init)


def test_inexpressible_layer_pattern_is_refused(gemma2_pattern_fixed, tmp_path):
    src = published_checkpoint(tiny_model("gemma2", "mixed"), tmp_path / "src", ["layer_types"])
    with pytest.raises(
        ExportError,
        match=r"source layer 2 becomes layer 1, .* would build it with config layer_types "
        r"'full_attention' instead of 'sliding_attention'.*Nothing was changed or written",
    ):
        export_pruned(src, tmp_path / "out", {"layer": [1]})
    assert not (tmp_path / "out").exists()
    model = tiny_model("gemma2", "mixed")
    with pytest.raises(ValueError, match="cannot write a gemma2 config that keeps the kept layers"):
        drop_blocks_(model, {"layer": [1]})
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4  # untouched
    # a drop the derived pattern survives (kept layers 2, 3 are [S, F] again) still exports
    export_pruned(src, tmp_path / "ok", {"layer": [0, 1]})
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["layer_types"] == [S, F]


# ---------------------------------------------------- plans / reports of another model (issue 11.6)

L = 4


def synthetic_report(model: dict) -> dict:
    """A report of a 4-layer model (entropy falls over layer 0, then rises), with ``model`` as its
    model entry."""
    r = [10.0, 9.0, 9.5, 10.0, 10.5]
    dh = {
        "attn": [0.3, 0.05, 0.01, 0.2],
        "mlp": [0.4, 0.3, 0.02, 0.5],
        "layer": [-1.0, 0.2, 0.1, 0.4],
    }
    points, h = [], []
    for i in range(L):
        points += [f"r{i}", f"m{i}"]
        h += [r[i], r[i] + dh["attn"][i]]
    points.append(f"r{L}")
    h.append(r[L])
    blocks = [
        {
            "kind": k,
            "layer": i,
            "delta": {"bucket": {"mean": dh[k][i], "stderr": 0.01}},
            "cosine": None,
        }
        for k in ("attn", "mlp", "layer")
        for i in range(L)
    ]
    return {
        "format": 1,
        "model": {"name": "synthetic", **model},
        "points": points,
        "entropy": {"bucket": {"mean": h, "stderr": [0.0] * len(h)}},
        "blocks": blocks,
        "layer_indices": "0-based",
    }


def write_report(report: dict, path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps(report))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "src"
    tiny_model("llama", "mixed").save_pretrained(path)
    return path


def test_identity_of_config_json_and_loaded_model_agree(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ident = model_identity(json.loads((llama_dir / "config.json").read_text()))
    assert set(ident) == set(IDENTITY_FIELDS)
    assert (
        ident["num_layers"] == 4 and ident["hidden_size"] == 32 and ident["intermediate_size"] == 64
    )
    assert ident["num_attention_heads"] == 4 and ident["num_key_value_heads"] == 2
    # the loaded model (another dtype) and a config.json leaving defaults out: same fingerprint
    assert (
        model_identity(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).config)
        == ident
    )
    cfg = json.loads((llama_dir / "config.json").read_text())
    slim = {
        k: v
        for k, v in cfg.items()
        if k not in ("attention_bias", "mlp_bias", "rms_norm_eps", "use_cache", "dtype")
    }
    assert model_identity(slim) == ident
    # same sizes, another rope base: another fingerprint
    other = model_identity(
        {**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    )
    assert other["hidden_size"] == 32 and other["config_sha256"] != ident["config_sha256"]


def test_plan_records_the_model_it_was_made_for(llama_dir):
    ident = model_identity(json.loads((llama_dir / "config.json").read_text()))
    plan = make_plan(synthetic_report(ident), "layer", 1)
    for key in IDENTITY_FIELDS:
        assert plan["model"][key] == ident[key], key
    old = make_plan(
        synthetic_report({"model_type": "llama", "num_layers": L, "hidden_size": 32}), "layer", 1
    )
    assert "config_sha256" not in old["model"] and old["model"]["hidden_size"] == 32


def test_export_refuses_a_plan_of_another_hidden_size(llama_dir, tmp_path):
    """The issue's case: only the layer count used to be compared."""
    other = model_identity(tiny_model("llama", "mixed", hidden_size=64).config)
    plan = make_plan(synthetic_report(other), "layer", 1)
    with pytest.raises(
        ExportError,
        match=r"made for another model than .*hidden_size 64 there, 32 here.*profile this model "
        r"first",
    ):
        export_pruned(llama_dir, tmp_path / "out", plan)
    assert not (tmp_path / "out").exists()
    # an old plan (no fingerprint) with another hidden size: refused on what it records
    old = make_plan(
        synthetic_report({"model_type": "llama", "num_layers": L, "hidden_size": 64}), "layer", 1
    )
    with pytest.raises(ExportError, match="hidden_size 64 there, 32 here"):
        export_pruned(llama_dir, tmp_path / "out", old)
    assert not (tmp_path / "out").exists()


def test_mismatch_messages_name_every_field(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    ident = model_identity(cfg)
    with pytest.raises(
        ValueError,
        match=r"model_type 'mistral' there, 'llama' here; intermediate_size 128 there, 64 here",
    ):
        check_same_model({**ident, "model_type": "mistral", "intermediate_size": 128}, cfg)
    with pytest.raises(
        ValueError,
        match=r"made for a model with 6 layers; this model has 4: num_attention_heads 8 there, 4 "
        r"here",
    ):
        check_same_model({**ident, "num_layers": 6, "num_attention_heads": 8}, cfg)
    with pytest.raises(
        ValueError,
        match=r"config fingerprint 0123456789ab\.\.\. there, .* \(the configs differ beyond the "
        r"sizes\)",
    ):
        check_same_model({**ident, "config_sha256": "0123456789abcdef"}, cfg)
    assert check_same_model(ident, cfg) == []


def test_old_report_fields_present_agree_absent_unchecked(llama_dir, tmp_path):
    old = {"model_type": "llama", "num_layers": L, "hidden_size": 32}
    cfg = json.loads((llama_dir / "config.json").read_text())
    assert check_same_model(old, cfg) == [
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "config_sha256",
    ]
    plan = make_plan(synthetic_report(old), "layer", 1)
    with pytest.warns(
        UserWarning,
        match="does not record the model's intermediate_size, num_attention_heads, "
        "num_key_value_heads, config_sha256",
    ):
        s = export_pruned(llama_dir, tmp_path / "out", plan)
    assert s.layers_after == 3
    # a full plan of this model: checked, no warning
    plan = make_plan(synthetic_report(model_identity(cfg)), "layer", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_pruned(llama_dir, tmp_path / "out2", plan)


def test_in_memory_drop_refuses_a_plan_of_another_model():
    model = tiny_model("llama", "mixed")
    other = model_identity(tiny_model("llama", "mixed", intermediate_size=96).config)
    with pytest.raises(ValueError, match="intermediate_size 96 there, 64 here"):
        drop_blocks_(model, make_plan(synthetic_report(other), "layer", 1))
    assert len(model.model.layers) == 4
    rec = drop_blocks_(model, make_plan(synthetic_report(model_identity(model.config)), "layer", 1))
    assert len(model.model.layers) == 3 and rec["kept_layers"] == [0, 1, 3]


def test_prune_cli_refuses_a_report_of_another_model(llama_dir, tmp_path, capsys):
    from entrodrop_fast.cli import main

    other = write_report(
        synthetic_report(model_identity(tiny_model("llama", "mixed", hidden_size=64).config)),
        tmp_path / "rep_other",
    )
    out = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                str(llama_dir),
                "--report",
                str(other),
                "--kind",
                "layer",
                "--drop",
                "1",
                "--out",
                str(out),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert (
        f"report {other} was made for another model than {llama_dir}" in err
        and "hidden_size 64 there, 32 here" in err
    )
    assert "profile this model first" in err and not out.exists()
    mine = write_report(
        synthetic_report(model_identity(json.loads((llama_dir / "config.json").read_text()))),
        tmp_path / "rep",
    )
    assert (
        main(
            [
                "prune",
                str(llama_dir),
                "--report",
                str(mine),
                "--kind",
                "layer",
                "--drop",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = json.loads((out / "entrodrop_plan.json").read_text())
    assert (
        saved["model"]["config_sha256"]
        == model_identity(json.loads((llama_dir / "config.json").read_text()))["config_sha256"]
    )
    assert saved["report"] == str(mine) and saved["drop"]["layer"] == [2]


def test_a_plan_that_leaves_no_attention_block_is_refused(llama_dir, tmp_path):
    """Every remaining layer's attention dropped (here in two prunes) made a model that failed
    on its first forward pass (no KV-cache layer); refused, nothing written."""
    first = tmp_path / "first"
    export_pruned(llama_dir, first, {"attn": [1, 2]})
    with pytest.raises(
        ExportError, match=r"leaves no attention block: all 4 .* \(2 by an earlier prune\)"
    ):
        export_pruned(first, tmp_path / "none", {"attn": [0, 3]})
    assert not (tmp_path / "none").exists()
    model = tiny_model("llama", "mixed")
    before = logits(model)
    with pytest.raises(ValueError, match="leaves no attention block"):
        drop_blocks_(model, {"attn": [0, 1, 2, 3]})
    assert torch.equal(logits(model), before)  # refused before anything was removed
    drop_blocks_(model, {"attn": [0, 1, 2]})  # one left: runs
    with torch.inference_mode():
        assert torch.isfinite(model(IDS).logits).all()
