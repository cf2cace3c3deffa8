"""The three stages as library calls (the README's "Use from Python"): profile_model ->
make_plan -> prune_model -> evaluate_model, on a tiny model directory, in memory and layer by
layer; the layer-by-layer report equals the in-memory one."""

import json

import pytest
import torch
from helpers import tiny_dir_and_corpus

from entrodrop_fast.evaluate import evaluate_model
from entrodrop_fast.models import load_model
from entrodrop_fast.profile import Calibration, Memory, ProfileSettings, profile_model
from entrodrop_fast.prune import prune_model
from entrodrop_fast.prune.ranking import make_plan


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dir_and_corpus(tmp_path_factory.mktemp("pipeline"))


def test_profile_prune_evaluate(tiny, tmp_path):
    d, corpus = tiny
    cal = Calibration(corpus=str(corpus), samples=4, seq_len=24)
    settings = ProfileSettings(methods=("bucket", "cosine"), batch_size=2)
    windows: list = []
    report = profile_model(str(d), settings, calibration=cal, windows_out=windows)
    assert report["settings"]["samples"] == 4 and report["timing"]["samples"] == 4
    assert windows[0].shape == (4, 24)
    assert {b["kind"] for b in report["blocks"]} == {"attn", "mlp", "layer"}
    json.dumps(report, allow_nan=True)  # plain data, nothing else (no tensor left in it)
    # layer by layer from the checkpoint: the same numbers
    streamed = profile_model(
        str(d),
        ProfileSettings(methods=("bucket", "cosine"), batch_size=2),
        Memory(streaming=True),
        calibration=cal,
    )
    assert streamed["model"]["kind"] == "streaming"
    for a, b in zip(report["blocks"], streamed["blocks"], strict=True):
        assert (a["kind"], a["layer"]) == (b["kind"], b["layer"])
        assert a["delta"]["bucket"]["mean"] == pytest.approx(
            b["delta"]["bucket"]["mean"], rel=1e-6, abs=1e-9
        )
    plan = make_plan(report, "attn", 1)
    out = tmp_path / "pruned"
    src, used, summary = prune_model(str(d), out, plan)
    assert (
        used is plan
        and summary.drops["attn"] == plan["drop"]["attn"]
        and len(plan["drop"]["attn"]) == 1
    )
    assert (out / "config.json").is_file()
    assert {p.name for p in out.iterdir() if p.name.startswith(".")} == {
        ".entrodrop-output.json"
    }  # the output marker only
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no scratch directory left beside it
    lm = load_model(str(out))
    g = torch.Generator().manual_seed(1)
    text = tmp_path.parent / "eval_corpus.txt"  # the held-out fifth must hold the tasks' minimum
    words = [
        f"w{int(i)}" if j % 6 else "delta"
        for j, i in enumerate(torch.randint(1, 97, (4800,), generator=g))
    ]
    text.write_text(" ".join(words))  # last_word needs alphabetic words to predict
    res = evaluate_model(
        lm.model, lm.tokenizer, corpus=str(text), seq_len=16, windows=2, items=4, speed=False
    )
    assert res["perplexity"]["perplexity"] > 1 and {z["task"] for z in res["zero_shot"]} == {
        "continuation",
        "last_word",
    }


def test_prune_model_takes_a_plan_callable_and_leaves_out_alone_on_error(tiny, tmp_path):
    d, _ = tiny
    out = tmp_path / "p"
    seen = []

    def bad(src):
        seen.append(src)
        raise ValueError("no plan for you")

    with pytest.raises(ValueError, match="no plan for you"):
        prune_model(str(d), out, bad)
    assert seen and seen[0].is_dir() and not out.exists()


@pytest.mark.parametrize("bad", [-5, 0, "lots", float("nan"), True])
def test_memory_budget_checked_and_named_by_its_keyword(bad):
    from entrodrop_fast.profile.pipeline import Memory

    with pytest.raises(ValueError, match=r"Memory\.max_bytes"):
        Memory(max_bytes=bad)


def test_memory_budget_as_text():
    from entrodrop_fast.profile.pipeline import Memory

    m = Memory(max_bytes="512MiB")
    assert m.max_bytes == 512 * 2**20 and m.label == "512MiB"


def test_profile_model_refuses_a_resume_dir_holding_the_users_files(tmp_path):
    # checked before any model loads; nothing is written into the user's directory
    from entrodrop_fast.outputs import OutputError
    from entrodrop_fast.profile.pipeline import Memory, profile_model

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "x.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"resume_dir .* not a resume state .*\(x\.txt\)"):
        profile_model(None, memory=Memory(resume_dir=str(folder)))
    assert sorted(p.name for p in folder.iterdir()) == ["x.txt"]
    assert (folder / "x.txt").read_text() == "keep me"


def test_a_temporary_name_of_ours_is_ours_only_beside_run_json(tmp_path):
    """state.pt.tmp is unlinked before a state is saved (outputs.write_atomic's given
    temporary). Every run writes run.json first, so without it a file of that name is the
    user's: refused, untouched."""
    from entrodrop_fast.outputs import OutputError
    from entrodrop_fast.profile.pipeline import check_resume_dir

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "state.pt.tmp").write_text("my notes")
    with pytest.raises(OutputError, match=r"not a resume state .*\(state\.pt\.tmp\)"):
        check_resume_dir(folder)
    assert (folder / "state.pt.tmp").read_text() == "my notes"
    (folder / "run.json").write_text("{}")  # a stopped run of ours: its leftover is ours
    assert check_resume_dir(folder) == folder.resolve()
