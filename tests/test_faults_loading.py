"""Checkpoints that are not what their config says, pruned checkpoints and broken models.

One loader (``entrodrop_fast.models.load_model``) serves every command: it refuses an
architecture the adapters do not know before building anything, loads a directory written
by ``entrodrop prune`` with attention / MLP drops as the pruned model, and treats missing,
unexpected and mismatched tensors as errors naming the tensor and the file. The exporter runs
the same check before it writes anything; evaluation refuses non-finite logits.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_model, word_tokenizer
from safetensors.torch import load_file, save_file

from entrodrop_fast.cli import main
from entrodrop_fast.commands.eval import load_any
from entrodrop_fast.evaluate import heldout as E
from entrodrop_fast.models import ModelLoadError, load_model
from entrodrop_fast.profile.inmemory import ProfileSettings, profile
from entrodrop_fast.prune.export import ExportError, export_pruned, load_pruned
from entrodrop_fast.prune.surgery import drop_blocks_

INDEX = "model.safetensors.index.json"
IDS = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(5))


def add_tokenizer(d: Path) -> Path:
    word_tokenizer(eos_token="w2").save_pretrained(d)
    return d


def save_dir(model, d: Path, shard: str | None = "40KB") -> Path:
    if shard:
        model.save_pretrained(d, max_shard_size=shard)
    else:
        model.save_pretrained(d)
    return add_tokenizer(d)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(d: Path, mutate) -> None:
    """Rewrite the checkpoint in ``d`` after ``mutate(tensors, file_of)`` changed the dicts in place
    (new tensors go to the file named in ``file_of``, default the first shard); the index
    follows."""
    index = d / INDEX
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    tensors, file_of = {}, {}
    for f in files:
        for k, v in load_file(str(d / f)).items():
            tensors[k], file_of[k] = v, f
    mutate(tensors, file_of)
    for f in files:
        save_file(
            {k: v.contiguous() for k, v in tensors.items() if file_of.get(k, files[0]) == f},
            str(d / f),
            metadata={"format": "pt"},
        )
    if index.is_file():
        meta = json.loads(index.read_text())
        meta["weight_map"] = {k: file_of.get(k, files[0]) for k in sorted(tensors)}
        index.write_text(json.dumps(meta))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(the model, its sharded directory with a tokenizer)."""
    m = tiny_model("llama", "mixed", seed=1)
    return m, save_dir(m, tmp_path_factory.mktemp("llama") / "src")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ a healthy checkpoint


def test_healthy_checkpoint_loads_exactly(llama):
    model, d = llama
    lm = load_model(str(d))
    assert torch.equal(logits(lm.model), logits(model))
    m2, _ = load_any(str(d), "fp32", "cpu")
    assert torch.equal(logits(m2), logits(model))


def test_tied_head_may_be_absent(tmp_path):
    model = tiny_model(
        "gemma2", "mixed", seed=2
    )  # tie_word_embeddings: lm_head.weight is not stored
    d = save_dir(model, tmp_path / "g")
    names = set(json.loads((d / INDEX).read_text())["weight_map"])
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    lm = load_model(str(d))
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(lm.model), logits(model))


def test_untied_head_missing_is_refused(llama, tmp_path):
    _, src = llama
    d = copy_dir(src, tmp_path / "nohead")
    rewrite_tensors(d, lambda t, f: t.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match=r"tensor lm_head\.weight .*missing"):
        load_model(str(d))


# ---------------------------------------------------------------- missing / unexpected / mismatched


def test_missing_tensor_is_refused_by_every_command(llama, tmp_path, capsys):
    _, src = llama
    d = copy_dir(src, tmp_path / "missing")
    name = "model.layers.2.self_attn.k_proj.weight"
    rewrite_tensors(d, lambda t, f: t.pop(name))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(d))
    msg = str(err.value)
    assert name in msg and "missing" in msg and str(d) in msg
    assert "random weights" in msg and "re-download or re-export" in msg
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_any(str(d), "fp32", "cpu")
    # profile does not report on it, prune writes nothing
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{i % 90 + 3}" for i in range(400)))
    rc = main(
        [
            "profile",
            str(d),
            "--corpus",
            str(corpus),
            "--samples",
            "2",
            "--seq-len",
            "16",
            "--out",
            str(tmp_path / "rep"),
            "--no-plot",
            "-q",
        ]
    )
    err_text = capsys.readouterr().err
    assert rc == 1 and "entrodrop profile: error:" in err_text and name in err_text
    assert not (tmp_path / "rep" / "report.json").exists()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"attn": [1]}))
    rc = main(["prune", str(d), "--plan", str(plan), "--out", str(tmp_path / "pruned")])
    err_text = capsys.readouterr().err
    assert rc == 1 and "entrodrop prune: error:" in err_text and name in err_text
    assert not (tmp_path / "pruned").exists() and _leftovers(tmp_path) == []


def test_unexpected_tensor_is_refused_with_its_file(llama, tmp_path):
    _, src = llama
    d = copy_dir(src, tmp_path / "extra")
    name = "model.layers.1.mlp.extra_proj.weight"
    files = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))

    def add(t, f):
        t[name] = torch.zeros(4, 32)
        f[name] = files[-1]

    rewrite_tensors(d, add)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(d))
    msg = str(err.value)
    assert name in msg and "unexpected" in msg and files[-1] in msg
    with pytest.raises(ExportError, match=name.replace(".", r"\.")):
        export_pruned(d, tmp_path / "out", {"attn": [1]})
    assert not (tmp_path / "out").exists()


def test_leftovers_transformers_ignores_are_accepted(llama, tmp_path):
    """Old Llama checkpoints store a rotary ``inv_freq`` buffer per layer; transformers drops it
    on load."""
    model, src = llama
    d = copy_dir(src, tmp_path / "old")
    rewrite_tensors(
        d,
        lambda t, f: t.update(
            {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(4)}
        ),
    )
    assert torch.equal(logits(load_model(str(d)).model), logits(model))
    assert export_pruned(d, tmp_path / "out", {"attn": [1]}).layers_after == 4


def test_config_sizes_that_disagree_with_the_weights(llama, tmp_path):
    _, src = llama
    d = copy_dir(src, tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48  # the weights have 64
    (d / "config.json").write_text(json.dumps(cfg))
    index = json.loads((d / INDEX).read_text())["weight_map"]
    with pytest.raises(ModelLoadError) as err:
        load_model(str(d))
    msg = str(err.value)
    name = "model.layers.0.mlp.gate_proj.weight"
    assert f"{index[name]}: tensor {name} has shape [64, 32], the config implies [48, 32]" in msg
    # the exporter refuses it before writing anything (it would export a checkpoint that cannot
    # load)
    with pytest.raises(ExportError) as err:
        export_pruned(d, tmp_path / "out", {"layer": [1]})
    msg = str(err.value)
    assert (
        name in msg and index[name] in msg and "[48, 32]" in msg and "nothing was exported" in msg
    )
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_export_refuses_a_missing_tensor(llama, tmp_path):
    _, src = llama
    d = copy_dir(src, tmp_path / "src")
    name = "model.layers.3.post_attention_layernorm.weight"
    rewrite_tensors(d, lambda t, f: t.pop(name))
    with pytest.raises(ExportError, match=rf"{name.replace('.', '[.]')} .*missing"):
        export_pruned(d, tmp_path / "out", {"attn": [1]})
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_pytorch_bin_checkpoint_is_checked_by_the_loading_report(tmp_path):
    """No safetensors headers to check up front: transformers' loading report is refused instead."""
    model = tiny_model("llama", "mixed", seed=6)
    d = tmp_path / "bin"
    model.config.save_pretrained(d)
    add_tokenizer(d)
    sd = model.state_dict()
    name = "model.layers.1.mlp.up_proj.weight"
    sd.pop(name)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(
        ModelLoadError,
        match=rf"{name.replace('.', '[.]')} is in no file of the checkpoint \(missing\)",
    ):
        load_model(str(d))
    sd[name] = torch.zeros(65, 32)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(
        ModelLoadError,
        match=rf"{name.replace('.', '[.]')} has shape \[65, 32\], the config implies \[64, 32\]",
    ):
        load_model(str(d))


# ------------------------------------------------------------------ MoE: per-expert checkpoints


def test_moe_per_expert_checkpoint_is_checked_through_the_renaming(tmp_path):
    model = tiny_model("mixtral", "mixed", seed=3)
    src = save_dir(model, tmp_path / "moe", shard=None)
    names = load_file(str(src / "model.safetensors")).keys()
    assert any(
        ".block_sparse_moe.experts.0.w1." in n for n in names
    )  # stored per expert, fused on load
    lm = load_model(str(src))
    assert torch.equal(logits(lm.model), logits(model))
    export_pruned(src, tmp_path / "ok", {"mlp": [1]})  # a consistent per-expert checkpoint exports

    d = copy_dir(src, tmp_path / "moe_missing")
    gone = "model.layers.2.block_sparse_moe.experts.3.w1.weight"
    rewrite_tensors(d, lambda t, f: t.pop(gone))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(d))
    msg = str(err.value)
    assert (
        "model.layers.2.block_sparse_moe.experts." in msg
        and "model.layers.2.mlp.experts.gate_up_proj" in msg
    )
    assert "model.safetensors" in msg
    with pytest.raises(ExportError, match=r"model\.layers\.2\.mlp\.experts\.gate_up_proj"):
        export_pruned(d, tmp_path / "out", {"attn": [1]})
    assert not (tmp_path / "out").exists()

    d = copy_dir(src, tmp_path / "moe_experts")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_local_experts"] = 5  # the checkpoint holds 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ModelLoadError,
        match=r"gate_up_proj of shape \[4, 128, 32\], the config implies \[5, 128, 32\]",
    ):
        load_model(str(d))


# ----------------------------------------------- a pruned checkpoint is never loaded as a dense one


@pytest.fixture(scope="module")
def pruned(llama, tmp_path_factory):
    model, src = llama
    plan = {"attn": [1, 2], "mlp": [0]}
    out = tmp_path_factory.mktemp("pruned") / "out"
    export_pruned(src, out, plan)
    mem = copy.deepcopy(model)
    drop_blocks_(mem, plan)
    return mem, out, plan


def test_every_command_loads_a_pruned_directory_as_pruned(pruned):
    mem, out, _ = pruned
    lm = load_model(str(out))
    assert type(lm.model).__name__ == "EntrodropPrunedLlamaForCausalLM"
    assert torch.equal(logits(lm.model), logits(mem))
    assert torch.equal(logits(lm.model), logits(load_pruned(out)))
    m2, _ = load_any(str(out), "fp32", "cpu")  # eval
    assert type(m2).__name__ == "EntrodropPrunedLlamaForCausalLM"


def test_profile_of_a_pruned_directory_gives_zero_for_dropped_blocks(pruned):
    _, out, plan = pruned
    lm = load_model(str(out))
    windows = torch.randint(3, 97, (3, 20), generator=torch.Generator().manual_seed(0))
    res = profile(
        lm.model, windows, ProfileSettings(methods=("bucket",), batch_size=3), progress=False
    )
    attn = res["delta"]["bucket"]["attn"]["mean"]
    mlp = res["delta"]["bucket"]["mlp"]["mean"]
    assert [attn[i] for i in plan["attn"]] == [0.0, 0.0]
    assert mlp[0] == 0.0
    assert attn[0] != 0.0 and attn[3] != 0.0 and mlp[1] != 0.0


def test_pruned_directory_missing_a_kept_tensor_is_refused(pruned, tmp_path):
    _, out, _ = pruned
    d = copy_dir(out, tmp_path / "p")
    name = "model.layers.3.self_attn.q_proj.weight"  # layer 3's attention was kept
    rewrite_tensors(d, lambda t, f: t.pop(name))
    with pytest.raises(ModelLoadError, match=rf"{name.replace('.', '[.]')} .*missing"):
        load_model(str(d))
    with pytest.raises(ExportError, match=name.replace(".", "[.]")):
        export_pruned(d, tmp_path / "again", {"layer": [0]})


def test_stock_loading_of_an_attention_pruned_directory(pruned):
    """What README.md says: stock ``from_pretrained`` without ``trust_remote_code`` builds the dense
    class, with random weights in place of the removed ones, and fails on its first forward with a
    KV cache; ``trust_remote_code=True`` loads the pruned model."""
    from transformers import AutoModelForCausalLM

    mem, out, _ = pruned
    dense = AutoModelForCausalLM.from_pretrained(out)
    assert type(dense).__name__ == "LlamaForCausalLM" and hasattr(
        dense.model.layers[1].self_attn, "q_proj"
    )
    with pytest.raises(NotImplementedError):
        dense(IDS, use_cache=True)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(logits(remote), logits(mem))


# --------------------------------------------------------- unsupported architecture, broken weights


def test_unsupported_architecture_is_refused_before_anything_is_built(
    tmp_path, monkeypatch, capsys
):
    import transformers
    from transformers import AutoConfig

    d = tmp_path / "bert"
    AutoConfig.for_model(
        "bert",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=97,
    ).save_pretrained(d)
    add_tokenizer(d)

    def built(*a, **k):
        raise AssertionError("a model was built for an unsupported architecture")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", built)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", built)
    with pytest.raises(ModelLoadError, match=r"unsupported model_type 'bert'.*llama"):
        load_model(str(d))
    with pytest.raises(ModelLoadError, match=r"unsupported model_type 'bert'"):
        load_any(str(d), "fp32", "cpu")
    rc = main(["eval", str(d), "--no-speed"])
    err = capsys.readouterr().err
    assert rc == 1 and "entrodrop eval: error:" in err and "unsupported model_type 'bert'" in err


def _corpus(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    words = [
        "alpha",
        "bravo",
        "charlie",
        "delta",
    ]  # the last_word task needs words (unknown to the tokenizer: w0)
    docs = [
        " ".join(
            f"w{int(i)} {words[j % 4]}"
            for j, i in enumerate(torch.randint(3, 97, (120,), generator=g))
        )
        for _ in range(10)
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


def test_eval_refuses_nan_weights(tmp_path, capsys):
    model = tiny_model("llama", "mixed", seed=4)
    model.config.max_position_embeddings = 256  # the built-in zero-shot items are up to 193 tokens
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    d = save_dir(model, tmp_path / "nan", shard=None)
    rc = main(
        [
            "eval",
            str(d),
            "--corpus",
            str(_corpus(tmp_path)),
            "--seq-len",
            "16",
            "--windows",
            "2",
            "--items",
            "4",
            "--no-speed",
        ]
    )
    err = capsys.readouterr()
    assert rc == 1 and "perplexity nan" not in err.out
    assert "entrodrop eval: error:" in err.err and "non-finite" in err.err and str(d) in err.err
    assert "weights are probably broken" in err.err


def test_evaluation_functions_refuse_non_finite_logits():
    model = tiny_model("llama", "mixed", seed=5, vocab_size=300)
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("inf")  # only windows holding token 7 break

    class Tok:
        eos_token_id = 2

        def __call__(self, texts, add_special_tokens=False):
            one = lambda t: [int(w[1:]) for w in t.split()]  # noqa: E731
            return {"input_ids": one(texts) if isinstance(texts, str) else [one(t) for t in texts]}

    docs = [" ".join(f"w{10 + (i * 5 + j) % 80}" for j in range(120)) for i in range(6)]
    assert not any(" w7 " in f" {d} " for d in docs)
    assert (
        E.perplexity(model, Tok(), docs, seq_len=16, max_windows=2)["perplexity"] > 0
    )  # clean text: fine
    docs = [d + " w7" for d in docs]
    with pytest.raises(
        ValueError,
        match=r"model LlamaForCausalLM produced \d+ non-finite .* perplexity; its weights are "
        r"probably broken",
    ):
        E.perplexity(model, Tok(), docs, seq_len=16, max_windows=64)
    with pytest.raises(ValueError, match="non-finite .* zero-shot"):
        E.zero_shot(model, Tok(), [" ".join(["w7"] * 300)] * 6, items=4)
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    with pytest.raises(ValueError, match="non-finite .* speed"):
        E.speed(model, Tok(), prompt_len=8, new_tokens=2, repeats=1)


@pytest.mark.parametrize("streaming", [False, True])
def test_unknown_model_type_lists_the_supported_ones(tmp_path, capsys, streaming):
    """A model_type transformers does not know: the message lists what entrodrop supports
    instead of transformers' advice to upgrade it."""
    from entrodrop_fast.cli import main

    d = tmp_path / "unknown"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "foobar_lm", "hidden_size": 8}')
    assert (
        main(
            [
                "profile",
                str(d),
                "--out",
                str(tmp_path / "rep"),
                "-q",
                *(["--streaming"] if streaming else []),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "unsupported model_type 'foobar_lm'; supported: gemma2" in err and "llama" in err
    assert "upgrade" not in err and "Traceback" not in err and not (tmp_path / "rep").exists()


def test_a_mistyped_local_path_fails_at_once_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    """'smol-atn8' (for smol-attn8) waited ~26 s on the hub client's retries before failing."""
    from entrodrop_fast.models import loading

    (tmp_path / "smol-attn8").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(
        loading.ModelLoadError, match=r"cannot be reached from here\); did you mean 'smol-attn8'\?"
    ):
        loading.load_model("smol-atn8")
    with pytest.raises(loading.ModelLoadError, match="cannot be reached"):
        loading.resolve_source("org/not-here")


def test_the_hub_check_trusts_a_proxy_and_offline_mode(monkeypatch):
    from entrodrop_fast.models import loading

    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens: refused at once
    assert loading._hub_reachable(timeout=1.0) is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # maybe the only way out
    assert loading._hub_reachable(timeout=1.0) is True
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # transformers answers from its cache at once
    assert loading._hub_reachable(timeout=1.0) is True
