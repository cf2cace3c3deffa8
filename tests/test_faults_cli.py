"""The CLI's failures: expected ones end in one line and exit 1 (argparse's usage errors: 2),
bugs keep their traceback; tensor files, numeric flags, corpora and the held-out split."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import assert_clean_error, char_llama_dir, run_cli
from safetensors.torch import save_file

from entrodrop_fast.cli import main
from entrodrop_fast.data import (
    Corpus,
    CorpusError,
    calibration_windows,
    describe_split,
    load_corpus,
    sample_windows,
    split_documents,
)
from entrodrop_fast.evaluate.heldout import heldout_documents

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar "
    "papa"
).split()


def prose(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n_words,), generator=g))


class CharTokenizer:
    """One token per character (tests only); the call signature of an HF tokenizer."""

    eos_token_id = None

    def __call__(self, docs, add_special_tokens=True):
        return {"input_ids": [[ord(c) % 97 for c in d] for d in docs]}


# ----------------------------------------------------------------- expected vs unexpected


def _raise_in_info(monkeypatch, exc: BaseException) -> None:
    import entrodrop_fast.commands.info as info

    def boom(args):
        raise exc

    monkeypatch.setattr(info, "run", boom)  # register() binds func=run when the parser is built


def _expected_cases():
    from safetensors import SafetensorError

    from entrodrop_fast.models.loading import ModelLoadError
    from entrodrop_fast.profile.layerwise import CheckpointError
    from entrodrop_fast.prune.export import ExportError

    return [
        (ValueError("--drop must be positive counts, got '0'"), ["--drop must be positive counts"]),
        (TypeError("x must be a torch tensor"), ["x must be a torch tensor"]),
        (CorpusError("corpus file a.txt is empty; give a file with text"), ["a.txt is empty"]),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/plan.json"),
            ["No such file or directory: /data/plan.json", "check the path"],
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/out/report.json"),
            ["No space left on device: /out/report.json", "disk is full", "write somewhere else"],
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/ro/report"),
            ["Read-only file system: /ro/report", "read-only: write somewhere else"],
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/root/x"),
            ["Permission denied: /root/x", "permissions"],
        ),
        (
            IsADirectoryError(
                errno.EISDIR, "Is a directory", "/tmp/.tmp-1.json", None, "/tmp/results"
            ),
            ["/tmp/.tmp-1.json -> /tmp/results", "give a file path"],
        ),
        (
            FileExistsError("/x exists and is not a report directory; choose another --out"),
            ["choose another --out"],
        ),
        (
            SafetensorError("Error while deserializing header: header too large"),
            ["SafetensorError: Error while deserializing header"],
        ),
        (
            json.JSONDecodeError("Expecting value", '{"a": ', 6),
            ["invalid JSON at line 1, column 7: Expecting value"],
        ),
        (
            UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
            ["can't decode byte 0xff"],
        ),
        (
            ModelLoadError("no such model file or directory: m"),
            ["no such model file or directory: m"],
        ),
        (
            ExportError("shard model.safetensors is truncated"),
            ["shard model.safetensors is truncated"],
        ),
        (
            CheckpointError("tensor model.norm.weight missing from model.safetensors"),
            ["model.norm.weight missing"],
        ),
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            ["out of memory: CUDA out of memory", "--batch-size"],
        ),
    ]


@pytest.mark.parametrize("case", range(16))
def test_expected_failures_end_in_one_error_line(monkeypatch, capsys, case):
    cases = _expected_cases()
    assert len(cases) == 16
    exc, needles = cases[case]
    _raise_in_info(monkeypatch, exc)
    rc, _, err = run_cli(capsys, "info")
    assert_clean_error(rc, err, "info", *needles)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "exc",
    [
        AssertionError("invariant"),
        KeyError("bucket"),
        IndexError("list index out of range"),
        RuntimeError("taps saw no tensor"),
        ZeroDivisionError("division by zero"),
        AttributeError("x"),
    ],
)
def test_bugs_keep_their_traceback(monkeypatch, capsys, exc):
    _raise_in_info(monkeypatch, exc)
    with pytest.raises(type(exc)):
        main(["info"])
    err = capsys.readouterr().err
    assert err.startswith(
        f"entrodrop info: internal error ({type(exc).__name__}), a bug in entrodrop_fast"
    )
    assert "please report it with the traceback" in err


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    _raise_in_info(monkeypatch, KeyboardInterrupt())
    assert main(["info"]) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.slow
def test_as_a_process_an_expected_failure_has_no_traceback_and_a_bug_has_one(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    p = subprocess.run(
        [sys.executable, "-m", "entrodrop_fast", "entropy", str(tmp_path / "empty.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "empty.npy is empty" in p.stderr
    bug = (
        "import entrodrop_fast.commands.info as i, sys\ndef run(a): raise "
        "KeyError('oops')\ni.run = run\nfrom entrodrop_fast.cli import "
        "main\nsys.exit(main(['info']))"
    )
    p = subprocess.run([sys.executable, "-c", bug], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" in p.stderr and "KeyError: 'oops'" in p.stderr
    assert "internal error (KeyError), a bug" in p.stderr


# ------------------------------------------------------------------ numeric flags (argparse)


@pytest.mark.parametrize(
    "argv, flag, want",
    [
        (["eval", "--seq-len", "1"], "--seq-len", "an integer >= 2"),
        (["eval", "--windows", "0"], "--windows", "a positive integer"),
        (["eval", "--items", "0"], "--items", "a positive integer"),
        (["eval", "--items", "ten"], "--items", "a positive integer, got 'ten'"),
        (["profile", "--batch-size", "0"], "--batch-size", "a positive integer"),
        (["profile", "--samples", "-3"], "--samples", "a positive integer"),
        (["profile", "--seq-len", "1"], "--seq-len", "an integer >= 2"),
        (["profile", "--bins", "0"], "--bins", "a positive integer"),
        (["profile", "--k", "0"], "--k", "a positive integer"),
        (["compare", "--eval-windows", "0"], "--eval-windows", "a positive integer"),
        (["compare", "--items", "0"], "--items", "a positive integer"),
        (["compare", "--seq-len", "0"], "--seq-len", "an integer >= 2"),
        (["entropy", "x.npy", "--bins", "0"], "--bins", "a positive integer"),
        (["entropy", "x.npy", "--k", "0"], "--k", "a positive integer"),
        (["prune", "--out", "o", "--batch-size", "0"], "--batch-size", "a positive integer"),
        (["prune", "--out", "o", "--seq-len", "1"], "--seq-len", "an integer >= 2"),
        (["bench", "--repeat", "0"], "--repeat", "a positive integer"),
    ],
)
def test_numeric_flags_are_checked_before_any_work(capsys, argv, flag, want):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2  # a usage error, as argparse reports them
    err = capsys.readouterr().err
    assert f"entrodrop {argv[0]}: error: argument {flag}: must be {want}" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------- entropy: tensor files


def _write_tensor(path, x):
    if path.suffix == ".npy":
        np.save(path, x.numpy())
    elif path.suffix == ".pt":
        torch.save(x, path)
    else:
        save_file({"h": x}, str(path))


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_entropy_empty_truncated_and_corrupt_files(tmp_path, capsys, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    rc, _, err = run_cli(capsys, "entropy", empty)
    assert_clean_error(rc, err, "entropy", f"{empty} is empty (0 bytes)")
    good = tmp_path / f"good{suffix}"
    _write_tensor(good, torch.randn(64, 8))
    data = good.read_bytes()
    trunc = tmp_path / f"trunc{suffix}"
    trunc.write_bytes(data[: len(data) // 2])
    rc, _, err = run_cli(capsys, "entropy", trunc)
    assert_clean_error(
        rc,
        err,
        "entropy",
        str(trunc),
        f"cannot read it as a {suffix} tensor file; it may be truncated or corrupt",
    )
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(bytes(range(256)) * 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = run_cli(capsys, "entropy", junk)
    assert_clean_error(rc, err, "entropy", str(junk), "truncated or corrupt")
    assert [str(w.message) for w in caught] == []  # torch warned before the clean error
    assert (
        run_cli(capsys, "entropy", good, "--backend", "torch")[0] == 0
    )  # the intact file still reads


def test_entropy_directory_non_tensor_and_key_on_npy(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "entropy", tmp_path)
    assert_clean_error(
        rc, err, "entropy", f"{tmp_path} is a directory; give a .npy, .pt or .safetensors file"
    )
    assert "no such file" not in err
    lst = tmp_path / "list.pt"
    torch.save({"h": [1.0, 2.0]}, lst)
    rc, _, err = run_cli(capsys, "entropy", lst)
    assert_clean_error(rc, err, "entropy", f"{lst}: 'h' holds a list, not a tensor")
    npy = tmp_path / "x.npy"
    np.save(npy, np.random.randn(16, 4).astype(np.float32))
    rc, _, err = run_cli(capsys, "entropy", npy, "--key", "h")
    assert_clean_error(rc, err, "entropy", "drop --key")


# ------------------------------------------------------------------------------ corpora


def test_empty_binary_and_undecodable_corpus_files_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(CorpusError, match=f"corpus file {empty} is empty"):
        load_corpus(str(empty))
    nul = tmp_path / "model.bin.txt"
    nul.write_bytes(b"abc\0\0\x01def" * 50)
    with pytest.raises(CorpusError, match=f"corpus file {nul} holds NUL bytes.*not UTF-8 text"):
        load_corpus(str(nul))
    junk = tmp_path / "random.txt"
    junk.write_bytes(bytes(b for b in range(128, 256)) * 20)  # no NUL, nothing decodes
    with pytest.raises(
        CorpusError,
        match=f"corpus file {junk} is not UTF-8 text: .* cannot be decoded; give a UTF-8 text file",
    ):
        load_corpus(str(junk))
    jl = tmp_path / "bin.jsonl"
    jl.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(CorpusError, match="bin.jsonl holds NUL bytes"):
        load_corpus(str(jl))


def test_a_few_undecodable_bytes_are_replaced_with_a_warning(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(("caf\xe9 " + prose(400)).encode("latin-1"))
    with pytest.warns(UserWarning, match="1 bytes that are not UTF-8 were replaced"):
        c = load_corpus(str(f))
    assert c.documents[0].startswith("caf\ufffd ")
    clean = tmp_path / "clean.txt"
    clean.write_text(prose(50))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_corpus(str(clean)).documents == [prose(50)]


def test_corpora_without_text(tmp_path):
    jl = tmp_path / "blank.jsonl"
    jl.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(
        CorpusError, match="has no text \\(2 documents, all empty\\); give a corpus with text"
    ):
        load_corpus(str(jl))
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.txt").write_text("")
    with pytest.raises(CorpusError, match="has no text"):
        load_corpus(str(d))
    (d / "b.txt").write_bytes(b"\0" * 10)
    with pytest.raises(
        CorpusError, match="b.txt holds NUL bytes"
    ):  # the file, not just the directory
        load_corpus(str(d))
    (d / "b.txt").write_text("words here")
    assert load_corpus(str(d)).documents == ["", "words here"]  # an empty file among others is kept


def test_too_small_for_the_windows_says_what_there_is_and_what_to_do():
    with pytest.raises(
        CorpusError,
        match="no document is longer than 256 tokens \\(2 documents, longest 100 tokens\\); use a "
        "smaller seq_len or more text",
    ):
        sample_windows([[1] * 100, [2] * 30], samples=4, seq_len=256)
    with pytest.raises(
        CorpusError,
        match="hold only 3 distinct windows, fewer than the 10 samples requested; lower samples "
        "or seq_len, or give more text",
    ):
        sample_windows([[1] * 12], samples=10, seq_len=10)
    one = Corpus("one.txt", [prose(20)])
    with pytest.raises(
        CorpusError,
        match="one.txt \\(calibration part: the last 1/5 of each of 1 document held out for "
        "evaluation\\): corpus too small",
    ):
        calibration_windows(CharTokenizer(), one, samples=4, seq_len=500)


# ----------------------------------------------------------------------- the held-out split


def test_fewer_than_5_documents_hold_out_the_tail_of_each():
    text = prose(1000)
    calib, held = split_documents([text])
    assert len(calib) == len(held) == 1
    assert calib[0] + held[0] == text  # nothing lost, nothing shared
    assert held[0][0] == " " and not calib[0].endswith(
        " "
    )  # cut at a whitespace, not inside a word
    assert 0.19 < len(held[0]) / len(text) < 0.21
    assert split_documents([text]) == (calib, held)  # deterministic
    three = [prose(300, s) for s in range(3)]
    calib3, held3 = split_documents(three)
    assert [c + h for c, h in zip(calib3, held3, strict=True)] == three
    five = [prose(30, s) for s in range(5)]
    assert split_documents(five) == (five[:4], five[4:])  # 5 or more: every 5th document, as before
    assert describe_split(1) == "the last 1/5 of each of 1 document"
    assert describe_split(12) == "every 5th of 12 documents"
    assert split_documents(["", "   "]) == ([], [])


def test_calibration_of_one_document_leaves_its_tail_out():
    text = "a" * 800 + " " + "Z" * 200
    tok = CharTokenizer()
    w, info = calibration_windows(tok, Corpus("one", [text]), samples=40, seq_len=32)
    assert not (w == ord("Z") % 97).any()  # no window reaches the held-out tail
    assert (
        info["heldout"] == "the last 1/5 of each of 1 document"
        and info["heldout_documents_excluded"] == 0
    )
    w_all, info_all = calibration_windows(
        tok, Corpus("one", [text]), samples=40, seq_len=32, exclude_heldout=False
    )
    assert info_all["heldout"] is None and w_all.shape == (40, 32)


def test_heldout_text_checked_before_any_model_runs():
    tok = CharTokenizer()
    held = heldout_documents(Corpus("long.txt", [prose(2000)]), tok, seq_len=64)
    assert len(held) == 1 and len(held[0]) > 1000
    with pytest.raises(
        CorpusError,
        match="the held-out text of corpus short.txt \\(the last 1/5 of each of 1 document\\) has "
        "\\d+ tokens in 1 piece\\(s\\), fewer than one perplexity window of 256; give more text",
    ):
        heldout_documents(Corpus("short.txt", [prose(100)]), tok, seq_len=256)
    with pytest.raises(
        CorpusError,
        match="gives 2 passage\\(s\\) of 64 tokens; the continuation task needs at least 4",
    ):
        heldout_documents(
            Corpus("c", ["x" * 200, "y" * 800]), tok, seq_len=16
        )  # held out: 40 + 160 characters
    with pytest.raises(
        CorpusError, match="no passage longer than 300 characters followed by a word"
    ):
        heldout_documents(
            Corpus("digits", [" ".join("12345" for _ in range(1000))]), tok, seq_len=16
        )
    assert heldout_documents(
        Corpus("digits", [" ".join("12345" for _ in range(1000))]), tok, seq_len=16, zero_shot=False
    )


# ---------------------------------------------------------------- commands on a tiny model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a character tokenizer saved beside it (no download)."""
    # eval's zero-shot items run up to 193 tokens
    return char_llama_dir(
        tmp_path_factory.mktemp("tiny_llama"), layers=6, max_position_embeddings=256
    )


@pytest.fixture
def long_txt(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text(prose(1200))  # one document: fewer than 5
    return f


def test_eval_on_one_long_txt_holds_out_its_tail(tiny_dir, long_txt, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc, text, err = run_cli(
        capsys,
        "eval",
        tiny_dir,
        "--corpus",
        long_txt,
        "--seq-len",
        "32",
        "--windows",
        "2",
        "--items",
        "3",
        "--no-speed",
        "--json",
        out,
    )
    assert rc == 0, err
    assert "perplexity" in text and "held-out tokens (2 windows of 32)" in text
    res = json.loads(out.read_text())
    assert res["heldout"] == "the last 1/5 of each of 1 document" and res["heldout_documents"] == 1
    assert res["perplexity"]["windows"] == 2 and [z["items"] for z in res["zero_shot"]] == [3, 3]


def test_eval_corpus_faults(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(prose(40))
    rc, _, err = run_cli(
        capsys, "eval", tiny_dir, "--corpus", short, "--seq-len", "256", "--no-speed"
    )
    assert_clean_error(
        rc,
        err,
        "eval",
        "held-out text of corpus",
        "short.txt",
        "fewer than one perplexity window of 256",
        "give more text",
    )
    for name, data, needle in (
        ("empty.txt", b"", "is empty"),
        ("blob.txt", b"\x7fELF\0\0\0" * 64, "holds NUL bytes"),
    ):
        f = tmp_path / name
        f.write_bytes(data)
        rc, _, err = run_cli(capsys, "eval", tmp_path / "no-such-model", "--corpus", f)
        assert_clean_error(
            rc, err, "eval", f"corpus file {f} {needle}"
        )  # the corpus is read before the model


def test_eval_json_naming_a_directory_is_an_error(tiny_dir, long_txt, tmp_path, capsys):
    d = tmp_path / "results"
    d.mkdir()
    rc, _, err = run_cli(
        capsys,
        "eval",
        tiny_dir,
        "--corpus",
        long_txt,
        "--seq-len",
        "32",
        "--windows",
        "1",
        "--items",
        "2",
        "--no-speed",
        "--json",
        d,
    )
    assert_clean_error(rc, err, "eval", str(d))


def test_compare_random_alone_on_one_long_txt(tiny_dir, long_txt, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc, text, err = run_cli(
        capsys,
        "compare",
        tiny_dir,
        "--calib",
        long_txt,
        "--methods",
        "random",
        "--kind",
        "attn",
        "--drop",
        "1",
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--eval-windows",
        "1",
        "--items",
        "2",
        "--no-speed",
        "--out",
        out,
        "-q",
    )
    assert rc == 0, err
    comp = json.loads((out / "comparison.json").read_text())
    assert [(r["method"], r["k"], r["seed"]) for r in comp["rows"]] == [
        ("random", 1, s) for s in range(3)
    ]  # --random-seeds 3 (default)
    assert comp["report"]["settings"]["methods"] == ["bucket"]  # profiled for the protected layers


def test_compare_argument_and_corpus_faults(tiny_dir, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "compare", tiny_dir, "--methods", "random,bogus")
    assert_clean_error(rc, err, "compare", "--methods: unknown 'bogus'; choose from bucket")
    rc, _, err = run_cli(capsys, "compare", tiny_dir, "--methods", " , ")
    assert_clean_error(rc, err, "compare", "--methods is empty; choose from")
    rc, _, err = run_cli(
        capsys, "compare", tiny_dir, "--methods", "random", "--calib", "a.txt", "--calib", "b.txt"
    )
    assert_clean_error(rc, err, "compare", "random have none; add one to --methods")
    # angular (spans) has no per-block ranking either (a user's test: it was accepted, and the
    # second corpus profiled for nothing); an empty --calib names no corpus
    for methods, calib in (("angular", "b.txt"), ("angular,random", "b.txt"), ("bucket", "")):
        rc, _, err = run_cli(
            capsys, "compare", tiny_dir, "--methods", methods, "--calib", "a.txt", "--calib", calib
        )
        want = "names no corpus" if not calib else "have none; add one to --methods"
        assert_clean_error(rc, err, "compare", want)
    # the same corpus twice (a fresh user's test: Spearman 1.000 everywhere, no word said),
    # by name, by the default's name, or by two spellings of one file
    same_file = tmp_path / "same.txt"
    same_file.write_text(prose(100))
    for a, b in (
        ("builtin", "builtin"),
        ("stdlib-docs", "stdlib-docs"),
        (str(same_file), str(tmp_path / "." / "same.txt")),
    ):
        rc, _, err = run_cli(capsys, "compare", tiny_dir, "--calib", a, "--calib", b)
        assert_clean_error(rc, err, "compare", "names the same corpus twice")
    short = tmp_path / "short.txt"
    short.write_text(prose(100))
    rc, _, err = run_cli(
        capsys,
        "compare",
        tiny_dir,
        "--calib",
        short,
        "--methods",
        "bucket",
        "--drop",
        "1",
        "--samples",
        "2",
        "--seq-len",
        "128",
        "--no-speed",
        "--out",
        tmp_path / "c",
        "-q",
    )
    assert_clean_error(rc, err, "compare", "short.txt", "fewer than one perplexity window of 128")
    assert not (tmp_path / "c").exists()


def test_profile_resume_dir_implies_streaming(tiny_dir, long_txt, tmp_path, capsys):
    resume = tmp_path / "resume"
    rc, _, err = run_cli(
        capsys,
        "profile",
        tiny_dir,
        "--corpus",
        long_txt,
        "--samples",
        "3",
        "--seq-len",
        "16",
        "--resume-dir",
        resume,
        "--out",
        tmp_path / "rep",
        "--no-plot",
    )
    assert rc == 0, err
    assert "--resume-dir implies --streaming" in err
    assert (
        json.loads((tmp_path / "rep" / "report.json").read_text())["model"]["kind"] == "streaming"
    )
    assert any(resume.iterdir())  # the states were kept


def test_profile_binary_corpus_names_the_file(tiny_dir, tmp_path, capsys):
    f = tmp_path / "weights.txt"
    f.write_bytes(torch.randn(1000).numpy().tobytes())
    rc, _, err = run_cli(
        capsys,
        "profile",
        tiny_dir,
        "--corpus",
        f,
        "--samples",
        "2",
        "--seq-len",
        "16",
        "--out",
        tmp_path / "r",
        "-q",
    )
    assert_clean_error(rc, err, "profile", str(f), "text file")


def test_truncated_report_names_the_file(tmp_path, capsys):
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "report.json").write_text('{"format": "entrodrop-report/1", "blocks": [')
    rc, _, err = run_cli(
        capsys, "rank", rep, "--kind", "attn", "--drop", "1", "--out", tmp_path / "plan.json"
    )
    assert_clean_error(
        rc, err, "rank", str(rep / "report.json"), "not valid JSON", "run entrodrop profile again"
    )
    (rep / "report.json").write_text("[1, 2]")
    rc, _, err = run_cli(
        capsys, "rank", rep, "--kind", "attn", "--drop", "1", "--out", tmp_path / "plan.json"
    )
    assert_clean_error(rc, err, "rank", "holds a JSON list, not a report")


def test_compare_two_corpora_with_the_paper_preset(tiny_dir, long_txt, tmp_path, capsys):
    # the whole comparison through the library's compare_model: two calibration corpora give
    # the calibration agreement; the preset resolves from the model's config
    other = tmp_path / "other.txt"
    other.write_text(prose(1200, seed=7))
    out = tmp_path / "cmp2"
    argv = ["compare", tiny_dir, "--calib", long_txt, "--calib", other, "--preset", "paper"]
    argv += ["--methods", "knn,random", "--random-seeds", "1", "--kind", "attn", "--drop", "1"]
    argv += ["--samples", "4", "--seq-len", "32", "--eval-windows", "1", "--items", "2"]
    rc, _, err = run_cli(capsys, *argv, "--no-speed", "--out", out, "-q")
    assert rc == 0, err
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["protocol"]["preset"] == "paper"
    assert comp["calibration"] == {"a": str(long_txt), "b": str(other)}
    agreement = comp["calibration_agreement"]
    assert [(a["kind"], a["method"]) for a in agreement] == [("attn", "knn")]
    assert agreement[0]["droppable"] >= 1 and "spearman_droppable" in agreement[0]
    assert "droppable blocks" in (out / "comparison.md").read_text()
    assert comp["calibration_report"]["blocks"]  # the second corpus's profile is kept


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_an_empty_json_path_is_refused_not_ignored(command, tiny_dir, capsys):
    """--json '' was taken as "no JSON" by eval and bench (profile, rank and prune refuse an
    empty --out): the user asked for a file and silently got none."""
    args = (
        ["eval", tiny_dir, "--no-speed", "--json", ""]
        if command == "eval"
        else ["bench", "--estimators", "moments", "--shapes", "8x16", "--json", ""]
    )
    rc, _, err = run_cli(capsys, *args)
    assert_clean_error(rc, err, command, "--json is empty: give a path")


def test_an_unknown_device_is_named_as_the_device_not_the_backend(tiny_dir, tmp_path, capsys):
    rc, _, err = run_cli(
        capsys, "profile", tiny_dir, "--device", "gpu", "--out", str(tmp_path / "r"), "-q"
    )
    msg = assert_clean_error(rc, err, "profile", "--device gpu: device must be cpu, cuda")
    assert "--backend" not in msg and not (tmp_path / "r").exists()


def test_the_packages_warnings_read_like_its_errors(tiny_dir, tmp_path):
    """prune with a plan made from another path (same config) warned as Python does,
    ``.../export.py:380: UserWarning: ...`` and a line of our source."""
    from pathlib import Path

    from entrodrop_fast.prune.surgery import model_identity

    ident = model_identity(json.loads((Path(tiny_dir) / "config.json").read_text()))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"drop": {"attn": [1]}, "model": {**ident, "path": "/elsewhere"}}))
    # as a process: pytest records warnings in-process, and recorded warnings are left alone
    p = subprocess.run(
        [sys.executable, "-m", "entrodrop_fast", "prune", str(tiny_dir), "--plan", str(plan)]
        + ["--out", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "entrodrop prune: warning: the plan was made from the model at /elsewhere" in p.stderr
    assert "UserWarning" not in p.stderr and ".py:" not in p.stderr


def test_a_report_given_as_the_plan_and_a_plan_as_the_report_say_which_is_which(
    tiny_dir, tmp_path, capsys
):
    report = tmp_path / "rep"
    args = ["profile", str(tiny_dir), "--samples", "2", "--seq-len", "16", "--out", str(report)]
    assert main([*args, "-q", "--no-plot"]) == 0
    plan = tmp_path / "plan.json"
    assert main(["rank", str(report), "--kind", "attn", "--drop", "1", "--out", str(plan)]) == 0
    capsys.readouterr()
    rc, _, err = run_cli(
        capsys, "prune", tiny_dir, "--plan", report / "report.json", "--out", tmp_path / "p"
    )
    assert_clean_error(rc, err, "prune", "this is a profile report", "not a plan")
    rc, _, err = run_cli(
        capsys, "rank", plan, "--kind", "attn", "--drop", "1", "--out", tmp_path / "p2.json"
    )
    assert_clean_error(rc, err, "rank", "this is a plan, written by rank")
    rc, _, err = run_cli(capsys, "rank", report, "--kind", "attn", "--drop", "-2")
    assert_clean_error(rc, err, "rank", "--drop count must be >= 1, got -2")
