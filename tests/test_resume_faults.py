"""Streaming --resume-dir under faults: a streamed run is stopped (raised from inside, or
SIGKILLed in a child process), then resumed with each changed argument and with each
resume file missing, truncated or corrupt; a full disk and a read-only directory. Every
case either gives exactly the uninterrupted report or stops with a message saying what
is wrong and what to do, without creating or changing a file in the directory."""

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import torch
from helpers import RESUME_SETTINGS, RESUME_W, assert_identical, char_llama_dir, tiny_model

import entrodrop_fast
import entrodrop_fast.profile.layerwise as st
from entrodrop_fast.profile.layerwise import ResumeError, StorageError, profile_streaming

LAYERS, STOP = 4, 2  # a 4-layer model, stopped after its second layer
ACT_BYTES = 7 * 20 * 32 * 4  # samples x seq_len x hidden_size x fp32


def _snapshot(d):
    """name -> content digest of every file under ``d``."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _stop(ckpt, d, windows=RESUME_W, settings=RESUME_SETTINGS, **kw):
    """A streamed run into resume directory ``d``, stopped after layer STOP (the runner's test
    seam)."""
    with pytest.raises(KeyboardInterrupt):
        profile_streaming(
            ckpt, windows, settings, resume_dir=str(d), progress=False, _stop_after_layer=STOP, **kw
        )
    assert torch.load(os.path.join(d, "state.pt"), weights_only=True)["layers_done"] == STOP


def _resume(ckpt, d, windows=RESUME_W, settings=RESUME_SETTINGS, **kw):
    return profile_streaming(ckpt, windows, settings, resume_dir=str(d), progress=False, **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama", layers=LAYERS).save_pretrained(d, max_shard_size="60KB")
    return str(d)


@pytest.fixture(scope="module")
def whole(ckpt):
    """The uninterrupted report (activations in RAM, no resume directory)."""
    return profile_streaming(ckpt, RESUME_W, RESUME_SETTINGS, progress=False)


@pytest.fixture(scope="module")
def stopped_master(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("stopped") / "resume"
    _stop(ckpt, d)
    assert sorted(os.listdir(d)) == ["act_a.bin", "act_b.bin", "run.json", "state.pt"]
    return d


@pytest.fixture
def stopped(stopped_master, tmp_path):
    """A fresh copy of a resume directory whose run was stopped after layer STOP."""
    d = tmp_path / "resume"
    shutil.copytree(stopped_master, d)
    return d


@pytest.fixture
def own_ckpt(ckpt, tmp_path):
    """A copy of the checkpoint this test may change."""
    d = tmp_path / "model"
    shutil.copytree(ckpt, d)
    return str(d)


# ------------------------------------------------------------------ stopped, then resumed


def test_stopped_then_resumed_equals_uninterrupted(ckpt, whole, stopped):
    assert_identical(whole, _resume(ckpt, stopped))


def test_finished_run_rerun_gives_the_same_report(ckpt, whole, tmp_path):
    d = tmp_path / "resume"
    first = _resume(ckpt, d)
    assert torch.load(d / "state.pt", weights_only=True)["layers_done"] == LAYERS
    assert_identical(whole, first)
    assert_identical(whole, _resume(ckpt, d))


_CHILD = r"""
import os, signal, sys
sys.path.insert(0, {tests!r})
import entrodrop_fast.profile.layerwise as st
from helpers import RESUME_SETTINGS, RESUME_W

mode = {mode!r}
if mode == "mid_layer":  # SIGKILL in layer 2, after its first batch was written
    class Killer(st._BatchDispatch):
        sets = 0
        def __setattr__(self, name, value):
            if name == "current":
                Killer.sets += 1  # 1 at construction, then one per batch (3 per layer)
                if Killer.sets == 1 + 3 * {stop} + 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            object.__setattr__(self, name, value)
    st._BatchDispatch = Killer
else:  # "mid_save": SIGKILL once layer 2's state is written, before it replaces state.pt
    real, saves = os.replace, []
    def replace(src, dst):
        if dst.endswith("state.pt"):
            saves.append(dst)
            if len(saves) == {stop} + 1:
                os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    os.replace = replace
st.profile_streaming({ckpt!r}, RESUME_W, RESUME_SETTINGS, resume_dir={d!r}, progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mid_layer", "mid_save"])
def test_sigkilled_child_then_resumed_equals_uninterrupted(ckpt, whole, tmp_path, mode):
    d = tmp_path / "resume"
    code = _CHILD.format(tests=os.path.dirname(__file__), mode=mode, stop=STOP, ckpt=ckpt, d=str(d))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [
                os.path.dirname(os.path.dirname(entrodrop_fast.__file__)),
                os.environ.get("PYTHONPATH", ""),
            ]
        ),
    }
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert torch.load(d / "state.pt", weights_only=True)["layers_done"] == STOP
    assert (d / "state.pt.tmp").exists() == (mode == "mid_save")
    assert_identical(whole, _resume(ckpt, d))


# ------------------------------------------------------------------ resumed with other arguments


CHANGES = {
    "dtype": (dict(dtype=torch.bfloat16), r"(?<!-)dtype: 'float32' there, 'bfloat16' now"),
    "batch_size": (
        dict(settings=dataclasses.replace(RESUME_SETTINGS, batch_size=2)),
        r"(?<!-)batch_size: 3 there, 2 now",
    ),
    "methods": (
        dict(
            settings=dataclasses.replace(RESUME_SETTINGS, methods=("bucket", "cosine", "angular"))
        ),
        r"(?<!-)methods: \['bucket', 'knn'",
    ),
    "bins": (
        dict(settings=dataclasses.replace(RESUME_SETTINGS, bins=10)),
        r"(?<!-)bins: 20 there, 10 now",
    ),
    "k": (dict(settings=dataclasses.replace(RESUME_SETTINGS, k=6)), r"(?<!-)k: 5 there, 6 now"),
    "paper_exact": (
        dict(settings=dataclasses.replace(RESUME_SETTINGS, paper_exact=True)),
        r"(?<!-)paper_exact: False there, True now",
    ),
    "spans": (
        dict(settings=dataclasses.replace(RESUME_SETTINGS, spans=(1, 3))),
        r"(?<!-)spans: \[1, 2\] there, \[1, 3\] now",
    ),
    "backend": (
        dict(settings=dataclasses.replace(RESUME_SETTINGS, backend="torch")),
        r"(?<!-)backend: 'auto' there, 'torch' now",
    ),
    # same shape, same sum of token ids, other tokens (the old fingerprint summed them)
    "tokens": (
        dict(windows=torch.cat([RESUME_W[:1].flip(1), RESUME_W[1:]])),
        r"calibration tokens \(samples, seq_len, seed",
    ),
    "samples": (
        dict(windows=RESUME_W[:5]),
        r"calibration shape \(samples x seq_len\): \[7, 20\] there, \[5, 20\] now",
    ),
    "seq_len": (
        dict(windows=RESUME_W[:, :16]),
        r"calibration shape .*\[7, 20\] there, \[7, 16\] now",
    ),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_resume_with_another_argument_stops(ckpt, stopped, change):
    kwargs, says = CHANGES[change]
    if change == "tokens":
        assert int(kwargs["windows"].sum()) == int(RESUME_W.sum()) and not torch.equal(
            kwargs["windows"], RESUME_W
        )
    before = _snapshot(stopped)
    with pytest.raises(ResumeError, match=f"holds a run with other arguments .*{says}") as e:
        _resume(ckpt, stopped, **kwargs)
    assert "rerun with that run's arguments" in str(e.value) and "use another resume_dir" in str(
        e.value
    )
    assert _snapshot(stopped) == before  # nothing created, nothing changed


def test_fp16_run_resumed_in_bf16_stops(ckpt, tmp_path):
    """fp16 and bf16 have the same size: the old check let bf16 read fp16 bits."""
    d = tmp_path / "resume"
    _stop(ckpt, d, dtype=torch.float16)
    before = _snapshot(d)
    with pytest.raises(ResumeError, match=r"(?<!-)dtype: 'float16' there, 'bfloat16' now"):
        _resume(ckpt, d, dtype=torch.bfloat16)
    assert _snapshot(d) == before


def test_resume_from_another_model_dir_stops(ckpt, stopped, tmp_path):
    other = tmp_path / "same_model_elsewhere"
    shutil.copytree(ckpt, other)  # same files, same times: only the directory differs
    with pytest.raises(
        ResumeError,
        match=r"other arguments \(model directory: '.*ckpt.*' there, "
        r"'.*same_model_elsewhere' now\)",
    ):
        _resume(str(other), stopped)


def test_resume_after_weights_changed_stops(own_ckpt, tmp_path):
    d = tmp_path / "resume"
    _stop(own_ckpt, d)
    shard = os.path.join(
        own_ckpt, sorted(f for f in os.listdir(own_ckpt) if f.endswith(".safetensors"))[1]
    )
    st_ = os.stat(shard)
    os.utime(shard, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))  # rewritten in place
    with pytest.raises(
        ResumeError,
        match=r"other arguments \(the model's weight files "
        r"\(names, sizes or modification times\)\)",
    ):
        _resume(own_ckpt, d)


def test_resume_after_config_changed_stops(own_ckpt, tmp_path):
    d = tmp_path / "resume"
    _stop(own_ckpt, d)
    path = os.path.join(own_ckpt, "config.json")
    cfg = json.load(open(path))
    cfg["rms_norm_eps"] = cfg["rms_norm_eps"] * 10  # changes every number, not the weights
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ResumeError, match=r"other arguments \(the model's config.json\)"):
        _resume(own_ckpt, d)


def _tamper_fingerprints(d, **fields):
    run = json.loads((d / "run.json").read_text())
    run.update(fields)
    (d / "run.json").write_text(json.dumps(run))
    state = torch.load(d / "state.pt", weights_only=True)
    state["fingerprint"].update(fields)
    torch.save(state, d / "state.pt")


@pytest.mark.parametrize(
    "fields, says",
    [
        (
            {"device": "cuda (NVIDIA H200)"},
            r"(?<!-)device: 'cuda \(NVIDIA H200\)' there, 'cpu' now",
        ),
        (
            {"versions": "torch 0.1, transformers 0.1, entrodrop_fast 0.0.1"},
            r"library versions: 'torch 0.1",
        ),
        (
            {"backend_resolved": "triton"},
            r"the backend settings.backend resolves to: 'triton' there",
        ),
    ],
    ids=["device", "versions", "resolved_backend"],
)
def test_resume_on_another_device_or_library_stops(ckpt, stopped, fields, says):
    """A directory written on a GPU (or with other libraries) is refused on this CPU."""
    _tamper_fingerprints(stopped, **fields)
    before = _snapshot(stopped)
    with pytest.raises(ResumeError, match=f"other arguments \\({says}"):
        _resume(ckpt, stopped)
    assert _snapshot(stopped) == before


def test_directory_of_an_older_version_stops(ckpt, stopped):
    """The fingerprint of the previous format (token-id sum, settings repr) is refused as such."""
    state = torch.load(stopped / "state.pt", weights_only=True)
    state["fingerprint"] = {
        "model_dir": ckpt,
        "windows": int(RESUME_W.sum()),
        "shape": [7, 20],
        "settings": repr(RESUME_SETTINGS),
    }
    torch.save(state, stopped / "state.pt")
    (stopped / "run.json").unlink()
    with pytest.raises(
        ResumeError,
        match=r"other arguments \(resume format \(the directory was written by another version of "
        r"entrodrop_fast\): '\(not recorded\)' there, 2 now\)",
    ):
        _resume(ckpt, stopped)
    assert not (stopped / "run.json").exists()


# --------------------------------------------------------- resume files missing, truncated, corrupt


def _truncate(name, size):
    def op(d):
        with open(d / name, "r+b") as fh:
            fh.truncate(size(os.path.getsize(d / name)))

    return op


def _write(name, data):
    return lambda d: (d / name).write_bytes(data)


def _edit_state(**changes):
    def op(d):
        state = torch.load(d / "state.pt", weights_only=True)
        for k, v in changes.items():
            state[k] = v(state[k]) if callable(v) else v
        torch.save(state, d / "state.pt")

    return op


BROKEN = (
    "the resume directory .* is incomplete or corrupt.*; remove it or choose another resume_dir"
)
FAULTS = {
    "act_a_missing": (
        lambda d: (d / "act_a.bin").unlink(),
        r"act_a\.bin is missing: the resume directory .* is incomplete .*activations are never "
        r"re-created",
    ),
    "act_b_missing": (
        lambda d: (d / "act_b.bin").unlink(),
        r"act_b\.bin is missing: the resume directory .* is incomplete",
    ),
    "act_a_half": (
        _truncate("act_a.bin", lambda n: n // 2),
        rf"act_a\.bin has {ACT_BYTES // 2} bytes where 7 x 20 x 32 float32 activations take "
        rf"{ACT_BYTES}: truncated",
    ),
    "act_b_empty": (
        _truncate("act_b.bin", lambda n: 0),
        rf"act_b\.bin has 0 bytes where .* take {ACT_BYTES}: truncated, or not from this run; "
        rf"{BROKEN}",
    ),
    "act_a_longer": (
        _truncate("act_a.bin", lambda n: n + 4),
        rf"act_a\.bin has {ACT_BYTES + 4} bytes",
    ),
    "state_half": (
        _truncate("state.pt", lambda n: n // 2),
        rf"state\.pt: cannot be read \(.*\); {BROKEN}",
    ),
    "state_cut_short": (
        _truncate("state.pt", lambda n: n - 1),
        rf"state\.pt: cannot be read \(.*\); {BROKEN}",
    ),
    "state_empty": (
        _truncate("state.pt", lambda n: 0),
        rf"state\.pt: cannot be read \(.*\); {BROKEN}",
    ),
    "state_garbage": (
        _write("state.pt", bytes(range(256)) * 8),
        rf"state\.pt: cannot be read \(.*\); {BROKEN}",
    ),
    "state_foreign": (
        lambda d: torch.save({"weights": torch.ones(3)}, d / "state.pt"),
        rf"state\.pt: not a resume state of this program; {BROKEN}",
    ),
    "state_layers_out_of_range": (
        _edit_state(layers_done=LAYERS + 5),
        rf"state\.pt: layers done {LAYERS + 5} / current buffer . out of range for {LAYERS} "
        rf"layers; {BROKEN}",
    ),
    "state_pending_lost": (
        _edit_state(pending=lambda p: p[:-1]),
        rf"state\.pt: the estimator states in it do not have this run's layout; {BROKEN}",
    ),
    "run_json_cut_short": (
        _truncate("run.json", lambda n: n // 2),
        rf"run\.json: cannot be read \(JSONDecodeError: .*\); {BROKEN}",
    ),
    "run_json_and_state_missing": (
        lambda d: [(d / n).unlink() for n in ("run.json", "state.pt")],
        r"holds act_a\.bin and act_b\.bin but neither state\.pt nor run\.json: .*remove it or "
        r"choose another resume_dir",
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_incomplete_resume_directory_stops(ckpt, stopped, fault):
    op, says = FAULTS[fault]
    op(stopped)
    before = _snapshot(stopped)
    with pytest.raises(ResumeError, match=says):
        _resume(ckpt, stopped)
    assert _snapshot(stopped) == before  # no activation file re-created, nothing overwritten


def test_run_json_missing_resumes_from_state(ckpt, whole, stopped):
    (stopped / "run.json").unlink()
    assert_identical(whole, _resume(ckpt, stopped))
    assert json.loads((stopped / "run.json").read_text())["dtype"] == "float32"  # written back


def test_state_missing_starts_over(ckpt, whole, stopped):
    """run.json says the files are this run's; without a state the run starts from layer 0."""
    (stopped / "state.pt").unlink()
    with pytest.warns(UserWarning, match="no state.pt .*starting from the first layer"):
        res = _resume(ckpt, stopped)
    assert_identical(whole, res)


def test_leftover_partial_state_is_ignored(ckpt, whole, stopped):
    (stopped / "state.pt.tmp").write_bytes(b"half a state")
    assert_identical(whole, _resume(ckpt, stopped))


def test_directory_in_use_by_another_run_stops(ckpt, stopped):
    import fcntl

    fd = os.open(stopped, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(
            ResumeError,
            match="is in use by another running profile; wait for it to end or choose another "
            "resume_dir",
        ):
            _resume(ckpt, stopped)
    finally:
        os.close(fd)


def test_resume_dir_that_is_a_file_stops(ckpt, tmp_path):
    f = tmp_path / "resume"
    f.write_text("mine")
    with pytest.raises(ResumeError, match="exists and is not a directory"):
        _resume(ckpt, f)
    assert f.read_text() == "mine"


def test_each_torchrun_rank_keeps_its_own_files(ckpt, tmp_path, monkeypatch):
    from entrodrop_fast.profile import distributed

    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    d = tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt):
        profile_streaming(
            ckpt,
            RESUME_W[1::2],
            RESUME_SETTINGS,
            resume_dir=str(d),
            progress=False,
            _stop_after_layer=STOP,
        )
    assert os.listdir(d) == ["rank1-of-2"]
    assert json.loads((d / "rank1-of-2" / "run.json").read_text())["process"] == "rank 1 of 2"


# ------------------------------------------------------------------ full disk, read-only directory


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["resume_dir", "temp_dir"])
def test_full_disk_is_an_error_before_any_work(ckpt, tmp_path, monkeypatch, where):
    made, loads = [], []
    real_mkdtemp, real_load = tempfile.mkdtemp, st.Checkpoint.load
    monkeypatch.setattr(
        tempfile, "mkdtemp", lambda *a, **k: made.append(real_mkdtemp(*a, **k)) or made[-1]
    )
    monkeypatch.setattr(
        st.Checkpoint, "load", lambda self, *a, **k: loads.append(a) or real_load(self, *a, **k)
    )
    monkeypatch.setattr(os, "posix_fallocate", _no_space)
    d = tmp_path / "resume"
    kw = {"resume_dir": str(d)} if where == "resume_dir" else {"ram_budget_bytes": 0}
    with pytest.raises(StorageError) as e:
        profile_streaming(ckpt, RESUME_W, RESUME_SETTINGS, progress=False, **kw)
    assert e.value.errno == errno.ENOSPC
    msg = str(e.value)
    assert (
        f"act_a.bin: cannot write the activation files (2 x {ACT_BYTES / 1024:.1f} KiB, " in msg
        and " free there): no space left on the device" in msg
    )
    assert not loads  # not a tensor read: the space is reserved before any work
    if where == "resume_dir":
        assert "or choose another resume_dir" in msg
        assert sorted(os.listdir(d)) == ["run.json"]  # the half-made activation files are removed
    else:
        assert "set TMPDIR to a directory on a larger disk" in msg and "raise max_memory" in msg
        assert made and not os.path.exists(made[0])


@pytest.mark.parametrize("where", ["resume_dir", "temp_dir"])
def test_full_disk_without_fallocate_is_still_an_error(ckpt, tmp_path, monkeypatch, where):
    """Where the system has no posix_fallocate, zeros are written instead (and fail the same
    way)."""
    monkeypatch.delattr(os, "posix_fallocate")
    real_write = os.write
    monkeypatch.setattr(
        os, "write", lambda fd, data: _no_space() if len(data) > 1000 else real_write(fd, data)
    )
    kw = (
        {"resume_dir": str(tmp_path / "resume")}
        if where == "resume_dir"
        else {"ram_budget_bytes": 0}
    )
    with pytest.raises(StorageError, match="no space left on the device"):
        profile_streaming(ckpt, RESUME_W, RESUME_SETTINGS, progress=False, **kw)


def _root_mount(args, what):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"{what} needs root (mount)")
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount here ({what}): {r.stderr.strip()}")


@contextlib.contextmanager
def _small_tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    _root_mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], "a small tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_really_full_disk_is_an_error_not_sigbus(ckpt, tmp_path):
    """A tmpfs with room for run.json and one activation file: the second one does not fit.
    With sparse files the writes through the memory map would have killed the process."""
    with _small_tmpfs(tmp_path / "small", "32k") as mnt:
        d = mnt / "resume"
        with pytest.raises(
            StorageError,
            match=r"act_b\.bin: cannot write the activation files .*no space left on the device",
        ) as e:
            _resume(ckpt, d)
        assert e.value.errno == errno.ENOSPC
        assert sorted(os.listdir(d)) == ["run.json"]


def test_state_save_on_full_disk_keeps_the_last_state(ckpt, whole, tmp_path, monkeypatch):
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == STOP + 1:
            _no_space()
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    d = tmp_path / "resume"
    with pytest.raises(
        StorageError,
        match=r"state\.pt: cannot write the resume state: no space left on the device .*; the "
        rf"state saved before layer {STOP} is kept; free space",
    ):
        _resume(ckpt, d)
    monkeypatch.setattr(torch, "save", real)
    assert sorted(os.listdir(d)) == [
        "act_a.bin",
        "act_b.bin",
        "run.json",
        "state.pt",
    ]  # no state.pt.tmp left
    assert torch.load(d / "state.pt", weights_only=True)["layers_done"] == STOP
    assert_identical(whole, _resume(ckpt, d))


@contextlib.contextmanager
def _read_only(path):
    """``path`` (a directory) read-only: a read-only bind mount as root, permissions otherwise."""
    if os.geteuid() == 0:
        _root_mount(["--bind", str(path), str(path)], "a read-only directory")
        try:
            r = subprocess.run(
                ["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True
            )
            if r.returncode:
                pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
    else:
        modes = {p: os.stat(p).st_mode for p in [path, *path.rglob("*")]}
        for p, m in modes.items():
            os.chmod(p, m & 0o555)
        try:
            yield path
        finally:
            for p, m in modes.items():
                os.chmod(p, m)


READ_ONLY = (
    r"cannot write .*: the directory is read-only or not writable \(.*\); free space or make .* "
    r"writable and rerun, or choose another resume_dir"
)


@pytest.mark.parametrize("where", ["the_dir", "inside_it"])
def test_read_only_resume_dir_new_run(ckpt, tmp_path, where):
    ro = tmp_path / "ro"
    ro.mkdir()
    with _read_only(ro):
        with pytest.raises(StorageError, match=READ_ONLY) as e:
            _resume(ckpt, ro if where == "the_dir" else ro / "resume")
        assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert os.listdir(ro) == []


def test_read_only_resume_dir_resume(ckpt, stopped):
    before = _snapshot(stopped)
    with _read_only(stopped):
        with pytest.raises(StorageError, match=rf"act_a\.bin: {READ_ONLY}"):
            _resume(ckpt, stopped)
    assert _snapshot(stopped) == before


# ------------------------------------------------------------------ through the command line


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer saved beside it (no download)."""
    d = tmp_path_factory.mktemp("tiny_llama_cli")
    return char_llama_dir(d, max_shard_size="60KB", vocab_size=97)


def test_cli_resume_errors_are_one_line_messages(tiny_dir, tmp_path, capsys):
    from entrodrop_fast.cli import main

    d = tmp_path / "resume"

    def profile(out, *extra):
        capsys.readouterr()
        rc = main(
            [
                "profile",
                str(tiny_dir),
                "--samples",
                "6",
                "--seq-len",
                "24",
                "-m",
                "bucket,cosine",
                "--streaming",
                "--resume-dir",
                str(d),
                "--out",
                str(tmp_path / out),
                "--no-plot",
                "-q",
                *extra,
            ]
        )
        return rc, capsys.readouterr().err

    assert profile("first") == (0, "")
    rc, _ = profile("again")  # the finished run, resumed: the same report
    assert rc == 0
    first, again = (
        json.loads((tmp_path / o / "report.json").read_text())["blocks"] for o in ("first", "again")
    )
    assert first == again
    rc, err = profile("bf16", "--dtype", "bf16")
    assert rc == 1 and "Traceback" not in err
    assert (
        err.startswith("entrodrop profile: error: ")
        and "holds a run with other arguments (--dtype: 'float32' there, 'bfloat16' now" in err
    )
    assert not (tmp_path / "bf16").exists()
    with open(d / "state.pt", "r+b") as fh:
        fh.truncate(100)
    rc, err = profile("cut")
    assert (
        rc == 1
        and err.startswith("entrodrop profile: error: ")
        and "state.pt: cannot be read" in err
        and "incomplete or corrupt" in err
    )
    (
        d / "state.pt"
    ).unlink()  # run.json vouches for the activation files: starts over, read-only now
    with _read_only(d):
        rc, err = profile("ro")
    assert rc == 1 and "Traceback" not in err
    assert err.startswith("entrodrop profile: error: ") and "read-only" in err


@pytest.mark.parametrize(
    "name, content",
    [
        ("run.json", '{"experiment": "mine", "lr": 0.001}'),  # the user's own run.json
        ("run.json", "[1, 2, 3]"),
        ("state.pt", b"my own checkpoint"),  # the user's own state.pt, no run.json of ours
    ],
)
def test_a_users_own_run_json_or_state_pt_is_named_not_ours(ckpt, tmp_path, name, content):
    """They were reported as 'written by another version of entrodrop' / torch's unpickling
    text with advice to remove the directory."""
    d = tmp_path / "mine"
    d.mkdir()
    p = d / name
    p.write_text(content) if isinstance(content, str) else p.write_bytes(content)
    with pytest.raises(
        ResumeError, match=r"is not a resume state of entrodrop \(a file of yours\?"
    ):
        _resume(ckpt, d)
    assert os.listdir(d) == [name] and (
        p.read_text() == content if isinstance(content, str) else p.read_bytes() == content
    )


def test_a_resumed_run_reports_where_it_started_not_a_throughput(ckpt, stopped):
    """It printed 'profiled 8 samples in 0.0 s (51494 tokens/s)': the seconds of the layers
    left, over the tokens of all of them."""
    res = _resume(ckpt, stopped)
    assert res["resumed_from_layer"] == STOP
    import math

    from entrodrop_fast.profile.report import build_report

    # the pipeline's figure (tokens over seconds) would mix a part of the work with all of it
    rep = build_report(
        {**res, "tokens": 1, "tokens_per_s": math.nan}, model_info={}, data_info={}, settings={}
    )
    assert rep["timing"]["resumed_from_layer"] == STOP
