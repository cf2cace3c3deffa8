"""Streaming runner: same report as in memory, resume, disk-backed activations, faults."""

import json
import os
import tempfile

import pytest
import torch
from helpers import STREAM_SETTINGS, TINY, char_llama_dir, stream_windows, tiny_model

from entrodrop_fast.profile.inmemory import profile
from entrodrop_fast.profile.layerwise import Checkpoint, CheckpointError, profile_streaming

KEYS = ("entropy", "delta", "cosine", "angular")


def _numbers(res):
    out = []

    def walk(x):
        if isinstance(x, dict):
            for k in sorted(x):
                walk(x[k])
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, float):
            out.append(x)

    walk({k: res[k] for k in KEYS})
    return torch.tensor(out, dtype=torch.float64)


def assert_same_report(a, b, rtol=1e-5):
    na, nb = _numbers(a), _numbers(b)
    assert na.shape == nb.shape and na.numel() > 0
    torch.testing.assert_close(nb, na, rtol=rtol, atol=1e-9, equal_nan=True)


def _save(model, shard="60KB"):
    d = tempfile.mkdtemp(prefix="entrodrop-test-ckpt-")
    model.save_pretrained(d, max_shard_size=shard)
    return d


MOE = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)  # per-expert and fused layouts: tests/test_streaming_moe.py


@pytest.mark.parametrize("name", sorted(set(TINY) - set(MOE)))
def test_streaming_equals_in_memory(name):
    model = tiny_model(name)
    d = _save(model)
    w = stream_windows()
    assert_same_report(
        profile(model, w, STREAM_SETTINGS, progress=False),
        profile_streaming(d, w, STREAM_SETTINGS, progress=False),
    )


def test_disk_backed_activations_and_cleanup(monkeypatch):
    model = tiny_model("llama")
    d = _save(model)
    w = stream_windows()
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    res = profile_streaming(d, w, STREAM_SETTINGS, ram_budget_bytes=0, progress=False)
    assert made and not os.path.exists(made[0])  # the activation files are gone
    assert_same_report(profile(model, w, STREAM_SETTINGS, progress=False), res)


def test_resume_after_interruption(tmp_path):
    model = tiny_model("qwen2", layers=4)
    d = _save(model)
    w = stream_windows()
    whole = profile_streaming(d, w, STREAM_SETTINGS, progress=False)
    with pytest.raises(KeyboardInterrupt):
        profile_streaming(
            d, w, STREAM_SETTINGS, resume_dir=str(tmp_path), progress=False, _stop_after_layer=2
        )
    assert torch.load(tmp_path / "state.pt", weights_only=False)["layers_done"] == 2
    resumed = profile_streaming(d, w, STREAM_SETTINGS, resume_dir=str(tmp_path), progress=False)
    assert_same_report(whole, resumed, rtol=1e-12)
    with pytest.raises(ValueError, match="other arguments"):
        profile_streaming(d, w[:5], STREAM_SETTINGS, resume_dir=str(tmp_path), progress=False)


# ------------------------------------------------------------------ faults


@pytest.fixture
def ckpt_dir():
    return _save(tiny_model("llama"))


def _shards(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))


def test_missing_shard(ckpt_dir):
    victim = _shards(ckpt_dir)[1]
    os.remove(os.path.join(ckpt_dir, victim))
    with pytest.raises(CheckpointError, match=f"{victim}: shard listed in .* is missing"):
        profile_streaming(ckpt_dir, stream_windows(), STREAM_SETTINGS, progress=False)


def test_tensor_missing_from_index(ckpt_dir):
    idx = os.path.join(ckpt_dir, "model.safetensors.index.json")
    data = json.load(open(idx))
    key = "model.layers.1.mlp.up_proj.weight"
    file = data["weight_map"].pop(key)
    json.dump(data, open(idx, "w"))
    # the shard still holds it but the index does not list it: reading by the index must not
    # silently pick it up from elsewhere; rewrite the shard without it to make it really gone
    from safetensors.torch import load_file, save_file

    path = os.path.join(ckpt_dir, file)
    tensors = load_file(path)
    tensors.pop(key)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {key} .*layer 1.* is not in the checkpoint"):
        profile_streaming(ckpt_dir, stream_windows(), STREAM_SETTINGS, progress=False)


def test_truncated_shard(ckpt_dir):
    victim = os.path.join(ckpt_dir, _shards(ckpt_dir)[2])
    size = os.path.getsize(victim)
    with open(victim, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Checkpoint(ckpt_dir)


def test_corrupt_header(ckpt_dir):
    victim = os.path.join(ckpt_dir, _shards(ckpt_dir)[0])
    with open(victim, "r+b") as fh:
        fh.seek(10)
        fh.write(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Checkpoint(ckpt_dir)


def test_config_does_not_match_weights(ckpt_dir):
    cfg_path = os.path.join(ckpt_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] = 48
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match="config and weights do not match"):
        profile_streaming(ckpt_dir, stream_windows(), STREAM_SETTINGS, progress=False)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="neither"):
        Checkpoint(tmp_path)


# ------------------------------------------------------------------ CLI: streaming and torchrun


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer saved beside it (no download)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    return char_llama_dir(d, max_shard_size="60KB", vocab_size=97)


def _cli_report(tiny_dir, out, *extra, torchrun=False):
    import subprocess
    import sys

    args = [
        str(tiny_dir),
        "--samples",
        "6",
        "--seq-len",
        "24",
        "-m",
        "bucket,cosine",
        "--out",
        str(out),
        "-q",
        *extra,
    ]
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "entrodrop_fast",
            "profile",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "entrodrop_fast", "profile", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def _block_numbers(report):
    return torch.tensor(
        [
            [b["delta"]["bucket"]["mean"], b["delta"]["bucket"]["stderr"], b["cosine"]["mean"]]
            for b in report["blocks"]
        ],
        dtype=torch.float64,
    )


@pytest.mark.slow
def test_cli_streaming_and_two_processes_equal_in_memory(tiny_dir, tmp_path):
    plain = _cli_report(tiny_dir, tmp_path / "plain")
    streamed = _cli_report(
        tiny_dir, tmp_path / "streamed", "--max-memory", "100KB"
    )  # the model does not fit: streams
    two = _cli_report(tiny_dir, tmp_path / "two", torchrun=True)
    assert streamed["model"]["kind"] == "streaming" and plain["model"]["kind"] == "dir"
    # 100 KB: one 37 KB layer + 28 KB of activations per window of 24 tokens -> batches of 2
    assert streamed["settings"]["batch_size"] == 2 and plain["settings"]["batch_size"] == 1
    assert two["settings"]["processes"] == 2 and two["timing"]["samples"] == 6
    torch.testing.assert_close(
        _block_numbers(streamed), _block_numbers(plain), rtol=1e-5, atol=1e-9
    )
    torch.testing.assert_close(_block_numbers(two), _block_numbers(plain), rtol=1e-9, atol=1e-12)


def test_cli_max_memory_too_small_fails_early(tiny_dir, tmp_path, capsys):
    from entrodrop_fast.cli import main

    rc = main(
        [
            "profile",
            str(tiny_dir),
            "--samples",
            "4",
            "--seq-len",
            "24",
            "--streaming",
            "--max-memory",
            "1KB",
            "--out",
            str(tmp_path / "r"),
            "-q",
        ]
    )
    assert rc == 1
    assert "--max-memory 1KB is too small" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
