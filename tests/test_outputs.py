"""Output targets (issue 11, data loss): every command that writes refuses a target that
is, contains or lies in its inputs, replaces only what it wrote, and never touches anything
else; writes are atomic, leave nothing behind on failure, and clean up after killed runs."""

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_dir_and_corpus

from entrodrop_fast import outputs
from entrodrop_fast.cli import main
from entrodrop_fast.outputs import MARKER, OutputError


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with a hash of its content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------ the module


def test_check_dir_rules(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ins = [("model", model)]
    for target, rel in (
        (model, "is the model"),
        (tmp_path, "contains the model"),
        (model / "sub", "lies inside the model"),
    ):
        with pytest.raises(OutputError, match=rel):
            outputs.check_dir(target, kind="report", what="report", inputs=ins)
    assert (
        outputs.check_dir(tmp_path / "new", kind="report", what="report", inputs=ins)
        == tmp_path / "new"
    )
    (tmp_path / "empty").mkdir()
    outputs.check_dir(tmp_path / "empty", kind="report", what="report")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(
        OutputError,
        match=r"did not write there or that were changed since \(notes.txt\).*pass overwrite=True",
    ):
        outputs.check_dir(foreign, kind="report", what="report")
    outputs.check_dir(foreign, kind="report", what="report", overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        outputs.check_dir(tmp_path / "afile", kind="report", what="report", overwrite=True)
    with pytest.raises(OutputError, match="is a file, not a directory"):
        outputs.check_dir(tmp_path / "afile" / "sub", kind="report", what="report")


def test_check_file_rules(tmp_path):
    with pytest.raises(OutputError, match="is a directory; give a file path"):
        outputs.check_file(tmp_path, what="plan")
    f = tmp_path / "plan.json"
    f.write_text("not ours")
    with pytest.raises(OutputError, match="was not written by entrodrop; pass overwrite=True"):
        outputs.check_file(f, what="plan", recognise=outputs.json_with_keys("drop"))
    f.write_text(json.dumps({"drop": {}}))
    outputs.check_file(f, what="plan", recognise=outputs.json_with_keys("drop"))
    with pytest.raises(OutputError, match="lies inside the corpus"):
        outputs.check_file(tmp_path / "plan.json", what="plan", inputs=[("corpus", tmp_path)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_is_refused_before_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot write in"):
            outputs.check_dir(ro / "rep", kind="report", what="report")
    finally:
        ro.chmod(0o755)


def test_publish_into_ours_replaces_and_into_foreign_keeps_the_rest(tmp_path):
    out = tmp_path / "rep"
    with outputs.publish_dir(out, kind="report", what="report") as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "old.txt").write_text("stale")
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()  # not mkdtemp's 0700
    marker = json.loads((out / MARKER).read_text())
    assert (
        marker["kind"] == "report"
        and marker["files"] == ["a.txt", "old.txt"]
        and set(marker["stamps"]) == {"a.txt", "old.txt"}
    )
    assert outputs.is_ours(out, "report") and not outputs.is_ours(out, "comparison")
    with outputs.publish_dir(out, kind="report", what="report") as tmp:  # ours: swapped whole
        (tmp / "a.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt"]
    (out / "user.txt").write_text("keep")  # now the directory also holds the user's file
    with pytest.raises(OutputError, match="did not write there"):
        outputs.check_dir(out, kind="report", what="report")
    with outputs.publish_dir(out, kind="report", what="report") as tmp:  # as with --overwrite
        (tmp / "b.txt").write_text("3")
    assert (out / "user.txt").read_text() == "keep"
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER,
        "b.txt",
        "user.txt",
    ]  # a.txt was ours: removed
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]


def test_failed_publish_leaves_nothing(tmp_path):
    out = tmp_path / "rep"
    with (
        pytest.raises(RuntimeError, match="boom"),
        outputs.publish_dir(out, kind="report", what="report") as tmp,
    ):
        (tmp / "a.txt").write_text("1")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    real = os.replace

    def full(a, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match="no space left on the device; nothing was changed"):
        outputs.publish_file(tmp_path / "x.json", "{}", what="evaluation JSON")
    with (
        pytest.raises(OutputError, match="no space left"),
        outputs.publish_dir(tmp_path / "d", kind="report", what="report") as tmp,
    ):
        (tmp / "a").write_text("1")
    monkeypatch.setattr(os, "replace", real)
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_given_temporary_is_never_written_through(tmp_path):
    """write_atomic's ``tmp`` (the resume state's ``state.pt.tmp``): a leftover there is
    unlinked, a symlink's target is not touched, and a directory is an error given to fail."""
    outside = tmp_path / "users.txt"
    outside.write_text("the user's")
    d = tmp_path / "resume"
    d.mkdir()
    (d / "state.pt.tmp").symlink_to(outside)
    outputs.write_atomic(
        d / "state.pt", lambda fh: fh.write(b"new"), tmp=d / "state.pt.tmp", fail=_raise
    )
    assert outside.read_text() == "the user's" and (d / "state.pt").read_bytes() == b"new"
    assert sorted(os.listdir(d)) == ["state.pt"]
    (d / "state.pt.tmp").write_bytes(b"half a state")  # a killed write's leftover
    outputs.write_atomic(
        d / "state.pt", lambda fh: fh.write(b"newer"), tmp=d / "state.pt.tmp", fail=_raise
    )
    assert (d / "state.pt").read_bytes() == b"newer" and sorted(os.listdir(d)) == ["state.pt"]
    (d / "state.pt.tmp").mkdir()
    (d / "state.pt.tmp" / "keep").write_text("x")
    with pytest.raises(RuntimeError, match="Is a directory"):
        outputs.write_atomic(
            d / "state.pt", lambda fh: fh.write(b"no"), tmp=d / "state.pt.tmp", fail=_raise
        )
    assert (d / "state.pt").read_bytes() == b"newer" and (d / "state.pt.tmp" / "keep").exists()


def _raise(exc):
    raise RuntimeError(f"failed: {exc}") from exc


def test_temporaries_of_killed_runs_are_removed_and_nothing_else(tmp_path):
    pid = _dead_pid()
    stale = tmp_path / f".rep.entrodrop-tmp-{pid}-abc"
    stale.mkdir()
    (stale / ".entrodrop-partial").touch()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    stale_file = tmp_path / f".plan.json.entrodrop-tmp-{pid}-xyz"
    stale_file.write_text("{")
    alive = tmp_path / f".rep.entrodrop-tmp-{os.getppid()}-abc"  # a live process's: kept
    alive.mkdir()
    (alive / ".entrodrop-partial").touch()
    unmarked = tmp_path / f".rep.entrodrop-tmp-{pid}-def"  # not marked as ours: kept
    unmarked.mkdir()
    other = tmp_path / ".rep.mine"
    other.write_text("user")
    with outputs.publish_dir(tmp_path / "rep", kind="report", what="report") as tmp:
        (tmp / "a").write_text("1")
    outputs.publish_file(tmp_path / "plan.json", "{}", what="plan")
    assert not stale.exists() and not stale_file.exists()
    assert alive.exists() and unmarked.exists() and other.read_text() == "user"
    assert stat.S_IMODE((tmp_path / "plan.json").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ------------------------------------------------------------------ every command


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model directory with a tokenizer, a corpus, a report and a plan."""
    root = tmp_path_factory.mktemp("outs")
    model, corpus = tiny_dir_and_corpus(root)
    report = root / "report"
    assert (
        main(
            [
                "profile",
                str(model),
                "--corpus",
                str(corpus),
                "--samples",
                "4",
                "--seq-len",
                "32",
                "--out",
                str(report),
                "-q",
                "--no-plot",
            ]
        )
        == 0
    )
    plan = root / "plan.json"
    plan.write_text(json.dumps({"drop": {"attn": [1]}}))
    return {"model": model, "corpus": corpus, "report": report, "plan": plan, "root": root}


def _commands(e, target):
    m, c = str(e["model"]), str(e["corpus"])
    small = ["--samples", "4", "--seq-len", "32"]
    return {
        "profile --out": ["profile", m, "--corpus", c, *small, "--out", target, "-q"],
        "profile --resume-dir": [
            "profile",
            m,
            "--corpus",
            c,
            *small,
            "--streaming",
            "--resume-dir",
            target,
            "--out",
            str(e["root"] / "fresh_report"),
            "-q",
        ],
        "rank --out": ["rank", str(e["report"]), "--kind", "attn", "--drop", "1", "--out", target],
        "eval --json": [
            "eval",
            m,
            "--corpus",
            c,
            "--windows",
            "1",
            "--items",
            "2",
            "--no-speed",
            "--json",
            target,
        ],
        "compare --out": [
            "compare",
            m,
            "--calib",
            c,
            *small,
            "--drop",
            "1",
            "--methods",
            "bucket",
            "--items",
            "2",
            "--eval-windows",
            "1",
            "--no-speed",
            "--out",
            target,
            "-q",
        ],
        "prune --out": ["prune", m, "--plan", str(e["plan"]), "--out", target],
    }


TARGETS = ("foreign dir", "model dir", "model parent", "cwd", "corpus", "inside model")


@pytest.mark.parametrize(
    "command",
    list(_commands({"model": "", "corpus": "", "report": "", "plan": "", "root": Path()}, "")),
)
@pytest.mark.parametrize("where", TARGETS)
def test_no_command_touches_what_is_not_its_own(env, tmp_path, monkeypatch, capsys, command, where):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(foreign)
    target = {
        "foreign dir": str(foreign),
        "model dir": str(env["model"]),
        "model parent": str(env["model"].parent),
        "cwd": ".",
        "corpus": str(env["corpus"]),
        "inside model": str(env["model"] / "out.json"),
    }[where]
    before_env, before_foreign = tree(env["root"]), tree(foreign)
    rc = main(_commands(env, target)[command])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"entrodrop {command.split()[0]}: error:" in err and "Traceback" not in err
    assert any(
        s in err
        for s in (
            "did not write",
            "is the model",
            "contains the ",
            "lies inside the model",
            "is the corpus",
            "is a directory",
            "exists and is not a directory",
            "not a resume state",
            "not written by entrodrop",
        )
    ), err
    assert tree(env["root"]) == before_env and tree(foreign) == before_foreign


def test_overwrite_writes_only_its_own_files(env, tmp_path, monkeypatch, capsys):
    foreign = tmp_path / "work"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(foreign)
    args = [
        "profile",
        str(env["model"]),
        "--corpus",
        str(env["corpus"]),
        "--samples",
        "4",
        "--seq-len",
        "32",
        "-q",
        "--no-plot",
        "--out",
        ".",
    ]
    assert main(args) == 1
    assert main([*args, "--overwrite"]) == 0
    assert (foreign / "thesis.tex").read_text() == "years of work"
    assert {"report.json", "scores.csv", "ranking.txt", MARKER} <= {
        p.name for p in foreign.iterdir()
    }
    assert [p.name for p in tmp_path.iterdir()] == ["work"]
    # a report directory of ours is replaced without --overwrite
    rep = tmp_path / "rep"
    args[-1] = str(rep)
    assert main(args) == 0 and main(args) == 0
    assert sorted(p.name for p in rep.iterdir()) == sorted(
        [MARKER, "report.json", "scores.csv", "ranking.txt"]
    )
    capsys.readouterr()


def test_eval_json_and_rank_out_replace_their_own_files_only(env, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    rank = ["rank", str(env["report"]), "--kind", "attn", "--drop", "1", "--out", str(plan)]
    assert main(rank) == 0 and main(rank) == 0  # a plan replaces a plan
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert main([*rank[:-1], str(notes)]) == 1
    assert (
        "was not written by entrodrop" in capsys.readouterr().err
        and notes.read_text() == '{"mine": 1}'
    )
    assert main([*rank[:-1], str(notes), "--overwrite"]) == 0
    assert (
        json.loads(notes.read_text())["drop"]["attn"]
        and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    )


def test_prune_leaves_no_hidden_copy_after_a_failure(env, tmp_path, capsys, monkeypatch):
    from entrodrop_fast.prune import export

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_write_shard", boom)
    assert (
        main(["prune", str(env["model"]), "--plan", str(env["plan"]), "--out", str(tmp_path / "p")])
        == 1
    )
    err = capsys.readouterr().err
    assert "no space left" in err.lower() and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_profile_model_is_not_modified(env, tmp_path):
    before = tree(env["model"])
    assert (
        main(
            [
                "profile",
                str(env["model"]),
                "--corpus",
                str(env["corpus"]),
                "--samples",
                "2",
                "--seq-len",
                "16",
                "--out",
                str(tmp_path / "r"),
                "-q",
                "--no-plot",
            ]
        )
        == 0
    )
    assert tree(env["model"]) == before


@pytest.mark.parametrize("where", ["foreign dir", "cwd", "foreign file"])
def test_bench_json_never_replaces_a_foreign_file_or_directory(
    tmp_path, monkeypatch, capsys, where
):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.json").write_text('{"mine": 1}')
    monkeypatch.chdir(foreign)
    target = {
        "foreign dir": str(foreign),
        "cwd": ".",
        "foreign file": str(foreign / "results.json"),
    }[where]
    before = tree(tmp_path)
    bench = [
        "bench",
        "--estimators",
        "moments",
        "--shapes",
        "8x8",
        "--dtypes",
        "fp32",
        "--backends",
        "torch",
        "--repeat",
        "1",
        "--json",
    ]
    assert main([*bench, target]) == 1
    err = capsys.readouterr().err
    assert "entrodrop bench: error:" in err and (
        "is a directory" in err or "not written by entrodrop" in err
    )
    assert tree(tmp_path) == before
    ok = tmp_path / "bench.json"
    assert main([*bench, str(ok)]) == 0 and main([*bench, str(ok)]) == 0  # its own file is replaced
    assert json.loads(ok.read_text())[0]["estimator"] == "moments"


def test_profile_bins_above_the_maximum_stop_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from entrodrop_fast.models import loading

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", never)
    assert (
        main(
            [
                "profile",
                str(tmp_path / "nomodel"),
                "--bins",
                str(2**16 + 1),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 1
    )
    assert "--bins must be at most 65536" in capsys.readouterr().err


# ------------------------------------------------------------------ findings of a new user


def test_an_output_file_edited_by_hand_is_the_users(tmp_path):
    """A report file changed since we wrote it is no longer ours: a rerun needs --overwrite,
    and even then the edited file is not removed as stale."""
    out = tmp_path / "rep"
    with outputs.publish_dir(out, kind="report", what="report") as tmp:
        (tmp / "ranking.txt").write_text("ours")
        (tmp / "old.txt").write_text("ours too")
    assert outputs.is_ours(out, "report")
    with (out / "old.txt").open("a") as fh:
        fh.write("\nmy notes")
    with pytest.raises(OutputError, match=r"changed since \(old.txt\)"):
        outputs.check_dir(out, kind="report", what="report")
    with outputs.publish_dir(out, kind="report", what="report") as tmp:  # as with --overwrite
        (tmp / "ranking.txt").write_text("new")
    assert (out / "old.txt").read_text() == "ours too\nmy notes" and (
        out / "ranking.txt"
    ).read_text() == "new"


def test_a_model_is_never_written_over_another_even_with_overwrite(env, tmp_path, capsys):
    other = tmp_path / "other_model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "model.safetensors").write_bytes(b"weights")
    before = tree(other)
    rc = main(
        ["prune", str(env["model"]), "--plan", str(env["plan"]), "--out", str(other), "--overwrite"]
    )
    assert (
        rc == 1
        and "holds another model (config.json, model.safetensors)" in capsys.readouterr().err
    )
    assert tree(other) == before


def test_a_second_run_that_finishes_later_does_not_replace_without_overwrite(tmp_path):
    """Two runs with the same --out: the rules are checked again when the result is moved into
    place, so the later prune fails instead of replacing the earlier model silently."""
    out = tmp_path / "pruned"
    first = outputs.DirPublisher(
        out, kind="model", what="pruned model", overwrite=False, replace_ours=False
    )
    second = outputs.DirPublisher(
        out, kind="model", what="pruned model", overwrite=False, replace_ours=False
    )
    (first.tmp / "config.json").write_text("first")
    (second.tmp / "config.json").write_text("second")
    first.commit()
    with pytest.raises(OutputError, match="holds an earlier pruned model; pass overwrite=True"):
        second.commit()
    assert (out / "config.json").read_text() == "first" and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["pruned"]


def test_links_into_the_model_count_as_the_model(env, tmp_path, capsys):
    """A hub snapshot's files are links into a blob store: --out naming the store is refused."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for f in env["model"].iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blobs / f.name)
    before = tree(blobs)
    rc = main(["prune", str(snap), "--plan", str(env["plan"]), "--out", str(blobs), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 1 and "contains the model file" in err, err
    rc = main(
        [
            "profile",
            str(snap),
            "--corpus",
            str(env["corpus"]),
            "--samples",
            "2",
            "--seq-len",
            "16",
            "--out",
            str(blobs),
            "--overwrite",
            "-q",
        ]
    )
    assert rc == 1 and "contains the model file" in capsys.readouterr().err
    assert tree(blobs) == before


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_files_are_never_replaced(env, tmp_path, capsys, kind):
    target = tmp_path / "special"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        try:
            os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
        except PermissionError:
            pytest.skip("mknod needs root")
    for extra in ([], ["--overwrite"]):
        rc = main(
            [
                "rank",
                str(env["report"]),
                "--kind",
                "attn",
                "--drop",
                "1",
                "--out",
                str(target),
                *extra,
            ]
        )
        assert rc == 1 and "is not a regular file" in capsys.readouterr().err
    assert not target.is_file() and (
        stat.S_ISFIFO(target.stat().st_mode) or stat.S_ISCHR(target.stat().st_mode)
    )


def test_symlink_loops_and_empty_names_are_clear_errors(env, tmp_path, capsys):
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    rank = ["rank", str(env["report"]), "--kind", "attn", "--drop", "1", "--out"]
    assert main([*rank, str(tmp_path / "loopA")]) == 1
    err = capsys.readouterr().err
    assert "Symlink loop" in err and "Traceback" not in err
    for empty in ("", "   "):
        assert main([*rank, empty]) == 1
        assert "--out is empty" in capsys.readouterr().err


def test_the_refusal_lists_only_what_is_not_ours(tmp_path):
    out = tmp_path / "rep"
    with outputs.publish_dir(out, kind="report", what="report") as tmp:
        (tmp / "report.json").write_text("{}")
    (out / "mine.txt").write_text("x")
    with pytest.raises(OutputError) as e:
        outputs.check_dir(out, kind="report", what="report")
    assert "(mine.txt)" in str(e.value) and "report.json" not in str(e.value)


def test_per_sample_warnings_are_summarised_in_one_line(env, tmp_path, capsys):
    """gaussian_full warns for every sample (a ridge on a singular covariance): the profile
    prints one line with the count, not one line per sample with internal paths."""
    rc = main(
        [
            "profile",
            str(env["model"]),
            "--corpus",
            str(env["corpus"]),
            "--samples",
            "4",
            "--seq-len",
            "16",
            "--method",
            "gaussian_full",
            "--out",
            str(tmp_path / "r"),
            "-q",
            "--no-plot",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "covariance is singular" in ln]
    assert len(lines) == 1 and "more like it" in lines[0] and ".py:" not in err, err


def test_quiet_profile_prints_no_progress_bar(env, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    try:
        rc = main(
            [
                "profile",
                str(env["model"]),
                "--corpus",
                str(env["corpus"]),
                "--samples",
                "2",
                "--seq-len",
                "16",
                "--out",
                str(tmp_path / "r"),
                "-q",
                "--no-plot",
            ]
        )
        err = capfd.readouterr().err
        assert rc == 0 and "Loading weights" not in err and "\r" not in err, err
    finally:
        hf_logging.enable_progress_bar()


def test_a_mount_point_is_refused_as_a_directory_target_before_any_work(tmp_path, monkeypatch):
    """A volume mounted at --out (docker -v host:/out): the output is built beside it and
    renamed into place, which fails there (EBUSY / EXDEV) -- after all the work. Refused at
    once, naming a directory inside it; a resume directory (written in place) is fine."""
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "notes.txt").write_text("mine")
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == vol or real(p))
    for kind, name in (("report", "entrodrop_report"), ("model", "pruned_model")):
        with pytest.raises(OutputError, match=rf"is a mount point .* e\.g\. {vol / name}"):
            outputs.check_dir(vol, kind=kind, what="x", overwrite=True)
    assert outputs.check_dir(vol / "entrodrop_report", kind="report", what="x") == (
        vol / "entrodrop_report"
    )
    assert outputs.check_dir(vol, kind="resume", what="resume state", overwrite=True) == vol
    assert (vol / "notes.txt").read_text() == "mine"
