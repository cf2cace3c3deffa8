"""Streaming mixture-of-experts checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE), stored per expert
(as published: ``experts.N.w1/w2/w3`` or ``experts.N.gate_proj/up_proj/down_proj``) and fused
(``experts.gate_up_proj`` / ``experts.down_proj``, the tensors transformers builds at load).

The per-expert layout is written here by hand from the model's fused tensors (not by
transformers), so the streamed report equalling the in-memory one checks that the runner
fuses the experts exactly as the model holds them: order of the experts (12 of them: expert
10 after expert 9), gate before up, and the router and shared expert kept.
"""

import json
import os
import re

import pytest
import torch
from helpers import STREAM_SETTINGS, assert_identical, char_tokenizer, stream_windows, tiny_model

from entrodrop_fast.profile.inmemory import profile
from entrodrop_fast.profile.layerwise import (
    Checkpoint,
    CheckpointError,
    WeightPlan,
    build_skeleton,
    natural_key,
    profile_streaming,
)

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
REPORT = ("samples", "points", "num_layers", "entropy", "delta", "cosine", "angular")


def assert_same_report(a, b, what="streamed"):
    """The statistics of ``b`` equal those of ``a`` bit for bit (runner, timings and sizes
    aside)."""
    assert_identical({k: a[k] for k in REPORT}, {k: b[k] for k in REPORT}, what)


def per_expert_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors with every fused expert tensor split per expert, named as in the
    published checkpoints of its family (Mixtral: ``block_sparse_moe.experts.N.w1/w3/w2`` and
    ``block_sparse_moe.gate``; Qwen-MoE: ``mlp.experts.N.gate_proj/up_proj/down_proj``)."""
    mixtral = model.config.model_type == "mixtral"
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if mixtral:
            name = re.sub(r"\.mlp\.", ".block_sparse_moe.", name)
        m = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)", name)
        if m is None:
            out[name] = t
            continue
        base, which = m.groups()
        gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for e in range(t.shape[0]):
            if which == "gate_up_proj":  # [E, 2 I, D]: the gate's rows first, then up's
                inter = t.shape[1] // 2
                out[f"{base}.{e}.{gate}.weight"] = t[e, :inter].clone()
                out[f"{base}.{e}.{up}.weight"] = t[e, inter:].clone()
            else:  # [E, D, I]
                out[f"{base}.{e}.{down}.weight"] = t[e].clone()
    return out


def write_checkpoint(model, path, layout: str, shard_bytes: int = 12_000) -> str:
    """``model`` saved in ``layout`` ("per_expert" or "fused") as safetensors shards of about
    ``shard_bytes`` (a layer's experts spread over several files), with index, config and a
    byte-level tokenizer (no download)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = (
        per_expert_state(model)
        if layout == "per_expert"
        else {k: v.detach().clone() for k, v in model.state_dict().items()}
    )
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    model.config.save_pretrained(path)
    weight_map, shard, size, total = {}, {}, 0, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for name in sorted(tensors, key=natural_key):
        shard[name] = tensors[name].contiguous()
        size += tensors[name].numel() * tensors[name].element_size()
        total += tensors[name].numel() * tensors[name].element_size()
        if size >= shard_bytes:
            flush()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    char_tokenizer().save_pretrained(path)
    return str(path)


def _layout_keys(path) -> list[str]:
    return list(json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"])


def moe_model(name, layers=3, **extra):
    """A tiny random MoE of type ``name``; ``extra`` overrides its config (e.g. more experts)."""
    if not extra:
        return tiny_model(name, layers=layers)
    return tiny_model(name, seed=1, layers=layers, **extra)


@pytest.fixture(scope="module")
def models():
    return {name: moe_model(name) for name in MOE}


@pytest.fixture(scope="module")
def in_memory(models):
    w = stream_windows()
    return {name: profile(m, w, STREAM_SETTINGS, progress=False) for name, m in models.items()}


# ------------------------------------------------------------------ the layouts


def test_per_expert_layout_is_what_transformers_writes(tmp_path):
    """The hand-written per-expert layout has exactly the names and tensors of save_pretrained's
    (transformers 5 fuses the experts in memory and writes them back per expert, as published;
    transformers 4 keeps them per expert throughout)."""
    from safetensors.torch import load_file

    for name in MOE:
        model = tiny_model(name, layers=2)
        model.save_pretrained(tmp_path / name)
        saved = load_file(tmp_path / name / "model.safetensors")
        mine = per_expert_state(model)
        if model.config.tie_word_embeddings:
            mine.pop("lm_head.weight", None)
        assert sorted(mine) == sorted(saved), name
        for k in mine:
            torch.testing.assert_close(saved[k], mine[k], rtol=0, atol=0)
        assert any(re.search(r"\.experts\.3\.(w1|gate_proj)\.weight$", k) for k in mine), name
        assert not any(k.endswith("gate_up_proj") for k in mine), name


# ------------------------------------------------------------------ streamed == in memory


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("name", MOE)
def test_streamed_equals_in_memory(name, layout, models, in_memory, tmp_path):
    d = write_checkpoint(models[name], tmp_path / "ckpt", layout)
    keys = _layout_keys(d)
    assert any(".experts.0." in k for k in keys) == (layout == "per_expert")
    assert (
        len(
            set(
                json.load(open(os.path.join(d, "model.safetensors.index.json")))[
                    "weight_map"
                ].values()
            )
        )
        > 3
    )
    assert_same_report(
        in_memory[name], profile_streaming(d, stream_windows(), STREAM_SETTINGS, progress=False)
    )


@pytest.mark.parametrize("name", MOE)
def test_streamed_equals_transformers_load_of_the_same_directory(name, models, tmp_path):
    """The in-memory profile of the directory as transformers loads it (its own fusing) is the
    streamed one."""
    from entrodrop_fast.models import load_model

    d = write_checkpoint(models[name], tmp_path / "ckpt", "per_expert")
    loaded = load_model(d).model
    w = stream_windows()
    assert_same_report(
        profile(loaded, w, STREAM_SETTINGS, progress=False),
        profile_streaming(d, w, STREAM_SETTINGS, progress=False),
    )


def test_twelve_experts_stay_in_order(tmp_path):
    """Experts 10 and 11 are stacked after 9, as transformers does (names sort as numbers)."""
    model = moe_model("mixtral", layers=2, num_local_experts=12, num_experts_per_tok=3)
    d = write_checkpoint(model, tmp_path / "ckpt", "per_expert")
    plan = WeightPlan(build_skeleton(d, torch.float32), Checkpoint(d))
    w1 = [
        k
        for k in plan.sources(["model.layers.1.mlp.experts.gate_up_proj"])
        if k.endswith(".w1.weight")
    ]
    assert [int(k.split(".")[-3]) for k in w1] == list(range(12))
    fused = plan.load(
        ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"],
        torch.float32,
    )
    torch.testing.assert_close(
        fused["model.layers.1.mlp.experts.gate_up_proj"],
        model.model.layers[1].mlp.experts.gate_up_proj,
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        fused["model.layers.1.mlp.experts.down_proj"],
        model.model.layers[1].mlp.experts.down_proj,
        rtol=0,
        atol=0,
    )
    w = stream_windows()
    assert_same_report(
        profile(model, w, STREAM_SETTINGS, progress=False),
        profile_streaming(d, w, STREAM_SETTINGS, progress=False),
    )


def test_dense_and_sparse_layers_mixed(tmp_path):
    """Qwen2-MoE with a dense MLP in layer 0 (mlp_only_layers) and sparse blocks after."""
    model = moe_model("qwen2_moe", mlp_only_layers=[0])
    assert type(model.model.layers[0].mlp).__name__ == "Qwen2MoeMLP"
    d = write_checkpoint(model, tmp_path / "ckpt", "per_expert")
    w = stream_windows()
    assert_same_report(
        profile(model, w, STREAM_SETTINGS, progress=False),
        profile_streaming(d, w, STREAM_SETTINGS, progress=False),
    )


def test_bf16_per_expert(tmp_path):
    """A bf16 run of an fp32 per-expert checkpoint: each expert is cast before fusing, as
    transformers does."""
    from entrodrop_fast.models import load_model

    d = write_checkpoint(tiny_model("qwen3_moe"), tmp_path / "ckpt", "per_expert")
    w = stream_windows()
    loaded = load_model(d, dtype="bf16").model
    assert_same_report(
        profile(loaded, w, STREAM_SETTINGS, progress=False),
        profile_streaming(d, w, STREAM_SETTINGS, dtype=torch.bfloat16, progress=False),
    )


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("name", MOE)
def test_resume_mid_run(name, layout, tmp_path):
    model = tiny_model(name, layers=4)
    d = write_checkpoint(model, tmp_path / "ckpt", layout)
    w = stream_windows()
    whole = profile_streaming(d, w, STREAM_SETTINGS, progress=False)
    resume = tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt):
        profile_streaming(
            d,
            w,
            STREAM_SETTINGS,
            resume_dir=str(resume),
            ram_budget_bytes=0,
            progress=False,
            _stop_after_layer=2,
        )
    assert torch.load(resume / "state.pt", weights_only=True)["layers_done"] == 2
    resumed = profile_streaming(d, w, STREAM_SETTINGS, resume_dir=str(resume), progress=False)
    assert_identical(whole, resumed, "resumed")
    assert_same_report(profile(model, w, STREAM_SETTINGS, progress=False), resumed, "resumed")


# ------------------------------------------------------------------ faults


def _drop(d, key):
    """Remove tensor ``key`` from its shard and from the index."""
    from safetensors.torch import load_file, save_file

    idx = os.path.join(d, "model.safetensors.index.json")
    data = json.load(open(idx))
    path = os.path.join(d, data["weight_map"].pop(key))
    json.dump(data, open(idx, "w"))
    tensors = load_file(path)
    tensors.pop(key)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_expert_is_named_before_any_weight_is_read(tmp_path, monkeypatch):
    d = write_checkpoint(tiny_model("mixtral"), tmp_path / "ckpt", "per_expert")
    _drop(d, "model.layers.1.block_sparse_moe.experts.2.w3.weight")
    import entrodrop_fast.profile.layerwise as st

    monkeypatch.setattr(st.Checkpoint, "load", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(CheckpointError) as err:
        profile_streaming(d, stream_windows(), STREAM_SETTINGS, progress=False)
    msg = str(err.value)
    assert (
        "model.layers.1.block_sparse_moe.experts.0.w1.weight ... "
        "model.layers.1.block_sparse_moe.experts.3.w3.weight" in msg
    )
    assert "4 x .experts.*.w1.weight, 3 x .experts.*.w3.weight" in msg
    assert "do not combine into model.layers.1.mlp.experts.gate_up_proj" in msg
    assert "(layer 1)" in msg and "a tensor of one expert is missing" in msg


def test_missing_router_is_named(tmp_path):
    d = write_checkpoint(tiny_model("qwen2_moe"), tmp_path / "ckpt", "per_expert")
    _drop(d, "model.layers.2.mlp.shared_expert_gate.weight")
    with pytest.raises(
        CheckpointError,
        match=r"tensor model\.layers\.2\.mlp\.shared_expert_gate\.weight \(layer 2\) is not in the "
        r"checkpoint",
    ):
        profile_streaming(d, stream_windows(), STREAM_SETTINGS, progress=False)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_config_with_other_expert_count(tmp_path, layout):
    d = write_checkpoint(tiny_model("qwen3_moe"), tmp_path / "ckpt", layout)
    cfg = json.load(open(os.path.join(d, "config.json")))
    key = (
        "num_local_experts" if "num_local_experts" in cfg else "num_experts"
    )  # as saved: 4 experts
    assert cfg[key] == 4
    cfg[key] = 6
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="config and weights do not match") as err:
        profile_streaming(d, stream_windows(), STREAM_SETTINGS, progress=False)
    msg = str(err.value)
    assert (
        "model.layers.0.mlp.experts.gate_up_proj" in msg
        and "[4, 32, 32]" in msg
        and "the config expects [6, 32, 32]" in msg
    )
    if layout == "per_expert":
        assert (
            "the 8 tensors model.layers.0.mlp.experts.0.gate_proj.weight ... "
            "model.layers.0.mlp.experts.3.up_proj.weight" in msg
        )


# ------------------------------------------------------------------ --max-memory


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_memory_plan_counts_the_experts(tmp_path, layout):
    from entrodrop_fast.profile.pipeline import MemoryPlan

    model = tiny_model("mixtral")
    d = write_checkpoint(model, tmp_path / "ckpt", layout)
    plan = MemoryPlan(d, "bf16")
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 2
    experts = sum(p.numel() for p in model.model.layers[0].mlp.experts.parameters()) * 2
    assert experts > layer / 2 and plan.resident == layer
    assert plan.experts == experts
    cfg = model.config
    D, k, inter = cfg.hidden_size, cfg.num_experts_per_tok, cfg.intermediate_size
    assert plan.per_token == (D + k * (D + inter)) * 4 * 3
    # fusing a per-expert layer in RAM holds its largest fused tensor once more (gate_up: 2/3 of
    # the experts)
    assert plan.fuse_extra == (experts * 2 // 3 if layout == "per_expert" else 0)


@pytest.fixture
def moe_dir(tmp_path):
    return write_checkpoint(tiny_model("mixtral"), tmp_path / "mixtral", "per_expert")


def test_cli_max_memory_streams_a_per_expert_checkpoint(moe_dir, tmp_path, capsys):
    from entrodrop_fast.cli import main

    args = [moe_dir, "--samples", "5", "--seq-len", "16", "-m", "bucket,cosine", "-q", "--no-plot"]
    assert main(["profile", *args, "--out", str(tmp_path / "plain")]) == 0
    # the model (351 KB in fp32) does not fit 300 KB: it streams; one layer with its experts is
    # 109 KB, fusing its experts 64 KB more, a window of 16 tokens 42 KB: batches of 3
    assert (
        main(["profile", *args, "--out", str(tmp_path / "streamed"), "--max-memory", "300KB"]) == 0
    )
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    streamed = json.loads((tmp_path / "streamed" / "report.json").read_text())
    assert plain["model"]["kind"] == "dir" and streamed["model"]["kind"] == "streaming"
    assert streamed["settings"]["batch_size"] == 3
    numbers = lambda r: [[b["delta"]["bucket"]["mean"], b["cosine"]["mean"]] for b in r["blocks"]]  # noqa: E731
    torch.testing.assert_close(
        torch.tensor(numbers(streamed)), torch.tensor(numbers(plain)), rtol=1e-6, atol=1e-9
    )
    # a budget below one layer with its experts and their fusing is refused before profiling
    rc = main(["profile", *args, "--out", str(tmp_path / "small"), "--max-memory", "100KB"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--max-memory 100KB is too small" in err and "experts" in err
    assert not (tmp_path / "small").exists()
