"""Export without loading the model: shard rewrite, reload (stock / load_pruned / remote code),
faults."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import TYPES, manual_reference_logits, tiny_model

from entrodrop_fast.outputs import OutputError
from entrodrop_fast.prune.export import ExportError, export_pruned, load_pruned
from entrodrop_fast.prune.surgery import drop_blocks_

IDS = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(3))


def save_sharded(model, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size="40KB")  # several shards, with an index
    return path


def tree_hashes(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("model_type", TYPES)
def test_export_reload_every_architecture(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_model(model_type, "mixed")
    src = save_sharded(base, tmp_path / "src")
    assert (src / "model.safetensors.index.json").is_file()
    before = tree_hashes(src)

    # attn / mlp (and a layer) dropped: load_pruned and stock + trust_remote_code
    plan = {"attn": [0], "mlp": [3], "layer": [1]}
    out = tmp_path / f"sub_{model_type}"
    summary = export_pruned(src, out, plan)
    assert not summary.stock_loadable and summary.layers_after == 3
    assert (
        summary.params_after < summary.params_before and summary.bytes_after < summary.bytes_before
    )
    assert summary.kv_bytes_per_token_after == summary.kv_bytes_per_token_before // 4 * 2
    ref = manual_reference_logits(base, plan, IDS)
    mem = copy.deepcopy(base)
    drop_blocks_(mem, plan)
    mem_logits = logits(mem)
    assert max_err(mem_logits, ref) <= 1e-5
    expected = mem.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    for loaded in (
        load_pruned(out),
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True),
    ):
        assert type(loaded).__name__.startswith("EntrodropPruned")
        assert loaded.config.num_hidden_layers == 3
        assert max_err(logits(loaded), mem_logits) <= 1e-5, (
            f"{model_type}: exported != in-memory pruned"
        )
        n_attn = sum(
            1
            for n, _ in loaded.named_parameters()
            if ".0." in n and ("attn" in n or "attention." in n)
        )
        assert n_attn == 0, "layer 0 still has attention weights"
        gen = loaded.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, expected)

    # whole layers only: a standard checkpoint, stock transformers loads it
    plan = {"layer": [0, 2]}
    out = tmp_path / f"layer_{model_type}"
    summary = export_pruned(src, out, plan)
    assert summary.stock_loadable
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and not (out / "modeling_entrodrop_pruned.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == type(base).__name__
    mem = copy.deepcopy(base)
    drop_blocks_(mem, plan)
    for key in (
        "num_hidden_layers",
        "layer_types",
        "max_window_layers",
        "mlp_only_layers",
        "decoder_sparse_step",
    ):
        assert getattr(loaded.config, key, None) == getattr(mem.config, key, None), key
    ref = manual_reference_logits(base, plan, IDS)
    assert max_err(logits(loaded), ref) <= 1e-5
    assert max_err(logits(loaded), logits(mem)) <= 1e-5
    assert tree_hashes(src) == before, "the source directory changed"


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    return save_sharded(tiny_model("llama", "mixed"), tmp_path_factory.mktemp("llama") / "src")


def test_corrupt_shard_fails_cleanly(llama_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in llama_src.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    data = (src / shard).read_bytes()
    (src / shard).write_bytes(data[: len(data) - 100])  # truncated
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=shard):
        export_pruned(src, out, {"attn": [1]})
    assert not out.exists() and _leftovers(tmp_path) == []
    (src / shard).write_bytes(b"\xff" * 8 + data[8:])  # garbage header length
    with pytest.raises(ExportError, match="cannot read safetensors file"):
        export_pruned(src, out, {"layer": [1]})
    assert not out.exists() and _leftovers(tmp_path) == []
    os.remove(src / shard)
    with pytest.raises(ExportError, match="missing"):
        export_pruned(src, out, {"layer": [1]})
    assert not out.exists()


def test_a_damaged_config_json_is_named(llama_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in llama_src.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    text = (src / "config.json").read_text()
    (src / "config.json").write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(ExportError, match=rf"{src / 'config.json'} is not valid JSON .* restore"):
        export_pruned(src, tmp_path / "out", {"attn": [1]})
    with pytest.raises(ExportError, match="not valid JSON"):
        load_pruned(src)
    (src / "config.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match="holds list, not a JSON object"):
        export_pruned(src, tmp_path / "out", {"attn": [1]})
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_nothing(llama_src, tmp_path, monkeypatch):
    import entrodrop_fast.prune.export as ex

    calls = []
    real = ex._write_shard

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(ex, "_write_shard", flaky)
    before = tree_hashes(llama_src)
    with pytest.raises(OSError, match="disk full"):
        export_pruned(llama_src, tmp_path / "out", {"attn": [1]})
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert tree_hashes(llama_src) == before


def test_source_unchanged_and_overwrite_rules(llama_src, tmp_path):
    before = tree_hashes(llama_src)
    out = tmp_path / "out"
    export_pruned(llama_src, out, {"attn": [1, 2]})
    assert tree_hashes(llama_src) == before
    with pytest.raises(OutputError, match="holds an earlier pruned model; pass overwrite=True"):
        export_pruned(llama_src, out, {"layer": [1]})
    s = export_pruned(llama_src, out, {"layer": [1]}, overwrite=True)
    assert s.stock_loadable and not (out / "modeling_entrodrop_pruned.py").exists()
    assert _leftovers(tmp_path) == []
    with pytest.raises(ExportError, match="made for a model with 30 layers"):
        export_pruned(
            llama_src, tmp_path / "o2", {"model": {"num_layers": 30}, "drop": {"layer": [1]}}
        )
    with pytest.raises(ExportError, match="out of range"):
        export_pruned(llama_src, tmp_path / "o2", {"attn": [9]})
    with pytest.raises(ExportError, match="must not be the source"):
        export_pruned(llama_src, llama_src / "inner", {"attn": [1]})
    assert not (tmp_path / "o2").exists()
    assert tree_hashes(llama_src) == before


def test_single_file_checkpoint_and_bytes_identical(tmp_path):
    from safetensors import safe_open

    m = tiny_model("qwen2", "mixed")
    m.save_pretrained(tmp_path / "src")
    assert (tmp_path / "src" / "model.safetensors").is_file()
    export_pruned(tmp_path / "src", tmp_path / "out", {"layer": [0]})
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    with (
        safe_open(tmp_path / "src" / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "out" / "model.safetensors", "pt") as b,
    ):
        assert torch.equal(
            a.get_tensor("model.layers.3.mlp.up_proj.weight"),
            b.get_tensor("model.layers.2.mlp.up_proj.weight"),
        )
        assert "model.layers.3.mlp.up_proj.weight" not in b.keys()
        assert b.metadata() == a.metadata()


# ------------------------------------------------------------------ the real model

SMOL_ATTN = {"attn": [12, 21, 22, 23, 24, 25, 26, 28]}  # 8 attention sub-blocks (0-based)
SMOL_LAYER = {"layer": [12, 14, 27, 28]}  # 4 whole layers


@pytest.fixture(scope="module")
def smol():
    from entrodrop_fast.models.loading import ModelLoadError, ensure_builtin, load_model

    try:
        src = ensure_builtin()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    lm = load_model(str(src))
    ids = lm.tokenizer(
        "The entropy of a hidden state tells how much", return_tensors="pt"
    ).input_ids
    return src, lm.model, ids


@pytest.mark.model
@pytest.mark.parametrize("plan", [SMOL_ATTN, SMOL_LAYER], ids=["attn8", "layer4"])
def test_smollm2_export_reload_generate(smol, plan, tmp_path):
    from transformers import AutoModelForCausalLM

    src, base, ids = smol
    out = tmp_path / ("attn8" if "attn" in plan else "layer4")
    s = export_pruned(src, out, plan)
    mem = copy.deepcopy(base)
    drop_blocks_(mem, plan)
    ref = logits(mem, ids)
    if "layer" in plan:
        assert s.stock_loadable and s.layers_after == 26
        loaders = [lambda: AutoModelForCausalLM.from_pretrained(out)]
    else:
        assert (
            not s.stock_loadable
            and s.kv_bytes_per_token_after == s.kv_bytes_per_token_before * 22 // 30
        )
        loaders = [
            lambda: load_pruned(out),
            lambda: AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True),
        ]
    assert s.params_after < s.params_before and s.bytes_after < s.bytes_before
    expected = mem.generate(ids, max_new_tokens=4, do_sample=False)
    del mem
    for load in loaders:
        model = load()
        err = max_err(logits(model, ids), ref)
        assert err <= 1e-5, f"exported vs in-memory pruned: max |diff| {err:.3e}"
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)  # greedy, with the KV cache
        assert torch.equal(gen, expected)
        del model


def test_prune_cli_with_plan_and_report(llama_src, tmp_path, capsys):
    from entrodrop_fast.cli import main

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"drop": {"attn": [1], "layer": [2]}}))
    out = tmp_path / "pruned"
    assert main(["prune", str(llama_src), "--plan", str(plan), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in (
        "blocks dropped",
        "parameters:",
        "checkpoint bytes:",
        "KV cache bytes/token:",
        "512 -> 256",
        "load_pruned",
    ):
        assert needle in text, needle
    assert json.loads((out / "entrodrop_plan.json").read_text())["drop"]["layer"] == [2]
    assert (
        max_err(
            logits(load_pruned(out)),
            manual_reference_logits(tiny_model("llama", "mixed"), {"attn": [1], "layer": [2]}, IDS),
        )
        <= 1e-5
    )
    assert main(["prune", str(llama_src), "--plan", str(plan), "--out", str(out)]) == 1  # exists
    assert "holds an earlier pruned model; pass --overwrite" in capsys.readouterr().err
    assert main(["prune", str(llama_src), "--out", str(tmp_path / "x")]) == 1
    assert "--plan" in capsys.readouterr().err


@pytest.mark.model
def test_prune_cli_one_step_profiles_first(smol, tmp_path, capsys):
    from entrodrop_fast.cli import main

    out = tmp_path / "one_step"
    rc = main(
        [
            "prune",
            "--kind",
            "attn",
            "--drop",
            "2",
            "--samples",
            "2",
            "--seq-len",
            "32",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    plan = json.loads((out / "entrodrop_plan.json").read_text())
    assert len(plan["drop"]["attn"]) == 2 and plan["method"] == "bucket"
    assert "KV cache bytes/token:  46,080 -> 43,008" in capsys.readouterr().out


def test_prune_a_pruned_checkpoint_again(llama_src, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    export_pruned(llama_src, first, {"attn": [1], "mlp": [3]})
    export_pruned(first, second, {"layer": [0]})  # indices of the first export's layers
    cfg = json.loads((second / "config.json").read_text())
    rec = cfg["entrodrop_pruned"]
    assert (
        rec["kept_layers"] == [1, 2, 3] and rec["dropped_attn"] == [0] and rec["dropped_mlp"] == [2]
    )
    assert (
        cfg["architectures"] == ["EntrodropPrunedLlamaForCausalLM"]
        and rec["base_architecture"] == "LlamaForCausalLM"
    )
    ref = manual_reference_logits(
        tiny_model("llama", "mixed"), {"attn": [1], "mlp": [3], "layer": [0]}, IDS
    )
    assert max_err(logits(load_pruned(second)), ref) <= 1e-5
    in_memory = load_pruned(first)
    drop_blocks_(in_memory, {"layer": [0]})
    assert max_err(logits(in_memory), ref) <= 1e-5


def test_save_pretrained_of_in_memory_pruned_model_loads_back(tmp_path):
    m = tiny_model("qwen2", "mixed")
    drop_blocks_(m, {"attn": [2], "mlp": [0], "layer": [3]})
    m.save_pretrained(tmp_path / "saved")
    assert max_err(logits(load_pruned(tmp_path / "saved")), logits(m)) <= 1e-5
