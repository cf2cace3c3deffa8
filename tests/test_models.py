"""Adapters (tiny random models of every supported type) and model loading."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TINY, tiny_model, word_tokenizer

from entrodrop_fast.models import (
    ARCHS,
    ModelLoadError,
    get_adapter,
    load_model,
    parse_device,
    parse_dtype,
    supported_model_types,
)


def test_table_covers_required_types():
    for t in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "phi3",
        "gemma2",
        "mixtral",
        "gpt_neox",
        "olmo2",
    ):
        assert t in ARCHS
    assert set(TINY) - {"gpt_neox_seq"} == set(supported_model_types())


@pytest.mark.parametrize("name", sorted(TINY))
def test_adapter_accessors(name):
    model = tiny_model(name)
    ad = get_adapter(model)
    layers = ad.layers(model)
    assert len(layers) == ad.num_layers(model) == 3
    assert isinstance(ad.embed(model), torch.nn.Embedding)
    assert ad.final_norm(model) is not None and ad.lm_head(model) is not None
    layer = layers[0]
    assert ad.attn(layer) is not None and ad.mlp(layer) is not None
    assert ad.attn_out(layer) is not None and ad.mlp_out(layer) is not None
    for kind in ("attn", "mlp"):
        for n in ad.block_module_names(kind):
            assert hasattr(layer, n), (name, n)
        ad.norms(layer, kind)
    expected = {
        "gemma2": "sandwich",
        "gemma3_text": "sandwich",
        "olmo2": "post_norm",
        "gpt_neox": "parallel",
        "phi": "parallel",
    }
    assert ad.residual == expected.get(name, "pre_norm")
    assert (ad.mid(layer) is None) == (ad.residual == "parallel")
    pts = ad.points(3)
    assert pts[0] == "r0" and pts[-1] == "r3" and len(set(pts)) == len(pts)
    for kind in ("attn", "mlp", "layer"):
        for li in range(3):
            x, y = ad.block_points(kind, li)
            assert x in pts and y in pts and pts.index(x) < pts.index(y)


def test_moe_mlp_is_whole_sparse_block():
    model = tiny_model("mixtral")
    ad = get_adapter(model)
    assert ad.arch.moe and type(ad.mlp(ad.layers(model)[0])).__name__ == "MixtralSparseMoeBlock"


def test_unknown_model_type_names_supported():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama.*mistral"):
        get_adapter(cfg)


def test_parse_dtype_device():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="bf16, fp16, fp32"):
        parse_dtype("int8")
    assert parse_device("cpu").type == "cpu"
    with pytest.raises(ValueError):
        parse_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            parse_device("cuda:1")


def test_load_local_dir_roundtrip(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), dtype="bf16")
    assert lm.kind == "dir" and lm.model.dtype == torch.bfloat16
    sd = model.state_dict()
    for n, p in lm.model.state_dict().items():
        assert torch.equal(p, sd[n].to(torch.bfloat16)), n


def test_load_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="no such model file or directory"):
        load_model(str(tmp_path / "nothing" / "here" / "x"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(tmp_path / "w.bin"))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError, match="could not read GGUF"):
        load_model(str(tmp_path / "bad.gguf"))
    # the hub is unreachable here; offline mode makes the real from_pretrained fail at once
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="Hugging Face hub"):
        load_model("entrodrop-test-org/no-such-model")


@pytest.mark.model
def test_builtin_model_converts_once_and_reloads(tmp_path):
    from entrodrop_fast.models.loading import ensure_builtin

    cache = os.environ.get("ENTRODROP_CACHE")
    lm = load_model(cache_dir=cache)
    assert lm.kind == "builtin" and lm.model.config.model_type == "llama"
    assert get_adapter(lm.model).num_layers(lm.model) == 30
    path = ensure_builtin(cache)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0])
