"""Findings of a new user: each expected failure ends in one line (exit 1, no traceback) that
says what is wrong, and is found before the model loads where it can be."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_clean_error, run_cli, tiny_model, word_tokenizer


def _model_dir(root, name="tiny", n_words=97, tokenizer=True, max_pos=256):
    """A tiny random Llama (vocab 97, ``max_pos`` positions) with a word-level tokenizer of
    ``n_words``."""
    d = root / name
    m = tiny_model("llama", seed=6)
    m.config.max_position_embeddings = max_pos
    m.save_pretrained(d)
    if tokenizer:
        word_tokenizer(n_words).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("findings")


@pytest.fixture(scope="module")
def tiny(root):
    return _model_dir(root)


@pytest.fixture(scope="module")
def short(root):
    return _model_dir(root, "short", max_pos=64)


@pytest.fixture(scope="module")
def corpus(root):
    g = torch.Generator().manual_seed(0)
    f = root / "corpus.txt"
    f.write_text(" ".join(f"w{int(i)}" for i in torch.randint(1, 97, (900,), generator=g)))
    return f


# --------------------------------------------------------- 18: tokenizer larger than the vocabulary


@pytest.fixture(scope="module")
def big_tok(root):
    return _model_dir(root, "bigtok", n_words=300)


@pytest.mark.parametrize("extra", [[], ["--streaming"]])
def test_profile_refuses_tokenizer_larger_than_vocab(big_tok, corpus, tmp_path, capsys, extra):
    rc, _, err = run_cli(
        capsys,
        "profile",
        big_tok,
        "--corpus",
        corpus,
        "--samples",
        "2",
        "--seq-len",
        "16",
        "--out",
        tmp_path / "r",
        "-q",
        *extra,
    )
    assert_clean_error(rc, err, "profile", "the tokenizer has 300 tokens", "embedding has 97 rows")
    assert not (tmp_path / "r").exists()


def test_eval_refuses_tokenizer_larger_than_vocab(big_tok, corpus, capsys):
    rc, _, err = run_cli(
        capsys, "eval", big_tok, "--corpus", corpus, "--seq-len", "16", "--no-speed"
    )
    assert_clean_error(rc, err, "eval", "the tokenizer has 300 tokens", "embedding has 97 rows")


def test_token_ids_checked_before_the_first_forward(tiny):
    from entrodrop_fast.models.loading import check_token_ids
    from entrodrop_fast.profile.inmemory import ProfileSettings, profile

    ids = torch.randint(0, 97, (2, 8))
    check_token_ids(ids, 97)  # in range: nothing raised
    ids[1, 3] = 500
    with pytest.raises(
        ValueError, match="token id 500, outside the model's vocabulary of 97 \\(0 .. 96\\)"
    ):
        check_token_ids(ids, 97)
    with pytest.raises(ValueError, match="token id 500"):
        profile(tiny_model("llama"), ids, ProfileSettings(), progress=False)


# --------------------------------------------------------------- 15: --seq-len beyond the positions


def test_profile_refuses_seq_len_beyond_positions(short, corpus, tmp_path, capsys):
    rc, _, err = run_cli(
        capsys,
        "profile",
        short,
        "--corpus",
        corpus,
        "--samples",
        "2",
        "--seq-len",
        "65",
        "--out",
        tmp_path / "r",
        "-q",
    )
    assert_clean_error(rc, err, "profile", "--seq-len is 65 tokens", "64 positions")


def test_eval_refuses_seq_len_and_items_beyond_positions(short, corpus, capsys):
    rc, _, err = run_cli(
        capsys, "eval", short, "--corpus", corpus, "--seq-len", "100", "--no-speed"
    )
    assert_clean_error(rc, err, "eval", "--seq-len is 100 tokens", "64 positions")
    rc, _, err = run_cli(capsys, "eval", short, "--corpus", corpus, "--seq-len", "32", "--no-speed")
    assert_clean_error(rc, err, "eval", "zero-shot last_word item", "193 tokens", "64 positions")


def test_position_needs_name_the_speed_test():
    from entrodrop_fast._names import spelled
    from entrodrop_fast.evaluate.pipeline import position_needs
    from entrodrop_fast.models.loading import check_positions

    needs = position_needs(32, speed=True)
    assert needs[0] == (32, "seq_len") and needs[1][0] == 64 and needs[-1][0] == 160
    assert "speed=False" in needs[-1][1]
    with spelled({"seq_len": "--seq-len", "no_speed": "--no-speed"}):  # as in `entrodrop eval`
        flags = position_needs(32, speed=True)
    assert flags[0] == (32, "--seq-len") and "--no-speed" in flags[-1][1]
    with pytest.raises(
        ValueError, match="the speed test .* is 160 tokens, beyond the 150 positions"
    ):
        check_positions({"max_position_embeddings": 150}, needs[-1:], "m")
    check_positions(
        {"text_config": {"max_position_embeddings": 4096}}, needs, "m"
    )  # nested: fits, nothing raised
    with pytest.raises(ValueError, match="beyond the 100 positions"):
        check_positions({"text_config": {"max_position_embeddings": 100}}, needs, "m")


# ---------------------------------------------------------------- 16: --max-memory 0


@pytest.mark.parametrize("value", ["0", "0GB", "0.0"])
def test_max_memory_must_be_positive(tiny, corpus, tmp_path, capsys, value):
    rc, _, err = run_cli(
        capsys,
        "profile",
        tiny,
        "--corpus",
        corpus,
        "--max-memory",
        value,
        "--out",
        tmp_path / "r",
        "-q",
    )
    assert_clean_error(rc, err, "profile", "--max-memory must be a positive size", repr(value))


# ---------------------------------------------------------------- 22: no tokenizer files


def test_model_dir_without_tokenizer_files(root, corpus, tmp_path, capsys):
    d = _model_dir(root, "notok", tokenizer=False)
    for extra in ([], ["--streaming"]):
        rc, _, err = run_cli(
            capsys,
            "profile",
            d,
            "--corpus",
            corpus,
            "--samples",
            "2",
            "--seq-len",
            "16",
            "--out",
            tmp_path / "r",
            "-q",
            *extra,
        )
        last = assert_clean_error(
            rc,
            err,
            "profile",
            f"no tokenizer files in {d}",
            "tokenizer.json",
            "copy the model's tokenizer there",
        )
        assert "sentencepiece" not in err and "tiktoken" not in err and last.count("\n") == 0


# ---------------------------------------------------------------- 29: checks before the model loads


def _no_load(monkeypatch):
    import entrodrop_fast.models as M

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(M, "load_model", boom)


def test_profile_checks_before_loading(tiny, corpus, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    out = tmp_path / "r"
    rc, _, err = run_cli(
        capsys, "profile", tiny, "--corpus", tmp_path / "nope.txt", "--out", out, "-q"
    )
    assert_clean_error(rc, err, "profile", "corpus not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    rc, _, err = run_cli(capsys, "profile", tiny, "--corpus", bad, "--out", out, "-q")
    assert_clean_error(rc, err, "profile", f"{bad}:2: not valid JSON")
    rc, _, err = run_cli(
        capsys,
        "profile",
        tiny,
        "--corpus",
        corpus,
        "--method",
        "knn",
        "--k",
        "25",
        "--seq-len",
        "20",
        "--out",
        out,
        "-q",
    )
    assert_clean_error(
        rc, err, "profile", "knn needs more tokens per sample than k", "--seq-len 20 <= --k 25"
    )
    if not torch.cuda.is_available():
        rc, _, err = run_cli(
            capsys, "profile", tiny, "--corpus", corpus, "--device", "cuda", "--out", out, "-q"
        )
        assert_clean_error(rc, err, "profile", "CUDA is not available")
        if os.environ.get("TRITON_INTERPRET") != "1":  # the tests run Triton interpreted on the CPU
            rc, _, err = run_cli(
                capsys,
                "profile",
                tiny,
                "--corpus",
                corpus,
                "--backend",
                "triton",
                "--out",
                out,
                "-q",
            )
            assert_clean_error(rc, err, "profile", "--backend triton", "not available")
    monkeypatch.setenv("ENTRODROP_BACKEND", "bogus")
    rc, _, err = run_cli(capsys, "profile", tiny, "--corpus", corpus, "--out", out, "-q")
    assert_clean_error(rc, err, "profile", "ENTRODROP_BACKEND=bogus", "unknown backend 'bogus'")
    assert not out.exists()


# ---------------------------------------------------------------- 19: symlink loops


@pytest.fixture
def loop(tmp_path):
    a, b = tmp_path / "loopA", tmp_path / "loopB"
    os.symlink(b, a)
    os.symlink(a, b)
    return a


def test_symlink_loop_model_is_not_a_hub_id(loop, corpus, tmp_path, capsys):
    from entrodrop_fast.models.loading import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="no such model file or directory"):
        load_model(str(loop))
    rc, _, err = run_cli(capsys, "eval", loop, "--corpus", corpus, "--no-speed")
    assert_clean_error(rc, err, "eval", f"no such model file or directory: {loop}")


def test_symlink_loop_runtime_error_is_expected(loop):
    from entrodrop_fast.cli import error_message, is_expected

    with pytest.raises(RuntimeError) as info:
        loop.resolve(strict=False)
    assert is_expected(info.value)
    assert error_message(info.value).startswith(f"symbolic link loop at {loop}")
    assert not is_expected(RuntimeError("something else"))


def test_report_json_roundtrip_sanity(tiny, corpus, tmp_path, capsys):
    """The checks leave a good run alone: a profile of the tiny model still succeeds."""
    rc, _, err = run_cli(
        capsys,
        "profile",
        tiny,
        "--corpus",
        corpus,
        "--samples",
        "2",
        "--seq-len",
        "16",
        "--out",
        tmp_path / "r",
        "-q",
    )
    assert rc == 0, err
    assert json.loads((tmp_path / "r" / "report.json").read_text())["settings"]["seq_len"] == 16


# ---------------------------------------------------------------- 9 / 35 / 36: corpora


def test_json_corpora(tmp_path):
    from entrodrop_fast.data import CorpusError, load_corpus

    lines = tmp_path / "corpus.json"  # JSON Lines named .json
    lines.write_text('{"body": "one doc"}\n{"body": "two doc"}\n')
    assert load_corpus(str(lines), "body").documents == ["one doc", "two doc"]
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"body": "first"}, {"body": "second"}]))
    c = load_corpus(str(array), "body")
    assert c.documents == ["first", "second"] and c.meta["json_layout"] == "array"
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["alpha text", "beta text"]))
    assert load_corpus(str(strings)).documents == ["alpha text", "beta text"]
    with pytest.raises(CorpusError, match="item 1 of the array: no field 'text'"):
        load_corpus(str(array))
    tok = tmp_path / "tokenizer.json"
    tok.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    with pytest.raises(
        CorpusError,
        match=f"corpus file {tok} holds a JSON object with keys \\['model', 'version'\\], not a "
        "list of documents",
    ):
        load_corpus(str(tok))
    junk = tmp_path / "junk.json"
    junk.write_text("this is { not json\n")
    with pytest.raises(
        CorpusError, match=f"corpus file {junk} is neither a JSON array of documents nor JSON Lines"
    ):
        load_corpus(str(junk))


def test_text_field_with_a_text_corpus_is_an_error(tmp_path, tiny, capsys):
    from entrodrop_fast.data import CorpusError, load_corpus

    txt = tmp_path / "a.txt"
    txt.write_text("some text " * 50)
    with pytest.raises(CorpusError, match="text_field body applies to .jsonl / .json corpora"):
        load_corpus(str(txt), "body")
    assert load_corpus(str(txt)).documents  # the default field is no request
    rc, _, err = run_cli(
        capsys,
        "profile",
        tiny,
        "--corpus",
        txt,
        "--text-field",
        "body",
        "--out",
        tmp_path / "r",
        "-q",
    )
    assert_clean_error(rc, err, "profile", "--text-field body applies to", "drop --text-field")


def test_txt_suffix_in_any_case_and_jsonl_bom(tmp_path):
    from entrodrop_fast.data import load_corpus

    d = tmp_path / "docs"
    d.mkdir()
    (d / "A.TXT").write_text("upper case suffix")
    (d / "b.txt").write_text("lower case suffix")
    (d / "c.md").write_text("not a text corpus file")
    assert load_corpus(str(d)).documents == ["upper case suffix", "lower case suffix"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "after a BOM"}\n{"text": "second"}\n')
    assert load_corpus(str(bom)).documents == ["after a BOM", "second"]


# ---------------------------------------------------------------- 21: bench device and shapes


def test_bench_device_and_unallocatable_shape(capsys):
    if not torch.cuda.is_available():
        rc, _, err = run_cli(capsys, "bench", "--device", "cuda", "--repeat", "1")
        assert_clean_error(rc, err, "bench", "device 'cuda' requested but CUDA is not available")
    rc, _, err = run_cli(
        capsys, "bench", "--shapes", "1000000x1000000", "--dtypes", "fp32", "--repeat", "1"
    )
    assert_clean_error(
        rc,
        err,
        "bench",
        "shape 1000000x1000000 in float32 needs 3725.3 GiB (4000000000000 bytes)",
        "use smaller --shapes",
    )


# ----------------------------------------------------------- 33: info lists the devices usable here


def test_info_lists_cuda_only_with_a_gpu(capsys, monkeypatch):
    from entrodrop_fast.commands import info as I

    fake = {
        "cpp": {"available": True, "devices": ["cpu", "cuda"], "reason": ""},
        "torch": {"available": True, "devices": ["cpu", "cuda"], "reason": ""},
    }
    real = I.collect

    def collect():
        monkeypatch.setattr(
            "entrodrop_fast.ops.api.backends", lambda: {k: dict(v) for k, v in fake.items()}
        )
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return real()

    monkeypatch.setattr(I, "collect", collect)
    rc, out, _ = run_cli(capsys, "info")
    assert rc == 0
    rows = [ln for ln in out.splitlines() if ln.startswith("  cpp") or ln.startswith("  torch")]
    assert len(rows) == 2 and all(
        "devices cpu (built with CUDA kernels; no GPU visible)" in r for r in rows
    ), out


# ---------------------------------------------------------------- 28: the cache path


def test_cache_path_that_is_a_file(tmp_path, capsys, monkeypatch):
    from entrodrop_fast.models.loading import ModelLoadError, ensure_builtin

    f = tmp_path / "afile"
    f.write_text("not a directory")
    monkeypatch.setenv("ENTRODROP_CACHE", str(f))
    with pytest.raises(
        ModelLoadError, match=f"the model cache {f} \\(from ENTRODROP_CACHE\\) is not a directory"
    ):
        ensure_builtin()
    with pytest.raises(ModelLoadError, match=f"\\({f} is a file\\)"):
        ensure_builtin(f / "sub")
    rc, _, err = run_cli(capsys, "profile", "--out", tmp_path / "r", "-q")
    assert_clean_error(
        rc,
        err,
        "profile",
        f"the model cache {f} (from ENTRODROP_CACHE) is not a directory",
        "move the file away",
    )


def test_cache_dir_tilde_is_expanded(tmp_path, monkeypatch):
    import argparse

    from entrodrop_fast import cli

    monkeypatch.setenv("HOME", str(tmp_path))
    seen = {}

    def fake_parser():
        p = argparse.ArgumentParser()
        sub = p.add_subparsers(dest="command")
        q = sub.add_parser("x")
        q.add_argument("--cache-dir")
        q.set_defaults(func=lambda a: seen.setdefault("cache_dir", a.cache_dir) and 0)
        return p

    monkeypatch.setattr(cli, "build_parser", fake_parser)
    assert cli.main(["x", "--cache-dir", "~/x"]) == 0
    assert seen["cache_dir"] == str(tmp_path / "x")


# --------------------------------------------------------------- 32: activation dirs of killed runs


def test_stale_activation_dirs_are_swept(tmp_path):
    import subprocess
    import sys

    from entrodrop_fast.profile.layerwise import ACT_DIR_PREFIX, sweep_stale_activation_dirs

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / f"{ACT_DIR_PREFIX}{dead}-abc123"
    stale.mkdir()
    (stale / "act_a.bin").write_bytes(b"\0" * 64)
    foreign = (
        tmp_path / f"{ACT_DIR_PREFIX}{dead}-xyz789"
    )  # same pattern, someone else's file inside
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    live = tmp_path / f"{ACT_DIR_PREFIX}{os.getppid()}-live01"  # a running process
    live.mkdir()
    (live / "act_b.bin").write_bytes(b"\0")
    other = tmp_path / "entrodrop-other-1"
    other.mkdir()
    assert sweep_stale_activation_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and foreign.exists() and live.exists() and other.exists()


# ---------------------------------------------------------------- 24: entropy messages


def test_entropy_nan_policy_and_knn_message(tmp_path, capsys):
    import numpy as np

    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    x[3, 1] = np.inf
    f = tmp_path / "x.npy"
    np.save(f, x)
    rc, _, err = run_cli(capsys, "entropy", f, "--method", "gaussian_diag")
    assert_clean_error(rc, err, "entropy", "gaussian_diag: ", "pass --nan-policy omit")
    rc, out, err = run_cli(
        capsys, "entropy", f, "--method", "gaussian_diag", "--nan-policy", "omit", "--json"
    )
    assert rc == 0, err
    assert isinstance(json.loads(out)["results"][0]["entropy"], float)
    two = tmp_path / "two.npy"
    np.save(two, x[:2] * 0 + 1)
    rc, _, err = run_cli(capsys, "entropy", two, "--method", "knn")
    assert_clean_error(rc, err, "entropy", "knn (k=25): ", "needs at least 26 valid tokens")


@pytest.mark.parametrize("name", ["gemma3_270m", "gemma3", "smollm-135m"])
def test_near_miss_of_a_builtin_name_suggests_it(tmp_path, capsys, name):
    """A misspelt built-in name is not sent to the (unreachable) hub: the message suggests the
    name."""
    from entrodrop_fast.cli import main

    assert main(["profile", name, "--out", str(tmp_path / "r"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "did you mean" in err and "hub" not in err.lower() and "Traceback" not in err, err
